//! Resource limits the agent raises at start (`getrlimit`/`setrlimit`).
//!
//! It must never lower a limit: it only raises the soft limit up to the hard one.

use std::io;

/// Raises the soft limit on open descriptors (`RLIMIT_NOFILE`) to the hard limit and returns
/// the soft limit now in force.
///
/// Every event read holds a descriptor (two with pidfds) until it is answered, and when the
/// kernel cannot install one in `read(2)` (`EMFILE`) it *denies* the event itself: an access
/// refused with no scan, no fail mode and no report. The common soft limit of 1,024 is reached
/// by a few hundred accesses waiting at once.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a writable rlimit struct for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } < 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `raised` is an initialised rlimit struct read by the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } < 0 {
            return Err(io::Error::last_os_error());
        }
        lim.rlim_cur = lim.rlim_max;
    }
    Ok(lim.rlim_cur)
}
