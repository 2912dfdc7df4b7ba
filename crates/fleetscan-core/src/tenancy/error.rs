//! What tenancy refuses: the errors of a configuration, a registration or a policy update, and
//! the one rule every tenant, pool and namespace name follows.
//!
//! Pure: it names refusals and checks names, and never decides what a refused value would have
//! meant.

/// A configuration or registration that tenancy rules refuse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TenancyError {
    #[error(
        "invalid {what} name {name:?}: 1 to 63 characters of a-z, 0-9, '-', '_' or '.', starting with a letter or digit"
    )]
    InvalidName { what: &'static str, name: String },
    #[error("namespace {namespace:?} is mapped to two tenants, {first:?} and {second:?}")]
    NamespaceTwice {
        namespace: String,
        first: String,
        second: String,
    },
    #[error("tenant {tenant:?} opts into shared pool {pool:?}, which is not configured")]
    UnknownSharedPool { tenant: String, pool: String },
    #[error("tenant {tenant:?} has no pool named {pool:?}")]
    UnknownPool { tenant: String, pool: String },
    #[error(
        "tenant {tenant:?} names {pool:?} both as a private pool and as a shared pool it opts into"
    )]
    AmbiguousPool { tenant: String, pool: String },
    #[error("unknown tenant {0:?}")]
    UnknownTenant(String),
    #[error("shared pool {0:?} serves no tenant: none opted in among those the worker named")]
    NoOptedInTenant(String),
    #[error(
        "a private pool serves one tenant; {pool:?} was registered for {count} (use a shared pool)"
    )]
    PrivatePoolOfSeveralTenants { pool: String, count: usize },
    #[error("policy version must be at least 1")]
    ZeroVersion,
    #[error("policy version {offered} is not newer than the one in force, {current}")]
    NotNewer { current: u64, offered: u64 },
}

/// Checks a tenant, pool or namespace name: lower-case letters, digits, `-`, `_`, `.`, 1 to 63
/// characters, starting with a letter or digit (every Kubernetes namespace name qualifies).
/// Keeps `/` and `*` out of names, so that [`super::PoolKey::key`] is unambiguous.
pub fn check_name(what: &'static str, name: &str) -> Result<(), TenancyError> {
    let ok = (1..=63).contains(&name.len())
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        });
    if ok {
        Ok(())
    } else {
        Err(TenancyError::InvalidName {
            what,
            name: name.to_owned(),
        })
    }
}
