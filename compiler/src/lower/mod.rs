//! `lower`: Graph + Plan → [`ExecProgram`], what every rank of every pipeline
//! stage runs.
//!
//! The graph is traced at one micro-batch. Its ops fall into three kinds of
//! **blocks**: the embedding (ops before the first transformer layer), the
//! layer (every transformer layer is lowered and checked to be the same
//! block up to its index, so one block serves them all) and the head (final
//! norm, projection, loss). Blocks meet at the **stream**, the one tensor
//! that flows from block to block (the residual stream), always in the same
//! [`State`]; a pipeline stage sends and receives it.
//!
//! Inside a block each op runs on its shard under the plan's split; its
//! inputs are read in the state its partition rule asks for, and wherever a
//! producer's state differs, the cheapest chain of adapters
//! ([`adapter::cheapest_path`], priced by the cost model) is inserted, and
//! shared by every consumer that wants the same state. Ops between adapters
//! form **segments**, the runtime's unit of autograd and recompute (under
//! selective recompute the attention core is a segment of its own).
//! Parameters keep the layout their consumer reads them in; those read
//! replicated by ops that run on shards get partial gradients, completed by an
//! all-reduce over tp (the gradient reducers), and every gradient is then
//! averaged over dp (bucketed, or ZeRO-sharded).
//!
//! [`verify`] checks that every value's state agrees at both ends of every
//! edge; [`ExecProgram`] prints as text (`autopart compile --dump-program`).

pub mod adapter;
mod build;
mod display;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use adapter::{AdapterCost, AdapterKind, State, cheapest_path};
pub use build::{LowerError, lower};

use crate::anno::Layout;
use crate::ir::{AttrValue, DType, OpKind};
use crate::plan::{Recompute, Schedule, ZeroStage};

/// A value of a block: a tensor on this rank (a shard, a replica or a partial sum).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Vid(pub u32);

impl Vid {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// One value of a block.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ValueDecl {
    /// A readable name, unique in its block (`q_proj`, `q_proj_r`).
    pub name: String,
    /// The shape on one rank for one micro-batch.
    pub shape: Vec<u64>,
    pub dtype: DType,
    pub state: State,
}

/// Where a block's inputs come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BlockInput {
    /// The stream from the previous block (or stage).
    Stream,
    /// The micro-batch's token ids `[b, l]`.
    Tokens,
    /// The micro-batch's labels `[b, l]`.
    Labels,
}

/// An op's operand.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Operand {
    Value(Vid),
    /// A parameter, by name; in the layer block the layer index is `*`.
    Param(String),
}

/// One traced op, run locally on this rank's shards.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LocalOp {
    /// The traced op's name (`layers.*.self_attn.q_proj` in the layer block).
    pub traced: String,
    pub kind: OpKind,
    /// The identifier the op is split on over tp (`None`: replicated).
    pub split: Option<String>,
    /// The annotation the op was traced with, for comments.
    pub annotation: String,
    pub inputs: Vec<Operand>,
    /// The state each input is read in.
    pub input_states: Vec<State>,
    pub outputs: Vec<Vid>,
    /// Attributes with shard-local values (a head count divided by tp when
    /// heads are split).
    pub attrs: BTreeMap<String, AttrValue>,
    /// This shard's offset along the split dim is `tp_rank * unit` (vocab
    /// start of an embedding split by vocab, first position of a rope or
    /// position embedding split by sequence).
    pub offset_unit: Option<u64>,
}

/// Local ops between two communication points.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Segment {
    pub name: String,
    /// The attention core: recomputed under selective recompute.
    pub attention_core: bool,
    pub inputs: Vec<Vid>,
    pub ops: Vec<LocalOp>,
    pub outputs: Vec<Vid>,
}

/// One step of a block, in program order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Step {
    Segment(Segment),
    Adapter {
        kind: AdapterKind,
        input: Vid,
        output: Vid,
    },
}

/// Which part of the model a block is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BlockKind {
    Embed,
    Layer,
    Head,
}

/// A straight-line program from block inputs to one output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Block {
    pub kind: BlockKind,
    /// Inputs, in order: values `0..inputs.len()`.
    pub inputs: Vec<BlockInput>,
    pub values: Vec<ValueDecl>,
    pub steps: Vec<Step>,
    /// The stream (embed, layer) or the loss share (head).
    pub output: Vid,
}

impl Block {
    pub fn value(&self, v: Vid) -> Option<&ValueDecl> {
        self.values.get(v.index())
    }

    /// Every local op, in order.
    pub fn ops(&self) -> impl Iterator<Item = &LocalOp> {
        self.steps.iter().flat_map(|s| match s {
            Step::Segment(seg) => seg.ops.as_slice(),
            Step::Adapter { .. } => &[],
        })
    }

    /// Every adapter, in order.
    pub fn adapters(&self) -> impl Iterator<Item = (AdapterKind, Vid, Vid)> + '_ {
        self.steps.iter().filter_map(|s| match s {
            Step::Adapter {
                kind,
                input,
                output,
            } => Some((*kind, *input, *output)),
            Step::Segment(_) => None,
        })
    }
}

