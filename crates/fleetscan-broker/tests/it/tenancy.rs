//! Tenants and routing on a real broker: each tenant's content goes to its own pools only, a
//! tenant's own verdicts serve only that tenant, policies apply per tenant and namespace, and
//! the policy set reaches agents. Workers are the real SDK (`fleetscan_worker::run`) where the
//! scanner matters, scripted streams where the test must see every job.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use fleetscan_broker::BrokerConfig;
use fleetscan_core::tenancy::{PolicyPatch, TenancyConfig, TenantConfig};
use fleetscan_core::{Action, FailMode, ScannerIdentity, Sha256, VerdictKind};
use fleetscan_proto::v1;
use fleetscan_store::AccessFilter;
use fleetscan_worker::{ScanOutcome, Scanner, WorkerConfig};
use parking_lot::Mutex;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::common::{ScriptedAgent, TestBroker, WAIT, eventually, identity};

/// A block list that remembers every content it scanned. Both tenants' scanners carry the
/// same identity on purpose: only the tenant scope keeps their verdicts apart.
struct BlockList {
    blocked: HashSet<Sha256>,
    scanned: Arc<Mutex<Vec<Sha256>>>,
}

impl Scanner for BlockList {
    fn identity(&self) -> ScannerIdentity {
        ScannerIdentity {
            scanner: "blocklist".into(),
            engine: "test-blocklist".into(),
            engine_version: "1".into(),
            ruleset_version: "v1".into(),
        }
    }

    fn scan(&self, content: &[u8]) -> ScanOutcome {
        let digest = Sha256::of(content);
        self.scanned.lock().push(digest);
        if self.blocked.contains(&digest) {
            ScanOutcome::malicious("Tenant-Blocked")
        } else {
            ScanOutcome::clean()
        }
    }
}

struct SdkWorker {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), fleetscan_worker::WorkerError>>,
    scanned: Arc<Mutex<Vec<Sha256>>>,
}

