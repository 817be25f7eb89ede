//! The step-time and memory model of one configuration, and the dynamic
//! program that places pipeline stage boundaries under it.
//!
//! Per micro-batch, stage `s` with `k` layers under recompute mode `r`:
//! `t(s) = k·(fwd + bwd + recompute(r)) + embedding (s = 0) + head (last) +
//! p2p sends + exposed ZeRO-3 gathers`. The pipeline takes
//! `(m + p − 1)·max_s t(s)` for GPipe and 1F1B and `(m + (p − 1)/v)·max_s t(s)`
//! interleaved with `v` chunks (Narayanan et al. 2021); data-parallel
//! gradient reduction overlaps the last micro-batch's backward; the optimizer
//! step streams its state through HBM.
//!
//! Peak memory of a device of stage `s` models what our runtime holds
//! ([`StageModel::autopart_memory`]): parameters in the plan's dtype (under
//! ZeRO-3 the embedding, the head, the layer running and the next one,
//! gathered ahead);
//! gradients in the parameters' dtype in `.grad()`, except under ZeRO-2/3,
//! where each layer's are reduce-scattered into f32 slices of 4 B / dp as
//! backward leaves it; AdamW's f32 moments (8 B per parameter replicated,
//! plus a 4 B f32 master copy in bf16 / f16 training; ZeRO-1/2/3: master
//! and moments of the owned 1/dp slice, 12 B / dp); the activations of the
//! micro-batches in flight (1F1B: p − s, GPipe: m, interleaved per
//! Megatron's warm-up count), each what the tape and libtorch autograd keep
//! for our ops ([`super::segment_cost`]; full recompute: each layer's
//! input); transient buffers (the largest op output twice, fp32 logits and
//! their gradient on the last stage, one rebuilt layer under full
//! recompute, one layer's streamed gradients and its gathered weights, or
//! the optimizer step's flat buckets and gradient slices once activations
//! are gone). It must stay under capacity minus the cluster's reserve.
//! [`MemoryStack::Reference`] prices Megatron-LM / DeepSpeed's formulas
//! instead, for comparing with their published runs.

use crate::cost::{
    Cluster, Collective, ComputeKind, Group, MemoryStack, collective_time, compute_time,
};
use crate::ir::DType;
use crate::plan::{MemoryBreakdown, Recompute, Schedule, ZeroStage};

use super::Solved;
use super::segment_cost::SegmentCost;

/// One point of the outer search space.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Config {
    pub tp: u32,
    pub pp: u32,
    pub dp: u32,
    /// Copies of the plan (runtime GPUs ÷ plan GPUs), data parallel.
    pub replicas: u32,
    pub micro_batch: u64,
    pub n_micro: u64,
    pub schedule: Schedule,
    pub zero: ZeroStage,
    pub sp: bool,
    pub n_layers: u32,
    /// A recompute mode every stage must use; `None` lets each stage choose.
    pub recompute: Option<Recompute>,
    /// The dtype gradients are summed in over dp.
    pub reduce_dtype: crate::plan::DType,
}

impl Config {
    fn dp_total(&self) -> u64 {
        u64::from(self.dp) * u64::from(self.replicas)
    }

    fn chunks(&self) -> u32 {
        self.schedule.chunks()
    }

    /// Micro-batches whose activations stage `s` holds at its peak, in
    /// units of the stage's whole layer set.
    pub fn in_flight(&self, s: u32) -> f64 {
        let p = f64::from(self.pp);
        let m = self.n_micro as f64;
        let s = f64::from(s);
        match self.schedule {
            Schedule::GPipe => m,
            Schedule::OneFOneB => (p - s).min(m),
            Schedule::Interleaved { chunks } => {
                let v = f64::from(chunks);
                // Megatron's warm-up: (p − s − 1)·2 + (v − 1)·p chunk
                // micro-batches, plus the one in flight; a chunk is 1/v of
                // the stage's layers.
                let warmup = (p - s - 1.0) * 2.0 + (v - 1.0) * p + 1.0;
                (warmup / v).min(m)
            }
        }
    }
}

