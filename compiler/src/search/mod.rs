//! The plan search: mesh factorisations, micro-batching, schedules, ZeRO,
//! recompute, sequence parallelism, per-op tensor-parallel splits and
//! pipeline stage boundaries, under a cluster's memory and bandwidth.
//!
//! Structure (outer to inner):
//! 1. enumerate tp · pp · dp = plan GPUs, micro-batch size (and so count),
//!    sequence parallelism, schedule and ZeRO stage, each pinned by a
//!    [`Constraints`] field when the user fixed it;
//! 2. per (tp, sp, micro-batch, micro-batch count), solve the sharding of one
//!    transformer layer exactly ([`sharding`], [`eliminate`]) and reuse it for every
//!    isomorphic layer; the embedding and head segments likewise;
//! 3. per configuration, a dynamic program over layer intervals places
//!    stage boundaries and picks each stage's recompute mode, minimising the
//!    slowest stage subject to each stage's peak memory fitting;
//! 4. keep the `top_k` fastest plans.
//!
//! The step-time model ([`model`]) is shared with `evaluate` (all fixed) and
//! with the brute-force reference used in tests, so "exact within its
//! space" is checked against the same objective.

pub mod eliminate;
pub mod model;
pub mod reprice;
pub mod segment_cost;
pub mod sharding;
pub mod to_plan;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::anno::{Layout, Registry};
use crate::cost::Cluster;
use crate::ir::{Graph, OpId};
use crate::plan::{DType, Recompute, Schedule, ZeroStage, layer_pattern};
use crate::trace::ModelConfig;

pub use model::{Config, Evaluation, StageEval};
use segment_cost::SegmentCost;
use sharding::{Segment, SegmentCtx, ShardingError, boundaries};

/// Plan dimensions the user fixed (`--tp 8`, a constraints file, ...).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Constraints {
    pub tp: Option<u32>,
    pub pp: Option<u32>,
    pub dp: Option<u32>,
    pub micro_batch: Option<u64>,
    pub schedule: Option<Schedule>,
    /// One mode for every stage.
    pub recompute: Option<Recompute>,
    pub zero: Option<ZeroStage>,
    pub sequence_parallel: Option<bool>,
    /// The dtype gradients are summed in over dp (`None`: f32).
    pub reduce_dtype: Option<DType>,
    /// Pinned tp splits: op name (layer ops with `*` for the layer index,
    /// `layers.*.mlp.down_proj`) → identifier to split, or `None` to run it
    /// replicated.
    pub splits: BTreeMap<String, Option<String>>,
    /// Tied weights (set by the compile driver's `ties` pass, not read from
    /// files): each reader not pinned in `splits` splits its tied dim where
    /// that is legal at the tp being solved, and runs replicated otherwise.
    #[serde(skip)]
    pub tied: Vec<TiedWeight>,
}

impl Constraints {
    /// Parses a RON constraints file (`--constraints FILE`): the fields
    /// above, each optional; `origin` names the file in errors, which give
    /// `origin:line:col: what was expected`.
    pub fn from_ron_str(text: &str, origin: &str) -> Result<Constraints, String> {
        ron::Options::default()
            .from_str::<Constraints>(text)
            .map_err(|e| {
                format!(
                    "{origin}:{}:{}: {}",
                    e.span.start.line, e.span.start.col, e.code
                )
            })
    }
}

/// A parameter read by more than one op (GPT's embedding and head).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TiedWeight {
    pub param: String,
    pub readers: Vec<TiedReader>,
    /// The user pinned a reader's split: the search leaves them all alone.
    pub user_pinned: bool,
}

/// One op reading a tied weight: its plan pattern and the annotation
/// identifier of the weight's first dim in it (the vocab).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TiedReader {
    pub op: String,
    pub dim: Option<String>,
}

/// What to search for.
#[derive(Clone, Debug)]
pub struct SearchInput<'a> {
    /// The model traced at batch 1 (one sequence) and the plan's sequence length.
    pub graph: &'a Graph,
    pub registry: &'a Registry,
    pub model: &'a ModelConfig,
    pub cluster: &'a Cluster,
    pub plan_gpus: u32,
    pub runtime_gpus: u32,
    /// Sequences per optimizer step over all runtime GPUs.
    pub global_batch: u64,
    pub constraints: &'a Constraints,
    pub top_k: usize,
    /// The same model traced with each kv head copied `m` times, by `m`
    /// ([`kv_copy_degrees`]): the graph a tp beyond the kv-head count
    /// shards. A tp whose degree is missing here is not searched.
    pub kv_graphs: &'a BTreeMap<u64, Graph>,
}