impl SdkWorker {
    async fn start(
        broker: &TestBroker,
        name: &str,
        pool: &str,
        tenant: &str,
        blocked: &[&[u8]],
    ) -> SdkWorker {
        let scanned = Arc::new(Mutex::new(Vec::new()));
        let scanner = BlockList {
            blocked: blocked.iter().map(|c| Sha256::of(c)).collect(),
            scanned: scanned.clone(),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(fleetscan_worker::run(
            WorkerConfig {
                brokers: vec![broker.url.clone()],
                worker_name: name.into(),
                pool: pool.into(),
                tenants: vec![tenant.into()],
                credits: 2,
                ..WorkerConfig::default()
            },
            Arc::new(scanner),
            async move {
                let _ = stopped.await;
            },
        ));
        broker.wait_for_worker(Some(name)).await;
        SdkWorker {
            stop: Some(stop),
            task,
            scanned,
        }
    }

    fn scanned(&self) -> Vec<Sha256> {
        self.scanned.lock().clone()
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("worker stops")
            .unwrap()
            .expect("worker ran cleanly");
    }
}

fn patch() -> PolicyPatch {
    PolicyPatch::default()
}

/// acme owns namespaces `shop` (enforced, fail closed) and `shop-dev` (audit only), `ci`
/// (exec only) by configuration; globex owns `web`. Each has a pool named `scanners` — the
/// same name, two different pools.
fn two_tenants(config: &mut BrokerConfig) {
    let mut tenants = BTreeMap::new();
    tenants.insert(
        "acme".to_owned(),
        TenantConfig {
            namespaces: vec!["shop".into(), "shop-dev".into(), "ci".into()],
            pools: vec!["scanners".into()],
            policy: PolicyPatch {
                fail_mode: Some(FailMode::Closed),
                ..patch()
            },
            namespace_policies: BTreeMap::from([
                (
                    "shop-dev".to_owned(),
                    PolicyPatch {
                        audit_only: Some(true),
                        ..patch()
                    },
                ),
                (
                    "ci".to_owned(),
                    PolicyPatch {
                        exec_only: Some(true),
                        ..patch()
                    },
                ),
            ]),
            ..TenantConfig::default()
        },
    );
    tenants.insert(
        "globex".to_owned(),
        TenantConfig {
            namespaces: vec!["web".into()],
            pools: vec!["scanners".into()],
            ..TenantConfig::default()
        },
    );
    config.tenancy = TenancyConfig {
        version: 5,
        tenants,
        ..TenancyConfig::default()
    };
}

/// The agent's next decision, from a task of its own: it uploads content when asked while the
/// test plays the worker.
fn decision(mut agent: ScriptedAgent) -> JoinHandle<(ScriptedAgent, v1::Decision)> {
    tokio::spawn(async move {
        let d = agent.decision().await;
        (agent, d)
    })
}

fn tenant_events(tenant: &str) -> AccessFilter {
    AccessFilter {
        tenant: tenant.into(),
        ..AccessFilter::default()
    }
}

#[tokio::test]
async fn each_tenants_content_goes_to_its_own_worker_and_its_block_list_stays_its_own() {
    let broker = TestBroker::start(two_tenants).await;
    const BAD: &[u8] = b"acme's secret indicator";
    const SHOP_ONLY: &[u8] = b"a file only acme's pods open";
    let acme = SdkWorker::start(&broker, "acme-1", "scanners", "acme", &[BAD]).await;
    let globex = SdkWorker::start(&broker, "globex-1", "scanners", "globex", &[]).await;
    let mut agent = broker.agent("node-a").await;

    agent
        .request_from(1, BAD, v1::AccessKind::Open, "shop", "")
        .await;
    let d = agent.decision().await;
    assert_eq!(d.action(), v1::Action::Deny, "{}", d.reason);
    assert!(d.reason.contains("Tenant-Blocked"), "{}", d.reason);

    // The same content in globex's pod: globex's own scanner decides, acme's verdict (same
    // content, same scanner identity) is not reused.
    agent
        .request_from(2, BAD, v1::AccessKind::Open, "web", "")
        .await;
    let d = agent.decision().await;
    assert_eq!(d.action(), v1::Action::Allow, "{}", d.reason);

    agent
        .request_from(3, SHOP_ONLY, v1::AccessKind::Open, "shop", "")
        .await;
    assert_eq!(agent.decision().await.action(), v1::Action::Allow);

    // Known now for both tenants: answered from each tenant's own verdicts, no new scan.
    agent
        .request_from(4, BAD, v1::AccessKind::Exec, "shop", "")
        .await;
    assert_eq!(agent.decision().await.action(), v1::Action::Deny);
    agent
        .request_from(5, BAD, v1::AccessKind::Exec, "web", "")
        .await;
    assert_eq!(agent.decision().await.action(), v1::Action::Allow);

    assert_eq!(
        acme.scanned(),
        vec![Sha256::of(BAD), Sha256::of(SHOP_ONLY)],
        "acme's worker scans acme's content, once each"
    );
    assert_eq!(
        globex.scanned(),
        vec![Sha256::of(BAD)],
        "globex's worker never sees acme's other content"
    );
    assert_eq!(agent.content_requests, vec![1, 2, 3]);

    // Stored within each tenant's scope, never as a fleet verdict.
    let store = broker.store().await;
    let id = BlockList {
        blocked: HashSet::new(),
        scanned: Arc::default(),
    }
    .identity();
    let verdict = |tenant: &'static str| {
        let store = store.clone();
        let id = id.clone();
        async move {
            eventually("the tenant's verdict to be stored", || {
                let store = store.clone();
                let id = id.clone();
                async move {
                    store
                        .find_tenant_verdict(tenant, &Sha256::of(BAD), &id)
                        .await
                        .unwrap()
                }
            })
            .await
        }
    };
    assert_eq!(verdict("acme").await.kind, VerdictKind::Malicious);
    assert_eq!(verdict("globex").await.kind, VerdictKind::Clean);
    assert_eq!(
        store.find_verdict(&Sha256::of(BAD), &id).await.unwrap(),
        None
    );
    // The denial is acme's record, not the agent's tenant's.
    let denials = eventually("acme's denial to be recorded", || {
        let store = store.clone();
        async move {
            let rows = store.list_accesses(&tenant_events("acme")).await.unwrap();
            (rows.len() == 2).then_some(rows)
        }
    })
    .await;
    assert!(denials.iter().all(|(_, r)| r.action == Action::Deny));
    assert!(
        store
            .list_accesses(&tenant_events("default"))
            .await
            .unwrap()
            .is_empty()
    );
    acme.stop().await;
    globex.stop().await;
}

