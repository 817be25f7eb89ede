//! `rewrite`: equality saturation (egg) over lowered programs, to fuse and
//! cancel collectives and move them across element-wise ops and norms.
//!
//! Each block becomes an e-graph expression ([`lang`]): adapters are unary
//! nodes, local ops are nodes naming a template of the op with its states,
//! and an analysis gives every e-class its [`State`] (forward layout and
//! gradient layout), so that a rule can only equate values of the same
//! state. The rules are sound for forward and backward alike (each names
//! the adapter duals that make it so): inverse adapters cancel, an
//! all-reduce followed by a chunk is a reduce-scatter, a gather followed by
//! a copy is a gather-for-shards, an all-reduce on the sequence dim splits
//! into reduce-scatter and all-gather, and gathers move below element-wise
//! ops and norms, which then run on sequence shards. Extraction prices each
//! node with the cost model ([`AdapterCost`] for adapters, memory traffic
//! at the cluster's HBM rate for local ops).
//!
//! The residual stream crosses blocks in one state. Besides the lowered
//! stream state, a replicated stream may also be tried split on the
//! sequence dim (`seq_stream`: the stream is read through an all-gather and
//! left through a chunk in every block, which cancel across block
//! boundaries); the cheapest program over all blocks wins, and the input is
//! kept when nothing is cheaper. Together the rules derive Megatron
//! sequence parallelism from a plain tp plan. The driver tries it only when
//! asked (`compile --rewrite-stream`): otherwise sequence parallelism stays
//! the search's choice (`--sp`).
//!
//! This module reads [`crate::lower`]'s types and never changes how a plan
//! is lowered; its output passes [`verify`] or is an error.

mod convert;
mod lang;
mod report;

use std::collections::BTreeMap;
use std::time::Duration;

use egg::{Extractor, Runner, StopReason};
use thiserror::Error;

pub use report::{BlockReport, RewriteReport, RunStats, Tallies, Tally, tally};

use crate::anno::Layout;
use crate::lower::{
    AdapterCost, Block, BlockKind, ExecProgram, Operand, State, VerifyError, verify,
};
use convert::{Interface, Price, block_seconds, to_block, to_expr};

/// Bounds on one e-graph run (one block under one stream state).
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    pub node_limit: usize,
    pub iter_limit: usize,
    pub time_limit: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            node_limit: 10_000,
            iter_limit: 30,
            time_limit: Duration::from_secs(5),
        }
    }
}

/// Why a program could not be rewritten.
#[derive(Debug, Error)]
pub enum RewriteError {
    #[error("the program to rewrite is inconsistent: {0}")]
    Input(VerifyError),
    #[error("{block:?} block: {msg}")]
    Block { block: BlockKind, msg: String },
    #[error("{block:?} block: the rules equated values of different states: {}", .conflicts.join("; "))]
    Conflict {
        block: BlockKind,
        conflicts: Vec<String>,
    },
    #[error("parameter {0} is read in two states after the rewrite ({1} and {2})")]
    Param(String, State, State),
    #[error("the rewritten program does not verify: {0}")]
    Verify(VerifyError),
}

/// Rewrites every block of `program` and returns the cheapest verified
/// program found (the input itself when nothing is cheaper), with a report.
/// With `seq_stream`, a replicated stream is also tried split on the
/// sequence dim (see the module docs).
pub fn rewrite(
    program: &ExecProgram,
    cost: &AdapterCost<'_>,
    limits: &Limits,
    seq_stream: bool,
) -> Result<(ExecProgram, RewriteReport), RewriteError> {
    verify(program).map_err(RewriteError::Input)?;
    let tp = u64::from(program.tp.max(1));
    let stream_full = full_shape(&program.stream_shape, program.stream_state, tp);
    let seq_dim = (1..stream_full.len().saturating_sub(1))
        .find(|&d| stream_full[d] == program.seq_len && program.seq_len % tp == 0);
    let layers: u64 = program
        .stages
        .iter()
        .flat_map(|s| &s.chunks)
        .map(|&(a, b)| u64::from(b.saturating_sub(a)))
        .sum::<u64>()
        .max(1);
    let instances = |kind: BlockKind| if kind == BlockKind::Layer { layers } else { 1 };
    let weighted = |blocks: [&Block; 3]| -> f64 {
        blocks
            .iter()
            .map(|b| block_seconds(b, tp, cost) * instances(b.kind) as f64)
            .sum()
    };

    let mut interfaces = vec![None];
    if seq_stream
        && tp > 1
        && program.stream_state == State::REPLICATED
        && let Some(dim) = seq_dim
    {
        interfaces.push(Some(Interface { dim }));
    }
    let before = weighted(program.blocks());
    let mut runs = Vec::new();
    let mut best: Option<(f64, Vec<Block>, Option<Interface>)> = None;
    for iface in interfaces {
        let mut blocks = Vec::new();
        for block in program.blocks() {
            let (b, stats) =
                rewrite_block(block, tp, iface, seq_dim, program.seq_len, cost, limits)?;
            runs.push(stats);
            blocks.push(b);
        }
        let seconds = weighted([&blocks[0], &blocks[1], &blocks[2]]);
        tracing::debug!(stream = ?iface, seconds, "rewritten program priced");
        if best.as_ref().is_none_or(|(s, _, _)| seconds < *s) {
            best = Some((seconds, blocks, iface));
        }
    }

    let mut out = program.clone();
    let mut applied = false;
    if let Some((seconds, blocks, iface)) = best
        && seconds < before * (1.0 - 1e-9)
    {
        let [embed, layer, head]: [Block; 3] =
            blocks.try_into().map_err(|_| RewriteError::Block {
                block: BlockKind::Layer,
                msg: "a block went missing".into(),
            })?;
        out.embed = embed;
        out.layer = layer;
        out.head = head;
        if let Some(iface) = iface {
            out.stream_state = iface.state();
            out.stream_shape = local_shape(&stream_full, out.stream_state, tp);
            out.sequence_parallel = true;
        }
        update_params(&mut out)?;
        verify(&out).map_err(RewriteError::Verify)?;
        applied = true;
    }
    let blocks = program
        .blocks()
        .into_iter()
        .zip(out.blocks())
        .map(|(b, a)| BlockReport {
            kind: b.kind,
            instances: instances(b.kind),
            before: tally(b, tp),
            after: tally(a, tp),
            seconds_before: block_seconds(b, tp, cost),
            seconds_after: block_seconds(a, tp, cost),
        })
        .collect();
    let report = RewriteReport {
        tp: program.tp,
        stream_before: program.stream_state,
        stream_after: out.stream_state,
        applied,
        blocks,
        runs,
    };
    Ok((out, report))
}

