//! What one solved segment costs per micro-batch: time split into forward,
//! backward and communication, local parameters, and the activations it
//! keeps for backward under each recompute mode.

use std::collections::BTreeMap;

use crate::anno::Layout;
use crate::cost::{AttentionKernel, Cluster, MemoryStack};
use crate::ir::{Graph, OpKind, Role, TensorId};
use crate::plan::Recompute;

use super::sharding::{Breakdown, Segment, Source};

/// A segment under its chosen sharding, priced for one micro-batch.
#[derive(Clone, Debug)]
pub struct SegmentCost {
    pub breakdown: Breakdown,
    /// Forward time of the attention core (rope + attention), what
    /// selective recompute repeats in backward.
    pub attn_core_fwd_s: f64,
    /// Parameter elements held per device (tp-sharded where split).
    pub params: u64,
    pub param_bytes: u64,
    /// Bytes kept for backward under each recompute mode (full: the
    /// segment's input, [`SegmentCost::input_bytes`]).
    pub saved_none_bytes: u64,
    pub saved_selective_bytes: u64,
    /// The same as Megatron-LM counts them ([`MemoryStack::Reference`]):
    /// only what each op's backward reads, once per tensor, in the
    /// activations' dtype, a sequence-parallel input kept as the shard it
    /// was before its all-gather (Korthikanti et al. 2022's 34·s·b·h/t per
    /// GPT layer, less the dropout masks, with a fused attention kernel).
    pub reference_none_bytes: u64,
    pub reference_selective_bytes: u64,
    /// The residual stream entering the segment: what full recompute keeps
    /// (the runtime reruns whole layers, `Tape::block`).
    pub input_bytes: u64,
    /// Largest local output of one op: a bound on transient buffers.
    pub max_op_output_bytes: u64,
    /// Local bytes of the residual stream leaving the segment (what a
    /// pipeline stage sends to the next).
    pub boundary_bytes: u64,
    /// The chosen split per op, as (op, split identifier, input layouts,
    /// output layouts).
    pub splits: Vec<OpSplitChoice>,
}

#[derive(Clone, Debug)]
pub struct OpSplitChoice {
    pub op: crate::ir::OpId,
    pub split: Option<String>,
    pub inputs: Vec<Layout>,
    pub outputs: Vec<Layout>,
}

/// Seconds per picosecond. The parts are added as f64: each may have
/// saturated (`sharding::Breakdown`).
const PS: f64 = 1e-12;

impl SegmentCost {
    pub fn fwd_s(&self) -> f64 {
        (self.breakdown.fwd_compute as f64 + self.breakdown.fwd_comm as f64) * PS
    }

    pub fn bwd_s(&self) -> f64 {
        (self.breakdown.bwd_compute as f64 + self.breakdown.bwd_comm as f64) * PS
    }

    pub fn comm_s(&self) -> f64 {
        (self.breakdown.fwd_comm as f64 + self.breakdown.bwd_comm as f64) * PS
    }

    /// Tensor-parallel weight-gradient all-reduces, once per step.
    pub fn param_sync_s(&self) -> f64 {
        self.breakdown.param_sync as f64 * PS
    }

    /// Bytes kept for backward under `mode`, as `stack` counts them.
    pub fn saved_bytes(&self, stack: MemoryStack, mode: Recompute) -> u64 {
        match (stack, mode) {
            (_, Recompute::Full) => self.input_bytes,
            (MemoryStack::Autopart, Recompute::None) => self.saved_none_bytes,
            (MemoryStack::Autopart, Recompute::Selective) => self.saved_selective_bytes,
            (MemoryStack::Reference, Recompute::None) => self.reference_none_bytes,
            (MemoryStack::Reference, Recompute::Selective) => self.reference_selective_bytes,
        }
    }

    /// Extra forward work backward repeats under `mode`.
    pub fn recompute_s(&self, mode: Recompute) -> f64 {
        match mode {
            Recompute::None => 0.0,
            Recompute::Selective => self.attn_core_fwd_s,
            Recompute::Full => self.fwd_s(),
        }
    }

