//! The lowering itself: blocks from the traced graph, adapters between
//! states, segments between adapters, parameters with their layouts.

use std::collections::{BTreeMap, HashMap};

use thiserror::Error;

use super::adapter::{AdapterCost, State, cheapest_path};
use super::{
    Block, BlockInput, BlockKind, ExecProgram, LocalOp, Operand, ParamDecl, ParamInit, Segment,
    StageProgram, Step, ValueDecl, Vid, verify,
};
use crate::anno::{Layout, partition};
use crate::cost::{Cluster, Group};
use crate::ir::{AttrValue, Graph, Op, OpId, OpKind, Role, TensorId};
use crate::plan::{Plan, Recompute, layer_pattern};

/// Why a plan cannot be lowered for a graph.
#[derive(Debug, Error)]
pub enum LowerError {
    #[error("the graph does not fit the plan: {0}")]
    Mismatch(String),
    #[error("{op}: {msg}")]
    Op { op: String, msg: String },
    #[error("not supported yet: {0}")]
    Unsupported(String),
    #[error(transparent)]
    Verify(#[from] super::VerifyError),
}

fn op_err(op: &Op, msg: impl Into<String>) -> LowerError {
    LowerError::Op {
        op: op.name.clone(),
        msg: msg.into(),
    }
}

struct Ctx<'a> {
    graph: &'a Graph,
    tp: u64,
    splits: BTreeMap<String, Option<String>>,
    cost: AdapterCost<'a>,
    /// Parameters by full name.
    params: BTreeMap<String, ParamDecl>,
    /// Model order of the parameters (graph order).
    param_order: Vec<String>,
}

/// The partition rule of `op` under the plan: layouts of inputs and outputs,
/// the split identifier and whether the op runs on shards.
struct OpRule {
    split: Option<String>,
    inputs: Vec<Layout>,
    outputs: Vec<Layout>,
    sharded: bool,
}

impl Ctx<'_> {
    fn rule(&self, op: &Op) -> Result<OpRule, LowerError> {
        let pattern = layer_pattern(&op.name, op.layer);
        let split = self
            .splits
            .get(&pattern)
            .ok_or_else(|| {
                op_err(
                    op,
                    format!("the plan has no sharding entry for '{pattern}'"),
                )
            })?
            .clone();
        let n_in = op.inputs.len();
        let n_out = op.outputs.len();
        let Some(id) = split.clone().filter(|_| self.tp > 1) else {
            return Ok(OpRule {
                split: None,
                inputs: vec![Layout::R; n_in],
                outputs: vec![Layout::R; n_out],
                sharded: false,
            });
        };
        let shape = |t: &TensorId| self.graph.get_tensor(*t).map(|t| t.shape.as_slice());
        let ins: Vec<Option<&[u64]>> = op.inputs.iter().map(shape).collect();
        let outs: Vec<Option<&[u64]>> = op.outputs.iter().map(shape).collect();
        let binding = op
            .annotation
            .bind(&ins, &outs, &op.int_attrs())
            .map_err(|e| op_err(op, format!("shapes do not fit [{}]: {e}", op.annotation)))?;
        let rule = partition(&op.annotation, &binding, &id, self.tp)
            .map_err(|e| op_err(op, format!("split '{id}' over tp={}: {e}", self.tp)))?;
        Ok(OpRule {
            split: Some(id),
            inputs: rule.inputs,
            outputs: rule.outputs,
            sharded: true,
        })
    }

    fn local_shape(&self, shape: &[u64], layout: Layout) -> Vec<u64> {
        let mut s = shape.to_vec();
        if let Layout::D(d) = layout
            && let Some(len) = s.get_mut(d)
        {
            *len /= self.tp;
        }
        s
    }

    fn full_bytes(&self, t: TensorId) -> f64 {
        self.graph.tensor(t).size_bytes() as f64
    }
}

/// The short name of an op inside its block: the last segment of its name.
fn short_name(op: &Op) -> String {
    op.name
        .rsplit('.')
        .next()
        .unwrap_or(&op.name)
        .replace(|c: char| !c.is_ascii_alphanumeric() && c != '_', "_")
}

fn param_init(op: &Op, input: usize) -> ParamInit {
    match (&op.kind, input) {
        (OpKind::RmsNorm | OpKind::LayerNorm, 1) => ParamInit::Ones,
        (OpKind::LayerNorm, 2) | (OpKind::LinearBias, 2) => ParamInit::Zeros,
        _ => ParamInit::Normal { std: 0.02 },
    }
}

