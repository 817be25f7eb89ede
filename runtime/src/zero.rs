//! The data-parallel optimizer step: gradients averaged over the dp group in
//! buckets, clipped by the global norm, and AdamW applied — with optimizer
//! state and parameters either replicated on every dp rank or sharded over
//! the dp group (ZeRO-1, ZeRO-3).
//!
//! A [`DpOptimizer`] lays one rank's parameters out as flat **buckets**
//! (consecutive parameters up to [`OptimConfig::bucket_bytes`], each bucket
//! padded with zeros to a multiple of the dp size). Each step:
//!
//! - [`ZeroStage::Off`]: one all-reduce per bucket, copied back into the
//!   parameters' gradients; clipping and AdamW on whole parameters.
//! - [`ZeroStage::One`]: one reduce-scatter per bucket; dp rank `r` owns the
//!   `r`-th contiguous slice of every bucket and keeps f32 master weights and
//!   moments for those slices only; AdamW runs on the owned slices, and one
//!   all-gather per bucket writes the updated weights back into the
//!   parameters.
//! - [`ZeroStage::Three`]: as ZeRO-1, but between steps the parameters hold
//!   no data (empty tensors): [`DpOptimizer::gather_params`] all-gathers them
//!   from the owned slices before the step's forward, they stay gathered for
//!   the whole step (forward and backward of every micro-batch), and
//!   [`DpOptimizer::step`] releases them again after the update.
//!
//! - [`ZeroStage::Two`] and [`ZeroStage::Three`] on a stage that names its
//!   blocks ([`crate::program::StageModule::blocks`], the transformer
//!   layers): the buckets are cut at block boundaries and each block's
//!   gradients are **streamed** ([`ZeroHooks`], the tape's
//!   [`BlockHooks`]): as soon as a micro-batch's backward has left a
//!   block, its gradients are completed over tp, reduce-scattered over dp
//!   bucket by bucket and added to this rank's slice, and the full
//!   gradients are dropped (they never reach `.grad()`). Under ZeRO-3 a
//!   block's parameters are all-gathered just before its forward and freed
//!   after it, and gathered again just before its backward (and its
//!   recompute) and freed after: one layer's weights are whole at a time.
//!   The saved graph of a layer kept whole references the parameters
//!   themselves ([`crate::ops::save_weights_whole`]), so swapping their data
//!   out frees it and swapping it back in restores what backward reads.
//!   The parameters outside blocks
//!   (embedding, head) are gathered for the whole step and their gradients
//!   reduce-scattered at the step, as under ZeRO-1.
//!
//! Gradients are summed over dp (each rank's loss is already divided by the
//! global token count, so the sum is the average). The global gradient norm
//! (computed every step, reported in [`StepStats`] and used for clipping when
//! it is on) is the norm of the model's gradient after that average, each element counted
//! once: a tp-replicated parameter (no `tp_dim`) is counted on tp rank 0
//! only, a copied block on the first of its ranks (`ParamSpec::counted_on`),
//! dp replicas are counted once (replicated stages: the sum of squares
//! is all-reduced over tp and pp only; sharded stages: each dp rank counts its
//! own slice and the sum is all-reduced over dp, tp and pp).
//!
//! This module owns the flat layout, the dp collectives of the step and the
//! sharded optimizer state. The update arithmetic is [`crate::optim`]'s; tp
//! completion of gradients is [`crate::exec`]'s and must have run before
//! [`DpOptimizer::step`].

use crate::comm::{Communicator, Groups};
use crate::exec::{BlockHooks, ExecError, Param, ParamSpec, complete_tp_grad};
use crate::optim::{self, AdamW, AdamWState, LrSchedule, NormShare, OptimError};
use std::cell::RefCell;
use tch::{Device, Kind, Tensor};

mod prefetch;
mod state;
pub use state::kind_of;

/// 25 MiB, the default bucket size (PyTorch DDP's).
pub const DEFAULT_BUCKET_BYTES: usize = 25 * 1024 * 1024;

/// How parameters and optimizer state are spread over the dp group (the
/// plan's ZeRO stage). Without blocks [`ZeroStage::Two`] runs as
/// [`ZeroStage::One`] (gradients whole until the step's reduce-scatter).
pub use autopart_vocab::ZeroStage;

/// The optimizer of a training run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OptimConfig {
    pub adamw: AdamW,
    pub lr: LrSchedule,
    /// Clip the global gradient norm to this; `None` does not clip.
    pub max_norm: Option<f64>,
    /// Most bytes of gradient in one bucket; a parameter larger than this
    /// gets a bucket of its own.
    pub bucket_bytes: usize,
    pub zero: ZeroStage,
    /// The kind gradients are summed in over dp (`Kind::Float`, or
    /// `Kind::BFloat16` to halve the bytes): each bucket is flattened to it
    /// for its all-reduce or reduce-scatter, and the sums are f32 from
    /// there on (ZeRO's slices, the norm, the update).
    pub reduce: Kind,
}

impl OptimConfig {
    /// AdamW at `lr` with default buckets, no clipping and no sharding.
    pub fn new(adamw: AdamW, lr: LrSchedule) -> Self {
        Self {
            adamw,
            lr,
            max_norm: None,
            bucket_bytes: DEFAULT_BUCKET_BYTES,
            zero: ZeroStage::Off,
            reduce: Kind::Float,
        }
    }

    /// Checks every hyper-parameter.
    pub fn validate(&self) -> Result<(), OptimError> {
        self.adamw.validate()?;
        self.lr.validate()?;
        if let Some(max) = self.max_norm {
            optim::check_max_norm(max)?;
        }
        if self.bucket_bytes == 0 {
            return Err(OptimError::Invalid("bucket_bytes must be positive".into()));
        }
        if !matches!(self.reduce, Kind::Float | Kind::BFloat16 | Kind::Half) {
            return Err(OptimError::Invalid(format!(
                "gradients are reduced in f32, bf16 or f16, not {:?}",
                self.reduce
            )));
        }
        Ok(())
    }
}

/// One parameter's place in a bucket.
#[derive(Clone, Debug, PartialEq)]
struct Slot {
    param: usize,
    offset: i64,
    numel: i64,
    shape: Vec<i64>,
    kind: Kind,
    device: Device,
    share: NormShare,
}

/// Consecutive parameters flattened into one buffer of `len` elements (a
/// multiple of the dp size; the tail past the last slot is zero padding).
#[derive(Clone, Debug, PartialEq)]
struct Bucket {
    slots: Vec<Slot>,
    len: i64,
}

impl Bucket {
    /// The elements `[lo, hi)` dp rank `rank` of `dp` owns.
    fn owned(&self, rank: usize, dp: usize) -> (i64, i64) {
        let n = self.len / dp as i64;
        (rank as i64 * n, (rank as i64 + 1) * n)
    }

