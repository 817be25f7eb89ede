//! Intra-op sharding: which annotation identifier each op splits across the
//! tensor-parallel axis, chosen by z3 to minimise compute plus resharding.
//!
//! A [`Segment`] is a slice of the graph solved as one problem: the ops of
//! one transformer layer (solved once, reused for every isomorphic layer),
//! or the ops before the first layer (embedding), or after the last (final
//! norm, head, loss). Tensors entering or leaving a segment through the
//! residual stream have a fixed boundary layout (`R`, or `D(seq)` with
//! sequence parallelism), so segments compose.
//!
//! The cost of an assignment, all in integer picoseconds so that z3 and the
//! brute-force check agree exactly:
//! - each op's forward and backward roofline time for its local shard;
//! - forward resharding on every producer → consumer edge (the adapter
//!   table of ARCHITECTURE.md: V→R all-reduce, D→R all-gather, V→D
//!   reduce-scatter, D(i)→D(j) all-to-all, R→D and anything→V free);
//! - backward resharding per tensor: each consumer hands back a gradient in
//!   its input layout, or as partial sums (V) when a split op read the
//!   tensor replicated; gradients that disagree are summed as V; the sum
//!   is converted to the layout the producer needs (R for a V output);
//! - parameters read replicated by a split op get partial gradients: an
//!   all-reduce per step (charged in full: the objective does not depend on
//!   the number of micro-batches, and the step model adds it once).
//!
//! Every term is affine in the micro-batch size (roofline times and
//! collective bandwidth terms scale with it, latencies and weight
//! synchronisation do not), so each assignment's cost is a line in the
//! micro-batch size and the optimum over an interval of sizes is found by
//! solving at its ends: if both ends pick the same assignment, it is optimal
//! everywhere between (the lower envelope of lines); otherwise bisect.
//!
//! A split that would leave a weight matrix replicated is not a candidate:
//! tensor parallelism shards weights, and replicating them inside the tp
//! group is data parallelism, which the dp axis and ZeRO cover.

use std::collections::BTreeSet;

use z3::ast::Bool;
use z3::{Optimize, SatResult};

use crate::anno::{Layout, partition};
use crate::cost::{Cluster, Collective, ComputeKind, Group, collective_time, op_time};
use crate::ir::{Graph, OpId, OpKind, Role, TensorId};

/// Picoseconds: the integer time unit of the sharding problem.
pub type Ps = i64;

/// `seconds` in picoseconds; a time beyond `Ps` (a cluster with absurdly
/// slow figures) saturates, and so do the sums of times (`saturating_add`).
fn ps(seconds: f64) -> Ps {
    (seconds * 1e12).round() as Ps
}

/// One legal way to run an op on the tp axis.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    /// The identifier split across tp; `None` runs the op replicated.
    pub split: Option<String>,
    pub inputs: Vec<Layout>,
    pub outputs: Vec<Layout>,
    pub fwd_ps: Ps,
    pub bwd_ps: Ps,
}

/// The parts of an assignment's cost, picoseconds per micro-batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Breakdown {
    pub fwd_compute: Ps,
    pub bwd_compute: Ps,
    pub fwd_comm: Ps,
    pub bwd_comm: Ps,
    /// Parameter-gradient all-reduces over tp, once per step.
    pub param_sync: Ps,
}

impl Breakdown {
    /// The sum (saturating: a cluster's figures may make one part as long
    /// as `Ps` holds).
    pub fn total(&self) -> Ps {
        [
            self.fwd_compute,
            self.bwd_compute,
            self.fwd_comm,
            self.bwd_comm,
            self.param_sync,
        ]
        .into_iter()
        .fold(0, Ps::saturating_add)
    }
}

#[derive(Clone, Debug)]
pub struct SegOp {
    pub op: OpId,
    pub choices: Vec<Choice>,
}