/// Builds one block.
struct BlockBuilder<'c, 'a> {
    ctx: &'c mut Ctx<'a>,
    kind: BlockKind,
    layer: Option<u32>,
    inputs: Vec<BlockInput>,
    values: Vec<ValueDecl>,
    names: BTreeMap<String, u32>,
    /// Each graph tensor's value as produced (or received).
    home: HashMap<TensorId, Vid>,
    /// Adapted versions: (tensor, state) → value.
    adapted: HashMap<(TensorId, State), Vid>,
    /// Which step made each value (`None`: a block input).
    made_by_step: Vec<Option<usize>>,
    steps: Vec<Step>,
    open: Option<Segment>,
}

impl<'c, 'a> BlockBuilder<'c, 'a> {
    fn new(ctx: &'c mut Ctx<'a>, kind: BlockKind, layer: Option<u32>) -> Self {
        Self {
            ctx,
            kind,
            layer,
            inputs: Vec::new(),
            values: Vec::new(),
            names: BTreeMap::new(),
            home: HashMap::new(),
            adapted: HashMap::new(),
            made_by_step: Vec::new(),
            steps: Vec::new(),
            open: None,
        }
    }

    fn unique(&mut self, base: &str) -> String {
        let n = self.names.entry(base.to_string()).or_insert(0);
        *n += 1;
        if *n == 1 {
            base.to_string()
        } else {
            format!("{base}_{n}")
        }
    }

    fn new_value(&mut self, name: &str, t: TensorId, state: State) -> Vid {
        let tensor = self.ctx.graph.tensor(t);
        let decl = ValueDecl {
            name: self.unique(name),
            shape: self.ctx.local_shape(&tensor.shape, state.fwd),
            dtype: tensor.dtype,
            state,
        };
        self.values.push(decl);
        // Made by the step being built: the open segment is pushed next.
        self.made_by_step.push(None);
        Vid(self.values.len() as u32 - 1)
    }

    fn add_input(&mut self, input: BlockInput, t: TensorId, name: &str, state: State) {
        let v = self.new_value(name, t, state);
        self.inputs.push(input);
        self.home.insert(t, v);
        self.adapted.insert((t, state), v);
    }

    fn flush(&mut self) {
        if let Some(seg) = self.open.take() {
            let index = self.steps.len();
            for op in &seg.ops {
                for o in &op.outputs {
                    self.made_by_step[o.index()] = Some(index);
                }
            }
            self.steps.push(Step::Segment(seg));
        }
    }

    fn made_in_open_segment(&self, v: Vid) -> bool {
        self.open
            .as_ref()
            .is_some_and(|s| s.ops.iter().any(|o| o.outputs.contains(&v)))
    }

    /// The value of tensor `t` in state `want`, inserting adapters as needed.
    fn read(&mut self, op: &Op, t: TensorId, want: State) -> Result<Vid, LowerError> {
        // Integer tensors (token ids) have no gradient: only the forward
        // layout matters.
        let want = if self.ctx.graph.tensor(t).dtype.is_float() {
            want
        } else {
            State::produced(want.fwd)
        };
        if let Some(&v) = self.adapted.get(&(t, want)) {
            return Ok(v);
        }
        let home = *self.home.get(&t).ok_or_else(|| {
            op_err(
                op,
                format!(
                    "reads {} which is not available in this block",
                    self.ctx.graph.tensor(t).name
                ),
            )
        })?;
        let from = self.values[home.index()].state;
        let rank = self.ctx.graph.tensor(t).shape.len();
        let (path, _) = cheapest_path(from, want, rank, self.ctx.full_bytes(t), &self.ctx.cost)
            .ok_or_else(|| {
                op_err(
                    op,
                    format!(
                        "no adapter chain turns {} from {from} into {want}",
                        self.ctx.graph.tensor(t).name
                    ),
                )
            })?;
        let mut at = home;
        for kind in path {
            let (_, to) = kind.states();
            if let Some(&v) = self.adapted.get(&(t, to)) {
                at = v;
                continue;
            }
            if self.made_in_open_segment(at) {
                self.flush();
            }
            let base = format!("{}_{}", self.values[home.index()].name, kind.value_suffix());
            let out = self.new_value(&base, t, to);
            self.made_by_step[out.index()] = Some(self.steps.len());
            self.steps.push(Step::Adapter {
                kind,
                input: at,
                output: out,
            });
            self.adapted.insert((t, to), out);
            at = out;
        }
        Ok(at)
    }

