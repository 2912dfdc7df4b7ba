//! The boundaries ARCHITECTURE.md promises, checked on the sources: `unsafe` in one crate, SQL
//! in one crate, no protocol or I/O crate under core, protocol types only at the gRPC edges of
//! the broker and the agent, and no source file too long to read. Needs neither root nor
//! Postgres.

use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every crate of the workspace: its directory name and its parsed manifest.
fn crates() -> Vec<(String, toml::Table)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(workspace().join("crates")).expect("crates/") {
        let dir = entry.expect("crates/ entry").path();
        let manifest = dir.join("Cargo.toml");
        if !manifest.exists() {
            continue;
        }
        let text = std::fs::read_to_string(&manifest).expect("manifest");
        let table: toml::Table = text.parse().expect("a manifest is TOML");
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        out.push((name, table));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(out.len() >= 10, "found the workspace's crates: {out:?}");
    out
}

/// The names of a manifest's normal (not dev or build) dependencies.
fn dependencies(manifest: &toml::Table) -> Vec<String> {
    manifest
        .get("dependencies")
        .and_then(toml::Value::as_table)
        .map(|t| t.keys().cloned().collect())
        .unwrap_or_default()
}

/// Every `.rs` file under `dir`, recursively.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                todo.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn unsafe_code_is_forbidden_everywhere_but_the_fanotify_crate() {
    let root: toml::Table = std::fs::read_to_string(workspace().join("Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        root["workspace"]["lints"]["rust"]["unsafe_code"].as_str(),
        Some("forbid"),
        "the workspace forbids unsafe code"
    );
    for (name, manifest) in crates() {
        let inherits = manifest
            .get("lints")
            .and_then(|l| l.get("workspace"))
            .and_then(toml::Value::as_bool)
            == Some(true);
        if name == "fleetscan-fanotify" {
            assert!(!inherits, "the fanotify crate is where unsafe code lives");
        } else {
            assert!(
                inherits,
                "{name} must take the workspace's lints (`[lints] workspace = true`), which forbid unsafe code"
            );
        }
    }
}

/// The testkit is exempt: it reads what the store wrote from outside, as an operator's `psql`
/// would, to check the product.
#[test]
fn only_the_store_speaks_sql() {
    for (name, manifest) in crates() {
        if name == "fleetscan-testkit" {
            continue;
        }
        let deps = dependencies(&manifest);
        let sql = deps.iter().any(|d| d == "sqlx");
        assert_eq!(
            sql,
            name == "fleetscan-store",
            "{name}: sqlx is the store's alone (dependencies: {deps:?})"
        );
    }
}

#[test]
fn core_has_no_io_and_no_protocol() {
    let (_, core) = crates()
        .into_iter()
        .find(|(name, _)| name == "fleetscan-core")
        .expect("fleetscan-core");
    for dep in dependencies(&core) {
        assert!(
            ![
                "tokio",
                "tonic",
                "prost",
                "sqlx",
                "fleetscan-proto",
                "hyper",
                "reqwest"
            ]
            .contains(&dep.as_str()),
            "fleetscan-core depends on {dep}"
        );
    }
}

/// The broker's protocol types live in its services (and where the server is assembled); the
/// agent's in its session. Everything else works on domain types.
#[test]
fn protocol_types_stay_at_the_grpc_edges() {
    let cases = [
        ("fleetscan-broker", &["services/", "lib.rs"][..]),
        ("fleetscan-agent", &["session/"][..]),
    ];
    for (krate, edges) in cases {
        let src = workspace().join("crates").join(krate).join("src");
        for file in sources(&src) {
            let rel = file
                .strip_prefix(&src)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if edges.iter().any(|e| rel.starts_with(e)) {
                continue;
            }
            let text = std::fs::read_to_string(&file).unwrap();
            assert!(
                !text.contains("fleetscan_proto"),
                "{krate}/src/{rel} uses protocol types; convert at the edge instead"
            );
        }
    }
}

#[test]
fn no_source_file_is_longer_than_800_lines() {
    for (name, _) in crates() {
        let src = workspace().join("crates").join(&name).join("src");
        if !src.exists() {
            continue;
        }
        for file in sources(&src) {
            let lines = std::fs::read_to_string(&file).unwrap().lines().count();
            assert!(
                lines <= 800,
                "{} has {lines} lines: split it by what its parts do",
                file.display()
            );
        }
    }
}

/// The broker's layers call only downwards: services → access and admin → engine.
#[test]
fn the_brokers_layers_call_only_downwards() {
    let src = workspace().join("crates/fleetscan-broker/src");
    // (layer, modules it must not use)
    let rules: [(&str, &[&str]); 3] = [
        (
            "engine/",
            &["crate::services", "crate::access", "crate::admin"],
        ),
        ("access/", &["crate::services", "crate::admin"]),
        ("admin.rs", &["crate::services", "crate::access"]),
    ];
    let mut checked = 0;
    for file in sources(&src) {
        let rel = file
            .strip_prefix(&src)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        for (layer, above) in &rules {
            if !rel.starts_with(layer) {
                continue;
            }
            checked += 1;
            let text = std::fs::read_to_string(&file).unwrap();
            for line in text.lines() {
                let code = line.trim_start();
                if code.starts_with("//") {
                    continue;
                }
                for module in *above {
                    assert!(
                        !code.contains(module),
                        "broker/src/{rel} uses {module}, a layer above it: `{line}`"
                    );
                }
            }
        }
    }
    assert!(checked >= 10, "found the broker's layers ({checked} files)");
}