    /// `tensors` (one per slot, parameter-shaped) flattened into the bucket,
    /// in `kind`, zero-padded.
    fn flatten_as(&self, tensors: &[Tensor], kind: Kind) -> Result<Tensor, OptimError> {
        let mut parts = Vec::with_capacity(self.slots.len() + 1);
        let mut used = 0;
        let mut device = Device::Cpu;
        for (slot, t) in self.slots.iter().zip(tensors) {
            parts.push(t.f_detach()?.f_reshape([-1])?.f_to_kind(kind)?);
            used += slot.numel;
            device = slot.device;
        }
        if self.len > used {
            parts.push(Tensor::f_zeros([self.len - used], (kind, device))?);
        }
        Ok(Tensor::f_cat(&parts, 0)?)
    }

    /// [`Self::flatten_as`] in f32.
    fn flatten(&self, tensors: &[Tensor]) -> Result<Tensor, OptimError> {
        self.flatten_as(tensors, Kind::Float)
    }

    /// The kind the bucket's weights travel in when gathered: the
    /// parameters' own when they share one (bf16 weights move as bf16),
    /// else f32.
    fn weight_kind(&self) -> Kind {
        match self.slots.first() {
            Some(f) if self.slots.iter().all(|s| s.kind == f.kind) => f.kind,
            _ => Kind::Float,
        }
    }

    /// Copies each slot's part of `flat` into `targets` (one per slot), in place.
    fn unflatten_into(&self, flat: &Tensor, targets: &[Tensor]) -> Result<(), OptimError> {
        tch::no_grad(|| -> Result<(), OptimError> {
            for (slot, t) in self.slots.iter().zip(targets) {
                let part = flat.f_narrow(0, slot.offset, slot.numel)?;
                t.detach().f_copy_(&part.f_view(slot.shape.as_slice())?)?;
            }
            Ok(())
        })
    }
}

/// Statistics of one optimizer step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    pub lr: f64,
    /// The global gradient norm before clipping (computed whether or not
    /// clipping is on).
    pub grad_norm: f64,
    /// The update was not applied: the gradient norm (or the loss, see
    /// [`DpOptimizer::skip`]) was not finite. Parameters and optimizer
    /// state are as before the step.
    pub skipped: bool,
    /// f16 training: the step was skipped because the loss-scaled gradients
    /// overflowed at a scale above 1, and the scale was halved (routine
    /// while the scaler finds its level, not a divergence).
    pub overflowed: bool,
}

/// AdamW over one rank's parameters with data-parallel gradient averaging
/// and, optionally, ZeRO sharding over the dp group.
#[derive(Debug)]
pub struct DpOptimizer {
    cfg: OptimConfig,
    buckets: Vec<Bucket>,
    n_params: usize,
    dp_rank: usize,
    dp_size: usize,
    tp_rank: usize,
    tp_size: usize,
    /// Replicated: one moment per parameter. Sharded: one per bucket slice.
    state: AdamWState,
    /// Sharded stages: this rank's f32 slice of each bucket's weights.
    master: Vec<Tensor>,
    /// Streamed gradients (ZeRO-2/3 with blocks): each block's buckets.
    block_buckets: Vec<Vec<usize>>,
    /// Whether each bucket's gradients are streamed.
    streamed: Vec<bool>,
    /// Whether each parameter's gradients are streamed (it is in a block).
    streamed_params: Vec<bool>,
    /// Replicated (ZeRO 0): the f32 master copy of each parameter that is
    /// not f32 (bf16 / f16 training), `None` for f32 parameters, which are
    /// their own master. Empty under ZeRO 1-3 (`master` holds the slices).
    replica_master: Vec<Option<Tensor>>,
    /// f16 training: the dynamic loss scale.
    scaler: Option<LossScaler>,
    /// Streamed buckets: this rank's slice of the step's summed gradient so far.
    acc: RefCell<Vec<Option<Tensor>>>,
    /// ZeRO-3 with blocks: how many in-flight forwards hold each block gathered.
    held: RefCell<Vec<usize>>,
    /// ZeRO-3 with blocks: the thread that gathers the next block ahead.
    prefetcher: Option<prefetch::Prefetcher>,
}

/// Consecutive parameters in buckets of at most `bucket_bytes`, a bucket
/// closed wherever `group` changes (so that no bucket spans two blocks).
fn bucket_layout(
    params: &[Param],
    tp_rank: usize,
    dp: usize,
    bucket_bytes: usize,
    uncounted: &[String],
    group: &[Option<usize>],
) -> Vec<Bucket> {
    let mut buckets = Vec::new();
    let mut slots: Vec<Slot> = Vec::new();
    let (mut used, mut bytes) = (0i64, 0usize);
    let close = |slots: &mut Vec<Slot>, used: i64, buckets: &mut Vec<Bucket>| {
        if !slots.is_empty() {
            let len = (used + dp as i64 - 1) / dp as i64 * dp as i64;
            buckets.push(Bucket {
                slots: std::mem::take(slots),
                len,
            });
        }
    };
    for (idx, p) in params.iter().enumerate() {
        let t = &p.tensor;
        let numel = t.numel() as i64;
        let size = t.numel() * t.kind().elt_size_in_bytes();
        let regroup = slots
            .last()
            .is_some_and(|s| group.get(s.param) != group.get(idx));
        if !slots.is_empty() && (bytes + size > bucket_bytes || regroup) {
            close(&mut slots, used, &mut buckets);
            (used, bytes) = (0, 0);
        }
        let share = if p.spec.counted_on(tp_rank) && !uncounted.contains(&p.spec.name) {
            NormShare::Counted
        } else {
            NormShare::Replica
        };
        slots.push(Slot {
            param: idx,
            offset: used,
            numel,
            shape: t.size(),
            kind: t.kind(),
            device: t.device(),
            share,
        });
        used += numel;
        bytes += size;
    }
    close(&mut slots, used, &mut buckets);
    buckets
}

impl DpOptimizer {
    /// The optimizer of `params` (this rank's, fully materialised, identical
    /// on every dp rank). Under [`ZeroStage::Three`] it takes the owned
    /// slices and releases the parameters' data.
    pub fn new(cfg: OptimConfig, params: &mut [Param], g: &Groups<'_>) -> Result<Self, OptimError> {
        Self::with_uncounted(cfg, params, g, &[])
    }

    /// [`DpOptimizer::new`] where the parameters named in `uncounted` are
    /// copies another stage counts (tied weights on the last pipeline
    /// stage): left out of the gradient norm and of checkpoints.
    pub fn with_uncounted(
        cfg: OptimConfig,
        params: &mut [Param],
        g: &Groups<'_>,
        uncounted: &[String],
    ) -> Result<Self, OptimError> {
        Self::for_stage(cfg, params, g, uncounted, &[])
    }

