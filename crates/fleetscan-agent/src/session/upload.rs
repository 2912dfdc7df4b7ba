//! Uploads of content the broker asked for: read from the waiting access's descriptor (never
//! by path), in chunks of at most `CHUNK_SIZE`, on the session's content queue so that large
//! files are paced by the network.
//!
//! An upload never answers the access: it stops (saying why) once the access is answered or
//! its file changed since it was hashed, and reads happen off the runtime's threads.

use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use fleetscan_proto::v1::agent_message::Msg as Out;
use fleetscan_proto::{CHUNK_SIZE, v1};
use tokio::sync::{Semaphore, mpsc};
use tracing::debug;

use super::link::msg;
use crate::access::Access;
use crate::cache::FileKey;

/// Tells the broker that the content of request `id` will not come.
pub(super) fn unavailable(id: u64, reason: &str) -> v1::AgentMessage {
    msg(Out::ContentUnavailable(v1::ContentUnavailable {
        request_id: id,
        reason: reason.to_string(),
    }))
}

/// Uploads the `len` hashed bytes of request `id`, whose identity was `key` when hashed.
pub(super) async fn upload(
    id: u64,
    access: Arc<Access>,
    len: u64,
    key: FileKey,
    ctl_tx: mpsc::Sender<v1::AgentMessage>,
    content_tx: mpsc::Sender<v1::AgentMessage>,
    allowed: Arc<Semaphore>,
) {
    let Ok(_permit) = allowed.acquire_owned().await else {
        return;
    };
    const DECIDED: &str = "access already decided (deadline)";
    let Some(file) = access.file() else {
        let _ = ctl_tx.send(unavailable(id, DECIDED)).await;
        return;
    };
    let check = file.clone();
    let unchanged = tokio::task::spawn_blocking(move || {
        fleetscan_fanotify::statx_fd(check.as_fd()).is_ok_and(|st| FileKey::from(&st) == key)
    })
    .await
    .unwrap_or(false);
    if !unchanged {
        let _ = ctl_tx
            .send(unavailable(id, "file changed since it was hashed"))
            .await;
        return;
    }
    let mut offset = 0u64;
    loop {
        if access.is_answered() {
            let _ = ctl_tx.send(unavailable(id, DECIDED)).await;
            return;
        }
        let n = usize::try_from((len - offset).min(CHUNK_SIZE as u64)).expect("chunk fits");
        let f = file.clone();
        let read = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; n];
            f.read_exact_at(&mut buf, offset).map(|()| buf)
        })
        .await;
        let data = match read {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => {
                let _ = ctl_tx
                    .send(unavailable(id, &format!("read failed: {e}")))
                    .await;
                return;
            }
            Err(_) => return,
        };
        let last = offset + n as u64 >= len;
        let chunk = v1::ContentChunk {
            request_id: id,
            offset,
            data: data.into(),
            last,
        };
        if content_tx.send(msg(Out::Content(chunk))).await.is_err() {
            return;
        }
        offset += n as u64;
        if last {
            debug!(id, bytes = len, "content uploaded");
            return;
        }
    }
}
