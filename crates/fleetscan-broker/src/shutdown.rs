//! How every long-lived task of the broker learns that the broker is stopping.
//!
//! [`Broker::serve`](crate::Broker::serve) owns the one [`Signal`]; each stream, the fleet task
//! and anything else that must end on shutdown owns a [`Shutdown`] of its own (a clone), asks
//! [`Shutdown::is_shutdown`] between steps and selects on [`Shutdown::recv`] while it waits.
//! Once signalled, it stays signalled. A leaf module: it knows nothing of the rest of the broker.

use tokio::sync::watch;

/// The sending side: signals every [`Shutdown`] subscribed to it, once.
pub struct Signal {
    tx: watch::Sender<bool>,
}

/// The receiving side, owned by each task that must end when the broker stops. Waiting on a
/// broker that is gone (its [`Signal`] dropped) ends as if it stopped.
#[derive(Clone, Debug)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

/// A signal and a first receiver of it.
pub fn channel() -> (Signal, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Signal { tx }, Shutdown { rx })
}

impl Signal {
    /// Tells every receiver that the broker is stopping.
    pub fn shutdown(&self) {
        self.tx.send_replace(true);
    }

    /// A new receiver.
    pub fn subscribe(&self) -> Shutdown {
        Shutdown {
            rx: self.tx.subscribe(),
        }
    }
}

impl Shutdown {
    /// Whether the broker is stopping.
    pub fn is_shutdown(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once the broker is stopping (or gone); at once if it already is. Cancel-safe.
    pub async fn recv(&mut self) {
        // The guard `wait_for` returns is not `Send`: dropped here, never held in a caller's
        // select.
        let _ = self.rx.wait_for(|stopping| *stopping).await.map(|_| ());
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn every_receiver_hears_the_signal_once_given() {
        let (signal, mut first) = channel();
        let mut later = signal.subscribe();
        assert!(!first.is_shutdown());
        assert!(
            tokio::time::timeout(Duration::from_secs(1), first.recv())
                .await
                .is_err(),
            "not before the signal"
        );
        signal.shutdown();
        first.recv().await;
        later.recv().await;
        assert!(first.is_shutdown() && later.is_shutdown());
        // Once signalled, it stays signalled, also for a receiver made afterwards.
        signal.subscribe().recv().await;
    }

    #[tokio::test]
    async fn a_dropped_signal_ends_every_wait() {
        let (signal, mut shutdown) = channel();
        drop(signal);
        shutdown.recv().await;
    }
}
