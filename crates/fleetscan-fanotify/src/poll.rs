//! `poll(2)` over borrowed descriptors: the one place this crate waits.
//!
//! It must never wait without the caller's timeout, and never treat an interruption as an
//! error.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

/// `POLLIN`: data to read (a fanotify group with events; an exited process's pidfd).
pub const POLLIN: i16 = libc::POLLIN;
/// `POLLPRI`: an exceptional condition (`/proc/self/mountinfo` changed).
pub const POLLPRI: i16 = libc::POLLPRI;

/// One descriptor to [`poll`], with the events asked for and those that happened.
#[derive(Debug)]
pub struct PollFd<'a> {
    pub fd: BorrowedFd<'a>,
    pub events: i16,
    pub revents: i16,
}

impl<'a> PollFd<'a> {
    pub fn new(fd: BorrowedFd<'a>, events: i16) -> Self {
        PollFd {
            fd,
            events,
            revents: 0,
        }
    }
}

/// `poll(2)`: waits until one of `fds` is ready or `timeout` passes (`None`: forever). Returns
/// how many are ready; `EINTR` counts as none.
pub fn poll(fds: &mut [PollFd<'_>], timeout: Option<Duration>) -> io::Result<usize> {
    let mut raw: Vec<libc::pollfd> = fds
        .iter()
        .map(|p| libc::pollfd {
            fd: p.fd.as_raw_fd(),
            events: p.events,
            revents: 0,
        })
        .collect();
    let ms = timeout.map_or(-1, |t| {
        // Round up so that a short timeout does not become a busy loop.
        libc::c_int::try_from(t.as_micros().div_ceil(1000)).unwrap_or(libc::c_int::MAX)
    });
    // SAFETY: `raw` is a live array of `raw.len()` initialised pollfd structs whose
    // descriptors are borrowed for the duration of the call.
    let rc = unsafe { libc::poll(raw.as_mut_ptr(), raw.len() as libc::nfds_t, ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(e);
    }
    for (p, r) in fds.iter_mut().zip(&raw) {
        p.revents = r.revents;
    }
    Ok(usize::try_from(rc).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn poll_times_out_on_a_quiet_descriptor() {
        let (r, _w) = std::io::pipe().unwrap();
        let mut fds = [PollFd::new(r.as_fd(), POLLIN)];
        let t = std::time::Instant::now();
        assert_eq!(poll(&mut fds, Some(Duration::from_millis(20))).unwrap(), 0);
        assert!(t.elapsed() >= Duration::from_millis(20));
    }
}
