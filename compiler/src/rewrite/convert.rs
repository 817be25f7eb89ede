//! Blocks to expressions and back, and the price of both.

use std::collections::{BTreeMap, BTreeSet};

use egg::{CostFunction, Id, Language, RecExpr};

use super::lang::{Graph, Info, Layouts, Node, Template, info, template_of};
use crate::anno::Layout;
use crate::cost::{ComputeKind, compute_time};
use crate::lower::{
    AdapterCost, AdapterKind, Block, BlockInput, LocalOp, Operand, Segment, State, Step, ValueDecl,
    Vid,
};

/// How a block's stream input and output change: the stream arrives and
/// leaves in `state` (`D(dim)`) instead of replicated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Interface {
    pub dim: usize,
}

impl Interface {
    pub fn state(self) -> State {
        State::produced(Layout::D(self.dim))
    }
}

fn full_shape(decl: &ValueDecl, tp: u64) -> Vec<u64> {
    let mut s = decl.shape.clone();
    if let Layout::D(d) = decl.state.fwd
        && let Some(len) = s.get_mut(d)
    {
        *len *= tp;
    }
    s
}

fn decl_info(decl: &ValueDecl, tp: u64) -> Info {
    Info {
        state: decl.state,
        full: full_shape(decl, tp),
        dtype: decl.dtype,
    }
}

/// The block as an expression, with the tables its leaves index into.
/// Under `interface` the stream input is read as `gather_d(stream)` and the
/// stream output (embed, layer) is made `chunk_d(output)`.
pub(crate) fn to_expr(
    block: &Block,
    tp: u64,
    interface: Option<Interface>,
) -> Result<(RecExpr<Node>, Layouts), String> {
    let mut layouts = Layouts {
        tp,
        ..Layouts::default()
    };
    let mut expr = RecExpr::default();
    let mut of: Vec<Option<Id>> = vec![None; block.values.len()];
    let decl = |v: Vid| {
        block
            .value(v)
            .ok_or_else(|| format!("value %{} does not exist", v.0))
    };
    for (i, input) in block.inputs.iter().enumerate() {
        let d = decl(Vid(i as u32))?;
        let mut info = decl_info(d, tp);
        let leaf = Node::Input(i as u32);
        let id = match interface {
            Some(iface) if *input == BlockInput::Stream => {
                if d.state != State::REPLICATED {
                    return Err(format!("the stream is {}, not replicated", d.state));
                }
                info.state = iface.state();
                layouts.inputs.push(info);
                let leaf = expr.add(leaf);
                expr.add(Node::Adapt(AdapterKind::Gather { dim: iface.dim }, [leaf]))
            }
            _ => {
                layouts.inputs.push(info);
                expr.add(leaf)
            }
        };
        of[i] = Some(id);
    }
    let get = |of: &[Option<Id>], v: Vid| -> Result<Id, String> {
        of.get(v.index())
            .copied()
            .flatten()
            .ok_or_else(|| format!("%{} is read before it is made", v.0))
    };
    let mut params: BTreeMap<String, u32> = BTreeMap::new();
    let mut read: BTreeSet<Vid> = BTreeSet::new();
    let mut order = 0;
    for step in &block.steps {
        match step {
            Step::Adapter {
                kind,
                input,
                output,
            } => {
                let x = get(&of, *input)?;
                read.insert(*input);
                let slot = of
                    .get_mut(output.index())
                    .ok_or_else(|| format!("value %{} does not exist", output.0))?;
                *slot = Some(expr.add(Node::Adapt(*kind, [x])));
            }
            Step::Segment(seg) => {
                for op in &seg.ops {
                    let &[out] = op.outputs.as_slice() else {
                        return Err(format!(
                            "{} makes {} values; only single-output ops are rewritten",
                            op.traced,
                            op.outputs.len()
                        ));
                    };
                    let out_decl = decl(out)?;
                    let t = layouts.templates.len() as u32;
                    layouts.templates.push(Template {
                        op: op.clone(),
                        output: decl_info(out_decl, tp),
                        name: out_decl.name.clone(),
                        order,
                    });
                    order += 1;
                    let mut children = vec![expr.add(Node::Tmpl(t))];
                    for operand in &op.inputs {
                        children.push(match operand {
                            Operand::Value(v) => {
                                read.insert(*v);
                                get(&of, *v)?
                            }
                            Operand::Param(name) => {
                                let next = params.len() as u32;
                                let p = *params.entry(name.clone()).or_insert_with(|| {
                                    layouts.params.push(name.clone());
                                    next
                                });
                                expr.add(Node::Param(p))
                            }
                        });
                    }
                    let slot = of
                        .get_mut(out.index())
                        .ok_or_else(|| format!("value %{} does not exist", out.0))?;
                    *slot = Some(expr.add(Node::Op(children)));
                }
            }
        }
    }
    let mut out = get(&of, block.output)?;
    if let Some(iface) = interface
        && block.kind != crate::lower::BlockKind::Head
    {
        out = expr.add(Node::Adapt(AdapterKind::Chunk { dim: iface.dim }, [out]));
    }
    let mut roots = vec![out];
    for op in block.ops() {
        for &o in &op.outputs {
            if o != block.output && !read.contains(&o) {
                roots.push(get(&of, o)?);
            }
        }
    }
    expr.add(Node::Root(roots));
    Ok((expr, layouts))
}

