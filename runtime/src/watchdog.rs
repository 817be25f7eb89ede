//! The collective watchdog: a transfer that does not complete within a
//! timeout (a rank stopped, not dead, or a network that hangs) ends the
//! job with a message naming this rank, the operation, its group and the
//! step, instead of waiting forever.
//!
//! Every MPI collective and point-to-point call of [`crate::comm::MpiComm`]
//! marks itself in flight ([`enter`]); a thread started by [`start`] looks
//! every fraction of the timeout and, when one has been in flight longer,
//! prints the message and kills its own process with SIGKILL. The launcher
//! (`mpirun`, `srun`) then takes the whole job down, and `autopart launch`
//! can restart it from its latest checkpoint. The stopped rank cannot see
//! its own timeout; the ranks waiting for it can.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The operation in flight on one thread: what, over which group, since when.
#[derive(Clone, Copy, Debug)]
struct InFlight {
    op: &'static str,
    group: &'static str,
    size: usize,
    since: Instant,
    thread: std::thread::ThreadId,
}

/// At most one operation per thread (the main thread's, and ZeRO-3's
/// prefetch thread's).
static CURRENT: Mutex<Vec<InFlight>> = Mutex::new(Vec::new());
static STEP: AtomicU64 = AtomicU64::new(0);

/// Marks the training step (from 1) that the messages name.
pub fn set_step(step: u64) {
    STEP.store(step, Ordering::Relaxed);
}

/// Clears the in-flight mark when dropped (only the outermost mark: a
/// send-receive made of a send and a receive is one operation).
#[derive(Debug)]
#[must_use]
pub struct Guard(bool);

impl Drop for Guard {
    fn drop(&mut self) {
        if self.0
            && let Ok(mut c) = CURRENT.lock()
        {
            let me = std::thread::current().id();
            c.retain(|f| f.thread != me);
        }
    }
}

/// Marks `op` over `group` (of `size` ranks) in flight on this thread until
/// the guard drops.
pub fn enter(op: &'static str, group: &'static str, size: usize) -> Guard {
    let me = std::thread::current().id();
    match CURRENT.lock() {
        Ok(mut c) if !c.iter().any(|f| f.thread == me) => {
            c.push(InFlight {
                op,
                group,
                size,
                since: Instant::now(),
                thread: me,
            });
            Guard(true)
        }
        _ => Guard(false),
    }
}

/// Starts the watchdog thread of `rank` with `timeout`.
pub fn start(rank: usize, timeout: Duration) {
    let tick = (timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(tick);
            let late = CURRENT
                .lock()
                .ok()
                .and_then(|c| c.iter().find(|f| f.since.elapsed() > timeout).copied());
            if let Some(f) = late {
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr().lock(),
                    "error: rank {rank}: {} over the {} group ({} ranks) in step {} has not completed within {:.0} s (--collective-timeout): a rank is stopped or hung; ending the job",
                    f.op,
                    f.group,
                    f.size,
                    STEP.load(Ordering::Relaxed),
                    timeout.as_secs_f64()
                );
                crate::checkpoint::kill_self();
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_outermost_mark_counts_and_dropping_clears_it() {
        let outer = enter("send_recv", "pp", 2);
        let inner = enter("send", "pp", 2);
        assert!(outer.0 && !inner.0);
        drop(inner);
        let me = std::thread::current().id();
        let mine = || {
            CURRENT
                .lock()
                .expect("lock")
                .iter()
                .find(|f| f.thread == me)
                .map(|f| f.op)
        };
        assert_eq!(mine(), Some("send_recv"));
        // Another thread's operation is its own.
        std::thread::spawn(|| {
            let other = enter("all_gather", "dp", 2);
            assert!(other.0);
        })
        .join()
        .expect("thread");
        drop(outer);
        assert_eq!(mine(), None);
    }
}
