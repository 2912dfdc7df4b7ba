//! The read-only client subcommands: they talk to a broker's AdminService and ScanService,
//! never to the database.

use anyhow::{Context, bail};
use fleetscan_proto::v1;
use fleetscan_proto::v1::admin_service_client::AdminServiceClient;
use serde_json::json;
use tonic::transport::Channel;

use crate::table;

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

/// A time the broker sent (milliseconds since the epoch) in RFC 3339, to the second, UTC.
fn time(ms: i64) -> String {
    // humantime formats the years 1970 to 9999; a broker sends nothing else.
    const END: u64 = 253_402_300_800_000;
    match u64::try_from(ms) {
        Ok(ms) if ms < END => humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
        )
        .to_string(),
        _ => format!("{ms} ms since 1970"),
    }
}

/// An empty text as `-`, so that a table's columns never look shifted.
fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
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
            fleetscan_proto::TENANT_HEADER,
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
    let mut t = table::new(&[
        "ID", "TIME", "ACTION", "KIND", "NODE", "BY", "THREAT", "PATH",
    ]);
    for e in &resp.events {
        // In a container: its namespace, short id and own pid.
        let container = if e.container_id.is_empty() {
            String::new()
        } else {
            format!(
                " [{}/{} pid {}]",
                or_dash(&e.k8s_namespace),
                &e.container_id[..e.container_id.len().min(12)],
                e.ns_pid
            )
        };
        t.add_row(vec![
            e.id.to_string(),
            time(e.at_unix_ms),
            action_name(e.action).to_owned(),
            kind_name(e.kind).to_owned(),
            e.node.clone(),
            e.decided_by.clone(),
            or_dash(&e.threat_name).to_owned(),
            format!("{} (pid {} {}){container}", e.path, e.pid, e.exe),
        ]);
    }
    println!("{}", table::render(t, &[0]));
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
    let mut t = table::new(&[
        "SHA256",
        "RESULT",
        "THREAT",
        "SCANNER",
        "ENGINE",
        "RULES",
        "SCANNED AT",
        "SCAN µs",
    ]);
    for v in &resp.verdicts {
        let s = v.scanner.clone().unwrap_or_default();
        t.add_row(vec![
            v.sha256.clone(),
            result_name(v.result).to_owned(),
            or_dash(&v.threat_name).to_owned(),
            s.scanner,
            format!("{} {}", s.engine, s.engine_version),
            s.ruleset_version,
            time(v.scanned_at_unix_ms),
            v.scan_micros.to_string(),
        ]);
    }
    println!("{}", table::render(t, &[7]));
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
    let mut t = table::new(&[
        "NODE",
        "CLUSTER",
        "CONNECTED",
        "ALLOWED",
        "DENIED",
        "LAST SEEN",
    ]);
    for h in &resp.hosts {
        t.add_row(vec![
            h.node.clone(),
            h.cluster.clone(),
            h.connected.to_string(),
            h.allowed_count.to_string(),
            h.denied_count.to_string(),
            time(h.last_seen_unix_ms),
        ]);
    }
    println!("{}", table::render(t, &[3, 4]));
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
    let mut t = table::new(&[
        "WORKER",
        "POOL",
        "SCANNER",
        "ENGINE",
        "CREDITS",
        "IN FLIGHT",
        "JOBS DONE",
    ]);
    for w in &resp.workers {
        let s = w.scanner.clone().unwrap_or_default();
        t.add_row(vec![
            w.worker_name.clone(),
            w.pool.clone(),
            s.scanner,
            format!("{} {}", s.engine, s.engine_version),
            w.credits.to_string(),
            w.in_flight.to_string(),
            w.jobs_done.to_string(),
        ]);
    }
    println!("{}", table::render(t, &[4, 5, 6]));
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
        let mut t = table::new(&[]);
        for (k, v) in rows {
            t.add_row(vec![k.to_owned(), v.to_string()]);
        }
        println!("{}", table::render(t, &[1]));
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
        // Outside what a broker sends: shown, never a panic.
        assert_eq!(super::time(-1), "-1 ms since 1970");
        assert_eq!(super::time(i64::MAX), format!("{} ms since 1970", i64::MAX));
    }
}