    /// [`DpOptimizer::with_uncounted`] for a stage whose `blocks` (each
    /// block's parameter indices, [`crate::program::StageModule::blocks`])
    /// stream their gradients under ZeRO-2 and ZeRO-3 ([`Self::hooks`]).
    pub fn for_stage(
        cfg: OptimConfig,
        params: &mut [Param],
        g: &Groups<'_>,
        uncounted: &[String],
        blocks: &[Vec<usize>],
    ) -> Result<Self, OptimError> {
        cfg.validate()?;
        let (dp_rank, dp_size) = (g.dp.rank(), g.dp.size());
        let streaming = matches!(cfg.zero, ZeroStage::Two | ZeroStage::Three) && !blocks.is_empty();
        let mut group: Vec<Option<usize>> = vec![None; params.len()];
        if streaming {
            for (b, ps) in blocks.iter().enumerate() {
                for &p in ps {
                    match group.get_mut(p) {
                        Some(slot @ None) => *slot = Some(b),
                        _ => {
                            return Err(OptimError::Invalid(format!(
                                "block {b} names parameter {p}, which is not one of the stage's {} or is in another block",
                                params.len()
                            )));
                        }
                    }
                }
            }
        }
        let buckets = bucket_layout(
            params,
            g.tp.rank(),
            dp_size,
            cfg.bucket_bytes,
            uncounted,
            &group,
        );
        let mut block_buckets = vec![Vec::new(); if streaming { blocks.len() } else { 0 }];
        let mut streamed = vec![false; buckets.len()];
        for (k, b) in buckets.iter().enumerate() {
            if let Some(blk) = b.slots.first().and_then(|s| group[s.param]) {
                block_buckets[blk].push(k);
                streamed[k] = true;
            }
        }
        let n_blocks = block_buckets.len();
        let streamed_params = group.iter().map(Option::is_some).collect();
        let mut master = Vec::new();
        let mut replica_master = Vec::new();
        let state = match cfg.zero {
            ZeroStage::Off => {
                for p in params.iter() {
                    let t = &p.tensor;
                    replica_master.push(if t.kind() == Kind::Float {
                        None
                    } else {
                        Some(t.f_detach()?.f_to_dtype(Kind::Float, false, true)?)
                    });
                }
                let tensors: Vec<Tensor> = params.iter().map(|p| p.tensor.detach()).collect();
                AdamWState::new(&tensors)?
            }
            ZeroStage::One | ZeroStage::Two | ZeroStage::Three => {
                for b in &buckets {
                    let ts: Vec<Tensor> = b
                        .slots
                        .iter()
                        .map(|s| params[s.param].tensor.detach())
                        .collect();
                    let (lo, hi) = b.owned(dp_rank, dp_size);
                    // A copy: a view of the slice would keep the whole flat
                    // bucket alive, dp times the memory ZeRO promises.
                    master.push(b.flatten(&ts)?.f_narrow(0, lo, hi - lo)?.f_detach_copy()?);
                }
                AdamWState::new(&master)?
            }
        };
        let opt = Self {
            cfg,
            buckets,
            n_params: params.len(),
            dp_rank,
            dp_size,
            tp_rank: g.tp.rank(),
            tp_size: g.tp.size(),
            state,
            master,
            replica_master,
            scaler: params
                .iter()
                .any(|p| p.tensor.kind() == Kind::Half)
                .then(LossScaler::default),
            acc: RefCell::new((0..streamed.len()).map(|_| None).collect()),
            block_buckets,
            streamed,
            streamed_params,
            held: RefCell::new(vec![0; n_blocks]),
            prefetcher: None,
        };
        if cfg.zero == ZeroStage::Three {
            opt.release_params(params)?;
        }
        Ok(opt)
    }

    pub fn config(&self) -> &OptimConfig {
        &self.cfg
    }

    /// Under ZeRO-3 with blocks and dp > 1, gathers each block's weights one
    /// block ahead on a thread of its own over `dp` (a duplicate of the dp
    /// group, movable to that thread: MPI with `MPI_THREAD_MULTIPLE`).
    /// Returns whether prefetching is on; otherwise `dp` is dropped.
    pub fn prefetch_over(&mut self, dp: crate::comm::SendableComm) -> Result<bool, OptimError> {
        if self.cfg.zero != ZeroStage::Three || self.block_buckets.len() < 2 || self.dp_size < 2 {
            return Ok(false);
        }
        let p = prefetch::Prefetcher::start(dp).map_err(|e| {
            OptimError::Invalid(format!("starting the ZeRO-3 prefetch thread: {e}"))
        })?;
        self.prefetcher = Some(p);
        Ok(true)
    }

    /// Whether the next block's weights are gathered ahead.
    pub fn prefetching(&self) -> bool {
        self.prefetcher.is_some()
    }

    /// With prefetching on: how many gathers ahead were used (the block
    /// acquired next was the one gathered) and how many wasted.
    pub fn prefetch_counts(&self) -> Option<(u64, u64)> {
        self.prefetcher.as_ref().map(prefetch::Prefetcher::counts)
    }

    /// Waits for a prefetch still in flight and drops it (the end of a step).
    fn drain_prefetch(&self) -> Result<(), OptimError> {
        if let Some(p) = &self.prefetcher {
            p.take(usize::MAX).map_err(OptimError::Invalid)?;
        }
        Ok(())
    }

    /// Optimizer steps taken so far.
    pub fn steps(&self) -> u64 {
        self.state.steps
    }

    /// Number of buckets (one dp collective each per step).
    pub fn n_buckets(&self) -> usize {
        self.buckets.len()
    }

    /// Under [`ZeroStage::Three`], all-gathers every parameter from the dp
    /// ranks' slices into a fresh leaf that requires grad; the parameters
    /// then stay gathered until [`Self::step`]. A no-op for the other
    /// stages, whose parameters are always whole. Collective over dp.
    pub fn gather_params(
        &self,
        params: &mut [Param],
        dp: &dyn Communicator,
    ) -> Result<(), OptimError> {
        self.gather(params, dp, false)
    }

    /// [`Self::gather_params`] before a training step run with
    /// [`Self::hooks`]: the blocks' parameters are left to the hooks, which
    /// gather each block just before it runs.
    pub fn gather_for_step(
        &self,
        params: &mut [Param],
        dp: &dyn Communicator,
    ) -> Result<(), OptimError> {
        self.gather(params, dp, true)
    }

    fn gather(
        &self,
        params: &mut [Param],
        dp: &dyn Communicator,
        skip_streamed: bool,
    ) -> Result<(), OptimError> {
        if self.cfg.zero != ZeroStage::Three {
            return Ok(());
        }
        self.check_len(params)?;
        for (k, (b, m)) in self.buckets.iter().zip(&self.master).enumerate() {
            if skip_streamed && self.streamed[k] {
                continue;
            }
            for (param, t) in gather_bucket(b, m, self.dp_size, dp)? {
                params[param].tensor = t.set_requires_grad(true);
            }
        }
        Ok(())
    }

