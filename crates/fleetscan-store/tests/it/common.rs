//! The fixtures every store test module shares: a fresh store on each backend, and
//! `both_backends!`, which runs one test body on both.
//!
//! Postgres is required: without root and the Postgres binaries (or DATABASE_URL) the Postgres
//! half fails with a message saying so; it is never skipped.

#![allow(dead_code)]

use std::sync::OnceLock;

use fleetscan_store::testing::PgCluster;
use fleetscan_store::{Backend, Store};

/// A fresh store, its URL (for a second connection), and what keeps it alive.
pub struct Fixture {
    pub store: Store,
    pub url: String,
    _dir: Option<tempfile::TempDir>,
}

/// The Postgres cluster this test process shares (a private `initdb`/`pg_ctl` cluster, or the
/// server named by DATABASE_URL).
pub fn cluster() -> &'static PgCluster {
    static CLUSTER: OnceLock<PgCluster> = OnceLock::new();
    CLUSTER.get_or_init(PgCluster::start)
}

/// A fresh SQLite file in a temp dir.
pub async fn sqlite_fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("store.db").display());
    let store = Store::connect(&url).await.unwrap();
    assert_eq!(store.backend(), Backend::Sqlite);
    Fixture {
        store,
        url,
        _dir: Some(dir),
    }
}

/// A fresh database of the shared cluster.
pub async fn postgres_fixture() -> Fixture {
    let url = cluster().new_database();
    let store = Store::connect(&url).await.unwrap();
    assert_eq!(store.backend(), Backend::Postgres);
    Fixture {
        store,
        url,
        _dir: None,
    }
}

/// Runs each named `async fn(Fixture)` once per backend, as `sqlite::NAME` and `postgres::NAME`.
/// The module must have `sqlite_fixture` and `postgres_fixture` in scope at its root.
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test] async fn $name() { super::$name(super::sqlite_fixture().await).await })*
        }
        mod postgres {
            $(#[tokio::test] async fn $name() { super::$name(super::postgres_fixture().await).await })*
        }
    };
}
