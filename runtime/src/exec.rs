//! Segments and adapters: how a partitioned program runs forward and backward.
//!
//! A **segment** is local compute between two communication points: a closure
//! of tch ops over leaf inputs, differentiated by libtorch autograd. An
//! **adapter** moves a value between layouts with a collective
//! ([ARCHITECTURE.md], "Layouts and adapters") and carries its explicit dual
//! for the backward pass. A [`Tape`] records, for one micro-batch, the
//! segments and adapters in the order they ran; [`Tape::backward`] walks it
//! in reverse, running each segment's autograd backward on the gradients of
//! its outputs and each adapter's dual collective, and returns the gradient
//! of every value. Parameter gradients accumulate in the parameters' `.grad()`
//! as usual, so several micro-batches accumulate into one step.
//!
//! Recompute ([`Keep::Inputs`]): the segment runs under `no_grad` and keeps
//! only its inputs; backward reruns it with grad before differentiating.
//!
//! A **block** ([`Tape::block`]) is a sub-tape (a transformer layer: its
//! segments and adapters) with one input and one output. Kept whole
//! ([`Keep::Activations`]) it is the same as recording its steps inline;
//! recomputed ([`Keep::Inputs`], Megatron's full recompute) it keeps only its
//! input between forward and backward and reruns one layer at a time in
//! backward. With [`BlockHooks`] (ZeRO-2/3, [`crate::zero`]) the block's
//! parameters are acquired before its forward and its recompute and released
//! after, and backward hands each block's parameter gradients to the hooks
//! as soon as that block is done instead of accumulating them in `.grad()`.
//!
//! [`ParamSpec`] and [`Param`] make parameter initialisation independent of
//! the partition: each full tensor is drawn from a seed derived from the
//! global seed and the parameter's name, and each rank keeps its shard.
//!
//! This module does not choose layouts or schedules (the plan and
//! [`crate::schedule`] do) and owns no optimizer.
//!
//! [ARCHITECTURE.md]: ../../docs/ARCHITECTURE.md

use crate::comm::{CommError, Communicator};
use crate::ops::OpError;
use tch::{Kind, Tensor};
use thiserror::Error;

/// What can go wrong while executing a program.
#[derive(Debug, Error)]
pub enum ExecError {
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error(transparent)]
    Op(#[from] OpError),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    #[error("segment {segment}: {msg}")]
    Segment { segment: String, msg: String },
    #[error("value {0} is not on this tape")]
    UnknownValue(usize),
    #[error("{what}: dim {dim} of {shape:?} does not split into {parts} parts")]
    Split {
        what: String,
        dim: i64,
        shape: Vec<i64>,
        parts: usize,
    },
    #[error("plan does not fit the model: {0}")]
    Plan(String),
    #[error(transparent)]
    Schedule(#[from] crate::schedule::ScheduleError),
    #[error(transparent)]
    Optim(#[from] crate::optim::OptimError),
    #[error("pipeline: {0}")]
    Pipeline(String),
}

/// A layout change between segments on one mesh axis, with its backward dual.
///
/// The dual depends on what the consumers hand back: consumers that run
/// replicated give every rank the whole gradient (R), consumers that run on
/// shards give partial sums (V). Each variant names the pair it implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Adapter {
    /// V → R: all-reduce forward, identity backward (Megatron's `g`,
    /// `reduce_from_tp`): the consumers are replicated and return R gradients.
    AllReduce,
    /// R → R for consumers that run on shards: identity forward, all-reduce
    /// backward (Megatron's `f`, `copy_to_tp`): their gradients are V.
    Copy,
    /// R → D(dim): local chunk forward, all-gather backward.
    Chunk { dim: i64 },
    /// D(dim) → R for replicated consumers: all-gather forward, chunk backward.
    Gather { dim: i64 },
    /// D(dim) → R for consumers that run on shards (sequence parallel before
    /// a column-parallel op): all-gather forward, reduce-scatter backward.
    GatherForShards { dim: i64 },
    /// V → D(dim): reduce-scatter forward, all-gather backward (sequence
    /// parallel after a row-parallel op).
    ReduceScatter { dim: i64 },
    /// D(from) → D(to): all-to-all forward, the reverse all-to-all backward.
    AllToAll { from: i64, to: i64 },
}

fn chunk(t: &Tensor, dim: i64, comm: &dyn Communicator) -> Result<Tensor, ExecError> {
    let parts = comm.size();
    let shape = t.size();
    let d = if dim < 0 {
        dim + shape.len() as i64
    } else {
        dim
    };
    let len = usize::try_from(d)
        .ok()
        .and_then(|d| shape.get(d).copied())
        .filter(|len| len % parts as i64 == 0);
    let Some(len) = len else {
        return Err(ExecError::Split {
            what: "chunk".into(),
            dim,
            shape,
            parts,
        });
    };
    let n = len / parts as i64;
    narrow_owned(t, d, comm.rank() as i64 * n, n)
}

/// `t.narrow(dim, start, len)` in storage of its own. A narrow of the
/// leading dim is already contiguous, so `contiguous()` returns the view
/// itself, which keeps the whole of `t`'s storage alive: a tp shard of a
/// row-split weight held twice its size, the kv-copy gradient `tp / copies`
/// times. This copies the slice whenever it is a view.
pub fn narrow_owned(t: &Tensor, dim: i64, start: i64, len: i64) -> Result<Tensor, ExecError> {
    let view = t.f_narrow(dim, start, len)?;
    if !view.is_contiguous() {
        return Ok(view.f_contiguous()?);
    }
    let mut owned = view.f_empty_like()?;
    owned.f_copy_(&view)?;
    Ok(owned)
}

impl Adapter {
    /// The forward collective on `x` over `comm`.
    pub fn forward(self, x: &Tensor, comm: &dyn Communicator) -> Result<Tensor, ExecError> {
        Ok(match self {
            Adapter::AllReduce => comm.all_reduce(x)?,
            Adapter::Copy => x.shallow_clone(),
            Adapter::Chunk { dim } => chunk(x, dim, comm)?,
            Adapter::Gather { dim } | Adapter::GatherForShards { dim } => {
                comm.all_gather(x, dim)?
            }
            Adapter::ReduceScatter { dim } => comm.reduce_scatter(x, dim)?,
            Adapter::AllToAll { from, to } => comm.all_to_all(x, to, from)?,
        })
    }

    /// The dual collective on the gradient `g` of the forward's output.
    pub fn backward(self, g: &Tensor, comm: &dyn Communicator) -> Result<Tensor, ExecError> {
        Ok(match self {
            Adapter::AllReduce => g.shallow_clone(),
            Adapter::Copy => comm.all_reduce(g)?,
            Adapter::Chunk { dim } | Adapter::ReduceScatter { dim } => comm.all_gather(g, dim)?,
            Adapter::Gather { dim } => chunk(g, dim, comm)?,
            Adapter::GatherForShards { dim } => comm.reduce_scatter(g, dim)?,
            Adapter::AllToAll { from, to } => comm.all_to_all(g, from, to)?,
        })
    }
}

/// What a segment keeps between its forward and its backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Keep {
    /// The autograd graph (activations): backward differentiates it directly.
    Activations,
    /// Only the inputs: forward runs without grad, backward reruns it.
    Inputs,
}