    /// Under [`ZeroStage::Three`], releases parameters gathered by
    /// [`Self::gather_params`] without an update (after a forward-only
    /// pass); a no-op for the other stages. Local: no communication.
    pub fn release_gathered(&self, params: &mut [Param]) -> Result<(), OptimError> {
        if self.cfg.zero != ZeroStage::Three {
            return Ok(());
        }
        self.check_len(params)?;
        self.release_params(params)
    }

    fn release_params(&self, params: &mut [Param]) -> Result<(), OptimError> {
        for b in &self.buckets {
            for s in &b.slots {
                let empty = Tensor::f_empty([0], (s.kind, s.device))?;
                params[s.param].tensor = empty.set_requires_grad(true);
            }
        }
        Ok(())
    }

    fn check_len(&self, params: &[Param]) -> Result<(), OptimError> {
        if params.len() != self.n_params {
            return Err(OptimError::LengthMismatch {
                what: "parameters",
                expected: self.n_params,
                got: params.len(),
            });
        }
        Ok(())
    }

    /// Every slot's parameter gradient, checked against the layout.
    fn grads(&self, params: &[Param]) -> Result<Vec<Vec<Tensor>>, OptimError> {
        self.check_len(params)?;
        self.buckets
            .iter()
            .zip(&self.streamed)
            .map(|(b, &streamed)| {
                if streamed {
                    // Already reduced into `acc` during backward.
                    return Ok(Vec::new());
                }
                b.slots
                    .iter()
                    .map(|s| {
                        let p = &params[s.param].tensor;
                        if p.size() != s.shape {
                            return Err(OptimError::ShapeMismatch {
                                what: "parameter (not gathered?)",
                                idx: s.param,
                                expected: s.shape.clone(),
                                got: p.size(),
                            });
                        }
                        let g = p.grad();
                        if !g.defined() {
                            return Err(OptimError::UndefinedGrad { idx: s.param });
                        }
                        Ok(g)
                    })
                    .collect()
            })
            .collect()
    }

    /// One optimizer step on `params`, whose gradients hold this rank's
    /// share of the batch, already complete over tp: averages them over dp,
    /// clips, applies AdamW at the schedule's rate and clears the gradients
    /// (under ZeRO-3, releases the parameters). Collective over dp, tp and pp.
    pub fn step(&mut self, params: &mut [Param], g: &Groups<'_>) -> Result<StepStats, OptimError> {
        let lr = self.cfg.lr.lr(self.state.steps);
        let scale = self.loss_scale();
        let grads = self.grads(params)?;
        let (grad_norm, applied) = match self.cfg.zero {
            ZeroStage::Off => self.step_replicated(params, grads, g, lr)?,
            ZeroStage::One | ZeroStage::Two | ZeroStage::Three => {
                self.step_sharded(params, grads, g, lr)?
            }
        };
        self.clear(params)?;
        Ok(StepStats {
            lr,
            grad_norm,
            skipped: !applied,
            overflowed: !applied && self.scaler.is_some() && scale > 1.0,
        })
    }

    /// Ends a step without an update (a non-finite loss): clears the
    /// gradients (under ZeRO-3, releases the parameters); parameters and
    /// optimizer state stay as they were. Not collective.
    pub fn skip(&mut self, params: &mut [Param]) -> Result<StepStats, OptimError> {
        self.check_len(params)?;
        let lr = self.cfg.lr.lr(self.state.steps);
        self.clear(params)?;
        Ok(StepStats {
            lr,
            grad_norm: f64::NAN,
            skipped: true,
            overflowed: false,
        })
    }

    fn clear(&self, params: &mut [Param]) -> Result<(), OptimError> {
        self.drain_prefetch()?;
        for a in self.acc.borrow_mut().iter_mut() {
            *a = None;
        }
        if self.cfg.zero == ZeroStage::Three {
            self.release_params(params)?;
        } else {
            for p in params.iter_mut() {
                p.zero_grad();
            }
        }
        Ok(())
    }

    fn step_replicated(
        &mut self,
        params: &mut [Param],
        grads: Vec<Vec<Tensor>>,
        g: &Groups<'_>,
        lr: f64,
    ) -> Result<(f64, bool), OptimError> {
        if self.dp_size > 1 {
            for (b, gs) in self.buckets.iter().zip(&grads) {
                let sum = g.dp.all_reduce(&b.flatten_as(gs, self.cfg.reduce)?)?;
                b.unflatten_into(&sum, gs)?;
            }
        }
        // Back to parameter order for the per-parameter update.
        let mut by_param: Vec<Option<(Tensor, NormShare)>> =
            (0..self.n_params).map(|_| None).collect();
        for (b, gs) in self.buckets.iter().zip(grads) {
            for (s, gr) in b.slots.iter().zip(gs) {
                by_param[s.param] = Some((gr, s.share));
            }
        }
        let (mut grads, shares): (Vec<Tensor>, Vec<NormShare>) =
            by_param.into_iter().flatten().unzip();
        if self.scaler.is_some() {
            // f16 gradients are unscaled in f32 (their true values may be
            // below f16's range).
            for gr in grads.iter_mut() {
                *gr = gr.f_to_kind(Kind::Float)?;
            }
        }
        let mut local = 0.0;
        for (gr, share) in grads.iter().zip(&shares) {
            if *share == NormShare::Counted {
                local += optim::sum_of_squares(gr)?;
            }
        }
        let norm = optim::sum_over(local, &[g.tp, g.pp])?.sqrt();
        let Some(norm) = self.unscale_and_clip(&mut grads, norm)? else {
            return Ok((norm / self.loss_scale(), false));
        };
        let mut tensors: Vec<Tensor> = params
            .iter()
            .zip(&self.replica_master)
            .map(|(p, m)| m.as_ref().unwrap_or(&p.tensor).shallow_clone())
            .collect();
        self.state.step(&self.cfg.adamw, &mut tensors, &grads, lr)?;
        tch::no_grad(|| -> Result<(), OptimError> {
            for (p, m) in params.iter().zip(&self.replica_master) {
                if let Some(m) = m {
                    p.tensor.detach().f_copy_(m)?;
                }
            }
            Ok(())
        })?;
        Ok((norm, true))
    }

    /// The loss scale the step's backward ran under: the dynamic scale in
    /// f16 training, else 1.
    pub fn loss_scale(&self) -> f64 {
        self.scaler.as_ref().map_or(1.0, |s| s.scale)
    }

    /// f16 training's loss scaler, `None` otherwise.
    pub fn scaler(&self) -> Option<&LossScaler> {
        self.scaler.as_ref()
    }

