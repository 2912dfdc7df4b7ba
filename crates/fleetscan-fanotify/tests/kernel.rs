//! The wrapper against the real kernel, on a tmpfs each test mounts itself. Files are opened by
//! CHILD processes; the test process's own events are allowed by the answering thread, so the
//! test can create and write files on the marked filesystem without blocking on itself.
//!
//! Needs root (mount(2), fanotify permission events).

use std::fs;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use fleetscan_fanotify::testing::{Tmpfs, watchdog};
use fleetscan_fanotify::{
    Event, Fanotify, InitOptions, PERMISSION_MASK, PidfdStatus, PollFd, Response, poll,
};

/// What the answering thread saw of one event from another process.
#[derive(Clone, Debug)]
struct Seen {
    mask: u64,
    pid: i32,
    path: PathBuf,
    pidfd_status: PidfdStatus,
    /// The pid the pidfd refers to (from /proc/self/fdinfo), when there is one.
    pidfd_pid: Option<i32>,
}

type Decide = dyn Fn(&Fanotify, &Event) -> Response + Send + Sync;

/// A thread that answers every event of the group: the test process's own at once with allow,
/// every other through `decide`, recording it.
struct Answerer {
    group: Arc<Fanotify>,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn fdinfo_pid(fd: &std::os::fd::OwnedFd) -> Option<i32> {
    use std::os::fd::AsRawFd;
    let text = fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse().ok())
}

impl Answerer {
    fn start(group: Fanotify, decide: Box<Decide>) -> Answerer {
        let group = Arc::new(group);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let me = i32::try_from(std::process::id()).unwrap();
        let thread = {
            let (group, seen, stop) = (group.clone(), seen.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let mut fds = [PollFd::new(group.as_fd(), fleetscan_fanotify::POLLIN)];
                    poll(&mut fds, Some(Duration::from_millis(20))).unwrap();
                    let (events, fault) = group.read_events().unwrap();
                    assert!(fault.is_none(), "{fault:?}");
                    for ev in events {
                        let Some(fd) = ev.fd.as_ref() else { continue };
                        if ev.pid == me {
                            group.respond(fd.as_fd(), Response::Allow).unwrap();
                            continue;
                        }
                        let response = decide(&group, &ev);
                        use std::os::fd::AsRawFd;
                        let path =
                            fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
                        seen.lock().unwrap().push(Seen {
                            mask: ev.mask,
                            pid: ev.pid,
                            path,
                            pidfd_status: ev.pidfd_status,
                            pidfd_pid: ev.pidfd.as_ref().and_then(fdinfo_pid),
                        });
                        // Recorded before answering, so that a test that sees its child
                        // finish also sees the event.
                        group.respond(fd.as_fd(), response).unwrap();
                    }
                }
            })
        };
        Answerer {
            group,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Answerer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn setup() -> (Tmpfs, Fanotify) {
    watchdog(Duration::from_secs(60));
    let fs = Tmpfs::new();
    let group = Fanotify::new(InitOptions { report_pidfd: true }).expect("fanotify_init");
    (fs, group)
}

fn cat(path: &Path) -> Output {
    Command::new("/bin/cat")
        .arg(path)
        .output()
        .expect("spawn cat")
}

fn write(path: &Path, data: &[u8]) {
    fs::write(path, data).unwrap();
}

#[test]
fn child_open_arrives_with_its_pid_fd_and_pidfd() {
    let (tmp, group) = setup();
    let file = tmp.path().join("hello.txt");
    write(&file, b"hello");
    group
        .add_filesystem_mark(tmp.path(), PERMISSION_MASK)
        .unwrap();
    let answerer = Answerer::start(group, Box::new(|_, _| Response::Allow));
    let child = Command::new("/bin/cat")
        .arg(&file)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = i32::try_from(child.id()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout, b"hello");
    let seen = answerer.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let ev = &seen[0];
    assert_eq!(ev.pid, pid);
    assert_ne!(ev.mask & libc::FAN_OPEN_PERM, 0);
    assert_eq!(ev.path, file);
    assert_eq!(ev.pidfd_status, PidfdStatus::Present);
    assert_eq!(ev.pidfd_pid, Some(pid), "the pidfd names the opener");
}

#[test]
fn deny_gives_the_child_a_permission_error() {
    let (tmp, group) = setup();
    let file = tmp.path().join("bad.txt");
    write(&file, b"bad");
    let prog = tmp.path().join("true");
    fs::copy("/bin/true", &prog).unwrap();
    fs::set_permissions(&prog, fs::Permissions::from_mode(0o755)).unwrap();
    group
        .add_filesystem_mark(tmp.path(), PERMISSION_MASK)
        .unwrap();
    let answerer = Answerer::start(group, Box::new(|_, _| Response::Deny));
    let out = cat(&file);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Permission denied") || err.contains("Operation not permitted"),
        "{err}"
    );
    let exec = Command::new(&prog).status();
    let e = exec.expect_err("a denied exec fails");
    assert!(
        matches!(e.raw_os_error(), Some(libc::EACCES | libc::EPERM)),
        "{e}"
    );
    let seen = answerer.seen();
    assert!(
        seen.iter().any(|s| s.mask & libc::FAN_OPEN_EXEC_PERM != 0),
        "{seen:?}"
    );
}