fn full_shape(local: &[u64], state: State, tp: u64) -> Vec<u64> {
    let mut s = local.to_vec();
    if let Layout::D(d) = state.fwd
        && let Some(len) = s.get_mut(d)
    {
        *len *= tp;
    }
    s
}

fn local_shape(full: &[u64], state: State, tp: u64) -> Vec<u64> {
    let mut s = full.to_vec();
    if let Layout::D(d) = state.fwd
        && let Some(len) = s.get_mut(d)
    {
        *len /= tp;
    }
    s
}

fn stop_reason(r: Option<&StopReason>) -> String {
    match r {
        Some(StopReason::Saturated) => "saturated".into(),
        Some(StopReason::IterationLimit(n)) => format!("iteration limit ({n})"),
        Some(StopReason::NodeLimit(n)) => format!("node limit ({n})"),
        Some(StopReason::TimeLimit(s)) => format!("time limit ({s:.1} s)"),
        Some(StopReason::Other(s)) => s.clone(),
        None => "not run".into(),
    }
}

fn rewrite_block(
    block: &Block,
    tp: u64,
    iface: Option<Interface>,
    seq_dim: Option<usize>,
    seq_len: u64,
    cost: &AdapterCost<'_>,
    limits: &Limits,
) -> Result<(Block, RunStats), RewriteError> {
    let err = |msg: String| RewriteError::Block {
        block: block.kind,
        msg,
    };
    let (expr, layouts) = to_expr(block, tp, iface).map_err(err)?;
    let max_rank = layouts
        .inputs
        .iter()
        .map(|i| i.full.len())
        .chain(layouts.templates.iter().map(|t| t.output.full.len()))
        .max()
        .unwrap_or(0);
    let rules = lang::rules(max_rank, seq_dim, seq_len);
    let runner = Runner::<lang::Node, lang::Layouts, ()>::new(layouts)
        .with_node_limit(limits.node_limit)
        .with_iter_limit(limits.iter_limit)
        .with_time_limit(limits.time_limit)
        .with_expr(&expr)
        .run(&rules);
    let stream = iface.map_or_else(
        || {
            block
                .inputs
                .iter()
                .position(|i| *i == crate::lower::BlockInput::Stream)
                .and_then(|i| block.values.get(i))
                .map_or(State::REPLICATED, |d| d.state)
        },
        Interface::state,
    );
    let stats = RunStats {
        block: block.kind,
        stream,
        stop_reason: stop_reason(runner.stop_reason.as_ref()),
        iterations: runner.iterations.len(),
        enodes: runner.egraph.total_size(),
        eclasses: runner.egraph.number_of_classes(),
    };
    tracing::info!(
        block = ?block.kind,
        stream = %stats.stream,
        stop = %stats.stop_reason,
        iterations = stats.iterations,
        enodes = stats.enodes,
        "e-graph run stopped"
    );
    if !runner.egraph.analysis.conflicts.is_empty() {
        return Err(RewriteError::Conflict {
            block: block.kind,
            conflicts: runner.egraph.analysis.conflicts.clone(),
        });
    }
    let root = *runner
        .roots
        .first()
        .ok_or_else(|| err("the e-graph has no root".into()))?;
    let extractor = Extractor::new(
        &runner.egraph,
        Price {
            egraph: &runner.egraph,
            cost,
        },
    );
    let (_, best) = extractor.find_best(root);
    let rewritten = to_block(block, &best, &runner.egraph.analysis).map_err(err)?;
    Ok((rewritten, stats))
}

/// Parameters read replicated by ops that now run on shards get partial
/// gradients (and the reverse); every reader must agree.
fn update_params(program: &mut ExecProgram) -> Result<(), RewriteError> {
    let mut reads: BTreeMap<String, State> = BTreeMap::new();
    for block in program.blocks() {
        for op in block.ops() {
            for (operand, state) in op.inputs.iter().zip(&op.input_states) {
                if let Operand::Param(name) = operand
                    && let Some(old) = reads.insert(name.clone(), *state)
                    && old != *state
                {
                    return Err(RewriteError::Param(name.clone(), old, *state));
                }
            }
        }
    }
    for p in &mut program.params {
        if p.tp_dim.is_none()
            && let Some(s) = reads.get(&p.pattern)
        {
            p.tp_grad_partial = s.grad == Layout::V;
        }
    }
    Ok(())
}