    /// Sets the loss scaler's state (a resumed run); an error when this
    /// optimizer does not scale the loss.
    pub fn set_scaler(&mut self, state: LossScaler) -> Result<(), OptimError> {
        match &mut self.scaler {
            Some(s) => {
                *s = state;
                Ok(())
            }
            None => Err(OptimError::Invalid(
                "a loss scale was given, but only f16 training scales the loss".into(),
            )),
        }
    }

    /// From the global norm of the (loss-scaled) gradients: `None` when it
    /// is not finite (the step is skipped; under f16 the scale backs off),
    /// else the true norm, with `grads` unscaled and clipped in place in one
    /// multiplication.
    fn unscale_and_clip(
        &mut self,
        grads: &mut [Tensor],
        scaled_norm: f64,
    ) -> Result<Option<f64>, OptimError> {
        let scale = self.loss_scale();
        let finite = scaled_norm.is_finite();
        if let Some(s) = &mut self.scaler {
            s.update(finite);
        }
        if !finite {
            return Ok(None);
        }
        let norm = scaled_norm / scale;
        let mut coef = 1.0 / scale;
        if let Some(max) = self.cfg.max_norm {
            coef *= (max / (norm + 1e-6)).min(1.0);
        }
        if coef != 1.0 {
            tch::no_grad(|| -> Result<(), OptimError> {
                for gr in grads.iter_mut() {
                    let _ = gr.f_mul_scalar_(coef)?;
                }
                Ok(())
            })?;
        }
        Ok(Some(norm))
    }

    fn step_sharded(
        &mut self,
        params: &mut [Param],
        grads: Vec<Vec<Tensor>>,
        g: &Groups<'_>,
        lr: f64,
    ) -> Result<(f64, bool), OptimError> {
        let mut shards = Vec::with_capacity(self.buckets.len());
        let mut acc = self.acc.borrow_mut();
        for (k, (b, gs)) in self.buckets.iter().zip(&grads).enumerate() {
            if self.streamed[k] {
                shards.push(match acc[k].take() {
                    Some(a) => a,
                    // No micro-batch reached the block: a zero gradient.
                    None => {
                        let device = b.slots.first().map_or(Device::Cpu, |s| s.device);
                        Tensor::f_zeros([b.len / self.dp_size as i64], (Kind::Float, device))?
                    }
                });
                continue;
            }
            shards.push(reduce_bucket(b, gs, self.cfg.reduce, self.dp_size, g.dp)?);
        }
        drop(acc);
        let mut local = 0.0;
        for (b, shard) in self.buckets.iter().zip(&shards) {
            let (lo, hi) = b.owned(self.dp_rank, self.dp_size);
            for s in b.slots.iter().filter(|s| s.share == NormShare::Counted) {
                let (start, end) = (s.offset.max(lo), (s.offset + s.numel).min(hi));
                if start < end {
                    local += optim::sum_of_squares(&shard.f_narrow(0, start - lo, end - start)?)?;
                }
            }
        }
        let norm = optim::sum_over(local, &[g.dp, g.tp, g.pp])?.sqrt();
        let Some(norm) = self.unscale_and_clip(&mut shards, norm)? else {
            return Ok((norm / self.loss_scale(), false));
        };
        self.state
            .step(&self.cfg.adamw, &mut self.master, &shards, lr)?;
        if matches!(self.cfg.zero, ZeroStage::One | ZeroStage::Two) {
            for (b, m) in self.buckets.iter().zip(&self.master) {
                // The updated weights travel in their own kind (bf16: half the bytes).
                let m = m.f_to_kind(b.weight_kind())?;
                let full = if self.dp_size > 1 {
                    g.dp.all_gather(&m, 0)?
                } else {
                    m
                };
                let targets: Vec<Tensor> = b
                    .slots
                    .iter()
                    .map(|s| params[s.param].tensor.shallow_clone())
                    .collect();
                b.unflatten_into(&full, &targets)?;
            }
        }
        Ok((norm, true))
    }
}

/// The [`BlockHooks`] of one training step under ZeRO-2/3 with blocks
/// ([`DpOptimizer::hooks`]): stream each block's gradients into the
/// optimizer's slices and, under ZeRO-3, gather and free each block's
/// parameters around it.
pub struct ZeroHooks<'o> {
    opt: &'o DpOptimizer,
    /// Handles to every parameter of the stage (the same tensors).
    tensors: Vec<Tensor>,
    specs: Vec<ParamSpec>,
    tp: &'o dyn Communicator,
    dp: &'o dyn Communicator,
}

impl std::fmt::Debug for ZeroHooks<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZeroHooks")
            .field("zero", &self.opt.cfg.zero)
            .field("blocks", &self.opt.block_buckets.len())
            .finish()
    }
}

impl DpOptimizer {
    /// The hooks of one training step over `params` (after
    /// [`Self::gather_for_step`]), when this optimizer streams gradients
    /// (ZeRO-2/3 built [`Self::for_stage`] with blocks); `None` otherwise.
    pub fn hooks<'o>(&'o self, params: &[Param], g: &Groups<'o>) -> Option<ZeroHooks<'o>> {
        if self.block_buckets.is_empty() {
            return None;
        }
        Some(ZeroHooks {
            opt: self,
            tensors: params.iter().map(|p| p.tensor.shallow_clone()).collect(),
            specs: params.iter().map(|p| p.spec.clone()).collect(),
            tp: g.tp,
            dp: g.dp,
        })
    }

    /// Whether parameter `param`'s gradient is streamed (never in `.grad()`).
    pub fn streams(&self, param: usize) -> bool {
        self.streamed_params.get(param).copied().unwrap_or(false)
    }
}

/// Bucket `b`'s parameters from the dp ranks' master slices (`master` is
/// this rank's): all-gathered over `dp`, cut at the slots, in each
/// parameter's shape and kind, as (parameter index, tensor).
fn gather_bucket(
    b: &Bucket,
    master: &Tensor,
    dp_size: usize,
    dp: &dyn Communicator,
) -> Result<Vec<(usize, Tensor)>, OptimError> {
    let master = master.f_to_kind(b.weight_kind())?;
    let full = if dp_size > 1 {
        dp.all_gather(&master, 0)?
    } else {
        master
    };
    b.slots
        .iter()
        .map(|s| {
            let t = full
                .f_narrow(0, s.offset, s.numel)?
                .f_view(s.shape.as_slice())?
                .f_to_kind(s.kind)?
                .f_detach_copy()?;
            Ok((s.param, t))
        })
        .collect()
}

fn block_error(block: usize, e: impl std::fmt::Display) -> ExecError {
    ExecError::Plan(format!("block {block}: {e}"))
}