#[tokio::test]
async fn a_private_verdict_is_not_reused_for_another_tenant_after_a_restart() {
    // The store, not only the memory cache, keeps tenants apart: a second broker on the same
    // store finds acme's verdict for acme and scans again for globex.
    let mut first = TestBroker::start(two_tenants).await;
    const BAD: &[u8] = b"blocked for acme only";
    let acme = SdkWorker::start(&first, "acme-1", "scanners", "acme", &[BAD]).await;
    let mut agent = first.agent("node-a").await;
    agent
        .request_from(1, BAD, v1::AccessKind::Open, "shop", "")
        .await;
    assert_eq!(agent.decision().await.action(), v1::Action::Deny);
    acme.stop().await;
    agent.close();
    let store_url = first.store_url.clone();
    first.shutdown().await;

    let second = TestBroker::start(|c| {
        two_tenants(c);
        c.store_url = store_url;
    })
    .await;
    let acme = SdkWorker::start(&second, "acme-2", "scanners", "acme", &[BAD]).await;
    let globex = SdkWorker::start(&second, "globex-2", "scanners", "globex", &[]).await;
    let mut agent = second.agent("node-a").await;
    agent
        .request_from(1, BAD, v1::AccessKind::Open, "shop", "")
        .await;
    assert_eq!(agent.decision().await.action(), v1::Action::Deny);
    agent
        .request_from(2, BAD, v1::AccessKind::Open, "web", "")
        .await;
    assert_eq!(agent.decision().await.action(), v1::Action::Allow);
    assert!(
        acme.scanned().is_empty(),
        "acme's stored verdict serves acme"
    );
    assert_eq!(globex.scanned(), vec![Sha256::of(BAD)]);
    assert_eq!(agent.content_requests, vec![2]);
    acme.stop().await;
    globex.stop().await;
}

#[tokio::test]
async fn an_audit_only_namespace_allows_a_malicious_open_and_records_it() {
    let broker = TestBroker::start(two_tenants).await;
    let mut worker = broker
        .credited_worker_in("acme-w", &identity("r1"), "scanners", &["acme"], 4)
        .await;
    let mut agent = broker.agent("node-a").await;
    agent
        .request_from(1, b"evil", v1::AccessKind::Open, "shop-dev", "")
        .await;
    let decided = decision(agent);
    let job = worker.job().await;
    assert_eq!(job.job.tenant, "acme");
    worker
        .answer(job.job.job_id, v1::VerdictResult::Malicious, "EICAR")
        .await;
    let (mut agent, d) = decided.await.unwrap();
    assert_eq!(d.action(), v1::Action::Allow, "{}", d.reason);
    assert!(d.reason.starts_with("audit-only"), "{}", d.reason);
    // The same content in an enforced namespace of the tenant is denied.
    agent
        .request_from(2, b"evil", v1::AccessKind::Open, "shop", "")
        .await;
    assert_eq!(agent.decision().await.action(), v1::Action::Deny);
    let store = broker.store().await;
    let rows = eventually("both accesses to be recorded", || {
        let store = store.clone();
        async move {
            let rows = store.list_accesses(&tenant_events("acme")).await.unwrap();
            (rows.len() == 2).then_some(rows)
        }
    })
    .await;
    // Newest first: the denial, then the audited open that was let through.
    assert_eq!(rows[0].1.action, Action::Deny);
    assert_eq!(rows[1].1.action, Action::Allow);
    assert!(
        rows[1].1.reason.starts_with("audit-only"),
        "{}",
        rows[1].1.reason
    );
    assert_eq!(rows[1].1.threat_name.as_deref(), Some("EICAR"));
}