impl SearchInput<'_> {
    /// The graph tp shards: the model's, or the one with kv heads copied.
    pub fn graph_for(&self, tp: u32) -> Option<&Graph> {
        match kv_copies(self.model, tp) {
            1 => Some(self.graph),
            m => self.kv_graphs.get(&m),
        }
    }
}

#[derive(Debug, Error)]
pub enum SearchError {
    #[error("{0}")]
    Constraint(String),
    #[error("no plan fits: {0}")]
    NoPlan(String),
    #[error(transparent)]
    Sharding(#[from] ShardingError),
}

/// A found plan: its configuration, evaluation and the op splits.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub config: Config,
    pub eval: Evaluation,
    /// Per op of the graph: the split chosen for its segment.
    pub splits: Vec<OpSplitOf>,
    /// Copies of each kv head the graph was traced with ([`kv_copies`]).
    pub kv_copies: u64,
}

/// An op's tp split and the layouts it gives: (op, split identifier,
/// input layouts, output layouts).
pub type OpSplitOf = (OpId, Option<String>, Vec<Layout>, Vec<Layout>);

/// Solved segments by (tp, sp, micro-batch).
type SolvedJobs = Vec<((u32, bool, u64), Solved)>;

/// The result of a search.
#[derive(Clone, Debug)]
pub struct SearchResult {
    /// Best first.
    pub plans: Vec<Candidate>,
    /// Configurations priced (after pruning by memory and bounds).
    pub evaluated: u64,
    /// Sharding jobs: distinct (tp, sp) pairs, each solved exactly over its
    /// micro-batch sizes.
    pub sharding_solves: u64,
}

/// The divisors of `n`, ascending (none for 0), in O(sqrt n).
fn divisors(n: u64) -> Vec<u64> {
    let (mut low, mut high) = (Vec::new(), Vec::new());
    let mut d = 1u64;
    while d <= n / d {
        if n % d == 0 {
            low.push(d);
            if d != n / d {
                high.push(n / d);
            }
        }
        d += 1;
    }
    low.extend(high.into_iter().rev());
    low
}

/// The largest global batch the search plans for (sequences per step; the
/// largest published runs take a few thousand).
pub const MAX_GLOBAL_BATCH: u64 = 1 << 32;

/// Attention head counts that tp must divide (query heads, kv heads).
fn head_counts(model: &ModelConfig) -> (u64, u64) {
    match model {
        ModelConfig::Llama(c) => (c.n_heads, c.n_kv_heads),
        ModelConfig::Gpt(c) => (c.n_heads, c.n_kv_heads),
    }
}

/// Checks a tp degree against the model; the error says why not. tp must
/// divide the query heads and either divide the kv heads or be a multiple
/// of them (each kv head then copied `tp / kv` times, [`kv_copies`]).
pub fn check_tp(model: &ModelConfig, tp: u32) -> Result<(), String> {
    let (heads, kv) = head_counts(model);
    let tp64 = u64::from(tp);
    if tp == 0 {
        return Err("tp must be at least 1".into());
    }
    if heads % tp64 != 0 {
        return Err(format!("tp={tp} does not divide {heads} attention heads"));
    }
    if kv % tp64 != 0 && tp64 % kv != 0 {
        return Err(format!(
            "tp={tp} neither divides {kv} kv heads nor is a multiple of them (to copy each kv head tp/{kv} times)"
        ));
    }
    Ok(())
}

/// How many copies of each kv head tp needs: 1 when tp divides the kv
/// heads, else `tp / kv` (one kv head per tp rank; [`check_tp`] holds).
pub fn kv_copies(model: &ModelConfig, tp: u32) -> u64 {
    let (_, kv) = head_counts(model);
    let tp = u64::from(tp.max(1));
    if kv == 0 || kv % tp == 0 {
        1
    } else {
        (tp / kv).max(1)
    }
}

/// The kv-copy degrees (above 1) that some tp of `plan_gpus` GPUs needs,
/// for the graphs [`SearchInput::kv_graphs`] must hold; `tp` restricts to
/// one degree.
pub fn kv_copy_degrees(model: &ModelConfig, plan_gpus: u32, tp: Option<u32>) -> Vec<u64> {
    let mut out: Vec<u64> = divisors(u64::from(plan_gpus))
        .into_iter()
        .filter_map(|d| u32::try_from(d).ok())
        .filter(|&d| tp.is_none_or(|t| t == d) && check_tp(model, d).is_ok())
        .map(|d| kv_copies(model, d))
        .filter(|&m| m > 1)
        .collect();
    out.dedup();
    out
}

