//! Reassembly of one job's content from its chunks, with every bound checked before a byte is
//! buffered: a broker (or anything pretending to be one) can never make the worker hold more
//! than the job's declared size, nor more than the worker's `max_file_size`.
//!
//! Pure logic: no I/O, no protocol types. Refusals are returned as the outcome to answer with.

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
    data: Vec<u8>,
}

/// What one chunk did to an assembly.
#[derive(Debug)]
pub(crate) enum Push {
    /// More chunks are expected.
    More,
    /// The content is whole; it still has to be verified against its digest.
    Complete(Vec<u8>),
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
            // Allocated by the first chunk, which most often is the whole content.
            data: Vec::new(),
        })
    }

    /// Whether the content is already whole (an empty file needs no chunk).
    pub(crate) fn is_empty_content(&self) -> bool {
        self.size == 0
    }

    pub(crate) fn into_content(self) -> Vec<u8> {
        self.data
    }

    /// Adds one chunk. Chunks must come in order, without gaps or overlaps. The first chunk's
    /// buffer becomes the content's, so content sent in one chunk is never copied.
    pub(crate) fn push(&mut self, offset: u64, data: Vec<u8>, last: bool) -> Push {
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
        if self.data.is_empty() {
            self.data = data;
            if !last {
                // The declared size is only a claim until the bytes arrive: reserve at most
                // MAX_INITIAL_CAPACITY up front, and let the rest grow as it comes.
                let expected = self.size.min(MAX_INITIAL_CAPACITY.max(total));
                let more = usize::try_from(expected - total).unwrap_or(0);
                self.data.reserve_exact(more);
            }
        } else {
            self.data.extend_from_slice(&data);
        }
        if !last {
            return Push::More;
        }
        if total != self.size {
            return Push::Refused(ScanOutcome::error(
                format!(
                    "content ended at {total} bytes but {} were declared",
                    self.size
                ),
                false,
            ));
        }
        Push::Complete(std::mem::take(&mut self.data))
    }
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
        assert!(matches!(a.push(0, b"0123".to_vec(), false), Push::More));
        assert!(matches!(a.push(4, b"456".to_vec(), false), Push::More));
        match a.push(7, b"789".to_vec(), true) {
            Push::Complete(content) => assert_eq!(content, b"0123456789"),
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
        assert!(matches!(a.push(0, b"abc".to_vec(), false), Push::More));
        let outcome = refused(a.push(3, b"def".to_vec(), false));
        assert!(!outcome.retryable);
        assert!(outcome.detail.unwrap().contains("declared size"));
    }

    #[test]
    fn short_content_gaps_and_overlaps_are_refused() {
        let mut short = start(5, 0).unwrap();
        assert!(!refused(short.push(0, b"abc".to_vec(), true)).retryable);
        let mut gap = start(5, 0).unwrap();
        assert!(matches!(gap.push(0, b"ab".to_vec(), false), Push::More));
        refused(gap.push(3, b"de".to_vec(), true));
        let mut overlap = start(5, 0).unwrap();
        assert!(matches!(overlap.push(0, b"ab".to_vec(), false), Push::More));
        refused(overlap.push(1, b"bcde".to_vec(), true));
    }

    #[test]
    fn content_in_one_chunk_keeps_its_buffer() {
        let mut a = start(5, 0).unwrap();
        let chunk = b"whole".to_vec();
        let at = chunk.as_ptr();
        match a.push(0, chunk, true) {
            Push::Complete(content) => {
                assert_eq!(content, b"whole");
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