#[tokio::test]
async fn an_exec_only_namespace_is_not_scanned_on_open() {
    let broker = TestBroker::start(two_tenants).await;
    let mut worker = broker
        .credited_worker_in("acme-w", &identity("r1"), "scanners", &["acme"], 4)
        .await;
    let mut agent = broker.agent("node-a").await;
    agent
        .request_from(1, b"evil", v1::AccessKind::Open, "ci", "")
        .await;
    let d = agent.decision().await;
    assert_eq!(d.action(), v1::Action::Allow);
    assert!(d.reason.contains("exec-only"), "{}", d.reason);
    assert!(
        !d.cacheable,
        "another namespace may have to scan the same file"
    );
    assert!(agent.content_requests.is_empty());
    assert!(
        worker
            .job_within(std::time::Duration::from_millis(200))
            .await
            .is_none()
    );
    agent
        .request_from(2, b"evil", v1::AccessKind::Exec, "ci", "")
        .await;
    let decided = decision(agent);
    let job = worker.job().await;
    worker
        .answer(job.job.job_id, v1::VerdictResult::Malicious, "EICAR")
        .await;
    assert_eq!(decided.await.unwrap().1.action(), v1::Action::Deny);
}

#[tokio::test]
async fn a_tenant_without_a_live_worker_gets_its_fail_mode_until_one_asks_for_work() {
    let broker = TestBroker::start(two_tenants).await;
    let mut agent = broker.agent("node-a").await;
    // acme fails closed, globex open (the fleet's): neither has a worker yet.
    agent
        .request_from(1, b"x", v1::AccessKind::Open, "shop", "")
        .await;
    let d = agent.decision().await;
    assert_eq!(d.action(), v1::Action::Deny, "{}", d.reason);
    assert!(d.reason.contains("no live scanner"), "{}", d.reason);
    agent
        .request_from(2, b"x", v1::AccessKind::Open, "web", "")
        .await;
    assert_eq!(agent.decision().await.action(), v1::Action::Allow);

    // globex's worker does not make acme's pool live.
    let mut globex = broker
        .credited_worker_in("globex-w", &identity("r1"), "scanners", &["globex"], 4)
        .await;
    // Attached without credit is not live either.
    let mut acme = broker
        .worker_in("acme-w", &identity("r1"), "scanners", &["acme"])
        .await
        .unwrap();
    agent
        .request_from(3, b"x", v1::AccessKind::Open, "shop", "")
        .await;
    assert_eq!(agent.decision().await.action(), v1::Action::Deny);
    assert!(
        globex
            .job_within(std::time::Duration::from_millis(200))
            .await
            .is_none()
    );
    acme.credit(1).await;
    broker.wait_for_worker(Some("acme-w")).await;
    // The first credit made the pool live: the next access is scanned by acme's worker.
    agent
        .request_from(4, b"x", v1::AccessKind::Open, "shop", "")
        .await;
    let decided = decision(agent);
    let job = acme.job().await;
    assert_eq!(job.job.tenant, "acme");
    acme.answer(job.job.job_id, v1::VerdictResult::Clean, "")
        .await;
    let d = decided.await.unwrap().1;
    assert_eq!(
        (d.request_id, d.action()),
        (4, v1::Action::Allow),
        "{}",
        d.reason
    );
    assert!(
        globex
            .job_within(std::time::Duration::from_millis(200))
            .await
            .is_none()
    );
}

