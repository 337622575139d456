//! The memory a packed weight matrix lives in: zeroed, 64-byte aligned bytes from an anonymous
//! mapping, which on Linux asks for transparent huge pages (2 MiB) wherever the matrix spans
//! whole ones.
//!
//! Why: decoding reads every weight once per token, front to back. In 4 KiB pages that is a
//! TLB miss and a page walk every 4 KiB, a quarter of a million a token for a 1.5B model; in
//! 2 MiB pages, one every 2 MiB. On a Zen 4 EPYC a streaming read of 1 GiB on 2 threads ran 4-7%
//! faster from huge pages (8 alternated pairs, BENCHMARKS.md). The mapping comes from `memmap2`;
//! what is ours is aligning it to a huge page and advising the kernel. [`HUGE_PAGES_ENV`] set
//! to `off` leaves the pages at the system's default (for comparisons, or to keep RSS at 4 KiB
//! granularity). Where transparent huge pages are disabled the advice is a no-op.

use std::sync::OnceLock;

use memmap2::MmapMut;

use super::types::switched_off;
use crate::error::{Error, Result};

/// Environment variable that turns the huge-page advice off: `off`, `0` or `false`.
pub const HUGE_PAGES_ENV: &str = "MIRROR_SD_HUGE_PAGES";

/// Bytes of a transparent huge page on x86-64 and (with 4 KiB base pages) aarch64 Linux.
const HUGE_PAGE: usize = 2 << 20;

/// The alignment every kernel load assumes.
const ALIGN: usize = 64;

/// Whether weight matrices of 2 MiB or more ask for huge pages: on Linux unless
/// [`HUGE_PAGES_ENV`] says `off`. Read once per process.
fn huge_pages_wanted() -> bool {
    static WANTED: OnceLock<bool> = OnceLock::new();
    *WANTED.get_or_init(|| cfg!(target_os = "linux") && !switched_off(HUGE_PAGES_ENV))
}

/// Zeroed bytes, 64-byte aligned (2 MiB aligned when they span a huge page), owned alone: what
/// a [`PackedMatrix`](super::PackedMatrix) keeps its weights in, for code that wants to read
/// memory as the kernels do (`bench --bandwidth`).
pub struct WeightBytes {
    map: MmapMut,
    /// Where the bytes start in `map` (past the slack that aligns them to a huge page).
    start: usize,
    len: usize,
}

impl WeightBytes {
    /// `len` zeroed bytes (rounded up to a multiple of 64). Fails, rather than aborting, when
    /// the system has no memory to map.
    pub fn zeroed(len: usize) -> Result<Self> {
        let len = len.max(1).div_ceil(ALIGN) * ALIGN;
        let huge = huge_pages_wanted() && len >= HUGE_PAGE;
        // Slack to move the start to a huge-page boundary: mapped but never touched, so it
        // costs address space, not memory.
        let slack = if huge { HUGE_PAGE } else { 0 };
        let map = MmapMut::map_anon(len + slack).map_err(|source| Error::Allocation {
            bytes: len + slack,
            source,
        })?;
        let address = map.as_ptr() as usize;
        let start = if huge {
            address.next_multiple_of(HUGE_PAGE) - address
        } else {
            0
        };
        #[cfg(target_os = "linux")]
        if huge {
            // Advice only: where the kernel declines (THP disabled), the pages stay 4 KiB and
            // nothing else changes, so its error is not the caller's.
            let _ = map.advise_range(memmap2::Advice::HugePage, start, len);
        }
        Ok(Self { map, start, len })
    }

    /// The bytes (a multiple of 64 long, starting 64-byte aligned).
    pub fn as_slice(&self) -> &[u8] {
        &self.map[self.start..self.start + self.len]
    }

    /// The bytes, to write.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.map[self.start..self.start + self.len]
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no bytes are held (never: `zeroed` rounds up to 64).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A copy in new memory of its own.
    pub fn try_clone(&self) -> Result<Self> {
        let mut copy = Self::zeroed(self.len)?;
        copy.as_mut_slice().copy_from_slice(self.as_slice());
        Ok(copy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_is_zeroed_aligned_and_rounded() {
        for len in [
            1,
            63,
            64,
            65,
            4095,
            HUGE_PAGE - 1,
            HUGE_PAGE,
            3 * HUGE_PAGE + 100,
        ] {
            let bytes = WeightBytes::zeroed(len).unwrap();
            assert_eq!(bytes.len(), len.div_ceil(64) * 64);
            assert_eq!(bytes.as_slice().len(), bytes.len());
            assert!(bytes.as_slice().iter().all(|&b| b == 0));
            assert_eq!(bytes.as_slice().as_ptr() as usize % ALIGN, 0);
            if huge_pages_wanted() && bytes.len() >= HUGE_PAGE {
                assert_eq!(bytes.as_slice().as_ptr() as usize % HUGE_PAGE, 0);
            }
        }
    }

    #[test]
    fn a_clone_is_equal_and_independent() {
        let mut bytes = WeightBytes::zeroed(HUGE_PAGE + 64).unwrap();
        for (i, b) in bytes.as_mut_slice().iter_mut().enumerate() {
            *b = (i * 7 % 251) as u8;
        }
        let mut copy = bytes.try_clone().unwrap();
        assert_eq!(copy.as_slice(), bytes.as_slice());
        copy.as_mut_slice()[5] ^= 1;
        assert_ne!(copy.as_slice()[5], bytes.as_slice()[5]);
    }
}
