//! Turning a search [`Candidate`] into the serialisable [`Plan`].

use crate::ir::Graph;
use crate::plan::DType;
use crate::plan::{
    FORMAT_VERSION, MeshSpec, ModelRef, OpSplit, Plan, Prediction, StagePlan, StagePrediction,
    TraceSpec,
};

use super::Candidate;
use crate::plan::layer_pattern;

/// What a plan records about where it came from.
#[derive(Clone, Debug)]
pub struct PlanContext<'a> {
    pub graph: &'a Graph,
    pub model_spec: &'a str,
    pub family: &'a str,
    pub annotation_files: Vec<String>,
    /// The custom loss op the model was traced with.
    pub loss_op: Option<String>,
    pub cluster: &'a str,
    pub seq_len: u64,
    pub dtype: DType,
    pub plan_gpus: u32,
    pub runtime_gpus: u32,
    pub global_batch: u64,
    /// Training FLOPs per token (forward + backward, no recompute).
    pub flops_per_token: f64,
    /// Peak FLOP/s of one device at `dtype`.
    pub peak_flops_per_s: f64,
}

fn layouts(ls: &[crate::anno::Layout]) -> Vec<String> {
    ls.iter().map(ToString::to_string).collect()
}

/// Builds the plan for `candidate`.
pub fn to_plan(ctx: &PlanContext<'_>, candidate: &Candidate) -> Plan {
    let cfg = &candidate.config;
    let eval = &candidate.eval;
    let pp = cfg.pp;
    let stages: Vec<StagePlan> = eval
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| StagePlan {
            index: i as u32,
            first_layer: s.first_layer,
            end_layer: s.end_layer,
            embedding: i == 0,
            head: i as u32 + 1 == pp,
            recompute: s.recompute,
        })
        .collect();
    // One entry per template-layer op (written with `*`) and per op
    // outside the layers, in graph order.
    let mut sharding: Vec<OpSplit> = Vec::new();
    for (id, split, ins, outs) in &candidate.splits {
        let op = ctx.graph.op(*id);
        let name = layer_pattern(&op.name, op.layer);
        if sharding.iter().any(|s| s.op == name) {
            continue;
        }
        sharding.push(OpSplit {
            op: name,
            kind: op.kind.name().to_string(),
            split: split.clone(),
            inputs: layouts(ins),
            outputs: layouts(outs),
        });
    }
    let tokens = ctx.global_batch as f64 * ctx.seq_len as f64;
    let tokens_per_s = tokens / eval.step_s;
    let mfu = ctx.flops_per_token * tokens
        / (eval.step_s * f64::from(ctx.runtime_gpus) * ctx.peak_flops_per_s);
    Plan {
        format_version: FORMAT_VERSION,
        model: ModelRef {
            spec: ctx.model_spec.to_string(),
            name: ctx.graph.name.clone(),
            family: ctx.family.to_string(),
            params: ctx.graph.n_params(),
            annotation_files: ctx.annotation_files.clone(),
            loss_op: ctx.loss_op.clone(),
        },
        trace: TraceSpec {
            seq_len: ctx.seq_len,
            dtype: ctx.dtype,
            kv_copies: candidate.kv_copies,
        },
        cluster: ctx.cluster.to_string(),
        plan_gpus: ctx.plan_gpus,
        runtime_gpus: ctx.runtime_gpus,
        global_batch: ctx.global_batch,
        mesh: MeshSpec {
            tp: cfg.tp,
            pp: cfg.pp,
            dp: cfg.dp,
            order: vec!["tp".into(), "dp".into(), "pp".into()],
        },
        micro_batch: cfg.micro_batch,
        n_micro_batches: cfg.n_micro,
        schedule: cfg.schedule,
        zero: cfg.zero,
        reduce_dtype: cfg.reduce_dtype,
        sequence_parallel: cfg.sp,
        stages,
        sharding,
        prediction: Prediction {
            step_s: eval.step_s,
            tokens_per_s,
            mfu,
            bubble_fraction: eval.bubble_fraction,
            dp_comm_s: eval.dp_comm_s,
            stages: eval
                .stages
                .iter()
                .map(|s| StagePrediction {
                    micro_batch_s: s.micro_batch_s,
                    tp_comm_s: s.tp_comm_s,
                    memory: s.memory.clone(),
                })
                .collect(),
            peak_mem_bytes: eval.peak_mem_bytes,
            capacity_bytes: eval.capacity_bytes,
        },
    }
}
