//! Pod metadata for attribution: which pod (name, namespace, labels) a pod UID or container id
//! belongs to, the container's image, and the labels of the pod's namespace (a namespace label
//! may name the tenant).
//!
//! Two sources fill one [`PodDirectory`]: the Kubernetes API, watching the pods of this node
//! only (a field selector on `spec.nodeName`) and every namespace; or, on hosts without
//! Kubernetes, a file in Kubernetes' own JSON list format (what `kubectl get pods,namespaces
//! -o json` prints), read again whenever it changes. A pod that goes away is kept for
//! [`PodDirectory::retain`] so that events about its last moments still resolve.
//!
//! Look-ups never wait on a source: they read what the directory holds now, and a pod not known
//! yet simply resolves to nothing (the access stays attributed to its container id and pod
//! UID, which come from the cgroup).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::runtime::{WatchStreamExt, watcher};
use parking_lot::RwLock;
use tracing::{debug, info, warn};

/// Where pod metadata comes from.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum PodSource {
    /// None: accesses carry container id and pod UID only.
    #[default]
    None,
    /// The Kubernetes API (in-cluster service account, or the kubeconfig), the pods of `node`.
    Kubernetes { node: String },
    /// A JSON file in Kubernetes' list format, re-read when it changes.
    File(PathBuf),
}

impl std::str::FromStr for PodSource {
    type Err = String;

    /// `none`, `kubernetes` (the pods of the agent's node) or `file:PATH`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" | "none" => Ok(PodSource::None),
            "kubernetes" => Ok(PodSource::Kubernetes {
                node: String::new(),
            }),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(PodSource::File(PathBuf::from(p))),
                _ => Err(format!(
                    "pod source {s:?}: expected none, kubernetes or file:PATH"
                )),
            },
        }
    }
}

/// What is known of one pod.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PodMeta {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    /// Container id (64 hex digits, no runtime prefix) → image.
    pub images: BTreeMap<String, String>,
}

/// A pod found for an access, with its namespace's labels as they are now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodMatch {
    pub pod: Arc<PodMeta>,
    pub namespace_labels: Arc<BTreeMap<String, String>>,
}

impl PodMatch {
    /// The image of `container_id`, if the pod's status names it.
    pub fn image(&self, container_id: &str) -> Option<&str> {
        self.pod.images.get(container_id).map(String::as_str)
    }
}

#[derive(Debug)]
struct Entry {
    pod: Arc<PodMeta>,
    /// When the pod went away; swept after the retention.
    gone: Option<Instant>,
}

#[derive(Debug, Default)]
struct Inner {
    pods: HashMap<String, Entry>,
    /// Container id → pod UID.
    containers: HashMap<String, String>,
    namespaces: HashMap<String, Arc<BTreeMap<String, String>>>,
}

/// The pods of this node, by UID and by container id. Shared between the source task and the
/// threads that attribute accesses.
#[derive(Debug)]
pub struct PodDirectory {
    inner: RwLock<Inner>,
    retain: Duration,
}

impl PodDirectory {
    /// An empty directory keeping gone pods for `retain`.
    pub fn new(retain: Duration) -> Arc<Self> {
        Arc::new(PodDirectory {
            inner: RwLock::new(Inner::default()),
            retain,
        })
    }

    /// How long a pod that went away still resolves.
    pub fn retain(&self) -> Duration {
        self.retain
    }

    /// The pod with this UID (dashes or the systemd driver's underscores).
    pub fn by_pod_uid(&self, uid: &str) -> Option<PodMatch> {
        let uid = uid.replace('_', "-");
        let inner = self.inner.read();
        inner.pods.get(&uid).map(|e| inner.matched(&e.pod))
    }

    /// The pod running the container with this id.
    pub fn by_container(&self, id: &str) -> Option<PodMatch> {
        let inner = self.inner.read();
        let uid = inner.containers.get(id)?;
        inner.pods.get(uid).map(|e| inner.matched(&e.pod))
    }

