//! ZeRO-3's prefetch: the next layer's weights are all-gathered on a thread
//! of their own while this layer computes, as FSDP and DeepSpeed prefetch
//! one layer ahead.
//!
//! The thread owns a duplicate of the dp communicator (its own message
//! space, so its collectives never match the main thread's) and needs MPI
//! with `MPI_THREAD_MULTIPLE` ([`crate::comm::MpiComm::thread_multiple`]);
//! without it the runtime gathers each layer when it is acquired, as
//! before. The tape says which block comes next ([`crate::exec::BlockHooks::
//! prefetch`]: the following layer in forward, the previous one in backward);
//! [`super::ZeroHooks`] submits that block's gather if no other is in flight
//! and takes the result when the block is acquired. A prefetch that is not
//! used (the schedule turned to another micro-batch) is waited for and
//! dropped, so that every dp rank runs the same collectives in the same
//! order: each rank decides from the same schedule.

use super::{Bucket, gather_bucket};
use crate::comm::{Communicator, SendableComm};
use std::sync::mpsc;
use std::thread::JoinHandle;
use tch::Tensor;

/// One block's gathers: its buckets with this rank's master slices.
struct Job {
    block: usize,
    work: Vec<(Bucket, Tensor)>,
}

/// A block's gathered parameters (parameter index, tensor), or why not.
type Gathered = (usize, Result<Vec<(usize, Tensor)>, String>);

/// The prefetch thread and the block it is gathering, if any.
pub(super) struct Prefetcher {
    jobs: Option<mpsc::Sender<Job>>,
    results: mpsc::Receiver<Gathered>,
    thread: Option<JoinHandle<()>>,
    dp_size: usize,
    /// The block submitted and not yet taken.
    pending: std::cell::Cell<Option<usize>>,
    /// Gathers used (the block acquired was the one gathered ahead) and
    /// wasted (another was acquired, or the step ended).
    used: std::cell::Cell<u64>,
    wasted: std::cell::Cell<u64>,
}

impl std::fmt::Debug for Prefetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prefetcher")
            .field("pending", &self.pending.get())
            .finish_non_exhaustive()
    }
}

impl Prefetcher {
    /// Starts the thread over `comm` (a duplicate of the dp group).
    pub(super) fn start(comm: SendableComm) -> std::io::Result<Self> {
        let dp_size = comm.get().size();
        let (jobs, job_rx) = mpsc::channel::<Job>();
        let (result_tx, results) = mpsc::channel::<Gathered>();
        let thread = std::thread::Builder::new()
            .name("zero3-prefetch".into())
            .spawn(move || {
                let comm = comm;
                for job in job_rx {
                    let mut out = Vec::new();
                    let mut failed = None;
                    for (b, m) in &job.work {
                        match gather_bucket(b, m, dp_size, comm.get()) {
                            Ok(ts) => out.extend(ts),
                            Err(e) => {
                                failed = Some(e.to_string());
                                break;
                            }
                        }
                    }
                    let result = failed.map_or(Ok(out), Err);
                    if result_tx.send((job.block, result)).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Self {
            jobs: Some(jobs),
            results,
            thread: Some(thread),
            dp_size,
            pending: std::cell::Cell::new(None),
            used: std::cell::Cell::new(0),
            wasted: std::cell::Cell::new(0),
        })
    }

    /// Whether a gather is in flight.
    pub(super) fn busy(&self) -> bool {
        self.pending.get().is_some()
    }

    /// Starts gathering `block` from `work`; false when one is in flight or
    /// the thread is gone.
    pub(super) fn submit(&self, block: usize, work: Vec<(Bucket, Tensor)>) -> bool {
        if self.busy() {
            return false;
        }
        let sent = self
            .jobs
            .as_ref()
            .is_some_and(|j| j.send(Job { block, work }).is_ok());
        if sent {
            self.pending.set(Some(block));
        }
        sent
    }

    /// Waits for the gather in flight (if any): its parameters when it was
    /// `block`'s, `None` otherwise (dropped).
    pub(super) fn take(&self, block: usize) -> Result<Option<Vec<(usize, Tensor)>>, String> {
        let Some(pending) = self.pending.take() else {
            return Ok(None);
        };
        let _watch = crate::watchdog::enter("all_gather (prefetched)", "dp", self.dp_size);
        let (got, result) = self
            .results
            .recv()
            .map_err(|_| format!("the prefetch thread ended before gathering block {pending}"))?;
        let ts = result.map_err(|e| format!("prefetching block {got}: {e}"))?;
        let hit = got == block;
        let count = if hit { &self.used } else { &self.wasted };
        count.set(count.get() + 1);
        Ok(hit.then_some(ts))
    }

    /// Gathers used and wasted so far.
    pub(super) fn counts(&self) -> (u64, u64) {
        (self.used.get(), self.wasted.get())
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop.
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
