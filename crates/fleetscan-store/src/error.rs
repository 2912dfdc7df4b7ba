//! Store errors, and the one place that classifies sqlx errors.
//!
//! Callers care about one distinction: is the store *unavailable* (the database is down,
//! unreachable, overloaded or out of disk: retry later, queue, fall back) or did this call fail
//! on its own merits (bad data, a violated constraint, a bug: retrying will not help)? Every
//! sqlx error goes through [`StoreError::from_sqlx`]; no other code may inspect sqlx errors.

use sqlx::migrate::MigrateError;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or cannot serve now: connection refused or lost, pool
    /// timed out, I/O error, server shutting down, too many connections, disk full, busy.
    #[error("store unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),

    /// The store URL is not one this store understands.
    #[error("bad store url: {0}")]
    BadUrl(String),

    /// Migrating the schema failed for a reason other than unavailability (e.g. an applied
    /// migration was modified, or the database is newer than this binary).
    #[error("store migration failed: {0}")]
    Migration(#[source] MigrateError),

    /// A stored value does not parse back into the domain type. Never replaced by a default.
    #[error("corrupt value in {table}.{column}: {value:?}")]
    Corrupt {
        table: &'static str,
        column: &'static str,
        value: String,
    },

    /// An unsigned value does not fit the signed 64-bit column that stores it.
    #[error("{what} is out of range for the store: {value}")]
    OutOfRange { what: &'static str, value: u64 },

    /// Any other database error: a constraint, a type mismatch, a bug.
    #[error("store error: {0}")]
    Database(#[source] sqlx::Error),
}

impl StoreError {
    /// Whether the store itself is unavailable (as opposed to this call being wrong).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }

    /// The one mapping from sqlx errors: by error kind, and for database errors by SQLSTATE
    /// (Postgres) or primary result code (SQLite).
    pub(crate) fn from_sqlx(err: sqlx::Error) -> StoreError {
        let unavailable = match &err {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => true,
            sqlx::Error::Database(db) => {
                let code = db.code().unwrap_or_default();
                if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                    code.parse().is_ok_and(sqlite_unavailable)
                } else {
                    postgres_unavailable(&code)
                }
            }
            sqlx::Error::Configuration(_) => return StoreError::BadUrl(err.to_string()),
            _ => false,
        };
        if unavailable {
            StoreError::Unavailable(err)
        } else {
            StoreError::Database(err)
        }
    }

    pub(crate) fn from_migrate(err: MigrateError) -> StoreError {
        match err {
            MigrateError::Execute(e) | MigrateError::ExecuteMigration(e, _) => {
                match StoreError::from_sqlx(e) {
                    unavailable @ StoreError::Unavailable(_) => unavailable,
                    StoreError::Database(e) => StoreError::Migration(MigrateError::Execute(e)),
                    other => other,
                }
            }
            other => StoreError::Migration(other),
        }
    }

    pub(crate) fn corrupt(
        table: &'static str,
        column: &'static str,
        value: impl Into<String>,
    ) -> Self {
        StoreError::Corrupt {
            table,
            column,
            value: value.into(),
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        StoreError::from_sqlx(err)
    }
}

/// SQLite result codes that mean "the store cannot serve now". SQLite reports its extended
/// result code, whose low byte is the primary code.
fn sqlite_unavailable(extended_code: i32) -> bool {
    matches!(
        extended_code & 0xff,
        5 // SQLITE_BUSY: another writer held the lock past the busy timeout
        | 6 // SQLITE_LOCKED
        | 7 // SQLITE_NOMEM
        | 10 // SQLITE_IOERR
        | 13 // SQLITE_FULL
    )
}

/// Postgres SQLSTATEs that mean "the store cannot serve now": class 08 (connection
/// exception), class 53 (insufficient resources: disk full, out of memory, too many
/// connections), 57P01-57P03 (the server is shutting down, crashed or still starting) and
/// 58030 (I/O error).
fn postgres_unavailable(sqlstate: &str) -> bool {
    sqlstate.starts_with("08")
        || sqlstate.starts_with("53")
        || matches!(sqlstate, "57P01" | "57P02" | "57P03" | "58030")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_classified() {
        for code in [
            "08006", "08001", "53300", "53100", "57P01", "57P03", "58030",
        ] {
            assert!(postgres_unavailable(code), "{code}");
        }
        // Unique violation, check violation, undefined table, undefined database.
        for code in ["23505", "23514", "42P01", "3D000", ""] {
            assert!(!postgres_unavailable(code), "{code}");
        }
        // Busy, busy-recovery, I/O error, I/O error (short read), full.
        for code in [5, 261, 10, 522, 13] {
            assert!(sqlite_unavailable(code), "{code}");
        }
        // Error, constraint, constraint (unique), cannot open, read-only.
        for code in [1, 19, 2067, 14, 8] {
            assert!(!sqlite_unavailable(code), "{code}");
        }
    }

    #[test]
    fn io_and_pool_errors_are_unavailable() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(StoreError::from_sqlx(sqlx::Error::Io(refused)).is_unavailable());
        assert!(StoreError::from_sqlx(sqlx::Error::PoolTimedOut).is_unavailable());
        assert!(StoreError::from_sqlx(sqlx::Error::PoolClosed).is_unavailable());
        assert!(!StoreError::from_sqlx(sqlx::Error::RowNotFound).is_unavailable());
        let bad = StoreError::from_sqlx(sqlx::Error::Configuration("nope".into()));
        assert!(matches!(bad, StoreError::BadUrl(_)));
        assert!(!bad.is_unavailable());
    }
}