/// Where a tensor used in a segment comes from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Source {
    /// Output `1` of segment op `0`.
    Op(usize, usize),
    /// The residual stream entering the segment, in this layout.
    Boundary(Layout),
    /// Tokens or labels: any layout for free, no gradient.
    Data,
    /// A parameter: stored in whatever layout its consumer reads.
    Param,
}

#[derive(Clone, Debug)]
pub struct SegTensor {
    pub id: TensorId,
    /// Bytes of the whole (unsharded) tensor.
    pub bytes: f64,
    pub source: Source,
    /// (segment op, input index) pairs reading the tensor.
    pub consumers: Vec<(usize, usize)>,
    /// Set when the tensor leaves the segment as the residual stream.
    pub leaves_as: Option<Layout>,
    /// A parameter traced as copies ([`Graph::copies`]): the once-a-step sum
    /// of its copies' gradients, an all-reduce over tp of the model's
    /// tensor as the runtime does it. The same under every legal choice
    /// (copies are always split on their copy dim), so only the breakdown
    /// carries it, not the solver's objective.
    pub copies_sync: Ps,
}

/// A sharding problem over a slice of the graph at one tp degree.
#[derive(Clone, Debug)]
pub struct Segment {
    pub ops: Vec<SegOp>,
    pub tensors: Vec<SegTensor>,
    tp: u32,
    group: Group,
}

/// What the segment is priced on.
#[derive(Clone, Copy, Debug)]
pub struct SegmentCtx<'a> {
    pub graph: &'a Graph,
    pub registry: &'a crate::anno::Registry,
    pub cluster: &'a Cluster,
    pub tp: u32,
    /// Layout of the residual stream at segment boundaries.
    pub boundary: Layout,
    /// Graph batch ÷ micro-batch: the graph is traced at the micro-batch
    /// size, so this is 1 unless a caller reuses a larger trace.
    pub scale: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum ShardingError {
    #[error("op {op}: {detail}")]
    Op { op: String, detail: String },
    #[error("z3 found no sharding ({0})")]
    Solver(String),
}

fn compute_kind(kind: &OpKind) -> ComputeKind {
    match kind {
        OpKind::Linear | OpKind::LinearBias => ComputeKind::Matmul,
        OpKind::Attention => ComputeKind::Attention,
        _ => ComputeKind::MemoryBound,
    }
}

/// Backward time as a multiple of forward: matmuls compute two gradients;
/// fused attention recomputes scores in backward (FlashAttention-2: 2.5x).
fn backward_factor(kind: &OpKind) -> f64 {
    match kind {
        OpKind::Attention => 2.5,
        _ => 2.0,
    }
}

/// Extra memory traffic of an attention op whose kernel materialises the
/// scores: QKᵀ written, scale-mask-softmax read and written, dropout read and
/// written with its mask, probabilities read by the AV product — six passes
/// over b·h·l·s elements (Korthikanti et al. 2022 count the same tensors).
fn materialized_attention_bytes(
    ctx: &SegmentCtx<'_>,
    op: &crate::ir::Op,
    split: &Option<String>,
) -> f64 {
    if op.kind != OpKind::Attention
        || ctx.cluster.attention_kernel != crate::cost::AttentionKernel::Materialized
    {
        return 0.0;
    }
    let q = ctx.graph.tensor(op.inputs[0]);
    let k = ctx.graph.tensor(op.inputs[1]);
    let (b, l, h) = (q.shape[0] as f64, q.shape[1] as f64, q.shape[2] as f64);
    let s = k.shape[1] as f64;
    let h = if split.is_some() {
        h / f64::from(ctx.tp)
    } else {
        h
    };
    6.0 * b * h * l * s * q.dtype.size_bytes() as f64 * ctx.scale
}

fn local_bytes(bytes: f64, layout: Layout, tp: u32) -> f64 {
    match layout {
        Layout::D(_) => bytes / f64::from(tp),
        Layout::R | Layout::V => bytes,
    }
}