/// A value on a [`Tape`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(usize);

/// The body of a segment: local ops from leaf inputs to outputs.
pub type SegmentFn<'a> = dyn Fn(&[Tensor]) -> Result<Vec<Tensor>, ExecError> + 'a;

/// The body of a block: records one layer on a (sub-)tape, from its input
/// value to its output value.
pub type BlockFn<'a> = dyn Fn(&mut Tape<'a>, ValueId) -> Result<ValueId, ExecError> + 'a;

/// What runs around each block of a micro-batch (ZeRO-2 and ZeRO-3 in
/// [`crate::zero`]). Every call is made in the same order on every rank of
/// a dp group (they run the same schedule), so the hooks may communicate.
pub trait BlockHooks {
    /// Before block `block`'s forward and before its backward (and its
    /// recompute): afterwards its parameters hold their data (ZeRO-3
    /// all-gathers them).
    fn acquire(&self, block: usize) -> Result<(), ExecError>;
    /// After block `block`'s forward and after its backward: pairs with
    /// [`BlockHooks::acquire`]. A block kept whole holds its saved autograd
    /// graph in between, which must reference the parameters themselves
    /// (not views of their data) for a release to free them
    /// ([`crate::ops::save_weights_whole`]).
    fn release(&self, block: usize) -> Result<(), ExecError>;
    /// The parameters of block `block` whose gradients backward hands over
    /// (handles to the stage's own tensors).
    fn params(&self, block: usize) -> Vec<Tensor>;
    /// One micro-batch's gradients of [`BlockHooks::params`] (`None`: not
    /// reached), right after the block's backward.
    fn grads(&self, block: usize, grads: Vec<Option<Tensor>>) -> Result<(), ExecError>;
    /// The block the tape expects to acquire next (the following one in
    /// forward, the next one backward reaches), told right after
    /// [`BlockHooks::acquire`]: ZeRO-3 gathers its weights ahead. A hint: it
    /// may name no block, or a block that is not acquired next.
    fn prefetch(&self, block: usize) {
        let _ = block;
    }
    /// Whether the stage's parameter `param` has its gradient handed to
    /// these hooks (so it never reaches `.grad()`).
    fn streams(&self, param: usize) -> bool {
        let _ = param;
        false
    }
}

enum Saved {
    Graph {
        leaves: Vec<Tensor>,
        outputs: Vec<Tensor>,
    },
    Nothing,
}

enum Step<'a> {
    Segment {
        name: String,
        f: Box<SegmentFn<'a>>,
        inputs: Vec<ValueId>,
        outputs: Vec<ValueId>,
        saved: Saved,
    },
    Adapter {
        adapter: Adapter,
        comm: &'a dyn Communicator,
        input: ValueId,
        output: ValueId,
    },
    Block {
        block: usize,
        f: Box<BlockFn<'a>>,
        input: ValueId,
        output: ValueId,
        /// The sub-tape and its input and output ids, when kept.
        saved: Option<(Box<Tape<'a>>, ValueId, ValueId)>,
    },
}

/// The record of one micro-batch's forward pass on one rank.
///
/// Values are stored detached; a segment's inputs become fresh leaves (floating
/// point ones require grad) so that its backward yields their gradients.
///
/// A *fused* tape ([`Tape::fused`]) is for programs with no communication
/// inside the step and no recompute (one tp rank): segments read their
/// producers' outputs still attached to autograd, tape inputs are leaves, and
/// backward is one autograd call from the seeds — no per-segment calls.
#[derive(Default)]
pub struct Tape<'a> {
    values: Vec<Tensor>,
    steps: Vec<Step<'a>>,
    /// Fused mode: each value as autograd sees it (attached).
    attached: Option<Vec<Tensor>>,
    hooks: Option<&'a dyn BlockHooks>,
}

fn is_float(t: &Tensor) -> bool {
    matches!(
        t.kind(),
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
    )
}

fn leaf(t: &Tensor) -> Tensor {
    let d = t.detach();
    if is_float(&d) {
        d.set_requires_grad(true)
    } else {
        d
    }
}