#[tokio::test]
async fn workers_are_placed_only_in_pools_of_their_tenants() {
    let broker = TestBroker::start(two_tenants).await;
    let refused = |r: Result<crate::common::ScriptedWorker, tonic::Status>| match r {
        Ok(_) => panic!("registration accepted"),
        Err(status) => {
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
            status.message().to_owned()
        }
    };
    // A private pool serves one tenant.
    let why = refused(
        broker
            .worker_in("w", &identity("r1"), "scanners", &["acme", "globex"])
            .await,
    );
    assert!(why.contains("private pool"), "{why}");
    // No pool of that name in the tenant, no such tenant, the operator has no `scanners`.
    for (pool, tenants) in [
        ("nope", &["acme"][..]),
        ("scanners", &["initech"][..]),
        ("scanners", &[][..]),
    ] {
        refused(broker.worker_in("w", &identity("r1"), pool, tenants).await);
    }
    // The pre-tenancy registration still lands in the operator's default pool.
    let legacy = broker.worker("legacy", &identity("r1")).await;
    drop(legacy);
}

/// A shared pool that both tenants opted into, and acme also requires its own pool.
fn shared_pool(config: &mut BrokerConfig) {
    two_tenants(config);
    config.tenancy.shared_pools = vec!["av".into()];
    let acme = config.tenancy.tenants.get_mut("acme").unwrap();
    acme.shared_pools = vec!["av".into()];
    let globex = config.tenancy.tenants.get_mut("globex").unwrap();
    globex.shared_pools = vec!["av".into()];
    globex.policy.pools = Some(vec!["av".into()]);
}

#[tokio::test]
async fn a_shared_pools_verdicts_are_shared_and_any_malicious_verdict_denies() {
    let broker = TestBroker::start(shared_pool).await;
    let mut av = broker
        .credited_worker_in("av-w", &identity("av1"), "av", &[], 8)
        .await;
    let mut acme = broker
        .credited_worker_in("acme-w", &identity("acme1"), "scanners", &["acme"], 8)
        .await;
    let mut agent = broker
        .agent_with("node-a", &[fleetscan_proto::CAPABILITY_SCOPED_CACHE])
        .await;

    // acme requires both pools: its own says clean, the shared one malicious: denied.
    agent
        .request_from(1, b"mixed", v1::AccessKind::Open, "shop", "")
        .await;
    let decided = decision(agent);
    // acme's own pool first, then the shared one (the order of acme's pools).
    acme.answer_next(v1::VerdictResult::Clean, "").await;
    let job = av.job().await;
    assert_eq!(job.job.tenant, "acme");
    av.answer(job.job.job_id, v1::VerdictResult::Malicious, "AV-Hit")
        .await;
    let (mut agent, d) = decided.await.unwrap();
    assert_eq!(d.action(), v1::Action::Deny, "{}", d.reason);
    assert!(d.reason.contains("AV-Hit"), "{}", d.reason);
    assert_eq!(d.verdicts.len(), 2);

    // globex requires only the shared pool: its verdict on this content is reused.
    agent
        .request_from(2, b"mixed", v1::AccessKind::Open, "web", "")
        .await;
    let d = agent.decision().await;
    assert_eq!(d.action(), v1::Action::Deny, "{}", d.reason);
    assert!(
        av.job_within(std::time::Duration::from_millis(200))
            .await
            .is_none()
    );

    // Clean from both of acme's pools: allowed, and cached for both.
    agent
        .request_from(3, b"fine", v1::AccessKind::Open, "shop", "")
        .await;
    let decided = decision(agent);
    acme.answer_next(v1::VerdictResult::Clean, "").await;
    av.answer_next(v1::VerdictResult::Clean, "").await;
    let (mut agent, d) = decided.await.unwrap();
    assert_eq!(d.action(), v1::Action::Allow, "{}", d.reason);
    agent
        .request_from(4, b"fine", v1::AccessKind::Open, "shop", "")
        .await;
    let d = agent.decision().await;
    assert_eq!(d.action(), v1::Action::Allow);
    assert!(d.cacheable);
    // The fleet operator did not opt in: its default pool has no worker, fail open.
    agent
        .request_from(5, b"mixed", v1::AccessKind::Open, "", "")
        .await;
    let d = agent.decision().await;
    assert!(d.reason.contains("no live scanner"), "{}", d.reason);
}

