//! Tenants end to end, with simulated pods ([`fleetscan_testkit::container`]: cgroups named as
//! containerd and CRI-O name them, new mount and pid namespaces, an overlayfs root): the real
//! `fleetscan broker` configured with two tenants, one reference worker of each tenant's own
//! (the same engine and rules, different block lists), and the real `fleetscan agent` reading
//! pod metadata from a file in Kubernetes' list format. Needs root and cgroup v2.
//!
//! Shows that a tenant's content goes only to its own worker, that one tenant's block-list
//! entry blocks the file in its pods and not in the other's, that an audit-only namespace
//! records a malicious open and allows it, and that an exec-only namespace is not asked about
//! plain opens (its execs are).

use std::path::Path;
use std::time::Duration;

use fleetscan_testkit::container::{Container, ContainerSpec, Runtime};

use crate::common::*;

/// Content acme's block list names (and globex's does not).
const BLOCKED: &[u8] = b"#!/bin/sh\necho 'blocked by acme, fine for globex'\n";

const BROKER_TOML: &str = r#"
[broker]
policy_version = 2

[broker.tenants.acme]
namespaces = ["shop", "shop-audit", "ci"]
pools = ["yara"]

[broker.tenants.acme.namespace_policies.shop-audit]
audit_only = true

[broker.tenants.acme.namespace_policies.ci]
exec_only = true

[broker.tenants.globex]
pools = ["yara"]
"#;

fn worker_toml(tenant: &str, blocklist: Option<&Path>) -> String {
    let mut t = format!("[worker]\npool = \"yara\"\ntenants = [\"{tenant}\"]\n");
    if let Some(b) = blocklist {
        t.push_str(&format!("blocklist = \"{}\"\n", b.display()));
    }
    t
}

/// A pod of `namespace` running container `c`, as `kubectl get pods -o json` lists it.
fn pod(c: &Container, name: &str, namespace: &str, runtime: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": c.pod_uid},
        "spec": {"nodeName": "node-t", "containers": [{"name": "main", "image": "app:1"}]},
        "status": {"containerStatuses": [{
            "name": "main", "image": "registry.example/app:1", "imageID": "",
            "ready": true, "restartCount": 0,
            "containerID": format!("{runtime}://{}", c.id)
        }]}
    })
}