    fn param(
        &mut self,
        op: &Op,
        index: usize,
        t: TensorId,
        want: State,
    ) -> Result<String, LowerError> {
        let tensor = self.ctx.graph.tensor(t);
        let pattern = layer_pattern(&tensor.name, self.layer);
        let tp_dim = match want.fwd {
            Layout::D(d) => Some(d),
            Layout::R => None,
            Layout::V => {
                return Err(op_err(
                    op,
                    format!("reads parameter {} as partial sums", tensor.name),
                ));
            }
        };
        let decl = ParamDecl {
            name: tensor.name.clone(),
            pattern: pattern.clone(),
            layer: self.layer,
            block: self.kind,
            shape: tensor.shape.clone(),
            local_shape: self.ctx.local_shape(&tensor.shape, want.fwd),
            dtype: tensor.dtype,
            init: param_init(op, index),
            tp_dim,
            tp_grad_partial: want.grad == Layout::V,
            copies: 1,
            tied_blocks: Vec::new(),
        };
        let decl = match self.ctx.graph.copies(t) {
            None => decl,
            Some((d, m)) if tp_dim == Some(d) && self.ctx.tp % m == 0 => {
                ParamDecl { copies: m, ..decl }
            }
            Some((d, m)) => {
                return Err(op_err(
                    op,
                    format!(
                        "reads parameter {} ({m} copies of each block of dim {d}) in state {want} at tp={}; copies are split on dim {d} at a tp that {m} divides",
                        tensor.name, self.ctx.tp
                    ),
                ));
            }
        };
        match self.ctx.params.get(&tensor.name) {
            Some(old)
                if (old.tp_dim, old.tp_grad_partial) != (decl.tp_dim, decl.tp_grad_partial) =>
            {
                return Err(op_err(
                    op,
                    format!(
                        "reads parameter {} in state {want}, but another op reads it in state {} (tied weights must be split alike: pin both ops' splits with --constraints)",
                        tensor.name,
                        State {
                            fwd: old.tp_dim.map_or(Layout::R, Layout::D),
                            grad: match (old.tp_dim, old.tp_grad_partial) {
                                (Some(d), _) => Layout::D(d),
                                (None, true) => Layout::V,
                                (None, false) => Layout::R,
                            },
                        }
                    ),
                ));
            }
            Some(old) => {
                // Tied between blocks (GPT's embedding and head): with pp > 1
                // the stages of both blocks hold it.
                if old.block != decl.block && !old.tied_blocks.contains(&decl.block) {
                    let block = decl.block;
                    if let Some(p) = self.ctx.params.get_mut(&tensor.name) {
                        p.tied_blocks.push(block);
                    }
                }
            }
            None => {
                self.ctx.param_order.push(tensor.name.clone());
                self.ctx.params.insert(tensor.name.clone(), decl);
            }
        }
        Ok(pattern)
    }

    fn op(&mut self, op: &Op, selective_core: bool) -> Result<(), LowerError> {
        let rule = self.ctx.rule(op)?;
        if selective_core {
            self.flush();
        }
        let mut inputs = Vec::new();
        let mut input_states = Vec::new();
        for (i, &t) in op.inputs.iter().enumerate() {
            let tensor = self.ctx.graph.tensor(t);
            let want = if tensor.dtype.is_float() {
                State::consumed(rule.inputs[i], rule.sharded)
            } else {
                State::produced(rule.inputs[i])
            };
            let operand = if tensor.role == Role::Parameter {
                Operand::Param(self.param(op, i, t, want)?)
            } else {
                Operand::Value(self.read(op, t, want)?)
            };
            inputs.push(operand);
            input_states.push(want);
        }
        let short = short_name(op);
        let mut outputs = Vec::new();
        for (j, &t) in op.outputs.iter().enumerate() {
            let state = State::produced(rule.outputs[j]);
            let v = self.new_value(&short, t, state);
            self.home.insert(t, v);
            self.adapted.insert((t, state), v);
            outputs.push(v);
        }
        let mut attrs = op.attrs.clone();
        if let Some(id) = &rule.split
            && let Some(AttrValue::Int(n)) = attrs.get_mut(id)
        {
            *n /= self.ctx.tp as i64;
        }
        let offset_unit = self.offset_unit(op, &rule);
        let local = LocalOp {
            traced: layer_pattern(&op.name, op.layer),
            kind: op.kind.clone(),
            split: rule.split.clone(),
            annotation: op.annotation.to_string(),
            inputs,
            input_states,
            outputs,
            attrs,
            offset_unit,
        };
        let seg = self.open.get_or_insert_with(|| Segment {
            name: short.clone(),
            attention_core: selective_core,
            inputs: Vec::new(),
            ops: Vec::new(),
            outputs: Vec::new(),
        });
        seg.ops.push(local);
        if selective_core {
            self.flush();
        }
        Ok(())
    }