impl std::fmt::Debug for Tape<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tape")
            .field("values", &self.values.len())
            .field("steps", &self.steps.len())
            .field("hooks", &self.hooks.is_some())
            .finish()
    }
}

/// Adds `g` to the gradient slot `slot` (a parameter's, summed over the
/// segments that read it).
fn accumulate(slot: &mut Option<Tensor>, g: Tensor) -> Result<(), ExecError> {
    *slot = Some(match slot.take() {
        Some(acc) => acc.f_add(&g)?,
        None => g,
    });
    Ok(())
}

/// Gradients of the values of a tape, from [`Tape::backward`].
#[derive(Debug)]
pub struct Grads(Vec<Option<Tensor>>);

impl Grads {
    /// The gradient of `id`, if anything downstream of it had a gradient.
    pub fn get(&self, id: ValueId) -> Option<&Tensor> {
        self.0.get(id.0).and_then(Option::as_ref)
    }

    fn add(&mut self, id: ValueId, g: Tensor) -> Result<(), ExecError> {
        let slot = self.0.get_mut(id.0).ok_or(ExecError::UnknownValue(id.0))?;
        accumulate(slot, g)
    }
}

impl<'a> Tape<'a> {
    pub fn new() -> Self {
        Self::default()
    }

    /// A tape whose segments form one autograd graph: for steps with no
    /// adapter on a group of more than one rank and no recompute.
    pub fn fused() -> Self {
        Self {
            attached: Some(Vec::new()),
            ..Self::default()
        }
    }

    /// A tape whose blocks run `hooks` ([`Tape::block`]).
    pub fn with_hooks(hooks: &'a dyn BlockHooks) -> Self {
        Self {
            hooks: Some(hooks),
            ..Self::default()
        }
    }

    /// Puts an input of the micro-batch on the tape (tokens, a received activation).
    pub fn input(&mut self, t: &Tensor) -> ValueId {
        self.values.push(t.detach());
        if let Some(attached) = &mut self.attached {
            attached.push(leaf(t));
        }
        ValueId(self.values.len() - 1)
    }

    /// The forward value of `id`.
    pub fn value(&self, id: ValueId) -> Result<&Tensor, ExecError> {
        self.values.get(id.0).ok_or(ExecError::UnknownValue(id.0))
    }

    fn inputs_of(&self, ids: &[ValueId]) -> Result<Vec<Tensor>, ExecError> {
        match &self.attached {
            Some(attached) => ids
                .iter()
                .map(|&id| {
                    attached
                        .get(id.0)
                        .map(Tensor::shallow_clone)
                        .ok_or(ExecError::UnknownValue(id.0))
                })
                .collect(),
            None => ids.iter().map(|&id| self.value(id).map(leaf)).collect(),
        }
    }

    /// Runs `f` on the values `inputs` and records it; returns its outputs' ids.
    pub fn segment(
        &mut self,
        name: &str,
        keep: Keep,
        inputs: &[ValueId],
        f: impl Fn(&[Tensor]) -> Result<Vec<Tensor>, ExecError> + 'a,
    ) -> Result<Vec<ValueId>, ExecError> {
        let leaves = self.inputs_of(inputs)?;
        if let Some(attached) = &mut self.attached {
            if keep == Keep::Inputs {
                return Err(ExecError::Segment {
                    segment: name.to_string(),
                    msg: "a fused tape cannot recompute (use Tape::new)".into(),
                });
            }
            let outs = f(&leaves)?;
            let first = self.values.len();
            self.values.extend(outs.iter().map(Tensor::detach));
            attached.extend(outs);
            return Ok((first..self.values.len()).map(ValueId).collect());
        }
        let (outs, saved) = match keep {
            Keep::Activations => {
                let outs = f(&leaves)?;
                let detached = outs.iter().map(Tensor::detach).collect();
                (
                    detached,
                    Saved::Graph {
                        leaves,
                        outputs: outs,
                    },
                )
            }
            Keep::Inputs => {
                let outs = tch::no_grad(|| f(&leaves))?;
                (outs, Saved::Nothing)
            }
        };
        let first = self.values.len();
        self.values.extend(outs);
        let outputs: Vec<ValueId> = (first..self.values.len()).map(ValueId).collect();
        self.steps.push(Step::Segment {
            name: name.to_string(),
            f: Box::new(f),
            inputs: inputs.to_vec(),
            outputs: outputs.clone(),
            saved,
        });
        Ok(outputs)
    }

    /// Applies `adapter` over `comm` to `input` and records it. A group of one
    /// rank needs no adapter: the value itself is returned.
    pub fn adapt(
        &mut self,
        adapter: Adapter,
        comm: &'a dyn Communicator,
        input: ValueId,
    ) -> Result<ValueId, ExecError> {
        if comm.size() == 1 {
            return Ok(input);
        }
        if self.attached.is_some() {
            return Err(ExecError::Segment {
                segment: format!("{adapter:?}"),
                msg: format!(
                    "a fused tape runs without communication, but this adapter spans {} ranks (use Tape::new)",
                    comm.size()
                ),
            });
        }
        let out = adapter.forward(self.value(input)?, comm)?;
        self.values.push(out);
        let output = ValueId(self.values.len() - 1);
        self.steps.push(Step::Adapter {
            adapter,
            comm,
            input,
            output,
        });
        Ok(output)
    }