/// How a parameter's full tensor is initialised (the runtime's `exec::Init`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum ParamInit {
    Normal { std: f64 },
    Ones,
    Zeros,
}

/// A parameter of the model, with its tp layout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParamDecl {
    /// The full name (HF naming: `model.layers.3.mlp.up_proj.weight`).
    pub name: String,
    /// The name with the layer index as `*`, as layer-block operands give it.
    pub pattern: String,
    pub layer: Option<u32>,
    pub block: BlockKind,
    pub shape: Vec<u64>,
    pub local_shape: Vec<u64>,
    pub dtype: DType,
    pub init: ParamInit,
    /// The dim split over tp, `None` when replicated.
    pub tp_dim: Option<usize>,
    /// Read replicated by ops on shards: each tp rank's gradient is a partial
    /// sum, all-reduced over tp after backward.
    pub tp_grad_partial: bool,
    /// Traced as copies ([`crate::ir::Graph::copies`]): `shape` holds each
    /// block of `tp_dim` this many times in a row, the model's tensor once;
    /// tp ranks `m·j .. m·j+m` hold block `j` and their gradients sum.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub copies: u64,
    /// Other blocks reading it (tied weights: GPT's embedding read by the
    /// head). With pp > 1 the stage of each holds a copy, and the runtime
    /// sums their gradients between the stages.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tied_blocks: Vec<BlockKind>,
}

fn one() -> u64 {
    1
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_one(n: &u64) -> bool {
    *n == 1
}

impl ParamDecl {
    /// The model's shape: `shape` with each copied block once.
    pub fn model_shape(&self) -> Vec<u64> {
        let mut shape = self.shape.clone();
        if let Some(d) = self.tp_dim
            && let Some(len) = shape.get_mut(d)
        {
            *len /= self.copies.max(1);
        }
        shape
    }
}

/// One pipeline stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageProgram {
    pub index: u32,
    /// The layers of each model chunk the stage holds (one chunk unless the
    /// schedule is interleaved; chunk `c` is virtual stage `c * pp + index`).
    pub chunks: Vec<(u32, u32)>,
    pub embedding: bool,
    pub head: bool,
    pub recompute: Recompute,
    pub predicted_peak_bytes: u64,
}

/// What every rank of every stage runs: the blocks, the stages that chain
/// them, the parameters and the step's shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExecProgram {
    pub model: String,
    pub family: String,
    pub tp: u32,
    pub pp: u32,
    /// Data parallelism of one plan copy.
    pub dp: u32,
    pub plan_gpus: u32,
    pub runtime_gpus: u32,
    pub micro_batch: u64,
    /// Micro-batches per dp rank and step.
    pub micro_batches: u64,
    /// Sequences per optimizer step over all runtime GPUs.
    pub global_batch: u64,
    pub seq_len: u64,
    pub vocab: u64,
    pub schedule: Schedule,
    pub zero: ZeroStage,
    /// The dtype parameters and activations train in (f32 when not written).
    #[serde(default = "crate::plan::fp32")]
    pub dtype: crate::plan::DType,
    /// The dtype gradients are summed in over dp.
    #[serde(default = "crate::plan::fp32")]
    pub reduce_dtype: crate::plan::DType,
    pub sequence_parallel: bool,
    pub predicted_step_s: f64,
    /// The stream's shape on one rank for one micro-batch, and its state.
    pub stream_shape: Vec<u64>,
    pub stream_state: State,
    pub embed: Block,
    pub layer: Block,
    pub head: Block,
    pub params: Vec<ParamDecl>,
    pub stages: Vec<StageProgram>,
}

impl ExecProgram {
    /// The parameters a stage holds, in model order.
    pub fn stage_params(&self, stage: &StageProgram) -> Vec<&ParamDecl> {
        self.params
            .iter()
            .filter(|p| match p.block {
                BlockKind::Embed => stage.embedding,
                BlockKind::Head => stage.head,
                BlockKind::Layer => p
                    .layer
                    .is_some_and(|l| stage.chunks.iter().any(|&(a, b)| (a..b).contains(&l))),
            })
            .collect()
    }

    /// Whether the last stage's loss share is a partial sum over tp.
    pub fn loss_is_partial(&self) -> bool {
        self.head
            .value(self.head.output)
            .is_some_and(|v| v.state.fwd == Layout::V)
    }

    pub fn blocks(&self) -> [&Block; 3] {
        [&self.embed, &self.layer, &self.head]
    }
}

/// Why an [`ExecProgram`] is inconsistent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("lowered program is inconsistent:\n  {}", .0.join("\n  "))]
pub struct VerifyError(pub Vec<String>);

