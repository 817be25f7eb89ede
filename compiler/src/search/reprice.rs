//! Prices a candidate as its program runs: after `lower` and `rewrite`, the
//! program's ops may read and write other layouts than the search chose
//! (the rewrite moves collectives, and with them norms and residual adds
//! onto sequence shards), which changes the activations the runtime keeps
//! and the communication it does. [`reprice`] reads each op's split and
//! layouts back off the program, picks the segment choice that matches it
//! and evaluates the candidate's configuration with those assignments, so
//! that the plan's prediction describes the program that runs.

use std::collections::BTreeMap;

use super::model::{self, Evaluation};
use super::segment_cost::SegmentCost;
use super::sharding::Segment;
use super::{Candidate, SearchError, SearchInput, Solved, build_segment, no_kv_graph, segments};
use crate::anno::Layout;
use crate::ir::{Graph, OpId};
use crate::lower::{Block, ExecProgram};
use crate::plan::layer_pattern;

/// Why a program was not priced as it runs.
#[derive(Debug, PartialEq, Eq)]
pub enum Unpriced {
    /// An op the graph has and the block lacks, or one whose split and
    /// layouts no choice of its segment offers: the caller keeps the
    /// search's own pricing.
    Unmatched(String),
    /// Priced as it runs, a stage holds more than the device's memory.
    OverMemory,
}

/// The evaluation of `candidate`'s configuration, its stages (layers and
/// recompute mode each) as the candidate placed them, with every segment
/// assigned as `program` (lowered from the candidate, perhaps rewritten)
/// runs it and its stream in the program's state.
pub fn reprice(
    input: &SearchInput<'_>,
    candidate: &Candidate,
    program: &ExecProgram,
) -> Result<Result<Evaluation, Unpriced>, SearchError> {
    let config = &candidate.config;
    let tp = config.tp;
    let graph = input.graph_for(tp).ok_or_else(|| no_kv_graph(input, tp))?;
    let (pre, layer, post) = segments(graph);
    let boundary = program.stream_state.fwd;
    let mb = config.micro_batch;
    let mut priced = Vec::with_capacity(3);
    for (ops, block) in [
        (&pre, &program.embed),
        (&layer, &program.layer),
        (&post, &program.head),
    ] {
        let seg = build_segment(input, graph, ops, tp, boundary, mb)?;
        let assignment = match assignment_of(graph, &seg, block) {
            Ok(a) => a,
            Err(why) => return Ok(Err(Unpriced::Unmatched(why))),
        };
        priced.push(SegmentCost::new(
            graph,
            &seg,
            input.cluster,
            &assignment,
            mb as f64,
            tp,
        ));
    }
    let [pre, layer, post]: [SegmentCost; 3] = priced
        .try_into()
        .map_err(|_| SearchError::Constraint("internal: three segments expected".into()))?;
    let solved = Solved { pre, layer, post };
    let stages = &candidate.eval.stages;
    let layers: Vec<u32> = stages.iter().map(|s| s.end_layer - s.first_layer).collect();
    let modes: Vec<_> = stages.iter().map(|s| s.recompute).collect();
    Ok(
        model::evaluate_fixed(input.cluster, config, &solved, &layers, &modes)
            .ok_or(Unpriced::OverMemory),
    )
}

/// Per op of `seg`, the index of the choice `block` runs it with: the same
/// split identifier, and the forward layouts of its inputs and outputs.
fn assignment_of(graph: &Graph, seg: &Segment, block: &Block) -> Result<Vec<usize>, String> {
    let by_name: BTreeMap<&str, _> = block.ops().map(|o| (o.traced.as_str(), o)).collect();
    let name_of = |id: OpId| {
        let op = graph.op(id);
        layer_pattern(&op.name, op.layer)
    };
    seg.ops
        .iter()
        .map(|sop| {
            let name = name_of(sop.op);
            let lop = by_name
                .get(name.as_str())
                .ok_or_else(|| format!("{name}: not in the {:?} block", block.kind))?;
            let inputs: Vec<Layout> = lop.input_states.iter().map(|s| s.fwd).collect();
            let outputs: Option<Vec<Layout>> = lop
                .outputs
                .iter()
                .map(|&v| block.value(v).map(|d| d.state.fwd))
                .collect();
            let outputs =
                outputs.ok_or_else(|| format!("{name}: an output is not declared"))?;
            sop.choices
                .iter()
                .position(|c| c.split == lop.split && c.inputs == inputs && c.outputs == outputs)
                .ok_or_else(|| {
                    format!(
                        "{name}: split {:?} reading {inputs:?} into {outputs:?} is none of its choices",
                        lop.split
                    )
                })
        })
        .collect()
}