impl Segment {
    /// Builds the problem for `ops` (in trace order). `boundary_in` is the
    /// tensor entering as the residual stream (if any), `boundary_out` the
    /// one leaving.
    pub fn build(
        ctx: &SegmentCtx<'_>,
        ops: &[OpId],
        boundary_in: Option<TensorId>,
        boundary_out: Option<TensorId>,
    ) -> Result<Segment, ShardingError> {
        let graph = ctx.graph;
        let mut seg_ops = Vec::with_capacity(ops.len());
        for &id in ops {
            let op = graph.op(id);
            let err = |detail: String| ShardingError::Op {
                op: op.name.clone(),
                detail,
            };
            let shape = |t: &TensorId| Some(graph.tensor(*t).shape.as_slice());
            let ins: Vec<Option<&[u64]>> = op.inputs.iter().map(shape).collect();
            let outs: Vec<Option<&[u64]>> = op.outputs.iter().map(shape).collect();
            let attrs = op.int_attrs();
            let binding = op
                .annotation
                .bind(&ins, &outs, &attrs)
                .map_err(|e| err(e.to_string()))?;
            let flops = ctx
                .registry
                .get(op.kind.name())
                .ok_or_else(|| err("no annotation file registers this op".into()))?
                .flops
                .eval(&binding, &attrs)
                .map_err(|e| err(e.to_string()))?
                .unwrap_or(0.0)
                * ctx.scale;
            // Causal attention kernels skip the masked half of the scores.
            let causal = op
                .attrs
                .get("causal")
                .and_then(|a| a.as_bool())
                .unwrap_or(false);
            let flops = if causal { flops * 0.5 } else { flops };
            let dtype = op
                .inputs
                .iter()
                .map(|&t| graph.tensor(t).dtype)
                .find(|d| d.is_float())
                .unwrap_or(crate::ir::DType::F32);
            let tensor_bytes = |t: &TensorId| graph.tensor(*t).size_bytes() as f64 * ctx.scale;
            let mut candidates: Vec<Option<String>> = vec![None];
            if ctx.tp > 1 {
                for id in op.annotation.splittable_ids() {
                    candidates.push(Some(id.to_string()));
                }
            }
            let mut choices = Vec::new();
            for split in candidates {
                let (inputs, outputs) = match &split {
                    None => (
                        vec![Layout::R; op.inputs.len()],
                        vec![Layout::R; op.outputs.len()],
                    ),
                    Some(id) => match partition(&op.annotation, &binding, id, u64::from(ctx.tp)) {
                        Ok(rule) => (rule.inputs, rule.outputs),
                        // Not divisible (or otherwise illegal) at this tp.
                        Err(_) => continue,
                    },
                };
                // Tensor parallelism shards weights: a split that would leave
                // a weight matrix replicated is data parallelism in disguise
                // (full weights, gradients and optimizer state on every tp
                // rank), which the dp axis and ZeRO already cover.
                // A parameter traced as copies is held one block per rank:
                // split on its copy dim, never replicated (that would hold
                // every copy) nor split elsewhere.
                let breaks_copies = op.inputs.iter().zip(&inputs).any(|(t, l)| {
                    graph
                        .copies(*t)
                        .is_some_and(|(dim, _)| *l != Layout::D(dim))
                });
                if breaks_copies {
                    continue;
                }
                let replicates_matrix = split.is_some()
                    && op.inputs.iter().zip(&inputs).any(|(t, l)| {
                        let t = graph.tensor(*t);
                        t.role == Role::Parameter && t.shape.len() >= 2 && *l == Layout::R
                    });
                if replicates_matrix {
                    continue;
                }
                let local_flops = if split.is_some() {
                    flops / f64::from(ctx.tp)
                } else {
                    flops
                };
                let bytes: f64 = op
                    .inputs
                    .iter()
                    .zip(&inputs)
                    .chain(op.outputs.iter().zip(&outputs))
                    .map(|(t, l)| local_bytes(tensor_bytes(t), *l, ctx.tp))
                    .sum();
                let bytes = bytes + materialized_attention_bytes(ctx, op, &split);
                let fwd = op_time(
                    ctx.cluster,
                    op.kind.name(),
                    local_flops,
                    bytes,
                    compute_kind(&op.kind),
                    dtype,
                );
                choices.push(Choice {
                    split,
                    inputs,
                    outputs,
                    fwd_ps: ps(fwd),
                    bwd_ps: ps(fwd * backward_factor(&op.kind)),
                });
            }
            seg_ops.push(SegOp { op: id, choices });
        }

        // Tensors read or written by the segment, in first-use order.
        let mut tensors: Vec<SegTensor> = Vec::new();
        let index_of =
            |tensors: &Vec<SegTensor>, t: TensorId| tensors.iter().position(|s| s.id == t);
        for (oi, &id) in ops.iter().enumerate() {
            let op = graph.op(id);
            for (j, &t) in op.inputs.iter().enumerate() {
                let k = match index_of(&tensors, t) {
                    Some(k) => k,
                    None => {
                        let tensor = graph.tensor(t);
                        let source = match graph.producer(t) {
                            Some(p) => match ops.iter().position(|&o| o == p) {
                                Some(pi) => {
                                    let out = graph
                                        .op(p)
                                        .outputs
                                        .iter()
                                        .position(|&o| o == t)
                                        .unwrap_or(0);
                                    Source::Op(pi, out)
                                }
                                None => {
                                    if Some(t) != boundary_in {
                                        return Err(ShardingError::Op {
                                            op: op.name.clone(),
                                            detail: format!(
                                                "reads {} from outside its segment other than through the residual stream",
                                                tensor.name
                                            ),
                                        });
                                    }
                                    Source::Boundary(ctx.boundary)
                                }
                            },
                            None => match tensor.role {
                                Role::Parameter => Source::Param,
                                _ => Source::Data,
                            },
                        };
                        let copies_sync = graph.copies(t).map_or(0, |(_, m)| {
                            let model_bytes = tensor.size_bytes() as f64 / m.max(1) as f64;
                            ps(collective_time(
                                ctx.cluster,
                                Collective::AllReduce,
                                &Group::placed(ctx.cluster, ctx.tp, 1),
                                model_bytes,
                            ))
                        });
                        tensors.push(SegTensor {
                            id: t,
                            bytes: tensor.size_bytes() as f64 * ctx.scale,
                            source,
                            consumers: Vec::new(),
                            leaves_as: None,
                            copies_sync,
                        });
                        tensors.len() - 1
                    }
                };
                tensors[k].consumers.push((oi, j));
            }
            for (out, &t) in op.outputs.iter().enumerate() {
                if index_of(&tensors, t).is_none() {
                    tensors.push(SegTensor {
                        id: t,
                        bytes: graph.tensor(t).size_bytes() as f64 * ctx.scale,
                        source: Source::Op(oi, out),
                        consumers: Vec::new(),
                        leaves_as: None,
                        copies_sync: 0,
                    });
                }
            }
        }
        if let Some(out) = boundary_out {
            if let Some(k) = index_of(&tensors, out) {
                tensors[k].leaves_as = Some(ctx.boundary);
            }
        }
        Ok(Segment {
            ops: seg_ops,
            tensors,
            tp: ctx.tp,
            group: Group::placed(ctx.cluster, ctx.tp, 1),
        })
    }

