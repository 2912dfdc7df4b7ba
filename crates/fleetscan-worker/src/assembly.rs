//! Reassembly of one job's content from its chunks, with every bound checked before a byte is
//! buffered: a broker (or anything pretending to be one) can never make the worker hold more
//! than the job's declared size, nor more than the worker's `max_file_size`.
//!
//! Pure logic: no I/O, no protocol types. Refusals are returned as the outcome to answer with.

use bytes::{Bytes, BytesMut};
use fleetscan_core::Sha256;
use tokio::time::Instant;

use crate::ScanOutcome;

/// The initial buffer is capped, since the declared size is only a claim until bytes arrive.
const MAX_INITIAL_CAPACITY: u64 = 4 * 1024 * 1024;

/// The content of one job being received.
#[derive(Debug)]
pub(crate) struct Assembly {
    pub(crate) sha256: Sha256,
    pub(crate) deadline: Instant,
    size: u64,
    /// Bytes received so far, when the content came in more than one chunk.
    data: BytesMut,
}

/// What one chunk did to an assembly.
#[derive(Debug)]
pub(crate) enum Push {
    /// More chunks are expected.
    More,
    /// The content is whole; it still has to be verified against its digest.
    Complete(Bytes),
    /// The job cannot be completed; answer it with this outcome and drop it.
    Refused(ScanOutcome),
}

impl Assembly {
    /// Starts a job, or refuses it at once when its claims already break a bound.
    /// `max_file_size` 0 means no limit.
    pub(crate) fn start(
        sha256: &str,
        size: u64,
        max_file_size: u64,
        deadline: Instant,
    ) -> Result<Assembly, ScanOutcome> {
        let sha256: Sha256 = sha256
            .parse()
            .map_err(|_| ScanOutcome::error("job sha256 is not 64 hex digits", false))?;
        if max_file_size != 0 && size > max_file_size {
            // Another worker of the pool may accept larger content, so a retry can succeed.
            return Err(ScanOutcome::error(
                format!(
                    "content of {size} bytes exceeds this worker's max_file_size of {max_file_size} bytes"
                ),
                true,
            ));
        }
        Ok(Assembly {
            sha256,
            deadline,
            size,
            // Allocated by the second chunk: most often the first is the whole content.
            data: BytesMut::new(),
        })
    }

    /// Whether the content is already whole (an empty file needs no chunk).
    pub(crate) fn is_empty_content(&self) -> bool {
        self.size == 0
    }

    pub(crate) fn into_content(self) -> Bytes {
        self.data.freeze()
    }

    /// Adds one chunk. Chunks must come in order, without gaps or overlaps. Content sent in one
    /// chunk is never copied: the chunk (a slice of the message it came in) is the content.
    pub(crate) fn push(&mut self, offset: u64, data: Bytes, last: bool) -> Push {
        let received = self.data.len() as u64;
        if offset != received {
            return Push::Refused(ScanOutcome::error(
                format!("chunk at offset {offset} but {received} bytes received so far"),
                true,
            ));
        }
        let total = received.saturating_add(data.len() as u64);
        if total > self.size {
            return Push::Refused(ScanOutcome::error(
                format!("content exceeds its declared size of {} bytes", self.size),
                false,
            ));
        }
        if received == 0 && last {
            if total != self.size {
                return Push::Refused(short(total, self.size));
            }
            return Push::Complete(data);
        }
        if received == 0 {
            // The declared size is only a claim until the bytes arrive: reserve at most
            // MAX_INITIAL_CAPACITY up front, and let the rest grow as it comes.
            let expected = self.size.min(MAX_INITIAL_CAPACITY.max(total));
            self.data = BytesMut::with_capacity(usize::try_from(expected).unwrap_or(0));
        }
        self.data.extend_from_slice(&data);
        if !last {
            return Push::More;
        }
        if total != self.size {
            return Push::Refused(short(total, self.size));
        }
        Push::Complete(std::mem::take(&mut self.data).freeze())
    }
}

/// The refusal of content that ended before its declared size.
fn short(total: u64, size: u64) -> ScanOutcome {
    ScanOutcome::error(
        format!("content ended at {total} bytes but {size} were declared"),
        false,
    )
}

#[cfg(test)]
mod tests {
    use fleetscan_core::VerdictKind;

    use super::*;

    fn start(size: u64, max: u64) -> Result<Assembly, ScanOutcome> {
        Assembly::start(&Sha256::of(b"x").to_hex(), size, max, Instant::now())
    }

    fn refused(push: Push) -> ScanOutcome {
        match push {
            Push::Refused(outcome) => outcome,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn chunks_in_order_make_the_content() {
        let mut a = start(10, 0).unwrap();
        assert!(matches!(
            a.push(0, Bytes::from_static(b"0123"), false),
            Push::More
        ));
        assert!(matches!(
            a.push(4, Bytes::from_static(b"456"), false),
            Push::More
        ));
        match a.push(7, Bytes::from_static(b"789"), true) {
            Push::Complete(content) => assert_eq!(&content[..], b"0123456789"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn declared_size_over_the_limit_is_refused_before_any_byte() {
        let outcome = start(101, 100).unwrap_err();
        assert_eq!(outcome.kind, VerdictKind::Error);
        assert!(outcome.retryable);
        assert!(start(100, 100).is_ok());
        assert!(start(u64::MAX, 0).is_ok(), "0 means no limit");
    }

    #[test]
    fn bad_digest_is_refused() {
        let outcome = Assembly::start("xyz", 1, 0, Instant::now()).unwrap_err();
        assert!(!outcome.retryable);
    }

    #[test]
    fn more_bytes_than_declared_are_refused() {
        let mut a = start(5, 0).unwrap();
        assert!(matches!(
            a.push(0, Bytes::from_static(b"abc"), false),
            Push::More
        ));
        let outcome = refused(a.push(3, Bytes::from_static(b"def"), false));
        assert!(!outcome.retryable);
        assert!(outcome.detail.unwrap().contains("declared size"));
    }

    #[test]
    fn short_content_gaps_and_overlaps_are_refused() {
        let mut short = start(5, 0).unwrap();
        assert!(!refused(short.push(0, Bytes::from_static(b"abc"), true)).retryable);
        let mut gap = start(5, 0).unwrap();
        assert!(matches!(
            gap.push(0, Bytes::from_static(b"ab"), false),
            Push::More
        ));
        refused(gap.push(3, Bytes::from_static(b"de"), true));
        let mut overlap = start(5, 0).unwrap();
        assert!(matches!(
            overlap.push(0, Bytes::from_static(b"ab"), false),
            Push::More
        ));
        refused(overlap.push(1, Bytes::from_static(b"bcde"), true));
    }

    #[test]
    fn content_in_one_chunk_keeps_its_buffer() {
        let mut a = start(5, 0).unwrap();
        let chunk = Bytes::from(b"whole".to_vec());
        let at = chunk.as_ptr();
        match a.push(0, chunk, true) {
            Push::Complete(content) => {
                assert_eq!(&content[..], b"whole");
                assert_eq!(content.as_ptr(), at, "not copied");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn empty_content_is_whole_at_once() {
        let a = start(0, 10).unwrap();
        assert!(a.is_empty_content());
        assert!(a.into_content().is_empty());
    }
}