#[test]
fn exec_is_reported_with_the_exec_bit() {
    let (tmp, group) = setup();
    let prog = tmp.path().join("true");
    fs::copy("/bin/true", &prog).unwrap();
    fs::set_permissions(&prog, fs::Permissions::from_mode(0o755)).unwrap();
    group
        .add_filesystem_mark(tmp.path(), PERMISSION_MASK)
        .unwrap();
    let answerer = Answerer::start(group, Box::new(|_, _| Response::Allow));
    let mut child = Command::new(&prog).spawn().unwrap();
    let pid = i32::try_from(child.id()).unwrap();
    assert!(child.wait().unwrap().success());
    let seen = answerer.seen();
    let exec: Vec<_> = seen
        .iter()
        .filter(|s| s.mask & libc::FAN_OPEN_EXEC_PERM != 0)
        .collect();
    assert_eq!(exec.len(), 1, "{seen:?}");
    assert_eq!(exec[0].pid, pid);
    assert_eq!(exec[0].path, prog);
}

#[test]
fn ignore_mark_suppresses_events_until_the_file_is_written() {
    let (tmp, group) = setup();
    let file = tmp.path().join("clean.txt");
    write(&file, b"clean");
    group
        .add_filesystem_mark(tmp.path(), PERMISSION_MASK)
        .unwrap();
    let answerer = Answerer::start(
        group,
        Box::new(|g, ev| {
            g.add_ignore_mark(ev.fd.as_ref().unwrap().as_fd(), PERMISSION_MASK)
                .unwrap();
            Response::Allow
        }),
    );
    assert!(cat(&file).status.success());
    assert_eq!(answerer.seen().len(), 1);
    assert!(cat(&file).status.success());
    assert_eq!(
        answerer.seen().len(),
        1,
        "the ignore mark suppresses the event"
    );
    // A write removes the mark (it does not survive modification).
    fs::OpenOptions::new()
        .append(true)
        .open(&file)
        .unwrap()
        .write_all(b" more")
        .unwrap();
    let out = cat(&file);
    assert_eq!(out.stdout, b"clean more");
    assert_eq!(answerer.seen().len(), 2, "a write brings events back");
}