#[tokio::test]
async fn agents_that_do_not_key_their_cache_by_policy_get_no_cacheable_decision() {
    // With several policies in force, a file allowed in one namespace may have to be denied
    // in another on the same host: only an agent that keys its cache by policy may cache.
    let broker = TestBroker::start(two_tenants).await;
    let mut worker = broker
        .credited_worker_in("globex-w", &identity("r1"), "scanners", &["globex"], 4)
        .await;
    let mut old = broker.agent("node-a").await;
    old.request_from(1, b"fine", v1::AccessKind::Open, "web", "")
        .await;
    let decided = decision(old);
    let job = worker.job().await;
    worker
        .answer(job.job.job_id, v1::VerdictResult::Clean, "")
        .await;
    let d = decided.await.unwrap().1;
    assert_eq!(d.action(), v1::Action::Allow);
    assert!(!d.cacheable, "{d:?}");
    let mut scoped = broker
        .agent_with("node-b", &[fleetscan_proto::CAPABILITY_SCOPED_CACHE])
        .await;
    scoped
        .request_from(1, b"fine", v1::AccessKind::Open, "web", "")
        .await;
    let d = scoped.decision().await;
    assert_eq!(d.action(), v1::Action::Allow);
    assert!(d.cacheable, "{d:?}");
}

#[tokio::test]
async fn the_policy_set_is_pushed_at_session_start_and_on_change() {
    let broker = TestBroker::start(two_tenants).await;
    let mut agent = broker.agent("node-a").await;
    let first = agent.policy_update().await;
    let set = first.policy_set.expect("a policy set");
    assert_eq!(set.version, 5);
    assert_eq!(set.default_tenant, "default");
    assert_eq!(set.namespace_label, "fleetscan.io/tenant");
    assert_eq!(
        set.namespace_tenants.get("web").map(String::as_str),
        Some("globex")
    );
    let find = |tenant: &str, namespace: &str| {
        set.policies
            .iter()
            .find(|p| p.tenant == tenant && p.namespace == namespace)
            .unwrap_or_else(|| panic!("no policy for {tenant}/{namespace}"))
            .clone()
    };
    assert!(find("acme", "ci").exec_only);
    assert!(find("acme", "shop-dev").policy.unwrap().audit_only);
    assert_eq!(
        find("acme", "").policy.unwrap().fail_mode(),
        v1::FailMode::Closed
    );
    assert_eq!(find("globex", "").pools, vec!["scanners".to_owned()]);
    // The agent's own (host) policy rides along, for agents that predate policy sets.
    assert_eq!(first.policy.unwrap().version, 5);

    // A newer version is pushed; an older one is refused.
    let mut config = broker.engine.config().tenancy.clone();
    config.version = 6;
    config
        .tenants
        .get_mut("globex")
        .unwrap()
        .namespace_policies
        .insert(
            "web".into(),
            PolicyPatch {
                audit_only: Some(true),
                ..patch()
            },
        );
    broker.engine.set_tenancy(&config).unwrap();
    let update = agent.policy_update().await.policy_set.unwrap();
    assert_eq!(update.version, 6);
    assert!(
        update
            .policies
            .iter()
            .any(|p| p.tenant == "globex" && p.namespace == "web")
    );
    config.version = 6;
    assert!(broker.engine.set_tenancy(&config).is_err());
    // The broker decides by the new version too.
    assert!(broker.engine.effective("globex", "web").policy.audit_only);
}

