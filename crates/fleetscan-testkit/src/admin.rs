//! What a broker's admin API says, for assertions: workers, hosts, counters and recorded
//! accesses, each through `AdminService` on a fresh client.
//!
//! It must never read a broker's state any other way than its admin API, and never wait
//! without a limit.

use std::time::{Duration, Instant};

use fleetscan_proto::v1;
use fleetscan_proto::v1::admin_service_client::AdminServiceClient;
use tonic::transport::Channel;

use crate::eventually;

/// An admin client for the broker at `url`.
pub async fn admin(url: &str) -> AdminServiceClient<Channel> {
    let start = Instant::now();
    loop {
        match AdminServiceClient::connect(url.to_owned()).await {
            Ok(c) => return c,
            Err(e) if start.elapsed() > Duration::from_secs(20) => {
                panic!("cannot connect to the broker at {url}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
/// Waits until the broker at `url` lists a worker with credit: the one named `name`, or any.
pub async fn wait_for_worker(url: &str, name: Option<&str>) {
    let client = admin(url).await;
    let what = format!("worker {} to attach", name.unwrap_or("(any)"));
    eventually(Duration::from_secs(30), &what, || {
        let mut client = client.clone();
        let name = name.map(str::to_owned);
        async move {
            let workers = client
                .list_workers(v1::ListWorkersRequest {})
                .await
                .ok()?
                .into_inner()
                .workers;
            workers
                .iter()
                .any(|w| name.as_ref().is_none_or(|n| &w.worker_name == n) && w.credits > 0)
                .then_some(())
        }
    })
    .await;
}

/// Waits until the broker at `url` lists `node` as connected.
pub async fn wait_for_host(url: &str, node: &str) {
    let client = admin(url).await;
    eventually(
        Duration::from_secs(30),
        &format!("host {node} to connect"),
        || {
            let mut client = client.clone();
            async move {
                let hosts = client
                    .list_hosts(v1::ListHostsRequest {})
                    .await
                    .ok()?
                    .into_inner()
                    .hosts;
                hosts
                    .iter()
                    .any(|h| h.node == node && h.connected)
                    .then_some(())
            }
        },
    )
    .await;
}

/// The broker's counters.
pub async fn stats(url: &str) -> v1::Stats {
    admin(url)
        .await
        .get_stats(v1::GetStatsRequest {})
        .await
        .expect("GetStats")
        .into_inner()
}

/// Every recorded access of `tenant` at the broker at `url`, newest first (up to 1000).
pub async fn events_of(url: &str, tenant: &str) -> Vec<v1::AccessEvent> {
    list_events(url, Some(tenant)).await
}

/// Every recorded access of the broker at `url`, newest first (up to 1000).
pub async fn events(url: &str) -> Vec<v1::AccessEvent> {
    list_events(url, None).await
}

/// Waits up to 10 s until the broker at `url` has recorded an access of `tenant` to `path`, and
/// returns the newest such record.
pub async fn wait_for_event(url: &str, tenant: &str, path: &str) -> v1::AccessEvent {
    eventually(
        Duration::from_secs(10),
        &format!("{tenant}'s access to {path} to be recorded"),
        || async move {
            events_of(url, tenant)
                .await
                .into_iter()
                .find(|e| e.path == path)
        },
    )
    .await
}

/// Up to 1000 recorded accesses, newest first: `tenant`'s (named in the tenant header the
/// broker reads, [`fleetscan_proto::TENANT_HEADER`]), else the fleet operator's.
async fn list_events(url: &str, tenant: Option<&str>) -> Vec<v1::AccessEvent> {
    let mut request = tonic::Request::new(v1::ListEventsRequest {
        limit: 1000,
        ..Default::default()
    });
    if let Some(tenant) = tenant {
        request.metadata_mut().insert(
            fleetscan_proto::TENANT_HEADER,
            tenant.parse().expect("a tenant name is a header value"),
        );
    }
    admin(url)
        .await
        .list_events(request)
        .await
        .expect("ListEvents")
        .into_inner()
        .events
}
/// The workers attached to the broker at `url`.
pub async fn workers(url: &str) -> Vec<v1::Worker> {
    admin(url)
        .await
        .list_workers(v1::ListWorkersRequest {})
        .await
        .expect("ListWorkers")
        .into_inner()
        .workers
}

/// The scans the workers attached to the broker at `url` have finished (their `jobs_done`).
pub async fn jobs_done(url: &str) -> u64 {
    workers(url).await.iter().map(|w| w.jobs_done).sum()
}

/// The scans the workers serving `tenant` at the broker at `url` have finished.
pub async fn jobs_done_of(url: &str, tenant: &str) -> u64 {
    workers(url)
        .await
        .iter()
        .filter(|w| w.tenants.iter().any(|t| t == tenant))
        .map(|w| w.jobs_done)
        .sum()
}

/// The hosts the broker at `url` knows.
pub async fn hosts(url: &str) -> Vec<v1::Host> {
    admin(url)
        .await
        .list_hosts(v1::ListHostsRequest {})
        .await
        .expect("ListHosts")
        .into_inner()
        .hosts
}

/// Whether the broker at `url` lists `node` as connected now.
pub async fn is_connected(url: &str, node: &str) -> bool {
    hosts(url)
        .await
        .iter()
        .any(|h| h.node == node && h.connected)
}