    /// Adds what is known of the subject's pod: namespace, pod UID (when only the container
    /// id was in the cgroup) and the container's image. Never overwrites what the cgroup said.
    pub(crate) fn enrich(&self, s: &mut fleetscan_core::Subject) {
        if s.container_id.is_empty() && s.pod_uid.is_empty() {
            return;
        }
        let found = if s.container_id.is_empty() {
            None
        } else {
            self.by_container(&s.container_id)
        };
        let Some(m) = found.or_else(|| {
            (!s.pod_uid.is_empty())
                .then(|| self.by_pod_uid(&s.pod_uid))
                .flatten()
        }) else {
            return;
        };
        if s.pod_uid.is_empty() {
            s.pod_uid.clone_from(&m.pod.uid);
        }
        if s.namespace.is_empty() {
            s.namespace.clone_from(&m.pod.namespace);
        }
        if s.image.is_empty()
            && let Some(image) = m.image(&s.container_id)
        {
            s.image = image.to_string();
        }
    }

    /// The value of `label` on namespace `namespace`, if the directory knows it.
    pub(crate) fn namespace_label(&self, namespace: &str, label: &str) -> Option<String> {
        if namespace.is_empty() {
            return None;
        }
        self.inner
            .read()
            .namespaces
            .get(namespace)
            .and_then(|l| l.get(label).cloned())
    }

    /// Pods known, gone ones included.
    pub fn len(&self) -> usize {
        self.inner.read().pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds or updates a pod.
    pub fn upsert(&self, pod: PodMeta) {
        if pod.uid.is_empty() {
            return;
        }
        let mut inner = self.inner.write();
        for id in pod.images.keys() {
            inner.containers.insert(id.clone(), pod.uid.clone());
        }
        let uid = pod.uid.clone();
        inner.pods.insert(
            uid,
            Entry {
                pod: Arc::new(pod),
                gone: None,
            },
        );
    }

    /// The pod went away: it still resolves for the retention.
    pub fn remove(&self, uid: &str, now: Instant) {
        if let Some(e) = self.inner.write().pods.get_mut(uid) {
            e.gone.get_or_insert(now);
        }
    }

    /// Everything there is now (a full list): pods missing from it went away.
    pub fn replace(&self, pods: Vec<PodMeta>, now: Instant) {
        let present: std::collections::HashSet<String> =
            pods.iter().map(|p| p.uid.clone()).collect();
        {
            let mut inner = self.inner.write();
            for (uid, e) in inner.pods.iter_mut() {
                if !present.contains(uid) {
                    e.gone.get_or_insert(now);
                }
            }
        }
        for pod in pods {
            self.upsert(pod);
        }
    }

    /// Sets a namespace's labels.
    pub fn set_namespace(&self, name: &str, labels: BTreeMap<String, String>) {
        self.inner
            .write()
            .namespaces
            .insert(name.to_string(), Arc::new(labels));
    }

    /// Every namespace there is now (a full list).
    pub fn replace_namespaces(&self, all: Vec<NamespaceLabels>) {
        let map = all.into_iter().map(|(n, l)| (n, Arc::new(l))).collect();
        self.inner.write().namespaces = map;
    }

    /// Forgets pods gone longer than the retention.
    pub fn sweep(&self, now: Instant) {
        let retain = self.retain;
        let mut inner = self.inner.write();
        inner.pods.retain(|_, e| {
            e.gone
                .is_none_or(|g| now.saturating_duration_since(g) < retain)
        });
        let Inner {
            pods, containers, ..
        } = &mut *inner;
        containers.retain(|_, uid| pods.contains_key(uid));
    }
}

impl Inner {
    fn matched(&self, pod: &Arc<PodMeta>) -> PodMatch {
        PodMatch {
            pod: pod.clone(),
            namespace_labels: self
                .namespaces
                .get(&pod.namespace)
                .cloned()
                .unwrap_or_default(),
        }
    }
}

/// The container id without the runtime's scheme (`containerd://…`, `cri-o://…`,
/// `docker://…`).
fn bare_container_id(id: &str) -> &str {
    id.split_once("://").map_or(id, |(_, rest)| rest)
}

/// What the directory keeps of a Kubernetes pod.
pub fn pod_meta(pod: &Pod) -> PodMeta {
    let m = &pod.metadata;
    let mut images = BTreeMap::new();
    if let Some(status) = &pod.status {
        let all = [
            status.container_statuses.as_deref(),
            status.init_container_statuses.as_deref(),
            status.ephemeral_container_statuses.as_deref(),
        ];
        for cs in all.into_iter().flatten().flatten() {
            if let Some(id) = cs.container_id.as_deref().map(bare_container_id)
                && !id.is_empty()
            {
                images.insert(id.to_string(), cs.image.clone());
            }
        }
    }
    PodMeta {
        uid: m.uid.clone().unwrap_or_default(),
        name: m.name.clone().unwrap_or_default(),
        namespace: m.namespace.clone().unwrap_or_default(),
        labels: m.labels.clone().unwrap_or_default(),
        images,
    }
}

fn namespace_entry(ns: &Namespace) -> Option<NamespaceLabels> {
    let name = ns.metadata.name.clone()?;
    Some((name, ns.metadata.labels.clone().unwrap_or_default()))
}

/// Why a pod file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PodFileError {
    #[error("reading {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0}: not a Kubernetes list: {1}")]
    Parse(PathBuf, String),
}

