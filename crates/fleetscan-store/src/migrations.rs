//! The schema migrations of both backends, embedded in the binary with `include_str!` so that
//! a deployed `fleetscan` needs no migration files at run time.
//!
//! The SQL lives in `migrations/sqlite/` and `migrations/postgres/` at the workspace root, one
//! file per version named `NNNN_description.sql` (the layout `sqlx migrate` understands, so
//! checksums match sqlx-cli's). This module must never alter a released migration: the
//! checksum of every applied version is verified on each start.

use std::borrow::Cow;

use sqlx::migrate::{Migration, MigrationType, Migrator};

/// One embedded migration: version, description (as in the file name) and SQL.
type Embedded = (i64, &'static str, &'static str);

pub(crate) const SQLITE: &[Embedded] = &[
    (
        1,
        "initial",
        include_str!("../../../migrations/sqlite/0001_initial.sql"),
    ),
    (
        2,
        "fleet",
        include_str!("../../../migrations/sqlite/0002_fleet.sql"),
    ),
    (
        3,
        "tenant_verdicts",
        include_str!("../../../migrations/sqlite/0003_tenant_verdicts.sql"),
    ),
    (
        4,
        "access_context",
        include_str!("../../../migrations/sqlite/0004_access_context.sql"),
    ),
];

pub(crate) const POSTGRES: &[Embedded] = &[
    (
        1,
        "initial",
        include_str!("../../../migrations/postgres/0001_initial.sql"),
    ),
    (
        2,
        "fleet",
        include_str!("../../../migrations/postgres/0002_fleet.sql"),
    ),
    (
        3,
        "tenant_verdicts",
        include_str!("../../../migrations/postgres/0003_tenant_verdicts.sql"),
    ),
    (
        4,
        "access_context",
        include_str!("../../../migrations/postgres/0004_access_context.sql"),
    ),
];

/// A migrator over one backend's embedded migrations.
pub(crate) fn migrator(embedded: &'static [Embedded]) -> Migrator {
    let migrations = embedded
        .iter()
        .map(|&(version, description, sql)| {
            Migration::new(
                version,
                Cow::Borrowed(description),
                MigrationType::Simple,
                Cow::Borrowed(sql),
                false,
            )
        })
        .collect::<Vec<_>>();
    Migrator {
        migrations: Cow::Owned(migrations),
        // Keeps the defaults: fail on unknown applied versions, take Postgres' advisory lock so
        // that brokers starting together migrate one at a time.
        ..Migrator::DEFAULT
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// Every file in the migration directory is embedded under its own version, in order, with
    /// identical text: a migration added on disk but not listed here would never run.
    fn check(dir: &str, embedded: &[Embedded]) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../migrations")
            .join(dir);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "sql"))
            .collect();
        files.sort();
        assert_eq!(files.len(), embedded.len(), "files in {}", dir.display());
        for (path, &(version, description, sql)) in files.iter().zip(embedded) {
            let name = path.file_stem().unwrap().to_str().unwrap();
            let (file_version, file_description) = name.split_once('_').unwrap();
            assert_eq!(file_version.parse::<i64>().unwrap(), version, "{name}");
            assert_eq!(file_description, description, "{name}");
            assert_eq!(std::fs::read_to_string(path).unwrap(), sql, "{name}");
        }
        assert!(embedded.windows(2).all(|w| w[0].0 < w[1].0));
    }

    #[test]
    fn embedded_migrations_match_the_files() {
        check("sqlite", SQLITE);
        check("postgres", POSTGRES);
    }

    #[test]
    fn both_backends_have_the_same_versions() {
        let versions = |e: &[Embedded]| e.iter().map(|m| (m.0, m.1)).collect::<Vec<_>>();
        assert_eq!(versions(SQLITE), versions(POSTGRES));
    }
}