    /// Ops whose result depends on where their shard starts.
    fn offset_unit(&self, op: &Op, rule: &OpRule) -> Option<u64> {
        let dim_len = |input: usize, dim: usize| {
            let t = self.ctx.graph.tensor(*op.inputs.get(input)?);
            Some(t.shape.get(dim)? / self.ctx.tp)
        };
        match (&op.kind, rule.inputs.as_slice()) {
            (OpKind::Embedding, [_, Layout::D(0), ..]) => dim_len(1, 0),
            (OpKind::Rope, [Layout::D(1), ..]) | (OpKind::PosEmbedding, [Layout::D(1), ..]) => {
                dim_len(0, 1)
            }
            _ => None,
        }
    }

    /// Closes the block: `exit` is read in state `exit_state` (or as made).
    fn finish(
        mut self,
        exit: TensorId,
        exit_state: Option<State>,
        exit_op: &Op,
    ) -> Result<Block, LowerError> {
        let output = match exit_state {
            Some(s) => self.read(exit_op, exit, s)?,
            None => *self
                .home
                .get(&exit)
                .ok_or_else(|| op_err(exit_op, "the block's output is never made"))?,
        };
        self.flush();
        // Segment inputs and outputs from the uses.
        let n_steps = self.steps.len();
        let mut used_after: Vec<Vec<usize>> = vec![Vec::new(); self.values.len()];
        for (i, step) in self.steps.iter().enumerate() {
            match step {
                Step::Adapter { input, .. } => used_after[input.index()].push(i),
                Step::Segment(seg) => {
                    for op in &seg.ops {
                        for operand in &op.inputs {
                            if let Operand::Value(v) = operand {
                                used_after[v.index()].push(i);
                            }
                        }
                    }
                }
            }
        }
        used_after[output.index()].push(n_steps);
        let made_by = self.made_by_step.clone();
        for (i, step) in self.steps.iter_mut().enumerate() {
            let Step::Segment(seg) = step else { continue };
            let mut inputs = Vec::new();
            for op in &seg.ops {
                for operand in &op.inputs {
                    if let Operand::Value(v) = operand
                        && made_by[v.index()] != Some(i)
                        && !inputs.contains(v)
                    {
                        inputs.push(*v);
                    }
                }
            }
            let mut outputs = Vec::new();
            for op in &seg.ops {
                for &o in &op.outputs {
                    if used_after[o.index()].iter().any(|&j| j != i) {
                        outputs.push(o);
                    }
                }
            }
            seg.inputs = inputs;
            seg.outputs = outputs;
            if seg.ops.len() > 1 {
                let last = seg
                    .ops
                    .last()
                    .map(|o| o.traced.rsplit('.').next().unwrap_or("").to_string());
                if let Some(last) = last {
                    seg.name = format!("{}..{}", seg.name, last);
                }
            }
        }
        Ok(Block {
            kind: self.kind,
            inputs: self.inputs,
            values: self.values,
            steps: self.steps,
            output,
        })
    }
}