/// A namespace's name and labels.
pub type NamespaceLabels = (String, BTreeMap<String, String>);

/// Pods and namespaces of a file in Kubernetes' list format: a `List` whose items say their
/// `kind` (`kubectl get pods,namespaces -o json`), a `PodList` or a `NamespaceList`.
pub fn parse_pod_file(
    path: &Path,
    text: &str,
) -> Result<(Vec<PodMeta>, Vec<NamespaceLabels>), PodFileError> {
    let bad = |why: String| PodFileError::Parse(path.to_path_buf(), why);
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    let list_kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
    let items = value
        .get("items")
        .and_then(|i| i.as_array())
        .ok_or_else(|| bad("no \"items\" array".into()))?;
    let (mut pods, mut namespaces) = (Vec::new(), Vec::new());
    for (i, item) in items.iter().enumerate() {
        let kind = item
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or(match list_kind {
                "PodList" => "Pod",
                "NamespaceList" => "Namespace",
                _ => "",
            });
        match kind {
            "Pod" => {
                let pod: Pod = serde_json::from_value(item.clone())
                    .map_err(|e| bad(format!("item {i}: {e}")))?;
                pods.push(pod_meta(&pod));
            }
            "Namespace" => {
                let ns: Namespace = serde_json::from_value(item.clone())
                    .map_err(|e| bad(format!("item {i}: {e}")))?;
                namespaces.extend(namespace_entry(&ns));
            }
            // Other kinds in a mixed list are not ours to judge.
            _ => {}
        }
    }
    Ok((pods, namespaces))
}

/// How often the file source looks for a change, and the directory is swept.
const FILE_POLL: Duration = Duration::from_secs(1);

/// Keeps `dir` filled from `source` until the future is dropped; it never ends by itself.
/// `node` is used when the Kubernetes source names none.
pub async fn run(dir: Arc<PodDirectory>, source: PodSource, node: String) {
    match source {
        PodSource::None => {}
        PodSource::File(path) => run_file(&dir, &path).await,
        PodSource::Kubernetes { node: n } => {
            let node = if n.is_empty() { node } else { n };
            match kube::Client::try_default().await {
                Ok(client) => run_kubernetes(dir, client, &node).await,
                Err(e) => warn!(error = %e, "no Kubernetes client; pods stay unknown"),
            }
        }
    }
    std::future::pending::<()>().await;
}

async fn run_file(dir: &PodDirectory, path: &Path) {
    // (modification time, size, inode) of the version last used.
    let mut seen: Option<(std::time::SystemTime, u64, u64)> = None;
    let mut ticker = tokio::time::interval(FILE_POLL);
    loop {
        ticker.tick().await;
        dir.sweep(Instant::now());
        let stamp = match tokio::fs::metadata(path).await {
            Ok(m) => {
                use std::os::unix::fs::MetadataExt;
                m.modified().ok().map(|t| (t, m.len(), m.ino()))
            }
            Err(e) => {
                if seen.is_some() {
                    warn!(path = %path.display(), error = %e, "pod file unreadable; keeping what it said");
                }
                continue;
            }
        };
        if stamp.is_some() && stamp == seen {
            continue;
        }
        let text = match tokio::fs::read_to_string(path).await {
            Ok(t) => t,
            Err(e) => {
                warn!(error = %PodFileError::Read(path.to_path_buf(), e), "pod file");
                continue;
            }
        };
        match parse_pod_file(path, &text) {
            Ok((pods, namespaces)) => {
                let n = pods.len();
                dir.replace(pods, Instant::now());
                dir.replace_namespaces(namespaces);
                seen = stamp;
                info!(path = %path.display(), pods = n, "pod file read");
            }
            // A half-written file is read again at the next tick; what it said before stays.
            Err(e) => warn!(error = %e, "pod file not used"),
        }
    }
}

