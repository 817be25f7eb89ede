//! The `Plan`: what the search chose, written as `plan.ron`.
//!
//! A plan is the contract between the search and lowering: with the graph
//! (re-traced from `model` and `trace`), it says everything lowering needs —
//! the mesh, the pipeline stages and their layers, the tensor-parallel split
//! of every op, the schedule, micro-batching, recompute, ZeRO and sequence
//! parallelism — plus the predictions that justified it. It is plain data:
//! serde, RON, stable field order, no maps with unstable iteration.
//!
//! This module owns the type, its validation against a graph and world
//! size, and its human-readable report. It does not search or cost.

mod report;
mod validate;

use serde::{Deserialize, Serialize};

pub use report::{render_alternatives, render_report, render_summary};
pub use validate::{
    PlanError, layer_pattern, parse_plan, plan_to_ron, read_plan, validate_plan, write_plan,
};

/// Current `plan.ron` format version.
pub const FORMAT_VERSION: u32 = 1;

/// The plan's closed vocabulary, shared with the runtime.
pub use autopart_vocab::{DType, Recompute, Schedule, ZeroStage};

/// Where the model comes from, so lowering can trace the same graph.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRef {
    /// The `--model` argument: a preset name or a config.json path.
    pub spec: String,
    pub name: String,
    pub family: String,
    /// Parameter count of the traced graph: a check that the same model is meant.
    pub params: u64,
    /// User annotation files the graph needs (custom ops).
    pub annotation_files: Vec<String>,
    /// The custom op replacing the head's projection and cross-entropy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_op: Option<String>,
}

/// The tracing inputs: the graph each pipeline stage runs is the model
/// traced at one micro-batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceSpec {
    pub seq_len: u64,
    /// Written as its name: `bf16`, `f16` or `f32`.
    pub dtype: DType,
    /// Copies of each GQA kv head in the traced graph (1, not written,
    /// unless tp exceeds the kv heads: then tp / kv, one kv head per tp rank).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub kv_copies: u64,
}

fn one() -> u64 {
    1
}

pub(crate) fn fp32() -> DType {
    DType::Fp32
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_fp32(d: &DType) -> bool {
    *d == DType::Fp32
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_one(n: &u64) -> bool {
    *n == 1
}

/// Mesh axes. `order` lists them innermost first (tp innermost keeps tensor
/// parallel groups inside a node).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshSpec {
    pub tp: u32,
    pub pp: u32,
    pub dp: u32,
    pub order: Vec<String>,
}

/// One pipeline stage: a contiguous range of transformer layers; the first
/// stage also holds the embedding, the last the final norm, head and loss.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StagePlan {
    pub index: u32,
    /// First transformer layer (inclusive).
    pub first_layer: u32,
    /// One past the last transformer layer.
    pub end_layer: u32,
    pub embedding: bool,
    pub head: bool,
    pub recompute: Recompute,
}

/// The tensor-parallel split of one op: which annotation identifier is
/// split across the tp axis (`None`: the op runs replicated), and the
/// resulting layouts, for readers and for lowering's checks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpSplit {
    /// Op source name; transformer-layer ops are written with the layer
    /// index as `*` (`layers.*.self_attn.q_proj`) and apply to every layer.
    pub op: String,
    pub kind: String,
    pub split: Option<String>,
    /// Input layouts under the split (`R`, `V`, `D(2)`).
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
}

/// Peak memory of one device of a stage, by cause.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryBreakdown {
    pub params_bytes: u64,
    pub grads_bytes: u64,
    pub optimizer_bytes: u64,
    pub activations_bytes: u64,
    pub transient_bytes: u64,
    /// Freed memory the host allocator keeps on top of the live peak
    /// (`Cluster::allocator_overhead`).
    #[serde(default)]
    pub allocator_bytes: u64,
}

impl MemoryBreakdown {
    /// The sum, saturating (a plan read from a file may hold any figures;
    /// the search's own saturate when they cannot fit).
    pub fn total_bytes(&self) -> u64 {
        [
            self.params_bytes,
            self.grads_bytes,
            self.optimizer_bytes,
            self.activations_bytes,
            self.transient_bytes,
            self.allocator_bytes,
        ]
        .into_iter()
        .fold(0, u64::saturating_add)
    }
}

/// Predicted time and memory of one stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StagePrediction {
    /// Forward + backward time of one micro-batch, communication included.
    pub micro_batch_s: f64,
    /// Of which tensor-parallel communication that is not overlapped.
    pub tp_comm_s: f64,
    pub memory: MemoryBreakdown,
}

/// What the cost model predicts for the plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prediction {
    pub step_s: f64,
    pub tokens_per_s: f64,
    /// Model FLOPs utilisation: 6N-style model FLOPs (no recompute) over
    /// the plan GPUs' peak.
    pub mfu: f64,
    /// Pipeline bubble as a fraction of the step.
    pub bubble_fraction: f64,
    /// Data-parallel gradient synchronisation left exposed after overlap.
    pub dp_comm_s: f64,
    pub stages: Vec<StagePrediction>,
    /// Largest per-device peak over the stages.
    pub peak_mem_bytes: u64,
    pub capacity_bytes: u64,
}

/// A complete parallel training plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub format_version: u32,
    pub model: ModelRef,
    pub trace: TraceSpec,
    pub cluster: String,
    pub plan_gpus: u32,
    /// A multiple of `plan_gpus`: the plan is replicated with data parallelism.
    pub runtime_gpus: u32,
    pub global_batch: u64,
    pub mesh: MeshSpec,
    pub micro_batch: u64,
    pub n_micro_batches: u64,
    pub schedule: Schedule,
    /// Written as its number, 0 to 3.
    pub zero: ZeroStage,
    /// The dtype gradients are summed in over dp; f32 is not written.
    #[serde(default = "fp32", skip_serializing_if = "is_fp32")]
    pub reduce_dtype: DType,
    pub sequence_parallel: bool,
    pub stages: Vec<StagePlan>,
    pub sharding: Vec<OpSplit>,
    pub prediction: Prediction,
}

impl StagePlan {
    /// Number of transformer layers on the stage (0 if the range is empty
    /// or reversed).
    pub fn n_layers(&self) -> u32 {
        self.end_layer.saturating_sub(self.first_layer)
    }
}

impl Plan {
    /// How many copies of the plan run side by side (`runtime_gpus /
    /// plan_gpus`, at least 1 where the plan is not yet validated).
    pub fn replicas(&self) -> u32 {
        self.runtime_gpus
            .checked_div(self.plan_gpus)
            .unwrap_or(1)
            .max(1)
    }

    /// Tokens consumed by one optimizer step over all runtime GPUs.
    pub fn tokens_per_step(&self) -> u64 {
        self.global_batch.saturating_mul(self.trace.seq_len)
    }
}
