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

/// The operation in flight: what, over which group, since when.
#[derive(Clone, Copy, Debug)]
struct InFlight {
    op: &'static str,
    group: &'static str,
    size: usize,
    since: Instant,
}

static CURRENT: Mutex<Option<InFlight>> = Mutex::new(None);
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
            *c = None;
        }
    }
}

/// Marks `op` over `group` (of `size` ranks) in flight until the guard drops.
pub fn enter(op: &'static str, group: &'static str, size: usize) -> Guard {
    match CURRENT.lock() {
        Ok(mut c) if c.is_none() => {
            *c = Some(InFlight {
                op,
                group,
                size,
                since: Instant::now(),
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
                .and_then(|c| *c)
                .filter(|f| f.since.elapsed() > timeout);
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
        assert_eq!(
            CURRENT.lock().expect("lock").map(|f| f.op),
            Some("send_recv")
        );
        drop(outer);
        assert!(CURRENT.lock().expect("lock").is_none());
    }
}
