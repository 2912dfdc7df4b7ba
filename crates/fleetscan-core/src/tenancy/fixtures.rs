//! The tenancy the unit tests of this module share.

use std::collections::BTreeMap;

use super::*;
use crate::{FailMode, Policy};

pub(super) fn patch() -> PolicyPatch {
    PolicyPatch::default()
}

/// Two tenants with a private pool each, both opted into a shared one; acme's namespace
/// `acme-dev` audits only and its `acme-ci` scans executions only.
pub(super) fn two_tenants() -> Tenancy {
    let mut tenants = BTreeMap::new();
    tenants.insert(
        "acme".to_owned(),
        TenantConfig {
            namespaces: vec!["shop".into(), "acme-dev".into()],
            pools: vec!["yara".into()],
            shared_pools: vec!["clamav".into()],
            policy: PolicyPatch {
                fail_mode: Some(FailMode::Closed),
                ..patch()
            },
            namespace_policies: BTreeMap::from([
                (
                    "acme-dev".to_owned(),
                    PolicyPatch {
                        audit_only: Some(true),
                        ..patch()
                    },
                ),
                (
                    "acme-ci".to_owned(),
                    PolicyPatch {
                        exec_only: Some(true),
                        pools: Some(vec!["yara".into()]),
                        exclusions: Some(Exclusions {
                            paths: vec!["/cache".into(), "/srv/**/*.log".into()],
                            images: vec!["registry.acme/ci-*".into()],
                            namespaces: vec![],
                        }),
                        ..patch()
                    },
                ),
            ]),
        },
    );
    tenants.insert(
        "globex".to_owned(),
        TenantConfig {
            namespaces: vec!["web".into()],
            pools: vec!["yara".into()],
            shared_pools: vec!["clamav".into()],
            policy: PolicyPatch {
                max_file_size: Some(1024),
                pools: Some(vec!["yara".into()]),
                ..patch()
            },
            namespace_policies: BTreeMap::new(),
        },
    );
    Tenancy::new(
        &Policy::default(),
        &TenancyConfig {
            version: 7,
            namespace_label: String::new(),
            shared_pools: vec!["clamav".into()],
            tenants,
        },
    )
    .unwrap()
}