    /// Prices `assignment` of `seg`. `scale` multiplies graph tensor sizes
    /// (the micro-batch size when the graph was traced at batch 1).
    pub fn new(
        graph: &Graph,
        seg: &Segment,
        cluster: &Cluster,
        assignment: &[usize],
        scale: f64,
        tp: u32,
    ) -> SegmentCost {
        let breakdown = seg.breakdown(cluster, assignment);
        let local = |bytes: f64, l: Layout| -> u64 {
            let b = match l {
                Layout::D(_) => bytes / f64::from(tp),
                _ => bytes,
            };
            b.round() as u64
        };
        let bytes_of = |t: TensorId| graph.tensor(t).size_bytes() as f64 * scale;

        let mut params = 0u64;
        let mut param_bytes = 0u64;
        let mut max_out = 0u64;
        let mut attn_core_ps = 0i64;
        let mut splits = Vec::with_capacity(seg.ops.len());
        for (o, &c) in assignment.iter().enumerate() {
            let sop = &seg.ops[o];
            let op = graph.op(sop.op);
            let ch = &sop.choices[c];
            splits.push(OpSplitChoice {
                op: sop.op,
                split: ch.split.clone(),
                inputs: ch.inputs.clone(),
                outputs: ch.outputs.clone(),
            });
            for (&t, &l) in op.inputs.iter().zip(&ch.inputs) {
                let tensor = graph.tensor(t);
                if tensor.role == Role::Parameter {
                    let n = match l {
                        Layout::D(_) => tensor.numel() / u64::from(tp),
                        _ => tensor.numel(),
                    };
                    params += n;
                    param_bytes += n * tensor.dtype.size_bytes();
                }
            }
            for (&t, &l) in op.outputs.iter().zip(&ch.outputs) {
                max_out = max_out.max(local(bytes_of(t), l));
            }
            if matches!(op.kind, OpKind::Rope | OpKind::Attention) {
                attn_core_ps = attn_core_ps.saturating_add(ch.fwd_ps);
            }
        }
        let kept = kept_bytes(graph, seg, cluster, assignment, &bytes_of, &local, tp);
        let boundary = seg
            .tensors
            .iter()
            .find_map(|t| t.leaves_as.map(|l| local(t.bytes, l)))
            .unwrap_or(0);
        SegmentCost {
            breakdown,
            attn_core_fwd_s: attn_core_ps as f64 * PS,
            params,
            param_bytes,
            saved_none_bytes: kept.none,
            saved_selective_bytes: kept.selective,
            reference_none_bytes: kept.reference_none,
            reference_selective_bytes: kept.reference_selective,
            input_bytes: seg
                .tensors
                .iter()
                .find_map(|t| match t.source {
                    Source::Boundary(l) => Some(local(t.bytes, l)),
                    _ => None,
                })
                .unwrap_or(0),
            max_op_output_bytes: max_out,
            boundary_bytes: boundary,
            splits,
        }
    }
}

/// What the runtime holds between one micro-batch's forward and backward for
/// one segment kept whole and under selective recompute.
struct Kept {
    none: u64,
    selective: u64,
    /// The same as [`MemoryStack::Reference`] counts them
    /// ([`SegmentCost::reference_none_bytes`]).
    reference_none: u64,
    reference_selective: u64,
}

/// One buffer the runtime may hold: a tensor in one local layout (views such
/// as split/merge heads share their base's key), or an op's private saved
/// buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Buffer {
    Value(TensorId, Layout),
    Private { op: usize, idx: u8 },
}

