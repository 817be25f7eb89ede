//! The host allocator's policy for the tensors of a training run.
//!
//! libtorch's CPU tensors come from glibc's `malloc`. glibc serves blocks
//! above its mmap threshold (128 KiB at start) with `mmap`, returned to the
//! system when freed; but each time such a block is freed it raises the
//! threshold to that block's size (up to 32 MiB on 64-bit), after which
//! blocks of that size come from the heap, where freed memory mostly stays
//! with the process. A training step frees and allocates hundreds of MiB of
//! activations, gradients and — under ZeRO-3 — gathered weights in changing
//! sizes, so the heap fragments and the resident peak creeps up step after
//! step. [`pin_mmap_threshold`] pins the threshold at 4 MiB: the large
//! blocks are mapped and unmapped, the small ones stay on the heap.
//!
//! Measured on the memory benchmark's 1024×8 Llama (3 steps, 2 cores, peak
//! RSS over baseline and median step time; `MALLOC_MMAP_THRESHOLD_=N
//! autopart run DIR --steps 3`):
//!
//! | threshold      | 1 rank, no recompute | dp2 ZeRO-3, full recompute |
//! |----------------|----------------------|----------------------------|
//! | glibc dynamic  | 2950 MiB, 13.2 s     | 1969 MiB, 15.8 s           |
//! | 128 KiB pinned | 2473 MiB, 18.5 s     | 1067 MiB, 15.4 s           |
//! | 4 MiB pinned   | 2600 MiB, 14.6 s     | 1325 MiB, 13.4 s           |
//! | 16 MiB pinned  | 2887 MiB, 13.2 s     | 1700 MiB, 10.4 s           |
//!
//! (Step times vary by ±20% run to run on this machine.) 128 KiB returns
//! the most but faults in every fresh activation page by page; 4 MiB keeps
//! most of the gain at about the default's speed.

/// The threshold the runtime pins.
pub const MMAP_THRESHOLD_BYTES: usize = 4 << 20;

/// Pins glibc's mmap threshold at [`MMAP_THRESHOLD_BYTES`] (which also
/// stops its dynamic adjustment), unless the user chose one with glibc's
/// `MALLOC_MMAP_THRESHOLD_` variable. Returns the threshold pinned, `None`
/// when left to the user or not on glibc. Call it before the model is built.
pub fn pin_mmap_threshold() -> Option<usize> {
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some() {
        return None;
    }
    pin(MMAP_THRESHOLD_BYTES)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn pin(bytes: usize) -> Option<usize> {
    let value = libc::c_int::try_from(bytes).ok()?;
    // SAFETY: mallopt only sets an allocator parameter; M_MMAP_THRESHOLD
    // takes a byte count (glibc refuses one above its maximum: 0).
    let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, value) };
    (ok == 1).then_some(bytes)
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn pin(_bytes: usize) -> Option<usize> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_threshold_is_pinned_on_glibc() {
        let pinned = pin(MMAP_THRESHOLD_BYTES);
        if cfg!(all(target_os = "linux", target_env = "gnu")) {
            assert_eq!(pinned, Some(MMAP_THRESHOLD_BYTES));
        } else {
            assert_eq!(pinned, None);
        }
    }
}