/// The evaluation of one stage.
#[derive(Clone, Debug, PartialEq)]
pub struct StageEval {
    pub first_layer: u32,
    pub end_layer: u32,
    pub recompute: Recompute,
    pub micro_batch_s: f64,
    pub tp_comm_s: f64,
    pub memory: MemoryBreakdown,
}

/// The evaluation of a configuration with its stages placed.
#[derive(Clone, Debug, PartialEq)]
pub struct Evaluation {
    pub step_s: f64,
    pub pipeline_s: f64,
    pub bubble_fraction: f64,
    pub dp_comm_s: f64,
    pub optimizer_s: f64,
    pub stages: Vec<StageEval>,
    pub peak_mem_bytes: u64,
    pub capacity_bytes: u64,
}

/// The runtime's default gradient bucket (`zero::DEFAULT_BUCKET_BYTES`,
/// PyTorch DDP's 25 MiB).
const DP_BUCKET_BYTES: u64 = 25 << 20;

/// Per-configuration constants shared by every stage evaluation.
struct StageModel<'a> {
    cluster: &'a Cluster,
    cfg: &'a Config,
    seg: &'a Solved,
    dtype_bytes: u64,
    capacity: u64,
    p2p_s: f64,
}

impl<'a> StageModel<'a> {
    fn new(cluster: &'a Cluster, cfg: &'a Config, seg: &'a Solved) -> Self {
        let dtype_bytes = seg
            .layer
            .param_bytes
            .checked_div(seg.layer.params)
            .map_or(2, |b| b.max(1));
        // pp neighbours are tp·dp ranks apart.
        let pp_group = Group::placed(cluster, cfg.pp.max(2), cfg.tp * cfg.dp);
        let p2p_s = if cfg.pp > 1 {
            collective_time(
                cluster,
                Collective::SendRecv,
                &pp_group,
                seg.layer.boundary_bytes as f64,
            )
        } else {
            0.0
        };
        StageModel {
            cluster,
            cfg,
            seg,
            dtype_bytes,
            capacity: cluster.usable_memory_bytes(),
            p2p_s,
        }
    }

    fn is_first(&self, s: u32) -> bool {
        s == 0
    }

    fn is_last(&self, s: u32) -> bool {
        s + 1 == self.cfg.pp
    }

    /// Parameter elements a device of stage `s` holds with `k` layers.
    fn params(&self, s: u32, k: u32) -> u64 {
        let mut p = u64::from(k) * self.seg.layer.params;
        if self.is_first(s) {
            p += self.seg.pre.params;
        }
        if self.is_last(s) {
            p += self.seg.post.params;
        }
        p
    }

    /// Micro-batch time of stage `s` with `k` layers under `r`.
    fn time(&self, s: u32, k: u32, r: Recompute) -> (f64, f64) {
        let l = &self.seg.layer;
        // With tp communication overlapped, a segment pays the larger of
        // its compute and its communication, not their sum.
        let hidden = |c: &SegmentCost| {
            if self.cluster.tp_comm_overlaps_compute {
                c.comm_s().min(c.fwd_s() + c.bwd_s() - c.comm_s())
            } else {
                0.0
            }
        };
        let mut t = f64::from(k) * (l.fwd_s() + l.bwd_s() + l.recompute_s(r) - hidden(l));
        let mut comm = f64::from(k) * l.comm_s();
        if self.is_first(s) {
            t += self.seg.pre.fwd_s() + self.seg.pre.bwd_s() - hidden(&self.seg.pre);
            comm += self.seg.pre.comm_s();
        }
        if self.is_last(s) {
            t += self.seg.post.fwd_s() + self.seg.post.bwd_s() - hidden(&self.seg.post);
            comm += self.seg.post.comm_s();
        }
        // Activations forward, gradients backward, once per chunk boundary.
        let sends = u32::from(!self.is_last(s)) + u32::from(!self.is_first(s));
        t += f64::from(sends * self.cfg.chunks()) * self.p2p_s;
        if self.cfg.zero == ZeroStage::Three && self.cfg.dp_total() > 1 {
            // Parameters are gathered for forward and again for backward;
            // prefetching hides them behind compute up to the compute time.
            let dp_group = Group::placed(self.cluster, self.cfg.dp_total() as u32, self.cfg.tp);
            let bytes = (self.params(s, k) * self.dtype_bytes) as f64;
            let gather = collective_time(self.cluster, Collective::AllGather, &dp_group, bytes);
            let fwd = self.cluster.comm_hidden_by(f64::from(k) * l.fwd_s());
            let bwd = self.cluster.comm_hidden_by(f64::from(k) * l.bwd_s());
            t += (gather - fwd).max(0.0) + (gather - bwd).max(0.0);
        }
        (t, comm)
    }