/// Checks every edge: each adapter reads and makes the states it is for,
/// each op reads its inputs in the states its split asks for, values are
/// defined before use and belong to the block, the blocks meet at the
/// stream's state, and every parameter operand names a parameter.
pub fn verify(program: &ExecProgram) -> Result<(), VerifyError> {
    let mut problems = Vec::new();
    for block in program.blocks() {
        verify_block(program, block, &mut problems);
    }
    let stream = program.stream_state;
    let state_of = |b: &Block, v: Vid| b.value(v).map(|d| d.state);
    if state_of(&program.embed, program.embed.output) != Some(stream) {
        problems.push(format!(
            "embed block does not end in the stream's state {stream}"
        ));
    }
    if state_of(&program.layer, program.layer.output) != Some(stream) {
        problems.push(format!(
            "layer block does not end in the stream's state {stream}"
        ));
    }
    for block in [&program.layer, &program.head] {
        for (i, input) in block.inputs.iter().enumerate() {
            if *input == BlockInput::Stream && state_of(block, Vid(i as u32)) != Some(stream) {
                problems.push(format!(
                    "{:?} block does not start in the stream's state {stream}",
                    block.kind
                ));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(VerifyError(problems))
    }
}

fn verify_block(program: &ExecProgram, block: &Block, problems: &mut Vec<String>) {
    let kind = block.kind;
    let mut defined = vec![false; block.values.len()];
    for i in 0..block.inputs.len() {
        if let Some(d) = defined.get_mut(i) {
            *d = true;
        }
    }
    let check_use = |v: Vid, what: &str, defined: &[bool], problems: &mut Vec<String>| {
        if !defined.get(v.index()).copied().unwrap_or(false) {
            problems.push(format!(
                "{kind:?}: {what} reads %{} before it is defined",
                v.0
            ));
        }
    };
    let param_names: BTreeMap<&str, &ParamDecl> = program
        .params
        .iter()
        .map(|p| (p.pattern.as_str(), p))
        .collect();
    for step in &block.steps {
        match step {
            Step::Adapter {
                kind: adapter,
                input,
                output,
            } => {
                check_use(*input, &adapter.to_string(), &defined, problems);
                let (from, to) = adapter.states();
                let (Some(i), Some(o)) = (block.value(*input), block.value(*output)) else {
                    problems.push(format!(
                        "{kind:?}: {adapter} names a value that does not exist"
                    ));
                    continue;
                };
                if i.state != from || o.state != to {
                    problems.push(format!(
                        "{kind:?}: {adapter} maps {from} to {to} but reads {} ({}) and makes {} ({})",
                        i.name, i.state, o.name, o.state
                    ));
                }
                if let Some(d) = defined.get_mut(output.index()) {
                    *d = true;
                }
            }
            Step::Segment(seg) => {
                for &v in &seg.inputs {
                    check_use(v, &format!("segment {}", seg.name), &defined, problems);
                }
                for op in &seg.ops {
                    if op.inputs.len() != op.input_states.len() {
                        problems.push(format!(
                            "{kind:?}: {} has states for {} of {} inputs",
                            op.traced,
                            op.input_states.len(),
                            op.inputs.len()
                        ));
                    }
                    for (operand, want) in op.inputs.iter().zip(&op.input_states) {
                        match operand {
                            Operand::Value(v) => {
                                let local = seg.ops.iter().any(|o| o.outputs.contains(v));
                                if !local && !seg.inputs.contains(v) {
                                    problems.push(format!(
                                        "{kind:?}: {} reads %{} which is neither an input of segment {} nor made in it",
                                        op.traced, v.0, seg.name
                                    ));
                                }
                                match block.value(*v) {
                                    Some(d) if d.state == *want => {}
                                    Some(d) => problems.push(format!(
                                        "{kind:?}: {} reads {} in state {} but it is {}",
                                        op.traced, d.name, want, d.state
                                    )),
                                    None => problems.push(format!(
                                        "{kind:?}: {} reads a value that does not exist",
                                        op.traced
                                    )),
                                }
                            }
                            Operand::Param(name) => match param_names.get(name.as_str()) {
                                None => problems.push(format!(
                                    "{kind:?}: {} reads unknown parameter {name}",
                                    op.traced
                                )),
                                Some(p) => {
                                    let fwd = p.tp_dim.map_or(Layout::R, Layout::D);
                                    let grad = match (p.tp_dim, p.tp_grad_partial) {
                                        (Some(d), _) => Layout::D(d),
                                        (None, true) => Layout::V,
                                        (None, false) => Layout::R,
                                    };
                                    if (State { fwd, grad }) != *want {
                                        problems.push(format!(
                                            "{kind:?}: {} reads {name} in state {want} but it is stored {}",
                                            op.traced,
                                            State { fwd, grad }
                                        ));
                                    }
                                }
                            },
                        }
                    }
                    for &o in &op.outputs {
                        if let Some(d) = defined.get_mut(o.index()) {
                            *d = true;
                        }
                    }
                }
                for &v in &seg.outputs {
                    if !seg.ops.iter().any(|o| o.outputs.contains(&v)) {
                        problems.push(format!(
                            "{kind:?}: segment {} lists %{} as an output it does not make",
                            seg.name, v.0
                        ));
                    }
                }
            }
        }
    }
    check_use(block.output, "the block's output", &defined, problems);
}