#[tokio::test]
async fn an_old_configuration_with_one_policy_still_works() {
    // No tenancy at all: the single `policy` is the fleet operator's, every access is its,
    // whatever namespace or label the agent reports, and the default pool decides.
    let broker = TestBroker::start(|c| {
        c.policy.fail_mode = FailMode::Closed;
    })
    .await;
    let mut agent = broker.agent("node-a").await;
    let set = agent.policy_update().await.policy_set.unwrap();
    assert_eq!(set.policies.len(), 1);
    assert_eq!(set.policies[0].tenant, "default");
    agent
        .request_from(1, b"x", v1::AccessKind::Open, "some-namespace", "acme")
        .await;
    let d = agent.decision().await;
    assert_eq!(d.action(), v1::Action::Deny, "closed without a worker");
    let mut worker = broker.worker("w1", &identity("r1")).await;
    worker.credit(2).await;
    broker.wait_for_worker(None).await;
    agent
        .request_from(2, b"x", v1::AccessKind::Open, "some-namespace", "acme")
        .await;
    let decided = decision(agent);
    let job = worker.job().await;
    assert_eq!(job.job.tenant, "default");
    worker
        .answer(job.job.job_id, v1::VerdictResult::Clean, "")
        .await;
    assert_eq!(decided.await.unwrap().1.action(), v1::Action::Allow);
    // The verdict is the fleet's, stored as before tenancy.
    let store = broker.store().await;
    eventually("the verdict to be stored", || {
        let store = store.clone();
        async move {
            store
                .find_verdict(&Sha256::of(b"x"), &identity("r1"))
                .await
                .unwrap()
        }
    })
    .await;
}

#[tokio::test]
async fn a_tenants_agent_is_decided_as_its_own_tenant_whatever_namespace_it_names() {
    // acme's agent names globex's namespace (and label): the access is still acme's, so it
    // goes to acme's worker under acme's policy, and is recorded as acme's, never globex's.
    let broker = TestBroker::start(two_tenants).await;
    let mut acme = broker
        .credited_worker_in("acme-w", &identity("r1"), "scanners", &["acme"], 4)
        .await;
    let mut globex = broker
        .credited_worker_in("globex-w", &identity("r1"), "scanners", &["globex"], 4)
        .await;
    let mut agent = broker.agent_of("node-a", "acme").await;
    agent
        .request_from(
            1,
            b"globex's content",
            v1::AccessKind::Open,
            "web",
            "globex",
        )
        .await;
    let decided = decision(agent);
    let job = acme.job().await;
    assert_eq!(job.job.tenant, "acme");
    acme.answer(job.job.job_id, v1::VerdictResult::Malicious, "EICAR")
        .await;
    let (mut agent, d) = decided.await.unwrap();
    // globex's policy would only be the fleet's; acme's own denies.
    assert_eq!(d.action(), v1::Action::Deny, "{}", d.reason);
    // acme's own namespaces keep their overrides: audit-only lets the same content through.
    agent
        .request_from(2, b"globex's content", v1::AccessKind::Open, "shop-dev", "")
        .await;
    let d = agent.decision().await;
    assert_eq!(d.action(), v1::Action::Allow, "{}", d.reason);
    assert!(d.reason.starts_with("audit-only"), "{}", d.reason);
    assert!(
        globex
            .job_within(std::time::Duration::from_millis(200))
            .await
            .is_none(),
        "globex's worker never sees acme's agent's content"
    );
    let store = broker.store().await;
    eventually("both accesses to be recorded as acme's", || {
        let store = store.clone();
        async move {
            let rows = store.list_accesses(&tenant_events("acme")).await.unwrap();
            (rows.len() == 2).then_some(rows)
        }
    })
    .await;
    assert!(
        store
            .list_accesses(&tenant_events("globex"))
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn an_agent_hello_with_an_invalid_tenant_is_refused() {
    use fleetscan_proto::v1::agent_message;
    use fleetscan_proto::v1::agent_service_client::AgentServiceClient;

    let broker = TestBroker::start(two_tenants).await;
    let mut client = AgentServiceClient::new(broker.channel().await);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut hello = crate::common::hello("node-a");
    if let Some(agent_message::Msg::Hello(h)) = &mut hello.msg {
        h.tenant = "Acme/../globex".into();
    }
    tx.send(hello).await.unwrap();
    let status = match client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    {
        Err(status) => status,
        Ok(response) => response
            .into_inner()
            .message()
            .await
            .expect_err("the session is refused"),
    };
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
}