    /// Runs block `block` (`f`, one layer) on `input` and records it;
    /// returns its output. [`Keep::Activations`] without hooks records the
    /// layer's steps inline. Otherwise the layer runs on a sub-tape between
    /// [`BlockHooks::acquire`] and [`BlockHooks::release`], and its
    /// backward between another pair; with [`Keep::Inputs`] it runs under
    /// `no_grad`, only its input stays on this tape, and backward reruns it
    /// (full recompute).
    pub fn block(
        &mut self,
        block: usize,
        keep: Keep,
        input: ValueId,
        f: impl Fn(&mut Tape<'a>, ValueId) -> Result<ValueId, ExecError> + 'a,
    ) -> Result<ValueId, ExecError> {
        if keep == Keep::Activations && self.hooks.is_none() {
            return f(self, input);
        }
        if self.attached.is_some() {
            return Err(ExecError::Segment {
                segment: format!("block {block}"),
                msg: "a fused tape cannot recompute or run block hooks (use Tape::new)".into(),
            });
        }
        let hooks = self.hooks;
        if let Some(h) = hooks {
            h.acquire(block)?;
            h.prefetch(block + 1);
        }
        let x = self.value(input)?.shallow_clone();
        let (out, saved) = match keep {
            Keep::Activations => {
                let (sub, sub_in, sub_out) = run_block(&f, &x)?;
                (
                    sub.value(sub_out)?.shallow_clone(),
                    Some((Box::new(sub), sub_in, sub_out)),
                )
            }
            Keep::Inputs => {
                let out = tch::no_grad(|| -> Result<Tensor, ExecError> {
                    let (sub, _, sub_out) = run_block(&f, &x)?;
                    Ok(sub.value(sub_out)?.shallow_clone())
                })?;
                (out, None)
            }
        };
        if let Some(h) = hooks {
            h.release(block)?;
        }
        self.values.push(out);
        let output = ValueId(self.values.len() - 1);
        self.steps.push(Step::Block {
            block,
            f: Box::new(f),
            input,
            output,
            saved,
        });
        Ok(output)
    }

    /// Back-propagates `seeds` (gradients of some values, e.g. 1 for the loss
    /// or the gradient received from the next stage) through the tape, in
    /// reverse order. Parameter gradients accumulate in their `.grad()`.
    pub fn backward(self, seeds: Vec<(ValueId, Tensor)>) -> Result<Grads, ExecError> {
        Ok(self.backward_impl(seeds, &[])?.0)
    }

    /// [`Tape::backward`] that hands the gradients of `params` back (summed
    /// over the segments that read them; `None` where none did) instead of
    /// accumulating them in their `.grad()`. Not for fused tapes.
    pub fn backward_collect(
        self,
        seeds: Vec<(ValueId, Tensor)>,
        params: &[Tensor],
    ) -> Result<(Grads, Vec<Option<Tensor>>), ExecError> {
        if self.attached.is_some() {
            return Err(ExecError::Segment {
                segment: "backward".into(),
                msg: "a fused tape accumulates parameter gradients (use Tape::new)".into(),
            });
        }
        self.backward_impl(seeds, params)
    }

    fn backward_impl(
        self,
        seeds: Vec<(ValueId, Tensor)>,
        params: &[Tensor],
    ) -> Result<(Grads, Vec<Option<Tensor>>), ExecError> {
        let mut pgrads: Vec<Option<Tensor>> = params.iter().map(|_| None).collect();
        let mut grads = Grads((0..self.values.len()).map(|_| None).collect());
        if let Some(attached) = self.attached {
            // One scalar whose gradient with respect to each seeded value is
            // its seed; one autograd call reaches every parameter and input.
            let mut surrogate: Option<Tensor> = None;
            for (id, g) in seeds {
                let v = attached.get(id.0).ok_or(ExecError::UnknownValue(id.0))?;
                if !v.requires_grad() {
                    continue;
                }
                let term = v.f_mul(&g)?.f_sum(v.kind())?;
                surrogate = Some(match surrogate {
                    Some(s) => s.f_add(&term)?,
                    None => term,
                });
            }
            if let Some(surrogate) = surrogate {
                surrogate.f_backward()?;
            }
            for (i, v) in attached.iter().enumerate() {
                if v.is_leaf() && v.requires_grad() {
                    let g = v.grad();
                    if g.defined() {
                        grads.0[i] = Some(g);
                    }
                }
            }
            return Ok((grads, pgrads));
        }
        for (id, g) in seeds {
            grads.add(id, g)?;
        }
        let hooks = self.hooks;
        // The blocks in the order backward reaches them, for the prefetch hint.
        let order: Vec<usize> = self
            .steps
            .iter()
            .rev()
            .filter_map(|s| match s {
                Step::Block { block, .. } => Some(*block),
                _ => None,
            })
            .collect();
        let mut upcoming = order.into_iter().skip(1);
        for step in self.steps.into_iter().rev() {
            match step {
                Step::Adapter {
                    adapter,
                    comm,
                    input,
                    output,
                } => {
                    if let Some(g) = grads.0[output.0].take() {
                        grads.add(input, adapter.backward(&g, comm)?)?;
                    }
                }
                Step::Block {
                    block,
                    f,
                    input,
                    output,
                    saved,
                } => {
                    let next = upcoming.next();
                    let Some(g) = grads.0[output.0].take() else {
                        // Nothing downstream depended on the block.
                        continue;
                    };
                    if let Some(h) = hooks {
                        h.acquire(block)?;
                        if let Some(next) = next {
                            h.prefetch(next);
                        }
                    }
                    let (sub, sub_in, sub_out) = match saved {
                        Some((sub, i, o)) => (*sub, i, o),
                        None => {
                            let x = self
                                .values
                                .get(input.0)
                                .ok_or(ExecError::UnknownValue(input.0))?
                                .shallow_clone();
                            run_block(&*f, &x)?
                        }
                    };
                    let seeds = vec![(sub_out, g)];
                    let sub_grads = match hooks {
                        Some(h) => {
                            let ps = h.params(block);
                            let (sub_grads, gs) = sub.backward_collect(seeds, &ps)?;
                            h.release(block)?;
                            h.grads(block, gs)?;
                            sub_grads
                        }
                        None => sub.backward(seeds)?,
                    };
                    if let Some(gx) = sub_grads.get(sub_in) {
                        grads.add(input, gx.shallow_clone())?;
                    }
                }
                Step::Segment {
                    name,
                    f,
                    inputs,
                    outputs,
                    saved,
                } => {
                    let (leaves, outs) = match saved {
                        Saved::Graph { leaves, outputs } => (leaves, outputs),
                        Saved::Nothing => {
                            let leaves = inputs
                                .iter()
                                .map(|&id| self.values.get(id.0).map(leaf))
                                .collect::<Option<Vec<_>>>()
                                .ok_or(ExecError::UnknownValue(usize::MAX))?;
                            let outs = f(&leaves)?;
                            (leaves, outs)
                        }
                    };
                    if outs.len() != outputs.len() {
                        return Err(ExecError::Segment {
                            segment: name,
                            msg: format!(
                                "returned {} outputs, {} on the forward pass",
                                outs.len(),
                                outputs.len()
                            ),
                        });
                    }
                    // One scalar whose gradient with respect to each output is
                    // that output's incoming gradient: sum(out * g).
                    let mut surrogate: Option<Tensor> = None;
                    for (out, id) in outs.iter().zip(&outputs) {
                        let Some(g) = grads.0[id.0].take() else {
                            continue;
                        };
                        if !out.requires_grad() {
                            continue;
                        }
                        let term = out.f_mul(&g)?.f_sum(out.kind())?;
                        surrogate = Some(match surrogate {
                            Some(s) => s.f_add(&term)?,
                            None => term,
                        });
                    }
                    let Some(surrogate) = surrogate else {
                        continue;
                    };
                    if params.is_empty() {
                        surrogate.f_backward()?;
                        for (l, &id) in leaves.iter().zip(&inputs) {
                            if l.requires_grad() {
                                let g = l.grad();
                                if g.defined() {
                                    grads.add(id, g)?;
                                }
                            }
                        }
                        continue;
                    }
                    // Gradients of the leaves and of `params`, none of them
                    // accumulated into `.grad()`.
                    let wanted: Vec<(usize, ValueId)> = leaves
                        .iter()
                        .zip(&inputs)
                        .enumerate()
                        .filter(|(_, (l, _))| l.requires_grad())
                        .map(|(i, (_, &id))| (i, id))
                        .collect();
                    let mut wrt: Vec<&Tensor> = wanted.iter().map(|&(i, _)| &leaves[i]).collect();
                    wrt.extend(params.iter().filter(|p| p.requires_grad()));
                    let mut gs =
                        Tensor::f_run_backward(&[surrogate], &wrt, false, false)?.into_iter();
                    for &(_, id) in &wanted {
                        if let Some(g) = gs.next().filter(Tensor::defined) {
                            grads.add(id, g)?;
                        }
                    }
                    for (slot, p) in pgrads.iter_mut().zip(params) {
                        if !p.requires_grad() {
                            continue;
                        }
                        if let Some(g) = gs.next().filter(Tensor::defined) {
                            accumulate(slot, g)?;
                        }
                    }
                }
            }
        }
        Ok((grads, pgrads))
    }
}

/// Runs a block's body on a fresh sub-tape whose input is `x`; returns the
/// sub-tape and its input and output ids.
fn run_block<'a>(
    f: &(dyn Fn(&mut Tape<'a>, ValueId) -> Result<ValueId, ExecError> + 'a),
    x: &Tensor,
) -> Result<(Tape<'a>, ValueId, ValueId), ExecError> {
    let mut sub = Tape::new();
    let input = sub.input(x);
    let output = f(&mut sub, input)?;
    Ok((sub, input, output))
}

/// How a parameter's full tensor is initialised.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Normal(0, std) from the parameter's own seed.
    Normal { std: f64 },
    /// All ones (norm weights).
    Ones,
    /// All zeros (biases).
    Zeros,
}