    /// Time to turn a tensor of `bytes` from layout `from` into `to` over tp.
    pub fn conv(&self, cluster: &Cluster, from: Layout, to: Layout, bytes: f64) -> Ps {
        let n = f64::from(self.tp);
        let t = |c: Collective, b: f64| collective_time(cluster, c, &self.group, b);
        ps(match (from, to) {
            _ if from == to => 0.0,
            (Layout::R, _) | (_, Layout::V) => 0.0,
            (Layout::V, Layout::R) => t(Collective::AllReduce, bytes),
            (Layout::D(_), Layout::R) => t(Collective::AllGather, bytes),
            (Layout::V, Layout::D(_)) => t(Collective::ReduceScatter, bytes),
            (Layout::D(_), Layout::D(_)) => t(Collective::AllToAll, bytes / n),
        })
    }

    /// The gradient layout consumer `(op, input)` hands back under `choice`.
    fn grad_layout(&self, op: usize, input: usize, choice: usize) -> Layout {
        let c = &self.ops[op].choices[choice];
        match c.inputs[input] {
            Layout::R if c.split.is_some() => Layout::V,
            l => l,
        }
    }

    /// Cost of an assignment (choice index per op), picoseconds, with the
    /// cheapest legal combined gradient layout per tensor.
    pub fn evaluate(&self, cluster: &Cluster, assignment: &[usize]) -> Ps {
        self.breakdown(cluster, assignment).total()
    }