    /// Peak memory of a device of stage `s` with `k` layers under `r`, as
    /// the runtime (`runtime/src/zero.rs`, `exec.rs`, `optim.rs`) holds it.
    fn memory(&self, s: u32, k: u32, r: Recompute) -> MemoryBreakdown {
        let mut m = match self.cluster.memory_stack {
            MemoryStack::Autopart => self.autopart_memory(s, k, r),
            MemoryStack::Reference => self.reference_memory(s, k, r),
        };
        m.allocator_bytes = (m.total_bytes() as f64 * self.cluster.allocator_overhead) as u64;
        m
    }

    /// Activations of the micro-batches in flight on stage `s`, each
    /// keeping `per_layer` bytes per layer.
    ///
    /// Activation sizes scale with the micro-batch, which a search may take
    /// as large as the global batch: they saturate (and then do not fit)
    /// rather than overflow.
    fn activations(&self, s: u32, k: u32, per_layer: u64) -> u64 {
        let ends = |c: &SegmentCost| c.saved_bytes(self.cluster.memory_stack, Recompute::None);
        let mut per_micro = u64::from(k).saturating_mul(per_layer);
        if self.is_first(s) {
            per_micro = per_micro.saturating_add(ends(&self.seg.pre));
        }
        if self.is_last(s) {
            per_micro = per_micro.saturating_add(ends(&self.seg.post));
        }
        (per_micro as f64 * self.cfg.in_flight(s)).ceil() as u64
    }

    /// Backward's buffers: the gradient of the largest op output and of its
    /// input; fp32 logits and their gradient on the last stage.
    fn backward_transient(&self, s: u32) -> u64 {
        let mut t = self.seg.layer.max_op_output_bytes.saturating_mul(2);
        if self.is_last(s) {
            let logits = (self.seg.post.max_op_output_bytes / self.dtype_bytes).saturating_mul(4);
            t = t.max(logits.saturating_mul(2));
        }
        t
    }

    /// Megatron-LM / DeepSpeed / FSDP ([`MemoryStack::Reference`]): ZeRO
    /// shards optimizer state (1), gradients (2) and parameters (3, two
    /// layers gathered at a time); mixed precision keeps f32 master weights
    /// with the moments (12 B, fp32 training 8 B); full recompute keeps each
    /// layer's input and rebuilds one whole layer in backward; activations
    /// as Megatron counts them (`SegmentCost::reference_none_bytes`).
    fn reference_memory(&self, s: u32, k: u32, r: Recompute) -> MemoryBreakdown {
        let p = self.params(s, k);
        let dp = self.cfg.dp_total().max(1);
        let w = self.dtype_bytes;
        let opt_per_param = if w >= 4 { 8 } else { 12 };
        let shard = |bytes: u64, sharded: bool| if sharded { bytes.div_ceil(dp) } else { bytes };
        let z = self.cfg.zero;
        let l = &self.seg.layer;
        let per_layer = l.saved_bytes(MemoryStack::Reference, r);
        let mut transient = self.backward_transient(s);
        if r == Recompute::Full && k > 0 {
            let rebuilt = l.saved_bytes(MemoryStack::Reference, Recompute::None);
            transient = transient.saturating_add(rebuilt);
        }
        if z.shards_parameters() {
            transient += 2 * l.params * w;
        }
        MemoryBreakdown {
            params_bytes: shard(p * w, z.shards_parameters()),
            grads_bytes: shard(p * w, z.shards_gradients()),
            optimizer_bytes: shard(p * opt_per_param, z.shards_optimizer()),
            activations_bytes: self.activations(s, k, per_layer),
            transient_bytes: transient,
            allocator_bytes: 0,
        }
    }

