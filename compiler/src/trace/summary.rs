//! What `autopart trace` reports about a traced graph: parameters by kind,
//! ops by kind, FLOPs per token.
//!
//! FLOPs come from the annotation files' formulas (forward FLOPs per op);
//! training FLOPs are 3 × forward (backward computes gradients for inputs and
//! weights, twice the forward's matmul work), with no recompute and no causal
//! discount of attention.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;
use thiserror::Error;

use crate::anno::Registry;
use crate::ir::{Graph, OpKind, Role};

#[derive(Debug, Error)]
pub enum SummaryError {
    #[error("op {op} ({site}): {detail}")]
    Flops {
        op: String,
        site: String,
        detail: String,
    },
}

/// Headline figures of a traced model.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub model: String,
    pub family: String,
    pub batch: u64,
    pub seq_len: u64,
    pub n_layers: u32,
    pub n_ops: usize,
    pub n_tensors: usize,
    /// Trainable parameters (a tied weight counts once).
    pub params: u64,
    /// Parameters grouped as embedding, attention, mlp, norm, head.
    pub params_by_kind: BTreeMap<String, u64>,
    pub ops_by_kind: BTreeMap<String, usize>,
    /// Forward FLOPs of one step over the whole batch.
    pub forward_flops: f64,
    /// Training FLOPs (forward + backward, no recompute) per token.
    pub flops_per_token: f64,
}

fn param_kind(graph: &Graph, id: crate::ir::TensorId) -> &'static str {
    let Some(&first) = graph.consumers(id).first() else {
        return "unused";
    };
    let op = graph.op(first);
    match op.kind {
        OpKind::Embedding | OpKind::PosEmbedding => "embedding",
        OpKind::RmsNorm | OpKind::LayerNorm => "norm",
        _ if op.name.starts_with("lm_head") => "head",
        _ if op.name.contains("attn") => "attention",
        _ if op.name.contains("mlp") => "mlp",
        _ => "other",
    }
}

impl Summary {
    pub fn new(graph: &Graph, family: &str, registry: &Registry) -> Result<Self, SummaryError> {
        let tokens = graph
            .tensors()
            .find(|(_, t)| t.role == Role::Input)
            .map(|(_, t)| t.shape.clone())
            .unwrap_or_default();
        let (batch, seq_len) = (
            tokens.first().copied().unwrap_or(0),
            tokens.get(1).copied().unwrap_or(0),
        );
        let mut params_by_kind = BTreeMap::new();
        for (id, t) in graph.parameters() {
            *params_by_kind
                .entry(param_kind(graph, id).to_string())
                .or_insert(0) += t.numel();
        }
        let mut ops_by_kind = BTreeMap::new();
        let mut forward_flops = 0.0;
        for (_, op) in graph.ops() {
            *ops_by_kind.entry(op.kind.name().to_string()).or_insert(0) += 1;
            let err = |detail: String| SummaryError::Flops {
                op: op.kind.name().to_string(),
                site: op.name.clone(),
                detail,
            };
            let sig = registry
                .get(op.kind.name())
                .ok_or_else(|| err("no annotation file registers this op".into()))?;
            let shapes = |ids: &[crate::ir::TensorId]| -> Vec<Vec<u64>> {
                ids.iter().map(|&t| graph.tensor(t).shape.clone()).collect()
            };
            let (ins, outs) = (shapes(&op.inputs), shapes(&op.outputs));
            let ins: Vec<Option<&[u64]>> = ins.iter().map(|s| Some(s.as_slice())).collect();
            let outs: Vec<Option<&[u64]>> = outs.iter().map(|s| Some(s.as_slice())).collect();
            let attrs = op.int_attrs();
            let binding = op
                .annotation
                .bind(&ins, &outs, &attrs)
                .map_err(|e| err(e.to_string()))?;
            let flops = sig
                .flops
                .eval(&binding, &attrs)
                .map_err(|e| err(e.to_string()))?;
            // Ops costed by profiling contribute no analytic FLOPs here.
            forward_flops += flops.unwrap_or(0.0);
        }
        let n_tokens = (batch * seq_len).max(1) as f64;
        Ok(Summary {
            model: graph.name.clone(),
            family: family.to_string(),
            batch,
            seq_len,
            n_layers: graph.n_layers(),
            n_ops: graph.n_ops(),
            n_tensors: graph.n_tensors(),
            params: graph.n_params(),
            params_by_kind,
            ops_by_kind,
            forward_flops,
            flops_per_token: 3.0 * forward_flops / n_tokens,
        })
    }
}

/// Formats a count with an SI suffix: 8.03 B, 176.2 M.
pub fn si(v: f64) -> String {
    let (div, suffix) = if v >= 1e15 {
        (1e15, " P")
    } else if v >= 1e12 {
        (1e12, " T")
    } else if v >= 1e9 {
        (1e9, " G")
    } else if v >= 1e6 {
        (1e6, " M")
    } else if v >= 1e3 {
        (1e3, " k")
    } else {
        (1.0, " ")
    };
    format!("{:.2}{}", v / div, suffix)
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "model {} ({}), traced at batch {} x seq {}",
            self.model, self.family, self.batch, self.seq_len
        )?;
        writeln!(
            f,
            "  layers {}, ops {}, tensors {}",
            self.n_layers, self.n_ops, self.n_tensors
        )?;
        writeln!(f)?;
        writeln!(f, "  parameters            count      share")?;
        for (kind, n) in &self.params_by_kind {
            writeln!(
                f,
                "    {kind:<12} {:>14}   {:>6.2}%",
                n,
                100.0 * *n as f64 / self.params.max(1) as f64
            )?;
        }
        writeln!(
            f,
            "    {:<12} {:>14}   ({})",
            "total",
            self.params,
            si(self.params as f64).trim_end().replace('G', "B")
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "  training FLOPs per token (fwd+bwd, no recompute): {}FLOP",
            si(self.flops_per_token)
        )?;
        writeln!(
            f,
            "  forward FLOPs per step: {}FLOP",
            si(self.forward_flops)
        )?;
        writeln!(f)?;
        writeln!(f, "  ops by kind")?;
        for (kind, n) in &self.ops_by_kind {
            writeln!(f, "    {kind:<14} {n:>6}")?;
        }
        Ok(())
    }
}