#[test]
fn flushing_inode_marks_brings_events_back_and_keeps_the_filesystem_mark() {
    let (tmp, group) = setup();
    let file = tmp.path().join("clean.txt");
    write(&file, b"clean");
    group
        .add_filesystem_mark(tmp.path(), PERMISSION_MASK)
        .unwrap();
    let first = Arc::new(AtomicBool::new(true));
    let answerer = Answerer::start(group, {
        let first = first.clone();
        Box::new(move |g, ev| {
            // Only the first event places an ignore mark.
            if first.swap(false, Ordering::SeqCst) {
                g.add_ignore_mark(ev.fd.as_ref().unwrap().as_fd(), PERMISSION_MASK)
                    .unwrap();
            }
            Response::Allow
        })
    });
    assert!(cat(&file).status.success());
    assert!(cat(&file).status.success());
    assert_eq!(answerer.seen().len(), 1);
    answerer.group.flush_inode_marks().unwrap();
    assert!(cat(&file).status.success());
    assert_eq!(answerer.seen().len(), 2, "flush drops the ignore mark");
    assert!(cat(&file).status.success());
    assert_eq!(answerer.seen().len(), 3, "the filesystem mark stays");
}

#[test]
fn remove_ignore_mark_after_add_leaves_events_on() {
    let (tmp, group) = setup();
    let file = tmp.path().join("racy.txt");
    write(&file, b"x");
    group
        .add_filesystem_mark(tmp.path(), PERMISSION_MASK)
        .unwrap();
    // What the agent does when the file changed under it: add, then take the mark back.
    let answerer = Answerer::start(
        group,
        Box::new(|g, ev| {
            let fd = ev.fd.as_ref().unwrap().as_fd();
            g.add_ignore_mark(fd, PERMISSION_MASK).unwrap();
            g.remove_ignore_mark(fd, PERMISSION_MASK).unwrap();
            Response::Allow
        }),
    );
    assert!(cat(&file).status.success());
    assert!(cat(&file).status.success());
    assert_eq!(answerer.seen().len(), 2);
}

#[test]
fn dropping_the_group_releases_an_unanswered_opener() {
    let (tmp, group) = setup();
    let file = tmp.path().join("held.txt");
    write(&file, b"held");
    group
        .add_filesystem_mark(tmp.path(), PERMISSION_MASK)
        .unwrap();
    // Nobody reads the group: the child blocks in open() until the group is closed.
    let child = Command::new("/bin/cat")
        .arg(&file)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut fds = [PollFd::new(group.as_fd(), fleetscan_fanotify::POLLIN)];
    assert_eq!(
        poll(&mut fds, Some(Duration::from_secs(5))).unwrap(),
        1,
        "the child's open is queued"
    );
    drop(group);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout, b"held");
}

/// A FIFO on the marked filesystem: the kernel opens the event's descriptor for the reader
/// before the opener's own open has gone through, so a FIFO has no writer yet. Without
/// `O_NONBLOCK` in the event flags that open, inside the reader's `read(2)`, waits for a writer
/// that waits for the answer: the reader and every opener on the filesystem hang forever.
/// Kernels since about 6.14 send no permission event for a FIFO at all (then this checks only
/// that the open is not held up); older ones do, and there this fails without the flag.
#[test]
fn a_fifo_on_the_marked_filesystem_does_not_block_the_reader() {
    let (tmp, group) = setup();
    let fifo = tmp.path().join("fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    group
        .add_filesystem_mark(tmp.path(), PERMISSION_MASK)
        .unwrap();
    let answerer = Answerer::start(group, Box::new(|_, _| Response::Allow));
    // Read-write: the opener's own open of a FIFO never waits for a partner.
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("exec 3<>{}; echo opened", fifo.display()))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(5) {
            // The answering thread is stuck in the kernel; leave it to process exit.
            let _ = child.kill();
            std::mem::forget(answerer);
            panic!("the reader blocked opening the FIFO's event descriptor");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout, b"opened\n");
    let seen = answerer.seen();
    assert!(seen.len() <= 1, "{seen:?}");
    assert!(seen.iter().all(|s| s.path == fifo), "{seen:?}");
}
