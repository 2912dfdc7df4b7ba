//! The sandbox's hosts are really apart: each has its own filesystem at the same path, reaches
//! the root namespace only through the sandbox's bridge, and leaves nothing behind. Needs root
//! (network and mount namespaces).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use fleetscan_testkit::Sandbox;

/// No `fleetscan` process is started here; the sandbox needs a binary path all the same.
fn sandbox() -> Sandbox {
    Sandbox::new("/bin/false")
}

fn dev(p: &Path) -> u64 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .dev()
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("running ip");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn each_host_has_its_own_filesystem_at_the_same_path() {
    let mut sandbox = sandbox();
    let a = sandbox.host("apart-a");
    let b = sandbox.host("apart-b");
    assert_eq!(a.root(), b.root(), "the same path on every host");

    a.write(a.root().join("dir/only-on-a"), b"a");
    let root = b.root().to_owned();
    assert!(
        !b.run(move || root.join("dir/only-on-a").exists()),
        "host b sees host a's file"
    );
    assert!(
        !a.root().join("dir/only-on-a").exists(),
        "the test's own mount namespace sees a host's file"
    );
    let out = a.open(a.root().join("dir/only-on-a"));
    assert_eq!(out.result.expect("host a reads its own file"), b"a");

    let (ra, rb) = (a.root().to_owned(), b.root().to_owned());
    let (dev_a, dev_b) = (a.run(move || dev(&ra)), b.run(move || dev(&rb)));
    assert_ne!(dev_a, dev_b, "each host has a filesystem of its own");
    assert_ne!(dev_a, dev(a.root()), "not the test's filesystem");

    a.write(a.root().join("staged"), b"x");
    a.rename(a.root().join("staged"), a.root().join("dir/placed"));
    let placed = a.root().join("dir/placed");
    assert!(a.run(move || placed.exists()));
}

#[test]
fn hosts_reach_the_gateway_through_the_bridge_and_are_deleted_with_the_sandbox() {
    let mut sandbox = sandbox();
    let gateway = sandbox.gateway();
    let a = sandbox.host("net-a");
    let b = sandbox.host("net-b");
    assert_ne!(a.addr(), b.addr());

    let listener = TcpListener::bind((gateway, 0)).expect("listening on the gateway");
    let addr = listener.local_addr().unwrap();
    let connect = move || TcpStream::connect_timeout(&addr, Duration::from_secs(5)).is_ok();
    assert!(a.run(connect), "host a reaches the gateway");
    let (_, peer) = listener.accept().unwrap();
    assert_eq!(
        peer.ip(),
        a.addr(),
        "the connection comes from host a's address"
    );
    assert!(b.run(connect), "host b reaches the gateway");

    // A loopback listener of the root namespace is out of a host's reach: it has its own.
    let local = TcpListener::bind("127.0.0.1:0").unwrap();
    let local: SocketAddr = local.local_addr().unwrap();
    assert!(
        !a.run(move || TcpStream::connect_timeout(&local, Duration::from_secs(2)).is_ok()),
        "host a reached the root namespace's loopback"
    );

    let netns = a.netns().to_owned();
    let holder = a.holder_pid();
    assert!(ip(&["netns", "list"]).contains(&netns));
    let links_before = ip(&["-o", "link", "show"]);
    assert!(
        links_before.matches(" master ").count() >= 2,
        "{links_before}"
    );
    drop((a, b));
    drop(sandbox);
    assert!(
        !ip(&["netns", "list"]).contains(&netns),
        "the host's namespace is deleted with the sandbox"
    );
    let links_after = ip(&["-o", "link", "show"]);
    let tag = netns
        .strip_prefix("fleetscan-")
        .and_then(|t| t.split('-').next())
        .unwrap()
        .to_owned();
    assert!(
        !links_after.contains(&tag),
        "links of the sandbox ({tag}) left behind: {links_after}"
    );
    assert!(
        !Path::new(&format!("/proc/{holder}")).exists()
            || std::fs::read_to_string(format!("/proc/{holder}/stat"))
                .is_ok_and(|s| s.contains(") Z ")),
        "the holder process is gone"
    );
}