impl ZeroHooks<'_> {
    fn buckets_of(&self, block: usize) -> Result<&[usize], ExecError> {
        self.opt
            .block_buckets
            .get(block)
            .map(Vec::as_slice)
            .ok_or_else(|| block_error(block, "the optimizer has no such block"))
    }

    fn set_data(&self, param: usize, data: &Tensor) -> Result<(), ExecError> {
        let mut handle = self.tensors[param].shallow_clone();
        handle.f_set_data(data)?;
        Ok(())
    }
}

impl BlockHooks for ZeroHooks<'_> {
    fn acquire(&self, block: usize) -> Result<(), ExecError> {
        let opt = self.opt;
        if opt.cfg.zero != ZeroStage::Three {
            return Ok(());
        }
        let buckets = self.buckets_of(block)?;
        let first = {
            let mut held = opt.held.borrow_mut();
            held[block] += 1;
            held[block] == 1
        };
        if !first {
            return Ok(());
        }
        // The layer's saved graph must hold the weights themselves, so that
        // `release` frees them (ops.rs).
        crate::ops::save_weights_whole(true);
        let prefetched = match &opt.prefetcher {
            Some(p) => p.take(block).map_err(|e| block_error(block, e))?,
            None => None,
        };
        match prefetched {
            Some(ts) => {
                for (param, t) in ts {
                    self.set_data(param, &t)?;
                }
            }
            None => {
                for &k in buckets {
                    let (b, m) = (&opt.buckets[k], &opt.master[k]);
                    for (param, t) in gather_bucket(b, m, opt.dp_size, self.dp)? {
                        self.set_data(param, &t)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn prefetch(&self, block: usize) {
        let opt = self.opt;
        let Some(p) = &opt.prefetcher else {
            return;
        };
        // Not a block of this stage, or already whole: nothing to fetch.
        let held = opt.held.borrow().get(block).copied();
        if held != Some(0) || p.busy() {
            return;
        }
        let work = opt.block_buckets[block]
            .iter()
            .map(|&k| (opt.buckets[k].clone(), opt.master[k].shallow_clone()))
            .collect();
        p.submit(block, work);
    }

    fn release(&self, block: usize) -> Result<(), ExecError> {
        let opt = self.opt;
        if opt.cfg.zero != ZeroStage::Three {
            return Ok(());
        }
        let buckets = self.buckets_of(block)?;
        let last = {
            let mut held = opt.held.borrow_mut();
            if held[block] == 0 {
                return Err(block_error(block, "released more often than acquired"));
            }
            held[block] -= 1;
            held[block] == 0
        };
        if last {
            crate::ops::save_weights_whole(false);
            for &k in buckets {
                for s in &opt.buckets[k].slots {
                    self.set_data(s.param, &Tensor::f_empty([0], (s.kind, s.device))?)?;
                }
            }
        }
        Ok(())
    }

    fn params(&self, block: usize) -> Vec<Tensor> {
        let Ok(buckets) = self.buckets_of(block) else {
            return Vec::new();
        };
        buckets
            .iter()
            .flat_map(|&k| self.opt.buckets[k].slots.iter())
            .map(|s| self.tensors[s.param].shallow_clone())
            .collect()
    }

    fn streams(&self, param: usize) -> bool {
        self.opt.streams(param)
    }

    fn grads(&self, block: usize, grads: Vec<Option<Tensor>>) -> Result<(), ExecError> {
        let opt = self.opt;
        let mut grads = grads.into_iter();
        for &k in self.buckets_of(block)? {
            let b = &opt.buckets[k];
            let mut gs = Vec::with_capacity(b.slots.len());
            for s in &b.slots {
                let g = match grads.next().flatten() {
                    Some(g) => g,
                    None => Tensor::f_zeros(s.shape.as_slice(), (s.kind, s.device))?,
                };
                gs.push(complete_tp_grad(&self.specs[s.param], g, self.tp)?);
            }
            let shard = reduce_bucket(b, &gs, opt.cfg.reduce, opt.dp_size, self.dp)
                .map_err(|e| block_error(block, e))?;
            let mut acc = opt.acc.borrow_mut();
            accumulate_shard(&mut acc[k], shard)?;
        }
        Ok(())
    }
}

/// Bucket `b`'s gradients `gs` summed over dp in `kind`: this rank's f32
/// slice (reduce-scattered; the whole flat bucket on one rank).
fn reduce_bucket(
    b: &Bucket,
    gs: &[Tensor],
    kind: Kind,
    dp_size: usize,
    dp: &dyn Communicator,
) -> Result<Tensor, OptimError> {
    if dp_size == 1 {
        return b.flatten(gs);
    }
    let shard = dp.reduce_scatter(&b.flatten_as(gs, kind)?, 0)?;
    Ok(shard.f_to_kind(Kind::Float)?)
}

/// Dynamic loss scaling for f16 training, as `torch.amp.GradScaler`: the
/// loss is multiplied by `scale` before backward and the gradients divided
/// by it at the step; a step whose gradients overflow (a non-finite norm) is
/// skipped and the scale halved, and after `growth_interval` good steps in
/// a row it doubles.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossScaler {
    pub scale: f64,
    /// Good steps since the scale last changed.
    pub good_steps: u64,
    pub growth_interval: u64,
}

impl Default for LossScaler {
    /// GradScaler's defaults: 2^16, doubling after 2000 good steps.
    fn default() -> Self {
        Self {
            scale: 65536.0,
            good_steps: 0,
            growth_interval: 2000,
        }
    }
}

impl LossScaler {
    /// After a step whose gradients were `finite` or not.
    fn update(&mut self, finite: bool) {
        if finite {
            self.good_steps += 1;
            if self.good_steps >= self.growth_interval {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        } else {
            // Never below one: a gradient that overflows unscaled is not
            // the scale's doing.
            self.scale = (self.scale / 2.0).max(1.0);
            self.good_steps = 0;
        }
    }
}

fn accumulate_shard(slot: &mut Option<Tensor>, shard: Tensor) -> Result<(), ExecError> {
    match slot {
        Some(a) => {
            let _ = a.f_add_(&shard)?;
        }
        None => *slot = Some(shard),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::{MeshComms, SoloComm};
    use crate::exec::{Init, ParamSpec};

    fn params(shapes: &[&[i64]]) -> Vec<Param> {
        shapes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                ParamSpec::replicated(i, s, Init::Normal { std: 1.0 })
                    .materialise(3, 0, 1)
                    .expect("init")
            })
            .collect()
    }

    #[test]
    fn buckets_cover_every_parameter_once_padded_to_the_dp_size() {
        let ps = params(&[&[5, 3], &[7], &[2, 2], &[100]]);
        // 64 bytes: 16 f32 per bucket; the 100-element parameter gets its own.
        let buckets = bucket_layout(&ps, 0, 4, 64, &[], &[None; 4]);
        let layout = |buckets: &[Bucket]| -> Vec<Vec<(usize, i64)>> {
            buckets
                .iter()
                .map(|b| b.slots.iter().map(|s| (s.param, s.offset)).collect())
                .collect()
        };
        assert_eq!(
            layout(&buckets),
            vec![vec![(0, 0)], vec![(1, 0), (2, 7)], vec![(3, 0)]]
        );
        assert_eq!(
            buckets.iter().map(|b| b.len).collect::<Vec<_>>(),
            vec![16, 12, 100]
        );
        assert_eq!(buckets[0].owned(3, 4), (12, 16));
        // Blocks cut buckets: parameters 1 and 2 in different blocks.
        let cut = bucket_layout(&ps, 0, 4, 64, &[], &[None, Some(0), Some(1), Some(1)]);
        assert_eq!(
            layout(&cut),
            vec![vec![(0, 0)], vec![(1, 0)], vec![(2, 0)], vec![(3, 0)]]
        );
    }

    #[test]
    fn every_stage_matches_plain_adamw_on_one_rank() {
        let solo = MeshComms::solo();
        let g = Groups::of(&solo);
        let lr = LrSchedule {
            peak_lr: 0.1,
            warmup_steps: 1,
            total_steps: 3,
            min_lr: 0.01,
        };
        let shapes: [&[i64]; 3] = [&[5, 3], &[7], &[2, 2]];
        let run = |zero: Option<ZeroStage>| -> Vec<Tensor> {
            let mut ps = params(&shapes);
            let cfg = OptimConfig {
                max_norm: Some(0.5),
                bucket_bytes: 40,
                zero: zero.unwrap_or(ZeroStage::Off),
                ..OptimConfig::new(AdamW::default(), lr)
            };
            let mut opt = DpOptimizer::new(cfg, &mut ps, &g).expect("optimizer");
            let mut plain =
                AdamWState::new(&ps.iter().map(|p| p.tensor.detach()).collect::<Vec<_>>())
                    .expect("state");
            for step in 0..3 {
                opt.gather_params(&mut ps, g.dp).expect("gather");
                for p in &ps {
                    p.tensor.square().sum(Kind::Float).backward();
                }
                match zero {
                    Some(_) => {
                        opt.step(&mut ps, &g).expect("step");
                    }
                    None => {
                        let mut grads: Vec<Tensor> = ps.iter().map(|p| p.tensor.grad()).collect();
                        let shares = vec![NormShare::Counted; grads.len()];
                        optim::clip_grad_norm(&mut grads, &shares, 0.5, &SoloComm).expect("clip");
                        let mut ts: Vec<Tensor> =
                            ps.iter().map(|p| p.tensor.shallow_clone()).collect();
                        plain
                            .step(&AdamW::default(), &mut ts, &grads, lr.lr(step))
                            .expect("adamw");
                        ps.iter_mut().for_each(Param::zero_grad);
                    }
                }
            }
            opt.gather_params(&mut ps, g.dp).expect("gather");
            ps.iter().map(|p| p.tensor.detach()).collect()
        };
        let want = run(None);
        for zero in [ZeroStage::Off, ZeroStage::One, ZeroStage::Three] {
            for (got, want) in run(Some(zero)).iter().zip(&want) {
                assert!(got.allclose(want, 1e-6, 1e-7, false), "{zero:?}");
            }
        }
        let bad = OptimConfig {
            bucket_bytes: 0,
            ..OptimConfig::new(AdamW::default(), lr)
        };
        assert!(DpOptimizer::new(bad, &mut params(&shapes), &g).is_err());
    }

    #[test]
    fn a_non_finite_gradient_skips_the_update_under_every_stage() {
        let solo = MeshComms::solo();
        let g = Groups::of(&solo);
        let lr = LrSchedule {
            peak_lr: 0.1,
            warmup_steps: 0,
            total_steps: 2,
            min_lr: 0.1,
        };
        for zero in [ZeroStage::Off, ZeroStage::One, ZeroStage::Three] {
            for clip in [None, Some(1.0)] {
                let mut ps = params(&[&[5, 3], &[7]]);
                let before: Vec<Tensor> = ps.iter().map(|p| p.tensor.detach().copy()).collect();
                let cfg = OptimConfig {
                    zero,
                    max_norm: clip,
                    ..OptimConfig::new(AdamW::default(), lr)
                };
                let mut opt = DpOptimizer::new(cfg, &mut ps, &g).expect("optimizer");
                opt.gather_params(&mut ps, g.dp).expect("gather");
                for p in &ps {
                    p.tensor.square().sum(Kind::Float).backward();
                }
                tch::no_grad(|| {
                    let _ = ps[1]
                        .tensor
                        .grad()
                        .view([-1])
                        .narrow(0, 2, 1)
                        .fill_(f64::NAN);
                });
                let stats = opt.step(&mut ps, &g).expect("step");
                assert!(
                    stats.skipped && stats.grad_norm.is_nan(),
                    "{zero:?} {clip:?}"
                );
                assert_eq!(opt.steps(), 0, "no AdamW step counted");
                opt.gather_params(&mut ps, g.dp).expect("gather");
                for (p, b) in ps.iter().zip(&before) {
                    assert!(p.tensor.detach().equal(b), "{zero:?} {clip:?}: changed");
                }
                // A finite step afterwards trains.
                for p in &ps {
                    p.tensor.square().sum(Kind::Float).backward();
                }
                let stats = opt.step(&mut ps, &g).expect("step");
                assert!(!stats.skipped && opt.steps() == 1);
                let skipped = opt.skip(&mut ps).expect("skip");
                assert!(skipped.skipped && opt.steps() == 1);
            }
        }
    }

    /// bf16 parameters: every stage keeps f32 master weights, so ZeRO 0,
    /// 1 and 3 take the same updates (the master copy's, rounded into the
    /// bf16 weights), and a learning rate too small to move a bf16 weight
    /// in one step still moves the master copy.
    #[test]
    fn bf16_weights_train_through_an_f32_master_copy_under_every_stage() {
        let solo = MeshComms::solo();
        let g = Groups::of(&solo);
        let lr = LrSchedule {
            peak_lr: 1e-4,
            warmup_steps: 0,
            total_steps: 4,
            min_lr: 1e-4,
        };
        let shapes: [&[i64]; 2] = [&[5, 3], &[7]];
        let run = |zero: ZeroStage| -> (Vec<Tensor>, Vec<Tensor>) {
            let mut ps = params(&shapes);
            for p in &mut ps {
                let data = p.tensor.detach().to_kind(Kind::BFloat16);
                p.tensor.set_data(&data);
            }
            let before: Vec<Tensor> = ps.iter().map(|p| p.tensor.detach().copy()).collect();
            let cfg = OptimConfig {
                zero,
                ..OptimConfig::new(AdamW::default(), lr)
            };
            let mut opt = DpOptimizer::new(cfg, &mut ps, &g).expect("optimizer");
            for _ in 0..4 {
                opt.gather_params(&mut ps, g.dp).expect("gather");
                for p in &ps {
                    p.tensor
                        .to_kind(Kind::Float)
                        .square()
                        .sum(Kind::Float)
                        .backward();
                }
                assert!(!opt.step(&mut ps, &g).expect("step").skipped);
            }
            opt.gather_params(&mut ps, g.dp).expect("gather");
            let masters: Vec<Tensor> = match zero {
                ZeroStage::Off => opt
                    .replica_master
                    .iter()
                    .flatten()
                    .map(Tensor::copy)
                    .collect(),
                _ => opt.master.iter().map(Tensor::copy).collect(),
            };
            for (p, b) in ps.iter().zip(&before) {
                assert_eq!(p.tensor.kind(), Kind::BFloat16, "{zero:?}");
                // 4 steps of 1e-4 move a weight by at most 4e-4: under
                // bf16's resolution for most of them.
                let moved = (p.tensor.to_kind(Kind::Float) - b.to_kind(Kind::Float))
                    .abs()
                    .max()
                    .double_value(&[]);
                assert!(moved < 0.05, "{zero:?}: {moved}");
            }
            (
                ps.iter().map(|p| p.tensor.detach().copy()).collect(),
                masters,
            )
        };
        let (want, masters) = run(ZeroStage::Off);
        assert_eq!(masters.len(), 2, "one f32 master per bf16 parameter");
        for m in &masters {
            assert_eq!(m.kind(), Kind::Float);
        }
        let flat: Vec<Tensor> = masters.iter().map(|m| m.view([-1])).collect();
        let master_flat = Tensor::cat(&flat, 0);
        let weights_flat = Tensor::cat(
            &want
                .iter()
                .map(|w| w.to_kind(Kind::Float).view([-1]))
                .collect::<Vec<_>>(),
            0,
        );
        // The master copy holds what bf16 cannot.
        assert!(!master_flat.allclose(&weights_flat, 0.0, 0.0, false));
        assert!(
            master_flat
                .to_kind(Kind::BFloat16)
                .to_kind(Kind::Float)
                .equal(&weights_flat)
        );
        for zero in [ZeroStage::One, ZeroStage::Three] {
            let (got, _) = run(zero);
            for (g, w) in got.iter().zip(&want) {
                assert!(g.equal(w), "{zero:?}");
            }
        }
    }

    /// f16: the loss scale halves on an overflow (the step skipped, state
    /// untouched) and doubles after `growth_interval` good steps; the
    /// update is that of the unscaled gradient.
    #[test]
    fn the_f16_loss_scale_backs_off_on_overflow_and_grows_back() {
        let solo = MeshComms::solo();
        let g = Groups::of(&solo);
        let lr = LrSchedule {
            peak_lr: 0.01,
            warmup_steps: 0,
            total_steps: 8,
            min_lr: 0.01,
        };
        // Weights of about 0.1: 2p times 2^15 stays within f16's range.
        let mut ps = params(&[&[4, 2]]);
        let data = (ps[0].tensor.detach() * 0.1).to_kind(Kind::Half);
        ps[0].tensor.set_data(&data);
        let mut plain = params(&[&[4, 2]]);
        let data = data.to_kind(Kind::Float);
        plain[0].tensor.set_data(&data);
        let cfg = OptimConfig::new(AdamW::default(), lr);
        let mut opt = DpOptimizer::new(cfg, &mut ps, &g).expect("optimizer");
        let mut reference = DpOptimizer::new(cfg, &mut plain, &g).expect("optimizer");
        assert_eq!(opt.loss_scale(), 65536.0);
        assert_eq!(reference.loss_scale(), 1.0, "only f16 scales the loss");
        let mut s = *opt.scaler().expect("a scaler");
        s.growth_interval = 2;
        opt.set_scaler(s).expect("set");
        assert!(reference.set_scaler(s).is_err());
        let backward = |ps: &[Param], scale: f64| {
            for p in ps {
                (p.tensor.to_kind(Kind::Float).square().sum(Kind::Float) * scale).backward();
            }
        };
        let before = ps[0].tensor.detach().copy();
        // A gradient beyond f16's range.
        backward(&ps, 1e9);
        let stats = opt.step(&mut ps, &g).expect("step");
        assert!(stats.skipped && stats.overflowed, "{stats:?}");
        assert_eq!(opt.loss_scale(), 32768.0);
        assert!(ps[0].tensor.detach().equal(&before), "state untouched");
        for _ in 0..2 {
            backward(&ps, opt.loss_scale());
            backward(&plain, 1.0);
            let stats = opt.step(&mut ps, &g).expect("step");
            assert!(!stats.skipped && !stats.overflowed, "{stats:?}");
            let want = reference.step(&mut plain, &g).expect("step");
            assert!(
                (stats.grad_norm - want.grad_norm).abs() < 1e-2 * want.grad_norm,
                "the unscaled norm: {} vs {}",
                stats.grad_norm,
                want.grad_norm
            );
        }
        assert_eq!(opt.loss_scale(), 65536.0, "doubled after 2 good steps");
        let got = ps[0].tensor.to_kind(Kind::Float);
        let want = plain[0].tensor.to_kind(Kind::Half).to_kind(Kind::Float);
        assert!(
            got.allclose(&want, 1e-2, 1e-3, false),
            "{got:?} vs {want:?}"
        );
    }

    #[test]
    fn the_gradient_norm_is_reported_without_clipping() {
        let solo = MeshComms::solo();
        let g = Groups::of(&solo);
        let lr = LrSchedule {
            peak_lr: 0.1,
            warmup_steps: 0,
            total_steps: 1,
            min_lr: 0.1,
        };
        let shapes: [&[i64]; 2] = [&[5, 3], &[7]];
        for zero in [ZeroStage::Off, ZeroStage::One, ZeroStage::Three] {
            let mut ps = params(&shapes);
            let cfg = OptimConfig {
                zero,
                ..OptimConfig::new(AdamW::default(), lr)
            };
            let mut opt = DpOptimizer::new(cfg, &mut ps, &g).expect("optimizer");
            opt.gather_params(&mut ps, g.dp).expect("gather");
            // d(sum p^2)/dp = 2p, so the norm is 2 |p|.
            let mut want = 0.0;
            for p in &ps {
                p.tensor.square().sum(Kind::Float).backward();
                want += 4.0 * p.tensor.square().sum(Kind::Double).double_value(&[]);
            }
            let stats = opt.step(&mut ps, &g).expect("step");
            let want = want.sqrt();
            assert!(
                (stats.grad_norm - want).abs() < 1e-5 * want,
                "{zero:?}: {} vs {want}",
                stats.grad_norm
            );
        }
    }
}