    /// The cost of an assignment split into forward/backward compute and
    /// communication.
    pub fn breakdown(&self, cluster: &Cluster, assignment: &[usize]) -> Breakdown {
        let mut b = Breakdown::default();
        for (o, &c) in assignment.iter().enumerate() {
            let ch = &self.ops[o].choices[c];
            b.fwd_compute = b.fwd_compute.saturating_add(ch.fwd_ps);
            b.bwd_compute = b.bwd_compute.saturating_add(ch.bwd_ps);
        }
        for t in &self.tensors {
            let (fwd_comm, grad) = self.tensor_parts(cluster, t, &|o| assignment[o]);
            b.fwd_comm = b.fwd_comm.saturating_add(fwd_comm);
            let Some(cost) = grad else {
                continue;
            };
            if t.source == Source::Param {
                b.param_sync = b
                    .param_sync
                    .saturating_add(cost)
                    .saturating_add(t.copies_sync);
            } else {
                b.bwd_comm = b.bwd_comm.saturating_add(cost);
            }
        }
        b
    }

    /// What one tensor costs under the choices `choice` gives its producer
    /// and consumers (nothing else is read): its forward conversions plus
    /// its backward gradient combination and, for a parameter traced as
    /// copies, their sync: the term of [`Self::evaluate`] for it.
    pub(super) fn tensor_cost(
        &self,
        cluster: &Cluster,
        t: &SegTensor,
        choice: &dyn Fn(usize) -> usize,
    ) -> Ps {
        let (fwd, grad) = self.tensor_parts(cluster, t, choice);
        let sync = match grad {
            Some(_) if t.source == Source::Param => t.copies_sync,
            _ => 0,
        };
        fwd.saturating_add(grad.unwrap_or(0)).saturating_add(sync)
    }

    /// A tensor's forward conversion cost and, if it has a gradient, its
    /// backward cost.
    fn tensor_parts(
        &self,
        cluster: &Cluster,
        t: &SegTensor,
        choice: &dyn Fn(usize) -> usize,
    ) -> (Ps, Option<Ps>) {
        let fwd = match t.source {
            Source::Op(p, out) => Some(self.ops[p].choices[choice(p)].outputs[out]),
            Source::Boundary(b) => Some(b),
            Source::Data | Source::Param => None,
        };
        let mut fwd_comm: Ps = 0;
        if let Some(from) = fwd {
            for &(o, j) in &t.consumers {
                let to = self.ops[o].choices[choice(o)].inputs[j];
                fwd_comm = fwd_comm.saturating_add(self.conv(cluster, from, to, t.bytes));
            }
            if let Some(l) = t.leaves_as {
                fwd_comm = fwd_comm.saturating_add(self.conv(cluster, from, l, t.bytes));
            }
        }
        let mut grads: BTreeSet<Layout> = t
            .consumers
            .iter()
            .map(|&(o, j)| self.grad_layout(o, j, choice(o)))
            .collect();
        if let Some(l) = t.leaves_as {
            grads.insert(l);
        }
        if grads.is_empty() {
            return (fwd_comm, None);
        }
        let options: Vec<Layout> = match grads.iter().next() {
            Some(&only) if grads.len() == 1 => vec![only, Layout::V],
            _ => vec![Layout::V],
        };
        let cost = options
            .iter()
            .map(|&g| self.grad_cost(cluster, t, fwd, g))
            .min()
            .unwrap_or(0);
        (fwd_comm, Some(cost))
    }