/// How a parameter's gradient is completed across the tp group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TpGrad {
    /// Each rank's gradient is already its shard's (or the replica's) full gradient.
    Complete,
    /// Each rank holds a partial sum (a replicated weight applied to a
    /// sequence shard): all-reduce over tp.
    Partial,
    /// The tp group holds `tp / m` blocks of `tp_dim`, block `j` on the `m`
    /// consecutive ranks `m·j .. m·j + m` (GQA kv heads copied so that tp
    /// may exceed their count, NxD's `kv_size_multiplier`): each copy's
    /// gradient is a partial sum over those ranks.
    Copies(usize),
}

/// A parameter as the single-device model sees it, plus how it is split over tp.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<i64>,
    pub init: Init,
    /// The dim split over the tp group, `None` when replicated.
    pub tp_dim: Option<i64>,
    pub tp_grad: TpGrad,
}

/// A rank's shard of a parameter: a leaf tensor that requires grad.
#[derive(Debug)]
pub struct Param {
    pub spec: ParamSpec,
    pub tensor: Tensor,
}

/// A stable 64-bit FNV-1a hash of the global seed and a name.
/// The tensor kind of a plan dtype.
pub fn kind_of_dtype(d: autopart_vocab::DType) -> Kind {
    match d {
        autopart_vocab::DType::Bf16 => Kind::BFloat16,
        autopart_vocab::DType::Fp16 => Kind::Half,
        autopart_vocab::DType::Fp32 => Kind::Float,
    }
}

