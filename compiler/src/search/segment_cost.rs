//! What one solved segment costs per micro-batch: time split into forward,
//! backward and communication, local parameters, and the activations it
//! keeps for backward under each recompute mode.

use std::collections::BTreeMap;

use crate::anno::Layout;
use crate::cost::Cluster;
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
    /// Bytes kept for backward under each recompute mode.
    pub saved_none_bytes: u64,
    pub saved_selective_bytes: u64,
    pub saved_full_bytes: u64,
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

const PS: f64 = 1e-12;

impl SegmentCost {
    pub fn fwd_s(&self) -> f64 {
        (self.breakdown.fwd_compute + self.breakdown.fwd_comm) as f64 * PS
    }

    pub fn bwd_s(&self) -> f64 {
        (self.breakdown.bwd_compute + self.breakdown.bwd_comm) as f64 * PS
    }

    pub fn comm_s(&self) -> f64 {
        (self.breakdown.fwd_comm + self.breakdown.bwd_comm) as f64 * PS
    }

    /// Tensor-parallel weight-gradient all-reduces, once per step.
    pub fn param_sync_s(&self) -> f64 {
        self.breakdown.param_sync as f64 * PS
    }

    pub fn saved_bytes(&self, mode: Recompute) -> u64 {
        match mode {
            Recompute::None => self.saved_none_bytes,
            Recompute::Selective => self.saved_selective_bytes,
            Recompute::Full => self.saved_full_bytes,
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

        let mut params = 0u64;
        let mut param_bytes = 0u64;
        let mut max_out = 0u64;
        let mut attn_core_ps = 0i64;
        let mut saved_none: BTreeMap<TensorId, u64> = BTreeMap::new();
        let mut saved_sel: BTreeMap<TensorId, u64> = BTreeMap::new();
        let mut probs_bytes = 0u64;
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
            let is_core = matches!(op.kind, OpKind::Rope | OpKind::Attention);
            if is_core {
                attn_core_ps += ch.fwd_ps;
            }
            // Which inputs backward needs.
            let saved: Vec<usize> = match op.kind {
                OpKind::Linear | OpKind::LinearBias => vec![0],
                OpKind::RmsNorm | OpKind::LayerNorm => vec![0],
                OpKind::Attention => vec![0, 1, 2],
                OpKind::SwiGlu => vec![0, 1],
                OpKind::Gelu => vec![0],
                OpKind::Embedding => vec![0],
                OpKind::CrossEntropy => vec![0, 1],
                OpKind::Custom(_) => (0..op.inputs.len()).collect(),
                _ => vec![],
            };
            for j in saved {
                let t = op.inputs[j];
                if graph.tensor(t).role == Role::Parameter {
                    continue;
                }
                let b = local(bytes_of(t), ch.inputs[j]);
                saved_none.insert(base(t), b);
                if !is_core {
                    saved_sel.insert(base(t), b);
                }
            }
            if op.kind == OpKind::Attention {
                // The attention output is kept by its consumer (o_proj); the
                // softmax probabilities b·h·l·s are kept unless recomputed.
                let q = graph.tensor(op.inputs[0]);
                let k = graph.tensor(op.inputs[1]);
                let (b, l, h) = (q.shape[0], q.shape[1], q.shape[2]);
                let s = k.shape[1];
                let heads = if ch.split.is_some() {
                    h / u64::from(tp)
                } else {
                    h
                };
                probs_bytes += ((b * heads * l * s * q.dtype.size_bytes()) as f64 * scale) as u64;
                // Selective recompute keeps what rope and attention read.
                for &t in &op.inputs {
                    let src = match graph.producer(t) {
                        Some(p) if graph.op(p).kind == OpKind::Rope => graph.op(p).inputs[0],
                        _ => t,
                    };
                    let lay = ch.inputs[0];
                    saved_sel.insert(base(src), local(bytes_of(src), lay));
                }
            }
        }
        let boundary = seg
            .tensors
            .iter()
            .find_map(|t| t.leaves_as.map(|l| local(t.bytes, l)))
            .unwrap_or(0);
        let input = seg
            .tensors
            .iter()
            .find_map(|t| match t.source {
                Source::Boundary(l) => Some(local(t.bytes, l)),
                _ => None,
            })
            .unwrap_or(0);
        let sum = |m: &BTreeMap<TensorId, u64>| m.values().sum::<u64>();
        SegmentCost {
            breakdown,
            attn_core_fwd_s: attn_core_ps as f64 * PS,
            params,
            param_bytes,
            saved_none_bytes: sum(&saved_none) + probs_bytes,
            saved_selective_bytes: sum(&saved_sel),
            saved_full_bytes: input,
            max_op_output_bytes: max_out,
            boundary_bytes: boundary,
            splits,
        }
    }
}