/// Seconds of memory traffic of a local op, forward and backward (about
/// three passes over its operands and output), at the cluster's HBM rate.
fn op_seconds(cost: &AdapterCost<'_>, bytes: f64, dtype: crate::ir::DType) -> f64 {
    compute_time(
        cost.cluster,
        0.0,
        3.0 * bytes,
        ComputeKind::MemoryBound,
        dtype,
    )
}

/// The extraction cost: adapter seconds on the full tensor plus local ops'
/// memory-bound seconds on their shards.
pub(crate) struct Price<'a> {
    pub egraph: &'a Graph,
    pub cost: &'a AdapterCost<'a>,
}

impl CostFunction<Node> for Price<'_> {
    type Cost = f64;

    fn cost<C>(&mut self, enode: &Node, mut costs: C) -> f64
    where
        C: FnMut(Id) -> f64,
    {
        let tp = self.egraph.analysis.tp;
        let own = match enode {
            Node::Adapt(k, [x]) => {
                info(self.egraph, *x).map_or(0.0, |i| self.cost.cost(*k, i.full_bytes()))
            }
            Node::Op(children) => {
                let out = children
                    .first()
                    .and_then(|&leaf| template_of(self.egraph, leaf))
                    .and_then(|t| self.egraph.analysis.templates.get(t as usize));
                match out {
                    Some(tm) => {
                        let ins: f64 = children[1..]
                            .iter()
                            .filter_map(|&c| info(self.egraph, c))
                            .map(|i| i.local_bytes(tp))
                            .sum();
                        op_seconds(self.cost, ins + tm.output.local_bytes(tp), tm.output.dtype)
                    }
                    None => 0.0,
                }
            }
            Node::Input(_) | Node::Param(_) | Node::Tmpl(_) | Node::Root(_) => 0.0,
        };
        enode.children().iter().fold(own, |acc, &c| acc + costs(c))
    }
}

/// The same price on a lowered block: every adapter and op counted once.
pub(crate) fn block_seconds(block: &Block, tp: u64, cost: &AdapterCost<'_>) -> f64 {
    let bytes = |v: Vid| block.value(v).map(|d| decl_info(d, tp));
    let mut total = 0.0;
    for step in &block.steps {
        match step {
            Step::Adapter { kind, input, .. } => {
                total += bytes(*input).map_or(0.0, |i| cost.cost(*kind, i.full_bytes()));
            }
            Step::Segment(seg) => {
                for op in &seg.ops {
                    let mut moved = 0.0;
                    let mut dtype = None;
                    for v in op
                        .inputs
                        .iter()
                        .filter_map(|o| match o {
                            Operand::Value(v) => Some(*v),
                            Operand::Param(_) => None,
                        })
                        .chain(op.outputs.iter().copied())
                    {
                        if let Some(i) = bytes(v) {
                            moved += i.local_bytes(tp);
                            dtype.get_or_insert(i.dtype);
                        }
                    }
                    if let Some(dtype) = dtype {
                        total += op_seconds(cost, moved, dtype);
                    }
                }
            }
        }
    }
    total
}

/// The full-tensor size each adapter's input has, for reports.
pub(crate) fn adapter_bytes(block: &Block, tp: u64) -> Vec<(AdapterKind, f64)> {
    block
        .adapters()
        .filter_map(|(k, input, _)| {
            block
                .value(input)
                .map(|d| (k, decl_info(d, tp).full_bytes()))
        })
        .collect()
}

