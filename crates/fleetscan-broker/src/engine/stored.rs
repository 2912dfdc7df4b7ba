//! What a store that this broker owns alone may hold: a filter that lets a miss on new content
//! skip the store look-up, which can only miss.
//!
//! A SQLite store belongs to one broker (it takes no claims and hears no other broker): every
//! fleet-wide verdict in it was either there when the broker started or written by this broker.
//! [`StoredContents`] is a Bloom filter of those contents' SHA-256 digests: seeded from the
//! store in the background at start ([`seed`]), and told of every verdict before it is written.
//! It answers "certainly not stored" or "maybe": a false "maybe" costs one look-up, as before;
//! "certainly not" is never wrong for this broker's writes, because nothing is ever taken out
//! of the filter. Until the seed is complete every answer is "maybe". A verdict lost by the
//! write-behind queue stays a "maybe": a look-up that misses and a rescan. Should something
//! else write to the file after all, the engine makes the skipped look-up when a scan cannot
//! decide, so a stored verdict still beats the fail mode.
//!
//! Never used with Postgres, which other brokers write to.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use fleetscan_core::Sha256;
use fleetscan_store::Store;
use tracing::{info, warn};

/// 2^26 bits (8 MiB): with [`PROBES`] bits per content, about 1% of look-ups of new content
/// still go to the store when it holds 6 million contents, 4% at 10 million.
const BITS_LOG2: u32 = 26;
const PROBES: usize = 4;
/// Digests read from the store per query while seeding.
const SEED_PAGE: u32 = 10_000;

/// See the module documentation.
pub struct StoredContents {
    words: Box<[AtomicU64]>,
    seeded: AtomicBool,
}

impl Default for StoredContents {
    fn default() -> Self {
        Self::new()
    }
}

impl StoredContents {
    pub fn new() -> Self {
        StoredContents {
            words: (0..1usize << (BITS_LOG2 - 6))
                .map(|_| AtomicU64::new(0))
                .collect(),
            seeded: AtomicBool::new(false),
        }
    }

    /// The bits of a content: SHA-256 is uniform, so its own bytes are the hash functions.
    fn probes(sha256: &Sha256) -> impl Iterator<Item = (usize, u64)> {
        (0..PROBES).map(move |i| {
            let four: [u8; 4] = sha256.0[4 * i..4 * i + 4].try_into().expect("32 bytes");
            let bit = u32::from_le_bytes(four) & ((1 << BITS_LOG2) - 1);
            ((bit >> 6) as usize, 1u64 << (bit & 63))
        })
    }

    /// The store may hold a verdict of this content from now on (call before writing it).
    pub fn add(&self, sha256: &Sha256) {
        for (word, mask) in Self::probes(sha256) {
            self.words[word].fetch_or(mask, Ordering::Relaxed);
        }
    }

    /// False only when the store certainly holds no fleet-wide verdict of the content.
    pub fn may_hold(&self, sha256: &Sha256) -> bool {
        // Acquire: the seed's additions are visible once `seeded` is.
        if !self.seeded.load(Ordering::Acquire) {
            return true;
        }
        Self::probes(sha256)
            .all(|(word, mask)| self.words[word].load(Ordering::Relaxed) & mask != 0)
    }

    /// Everything the store held at start has been added.
    fn mark_seeded(&self) {
        self.seeded.store(true, Ordering::Release);
    }

    pub fn is_seeded(&self) -> bool {
        self.seeded.load(Ordering::Acquire)
    }
}

/// Adds every content the store holds a fleet-wide verdict of, page by page (no long read
/// transaction), then lets the filter answer. On a store error the filter keeps answering
/// "maybe" (every miss is looked up, as without it), and says so in the log.
pub async fn seed(filter: Arc<StoredContents>, store: Store) {
    let mut after: Option<Sha256> = None;
    let mut count: u64 = 0;
    loop {
        let page = match store
            .verdict_contents_after(after.as_ref(), SEED_PAGE)
            .await
        {
            Ok(page) => page,
            Err(e) => {
                warn!(error = %e, "reading the stored contents failed; every new content is looked up in the store");
                return;
            }
        };
        for sha256 in &page {
            filter.add(sha256);
        }
        count += page.len() as u64;
        if page.len() < SEED_PAGE as usize {
            break;
        }
        after = page.last().copied();
    }
    filter.mark_seeded();
    info!(
        contents = count,
        "stored contents known: look-ups of new content skipped"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(i: u64) -> Sha256 {
        Sha256::of(&i.to_le_bytes())
    }

    #[test]
    fn an_added_content_may_be_held_and_nothing_is_certain_before_the_seed() {
        let f = StoredContents::new();
        assert!(f.may_hold(&digest(1)), "not seeded: every answer is maybe");
        f.add(&digest(1));
        f.mark_seeded();
        assert!(f.may_hold(&digest(1)));
        // After the seed, content added later is a maybe too.
        f.add(&digest(2));
        assert!(f.may_hold(&digest(2)));
    }

    #[test]
    fn new_contents_are_mostly_certain_misses() {
        let f = StoredContents::new();
        for i in 0..1_000_000 {
            f.add(&digest(i));
        }
        f.mark_seeded();
        assert!(
            (0..1_000_000).all(|i| f.may_hold(&digest(i))),
            "no false no"
        );
        let maybes = (1_000_000..1_100_000)
            .filter(|i| f.may_hold(&digest(*i)))
            .count();
        // 1 million in 2^26 bits, 4 probes: (1 - e^(-4/67))^4, about 1 in 100,000 expected.
        assert!(maybes < 20, "{maybes} of 100000 new contents were maybes");
    }
}
