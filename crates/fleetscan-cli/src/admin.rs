//! The read-only client subcommands: they talk to a broker's AdminService and ScanService,
//! never to the database.

use anyhow::{Context, bail};
use fleetscan_proto::v1;
use fleetscan_proto::v1::admin_service_client::AdminServiceClient;
use serde_json::json;
use tonic::transport::Channel;

async fn client(url: &str) -> anyhow::Result<AdminServiceClient<Channel>> {
    let client = AdminServiceClient::connect(url.to_owned())
        .await
        .with_context(|| format!("connecting to the broker at {url}"))?;
    Ok(client
        .max_decoding_message_size(fleetscan_proto::MAX_MESSAGE_SIZE)
        .max_encoding_message_size(fleetscan_proto::MAX_MESSAGE_SIZE))
}

fn action_name(raw: i32) -> &'static str {
    match fleetscan_proto::convert::action_from_proto(raw) {
        Some(a) => a.as_str(),
        None => "?",
    }
}

fn kind_name(raw: i32) -> &'static str {
    fleetscan_proto::convert::access_kind_from_proto(raw).as_str()
}

fn result_name(raw: i32) -> &'static str {
    fleetscan_proto::convert::verdict_kind_from_proto(raw).as_str()
}

fn time(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

pub async fn events(
    url: &str,
    as_json: bool,
    node: Option<String>,
    action: Option<&str>,
    sha256: Option<String>,
    limit: u32,
    tenant: Option<&str>,
) -> anyhow::Result<()> {
    let action = match action {
        None => v1::Action::Unspecified,
        Some("allow") => v1::Action::Allow,
        Some("deny") => v1::Action::Deny,
        Some(other) => bail!("--action must be `allow` or `deny`, not `{other}`"),
    };
    let mut request = tonic::Request::new(v1::ListEventsRequest {
        node: node.unwrap_or_default(),
        action: action.into(),
        sha256: sha256.unwrap_or_default(),
        before_id: 0,
        limit,
    });
    if let Some(t) = tenant {
        request.metadata_mut().insert(
            fleetscan_broker::admin::TENANT_HEADER,
            t.parse().context("--tenant is not a valid header value")?,
        );
    }
    let resp = client(url)
        .await?
        .list_events(request)
        .await
        .context("listing events")?
        .into_inner();
    if as_json {
        let rows: Vec<_> = resp
            .events
            .iter()
            .map(|e| {
                json!({
                    "id": e.id, "at": time(e.at_unix_ms), "node": e.node, "path": e.path,
                    "kind": kind_name(e.kind), "action": action_name(e.action),
                    "reason": e.reason, "sha256": e.sha256, "threat": e.threat_name,
                    "pid": e.pid, "uid": e.uid, "exe": e.exe, "decided_by": e.decided_by,
                    "tenant": e.tenant, "ns_pid": e.ns_pid, "cgroup": e.cgroup,
                    "container_id": e.container_id, "pod_uid": e.pod_uid,
                    "namespace": e.k8s_namespace, "image": e.image, "host_path": e.host_path,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<8} {:<20} {:<6} {:<5} {:<12} {:<10} {:<24} PATH",
        "ID", "TIME", "ACTION", "KIND", "NODE", "BY", "THREAT"
    );
    for e in &resp.events {
        // In a container: its namespace, short id and own pid.
        let container = if e.container_id.is_empty() {
            String::new()
        } else {
            format!(
                " [{}/{} pid {}]",
                if e.k8s_namespace.is_empty() {
                    "-"
                } else {
                    &e.k8s_namespace
                },
                &e.container_id[..e.container_id.len().min(12)],
                e.ns_pid
            )
        };
        println!(
            "{:<8} {:<20} {:<6} {:<5} {:<12} {:<10} {:<24} {} (pid {} {}){container}",
            e.id,
            time(e.at_unix_ms),
            action_name(e.action),
            kind_name(e.kind),
            e.node,
            e.decided_by,
            if e.threat_name.is_empty() {
                "-"
            } else {
                &e.threat_name
            },
            e.path,
            e.pid,
            e.exe
        );
    }
    Ok(())
}

pub async fn verdict(url: &str, as_json: bool, sha256: &str) -> anyhow::Result<()> {
    let sha256 = sha256.to_ascii_lowercase();
    fleetscan_proto::convert::sha256("sha256", &sha256)?;
    let resp = client(url)
        .await?
        .get_verdicts(v1::GetVerdictsRequest {
            sha256: sha256.clone(),
        })
        .await
        .context("reading verdicts")?
        .into_inner();
    if as_json {
        let rows: Vec<_> = resp
            .verdicts
            .iter()
            .map(|v| {
                let s = v.scanner.clone().unwrap_or_default();
                json!({
                    "sha256": v.sha256, "result": result_name(v.result), "threat": v.threat_name,
                    "detail": v.detail, "scanner": s.scanner, "engine": s.engine,
                    "engine_version": s.engine_version, "ruleset_version": s.ruleset_version,
                    "scanned_at": time(v.scanned_at_unix_ms), "scan_micros": v.scan_micros,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if resp.verdicts.is_empty() {
        println!("{sha256}: no verdict recorded");
        return Ok(());
    }
    for v in &resp.verdicts {
        let s = v.scanner.clone().unwrap_or_default();
        println!(
            "{} {:<10} {:<24} scanner {} ({} {}, rules {}) at {} in {} µs",
            v.sha256,
            result_name(v.result),
            if v.threat_name.is_empty() {
                "-"
            } else {
                &v.threat_name
            },
            s.scanner,
            s.engine,
            s.engine_version,
            s.ruleset_version,
            time(v.scanned_at_unix_ms),
            v.scan_micros
        );
    }
    Ok(())
}

pub async fn hosts(url: &str, as_json: bool) -> anyhow::Result<()> {
    let resp = client(url)
        .await?
        .list_hosts(v1::ListHostsRequest {})
        .await
        .context("listing hosts")?
        .into_inner();
    if as_json {
        let rows: Vec<_> = resp
            .hosts
            .iter()
            .map(|h| {
                json!({
                    "node": h.node, "cluster": h.cluster, "agent_version": h.agent_version,
                    "first_seen": time(h.first_seen_unix_ms), "last_seen": time(h.last_seen_unix_ms),
                    "connected": h.connected, "allowed": h.allowed_count, "denied": h.denied_count,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<20} {:<10} {:<9} {:>10} {:>8} LAST SEEN",
        "NODE", "CLUSTER", "CONNECTED", "ALLOWED", "DENIED"
    );
    for h in &resp.hosts {
        println!(
            "{:<20} {:<10} {:<9} {:>10} {:>8} {}",
            h.node,
            h.cluster,
            h.connected,
            h.allowed_count,
            h.denied_count,
            time(h.last_seen_unix_ms)
        );
    }
    Ok(())
}

pub async fn workers(url: &str, as_json: bool) -> anyhow::Result<()> {
    let resp = client(url)
        .await?
        .list_workers(v1::ListWorkersRequest {})
        .await
        .context("listing workers")?
        .into_inner();
    if as_json {
        let rows: Vec<_> = resp
            .workers
            .iter()
            .map(|w| {
                let s = w.scanner.clone().unwrap_or_default();
                json!({
                    "name": w.worker_name, "pool": w.pool, "tenants": w.tenants,
                    "scanner": s.scanner, "engine": s.engine, "engine_version": s.engine_version,
                    "ruleset_version": s.ruleset_version, "credits": w.credits,
                    "in_flight": w.in_flight, "jobs_done": w.jobs_done,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<24} {:<10} {:<12} {:<28} {:>7} {:>9} {:>9}",
        "WORKER", "POOL", "SCANNER", "ENGINE", "CREDITS", "IN FLIGHT", "JOBS DONE"
    );
    for w in &resp.workers {
        let s = w.scanner.clone().unwrap_or_default();
        println!(
            "{:<24} {:<10} {:<12} {:<28} {:>7} {:>9} {:>9}",
            w.worker_name,
            w.pool,
            s.scanner,
            format!("{} {}", s.engine, s.engine_version),
            w.credits,
            w.in_flight,
            w.jobs_done
        );
    }
    Ok(())
}

pub async fn stats(url: &str, as_json: bool) -> anyhow::Result<()> {
    let s = client(url)
        .await?
        .get_stats(v1::GetStatsRequest {})
        .await
        .context("reading stats")?
        .into_inner();
    let rows = [
        ("decisions", s.decisions),
        ("cache_hits", s.cache_hits),
        ("store_hits", s.store_hits),
        ("scans_started", s.scans_started),
        ("scans_deduplicated", s.scans_deduplicated),
        ("denied", s.denied),
        ("verdicts_stored", s.verdicts_stored),
        ("events_stored", s.events_stored),
        ("records_lost", s.records_lost),
        ("write_backlog", s.write_backlog),
        ("oversize", s.oversize),
        ("scan_errors", s.scan_errors),
        ("fail_mode_decisions", s.fail_mode_decisions),
    ];
    if as_json {
        let map: serde_json::Map<_, _> = rows
            .iter()
            .map(|(k, v)| ((*k).to_owned(), json!(v)))
            .collect();
        println!("{}", serde_json::to_string_pretty(&map)?);
    } else {
        for (k, v) in rows {
            println!("{k:<22} {v}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_utc_times() {
        assert_eq!(super::time(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::time(1_700_000_000_123), "2023-11-14T22:13:20Z");
        assert_eq!(super::time(951_782_400_000), "2000-02-29T00:00:00Z");
    }
}
