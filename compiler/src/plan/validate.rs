//! Reading, writing and validating `plan.ron`.
//!
//! This module owns the file format — pretty RON without struct names,
//! written atomically so an existing plan is never left half-written, read
//! back with `path:line:col` errors and a checked format version — and the
//! structural checks that a plan fits a traced graph and a world size (mesh,
//! batch arithmetic, stages, schedule, per-op splits and their layouts).
//! Validation reports every problem at once. It does not judge whether a plan
//! is fast or fits in memory: that is the cost model's prediction, which the
//! plan only carries.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use super::{FORMAT_VERSION, OpSplit, Plan, Schedule};
use crate::anno::{Layout, PartitionError, partition};
use crate::ir::{Graph, Op, Role, TensorId};

/// Why a plan could not be written, read or accepted.
#[derive(Debug, Error)]
pub enum PlanError {
    #[error("cannot serialize the plan: {0}")]
    Serialize(#[from] ron::Error),
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}:{line}:{col}: {message}", path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        col: usize,
        message: String,
    },
    #[error(
        "{}: format_version {found} is not supported (this autopart reads version {expected}); re-run `autopart compile` to write the plan again",
        path.display()
    )]
    Version {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("invalid plan:{}", problems.iter().map(|p| format!("\n  - {p}")).collect::<String>())]
    Invalid { problems: Vec<String> },
}

/// The plan as pretty RON: no struct names, four-space indent, `\n` line
/// ends, a final newline. The same plan always gives the same text.
pub fn plan_to_ron(plan: &Plan) -> Result<String, PlanError> {
    let config = ron::ser::PrettyConfig::new()
        .struct_names(false)
        .indentor("    ")
        .new_line("\n")
        .separator(" ");
    let mut text = ron::ser::to_string_pretty(plan, config)?;
    text.push('\n');
    Ok(text)
}

