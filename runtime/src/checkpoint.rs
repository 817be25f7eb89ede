//! Saving a run's state while it trains: the protocol around
//! [`autopart_vocab::ckpt`]'s format.
//!
//! A save of step `N` (every rank, at the step boundary):
//!
//! 1. the previous save, if still being written, is waited for and
//!    completed (so saves never overlap);
//! 2. rank 0 makes an empty `DIR/step_N.partial`; a barrier;
//! 3. each rank copies its share of the state out ([`crate::zero::DpOptimizer::snapshot`]),
//!    then writes it into the folder — in the caller's thread, or (async)
//!    in a background thread while training goes on;
//! 4. completion, collective: every rank says whether its write succeeded
//!    (an all-reduce); if all did, rank 0 checks the files, writes the
//!    `COMPLETE` manifest and renames the folder to `step_N`, then applies
//!    `--keep`; its outcome is all-reduced too. A failure anywhere stops the
//!    run on every rank with the error, and the previous checkpoint stays
//!    the latest complete one.
//!
//! An async save is completed at the first step boundary at which every
//! rank's write has finished (a one-number all-reduce per step while one
//! is pending), at the next save, or at the end of the run.

use crate::comm::Communicator;
use autopart_vocab::ckpt::{self, CkptError, Manifest, Piece, RankIndex};

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Instant;
use tch::Tensor;
use thiserror::Error;

/// What `--checkpoint-*` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SaveOptions {
    pub dir: PathBuf,
    /// Save every `every` steps (and always after the last step).
    pub every: Option<u64>,
    /// Keep the newest `keep` complete checkpoints.
    pub keep: Option<usize>,
    /// Write in a background thread.
    pub background: bool,
}

/// A checkpoint that became complete.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Saved {
    pub step: u64,
    /// Bytes of every rank's files.
    pub bytes: u64,
    /// Seconds from the copy at the step boundary to completion (an async
    /// save completes at the first step boundary after every rank wrote).
    pub seconds: f64,
    /// Seconds rank 0 spent writing its files.
    pub write_s: f64,
}

/// What a save or a step boundary did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SaveReport {
    /// Seconds training was held up (copying, writing when synchronous,
    /// waiting for the previous save, completing).
    pub blocked_s: f64,
    /// Checkpoints completed (at most one save is pending at a time).
    pub saved: Vec<Saved>,
}