/// The three segments of a graph: ops before the first layer, the ops of
/// layer 0 (the template for every layer), ops after the last layer.
fn segments(graph: &Graph) -> (Vec<OpId>, Vec<OpId>, Vec<OpId>) {
    let mut pre = Vec::new();
    let mut post = Vec::new();
    let mut seen_layer = false;
    let layer0: Vec<OpId> = graph.layer_ops(0).map(|(id, _)| id).collect();
    for (id, op) in graph.ops() {
        match op.layer {
            Some(_) => seen_layer = true,
            None if seen_layer => post.push(id),
            None => pre.push(id),
        }
    }
    (pre, layer0, post)
}

/// The three solved segments at one (tp, sp, micro-batch, count).
#[derive(Clone, Debug)]
pub struct Solved {
    pub pre: SegmentCost,
    pub layer: SegmentCost,
    pub post: SegmentCost,
}

/// The segment of `ops` at `tp`, its stream entering and leaving in
/// `boundary`, priced at micro-batch `mb`.
fn build_segment(
    input: &SearchInput<'_>,
    graph: &Graph,
    ops: &[OpId],
    tp: u32,
    boundary: Layout,
    mb: u64,
) -> Result<Segment, SearchError> {
    let (bin, bout) = boundaries(graph, ops);
    let ctx = SegmentCtx {
        graph,
        registry: input.registry,
        cluster: input.cluster,
        tp,
        boundary,
        scale: mb as f64,
    };
    Ok(Segment::build(&ctx, ops, bin, bout)?)
}

/// One segment's optimal assignments for a sorted list of micro-batch
/// sizes, by solving at the ends of the list and bisecting only where the
/// ends disagree (each assignment's cost is affine in the size, so one
/// optimal at both ends is optimal between them).
fn solve_range(
    input: &SearchInput<'_>,
    ops: &[OpId],
    tp: u32,
    sp: bool,
    mbs: &[u64],
) -> Result<Vec<(u64, SegmentCost)>, SearchError> {
    let graph = input.graph_for(tp).ok_or_else(|| no_kv_graph(input, tp))?;
    let boundary = if sp { Layout::D(1) } else { Layout::R };
    let build = |mb: u64| build_segment(input, graph, ops, tp, boundary, mb);
    let solve = |seg: &Segment| -> Result<Vec<usize>, SearchError> {
        // Only None is legal at tp = 1: nothing to optimise.
        if seg.ops.iter().all(|o| o.choices.len() == 1) {
            return Ok(vec![0; seg.ops.len()]);
        }
        let fixed = pinned(graph, seg, input.constraints)?;
        Ok(seg.solve(input.cluster, &fixed)?.0)
    };
    let mut assignment: Vec<Option<Vec<usize>>> = vec![None; mbs.len()];
    let mut segs: Vec<Option<Segment>> = (0..mbs.len()).map(|_| None).collect();
    // Intervals [lo, hi] of indices still to settle.
    let mut work = vec![(0usize, mbs.len().saturating_sub(1))];
    while let Some((lo, hi)) = work.pop() {
        for i in [lo, hi] {
            if segs[i].is_none() {
                segs[i] = Some(build(mbs[i])?);
            }
            if assignment[i].is_none() {
                if let Some(seg) = &segs[i] {
                    assignment[i] = Some(solve(seg)?);
                }
            }
        }
        if hi <= lo + 1 {
            continue;
        }
        if assignment[lo] == assignment[hi] {
            for i in lo + 1..hi {
                assignment[i] = assignment[lo].clone();
            }
        } else {
            let mid = (lo + hi) / 2;
            work.push((lo, mid));
            work.push((mid, hi));
        }
    }
    let mut out = Vec::with_capacity(mbs.len());
    for (i, &mb) in mbs.iter().enumerate() {
        let seg = match segs[i].take() {
            Some(s) => s,
            None => build(mb)?,
        };
        let a = assignment[i]
            .clone()
            .ok_or_else(|| SearchError::Constraint("internal: unsolved micro-batch".into()))?;
        out.push((
            mb,
            SegmentCost::new(graph, &seg, input.cluster, &a, mb as f64, tp),
        ));
    }
    Ok(out)
}