/// Writes `plan` to `path` atomically: the text goes to a temporary file in
/// the same directory, which is flushed to disk and then renamed over
/// `path`. A failure at any point leaves an existing file at `path` as it
/// was.
pub fn write_plan(plan: &Plan, path: &Path) -> Result<(), PlanError> {
    let text = plan_to_ron(plan)?;
    autopart_vocab::fs::write_atomic(path, text.as_bytes()).map_err(|source| PlanError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Reads a `plan.ron`. Syntax errors, unknown or missing fields give
/// `path:line:col: what was expected`; a plan of another format version is
/// refused as such, before its fields are checked.
pub fn read_plan(path: &Path) -> Result<Plan, PlanError> {
    let text = fs::read_to_string(path).map_err(|source| PlanError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_plan(&text, path)
}

/// Parses plan text; `origin` names it in errors (the file it came from).
pub fn parse_plan(text: &str, origin: &Path) -> Result<Plan, PlanError> {
    /// Reads only the version, ignoring every other field, so that a plan
    /// from another version is named as such rather than as a field error.
    #[derive(Deserialize)]
    #[serde(rename = "Plan")]
    struct VersionProbe {
        format_version: u32,
    }
    if let Ok(probe) = ron::from_str::<VersionProbe>(text) {
        if probe.format_version != FORMAT_VERSION {
            return Err(PlanError::Version {
                path: origin.to_owned(),
                found: probe.format_version,
                expected: FORMAT_VERSION,
            });
        }
    }
    ron::from_str::<Plan>(text).map_err(|err| PlanError::Parse {
        path: origin.to_owned(),
        line: err.span.start.line,
        col: err.span.start.col,
        message: lowercase_first(&err.code.to_string()),
    })
}

/// The name under which an op appears in a plan's `sharding`: a
/// transformer-layer op has the path segment equal to its layer index
/// replaced by `*` (`layers.3.mlp.up_proj` → `layers.*.mlp.up_proj`,
/// `h.3.attn.q_proj` → `h.*.attn.q_proj`); other ops keep their name.
pub fn layer_pattern(op_name: &str, layer: Option<u32>) -> String {
    let Some(layer) = layer else {
        return op_name.to_string();
    };
    let index = layer.to_string();
    let mut replaced = false;
    op_name
        .split('.')
        .map(|segment| {
            if !replaced && segment == index {
                replaced = true;
                "*"
            } else {
                segment
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// Checks that `plan` is a complete, consistent plan for `graph` (the model
/// traced at one micro-batch and the plan's sequence length) and, when
/// given, for a run on `world_size` processes. Every problem found is
/// reported, in the order of the plan's fields.
pub fn validate_plan(plan: &Plan, graph: &Graph, world_size: Option<u32>) -> Result<(), PlanError> {
    let mut problems = Vec::new();
    check_model(plan, graph, &mut problems);
    check_mesh(plan, world_size, &mut problems);
    check_batch_and_schedule(plan, &mut problems);
    check_stages(plan, graph.n_layers(), &mut problems);
    check_sharding(plan, graph, &mut problems);
    check_prediction(plan, &mut problems);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(PlanError::Invalid { problems })
    }
}

fn check_model(plan: &Plan, graph: &Graph, problems: &mut Vec<String>) {
    if plan.format_version != FORMAT_VERSION {
        problems.push(format!(
            "format_version {} is not supported (expected {FORMAT_VERSION})",
            plan.format_version
        ));
    }
    let n_params = graph.n_params();
    if plan.model.params != n_params {
        problems.push(format!(
            "model.params {} does not match the graph's {n_params} parameters (is the plan for another model?)",
            plan.model.params
        ));
    }
    // The token input is [batch, seq]: its length is the traced sequence length.
    let traced_seq = graph
        .tensors()
        .find(|(_, t)| t.role == Role::Input && t.shape.len() == 2)
        .map(|(_, t)| t.shape[1]);
    if let Some(seq) = traced_seq.filter(|&seq| seq != plan.trace.seq_len) {
        problems.push(format!(
            "trace.seq_len {} does not match the graph's sequence length {seq}",
            plan.trace.seq_len
        ));
    }
}

fn check_mesh(plan: &Plan, world_size: Option<u32>, problems: &mut Vec<String>) {
    let mesh = &plan.mesh;
    for (axis, size) in [("tp", mesh.tp), ("pp", mesh.pp), ("dp", mesh.dp)] {
        if size == 0 {
            problems.push(format!("mesh.{axis} must be at least 1"));
        }
    }
    let product = u64::from(mesh.tp) * u64::from(mesh.pp) * u64::from(mesh.dp);
    if product != u64::from(plan.plan_gpus) {
        problems.push(format!(
            "mesh tp={} × pp={} × dp={} = {product} does not equal plan_gpus {}",
            mesh.tp, mesh.pp, mesh.dp, plan.plan_gpus
        ));
    }
    if !runtime_is_multiple(plan) {
        problems.push(format!(
            "runtime_gpus {} is not a positive multiple of plan_gpus {}",
            plan.runtime_gpus, plan.plan_gpus
        ));
    }
    if let Some(world) = world_size.filter(|&w| w != plan.runtime_gpus) {
        problems.push(format!(
            "world size {world} does not match the plan's {} runtime GPUs",
            plan.runtime_gpus
        ));
    }
    let mut order: Vec<&str> = mesh.order.iter().map(String::as_str).collect();
    order.sort_unstable();
    if order != ["dp", "pp", "tp"] {
        problems.push(format!(
            "mesh.order [{}] must name tp, pp and dp once each",
            mesh.order.join(", ")
        ));
    }
    if plan.sequence_parallel && mesh.tp <= 1 {
        problems.push(format!("sequence_parallel needs tp > 1 (tp={})", mesh.tp));
    }
}

fn runtime_is_multiple(plan: &Plan) -> bool {
    plan.plan_gpus > 0 && plan.runtime_gpus > 0 && plan.runtime_gpus % plan.plan_gpus == 0
}

fn check_batch_and_schedule(plan: &Plan, problems: &mut Vec<String>) {
    if plan.micro_batch == 0 {
        problems.push("micro_batch must be at least 1".to_string());
    }
    if plan.n_micro_batches == 0 {
        problems.push("n_micro_batches must be at least 1".to_string());
    }
    if runtime_is_multiple(plan) {
        let replicas = plan.runtime_gpus / plan.plan_gpus;
        let product = u128::from(plan.micro_batch)
            * u128::from(plan.n_micro_batches)
            * u128::from(plan.mesh.dp)
            * u128::from(replicas);
        if u128::from(plan.global_batch) != product {
            problems.push(format!(
                "global_batch {} does not equal micro_batch {} × n_micro_batches {} × dp {} × replicas {replicas} = {product}",
                plan.global_batch, plan.micro_batch, plan.n_micro_batches, plan.mesh.dp
            ));
        }
    }
    if let Schedule::Interleaved { chunks } = plan.schedule {
        let pp = plan.mesh.pp;
        if chunks < 2 {
            problems.push(format!(
                "schedule interleaved-{chunks} needs at least 2 chunks"
            ));
        }
        if pp < 2 {
            problems.push(format!(
                "schedule interleaved-{chunks} needs pp > 1 (pp={pp})"
            ));
        } else if plan.n_micro_batches % u64::from(pp) != 0 {
            problems.push(format!(
                "schedule interleaved-{chunks} needs n_micro_batches {} to be a multiple of pp={pp}",
                plan.n_micro_batches
            ));
        }
    }
}

fn check_stages(plan: &Plan, n_layers: u32, problems: &mut Vec<String>) {
    let stages = &plan.stages;
    if stages.len() != plan.mesh.pp as usize {
        problems.push(format!(
            "{} stages listed but pp={}",
            stages.len(),
            plan.mesh.pp
        ));
    }
    let last = stages.len().saturating_sub(1);
    // One past the last layer placed so far; stages must continue from it.
    let mut next = 0u32;
    for (pos, stage) in stages.iter().enumerate() {
        let idx = stage.index;
        if idx as usize != pos {
            problems.push(format!(
                "stage at position {pos} has index {idx}; stages must be numbered 0, 1, … in order"
            ));
        }
        if stage.end_layer <= stage.first_layer {
            problems.push(format!(
                "stage {idx} has no layers (first_layer {}, end_layer {}); every stage needs at least one",
                stage.first_layer, stage.end_layer
            ));
        } else {
            if stage.first_layer > next {
                problems.push(format!(
                    "layers {next}..{} are on no stage",
                    stage.first_layer
                ));
            } else if stage.first_layer < next {
                problems.push(format!(
                    "stage {idx} starts at layer {} but layers up to {next} are already on earlier stages; each layer belongs to exactly one stage",
                    stage.first_layer
                ));
            }
            next = next.max(stage.end_layer);
            if let Schedule::Interleaved { chunks } = plan.schedule {
                if chunks >= 2 && stage.n_layers() % chunks != 0 {
                    problems.push(format!(
                        "stage {idx} has {} layers, not divisible into the {chunks} chunks of schedule interleaved-{chunks}",
                        stage.n_layers()
                    ));
                }
            }
        }
        match (pos == 0, stage.embedding) {
            (true, false) => problems.push("stage 0 must hold the embedding".to_string()),
            (false, true) => problems.push(format!(
                "stage {idx} holds the embedding, which belongs on stage 0 only"
            )),
            _ => {}
        }
        match (pos == last, stage.head) {
            (true, false) => problems.push(format!(
                "stage {idx}, the last, must hold the head (final norm, lm head, loss)"
            )),
            (false, true) => problems.push(format!(
                "stage {idx} holds the head, which belongs on the last stage only"
            )),
            _ => {}
        }
    }
    if stages.is_empty() {
        return;
    }
    if next < n_layers {
        problems.push(format!("layers {next}..{n_layers} are on no stage"));
    } else if next > n_layers {
        problems.push(format!(
            "stages reach layer {next}, but the graph has {n_layers} layers"
        ));
    }
}

fn check_sharding(plan: &Plan, graph: &Graph, problems: &mut Vec<String>) {
    // Graph ops grouped by their sharding name, in trace order.
    let mut groups: Vec<(String, Vec<&Op>)> = Vec::new();
    let mut group_of: BTreeMap<String, usize> = BTreeMap::new();
    for (_, op) in graph.ops() {
        let pattern = layer_pattern(&op.name, op.layer);
        match group_of.get(&pattern) {
            Some(&i) => groups[i].1.push(op),
            None => {
                group_of.insert(pattern.clone(), groups.len());
                groups.push((pattern, vec![op]));
            }
        }
    }

    let tp = u64::from(plan.mesh.tp);
    let mut covered = vec![false; groups.len()];
    for entry in &plan.sharding {
        let name = &entry.op;
        let Some(&i) = group_of.get(name) else {
            let hint = match graph.ops().find(|(_, op)| &op.name == name) {
                Some((_, op)) => format!(
                    " (layer ops are written with '*' for the layer index: '{}')",
                    layer_pattern(&op.name, op.layer)
                ),
                None => String::new(),
            };
            problems.push(format!("sharding: '{name}' names no op of the graph{hint}"));
            continue;
        };
        if covered[i] {
            problems.push(format!("sharding: '{name}' is listed more than once"));
            continue;
        }
        covered[i] = true;
        let ops = &groups[i].1;
        let kind = ops[0].kind.name();
        if entry.kind != kind {
            problems.push(format!(
                "{name}: kind '{}' does not match the graph's '{kind}'",
                entry.kind
            ));
        }
        if tp == 0 {
            // Reported with the mesh; no split can be judged against it.
            continue;
        }
        let mut found: Vec<String> = Vec::new();
        for op in ops {
            let problem = match split_layouts(graph, op, entry.split.as_deref(), tp) {
                Err(reason) => Some(format!("{name}: {reason}")),
                Ok((inputs, outputs)) => layout_mismatch(entry, &inputs, &outputs, tp),
            };
            // Isomorphic layers give the same problem; say it once.
            if let Some(problem) = problem.filter(|p| !found.contains(p)) {
                found.push(problem);
            }
        }
        problems.extend(found);
    }
    for ((pattern, ops), covered) in groups.iter().zip(&covered) {
        if !covered {
            problems.push(format!(
                "sharding: no entry for '{pattern}' ({})",
                ops[0].kind
            ));
        }
    }
}

/// The layouts (as written in a plan) of `op`'s inputs and outputs when
/// `split` is split `tp` ways, or why it may not be.
fn split_layouts(
    graph: &Graph,
    op: &Op,
    split: Option<&str>,
    tp: u64,
) -> Result<(Vec<String>, Vec<String>), String> {
    let annotation = &op.annotation;
    let Some(id) = split else {
        let replicated = |n: usize| vec![Layout::R.to_string(); n];
        return Ok((
            replicated(annotation.inputs.len()),
            replicated(annotation.outputs.len()),
        ));
    };
    let shape = |t: &TensorId| graph.get_tensor(*t).map(|t| t.shape.as_slice());
    let inputs: Vec<Option<&[u64]>> = op.inputs.iter().map(shape).collect();
    let outputs: Vec<Option<&[u64]>> = op.outputs.iter().map(shape).collect();
    let binding = annotation
        .bind(&inputs, &outputs, &op.int_attrs())
        .map_err(|e| format!("shapes do not fit the op's annotation [{annotation}]: {e}"))?;
    let rule = partition(annotation, &binding, id, tp).map_err(|e| match e {
        PartitionError::Indivisible { id, size, parts } => {
            format!("split '{id}' of size {size} is not divisible by tp={parts}")
        }
        other => format!("cannot split '{id}': {other}"),
    })?;
    let strings = |ls: &[Layout]| ls.iter().map(ToString::to_string).collect();
    Ok((strings(&rule.inputs), strings(&rule.outputs)))
}

fn layout_mismatch(
    entry: &OpSplit,
    inputs: &[String],
    outputs: &[String],
    tp: u64,
) -> Option<String> {
    let split = match &entry.split {
        Some(id) => format!("split '{id}' over tp={tp}"),
        None => "no split".to_string(),
    };
    let mut found = Vec::new();
    for (what, given, expected) in [
        ("inputs", &entry.inputs, inputs),
        ("outputs", &entry.outputs, outputs),
    ] {
        if given.as_slice() != expected {
            found.push(format!(
                "{what} are [{}], but {split} gives [{}]",
                given.join(", "),
                expected.join(", ")
            ));
        }
    }
    (!found.is_empty()).then(|| format!("{}: {}", entry.op, found.join("; ")))
}

fn check_prediction(plan: &Plan, problems: &mut Vec<String>) {
    let prediction = &plan.prediction;
    if prediction.stages.len() != plan.stages.len() {
        problems.push(format!(
            "prediction lists {} stages but the plan has {}",
            prediction.stages.len(),
            plan.stages.len()
        ));
    }
    if !(prediction.step_s.is_finite() && prediction.step_s > 0.0) {
        problems.push(format!(
            "prediction.step_s {} is not a positive time",
            prediction.step_s
        ));
    }
    let mut figures = vec![
        (
            "prediction.tokens_per_s".to_string(),
            prediction.tokens_per_s,
        ),
        ("prediction.mfu".to_string(), prediction.mfu),
        (
            "prediction.bubble_fraction".to_string(),
            prediction.bubble_fraction,
        ),
        ("prediction.dp_comm_s".to_string(), prediction.dp_comm_s),
    ];
    for (i, stage) in prediction.stages.iter().enumerate() {
        figures.push((
            format!("prediction.stages[{i}].micro_batch_s"),
            stage.micro_batch_s,
        ));
        figures.push((format!("prediction.stages[{i}].tp_comm_s"), stage.tp_comm_s));
    }
    for (field, value) in figures {
        if !(value.is_finite() && value >= 0.0) {
            problems.push(format!(
                "{field} {value} is not a finite, non-negative number"
            ));
        }
    }
}

/// ron's messages start with a capital; ours are lowercase fragments.
fn lowercase_first(message: &str) -> String {
    let mut chars = message.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_pattern_replaces_the_layer_segment_only() {
        assert_eq!(
            layer_pattern("layers.3.mlp.up_proj", Some(3)),
            "layers.*.mlp.up_proj"
        );
        assert_eq!(layer_pattern("h.3.attn.q_proj", Some(3)), "h.*.attn.q_proj");
        // Only the segment equal to the index, and only the first one.
        assert_eq!(layer_pattern("layers.13.mlp.3", Some(13)), "layers.*.mlp.3");
        assert_eq!(layer_pattern("layers.1.x.1", Some(1)), "layers.*.x.1");
        assert_eq!(layer_pattern("lm_head", None), "lm_head");
    }
}