/// Why a save failed.
#[derive(Debug, Error)]
pub enum SaveError {
    /// This rank's own failure (its message is printed by this rank).
    #[error("checkpoint step_{step}: {source}")]
    Local { step: u64, source: CkptError },
    /// Some rank failed; every rank returns this.
    #[error(
        "checkpoint step_{step} was not saved: {failed} rank(s) failed to write it (see their errors above); {}",
        match previous { Some(p) => format!("the latest complete checkpoint is still step_{p}"), None => "there is no earlier complete checkpoint".into() }
    )]
    Failed {
        step: u64,
        failed: usize,
        previous: Option<u64>,
    },
    #[error("checkpoint: {0}")]
    Comm(#[from] crate::comm::CommError),
    #[error("checkpoint: {0}")]
    Torch(#[from] tch::TchError),
}

/// The result of one rank's write.
type WriteResult = Result<(RankIndex, f64), CkptError>;

#[derive(Debug)]
struct Pending {
    step: u64,
    manifest: Manifest,
    started: Instant,
    handle: Option<JoinHandle<WriteResult>>,
    /// A synchronous write's result.
    done: Option<WriteResult>,
}

/// The saves of one run on one rank.
#[derive(Debug)]
pub struct Saver {
    opts: SaveOptions,
    rank: usize,
    world_size: usize,
    pending: Option<Pending>,
    /// `(rank, step)` of `AUTOPART_FAULT_KILL_IN_SAVE`: that rank kills
    /// itself with SIGKILL after writing its files of that step's save (a
    /// crash in the middle of a save, for the fault tests).
    fault: Option<(usize, u64)>,
}

/// The testing hook: `AUTOPART_FAULT_KILL_IN_SAVE=RANK:STEP`.
pub const FAULT_ENV: &str = "AUTOPART_FAULT_KILL_IN_SAVE";
/// The testing hook `AUTOPART_FAULT_KILL_AT_STEP=RANK:STEP`: that rank kills
/// itself with SIGKILL right after training step STEP (before its save).
pub const FAULT_STEP_ENV: &str = "AUTOPART_FAULT_KILL_AT_STEP";
/// The testing hook `AUTOPART_FAULT_NAN_AT_STEP=RANK:STEP`: that rank puts a
/// NaN into a gradient of step STEP, after backward and before the update.
pub const FAULT_NAN_ENV: &str = "AUTOPART_FAULT_NAN_AT_STEP";
/// The testing hook `AUTOPART_FAULT_STOP_AT_STEP=RANK:STEP`: that rank
/// stops itself with SIGSTOP right after training step STEP (alive but
/// silent: what the collective watchdog is for).
pub const FAULT_STOP_ENV: &str = "AUTOPART_FAULT_STOP_AT_STEP";
/// The attempt number `autopart launch` gives each attempt (0 first).
pub const RESTART_COUNT_ENV: &str = "AUTOPART_RESTART_COUNT";

/// A fault-injection hook `VAR=RANK:STEP`, armed only in the first attempt
/// of a job (`AUTOPART_RESTART_COUNT` unset or 0), so that a job restarted
/// by `autopart launch` runs clean.
pub fn fault_hook(var: &str) -> Option<(usize, u64)> {
    let attempt = std::env::var(RESTART_COUNT_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    if attempt > 0 {
        return None;
    }
    let v = std::env::var(var).ok()?;
    let (r, s) = v.split_once(':')?;
    Some((r.parse().ok()?, s.parse().ok()?))
}

impl Saver {
    pub fn new(opts: SaveOptions, rank: usize, world_size: usize) -> Self {
        let fault = fault_hook(FAULT_ENV);
        Self {
            opts,
            rank,
            world_size,
            pending: None,
            fault,
        }
    }

    pub fn options(&self) -> &SaveOptions {
        &self.opts
    }

    /// Whether step `step` (counted from 1) of a run of `last` steps saves.
    pub fn due(&self, step: u64, last: u64) -> bool {
        step == last || self.opts.every.is_some_and(|n| n > 0 && step % n == 0)
    }

    /// Saves `step`: waits for the previous save, starts this one with
    /// `pieces` (this rank's copy of the state) and, when synchronous,
    /// completes it. Collective over `world`.
    pub fn save(
        &mut self,
        world: &dyn Communicator,
        step: u64,
        pieces: Vec<Piece>,
        manifest: Manifest,
        copied_at: Instant,
    ) -> Result<SaveReport, SaveError> {
        let t0 = Instant::now();
        let mut report = self.finish(world)?;
        let dir = self.opts.dir.clone();
        let begun = if self.rank == 0 {
            ckpt::begin(&dir, step).map(|_| ())
        } else {
            Ok(())
        };
        // Rank 0's folder must exist before anyone writes into it.
        self.agree(
            world,
            step,
            begun.map_err(|e| SaveError::Local { step, source: e }),
        )?;
        let partial = ckpt::partial_dir(&dir, step);
        let (rank, fault) = (self.rank, self.fault);
        let write = move || -> WriteResult {
            let t = Instant::now();
            let index = ckpt::write_rank(&partial, rank, &pieces)?;
            if fault == Some((rank, step)) {
                kill_self();
            }
            Ok((index, t.elapsed().as_secs_f64()))
        };
        let mut pending = Pending {
            step,
            manifest,
            started: copied_at,
            handle: None,
            done: None,
        };
        if self.opts.background {
            pending.handle = Some(std::thread::spawn(write));
            self.pending = Some(pending);
        } else {
            pending.done = Some(write());
            self.pending = Some(pending);
            report.saved.extend(self.complete(world)?);
        }
        report.blocked_s = t0.elapsed().as_secs_f64() + (t0 - copied_at).as_secs_f64();
        Ok(report)
    }

    /// At a step boundary: completes a pending save if every rank's write
    /// has finished. Collective over `world` while a save is pending.
    pub fn poll(&mut self, world: &dyn Communicator) -> Result<SaveReport, SaveError> {
        let Some(p) = &self.pending else {
            return Ok(SaveReport::default());
        };
        let t0 = Instant::now();
        let mine = p.done.is_some() || p.handle.as_ref().is_some_and(JoinHandle::is_finished);
        let unfinished = sum(world, if mine { 0.0 } else { 1.0 })?;
        let mut report = SaveReport::default();
        if unfinished == 0 {
            report.saved.extend(self.complete(world)?);
        }
        report.blocked_s = t0.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Waits for and completes a pending save (the end of a run, or before
    /// the next save). Collective over `world` while a save is pending.
    pub fn finish(&mut self, world: &dyn Communicator) -> Result<SaveReport, SaveError> {
        let t0 = Instant::now();
        let saved = self.complete(world)?;
        Ok(SaveReport {
            blocked_s: t0.elapsed().as_secs_f64(),
            saved: saved.into_iter().collect(),
        })
    }

    /// Joins the pending write and completes it (see the module doc).
    fn complete(&mut self, world: &dyn Communicator) -> Result<Option<Saved>, SaveError> {
        let Some(mut p) = self.pending.take() else {
            return Ok(None);
        };
        let step = p.step;
        let written = match (p.done.take(), p.handle.take()) {
            (Some(r), _) => r,
            (None, Some(h)) => h.join().unwrap_or_else(|_| {
                Err(CkptError::Format {
                    path: ckpt::partial_dir(&self.opts.dir, step),
                    msg: "the background writer panicked".into(),
                })
            }),
            (None, None) => Err(CkptError::Format {
                path: ckpt::partial_dir(&self.opts.dir, step),
                msg: "the save was never written".into(),
            }),
        };
        let write_s = written.as_ref().map_or(0.0, |(_, s)| *s);
        self.agree(
            world,
            step,
            written
                .map(|_| ())
                .map_err(|e| SaveError::Local { step, source: e }),
        )?;
        let done = if self.rank == 0 {
            ckpt::complete(&self.opts.dir, p.manifest, self.world_size).and_then(|path| {
                let bytes = ckpt::read_manifest(&path)?.bytes();
                // The save is complete: a failed clean-up is a warning.
                if let Some(keep) = self.opts.keep
                    && let Err(e) = ckpt::prune(&self.opts.dir, keep)
                {
                    eprintln!("warning: --keep {keep}: {e}");
                }
                Ok(bytes)
            })
        } else {
            Ok(0)
        };
        let bytes = *done.as_ref().unwrap_or(&0);
        self.agree(
            world,
            step,
            done.map(|_| ())
                .map_err(|e| SaveError::Local { step, source: e }),
        )?;
        let bytes = sum(world, bytes as f64)? as u64;
        Ok(Some(Saved {
            step,
            bytes,
            seconds: p.started.elapsed().as_secs_f64(),
            write_s,
        }))
    }

    /// Every rank learns whether every rank's `mine` succeeded; a rank's
    /// own error is printed by it, and all return [`SaveError::Failed`].
    fn agree(
        &self,
        world: &dyn Communicator,
        step: u64,
        mine: Result<(), SaveError>,
    ) -> Result<(), SaveError> {
        let failed = mine.is_err();
        if let Err(e) = &mine {
            eprintln!("error: rank {}: {e}", self.rank);
        }
        let n = sum(world, if failed { 1.0 } else { 0.0 })?;
        if n > 0 {
            if self.rank == 0 {
                let _ = ckpt::abandon(&self.opts.dir, step);
            }
            return Err(SaveError::Failed {
                step,
                failed: n,
                previous: latest_complete(&self.opts.dir),
            });
        }
        Ok(())
    }
}

/// The step of the latest complete checkpoint in `dir`, if any.
pub fn latest_complete(dir: &Path) -> Option<u64> {
    ckpt::list(dir)
        .ok()?
        .iter()
        .rev()
        .find(|l| l.status == ckpt::Status::Complete)
        .map(|l| l.step)
}

/// The sum over `world` of one number per rank.
fn sum(world: &dyn Communicator, x: f64) -> Result<usize, SaveError> {
    if world.size() == 1 {
        return Ok(x as usize);
    }
    let t = world.all_reduce(&Tensor::from_slice(&[x]))?;
    Ok(t.f_double_value(&[0])? as usize)
}

/// Stops this process with SIGSTOP (the watchdog test's hung rank); it goes
/// on if it gets SIGCONT.
pub fn stop_self() {
    let pid = std::process::id().to_string();
    let _ = std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status();
}

/// Ends this process with SIGKILL (the fault tests' crashes).
pub fn kill_self() -> ! {
    let pid = std::process::id().to_string();
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &pid])
        .status();
    // `kill` is not on PATH: abort is the next hardest stop.
    std::process::abort()
}