/// Lowers `plan` for `graph`, the model traced at the plan's micro-batch
/// size and sequence length; adapters are priced on `cluster`.
pub fn lower(graph: &Graph, plan: &Plan, cluster: &Cluster) -> Result<ExecProgram, LowerError> {
    let tp = u64::from(plan.mesh.tp);
    // Trace order: a topological order (the tracer appends an op after its
    // inputs' producers) that reads like the model's source.
    graph
        .topo_order()
        .map_err(|_| LowerError::Mismatch("the graph has a cycle".into()))?;
    let order: Vec<OpId> = graph.ops().map(|(id, _)| id).collect();
    let tokens: Vec<(TensorId, &crate::ir::Tensor)> = graph
        .tensors()
        .filter(|(_, t)| t.role == Role::Input)
        .collect();
    let expect = vec![plan.micro_batch, plan.trace.seq_len];
    if tokens.is_empty() || tokens.iter().any(|(_, t)| t.shape != expect) {
        return Err(LowerError::Mismatch(format!(
            "the graph's token inputs must be [micro_batch, seq_len] = {expect:?}; trace the model at the plan's micro-batch"
        )));
    }
    let splits = plan
        .sharding
        .iter()
        .map(|s| (s.op.clone(), s.split.clone()))
        .collect();
    let mut ctx = Ctx {
        graph,
        tp,
        splits,
        cost: AdapterCost {
            cluster,
            group: Group::placed(cluster, plan.mesh.tp, 1),
        },
        params: BTreeMap::new(),
        param_order: Vec::new(),
    };

    // Blocks: ops before the first layer, each layer, ops after the last.
    let first = order.iter().position(|&o| graph.op(o).layer.is_some());
    let last = order.iter().rposition(|&o| graph.op(o).layer.is_some());
    let (Some(first), Some(last)) = (first, last) else {
        return Err(LowerError::Unsupported(
            "a model without transformer layers".into(),
        ));
    };
    let embed_ops: Vec<OpId> = order[..first].to_vec();
    let head_ops: Vec<OpId> = order[last + 1..].to_vec();
    let mut layers: BTreeMap<u32, Vec<OpId>> = BTreeMap::new();
    for &o in &order[first..=last] {
        let Some(l) = graph.op(o).layer else {
            return Err(op_err(
                graph.op(o),
                "an op outside the transformer layers sits between them",
            ));
        };
        layers.entry(l).or_default().push(o);
    }
    let n_layers = layers.len() as u32;
    if layers.keys().copied().ne(0..n_layers) {
        return Err(LowerError::Mismatch("layer indices are not 0..n".into()));
    }

    // The tensor each block hands to the next.
    let exit_of = |ops: &[OpId]| -> Result<(TensorId, OpId), LowerError> {
        let inside: std::collections::HashSet<OpId> = ops.iter().copied().collect();
        let mut exits = Vec::new();
        for &o in ops {
            for &t in &graph.op(o).outputs {
                if graph.consumers(t).iter().any(|c| !inside.contains(c)) {
                    exits.push((t, o));
                }
            }
        }
        match exits.as_slice() {
            [one] => Ok(*one),
            _ => Err(LowerError::Unsupported(format!(
                "blocks must hand exactly one tensor to the next; {} hands {}",
                ops.first().map_or("?", |&o| graph.op(o).name.as_str()),
                exits.len()
            ))),
        }
    };
    let (layer0_exit, layer0_exit_op) = exit_of(&layers[&0])?;
    let stream_rule = ctx.rule(graph.op(layer0_exit_op))?;
    let exit_index = graph
        .op(layer0_exit_op)
        .outputs
        .iter()
        .position(|&t| t == layer0_exit)
        .unwrap_or(0);
    let stream_state = State::produced(stream_rule.outputs[exit_index]);
    let stream_tensor = graph.tensor(layer0_exit);
    let stream_shape = ctx.local_shape(&stream_tensor.shape, stream_state.fwd);

    let selective_core = |op: &Op| op.kind == OpKind::Attention;

    // Reads the block's external inputs (stream, tokens, labels) in order of use.
    let lower_block = |ctx: &mut Ctx<'_>,
                       kind: BlockKind,
                       layer: Option<u32>,
                       ops: &[OpId],
                       entry: Option<TensorId>,
                       exit: (TensorId, OpId),
                       exit_state: Option<State>|
     -> Result<Block, LowerError> {
        let mut b = BlockBuilder::new(ctx, kind, layer);
        if let Some(e) = entry {
            b.add_input(BlockInput::Stream, e, "x", stream_state);
        }
        for &o in ops {
            for &t in &graph.op(o).inputs {
                if b.home.contains_key(&t) {
                    continue;
                }
                match graph.tensor(t).role {
                    Role::Input => b.add_input(BlockInput::Tokens, t, "tokens", State::REPLICATED),
                    Role::Label => b.add_input(BlockInput::Labels, t, "labels", State::REPLICATED),
                    _ => {}
                }
            }
        }
        for &o in ops {
            let op = graph.op(o);
            b.op(op, selective_core(op))?;
        }
        b.finish(exit.0, exit_state, graph.op(exit.1))
    };

    let embed_exit = exit_of(&embed_ops)?;
    let embed = lower_block(
        &mut ctx,
        BlockKind::Embed,
        None,
        &embed_ops,
        None,
        embed_exit,
        Some(stream_state),
    )?;
    let mut layer_block: Option<Block> = None;
    let mut prev_exit = embed_exit.0;
    for (&l, ops) in &layers {
        let exit = exit_of(ops)?;
        let block = lower_block(
            &mut ctx,
            BlockKind::Layer,
            Some(l),
            ops,
            Some(prev_exit),
            exit,
            Some(stream_state),
        )?;
        match &layer_block {
            None => layer_block = Some(block),
            Some(first) if *first == block => {}
            Some(_) => {
                return Err(LowerError::Unsupported(format!(
                    "layer {l} lowers differently from layer 0; every layer must be the same block"
                )));
            }
        }
        prev_exit = exit.0;
    }
    let layer = layer_block.ok_or_else(|| LowerError::Unsupported("no layers".into()))?;
    let loss = head_ops
        .iter()
        .rev()
        .flat_map(|&o| graph.op(o).outputs.iter().map(move |&t| (t, o)))
        .find(|(t, _)| graph.consumers(*t).is_empty())
        .ok_or_else(|| LowerError::Mismatch("the head has no loss output".into()))?;
    let head = lower_block(
        &mut ctx,
        BlockKind::Head,
        None,
        &head_ops,
        Some(prev_exit),
        loss,
        None,
    )?;

    // Parameters in the graph's order (the model's declaration order).
    let index: HashMap<&str, usize> = graph
        .parameters()
        .enumerate()
        .map(|(i, (_, t))| (t.name.as_str(), i))
        .collect();
    let mut names = ctx.param_order.clone();
    names.sort_by_key(|n| index.get(n.as_str()).copied().unwrap_or(usize::MAX));
    let mut params = Vec::new();
    for name in &names {
        if let Some(p) = ctx.params.remove(name) {
            params.push(p);
        }
    }

    let pp = plan.mesh.pp;
    let chunks = plan.schedule.chunks();
    let stages = plan
        .stages
        .iter()
        .enumerate()
        .map(|(s, st)| {
            let ranges = if chunks > 1 {
                let per = n_layers / (pp * chunks);
                (0..chunks)
                    .map(|c| {
                        let v = c * pp + s as u32;
                        (v * per, (v + 1) * per)
                    })
                    .collect()
            } else {
                vec![(st.first_layer, st.end_layer)]
            };
            StageProgram {
                index: st.index,
                chunks: ranges,
                embedding: st.embedding,
                head: st.head,
                recompute: st.recompute,
                predicted_peak_bytes: plan
                    .prediction
                    .stages
                    .get(s)
                    .map_or(0, |p| p.memory.total_bytes()),
            }
        })
        .collect();
    let vocab = params
        .iter()
        .find(|p| p.block == BlockKind::Embed && p.init != ParamInit::Ones)
        .and_then(|p| p.shape.first().copied())
        .unwrap_or(0);
    let program = ExecProgram {
        model: plan.model.name.clone(),
        family: plan.model.family.clone(),
        tp: plan.mesh.tp,
        pp: plan.mesh.pp,
        dp: plan.mesh.dp,
        plan_gpus: plan.plan_gpus,
        runtime_gpus: plan.runtime_gpus,
        micro_batch: plan.micro_batch,
        micro_batches: plan.n_micro_batches,
        global_batch: plan.global_batch,
        seq_len: plan.trace.seq_len,
        vocab,
        schedule: plan.schedule,
        zero: plan.zero,
        dtype: plan.trace.dtype,
        reduce_dtype: plan.reduce_dtype,
        sequence_parallel: plan.sequence_parallel,
        predicted_step_s: plan.prediction.step_s,
        stream_shape,
        stream_state,
        embed,
        layer,
        head,
        params,
        stages,
    };
    let _ = Recompute::None;
    verify(&program)?;
    Ok(program)
}