    /// Backward cost of a tensor whose consumers' gradients combine to `g`.
    fn grad_cost(&self, cluster: &Cluster, t: &SegTensor, fwd: Option<Layout>, g: Layout) -> Ps {
        match (t.source, fwd) {
            (Source::Data, _) => 0,
            (Source::Param, _) => {
                if g == Layout::V {
                    self.conv(cluster, Layout::V, Layout::R, t.bytes)
                } else {
                    0
                }
            }
            (_, Some(from)) => {
                let need = if from == Layout::V { Layout::R } else { from };
                self.conv(cluster, g, need, t.bytes)
            }
            (_, None) => 0,
        }
    }

    /// Number of assignments (product of choice counts).
    pub fn space_size(&self) -> f64 {
        self.ops.iter().map(|o| o.choices.len() as f64).product()
    }

    /// The optimum by enumerating every assignment: the reference the z3
    /// solution is tested against on small spaces.
    pub fn brute_force(&self, cluster: &Cluster) -> (Vec<usize>, Ps) {
        let n = self.ops.len();
        let mut a = vec![0usize; n];
        let mut best = (a.clone(), self.evaluate(cluster, &a));
        loop {
            let mut i = 0;
            while i < n {
                a[i] += 1;
                if a[i] < self.ops[i].choices.len() {
                    break;
                }
                a[i] = 0;
                i += 1;
            }
            if i == n {
                break;
            }
            let cost = self.evaluate(cluster, &a);
            if cost < best.1 {
                best = (a.clone(), cost);
            }
        }
        best
    }

    /// The optimum assignment and its cost, `fixed` pinning ops to a choice
    /// index (user constraints): by variable elimination
    /// ([`super::eliminate`]), or by z3 when its tables would exceed 2^22
    /// entries.
    pub fn solve(
        &self,
        cluster: &Cluster,
        fixed: &[(usize, usize)],
    ) -> Result<(Vec<usize>, Ps), ShardingError> {
        match super::eliminate::solve(self, cluster, fixed, 1 << 22) {
            Some(found) => Ok(found),
            None => self.solve_z3(cluster, fixed),
        }
    }