fn seed_of(seed: u64, name: &str) -> i64 {
    let h = autopart_vocab::hash::Fnv1a::new()
        .write(&seed.to_le_bytes())
        .write(name.as_bytes())
        .finish();
    // torch seeds are i64; any bit pattern is a valid seed.
    (h >> 1) as i64
}

impl ParamSpec {
    /// A parameter every rank holds whole (no tp split), named `p{i}`: the
    /// optimizer's tests and profiler build sets of them.
    pub fn replicated(i: usize, shape: &[i64], init: Init) -> Self {
        Self {
            name: format!("p{i}"),
            shape: shape.to_vec(),
            init,
            tp_dim: None,
            tp_grad: TpGrad::Complete,
        }
    }

    /// Ranks holding each block: `m` for [`TpGrad::Copies`], else 1.
    pub fn copies(&self) -> usize {
        match self.tp_grad {
            TpGrad::Copies(m) => m.max(1),
            _ => 1,
        }
    }

    /// The block of `tp_dim` a tp rank holds and how many blocks there are
    /// (`(0, 1)` for a replicated parameter).
    pub fn block_of(&self, tp_rank: usize, tp_size: usize) -> (usize, usize) {
        match self.tp_dim {
            None => (0, 1),
            Some(_) => {
                let m = self.copies();
                (tp_rank / m, (tp_size / m).max(1))
            }
        }
    }

    /// Whether tp rank `tp_rank` counts (and writes) this parameter's
    /// values, so that each element counts once over the tp group: every
    /// rank of a split tensor, the first of each copied block's ranks, tp
    /// rank 0 of a replicated one.
    pub fn counted_on(&self, tp_rank: usize) -> bool {
        match self.tp_dim {
            Some(_) => tp_rank % self.copies() == 0,
            None => tp_rank == 0,
        }
    }

    /// The full tensor, the same on every rank and under every partition.
    pub fn init_full(&self, seed: u64) -> Result<Tensor, ExecError> {
        let opts = (Kind::Float, tch::Device::Cpu);
        Ok(match self.init {
            Init::Normal { std } => {
                tch::manual_seed(seed_of(seed, &self.name));
                Tensor::f_randn(self.shape.as_slice(), opts)?.f_mul_scalar(std)?
            }
            Init::Ones => Tensor::f_ones(self.shape.as_slice(), opts)?,
            Init::Zeros => Tensor::f_zeros(self.shape.as_slice(), opts)?,
        })
    }

    /// This rank's shard of `full` in a tp group of `tp_size` at position `tp_rank`.
    pub fn shard(
        &self,
        full: &Tensor,
        tp_rank: usize,
        tp_size: usize,
    ) -> Result<Tensor, ExecError> {
        let Some(dim) = self.tp_dim else {
            return Ok(full.shallow_clone());
        };
        let (block, parts) = self.block_of(tp_rank, tp_size);
        let len = usize::try_from(dim)
            .ok()
            .and_then(|d| self.shape.get(d).copied())
            .filter(|len| tp_size % self.copies() == 0 && len % parts as i64 == 0);
        let Some(len) = len else {
            return Err(ExecError::Split {
                what: self.name.clone(),
                dim,
                shape: self.shape.clone(),
                parts,
            });
        };
        if parts == 1 {
            return Ok(full.shallow_clone());
        }
        let n = len / parts as i64;
        narrow_owned(full, dim, block as i64 * n, n)
    }

    /// The initialised shard as a leaf parameter.
    pub fn materialise(
        &self,
        seed: u64,
        tp_rank: usize,
        tp_size: usize,
    ) -> Result<Param, ExecError> {
        let full = self.init_full(seed)?;
        let tensor = self.shard(&full, tp_rank, tp_size)?.set_requires_grad(true);
        Ok(Param {
            spec: self.clone(),
            tensor,
        })
    }
}

impl Param {
    /// Drops the accumulated gradient (zeroes it in place).
    pub fn zero_grad(&mut self) {
        self.tensor.zero_grad();
    }

    /// The full tensor, all-gathered over `tp` when split (each copied
    /// block once). Collective over `tp`.
    pub fn gather_full(&self, tp: &dyn Communicator) -> Result<Tensor, ExecError> {
        let t = self.tensor.detach();
        match self.spec.tp_dim {
            Some(dim) if tp.size() > 1 => {
                let all = tp.all_gather(&t, dim)?;
                let m = self.spec.copies();
                if m == 1 {
                    return Ok(all);
                }
                let blocks: Vec<Tensor> = all
                    .f_chunk(tp.size() as i64, dim)?
                    .into_iter()
                    .step_by(m)
                    .collect();
                Ok(Tensor::f_cat(&blocks, dim)?)
            }
            _ => Ok(t),
        }
    }
}

/// Completes the gradients of `params` after every micro-batch's backward:
/// all-reduce over `tp` for [`TpGrad::Partial`] parameters, then sum over `dp`
/// one parameter at a time (each rank's loss is already scaled by the global
/// token count, so the sum is the data-parallel average). Missing gradients
/// become zeros. [`crate::zero`] does the dp part in buckets instead.
pub fn sync_grads(
    params: &mut [Param],
    tp: &dyn Communicator,
    dp: &dyn Communicator,
) -> Result<(), ExecError> {
    complete_tp_grads(params, tp)?;
    if dp.size() > 1 {
        for p in params.iter_mut() {
            let g = p.tensor.grad();
            let sum = dp.all_reduce(&g.detach())?;
            tch::no_grad(|| g.detach().f_copy_(&sum))?;
        }
    }
    Ok(())
}

