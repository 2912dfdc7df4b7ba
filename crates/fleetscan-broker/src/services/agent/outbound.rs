//! The broker's side of an agent's session stream: `SessionAccepted` first, always, then the
//! queued messages (decisions, content requests, policy updates) in runs, cache flushes and
//! heartbeats.
//!
//! The queue is drained in runs of up to [`OUTBOUND_BATCH`] messages without re-arming the
//! select for each, so that decisions made together leave in one write. Must never: let a flush
//! be overtaken by a decision made under the new rules (a changed generation ends a run and the
//! select sends the flush first), or let anything precede `SessionAccepted`.

use std::pin::Pin;

use fleetscan_core::now_unix_ms;
use fleetscan_proto::v1::{self, broker_message};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::Stream;
use tonic::Status;

use crate::services::stream::HEARTBEAT_PERIOD;
use crate::shutdown::Shutdown;

/// Messages the outbound side yields in a row from its queue before it looks at its select
/// again; a pending flush or stop ends the run at once.
const OUTBOUND_BATCH: usize = 256;

pub type SessionStream = Pin<Box<dyn Stream<Item = Result<v1::BrokerMessage, Status>> + Send>>;

/// The broker's side of the stream: `SessionAccepted` first, always (a flush or a decision
/// must never overtake it), then queued messages, cache flushes, heartbeats.
pub(super) fn outbound(
    accepted: v1::BrokerMessage,
    mut rx: mpsc::Receiver<Result<v1::BrokerMessage, Status>>,
    mut generation: watch::Receiver<u64>,
    mut shutdown: Shutdown,
) -> SessionStream {
    Box::pin(async_stream::stream! {
        yield Ok(accepted);
        let mut heartbeat =
            tokio::time::interval_at(Instant::now() + HEARTBEAT_PERIOD, HEARTBEAT_PERIOD);
        loop {
            tokio::select! {
                biased;
                () = shutdown.recv() => break,
                // Before decisions: a decision made under new rules must not overtake the flush.
                changed = generation.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let verdict_generation = *generation.borrow_and_update();
                    yield Ok(v1::BrokerMessage {
                        msg: Some(broker_message::Msg::Flush(v1::CacheFlush {
                            verdict_generation,
                            reason: "scanner rules changed".into(),
                        })),
                    });
                }
                message = rx.recv() => {
                    let mut next = message;
                    let mut yielded = 0;
                    let mut end = false;
                    // Whatever else is queued goes out in the same run. A flush is never
                    // overtaken: a changed generation ends the run and the select sends it first.
                    loop {
                        match next {
                            Some(Ok(message)) => yield Ok(message),
                            Some(Err(status)) => {
                                yield Err(status);
                                end = true;
                                break;
                            }
                            None => {
                                end = true;
                                break;
                            }
                        }
                        yielded += 1;
                        if yielded == OUTBOUND_BATCH
                            || generation.has_changed().unwrap_or(true)
                            || shutdown.is_shutdown()
                        {
                            break;
                        }
                        match rx.try_recv() {
                            Ok(message) => next = Some(message),
                            Err(_) => break,
                        }
                    }
                    if end {
                        break;
                    }
                }
                _ = heartbeat.tick() => yield Ok(v1::BrokerMessage {
                    msg: Some(broker_message::Msg::Heartbeat(v1::Heartbeat {
                        sent_at_unix_ms: now_unix_ms(),
                    })),
                }),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rule-set change racing with a new session must not put a CacheFlush (or anything else)
    /// before SessionAccepted: the agent rejects a session that does not start with it.
    #[tokio::test]
    async fn session_accepted_is_always_the_first_message() {
        use tokio_stream::StreamExt;

        let (generation_tx, generation) = watch::channel(1u64);
        let (_signal, shutdown) = crate::shutdown::channel();
        let (tx, rx) = mpsc::channel(4);
        let accepted = v1::BrokerMessage {
            msg: Some(broker_message::Msg::Accepted(v1::SessionAccepted::default())),
        };
        // Both a flush and a queued message are ready before the stream is first polled.
        generation_tx.send(2).unwrap();
        tx.send(Ok(v1::BrokerMessage {
            msg: Some(broker_message::Msg::Heartbeat(v1::Heartbeat::default())),
        }))
        .await
        .unwrap();
        let mut stream = outbound(accepted, rx, generation, shutdown);
        let first = stream.next().await.unwrap().unwrap();
        assert!(
            matches!(first.msg, Some(broker_message::Msg::Accepted(_))),
            "{first:?}"
        );
        let second = stream.next().await.unwrap().unwrap();
        assert!(
            matches!(second.msg, Some(broker_message::Msg::Flush(_))),
            "{second:?}"
        );
    }

    /// The outbound side sends queued messages in runs; a rule-set change in the middle of a
    /// run must end it, so that the flush goes out before the rest of the queue.
    #[tokio::test]
    async fn a_flush_ends_a_run_of_queued_messages() {
        use tokio_stream::StreamExt;

        let (generation_tx, generation) = watch::channel(1u64);
        let (_signal, shutdown) = crate::shutdown::channel();
        let (tx, rx) = mpsc::channel(8);
        let accepted = v1::BrokerMessage {
            msg: Some(broker_message::Msg::Accepted(v1::SessionAccepted::default())),
        };
        let decision = |request_id| {
            Ok(v1::BrokerMessage {
                msg: Some(broker_message::Msg::Decision(v1::Decision {
                    request_id,
                    ..Default::default()
                })),
            })
        };
        let mut stream = outbound(accepted, rx, generation, shutdown);
        stream.next().await.unwrap().unwrap();
        for id in 1..=3 {
            tx.send(decision(id)).await.unwrap();
        }
        let kind = |m: v1::BrokerMessage| match m.msg {
            Some(broker_message::Msg::Decision(d)) => format!("decision {}", d.request_id),
            Some(broker_message::Msg::Flush(f)) => format!("flush {}", f.verdict_generation),
            other => format!("{other:?}"),
        };
        assert_eq!(kind(stream.next().await.unwrap().unwrap()), "decision 1");
        generation_tx.send(2).unwrap();
        let rest: Vec<String> = [
            stream.next().await,
            stream.next().await,
            stream.next().await,
        ]
        .into_iter()
        .map(|m| kind(m.unwrap().unwrap()))
        .collect();
        assert_eq!(rest, ["flush 2", "decision 2", "decision 3"]);
    }
}