/// Follows one watch: each full list (the first, and those after an error or an expired
/// resource version) goes to `list` whole, then each change to `apply` or `delete`.
async fn follow<K>(
    stream: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    what: &str,
    mut list: impl FnMut(Vec<K>),
    mut apply: impl FnMut(K),
    mut delete: impl FnMut(K),
) {
    let mut listing = Vec::new();
    futures::pin_mut!(stream);
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(watcher::Event::Init) => listing.clear(),
            Ok(watcher::Event::InitApply(k)) => listing.push(k),
            Ok(watcher::Event::InitDone) => list(std::mem::take(&mut listing)),
            Ok(watcher::Event::Apply(k)) => apply(k),
            Ok(watcher::Event::Delete(k)) => delete(k),
            Err(e) => warn!(error = %e, what, "watch failed; retrying"),
        }
    }
}

/// Watches this node's pods and every namespace through `client` until dropped. The watcher
/// lists first, then watches, and lists again after an error or an expired resource version;
/// a full list replaces what the directory holds (pods missing from it went away).
pub async fn run_kubernetes(dir: Arc<PodDirectory>, client: kube::Client, node: &str) {
    let pods_api: kube::Api<Pod> = kube::Api::all(client.clone());
    let ns_api: kube::Api<Namespace> = kube::Api::all(client);
    let selector = format!("spec.nodeName={node}");
    let pods = watcher(pods_api, watcher::Config::default().fields(&selector)).default_backoff();
    let namespaces = watcher(ns_api, watcher::Config::default()).default_backoff();
    let pods_task = follow(
        pods,
        "pods",
        |all| {
            info!(pods = all.len(), "pods of this node listed");
            dir.replace(all.iter().map(pod_meta).collect(), Instant::now());
        },
        |p| dir.upsert(pod_meta(&p)),
        |p| {
            if let Some(uid) = &p.metadata.uid {
                dir.remove(uid, Instant::now());
            }
        },
    );
    let ns_task = follow(
        namespaces,
        "namespaces",
        |all| dir.replace_namespaces(all.iter().filter_map(namespace_entry).collect()),
        |ns| {
            if let Some((name, labels)) = namespace_entry(&ns) {
                dir.set_namespace(&name, labels);
            }
        },
        // A deleted namespace's pods are gone too; their retention keeps the labels useful,
        // so the labels stay until the next full list.
        |_| {},
    );
    let sweep = async {
        let mut ticker = tokio::time::interval(FILE_POLL);
        loop {
            ticker.tick().await;
            dir.sweep(Instant::now());
        }
    };
    debug!(node, "watching this node's pods");
    tokio::select! {
        () = pods_task => {}
        () = ns_task => {}
        () = sweep => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f3c2b1a-1111-2222-3333-444455556666";
    const CID: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";

    fn list() -> String {
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "List",
            "items": [
                {
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": "web-0", "namespace": "shop", "uid": UID,
                                 "labels": {"app": "web"}},
                    "spec": {"containers": [{"name": "web", "image": "nginx:1.27"}]},
                    "status": {"containerStatuses": [{
                        "name": "web", "image": "docker.io/library/nginx:1.27", "imageID": "",
                        "ready": true, "restartCount": 0,
                        "containerID": format!("containerd://{CID}")
                    }]}
                },
                {
                    "apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": "shop", "labels": {"fleetscan.io/tenant": "acme"}}
                },
                {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}
            ]
        })
        .to_string()
    }

    #[test]
    fn a_kubectl_list_resolves_by_pod_uid_and_container() {
        let (pods, ns) = parse_pod_file(Path::new("pods.json"), &list()).unwrap();
        let dir = PodDirectory::new(Duration::from_secs(60));
        dir.replace(pods, Instant::now());
        dir.replace_namespaces(ns);
        let m = dir.by_container(CID).expect("by container id");
        assert_eq!(m.pod.name, "web-0");
        assert_eq!(m.pod.namespace, "shop");
        assert_eq!(m.image(CID), Some("docker.io/library/nginx:1.27"));
        assert_eq!(
            m.namespace_labels
                .get("fleetscan.io/tenant")
                .map(String::as_str),
            Some("acme")
        );
        // The systemd cgroup driver writes the UID with underscores.
        let by_uid = dir.by_pod_uid(&UID.replace('-', "_")).expect("by pod uid");
        assert_eq!(by_uid, m);
        assert!(dir.by_container("0".repeat(64).as_str()).is_none());
    }

    #[test]
    fn a_subject_gets_its_pods_namespace_and_image_and_keeps_what_the_cgroup_said() {
        let dir = PodDirectory::new(Duration::from_secs(60));
        let (pods, ns) = parse_pod_file(Path::new("p"), &list()).unwrap();
        dir.replace(pods, Instant::now());
        dir.replace_namespaces(ns);
        let mut s = fleetscan_core::Subject {
            container_id: CID.into(),
            ..Default::default()
        };
        dir.enrich(&mut s);
        assert_eq!(s.pod_uid, UID);
        assert_eq!(s.namespace, "shop");
        assert_eq!(s.image, "docker.io/library/nginx:1.27");
        // A host process: nothing to add.
        let mut host = fleetscan_core::Subject::default();
        dir.enrich(&mut host);
        assert_eq!(host, fleetscan_core::Subject::default());
        // An unknown container of a known pod (e.g. started after the last list): the pod.
        let mut other = fleetscan_core::Subject {
            container_id: "f".repeat(64),
            pod_uid: UID.replace('-', "_"),
            ..Default::default()
        };
        dir.enrich(&mut other);
        assert_eq!(other.namespace, "shop");
        assert_eq!(other.image, "");
        assert_eq!(
            other.pod_uid,
            UID.replace('-', "_"),
            "the cgroup's spelling stays"
        );
    }

    #[test]
    fn gone_pods_resolve_for_the_retention_then_not() {
        let dir = PodDirectory::new(Duration::from_secs(30));
        let (pods, _) = parse_pod_file(Path::new("p"), &list()).unwrap();
        let t0 = Instant::now();
        dir.replace(pods, t0);
        // A new full list without the pod: it went away.
        dir.replace(Vec::new(), t0);
        dir.sweep(t0 + Duration::from_secs(29));
        assert!(dir.by_container(CID).is_some(), "kept for late events");
        dir.sweep(t0 + Duration::from_secs(31));
        assert!(dir.by_container(CID).is_none());
        assert!(dir.by_pod_uid(UID).is_none());
        assert!(dir.is_empty());
    }

    #[test]
    fn a_pod_seen_again_is_no_longer_gone() {
        let dir = PodDirectory::new(Duration::from_secs(1));
        let (pods, _) = parse_pod_file(Path::new("p"), &list()).unwrap();
        let t0 = Instant::now();
        dir.replace(pods.clone(), t0);
        dir.remove(UID, t0);
        dir.upsert(pods[0].clone());
        dir.sweep(t0 + Duration::from_secs(10));
        assert!(dir.by_pod_uid(UID).is_some());
    }

    #[test]
    fn typed_lists_and_bad_files() {
        let pod_list = serde_json::json!({
            "kind": "PodList", "apiVersion": "v1",
            "items": [{"metadata": {"name": "a", "namespace": "n", "uid": "u-1"}}]
        });
        let (pods, ns) = parse_pod_file(Path::new("p"), &pod_list.to_string()).unwrap();
        assert_eq!((pods.len(), ns.len()), (1, 0));
        assert_eq!(pods[0].uid, "u-1");
        for bad in [
            "",
            "{",
            "[]",
            "{\"items\": 3}",
            "{\"kind\":\"List\",\"items\":[{\"kind\":\"Pod\",\"metadata\":3}]}",
        ] {
            assert!(
                matches!(
                    parse_pod_file(Path::new("p"), bad),
                    Err(PodFileError::Parse(..))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn sources_parse() {
        assert_eq!("none".parse::<PodSource>(), Ok(PodSource::None));
        assert_eq!(
            "file:/etc/fleetscan/pods.json".parse::<PodSource>(),
            Ok(PodSource::File("/etc/fleetscan/pods.json".into()))
        );
        assert!(matches!(
            "kubernetes".parse::<PodSource>(),
            Ok(PodSource::Kubernetes { .. })
        ));
        assert!("file:".parse::<PodSource>().is_err());
        assert!("etcd".parse::<PodSource>().is_err());
    }

    /// A stand-in for the API server over plain HTTP/1.1: lists return `list`, watches stream
    /// `events` and stay open. Records every request line.
    async fn api_server(
        pods: serde_json::Value,
        pod_events: Vec<serde_json::Value>,
        namespaces: serde_json::Value,
    ) -> (String, Arc<parking_lot::Mutex<Vec<String>>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let (pods, pod_events, namespaces, log) = (
                    pods.clone(),
                    pod_events.clone(),
                    namespaces.clone(),
                    log.clone(),
                );
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if sock.read(&mut byte).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    let line = String::from_utf8_lossy(&head)
                        .lines()
                        .next()
                        .unwrap()
                        .to_string();
                    log.lock().push(line.clone());
                    let target = line.split(' ').nth(1).unwrap_or("").to_string();
                    let watch = target.contains("watch=true");
                    let is_pods = target.starts_with("/api/v1/pods");
                    if !watch {
                        let body = if is_pods { pods } else { namespaces }.to_string();
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = sock.write_all(resp.as_bytes()).await;
                        return;
                    }
                    let _ = sock
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
                        .await;
                    if is_pods {
                        for ev in &pod_events {
                            let line = format!("{ev}\n");
                            let chunk = format!("{:x}\r\n{line}\r\n", line.len());
                            let _ = sock.write_all(chunk.as_bytes()).await;
                        }
                    }
                    // Held open like a real watch until the test ends.
                    tokio::time::sleep(Duration::from_secs(60)).await;
                });
            }
        });
        (url, seen)
    }

    fn pod(name: &str, uid: &str) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "shop", "uid": uid, "resourceVersion": "5"},
            "spec": {"nodeName": "node-a", "containers": []}
        })
    }

    /// The Kubernetes source lists this node's pods (and only asks for them), applies what the
    /// watch says after, and forgets deleted pods after the retention.
    #[tokio::test]
    async fn the_kubernetes_source_lists_then_watches_this_nodes_pods() {
        let pods = serde_json::json!({
            "apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "7"},
            "items": [pod("old", "uid-old")]
        });
        let events = vec![
            serde_json::json!({"type": "ADDED", "object": pod("new", "uid-new")}),
            serde_json::json!({"type": "DELETED", "object": pod("old", "uid-old")}),
        ];
        let namespaces = serde_json::json!({
            "apiVersion": "v1", "kind": "NamespaceList", "metadata": {"resourceVersion": "3"},
            "items": [{"metadata": {"name": "shop", "labels": {"fleetscan.io/tenant": "acme"}}}]
        });
        let (url, seen) = api_server(pods, events, namespaces).await;
        let config = kube::Config::new(url.parse().unwrap());
        let client = kube::Client::try_from(config).unwrap();
        let dir = PodDirectory::new(Duration::ZERO);
        let task = tokio::spawn(run_kubernetes(dir.clone(), client, "node-a"));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let new = dir.by_pod_uid("uid-new");
            let labelled = new.as_ref().is_some_and(|m| {
                m.namespace_labels
                    .get("fleetscan.io/tenant")
                    .map(String::as_str)
                    == Some("acme")
            });
            if labelled && dir.by_pod_uid("uid-old").is_none() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the watch was not applied; requests: {:?}",
                seen.lock()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        task.abort();
        let requests = seen.lock().clone();
        let pod_requests: Vec<_> = requests
            .iter()
            .filter(|r| r.contains("/api/v1/pods"))
            .collect();
        assert!(!pod_requests.is_empty());
        for r in pod_requests {
            assert!(
                r.contains("fieldSelector=spec.nodeName%3Dnode-a"),
                "asked for other nodes' pods: {r}"
            );
        }
    }
}