/// The activations the runtime keeps, modelled on how it runs a segment
/// (`runtime/src/exec.rs`, `runtime/src/ops.rs`):
///
/// - The ops are cut into pieces as `lower` cuts them into tape segments: a
///   new piece before an op that reads a resharded input (an adapter sits
///   there) and around the attention op (always its own segment, so that it
///   can be recomputed alone).
/// - Every tape value — an output read by a later piece or leaving the
///   segment, the input of the segment, both sides of a resharding (the
///   collective's output is a new tensor) — stays on the tape until the
///   micro-batch's backward ends. (Under full recompute a layer runs as one
///   block that keeps only its input, `Tape::block`: not modelled here.)
/// - Inside a piece kept for backward, libtorch autograd saves what each op's
///   backward reads in our implementation: linear its input; RMSNorm its
///   input (in f32) and the normalised tensor (it is written as elementary
///   ops); SwiGLU gate, up and silu(gate); attention (SDPA) q, k, v, its
///   output and the row log-sum-exp, and the b·h·l·s probabilities only when
///   the cluster's kernel materialises them; cross-entropy the f32
///   log-probabilities (vocab-parallel: the f32 exponentials); embedding its
///   ids. Rope multiplies by constant tables and saves nothing of size.
/// - Selective recompute drops the attention op's private saves (the core's
///   inputs and output are tape values anyway).
fn kept_bytes(
    graph: &Graph,
    seg: &Segment,
    cluster: &Cluster,
    assignment: &[usize],
    bytes_of: &dyn Fn(TensorId) -> f64,
    local: &dyn Fn(f64, Layout) -> u64,
    tp: u32,
) -> Kept {
    // Views (split/merge heads) share their input's storage.
    let base = |mut t: TensorId| -> TensorId {
        while let Some(p) = graph.producer(t) {
            let op = graph.op(p);
            if matches!(op.kind, OpKind::SplitHeads | OpKind::MergeHeads) {
                t = op.inputs[0];
            } else {
                break;
            }
        }
        t
    };
    let choice = |o: usize| &seg.ops[o].choices[assignment[o]];
    let by_id: BTreeMap<TensorId, &super::sharding::SegTensor> =
        seg.tensors.iter().map(|t| (t.id, t)).collect();
    // The layout a tensor is produced in (None: parameters and data, which
    // any consumer reads in its own layout for free).
    let produced = |t: TensorId| -> Option<Layout> {
        match by_id.get(&t)?.source {
            Source::Op(p, out) => Some(choice(p).outputs[out]),
            Source::Boundary(l) => Some(l),
            Source::Data | Source::Param => None,
        }
    };
    let is_float = |t: TensorId| graph.tensor(t).dtype.is_float();

    // Pieces, as lower cuts the ops into tape segments.
    let mut piece = vec![0usize; seg.ops.len()];
    let mut cur = 0usize;
    let mut open = false;
    let mut after_attention = false;
    for (o, sop) in seg.ops.iter().enumerate() {
        let op = graph.op(sop.op);
        let ch = choice(o);
        let resharded = op
            .inputs
            .iter()
            .zip(&ch.inputs)
            .any(|(&t, &l)| produced(t).is_some_and(|p| p != l));
        let attention = op.kind == OpKind::Attention;
        if open && (resharded || attention || after_attention) {
            cur += 1;
        }
        piece[o] = cur;
        open = true;
        after_attention = attention;
    }

    let mut tape: BTreeMap<Buffer, u64> = BTreeMap::new();
    let value = |map: &mut BTreeMap<Buffer, u64>, t: TensorId, l: Layout| {
        map.insert(Buffer::Value(base(t), l), local(bytes_of(t), l));
    };
    for t in &seg.tensors {
        if !is_float(t.id) {
            continue;
        }
        match t.source {
            Source::Boundary(l) => value(&mut tape, t.id, l),
            Source::Op(p, out) => {
                let l = choice(p).outputs[out];
                let later = t.consumers.iter().any(|&(o, _)| piece[o] != piece[p]);
                if later || t.leaves_as.is_some() {
                    value(&mut tape, t.id, l);
                }
            }
            Source::Data | Source::Param => {}
        }
        if let Some(from) = produced(t.id) {
            for &(o, j) in &t.consumers {
                let to = choice(o).inputs[j];
                if to != from {
                    value(&mut tape, t.id, from);
                    value(&mut tape, t.id, to);
                }
            }
        }
    }

    // What autograd saves, per piece; the attention op's private saves apart.
    let n_pieces = cur + 1;
    let mut saved: Vec<BTreeMap<Buffer, u64>> = vec![BTreeMap::new(); n_pieces];
    let mut reference: BTreeMap<Buffer, u64> = BTreeMap::new();
    let mut attention_private = 0u64;
    for (o, sop) in seg.ops.iter().enumerate() {
        let op = graph.op(sop.op);
        let ch = choice(o);
        let map = &mut saved[piece[o]];
        let input = |j: usize| -> Option<(TensorId, Layout)> {
            let t = *op.inputs.get(j)?;
            (graph.tensor(t).role != Role::Parameter).then_some((t, ch.inputs[j]))
        };
        let inputs = inputs_saved(&op.kind, op.inputs.len());
        for j in inputs {
            if let Some((t, l)) = input(j) {
                value(map, t, l);
            }
        }
        // Megatron's saves: the op's activation inputs (a norm's too, its
        // statistics aside), a resharded input as the shard it came from.
        let megatron: Vec<usize> = match op.kind {
            OpKind::RmsNorm => vec![0],
            OpKind::Attention => vec![0, 1, 2],
            _ => inputs_saved(&op.kind, op.inputs.len()),
        };
        for j in megatron {
            if let Some((t, l)) = input(j) {
                let kept = match produced(t) {
                    Some(p @ Layout::D(_)) => p,
                    _ => l,
                };
                value(&mut reference, t, kept);
            }
        }
        let private = |map: &mut BTreeMap<Buffer, u64>, idx: u8, bytes: u64| {
            map.insert(Buffer::Private { op: o, idx }, bytes);
        };
        match op.kind {
            OpKind::RmsNorm => {
                // x in f32 (x itself when f32, else a copy) and the
                // normalised x·rsqrt(mean x²) in x's dtype.
                if let Some((t, l)) = input(0) {
                    let b = local(bytes_of(t), l);
                    let w = graph.tensor(t).dtype.size_bytes().max(1);
                    if w >= 4 {
                        value(map, t, l);
                    } else {
                        private(map, 1, (b / w).saturating_mul(4));
                    }
                    private(map, 0, b);
                }
            }
            OpKind::SwiGlu => {
                // silu(gate), the left factor of the product.
                if let Some((t, l)) = input(0) {
                    private(map, 0, local(bytes_of(t), l));
                }
            }
            OpKind::CrossEntropy => {
                // f32 log-probabilities (or exponentials) of the local logits.
                if let Some((t, l)) = input(0) {
                    let w = graph.tensor(t).dtype.size_bytes().max(1);
                    let bytes = (local(bytes_of(t), l) / w).saturating_mul(4);
                    private(map, 0, bytes);
                    private(&mut reference, 0, bytes);
                }
            }
            OpKind::Attention => {
                let out = op.outputs[0];
                value(map, out, ch.outputs[0]);
                let q = graph.tensor(op.inputs[0]);
                let k = graph.tensor(op.inputs[1]);
                let (b, l, h) = (q.shape[0], q.shape[1], q.shape[2]);
                let s = k.shape[1];
                let heads = if ch.split.is_some() {
                    h / u64::from(tp)
                } else {
                    h
                };
                let scale = bytes_of(op.inputs[0]) / q.size_bytes().max(1) as f64;
                // Row log-sum-exp (f32), and the probabilities where the
                // kernel writes them out.
                // In f64: l·s overflows u64 at long sequences.
                let rows = b as f64 * heads as f64 * l as f64;
                let mut bytes = rows * 4.0 * scale;
                if cluster.attention_kernel == AttentionKernel::Materialized {
                    bytes += rows * s as f64 * q.dtype.size_bytes() as f64 * scale;
                }
                private(map, 0, bytes as u64);
                private(&mut reference, 0, bytes as u64);
                value(&mut reference, out, ch.outputs[0]);
                attention_private = attention_private.saturating_add(bytes as u64);
            }
            _ => {}
        }
    }
    // Sizes scale with the micro-batch: sums saturate (and then do not fit).
    let sum = |m: &BTreeMap<Buffer, u64>| m.values().fold(0u64, |a, &b| a.saturating_add(b));
    let mut all = tape.clone();
    for m in &saved {
        all.extend(m.iter().map(|(k, v)| (*k, *v)));
    }
    let none = sum(&all);
    let reference_none = sum(&reference);
    Kept {
        none,
        selective: none.saturating_sub(attention_private),
        reference_none,
        reference_selective: reference_none.saturating_sub(attention_private),
    }
}

/// The inputs (by position) whose values an op's backward reads in the
/// runtime's implementation (parameters are skipped by the caller).
fn inputs_saved(kind: &OpKind, n_inputs: usize) -> Vec<usize> {
    match kind {
        OpKind::Linear | OpKind::LinearBias | OpKind::Gelu | OpKind::Embedding => vec![0],
        OpKind::LayerNorm => vec![0],
        OpKind::Attention | OpKind::SwiGlu => (0..n_inputs).collect(),
        OpKind::CrossEntropy => vec![1],
        OpKind::Custom(_) => (0..n_inputs).collect(),
        _ => vec![],
    }
}