/// The tp half of [`sync_grads`]: all-reduces [`TpGrad::Partial`] gradients
/// over `tp` and gives parameters no micro-batch reached a zero gradient, so
/// that afterwards every parameter's `.grad()` is defined and complete for
/// this rank's share of the batch.
pub fn complete_tp_grads(params: &mut [Param], tp: &dyn Communicator) -> Result<(), ExecError> {
    complete_tp_grads_except(params, tp, &|_| false)
}

/// [`complete_tp_grads`] for the parameters `skip` does not name (their
/// gradients were streamed, [`BlockHooks::grads`]).
pub fn complete_tp_grads_except(
    params: &mut [Param],
    tp: &dyn Communicator,
    skip: &dyn Fn(usize) -> bool,
) -> Result<(), ExecError> {
    for (i, p) in params.iter_mut().enumerate() {
        if skip(i) {
            continue;
        }
        if !p.tensor.grad().defined() {
            // A parameter no micro-batch reached: give it an explicit zero
            // gradient by differentiating `sum(p * 0)`.
            p.tensor
                .f_mul_scalar(0.0)?
                .f_sum(Kind::Float)?
                .f_backward()?;
        }
        if tp.size() > 1 && p.spec.tp_grad != TpGrad::Complete {
            let cur = p.tensor.grad();
            let done = complete_tp_grad(&p.spec, cur.detach(), tp)?;
            tch::no_grad(|| cur.detach().f_copy_(&done))?;
        }
    }
    Ok(())
}