    /// autopart's runtime ([`MemoryStack::Autopart`]; `runtime/src/zero.rs`,
    /// `exec.rs`, `optim.rs`). Layers run as tape blocks: full recompute
    /// keeps each layer's input and rebuilds one layer in backward; under
    /// ZeRO-2/3 each layer's gradients are reduce-scattered into f32 slices
    /// as backward leaves it (the embedding's and head's stay whole until
    /// the step), and ZeRO-3 gathers a layer's weights one layer ahead of
    /// its forward and again of its backward, freeing them after each.
    fn autopart_memory(&self, s: u32, k: u32, r: Recompute) -> MemoryBreakdown {
        let p = self.params(s, k);
        let dp = self.cfg.dp_total().max(1);
        let w = self.dtype_bytes;
        let z = self.cfg.zero;
        let l = &self.seg.layer;
        let layer_p = u64::from(k) * l.params;
        let other_p = p - layer_p;
        let streamed = z.shards_gradients() && k > 0;
        // Weights: whole, except ZeRO-3's layers: the one running and, with
        // dp > 1 and a next layer, the next one, gathered ahead by the
        // prefetch thread.
        let params_bytes = if z.shards_parameters() && k > 0 {
            let gathered = if dp > 1 && k > 1 { 2 } else { 1 };
            (other_p + gathered * l.params) * w
        } else {
            p * w
        };
        // Gradients: whole in `.grad`, except streamed layers' (f32 slices).
        // The slices fill from the first backward on: when every
        // micro-batch's forward runs before any backward (one micro-batch,
        // GPipe), they grow while the activations are freed, and the peak
        // holds the larger of the two.
        let slices = (layer_p * 4).div_ceil(dp);
        let activations_bytes = self.activations(s, k, l.saved_bytes(MemoryStack::Autopart, r));
        let grads_bytes = if streamed {
            let before_backward = self.cfg.in_flight(s) >= self.cfg.n_micro as f64;
            let held = if before_backward {
                slices.saturating_sub(activations_bytes)
            } else {
                slices
            };
            other_p * w + held
        } else {
            p * w
        };
        // AdamW moments are f32 whatever the weights' dtype. Replicated, f32
        // weights are updated in place (8 B); bf16 / f16 ones keep an f32
        // master copy (12 B). ZeRO-1/2/3 keep f32 master weights and moments
        // of the owned 1/dp slice (12 B / dp).
        let optimizer_bytes = if z.shards_optimizer() {
            (p * 12).div_ceil(dp)
        } else if w >= 4 {
            p * 8
        } else {
            p * 12
        };
        let mut backward = self.backward_transient(s);
        if r == Recompute::Full && k > 0 {
            // Backward rebuilds one layer with its autograd graph.
            backward =
                backward.saturating_add(l.saved_bytes(MemoryStack::Autopart, Recompute::None));
        }
        // One layer's gradients as backward hands them over, flattened to
        // the reduce dtype for the reduce-scatter; and ZeRO-3's all-gathered
        // bucket (in the weights' dtype) the next layer's weights are cut
        // from. The gather ahead runs while the layer's backward computes and
        // is done by the time its gradients are handed over: one or the
        // other, not both.
        let mut layer_transient = 0;
        if streamed {
            let r = self.cfg.reduce_dtype.size_bytes();
            layer_transient = l.params * (w + r);
        }
        if z.shards_parameters() && k > 0 {
            layer_transient = layer_transient.max(l.params * w);
        }
        backward = backward.saturating_add(layer_transient);
        // The optimizer step runs once the micro-batches' tapes are gone:
        // under ZeRO the reduce-scattered f32 gradient slices (4 B / dp per
        // parameter) live through the update; each bucket is flattened into
        // one f32 buffer and its collective writes another (ZeRO-3's
        // all-gather before the step likewise, with no activations alive).
        let bucket = DP_BUCKET_BYTES.min(p * 4);
        let mut step = if dp > 1 { 2 * bucket } else { 0 };
        if z.shards_optimizer() {
            // Streamed layers' slices are already in `grads_bytes`.
            let at_step = if streamed { other_p } else { p };
            step += (at_step * 4).div_ceil(dp) + bucket;
        }
        MemoryBreakdown {
            params_bytes,
            grads_bytes,
            optimizer_bytes,
            activations_bytes,
            transient_bytes: backward.max(step.saturating_sub(activations_bytes)),
            allocator_bytes: 0,
        }
    }

