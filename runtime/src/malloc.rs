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
//!
//! Blocks under the threshold still leave holes in the heap as they are
//! freed, and the holes stay resident; the plans whose tensors are smaller
//! (tp shards, pipeline stages, bf16) hold 12–18% more than they use. So the
//! runtime also calls [`trim`] (`malloc_trim(0)`, which `madvise`s every
//! whole free page of the heap away) before each micro-batch's forward and
//! backward and before the optimizer step ([`trim_if_on`]). Measured the
//! same way (peak over baseline, median step; `--no-malloc-trim` turns it
//! off):
//!
//! | plan            | threshold only     | with the trims     |
//! |-----------------|--------------------|--------------------|
//! | dp2 ZeRO-1 bf16 | 1675 MiB, 3.53 s   | 1447 MiB, 3.71 s   |
//! | tp2             | 1792 MiB, 4.96 s   | 1678 MiB, 5.14 s   |
//! | pp2 1F1B        | 1260 MiB, 5.88 s   | 1106 MiB, 6.29 s   |
//!
//! About 5% of step time (freed pages fault in again when reused) for
//! 6–14% less memory, and the memory model's 5% allocator allowance holds.

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

/// Whether [`trim_if_on`] trims: off unless [`set_trim`] turned it on (the
/// plan binary does, unless `--no-malloc-trim`).
static TRIM: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Turns the trims between micro-batches on or off.
pub fn set_trim(on: bool) {
    TRIM.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// [`trim`] if [`set_trim`] turned trimming on: called before each
/// micro-batch's forward and backward and before the optimizer step.
pub fn trim_if_on() {
    if TRIM.load(std::sync::atomic::Ordering::Relaxed) {
        trim();
    }
}

/// Returns the free pages of glibc's heaps to the system
/// (`malloc_trim(0)`: the free tail, and every whole free page inside the
/// heap, `madvise`d away), so that the holes freed tensors leave under the
/// mmap threshold stop counting as resident. Returns whether any memory
/// was released; a no-op (false) off glibc.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn trim() -> bool {
    // SAFETY: malloc_trim only releases free memory; it takes a padding.
    unsafe { libc::malloc_trim(0) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim() -> bool {
    false
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