/// One gradient `g` of a parameter of `spec`, completed over `tp`:
/// all-reduced for [`TpGrad::Partial`], each copy's block summed over the
/// ranks holding it for [`TpGrad::Copies`] (an all-reduce over tp of the
/// model's tensor, each rank's gradient placed at its block, zeros
/// elsewhere, then this rank's block taken back), as it is otherwise.
pub fn complete_tp_grad(
    spec: &ParamSpec,
    g: Tensor,
    tp: &dyn Communicator,
) -> Result<Tensor, ExecError> {
    if tp.size() == 1 {
        return Ok(g);
    }
    match spec.tp_grad {
        TpGrad::Complete => Ok(g),
        TpGrad::Partial => Ok(tp.all_reduce(&g)?),
        TpGrad::Copies(m) if m > 1 => {
            let Some(dim) = spec.tp_dim else {
                return Ok(g);
            };
            let (block, parts) = spec.block_of(tp.rank(), tp.size());
            let mut shape = g.size();
            let n = shape.get(dim as usize).copied().unwrap_or(0);
            if let Some(len) = shape.get_mut(dim as usize) {
                *len = n * parts as i64;
            }
            let placed = Tensor::f_zeros(shape.as_slice(), (g.kind(), g.device()))?;
            placed.f_narrow(dim, block as i64 * n, n)?.f_copy_(&g)?;
            let sum = tp.all_reduce(&placed)?;
            narrow_owned(&sum, dim, block as i64 * n, n)
        }
        TpGrad::Copies(_) => Ok(g),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::SoloComm;

    #[test]
    fn segments_chain_and_recompute_matches_saved_activations() {
        let w = Tensor::from_slice(&[0.5f32, -1.5, 2.0]).set_requires_grad(true);
        let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        let mut grads = Vec::new();
        // Segmented (saved activations, recompute) and fused tapes.
        for (keep, fused) in [
            (Keep::Activations, false),
            (Keep::Inputs, false),
            (Keep::Activations, true),
        ] {
            let mut tape = if fused { Tape::fused() } else { Tape::new() };
            let xi = tape.input(&x);
            let h = tape
                .segment("mul", keep, &[xi], |i| Ok(vec![i[0].f_mul(&w)?.f_tanh()?]))
                .expect("segment runs");
            let h2 = tape
                .adapt(Adapter::AllReduce, &SoloComm, h[0])
                .expect("solo adapter");
            let y = tape
                .segment("sq", keep, &[h2, xi], |i| {
                    Ok(vec![i[0].f_mul(&i[1])?.f_sum(Kind::Float)?])
                })
                .expect("segment runs");
            let out = tape
                .backward(vec![(
                    y[0],
                    Tensor::ones([], (Kind::Float, tch::Device::Cpu)),
                )])
                .expect("backward");
            grads.push((w.grad().copy(), out.get(xi).expect("x grad").copy()));
            let mut w2 = w.shallow_clone();
            w2.zero_grad();
        }
        assert_eq!(grads.len(), 3);
        // Reference by plain autograd.
        let xr = x.detach().set_requires_grad(true);
        let wr = w.detach().set_requires_grad(true);
        ((&xr * &wr).tanh() * &xr).sum(Kind::Float).backward();
        for (gw, gx) in grads {
            assert!(gw.allclose(&wr.grad(), 1e-6, 1e-6, false));
            assert!(gx.allclose(&xr.grad(), 1e-6, 1e-6, false));
        }
    }

    /// Counts acquires and releases and keeps the gradients handed over.
    #[derive(Default)]
    struct Counting {
        held: std::cell::Cell<i64>,
        acquired: std::cell::Cell<usize>,
        params: Vec<Tensor>,
        got: std::cell::RefCell<Vec<Option<Tensor>>>,
    }

    impl BlockHooks for Counting {
        fn acquire(&self, _block: usize) -> Result<(), ExecError> {
            self.held.set(self.held.get() + 1);
            self.acquired.set(self.acquired.get() + 1);
            Ok(())
        }
        fn release(&self, _block: usize) -> Result<(), ExecError> {
            self.held.set(self.held.get() - 1);
            Ok(())
        }
        fn params(&self, _block: usize) -> Vec<Tensor> {
            self.params.iter().map(Tensor::shallow_clone).collect()
        }
        fn grads(&self, _block: usize, grads: Vec<Option<Tensor>>) -> Result<(), ExecError> {
            self.got.borrow_mut().extend(grads);
            Ok(())
        }
    }

    #[test]
    fn blocks_match_inline_steps_kept_recomputed_and_hooked() {
        let w = Tensor::from_slice(&[0.5f32, -1.5, 2.0]).set_requires_grad(true);
        let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        let one = || Tensor::ones([], (Kind::Float, tch::Device::Cpu));
        // One layer: two segments around a solo adapter.
        fn layer<'a>(w: &'a Tensor, tape: &mut Tape<'a>, v: ValueId) -> Result<ValueId, ExecError> {
            let h = tape.segment("a", Keep::Activations, &[v], move |i| {
                Ok(vec![i[0].f_mul(w)?.f_tanh()?])
            })?;
            let h = tape.adapt(Adapter::AllReduce, &SoloComm, h[0])?;
            let y = tape.segment("b", Keep::Activations, &[h, v], move |i| {
                Ok(vec![i[0].f_mul(&i[1])?.f_mul(w)?])
            })?;
            Ok(y[0])
        }
        let wr = &w;
        let run = |keep: Keep, hooks: Option<&dyn BlockHooks>| {
            let mut tape = match hooks {
                Some(h) => Tape::with_hooks(h),
                None => Tape::new(),
            };
            let xi = tape.input(&x);
            let mut v = xi;
            for b in 0..2 {
                v = tape
                    .block(b, keep, v, move |t, v| layer(wr, t, v))
                    .expect("block");
            }
            let loss = tape
                .segment("sum", Keep::Activations, &[v], |i| {
                    Ok(vec![i[0].f_sum(Kind::Float)?])
                })
                .expect("sum");
            let value = tape.value(loss[0]).expect("loss").double_value(&[]);
            let grads = tape.backward(vec![(loss[0], one())]).expect("backward");
            let gx = grads.get(xi).expect("x grad").copy();
            (value, gx)
        };
        let mut w2 = w.shallow_clone();
        let (want_loss, want_gx) = run(Keep::Activations, None);
        let want_gw = w.grad().copy();
        w2.zero_grad();
        for keep in [Keep::Activations, Keep::Inputs] {
            let (loss, gx) = run(keep, None);
            assert_eq!(loss, want_loss);
            assert!(gx.allclose(&want_gx, 1e-6, 1e-6, false), "{keep:?}");
            assert!(w.grad().allclose(&want_gw, 1e-6, 1e-6, false), "{keep:?}");
            w2.zero_grad();
            let hooks = Counting {
                params: vec![w.shallow_clone()],
                ..Counting::default()
            };
            let (loss, gx) = run(keep, Some(&hooks));
            assert_eq!(loss, want_loss);
            assert!(gx.allclose(&want_gx, 1e-6, 1e-6, false), "{keep:?} hooked");
            // Handed over, one per block, summing to the whole gradient;
            // nothing in `.grad()`.
            assert!(
                !w.grad().defined() || w.grad().abs().sum(Kind::Float).double_value(&[]) == 0.0
            );
            let got = hooks.got.borrow();
            assert_eq!(got.len(), 2);
            let sum = got[0]
                .as_ref()
                .expect("block 0")
                .f_add(got[1].as_ref().expect("block 1"))
                .expect("add");
            assert!(
                sum.allclose(&want_gw, 1e-6, 1e-6, false),
                "{keep:?} hooked grads"
            );
            assert_eq!(hooks.held.get(), 0, "{keep:?}: every acquire released");
            // Each block: once for its forward, once for its backward.
            assert_eq!(hooks.acquired.get(), 4, "{keep:?}");
        }
    }

    #[test]
    fn a_fused_tape_refuses_communication_and_recompute() {
        let x = Tensor::from_slice(&[1.0f32, 2.0]);
        let mut tape = Tape::fused();
        let xi = tape.input(&x);
        let err = tape
            .segment("r", Keep::Inputs, &[xi], |i| Ok(vec![i[0].shallow_clone()]))
            .expect_err("no recompute on a fused tape");
        assert!(err.to_string().contains("cannot recompute"), "{err}");
    }

    #[test]
    fn init_is_independent_of_the_split() {
        let spec = ParamSpec {
            name: "layers.0.q".into(),
            shape: vec![8, 4],
            init: Init::Normal { std: 0.02 },
            tp_dim: Some(0),
            tp_grad: TpGrad::Complete,
        };
        let full = spec.init_full(7).expect("init");
        let parts: Vec<Tensor> = (0..2)
            .map(|r| spec.materialise(7, r, 2).expect("shard").tensor.detach())
            .collect();
        assert!(Tensor::cat(&parts, 0).equal(&full));
        assert!(!spec.init_full(8).expect("init").equal(&full));
        assert!(spec.materialise(7, 0, 3).is_err());
    }

    #[test]
    fn a_row_shard_does_not_keep_the_full_tensor() {
        // A narrow of dim 0 is contiguous: as a view it would pin the full
        // tensor's storage (a tp2 shard of a row-split weight held twice).
        let full = Tensor::arange(32, (Kind::Float, tch::Device::Cpu)).view([8, 4]);
        for (dim, start) in [(0, 0), (0, 4), (1, 2)] {
            let part =
                narrow_owned(&full, dim, start, if dim == 0 { 4 } else { 2 }).expect("narrow");
            assert!(part.is_contiguous());
            assert!(part.equal(&full.narrow(dim, start, part.size()[dim as usize])));
            let (lo, hi) = (full.data_ptr() as usize, full.data_ptr() as usize + 32 * 4);
            let at = part.data_ptr() as usize;
            assert!(
                !(lo..hi).contains(&at),
                "dim {dim} start {start} shares the storage"
            );
        }
    }
}