/// Solves the three segments at (tp, sp) for every micro-batch size in
/// `mbs` (sorted, distinct).
pub fn solve_segments(
    input: &SearchInput<'_>,
    tp: u32,
    sp: bool,
    mbs: &[u64],
) -> Result<BTreeMap<u64, Solved>, SearchError> {
    let graph = input.graph_for(tp).ok_or_else(|| no_kv_graph(input, tp))?;
    let (pre, layer, post) = segments(graph);
    let pre = solve_range(input, &pre, tp, sp, mbs)?;
    let layer = solve_range(input, &layer, tp, sp, mbs)?;
    let post = solve_range(input, &post, tp, sp, mbs)?;
    Ok(pre
        .into_iter()
        .zip(layer)
        .zip(post)
        .map(|(((mb, pre), (_, layer)), (_, post))| (mb, Solved { pre, layer, post }))
        .collect())
}

fn no_kv_graph(input: &SearchInput<'_>, tp: u32) -> SearchError {
    SearchError::Constraint(format!(
        "tp={tp} needs the model traced with {} copies of each kv head, which the search was not given",
        kv_copies(input.model, tp)
    ))
}

/// Choice indices pinned by `constraints.splits` for the ops of `seg`.
fn pinned(
    graph: &Graph,
    seg: &Segment,
    constraints: &Constraints,
) -> Result<Vec<(usize, usize)>, SearchError> {
    let mut fixed = Vec::new();
    for (o, sop) in seg.ops.iter().enumerate() {
        let op = graph.op(sop.op);
        let key = layer_pattern(&op.name, op.layer);
        let tied = constraints
            .tied
            .iter()
            .filter(|t| !t.user_pinned)
            .find_map(|t| t.readers.iter().find(|r| r.op == key));
        if let Some(reader) = tied {
            // The tied dim where this tp can split it, else replicated; both
            // ends of a tie see the same dim size, so they agree (the
            // driver verifies it).
            let c = sop
                .choices
                .iter()
                .position(|c| reader.dim.is_some() && c.split == reader.dim)
                .or_else(|| sop.choices.iter().position(|c| c.split.is_none()))
                .ok_or_else(|| {
                    SearchError::Constraint(format!(
                        "{key}: no replicated choice for a tied weight"
                    ))
                })?;
            fixed.push((o, c));
        } else if let Some(want) = constraints.splits.get(&key) {
            let c = sop
                .choices
                .iter()
                .position(|c| &c.split == want)
                .ok_or_else(|| {
                    let legal: Vec<String> = sop
                        .choices
                        .iter()
                        .map(|c| c.split.clone().unwrap_or_else(|| "None".into()))
                        .collect();
                    SearchError::Constraint(format!(
                        "split {} of {key} is not legal here (legal: {})",
                        want.clone().unwrap_or_else(|| "None".into()),
                        legal.join(", ")
                    ))
                })?;
            fixed.push((o, c));
        }
    }
    Ok(fixed)
}

fn pick<T: Copy + PartialEq>(all: Vec<T>, fixed: Option<T>) -> Vec<T> {
    match fixed {
        Some(v) => all.into_iter().filter(|x| *x == v).collect(),
        None => all,
    }
}