    /// The optimum found by z3 (exact: an optimisation over pseudo-boolean
    /// choice variables with an integer objective). `fixed` pins ops to a
    /// choice index (user constraints).
    pub fn solve_z3(
        &self,
        cluster: &Cluster,
        fixed: &[(usize, usize)],
    ) -> Result<(Vec<usize>, Ps), ShardingError> {
        let opt = Optimize::new();
        if let Ok(engine) = std::env::var("AUTOPART_MAXSAT") {
            let mut params = z3::Params::new();
            params.set_symbol("maxsat_engine", engine.as_str());
            opt.set_params(&params);
        }
        let x: Vec<Vec<Bool>> = self
            .ops
            .iter()
            .enumerate()
            .map(|(o, op)| {
                (0..op.choices.len())
                    .map(|c| Bool::new_const(format!("x_{o}_{c}")))
                    .collect()
            })
            .collect();
        for xs in &x {
            let terms: Vec<(&Bool, i32)> = xs.iter().map(|b| (b, 1)).collect();
            opt.assert(Bool::pb_eq(&terms, 1));
        }
        for &(o, c) in fixed {
            opt.assert(&x[o][c]);
        }
        // Each cost term is a soft constraint "cond is false" weighted by
        // its cost: weighted MaxSAT minimises the sum of the costs whose
        // condition holds, the same objective as `evaluate`.
        let mut terms: Vec<(Bool, Ps)> = Vec::new();
        let add = |cond: Bool, cost: Ps, terms: &mut Vec<(Bool, Ps)>| {
            if cost > 0 {
                terms.push((cond, cost));
            }
        };
        for (o, op) in self.ops.iter().enumerate() {
            for (c, ch) in op.choices.iter().enumerate() {
                add(
                    x[o][c].clone(),
                    ch.fwd_ps.saturating_add(ch.bwd_ps),
                    &mut terms,
                );
            }
        }
        for (ti, t) in self.tensors.iter().enumerate() {
            // Forward: every (producer choice, consumer choice) pair.
            let producer_layouts: Vec<(Option<Bool>, Layout)> = match t.source {
                Source::Op(p, out) => self.ops[p]
                    .choices
                    .iter()
                    .enumerate()
                    .map(|(c, ch)| (Some(x[p][c].clone()), ch.outputs[out]))
                    .collect(),
                Source::Boundary(b) => vec![(None, b)],
                Source::Data | Source::Param => Vec::new(),
            };
            for (pc, from) in &producer_layouts {
                for &(o, j) in &t.consumers {
                    for (c, ch) in self.ops[o].choices.iter().enumerate() {
                        let cost = self.conv(cluster, *from, ch.inputs[j], t.bytes);
                        let cond = match pc {
                            Some(p) => Bool::and(&[p, &x[o][c]]),
                            None => x[o][c].clone(),
                        };
                        add(cond, cost, &mut terms);
                    }
                }
                if let Some(b) = t.leaves_as {
                    let cost = self.conv(cluster, *from, b, t.bytes);
                    let cond = pc.clone().unwrap_or_else(|| Bool::from_bool(true));
                    add(cond, cost, &mut terms);
                }
            }
            // Backward: a combined gradient layout per tensor.
            let mut layouts: BTreeSet<Layout> = BTreeSet::new();
            layouts.insert(Layout::V);
            for &(o, j) in &t.consumers {
                for c in 0..self.ops[o].choices.len() {
                    layouts.insert(self.grad_layout(o, j, c));
                }
            }
            if let Some(b) = t.leaves_as {
                layouts.insert(b);
            }
            if t.consumers.is_empty() && t.leaves_as.is_none() {
                continue;
            }
            let layouts: Vec<Layout> = layouts.into_iter().collect();
            let g: Vec<Bool> = (0..layouts.len())
                .map(|i| Bool::new_const(format!("g_{ti}_{i}")))
                .collect();
            let g_terms: Vec<(&Bool, i32)> = g.iter().map(|b| (b, 1)).collect();
            opt.assert(Bool::pb_eq(&g_terms, 1));
            let g_of = |l: Layout| layouts.iter().position(|&m| m == l).map(|i| &g[i]);
            let v = g_of(Layout::V)
                .cloned()
                .unwrap_or_else(|| Bool::from_bool(true));
            for &(o, j) in &t.consumers {
                for (c, xc) in x[o].iter().enumerate() {
                    let gl = self.grad_layout(o, j, c);
                    if let Some(gc) = g_of(gl) {
                        opt.assert(xc.implies(Bool::or(&[gc, &v])));
                    }
                }
            }
            if let Some(b) = t.leaves_as {
                if let Some(gb) = g_of(b) {
                    opt.assert(Bool::or(&[gb, &v]));
                }
            }
            match t.source {
                Source::Op(p, out) => {
                    for (c, ch) in self.ops[p].choices.iter().enumerate() {
                        for (li, &l) in layouts.iter().enumerate() {
                            let cost = self.grad_cost(cluster, t, Some(ch.outputs[out]), l);
                            add(Bool::and(&[&x[p][c], &g[li]]), cost, &mut terms);
                        }
                    }
                }
                Source::Boundary(_) | Source::Data | Source::Param => {
                    let fwd = match t.source {
                        Source::Boundary(b) => Some(b),
                        _ => None,
                    };
                    for (li, &l) in layouts.iter().enumerate() {
                        add(
                            g[li].clone(),
                            self.grad_cost(cluster, t, fwd, l),
                            &mut terms,
                        );
                    }
                }
            }
        }
        for (cond, cost) in &terms {
            opt.assert_soft(&cond.not(), *cost, None);
        }
        match opt.check(&[]) {
            SatResult::Sat => {}
            other => return Err(ShardingError::Solver(format!("{other:?}"))),
        }
        let model = opt
            .get_model()
            .ok_or_else(|| ShardingError::Solver("no model".into()))?;
        let mut assignment = Vec::with_capacity(self.ops.len());
        for xs in &x {
            let c = xs
                .iter()
                .position(|b| model.eval(b, true).and_then(|v| v.as_bool()) == Some(true))
                .ok_or_else(|| ShardingError::Solver("a choice variable is unassigned".into()))?;
            assignment.push(c);
        }
        let cost = self.evaluate(cluster, &assignment);
        Ok((assignment, cost))
    }
}