    /// The fastest recompute mode that fits, for stage `s` with `k` layers.
    fn best_stage(&self, s: u32, k: u32) -> Option<StageEval> {
        let modes: &[Recompute] = match self.cfg.recompute {
            Some(Recompute::None) => &[Recompute::None],
            Some(Recompute::Selective) => &[Recompute::Selective],
            Some(Recompute::Full) => &[Recompute::Full],
            None => &[Recompute::None, Recompute::Selective, Recompute::Full],
        };
        let mut best: Option<StageEval> = None;
        for &r in modes {
            let memory = self.memory(s, k, r);
            if memory.total_bytes() > self.capacity {
                continue;
            }
            let (t, comm) = self.time(s, k, r);
            if best.as_ref().is_none_or(|b| t < b.micro_batch_s) {
                best = Some(StageEval {
                    first_layer: 0,
                    end_layer: k,
                    recompute: r,
                    micro_batch_s: t,
                    tp_comm_s: comm,
                    memory,
                });
            }
        }
        best
    }

    /// Step time around a pipeline whose slowest stage takes `t_max`.
    fn finish(&self, stages: Vec<StageEval>) -> Evaluation {
        let cfg = self.cfg;
        let t_max = stages.iter().map(|s| s.micro_batch_s).fold(0.0, f64::max);
        let m = cfg.n_micro as f64;
        let p = f64::from(cfg.pp);
        let v = f64::from(cfg.chunks());
        let slots = match cfg.schedule {
            Schedule::Interleaved { .. } => m + (p - 1.0) / v,
            _ => m + p - 1.0,
        };
        let pipeline_s = slots * t_max;
        let bubble = (slots - m) * t_max;
        // Data-parallel gradient reduction, overlapped with the last
        // micro-batch's backward; ZeRO >= 1 gathers updated weights after
        // the optimizer step.
        let dp = cfg.dp_total();
        let mut dp_comm: f64 = 0.0;
        let mut optimizer: f64 = 0.0;
        for (s, st) in stages.iter().enumerate() {
            let s = s as u32;
            let k = st.end_layer - st.first_layer;
            let p_elems = self.params(s, k);
            let w = self.dtype_bytes;
            // Gradients travel in the plan's reduce dtype (f32 by default).
            let grad_bytes = (p_elems * cfg.reduce_dtype.size_bytes()) as f64;
            let mut exposed = 0.0;
            if dp > 1 {
                let group = Group::placed(self.cluster, dp as u32, cfg.tp);
                let reduce = if cfg.zero.shards_gradients() {
                    collective_time(self.cluster, Collective::ReduceScatter, &group, grad_bytes)
                } else {
                    collective_time(self.cluster, Collective::AllReduce, &group, grad_bytes)
                };
                let overlap = self
                    .cluster
                    .comm_hidden_by(f64::from(k) * self.seg.layer.bwd_s());
                exposed = (reduce - overlap).max(0.0);
                if cfg.zero.shards_optimizer() && !cfg.zero.shards_parameters() {
                    // The updated weights travel in their own dtype; where
                    // the stack overlaps it, the gather hides behind the
                    // next step's first forward of the stage's layers.
                    let weights = (p_elems * w) as f64;
                    let gather =
                        collective_time(self.cluster, Collective::AllGather, &group, weights);
                    let behind = if self.cluster.param_gather_overlaps_forward {
                        self.cluster
                            .comm_hidden_by(f64::from(k) * self.seg.layer.fwd_s())
                    } else {
                        0.0
                    };
                    exposed += (gather - behind).max(0.0);
                }
            }
            dp_comm = dp_comm.max(exposed);
            let opt_per_param = if w >= 4 { 8 } else { 12 };
            let shard = if cfg.zero.shards_optimizer() {
                dp.max(1)
            } else {
                1
            };
            let state_bytes = (p_elems * (2 * w + opt_per_param)) as f64 / shard as f64;
            let t = match self.cluster.optimizer_s_per_param {
                // Measured on the runtime's own optimizer.
                Some(per_param) => p_elems as f64 / shard as f64 * per_param,
                None => compute_time(
                    self.cluster,
                    0.0,
                    2.0 * state_bytes,
                    ComputeKind::MemoryBound,
                    DType::F32,
                ),
            };
            optimizer = optimizer.max(t);
        }
        // Tensor-parallel all-reduce of replicated weights' gradients.
        let tp_sync = stages
            .iter()
            .enumerate()
            .map(|(s, st)| {
                let k = f64::from(st.end_layer - st.first_layer);
                let mut t = k * self.seg.layer.param_sync_s();
                if self.is_first(s as u32) {
                    t += self.seg.pre.param_sync_s();
                }
                if self.is_last(s as u32) {
                    t += self.seg.post.param_sync_s();
                }
                t
            })
            .fold(0.0, f64::max);
        let step_s = pipeline_s + dp_comm + optimizer + tp_sync;
        let peak = stages
            .iter()
            .map(|s| s.memory.total_bytes())
            .max()
            .unwrap_or(0);
        Evaluation {
            step_s,
            pipeline_s,
            bubble_fraction: if step_s > 0.0 { bubble / step_s } else { 0.0 },
            dp_comm_s: dp_comm,
            optimizer_s: optimizer,
            stages,
            peak_mem_bytes: peak,
            capacity_bytes: self.capacity,
        }
    }
}