/// Searches the plan space; returns the best plans, fastest first.
pub fn search(input: &SearchInput<'_>) -> Result<SearchResult, SearchError> {
    let c = input.constraints;
    let n = input.plan_gpus;
    if n == 0 {
        return Err(SearchError::Constraint(
            "--plan-ngpus must be at least 1".into(),
        ));
    }
    if input.runtime_gpus == 0 || input.runtime_gpus % n != 0 {
        return Err(SearchError::Constraint(format!(
            "runtime GPUs {} must be a positive multiple of plan GPUs {n}",
            input.runtime_gpus
        )));
    }
    if input.global_batch == 0 || input.global_batch > MAX_GLOBAL_BATCH {
        return Err(SearchError::Constraint(format!(
            "global batch {} is not between 1 and the {MAX_GLOBAL_BATCH} sequences autopart plans for",
            input.global_batch
        )));
    }
    let replicas = u64::from(input.runtime_gpus / n);
    let n_layers = input.graph.n_layers();
    if let Some(tp) = c.tp {
        check_tp(input.model, tp).map_err(SearchError::Constraint)?;
        if input.graph_for(tp).is_none() {
            return Err(no_kv_graph(input, tp));
        }
        if n % tp != 0 {
            return Err(SearchError::Constraint(format!(
                "tp={tp} does not divide {n} plan GPUs"
            )));
        }
    }
    if let Some(pp) = c.pp {
        if pp == 0 || n % pp != 0 {
            return Err(SearchError::Constraint(format!(
                "pp={pp} does not divide {n} plan GPUs"
            )));
        }
        if pp > n_layers {
            return Err(SearchError::Constraint(format!(
                "pp={pp} exceeds the model's {n_layers} layers"
            )));
        }
    }
    if let (Some(tp), Some(pp), Some(dp)) = (c.tp, c.pp, c.dp) {
        // In u64: three u32 factors overflow u32.
        let product = u64::from(tp) * u64::from(pp) * u64::from(dp);
        if product != u64::from(n) {
            return Err(SearchError::Constraint(format!(
                "tp={tp} x pp={pp} x dp={dp} = {product} is not the {n} plan GPUs"
            )));
        }
    }
    if c.sequence_parallel == Some(true) && c.tp == Some(1) {
        return Err(SearchError::Constraint(
            "sequence parallelism needs tp > 1".into(),
        ));
    }

    let mut configs: Vec<Config> = Vec::new();
    let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
    let tps: Vec<u32> = divisors(u64::from(n))
        .into_iter()
        .map(|d| d as u32)
        .filter(|&tp| check_tp(input.model, tp).is_ok() && input.graph_for(tp).is_some())
        .collect();
    for tp in pick(tps, c.tp) {
        let pps: Vec<u32> = divisors(u64::from(n / tp))
            .into_iter()
            .map(|d| d as u32)
            .filter(|&pp| pp <= n_layers)
            .collect();
        for pp in pick(pps, c.pp) {
            let dp = n / (tp * pp);
            if c.dp.is_some_and(|d| d != dp) {
                continue;
            }
            let dp_total = u64::from(dp) * replicas;
            if input.global_batch % dp_total != 0 {
                *reasons
                    .entry(format!(
                        "global batch {} is not divisible by the data-parallel degree {dp_total}",
                        input.global_batch
                    ))
                    .or_default() += 1;
                continue;
            }
            let per_replica = input.global_batch / dp_total;
            for mb in pick(divisors(per_replica), c.micro_batch) {
                let n_micro = per_replica / mb;
                let sps = if tp > 1 {
                    vec![false, true]
                } else {
                    vec![false]
                };
                for sp in pick(sps, c.sequence_parallel) {
                    let mut schedules = vec![Schedule::OneFOneB];
                    if pp > 1 {
                        schedules.push(Schedule::GPipe);
                        // 2 and 4 chunks are searched; a pinned count is
                        // taken as given (Megatron recipes run 6 or 12).
                        let pinned = match c.schedule {
                            Some(Schedule::Interleaved { chunks }) if chunks > 4 => Some(chunks),
                            _ => None,
                        };
                        for v in [2u32, 4].into_iter().chain(pinned) {
                            if n_micro % u64::from(pp) == 0
                                && n_layers % (pp.saturating_mul(v)) == 0
                            {
                                schedules.push(Schedule::Interleaved { chunks: v });
                            }
                        }
                    } else if c.schedule == Some(Schedule::GPipe) {
                        schedules.push(Schedule::GPipe);
                    }
                    for schedule in pick(schedules, c.schedule) {
                        // With no data parallelism the ZeRO stages shard
                        // nothing: one candidate, not four copies of it.
                        let zeros = match c.zero {
                            Some(z) => vec![z],
                            None if dp_total > 1 => ZeroStage::ALL.to_vec(),
                            None => vec![ZeroStage::Off],
                        };
                        for zero in zeros {
                            configs.push(Config {
                                tp,
                                pp,
                                dp,
                                replicas: replicas as u32,
                                micro_batch: mb,
                                n_micro,
                                schedule,
                                zero,
                                sp,
                                n_layers,
                                recompute: c.recompute,
                                reduce_dtype: c.reduce_dtype.unwrap_or(DType::Fp32),
                            });
                        }
                    }
                }
            }
        }
    }
    if configs.is_empty() {
        let why = reasons.keys().cloned().collect::<Vec<_>>().join("; ");
        return Err(SearchError::Constraint(if why.is_empty() {
            match (c.micro_batch, c.schedule) {
                (Some(mb), Some(s @ Schedule::Interleaved { .. })) => format!(
                    "micro-batch {mb} with schedule {s} fits no mesh (the micro-batch must divide the per-replica batch; interleaving needs pp > 1, micro-batches a multiple of pp and layers a multiple of pp x chunks)"
                ),
                (Some(mb), _) => {
                    format!("micro-batch {mb} does not divide the per-replica batch of any mesh")
                }
                (_, Some(s)) => format!(
                    "schedule {s} fits no mesh (interleaving needs pp > 1, micro-batches a multiple of pp and layers a multiple of pp x chunks)"
                ),
                _ => "no mesh satisfies the constraints".into(),
            }
        } else {
            why
        }));
    }

    // Sharding problems: one job per (tp, sp) over its micro-batch sizes,
    // spread over the machine's cores (each thread has its own z3 context for the fallback).
    let mut jobs: BTreeMap<(u32, bool), Vec<u64>> = BTreeMap::new();
    for cfg in &configs {
        jobs.entry((cfg.tp, cfg.sp))
            .or_default()
            .push(cfg.micro_batch);
    }
    for mbs in jobs.values_mut() {
        mbs.sort_unstable();
        mbs.dedup();
    }
    let jobs: Vec<((u32, bool), Vec<u64>)> = jobs.into_iter().collect();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(jobs.len().max(1));
    let results: Vec<Result<SolvedJobs, SearchError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let jobs = &jobs;
                scope.spawn(move || {
                    let mut out = Vec::new();
                    for ((tp, sp), mbs) in jobs.iter().skip(t).step_by(threads) {
                        for (mb, s) in solve_segments(input, *tp, *sp, mbs)? {
                            out.push(((*tp, *sp, mb), s));
                        }
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(SearchError::Constraint("a sharding thread panicked".into()))
                })
            })
            .collect()
    });
    let mut solved: BTreeMap<(u32, bool, u64), Solved> = BTreeMap::new();
    for r in results {
        solved.extend(r?);
    }
    let sharding_solves = jobs.len() as u64;

    let mut best: Vec<(Config, Evaluation)> = Vec::new();
    let mut evaluated = 0u64;
    let top_k = input.top_k.max(1);
    for config in configs {
        let Some(seg) = solved.get(&(config.tp, config.sp, config.micro_batch)) else {
            continue;
        };
        let bound = if best.len() >= top_k {
            best.last().map(|b| b.1.step_s)
        } else {
            None
        };
        evaluated += 1;
        match model::place_stages(input.cluster, &config, seg, bound) {
            Ok(eval) => {
                best.push((config, eval));
                best.sort_by(|a, b| {
                    a.1.step_s
                        .total_cmp(&b.1.step_s)
                        .then(a.1.peak_mem_bytes.cmp(&b.1.peak_mem_bytes))
                });
                best.truncate(top_k);
            }
            Err(reason) => *reasons.entry(reason).or_default() += 1,
        }
    }
    if best.is_empty() {
        let mut why: Vec<(u64, String)> = reasons.into_iter().map(|(r, n)| (n, r)).collect();
        why.sort_by_key(|w| std::cmp::Reverse(w.0));
        let text = why
            .iter()
            .take(3)
            .map(|(_, r)| r.clone())
            .collect::<Vec<_>>()
            .join("; ");
        return Err(SearchError::NoPlan(if text.is_empty() {
            "no configuration satisfies the constraints".into()
        } else {
            text
        }));
    }
    let plans = best
        .into_iter()
        .map(|(config, eval)| {
            let seg = &solved[&(config.tp, config.sp, config.micro_batch)];
            let graph = input.graph_for(config.tp).unwrap_or(input.graph);
            let mut splits = Vec::new();
            for (id, op) in graph.ops() {
                let segc = match op.layer {
                    Some(_) => &seg.layer,
                    None if seg.pre.splits.iter().any(|s| s.op == id) => &seg.pre,
                    None => &seg.post,
                };
                // Layer ops map onto the template layer by position.
                let choice = match op.layer {
                    Some(l) => {
                        let pos = graph.layer_ops(l).position(|(o, _)| o == id).unwrap_or(0);
                        segc.splits.get(pos)
                    }
                    None => segc.splits.iter().find(|s| s.op == id),
                };
                if let Some(ch) = choice {
                    splits.push((id, ch.split.clone(), ch.inputs.clone(), ch.outputs.clone()));
                }
            }
            Candidate {
                kv_copies: kv_copies(input.model, config.tp),
                config,
                eval,
                splits,
            }
        })
        .collect();
    Ok(SearchResult {
        plans,
        evaluated,
        sharding_solves,
    })
}