/// The residual stream tensors of a slice of ops: the one tensor it reads
/// from earlier ops (its input) and the last tensor it produces that later
/// ops read (its output).
pub fn boundaries(graph: &Graph, ops: &[OpId]) -> (Option<TensorId>, Option<TensorId>) {
    let inside = |o: OpId| ops.contains(&o);
    let mut input = None;
    let mut output = None;
    for &o in ops {
        let op = graph.op(o);
        for &t in &op.inputs {
            if input.is_none() && graph.producer(t).is_some_and(|p| !inside(p)) {
                input = Some(t);
            }
        }
        for &t in &op.outputs {
            if graph.consumers(t).iter().any(|&c| !inside(c)) {
                output = Some(t);
            }
        }
    }
    (input, output)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::anno::builtin_registry;
    use crate::cost::load_cluster;
    use crate::ir::DType;
    use crate::trace::{TraceOptions, preset, trace_model};

    fn layer_segment(
        model: &str,
        tp: u32,
        boundary: Layout,
        seq: u64,
    ) -> (Segment, Graph, Cluster) {
        let registry = builtin_registry();
        let graph = trace_model(
            &preset(model).expect("preset"),
            &TraceOptions {
                batch: 1,
                seq_len: Some(seq),
                dtype: DType::Bf16,
                kv_copies: 1,
            },
            &registry,
        )
        .expect("traces");
        let cluster = load_cluster("a100-80gb").expect("preset");
        let ops: Vec<OpId> = graph.layer_ops(0).map(|(id, _)| id).collect();
        let (bin, bout) = boundaries(&graph, &ops);
        let ctx = SegmentCtx {
            graph: &graph,
            registry: &registry,
            cluster: &cluster,
            tp,
            boundary,
            scale: 1.0,
        };
        let seg = Segment::build(&ctx, &ops, bin, bout).expect("builds");
        (seg, graph, cluster)
    }

    fn splits(seg: &Segment, graph: &Graph, a: &[usize]) -> Vec<String> {
        seg.ops
            .iter()
            .zip(a)
            .map(|(o, &c)| {
                format!(
                    "{}:{}",
                    graph.op(o.op).name.rsplit('.').next().unwrap_or(""),
                    o.choices[c].split.clone().unwrap_or_else(|| "-".into())
                )
            })
            .collect()
    }

    #[test]
    fn llama3_8b_tp8_finds_megatron_sharding() {
        let (seg, graph, cluster) = layer_segment("llama3-8b", 8, Layout::R, 4096);
        let t0 = std::time::Instant::now();
        let (a, cost) = seg.solve(&cluster, &[]).expect("solves");
        let s = splits(&seg, &graph, &a);
        eprintln!("{s:?} {cost} in {:?}", t0.elapsed());
        assert!(s.contains(&"q_proj:n".to_string()), "{s:?}");
        assert!(s.contains(&"o_proj:k".to_string()), "{s:?}");
        assert!(s.contains(&"down_proj:k".to_string()), "{s:?}");
        assert!(s.contains(&"attn:g".to_string()), "{s:?}");
    }
}