/// Evaluates a configuration with given layer counts per stage and a
/// recompute mode per stage (the brute-force reference and `--pp` plans
/// with fixed stages). `None` when a stage does not fit in memory.
pub fn evaluate_fixed(
    cluster: &Cluster,
    cfg: &Config,
    seg: &Solved,
    layers: &[u32],
    recompute: &[Recompute],
) -> Option<Evaluation> {
    let model = StageModel::new(cluster, cfg, seg);
    let mut stages = Vec::with_capacity(layers.len());
    let mut first = 0;
    for (s, (&k, &r)) in layers.iter().zip(recompute).enumerate() {
        let memory = model.memory(s as u32, k, r);
        if memory.total_bytes() > model.capacity {
            return None;
        }
        let (t, comm) = model.time(s as u32, k, r);
        stages.push(StageEval {
            first_layer: first,
            end_layer: first + k,
            recompute: r,
            micro_batch_s: t,
            tp_comm_s: comm,
            memory,
        });
        first += k;
    }
    Some(model.finish(stages))
}

/// Places stage boundaries by a dynamic program over layer intervals:
/// `best[s][n]` is the smallest achievable slowest-stage time for stages
/// `0..=s` covering the first `n` layers; each stage takes the fastest
/// recompute mode that fits. Interleaved schedules split layers evenly into
/// `pp·v` chunks. `bound` prunes configurations that cannot beat it.
/// Returns the reason when nothing fits.
pub fn place_stages(
    cluster: &Cluster,
    cfg: &Config,
    seg: &Solved,
    bound: Option<f64>,
) -> Result<Evaluation, String> {
    let model = StageModel::new(cluster, cfg, seg);
    let pp = cfg.pp;
    let l = cfg.n_layers;
    let m = cfg.n_micro as f64;
    let slots = match cfg.schedule {
        Schedule::Interleaved { chunks } => m + f64::from(pp - 1) / f64::from(chunks),
        _ => m + f64::from(pp) - 1.0,
    };
    // Lower bound: the layers' cheapest time spread perfectly.
    if let Some(b) = bound {
        let lay = &seg.layer;
        let ideal = f64::from(l) * (lay.fwd_s() + lay.bwd_s()) / f64::from(pp);
        if slots * ideal > b {
            return Err("slower than the plans already found".into());
        }
    }
    if let Schedule::Interleaved { .. } = cfg.schedule {
        let k = l / pp;
        let mut stages = Vec::with_capacity(pp as usize);
        for s in 0..pp {
            let mut st = model
                .best_stage(s, k)
                .ok_or_else(|| out_of_memory(&model, s, k))?;
            st.first_layer = s * k;
            st.end_layer = (s + 1) * k;
            stages.push(st);
        }
        return Ok(model.finish(stages));
    }
    // cost[s][k]: best stage s holding k layers (k >= 1).
    let n = l as usize;
    let mut cost: Vec<Vec<Option<StageEval>>> = Vec::with_capacity(pp as usize);
    for s in 0..pp {
        // Stage s needs at least one layer, and leaves one per later stage.
        let max_k = l - (pp - 1);
        let row = (0..=n as u32)
            .map(|k| {
                if k == 0 || k > max_k {
                    None
                } else {
                    model.best_stage(s, k)
                }
            })
            .collect();
        cost.push(row);
    }
    const INF: f64 = f64::INFINITY;
    // best[s][j] and the layer count of stage s achieving it.
    let mut best = vec![vec![INF; n + 1]; pp as usize];
    let mut choice = vec![vec![0u32; n + 1]; pp as usize];
    for j in 1..=n {
        if let Some(c) = &cost[0][j] {
            best[0][j] = c.micro_batch_s;
            choice[0][j] = j as u32;
        }
    }
    for s in 1..pp as usize {
        for j in (s + 1)..=n {
            for k in 1..=(j - s) {
                let Some(c) = &cost[s][k] else { continue };
                let prev = best[s - 1][j - k];
                if prev == INF {
                    continue;
                }
                let t = prev.max(c.micro_batch_s);
                // Ties go to the earlier (larger) last stage deterministically.
                if t < best[s][j] {
                    best[s][j] = t;
                    choice[s][j] = k as u32;
                }
            }
        }
    }
    if best[pp as usize - 1][n] == INF {
        // Say which stage cannot fit even one balanced share.
        let k = l.div_ceil(pp);
        for s in 0..pp {
            if model.best_stage(s, k).is_none() {
                return Err(out_of_memory(&model, s, k));
            }
        }
        return Err("no placement of stage boundaries fits in memory".into());
    }
    let mut counts = vec![0u32; pp as usize];
    let mut j = n;
    for s in (0..pp as usize).rev() {
        let k = choice[s][j];
        counts[s] = k;
        j -= k as usize;
    }
    let mut stages = Vec::with_capacity(pp as usize);
    let mut first = 0;
    for (s, &k) in counts.iter().enumerate() {
        let mut st = cost[s][k as usize]
            .clone()
            .ok_or_else(|| "internal: chosen stage has no cost".to_string())?;
        st.first_layer = first;
        st.end_layer = first + k;
        first += k;
        stages.push(st);
    }
    Ok(model.finish(stages))
}

fn out_of_memory(model: &StageModel<'_>, s: u32, k: u32) -> String {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let mode = model.cfg.recompute.unwrap_or(Recompute::Full);
    let need = model.memory(s, k, mode).total_bytes();
    let mut hint = Vec::new();
    if model.cfg.recompute != Some(Recompute::Full) && model.cfg.recompute.is_some() {
        hint.push("--recompute full");
    }
    if !model.cfg.zero.shards_parameters() {
        hint.push("a higher --zero");
    }
    hint.push("more --pp or --tp");
    format!(
        "stage {s} with {k} layers needs {:.1} GiB per device, capacity {:.1} GiB (after reserve): try {}",
        gib(need),
        gib(model.capacity),
        hint.join(" or ")
    )
}

/// A layer's cost figures, exposed for reports and tests.
pub fn layer_cost(seg: &Solved) -> &SegmentCost {
    &seg.layer
}