fn out_of(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Whether the command was refused by a denied open or exec.
fn denied(o: &std::process::Output) -> bool {
    let err = String::from_utf8_lossy(&o.stderr).to_lowercase();
    !o.status.success() && (err.contains("not permitted") || err.contains("permission denied"))
}

#[test]
fn tenants_are_scanned_by_their_own_workers_and_decided_by_their_own_policies() {
    let _turn = shared_blocking();
    let mut sandbox = sandbox();
    let layers = sandbox.tmpfs("layers");
    let dir = sandbox.dir().to_path_buf();

    let broker_cfg = dir.join("broker.toml");
    write(&broker_cfg, BROKER_TOML.as_bytes());
    let broker = sandbox.broker(&["--config", broker_cfg.to_str().unwrap()]);

    let blocklist = dir.join("acme-blocklist.txt");
    write(&blocklist, format!("{}\n", sha256_hex(BLOCKED)).as_bytes());
    let acme_cfg = dir.join("acme-worker.toml");
    write(&acme_cfg, worker_toml("acme", Some(&blocklist)).as_bytes());
    let globex_cfg = dir.join("globex-worker.toml");
    write(&globex_cfg, worker_toml("globex", None).as_bytes());
    let acme = sandbox.worker(&broker.url, &["--config", acme_cfg.to_str().unwrap()]);
    let globex = sandbox.worker(&broker.url, &["--config", globex_cfg.to_str().unwrap()]);
    let _workers = (acme, globex);

    let files = |spec: ContainerSpec, tag: &str| {
        spec.file(&format!("/data/blocked-{tag}.sh"), BLOCKED)
            .file(
                &format!("/data/clean-{tag}.txt"),
                format!("clean {tag}\n").as_bytes(),
            )
            .file(&format!("/data/eicar-{tag}.com"), EICAR)
    };
    // A volume both tenants' pods mount: one inode, opened from both.
    let shared = layers.join("shared-volume");
    std::fs::create_dir_all(&shared).unwrap();
    write(&shared.join("tool.sh"), BLOCKED);
    let shop = Container::start(
        &layers,
        files(ContainerSpec::new(Runtime::Containerd), "shop").volume(&shared, "/shared"),
    );
    let web = Container::start(
        &layers,
        files(ContainerSpec::new(Runtime::Crio), "web").volume(&shared, "/shared"),
    );
    let audit = Container::start(
        &layers,
        files(ContainerSpec::new(Runtime::Containerd), "audit"),
    );
    let ci = Container::start(&layers, files(ContainerSpec::new(Runtime::Crio), "ci"));

    // Pod metadata: globex's namespace is claimed by its label, acme's by the broker's mapping.
    let pods = serde_json::json!({
        "apiVersion": "v1", "kind": "List",
        "items": [
            pod(&shop, "shop-0", "shop", "containerd"),
            pod(&web, "web-0", "web", "cri-o"),
            pod(&audit, "audit-0", "shop-audit", "containerd"),
            pod(&ci, "ci-0", "ci", "cri-o"),
            {"apiVersion": "v1", "kind": "Namespace",
             "metadata": {"name": "web", "labels": {"fleetscan.io/tenant": "globex"}}},
        ]
    });
    let pods_file = dir.join("pods.json");
    write(&pods_file, pods.to_string().as_bytes());
    let agent_cfg = dir.join("agent.toml");
    write(
        &agent_cfg,
        format!("[agent]\npods = \"file:{}\"\n", pods_file.display()).as_bytes(),
    );
    let agent = sandbox.agent(
        "node-t",
        &[&broker.url],
        &[&layers],
        &["--config", agent_cfg.to_str().unwrap()],
    );
    block_on(wait_for_host(&broker.url, "node-t"));
    block_on(eventually(
        Duration::from_secs(10),
        "the agent read the pod file",
        || {
            let log = sandbox.log(&agent);
            async move { log.contains("pod file read").then_some(()) }
        },
    ));

    // 2. Each tenant's content goes to its own worker only.
    let jobs = |tenant: &str| block_on(jobs_done_of(&broker.url, tenant));
    let (a0, g0) = (jobs("acme"), jobs("globex"));
    let o = shop.exec(&["cat", "/data/clean-shop.txt"]);
    assert_eq!(out_of(&o), "clean shop\n", "{o:?}");
    assert_eq!(
        (jobs("acme") - a0, jobs("globex") - g0),
        (1, 0),
        "acme's file went to acme's worker alone"
    );
    let o = web.exec(&["cat", "/data/clean-web.txt"]);
    assert_eq!(out_of(&o), "clean web\n", "{o:?}");
    assert_eq!(
        (jobs("acme") - a0, jobs("globex") - g0),
        (1, 1),
        "globex's file went to globex's worker alone"
    );

    // acme's block-list entry: the same content is denied in acme's pod, allowed in globex's.
    let o = shop.exec(&["cat", "/data/blocked-shop.sh"]);
    assert!(
        denied(&o),
        "acme's block list must deny it in acme's pod: {o:?}"
    );
    let o = web.exec(&["cat", "/data/blocked-web.sh"]);
    assert_eq!(out_of(&o), String::from_utf8_lossy(BLOCKED), "{o:?}");
    // And again, now from the caches (the agent's, scoped by tenant): still apart.
    assert!(denied(&shop.exec(&["cat", "/data/blocked-shop.sh"])));
    assert!(web.exec(&["cat", "/data/blocked-web.sh"]).status.success());

    // One inode, two tenants: globex's clean decision (cached, and with one policy it would be
    // a kernel ignore mark, which answers every process alike) must not answer acme's open.
    let o = web.exec(&["cat", "/shared/tool.sh"]);
    assert!(o.status.success(), "{o:?}");
    assert!(web.exec(&["cat", "/shared/tool.sh"]).status.success());
    let o = shop.exec(&["cat", "/shared/tool.sh"]);
    assert!(denied(&o), "globex's allow answered acme's open: {o:?}");
    assert!(
        web.exec(&["cat", "/shared/tool.sh"]).status.success(),
        "and back"
    );

    // The broker's record of the denial: the agent's own records of the later, cached denials
    // are made after the kernel has its answer, when `cat` may have exited already and its
    // container path can no longer be checked.
    let deny = block_on(eventually(
        Duration::from_secs(10),
        "acme's denial to be recorded by the broker",
        || async {
            events_of(&broker.url, "acme")
                .await
                .into_iter()
                .find(|e| e.path == "/data/blocked-shop.sh" && e.decided_by == "broker")
        },
    ));
    assert_eq!(deny.tenant, "acme", "{deny:?}");
    // The record says who: the container, its pod, namespace and image, the container's pid.
    assert_eq!(deny.container_id, shop.id, "{deny:?}");
    assert_eq!(deny.pod_uid, shop.pod_uid, "{deny:?}");
    assert_eq!(deny.k8s_namespace, "shop", "{deny:?}");
    assert_eq!(deny.image, "registry.example/app:1", "{deny:?}");
    assert_eq!(deny.cgroup, shop.cgroup, "{deny:?}");
    assert!(deny.ns_pid > 1 && deny.ns_pid != deny.pid, "{deny:?}");
    assert_eq!(
        deny.host_path,
        shop.lower
            .join("data/blocked-shop.sh")
            .display()
            .to_string(),
        "{deny:?}"
    );
    assert!(
        block_on(events(&broker.url))
            .iter()
            .all(|e| !e.path.starts_with("/data/")),
        "acme's accesses are not the fleet operator's to see"
    );
    assert!(
        block_on(events_of(&broker.url, "globex"))
            .iter()
            .all(|e| e.tenant == "globex")
    );

    // 3. Audit-only: the malicious open is allowed, and recorded with its threat.
    let o = audit.exec(&["cat", "/data/eicar-audit.com"]);
    assert_eq!(out_of(&o).as_bytes(), EICAR, "audit-only allows: {o:?}");
    let recorded = block_on(wait_for_event(&broker.url, "acme", "/data/eicar-audit.com"));
    assert_eq!(recorded.tenant, "acme", "{recorded:?}");
    assert_eq!(recorded.threat_name, "EICAR-Test-File", "{recorded:?}");
    assert_eq!(
        recorded.action,
        fleetscan_proto::v1::Action::Allow as i32,
        "{recorded:?}"
    );

    // Exec-only: plain opens are not asked about, not even EICAR's.
    let before = block_on(stats(&broker.url)).decisions;
    let o = ci.exec(&["cat", "/data/eicar-ci.com"]);
    assert_eq!(out_of(&o).as_bytes(), EICAR, "{o:?}");
    let o = ci.exec(&["cat", "/data/blocked-ci.sh"]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(
        block_on(stats(&broker.url)).decisions,
        before,
        "the broker was asked about an open in an exec-only namespace"
    );
    // Its executions are: the blocked script may not run.
    let o = ci.exec(&[
        "sh",
        "-c",
        "chmod +x /data/blocked-ci.sh && /data/blocked-ci.sh",
    ]);
    assert!(
        denied(&o),
        "an exec in the exec-only namespace is scanned: {o:?}"
    );
    assert!(block_on(stats(&broker.url)).decisions > before);
}
