//! The contents the kit scans: the EICAR test file and generated clean contents.
//!
//! Clean contents are pseudo-random bytes seeded per run, so a worker can never answer them
//! from a cache filled by an earlier run. Nothing here is read from disk or downloaded.

/// The 68-byte EICAR anti-virus test file. Every shipped worker detects it. It is assembled
/// from two halves so that this source file is not itself taken for the test file.
pub const EICAR_TEST_FILE: &[u8] = concat!(
    "X5O!P%@AP[4\\PZX54(P^)7CC)7}$",
    "EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
)
.as_bytes();

/// A seed that differs between runs (time and pid), for [`generated`].
pub(crate) fn run_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ (u64::from(std::process::id()) << 32) ^ 0x9e37_79b9_7f4a_7c15
}

/// `len` pseudo-random bytes (xorshift64*): incompressible, free of any signature, and the
/// same for the same seed.
pub(crate) fn generated(seed: u64, len: usize) -> Vec<u8> {
    // Zero is xorshift's fixed point; any other state works.
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

#[cfg(test)]
mod tests {
    use fleetscan_core::Sha256;

    use super::*;

    #[test]
    fn eicar_is_the_standard_test_file() {
        assert_eq!(EICAR_TEST_FILE.len(), 68);
        assert_eq!(
            Sha256::of(EICAR_TEST_FILE).to_hex(),
            "275a021bbfb6489e54d471899f7db9d1663fc695ec2fe2a2c4538aabf651fd0f"
        );
    }

    #[test]
    fn generated_content_is_deterministic_per_seed_and_differs_between_seeds() {
        let a = generated(7, 1000);
        assert_eq!(a.len(), 1000);
        assert_eq!(a, generated(7, 1000));
        assert_ne!(a, generated(8, 1000));
        assert_eq!(&generated(7, 1003)[..1000], &a[..]);
        assert!(generated(0, 64).iter().any(|b| *b != 0));
    }
}
