//! Waiting from tests: a future run to completion from synchronous code, and a condition
//! polled until it holds.
//!
//! It must never wait without a limit: [`eventually`] panics with what it waited for.

use std::time::{Duration, Instant};

/// Runs `f` to completion from synchronous code: on the current tokio runtime when there is one
/// (a multi-threaded one: the caller's thread blocks), else on a new current-thread runtime.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    match tokio::runtime::Handle::try_current() {
        Ok(h) => tokio::task::block_in_place(|| h.block_on(f)),
        Err(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
            .block_on(f),
    }
}
/// Polls `check` every 50 ms until it returns `Some`, or panics after `limit` with `what`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
