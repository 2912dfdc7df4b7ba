//! Invariant 4 under stress, against the real kernel: a file judged clean (and given a kernel
//! ignore mark) and then rewritten with malware is never opened again without a new judgement.
//!
//! A bash child loops for a few seconds over files on the test's tmpfs: make the file empty or
//! clean, open it (judged clean by the scripted broker: the agent answers, then caches the
//! verdict and places an ignore mark while the child already goes on), rewrite it with
//! "malware" (truncate and write, overwrite in place with the same size, overwrite while the
//! file is held open for writing, a 256 KiB overwrite in one `write(2)`), and open it again:
//! that open must be denied. Another child opens the same files all the time (so that events
//! arrive while writes are under way), and a third burns CPU. Alone on the machine: its load
//! would break other tests' time bounds, and theirs would thin out its iterations.
//!
//! `FLEETSCAN_STRESS_SECS` (default 4) and `FLEETSCAN_STRESS_HOGS` (default 1) make it longer
//! or busier when hunting a race by hand.

use std::fs;
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fleetscan_core::{FailMode, Sha256};

use crate::support::*;

const EICAR: &[u8] = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";

/// The writer and checker. Prints `ALLOWED <variant> <file>` for every open of malicious
/// content that was let through, then `DONE <iterations>`.
const WRITER: &str = r#"
set -u
dir=$1 src=$2 secs=$3
IFS= read -r -d '' CLEAN < "$src/clean" || true
IFS= read -r -d '' EVIL < "$src/evil" || true
end=$((SECONDS + secs))
i=0
while (( SECONDS < end )); do
  v=$((i % 5))
  # A new file each time: an open for writing of a file already denied is denied too. The
  # old ones go now and then, so that the test's tmpfs never fills up.
  (( i % 200 == 199 )) && rm -f "$dir"/w*
  f=$dir/w$i
  printf '%s' "$i" > "$src/current"
  case $v in
    0) : > "$f" ;;
    4) dd if="$src/clean_big" of="$f" bs=1M status=none ;;
    *) printf '%s' "$CLEAN" > "$f" ;;
  esac || echo "WRITE-FAILED $v $f"
  # Judged clean: allowed, then cached and marked while this shell goes on.
  true < "$f" 2>/dev/null || echo "CLEAN-DENIED $v $f"
  # A rewrite that failed would leave clean content to be allowed: it must not pass unseen.
  case $v in
    0|1) printf '%s' "$EVIL" > "$f" ;;
    2) printf '%s' "$EVIL" 1<> "$f" ;;
    3) exec 3<> "$f"
       true < "$f" 2>/dev/null || echo "CLEAN-DENIED $v $f"
       printf '%s' "$EVIL" >&3 || echo "WRITE-FAILED $v $f"
       true < "$f" 2>/dev/null && echo "ALLOWED $v-open $f"
       exec 3>&- ;;
    4) dd if="$src/evil_big" of="$f" bs=1M conv=notrunc status=none ;;
  esac || echo "WRITE-FAILED $v $f"
  true < "$f" 2>/dev/null && echo "ALLOWED $v $f $(stat -c %i "$f")"
  i=$((i + 1))
done
echo "DONE $i"
"#;

/// Opens the writer's files all the time, so that events arrive while writes are under way.
const OPENER: &str = r#"
dir=$1 src=$2
while :; do
  IFS= read -r n < "$src/current" || continue
  true < "$dir/w$n" 2>/dev/null
  true < "$dir/w$((n - 1))" 2>/dev/null
done
"#;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn bash(script: &str, args: &[&str]) -> Child {
    Command::new("/bin/bash")
        .arg("-c")
        .arg(script)
        .arg("bash")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn bash")
}

/// Kills a child this test started, by its pid.
fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_file_rewritten_with_malware_is_never_let_through() {
    let env = env_alone();
    let secs = env_u64("FLEETSCAN_STRESS_SECS", 4);
    let hogs = env_u64("FLEETSCAN_STRESS_HOGS", 1);

    // The contents, outside the protected directory (reading them costs no scan).
    let src = &env.other;
    let clean = vec![b'a'; EICAR.len()];
    let clean_big = vec![b'c'; 256 << 10];
    let mut evil_big = clean_big.clone();
    evil_big[..EICAR.len()].copy_from_slice(EICAR);
    fs::write(src.join("clean"), &clean).unwrap();
    fs::write(src.join("evil"), EICAR).unwrap();
    fs::write(src.join("clean_big"), &clean_big).unwrap();
    fs::write(src.join("evil_big"), &evil_big).unwrap();

    let blocked = vec![Sha256::of(EICAR).to_hex(), Sha256::of(&evil_big).to_hex()];
    let broker = FakeBroker::start(Mode::Blocklist(blocked), policy(FailMode::Closed, 5000));
    let agent = run(config(
        &env,
        vec![broker.url()],
        FailMode::Closed,
        Duration::from_secs(4),
    ));
    wait_for("broker session", Duration::from_secs(5), || {
        agent.stats.snapshot().sessions >= 1
    })
    .await;

    let dir = env.protected.to_str().unwrap().to_owned();
    let hogs: Vec<Child> = (0..hogs)
        .map(|_| bash("while :; do :; done", &[]))
        .collect();
    fs::write(src.join("current"), b"0").unwrap();
    let opener = bash(OPENER, &[&dir, src.to_str().unwrap()]);
    let mut writer = bash(WRITER, &[&dir, src.to_str().unwrap(), &secs.to_string()]);
    let mut out = String::new();
    let mut stdout = writer.stdout.take().unwrap();
    let out = tokio::task::spawn_blocking(move || {
        stdout.read_to_string(&mut out).unwrap();
        out
    })
    .await
    .unwrap();
    let status = writer.wait().unwrap();
    stop(opener);
    for h in hogs {
        stop(h);
    }

    let stats = agent.stats.snapshot();
    agent.stop().await;
    let allowed: Vec<&str> = out.lines().filter(|l| l.starts_with("ALLOWED")).collect();
    let iterations: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("DONE "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the writer did not finish ({status}): {out}"));
    let clean_denied = out
        .lines()
        .filter(|l| l.starts_with("CLEAN-DENIED"))
        .count();
    eprintln!(
        "rewrite race: {iterations} iterations, {} allowed, {clean_denied} clean opens denied, {stats:?}",
        allowed.len()
    );
    let write_failed: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("WRITE-FAILED"))
        .collect();
    assert!(
        write_failed.is_empty(),
        "the writer could not write ({} times): {:?}",
        write_failed.len(),
        &write_failed[..write_failed.len().min(5)]
    );
    assert!(
        allowed.is_empty(),
        "malicious content let through {} times in {iterations} iterations: {allowed:?}\n{stats:?}",
        allowed.len()
    );
    // Not vacuous: the loop ran, the broker judged, and ignore marks were in play.
    assert!(iterations >= 20, "only {iterations} iterations");
    assert!(stats.broker_decisions > 0, "{stats:?}");
    assert!(
        stats.ignore_marks > 0,
        "no ignore mark was ever placed: {stats:?}"
    );
}