/// Rebuilds a block from an extracted expression: values in schedule order,
/// local ops grouped into segments between adapters (the attention core a
/// segment of its own), segment inputs and outputs from the uses.
pub(crate) fn to_block(
    original: &Block,
    expr: &RecExpr<Node>,
    layouts: &Layouts,
) -> Result<Block, String> {
    let tp = layouts.tp;
    let nodes = expr.as_ref();
    // Each node's value info, in expression order (children come first).
    let mut infos: Vec<Option<Info>> = Vec::with_capacity(nodes.len());
    for node in nodes {
        let i = match node {
            Node::Input(i) => layouts.inputs.get(*i as usize).cloned(),
            Node::Adapt(k, [x]) => infos.get(usize::from(*x)).cloned().flatten().map(|i| Info {
                state: k.states().1,
                ..i
            }),
            Node::Op(children) => {
                let t = tmpl(nodes, children)?;
                layouts
                    .templates
                    .get(t as usize)
                    .map(|tm| tm.output.clone())
            }
            Node::Param(_) | Node::Tmpl(_) | Node::Root(_) => None,
        };
        infos.push(i);
    }
    let Some(Node::Root(roots)) = nodes.last() else {
        return Err("the extracted expression has no root".into());
    };
    let output = *roots.first().ok_or("the root has no output")?;

    // Schedule: ready local ops first (in program order), adapters when no
    // op is ready, so that segments are as long as the dependencies allow.
    let is_step = |n: &Node| matches!(n, Node::Adapt(..) | Node::Op(_));
    let value_children = |n: &Node| -> Vec<usize> {
        n.children()
            .iter()
            .map(|&c| usize::from(c))
            .filter(|&c| infos.get(c).is_some_and(Option::is_some) && is_step(&nodes[c]))
            .collect()
    };
    let mut waiting: Vec<usize> = nodes
        .iter()
        .map(|n| {
            if is_step(n) {
                value_children(n).len()
            } else {
                0
            }
        })
        .collect();
    let mut users: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    for (i, n) in nodes.iter().enumerate() {
        if is_step(n) {
            for c in value_children(n) {
                users[c].push(i);
            }
        }
    }
    let priority = |i: usize| -> (u8, usize) {
        match &nodes[i] {
            Node::Op(children) => (
                0,
                tmpl(nodes, children)
                    .ok()
                    .and_then(|t| layouts.templates.get(t as usize))
                    .map_or(usize::MAX, |tm| tm.order),
            ),
            _ => (1, i),
        }
    };
    let mut ready: BTreeSet<((u8, usize), usize)> = (0..nodes.len())
        .filter(|&i| is_step(&nodes[i]) && waiting[i] == 0)
        .map(|i| (priority(i), i))
        .collect();
    let mut schedule = Vec::new();
    while let Some(first) = ready.pop_first() {
        let i = first.1;
        schedule.push(i);
        for &u in &users[i] {
            waiting[u] -= 1;
            if waiting[u] == 0 {
                ready.insert((priority(u), u));
            }
        }
    }

    // Values: the block inputs keep their places, then one per step node.
    let mut values: Vec<ValueDecl> = Vec::new();
    let mut names: BTreeMap<String, u32> = BTreeMap::new();
    let mut unique = |base: &str| {
        let n = names.entry(base.to_string()).or_insert(0);
        *n += 1;
        if *n == 1 {
            base.to_string()
        } else {
            format!("{base}_{n}")
        }
    };
    for (i, info) in layouts.inputs.iter().enumerate() {
        let d = original
            .value(Vid(i as u32))
            .ok_or("a block input has no value")?;
        values.push(ValueDecl {
            name: unique(&d.name),
            shape: info.local(tp),
            dtype: info.dtype,
            state: info.state,
        });
    }
    // The value each node makes.
    let mut made: Vec<Option<Vid>> = vec![None; nodes.len()];
    for (i, n) in nodes.iter().enumerate() {
        if let Node::Input(k) = n {
            made[i] = Some(Vid(*k));
        }
    }
    let vid_of = |made: &[Option<Vid>], id: Id| -> Result<Vid, String> {
        made.get(usize::from(id))
            .copied()
            .flatten()
            .ok_or_else(|| "an operand is used before it is made".to_string())
    };
    let mut steps: Vec<Step> = Vec::new();
    let mut open: Option<Segment> = None;
    let flush = |steps: &mut Vec<Step>, open: &mut Option<Segment>| {
        if let Some(seg) = open.take() {
            steps.push(Step::Segment(seg));
        }
    };
    for &i in &schedule {
        let info = infos[i].clone().ok_or("a step makes no value")?;
        match &nodes[i] {
            Node::Adapt(kind, [x]) => {
                let input = vid_of(&made, *x)?;
                let in_open = open
                    .as_ref()
                    .is_some_and(|s| s.ops.iter().any(|o| o.outputs.contains(&input)));
                if in_open {
                    flush(&mut steps, &mut open);
                }
                let base = values
                    .get(input.index())
                    .map_or("value".to_string(), |d| d.name.clone());
                let vid = Vid(values.len() as u32);
                values.push(ValueDecl {
                    name: unique(&format!("{base}_{}", kind.value_suffix())),
                    shape: info.local(tp),
                    dtype: info.dtype,
                    state: info.state,
                });
                made[i] = Some(vid);
                steps.push(Step::Adapter {
                    kind: *kind,
                    input,
                    output: vid,
                });
            }
            Node::Op(children) => {
                let t = tmpl(nodes, children)?;
                let tm = layouts
                    .templates
                    .get(t as usize)
                    .ok_or("an op names an unknown template")?;
                let mut inputs = Vec::new();
                for (operand, &c) in tm.op.inputs.iter().zip(&children[1..]) {
                    inputs.push(match operand {
                        Operand::Value(_) => Operand::Value(vid_of(&made, c)?),
                        Operand::Param(p) => Operand::Param(p.clone()),
                    });
                }
                let vid = Vid(values.len() as u32);
                values.push(ValueDecl {
                    name: unique(&tm.name),
                    shape: info.local(tp),
                    dtype: info.dtype,
                    state: info.state,
                });
                let op = LocalOp {
                    inputs,
                    outputs: vec![vid],
                    ..tm.op.clone()
                };
                let core = op.kind == crate::ir::OpKind::Attention;
                if core {
                    flush(&mut steps, &mut open);
                }
                let short = op.traced.rsplit('.').next().unwrap_or("").to_string();
                let seg = open.get_or_insert_with(|| Segment {
                    name: short.clone(),
                    attention_core: core,
                    inputs: Vec::new(),
                    ops: Vec::new(),
                    outputs: Vec::new(),
                });
                seg.ops.push(op);
                made[i] = Some(vid);
                if core {
                    flush(&mut steps, &mut open);
                }
            }
            _ => return Err("a leaf was scheduled as a step".into()),
        }
    }
    flush(&mut steps, &mut open);
    let output = vid_of(&made, output)?;

    // Segment names, inputs and outputs from the uses.
    let mut made_by: Vec<Option<usize>> = vec![None; values.len()];
    let mut used_by: Vec<Vec<usize>> = vec![Vec::new(); values.len()];
    for (s, step) in steps.iter().enumerate() {
        match step {
            Step::Adapter { input, output, .. } => {
                made_by[output.index()] = Some(s);
                used_by[input.index()].push(s);
            }
            Step::Segment(seg) => {
                for op in &seg.ops {
                    for o in &op.outputs {
                        made_by[o.index()] = Some(s);
                    }
                    for v in op.inputs.iter().filter_map(|o| match o {
                        Operand::Value(v) => Some(v),
                        Operand::Param(_) => None,
                    }) {
                        used_by[v.index()].push(s);
                    }
                }
            }
        }
    }
    used_by[output.index()].push(steps.len());
    for (s, step) in steps.iter_mut().enumerate() {
        let Step::Segment(seg) = step else { continue };
        let mut inputs = Vec::new();
        let mut outputs = Vec::new();
        for op in &seg.ops {
            for operand in &op.inputs {
                if let Operand::Value(v) = operand
                    && made_by[v.index()] != Some(s)
                    && !inputs.contains(v)
                {
                    inputs.push(*v);
                }
            }
            for &o in &op.outputs {
                if used_by[o.index()].iter().any(|&u| u != s) {
                    outputs.push(o);
                }
            }
        }
        seg.inputs = inputs;
        seg.outputs = outputs;
        if seg.ops.len() > 1
            && let Some(last) = seg.ops.last()
        {
            let last = last.traced.rsplit('.').next().unwrap_or("").to_string();
            seg.name = format!("{}..{}", seg.name, last);
        }
    }
    Ok(Block {
        kind: original.kind,
        inputs: original.inputs.clone(),
        values,
        steps,
        output,
    })
}

fn tmpl(nodes: &[Node], children: &[Id]) -> Result<u32, String> {
    match children.first().and_then(|&c| nodes.get(usize::from(c))) {
        Some(Node::Tmpl(t)) => Ok(*t),
        _ => Err("an op node without a template".into()),
    }
}
