//! `plan.ron` through the public API: a hand-built Megatron-style plan for
//! llama-mini round-trips byte-identically, validates, and renders its
//! report; each kind of broken plan or file gives its own message.

use std::fs;
use std::path::Path;

use autopart::anno::builtin_registry;
use autopart::ir::{DType, Graph};
use autopart::plan::{
    FORMAT_VERSION, MemoryBreakdown, MeshSpec, ModelRef, OpSplit, Plan, PlanError, Prediction,
    Recompute, Schedule, StagePlan, StagePrediction, TraceSpec, ZeroStage, layer_pattern,
    parse_plan, plan_to_ron, read_plan, render_alternatives, render_report, render_summary,
    validate_plan, write_plan,
};
use autopart::trace::{TraceOptions, preset, trace_model};
use expect_test::{expect, expect_file};

const GIB: u64 = 1 << 30;

fn trace(model: &str, micro_batch: u64, seq_len: u64) -> Graph {
    let config = preset(model).expect("preset exists");
    let options = TraceOptions {
        batch: micro_batch,
        seq_len: Some(seq_len),
        dtype: DType::Bf16,
        kv_copies: 1,
    };
    trace_model(&config, &options, &builtin_registry()).expect("traces")
}

fn llama_mini() -> Graph {
    trace("llama-mini", 1, 128)
}

fn split(op: &str, kind: &str, split: Option<&str>, inputs: &[&str], outputs: &[&str]) -> OpSplit {
    let strings = |ls: &[&str]| ls.iter().map(ToString::to_string).collect();
    OpSplit {
        op: op.to_string(),
        kind: kind.to_string(),
        split: split.map(ToString::to_string),
        inputs: strings(inputs),
        outputs: strings(outputs),
    }
}

/// Megatron's tensor parallelism written out by hand: column-parallel
/// q/k/v/gate/up (split `n`), row-parallel o/down (split `k`, partial sums),
/// attention split by kv-head group, heads and rope by head; norms,
/// residual adds, embedding, head and loss replicated.
fn megatron_sharding() -> Vec<OpSplit> {
    let rr = ["R", "R"];
    let column = (Some("n"), ["R", "D(0)"], ["D(2)"]);
    let row = (Some("k"), ["D(2)", "D(1)"], ["V"]);
    let heads = (Some("h"), ["D(2)"], ["D(2)"]);
    let mut entries = vec![split("embed_tokens", "embedding", None, &rr, &["R"])];
    let layer = |name: &str| format!("layers.*.{name}");
    entries.push(split(
        &layer("input_layernorm"),
        "rms_norm",
        None,
        &rr,
        &["R"],
    ));
    for proj in ["q_proj", "k_proj", "v_proj"] {
        let (id, ins, outs) = column;
        entries.push(split(
            &layer(&format!("self_attn.{proj}")),
            "linear",
            id,
            &ins,
            &outs,
        ));
    }
    for name in ["q_heads", "k_heads", "v_heads"] {
        let (id, ins, outs) = heads;
        entries.push(split(
            &layer(&format!("self_attn.{name}")),
            "split_heads",
            id,
            &ins,
            &outs,
        ));
    }
    for name in ["rope_q", "rope_k"] {
        let (id, ins, outs) = heads;
        entries.push(split(
            &layer(&format!("self_attn.{name}")),
            "rope",
            id,
            &ins,
            &outs,
        ));
    }
    entries.push(split(
        &layer("self_attn.attn"),
        "attention",
        Some("g"),
        &["D(2)", "D(2)", "D(2)"],
        &["D(2)"],
    ));
    let (id, ins, outs) = heads;
    entries.push(split(
        &layer("self_attn.merge_heads"),
        "merge_heads",
        id,
        &ins,
        &outs,
    ));
    let (id, ins, outs) = row;
    entries.push(split(&layer("self_attn.o_proj"), "linear", id, &ins, &outs));
    entries.push(split(&layer("attn_residual"), "add", None, &rr, &["R"]));
    entries.push(split(
        &layer("post_attention_layernorm"),
        "rms_norm",
        None,
        &rr,
        &["R"],
    ));
    for proj in ["gate_proj", "up_proj"] {
        let (id, ins, outs) = column;
        entries.push(split(
            &layer(&format!("mlp.{proj}")),
            "linear",
            id,
            &ins,
            &outs,
        ));
    }
    entries.push(split(
        &layer("mlp.act"),
        "swiglu",
        Some("f"),
        &["D(2)", "D(2)"],
        &["D(2)"],
    ));
    let (id, ins, outs) = row;
    entries.push(split(&layer("mlp.down_proj"), "linear", id, &ins, &outs));
    entries.push(split(&layer("mlp_residual"), "add", None, &rr, &["R"]));
    entries.push(split("norm", "rms_norm", None, &rr, &["R"]));
    entries.push(split("lm_head", "linear", None, &rr, &["R"]));
    entries.push(split(
        "loss.cross_entropy",
        "cross_entropy",
        None,
        &rr,
        &["R"],
    ));
    entries.push(split("loss.mean", "mean", None, &["R"], &["R"]));
    entries
}

fn stage_prediction(micro_batch_ms: f64, tp_comm_ms: f64, gib: [f64; 5]) -> StagePrediction {
    let bytes = |g: f64| (g * GIB as f64) as u64;
    StagePrediction {
        micro_batch_s: micro_batch_ms / 1e3,
        tp_comm_s: tp_comm_ms / 1e3,
        memory: MemoryBreakdown {
            params_bytes: bytes(gib[0]),
            grads_bytes: bytes(gib[1]),
            optimizer_bytes: bytes(gib[2]),
            activations_bytes: bytes(gib[3]),
            transient_bytes: bytes(gib[4]),
            allocator_bytes: 0,
        },
    }
}

/// llama-mini on 4 H100s (tp2 · pp2 · dp1), replicated twice at run time.
/// The predictions are made up but consistent in scale with the plan.
fn llama_mini_plan(graph: &Graph) -> Plan {
    let stages = vec![
        stage_prediction(12.5, 1.25, [10.5, 10.5, 21.0, 18.25, 1.5]),
        stage_prediction(13.75, 1.25, [11.0, 11.0, 22.0, 9.5, 3.0]),
    ];
    let peak = stages
        .iter()
        .map(|s| s.memory.total_bytes())
        .max()
        .unwrap_or(0);
    Plan {
        format_version: FORMAT_VERSION,
        model: ModelRef {
            spec: "llama-mini".to_string(),
            name: "llama-mini".to_string(),
            family: "llama".to_string(),
            params: graph.n_params(),
            annotation_files: Vec::new(),
            loss_op: None,
        },
        trace: TraceSpec {
            seq_len: 128,
            dtype: autopart::plan::DType::Bf16,
            kv_copies: 1,
        },
        cluster: "h100".to_string(),
        plan_gpus: 4,
        runtime_gpus: 8,
        global_batch: 16,
        mesh: MeshSpec {
            tp: 2,
            pp: 2,
            dp: 1,
            order: vec!["tp".to_string(), "dp".to_string(), "pp".to_string()],
        },
        micro_batch: 1,
        n_micro_batches: 8,
        schedule: Schedule::OneFOneB,
        zero: ZeroStage::One,
        reduce_dtype: autopart::plan::DType::Fp32,
        sequence_parallel: false,
        stages: vec![
            StagePlan {
                index: 0,
                first_layer: 0,
                end_layer: 2,
                embedding: true,
                head: false,
                recompute: Recompute::Selective,
            },
            StagePlan {
                index: 1,
                first_layer: 2,
                end_layer: 4,
                embedding: false,
                head: true,
                recompute: Recompute::None,
            },
        ],
        sharding: megatron_sharding(),
        prediction: Prediction {
            step_s: 0.1375,
            tokens_per_s: 14894.5,
            mfu: 0.4123,
            bubble_fraction: 1.0 / 9.0,
            dp_comm_s: 0.0042,
            stages,
            peak_mem_bytes: peak,
            capacity_bytes: 76 * GIB,
        },
    }
}

fn problems(plan: &Plan, graph: &Graph, world_size: Option<u32>) -> Vec<String> {
    match validate_plan(plan, graph, world_size) {
        Ok(()) => Vec::new(),
        Err(PlanError::Invalid { problems }) => problems,
        Err(other) => panic!("expected PlanError::Invalid, got {other}"),
    }
}

/// Asserts that validation reports exactly `expected`, in order.
fn assert_problems(plan: &Plan, graph: &Graph, world_size: Option<u32>, expected: &[&str]) {
    assert_eq!(problems(plan, graph, world_size), expected);
}

#[test]
fn the_hand_built_plan_validates() {
    let graph = llama_mini();
    let plan = llama_mini_plan(&graph);
    validate_plan(&plan, &graph, Some(8)).expect("valid");
    validate_plan(&plan, &graph, None).expect("valid without a world size");
}

#[test]
fn write_then_read_round_trips() {
    let graph = llama_mini();
    let plan = llama_mini_plan(&graph);
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("plan.ron");
    write_plan(&plan, &path).expect("writes");
    assert_eq!(read_plan(&path).expect("reads"), plan);
}

#[test]
fn writing_twice_is_byte_identical() {
    let graph = llama_mini();
    let plan = llama_mini_plan(&graph);
    let dir = tempfile::tempdir().expect("temp dir");
    let (a, b) = (dir.path().join("a.ron"), dir.path().join("b.ron"));
    write_plan(&plan, &a).expect("writes a");
    write_plan(&plan, &b).expect("writes b");
    let first = fs::read(&a).expect("reads a");
    assert_eq!(first, fs::read(&b).expect("reads b"));
    // Over an existing file too, and the same text as plan_to_ron.
    write_plan(&plan, &a).expect("rewrites a");
    assert_eq!(first, fs::read(&a).expect("reads a again"));
    assert_eq!(first, plan_to_ron(&plan).expect("serializes").into_bytes());
    // Only the two plans are left: no temporary files.
    let mut names: Vec<_> = fs::read_dir(dir.path())
        .expect("lists")
        .map(|e| e.expect("entry").file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["a.ron", "b.ron"]);
}

#[test]
fn plan_ron_snapshot() {
    let graph = llama_mini();
    let text = plan_to_ron(&llama_mini_plan(&graph)).expect("serializes");
    // UPDATE_EXPECT=1 cargo test -p autopart --test plan  re-blesses the snapshots.
    expect_file!["snapshots/llama-mini.plan.ron"].assert_eq(&text);
}

#[test]
fn report_snapshot() {
    let graph = llama_mini();
    let plan = llama_mini_plan(&graph);
    let report = render_report(&plan);
    assert_eq!(report, render_report(&plan), "deterministic");
    expect_file!["snapshots/llama-mini.report.md"].assert_eq(&report);
}

#[test]
fn summary_snapshot() {
    let graph = llama_mini();
    expect_file!["snapshots/llama-mini.summary.txt"]
        .assert_eq(&render_summary(&llama_mini_plan(&graph)));
}

#[test]
fn alternatives_are_one_line_each() {
    let graph = llama_mini();
    let best = llama_mini_plan(&graph);
    let mut second = best.clone();
    (second.mesh.tp, second.mesh.pp, second.mesh.dp) = (1, 2, 2);
    second.n_micro_batches = 4;
    second.schedule = Schedule::GPipe;
    second.stages[0].recompute = Recompute::Full;
    second.stages[1].recompute = Recompute::Full;
    second.prediction.step_s = 1.25;
    second.prediction.tokens_per_s = 1638.4;
    second.prediction.mfu = 0.3;
    expect![[r#"
        #  tp  pp  dp  micro-batches  schedule  recompute       ZeRO  SP       step  tokens/s    MFU  peak GiB
        1   2   2   1  8 × 1          1f1b      selective/none     1  off  137.5 ms    14,895  41.2%     61.75
        2   1   2   2  4 × 1          gpipe     full               1  off   1.250 s     1,638  30.0%     61.75
    "#]].assert_eq(&render_alternatives(&[best, second]));
}

#[test]
fn memory_over_capacity_is_flagged() {
    let graph = llama_mini();
    let mut plan = llama_mini_plan(&graph);
    plan.prediction.stages[1].memory.activations_bytes = 80 * GIB;
    let report = render_report(&plan);
    let bar = report
        .lines()
        .find(|l| l.starts_with("stage 1 |"))
        .expect("has a bar");
    assert_eq!(
        bar,
        "stage 1 |████████████████████| 127.00 / 76.00 GiB  over capacity"
    );
}

#[test]
fn interleaved_report_draws_chunks_and_caps_micro_batches() {
    let graph = llama_mini();
    let mut plan = llama_mini_plan(&graph);
    plan.schedule = Schedule::Interleaved { chunks: 2 };
    plan.n_micro_batches = 16;
    plan.global_batch = 32;
    validate_plan(&plan, &graph, Some(8)).expect("valid");
    let report = render_report(&plan);
    let timeline = &report[report.find("## Pipeline timeline").expect("has a timeline")..];
    expect![[r#"
        ## Pipeline timeline

        Schedule interleaved-2, 2 stages, the first 8 of 16 micro-batches drawn. One column per forward (`F3`: micro-batch 3) or backward (`B3`) pass, `.` an idle slot; every pass is drawn one slot long, though a backward takes about twice a forward. The letter names the model chunk (`a` the first).

        ```text
        stage 0 | F0a F1a F0b F1b F2a B0b F3a B1b F2b B0a F3b B1a F4a B2b F5a B3b F4b B2a F5b B3a F6a B4b F7a B5b F6b B4a F7b B5a .   B6b .   B7b B6a B7a
        stage 1 | .   F0a F1a F0b B0b F1b B1b F2a B0a F3a B1a F2b B2b F3b B3b F4a B2a F5a B3a F4b B4b F5b B5b F6a B4a F7a B5a F6b B6b F7b B7b B6a B7a .
        ```
    "#]]
    .assert_eq(timeline);
}

#[test]
fn gpt_mini_replicated_plan_validates() {
    // Every op of GPT's `h.N.` layers under its `h.*.` pattern, replicated.
    let graph = trace("gpt-mini", 1, 64);
    let mut plan = llama_mini_plan(&graph);
    plan.model.name = "gpt-mini".to_string();
    plan.trace.seq_len = 64;
    (plan.plan_gpus, plan.runtime_gpus, plan.global_batch) = (2, 2, 8);
    (plan.mesh.tp, plan.mesh.pp, plan.mesh.dp) = (1, 2, 1);
    plan.stages[0].end_layer = 1;
    plan.stages[1].first_layer = 1;
    plan.stages[1].end_layer = 2;
    plan.sharding.clear();
    for (_, op) in graph.ops() {
        let pattern = layer_pattern(&op.name, op.layer);
        if plan.sharding.iter().all(|e| e.op != pattern) {
            let r = |n: usize| vec!["R".to_string(); n];
            plan.sharding.push(OpSplit {
                op: pattern,
                kind: op.kind.name().to_string(),
                split: None,
                inputs: r(op.annotation.inputs.len()),
                outputs: r(op.annotation.outputs.len()),
            });
        }
    }
    assert!(plan.sharding.iter().any(|e| e.op == "h.*.attn.q_proj"));
    validate_plan(&plan, &graph, Some(2)).expect("valid");
}

#[test]
fn mesh_and_gpu_counts_must_agree() {
    let graph = llama_mini();
    let mut plan = llama_mini_plan(&graph);
    plan.mesh.tp = 4;
    plan.runtime_gpus = 6;
    plan.mesh.order = vec!["tp".to_string(), "tp".to_string(), "pp".to_string()];
    assert_problems(
        &plan,
        &graph,
        Some(6),
        &[
            "mesh tp=4 × pp=2 × dp=1 = 8 does not equal plan_gpus 4",
            "runtime_gpus 6 is not a positive multiple of plan_gpus 4",
            "mesh.order [tp, tp, pp] must name tp, pp and dp once each",
            "layers.*.self_attn.k_heads: split 'h' of size 2 is not divisible by tp=4",
            "layers.*.self_attn.v_heads: split 'h' of size 2 is not divisible by tp=4",
            "layers.*.self_attn.rope_k: split 'h' of size 2 is not divisible by tp=4",
            "layers.*.self_attn.attn: split 'g' of size 2 is not divisible by tp=4",
        ],
    );
}

#[test]
fn world_size_must_match_runtime_gpus() {
    let graph = llama_mini();
    let plan = llama_mini_plan(&graph);
    assert_problems(
        &plan,
        &graph,
        Some(6),
        &["world size 6 does not match the plan's 8 runtime GPUs"],
    );
}

#[test]
fn batch_arithmetic_is_checked() {
    let graph = llama_mini();
    let mut plan = llama_mini_plan(&graph);
    plan.global_batch = 20;
    assert_problems(
        &plan,
        &graph,
        None,
        &[
            "global_batch 20 does not equal micro_batch 1 × n_micro_batches 8 × dp 1 × replicas 2 = 16",
        ],
    );
    plan.micro_batch = 0;
    plan.global_batch = 0;
    assert_problems(&plan, &graph, None, &["micro_batch must be at least 1"]);
}

#[test]
fn stages_must_tile_the_layers() {
    let graph = llama_mini();
    let mut plan = llama_mini_plan(&graph);
    // A gap between the stages, the last one short, embedding and head swapped.
    plan.stages[0].end_layer = 1;
    plan.stages[1].end_layer = 3;
    plan.stages[0].embedding = false;
    plan.stages[0].head = true;
    plan.stages[1].embedding = true;
    plan.stages[1].head = false;
    assert_problems(
        &plan,
        &graph,
        None,
        &[
            "stage 0 must hold the embedding",
            "stage 0 holds the head, which belongs on the last stage only",
            "layers 1..2 are on no stage",
            "stage 1 holds the embedding, which belongs on stage 0 only",
            "stage 1, the last, must hold the head (final norm, lm head, loss)",
            "layers 3..4 are on no stage",
        ],
    );

    let mut plan = llama_mini_plan(&graph);
    // Overlapping, misnumbered, one stage empty and one past the end.
    plan.stages[0].end_layer = 3;
    plan.stages[1].index = 5;
    plan.stages[1].end_layer = 6;
    assert_problems(
        &plan,
        &graph,
        None,
        &[
            "stage at position 1 has index 5; stages must be numbered 0, 1, … in order",
            "stage 5 starts at layer 2 but layers up to 3 are already on earlier stages; each layer belongs to exactly one stage",
            "stages reach layer 6, but the graph has 4 layers",
        ],
    );

    let mut plan = llama_mini_plan(&graph);
    plan.stages[1].first_layer = 4;
    plan.stages.push(plan.stages[1].clone());
    assert_problems(
        &plan,
        &graph,
        None,
        &[
            "3 stages listed but pp=2",
            "stage 1 has no layers (first_layer 4, end_layer 4); every stage needs at least one",
            "stage 1 holds the head, which belongs on the last stage only",
            "stage at position 2 has index 1; stages must be numbered 0, 1, … in order",
            "stage 1 has no layers (first_layer 4, end_layer 4); every stage needs at least one",
            "layers 2..4 are on no stage",
            "prediction lists 2 stages but the plan has 3",
        ],
    );
}

#[test]
fn interleaved_schedule_needs_chunks_that_fit() {
    let graph = llama_mini();
    let mut plan = llama_mini_plan(&graph);
    plan.schedule = Schedule::Interleaved { chunks: 3 };
    plan.n_micro_batches = 7;
    plan.global_batch = 14;
    assert_problems(
        &plan,
        &graph,
        None,
        &[
            "schedule interleaved-3 needs n_micro_batches 7 to be a multiple of pp=2",
            "stage 0 has 2 layers, not divisible into the 3 chunks of schedule interleaved-3",
            "stage 1 has 2 layers, not divisible into the 3 chunks of schedule interleaved-3",
        ],
    );
    plan.schedule = Schedule::Interleaved { chunks: 1 };
    plan.n_micro_batches = 8;
    plan.global_batch = 16;
    assert_problems(
        &plan,
        &graph,
        None,
        &["schedule interleaved-1 needs at least 2 chunks"],
    );
}

#[test]
fn zero_sequence_parallel_and_model_are_checked() {
    let graph = llama_mini();
    let mut plan = llama_mini_plan(&graph);
    plan.model.params += 1;
    plan.trace.seq_len = 256;
    plan.prediction.step_s = 0.0;
    assert_problems(
        &plan,
        &graph,
        None,
        &[
            &format!(
                "model.params {} does not match the graph's {} parameters (is the plan for another model?)",
                graph.n_params() + 1,
                graph.n_params()
            ),
            "trace.seq_len 256 does not match the graph's sequence length 128",
            "prediction.step_s 0 is not a positive time",
        ],
    );

    // Sequence parallelism shards along the tp group, so it needs one.
    let mut plan = llama_mini_plan(&graph);
    plan.mesh.tp = 1;
    plan.mesh.dp = 2;
    plan.global_batch = 32;
    plan.sequence_parallel = true;
    for entry in &mut plan.sharding {
        entry.split = None;
        entry.inputs.iter_mut().for_each(|l| *l = "R".to_string());
        entry.outputs.iter_mut().for_each(|l| *l = "R".to_string());
    }
    assert_problems(
        &plan,
        &graph,
        None,
        &["sequence_parallel needs tp > 1 (tp=1)"],
    );
}

#[test]
fn sharding_must_cover_every_op_once_with_legal_splits() {
    let graph = llama_mini();
    let mut plan = llama_mini_plan(&graph);
    let find = |plan: &Plan, op: &str| {
        plan.sharding
            .iter()
            .position(|e| e.op == op)
            .unwrap_or_else(|| panic!("{op} is in the plan"))
    };
    // Written with the layer index instead of `*`.
    let i = find(&plan, "layers.*.mlp.act");
    plan.sharding[i].op = "layers.0.mlp.act".to_string();
    // A name the graph does not have, and a duplicate.
    plan.sharding.push(split(
        "layers.*.mlp.gate",
        "linear",
        None,
        &["R", "R"],
        &["R"],
    ));
    let dup = plan.sharding[find(&plan, "norm")].clone();
    plan.sharding.push(dup);
    // A frozen dim, an unknown identifier, a wrong kind, wrong layouts.
    let i = find(&plan, "layers.*.input_layernorm");
    plan.sharding[i].split = Some("d".to_string());
    let i = find(&plan, "lm_head");
    plan.sharding[i].split = Some("x".to_string());
    let i = find(&plan, "loss.mean");
    plan.sharding[i].kind = "sum".to_string();
    let i = find(&plan, "layers.*.self_attn.o_proj");
    plan.sharding[i].outputs = vec!["R".to_string()];
    let i = find(&plan, "layers.*.mlp.up_proj");
    plan.sharding[i].split = None;
    assert_problems(
        &plan,
        &graph,
        None,
        &[
            "layers.*.input_layernorm: cannot split 'd': 'd' is frozen (^) and may not be split",
            "layers.*.self_attn.o_proj: outputs are [R], but split 'k' over tp=2 gives [V]",
            "layers.*.mlp.up_proj: inputs are [R, D(0)], but no split gives [R, R]; outputs are [D(2)], but no split gives [R]",
            "sharding: 'layers.0.mlp.act' names no op of the graph (layer ops are written with '*' for the layer index: 'layers.*.mlp.act')",
            "lm_head: cannot split 'x': unknown identifier 'x'; expected one of the annotation's: b, l, k+, n",
            "loss.mean: kind 'sum' does not match the graph's 'mean'",
            "sharding: 'layers.*.mlp.gate' names no op of the graph",
            "sharding: 'norm' is listed more than once",
            "sharding: no entry for 'layers.*.mlp.act' (swiglu)",
        ],
    );
}

#[test]
fn invalid_plan_error_lists_every_problem() {
    let graph = llama_mini();
    let mut plan = llama_mini_plan(&graph);
    plan.n_micro_batches = 0;
    let err = validate_plan(&plan, &graph, Some(8)).expect_err("invalid");
    expect![[r#"
        invalid plan:
          - n_micro_batches must be at least 1
          - global_batch 16 does not equal micro_batch 1 × n_micro_batches 0 × dp 1 × replicas 2 = 0"#]]
    .assert_eq(&err.to_string());
}

/// Writes `text` as `plan.ron` in a new directory and reads it back.
fn read_text(text: &str) -> (String, PlanError) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("plan.ron");
    fs::write(&path, text).expect("writes");
    let err = read_plan(&path).expect_err("does not read");
    let message = err.to_string();
    let prefix = format!("{}:", path.display());
    let rest = message
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("'{message}' starts with the path"));
    (rest.to_string(), err)
}

#[test]
fn broken_files_name_path_line_and_column() {
    let graph = llama_mini();
    let text = plan_to_ron(&llama_mini_plan(&graph)).expect("serializes");

    // Truncated mid-file: the error is at the end of what is there.
    let cut = text[..text.find("sharding").expect("has sharding")].trim_end();
    let (line, col) = (cut.lines().count(), cut.lines().last().map_or(0, str::len));
    let (message, err) = read_text(cut);
    assert!(matches!(err, PlanError::Parse { .. }));
    assert_eq!(message, format!("{line}:{col}: unexpected end of RON"));

    // A garbled value.
    let garbled = text.replacen("tp: 2", "tp: two", 1);
    let line = 1 + garbled
        .lines()
        .position(|l| l.contains("tp: two"))
        .expect("has tp");
    let (message, _) = read_text(&garbled);
    assert_eq!(message, format!("{line}:12: expected integer"));

    // An unknown field.
    let extra = text.replacen("    zero: 1,", "    zero: 1,\n    colour: \"blue\",", 1);
    let line = 1 + extra
        .lines()
        .position(|l| l.contains("colour"))
        .expect("has colour");
    let (message, _) = read_text(&extra);
    assert!(message.starts_with(&format!("{line}:")), "{message}");
    assert!(
        message.contains("unexpected field named `colour`"),
        "{message}"
    );

    // A hand-edited recompute mode may be written without ron's `r#`.
    let plain = text.replace("r#None", "None");
    assert_eq!(
        parse_plan(&plain, Path::new("plain.ron")).expect("reads"),
        llama_mini_plan(&graph)
    );

    // A ZeRO stage or dtype outside the vocabulary, where it is written.
    for (from, to, what) in [
        (
            "    zero: 1,",
            "    zero: 4,",
            "zero stage 4 does not exist (expected 0, 1, 2 or 3)",
        ),
        (
            "        dtype: \"bf16\",",
            "        dtype: \"int4\",",
            "unknown dtype 'int4' (expected bf16, fp16 or fp32)",
        ),
    ] {
        let bad = text.replacen(from, to, 1);
        let line = 1 + bad.lines().position(|l| l == to).expect("replaced");
        let (message, _) = read_text(&bad);
        assert!(message.starts_with(&format!("{line}:")), "{message}");
        assert!(message.contains(what), "{message}");
    }

    // A missing field.
    let (message, _) = read_text(&text.replacen("    zero: 1,\n", "", 1));
    assert!(
        message.ends_with(": unexpected missing field named `zero` in `Plan`"),
        "{message}"
    );
}

#[test]
fn another_format_version_is_named_as_such() {
    let graph = llama_mini();
    let text = plan_to_ron(&llama_mini_plan(&graph)).expect("serializes");
    // A future version with a field this one does not know.
    let future = text.replacen(
        "format_version: 1,",
        "format_version: 2,\n    topology: None,",
        1,
    );
    let (message, err) = read_text(&future);
    assert!(matches!(
        err,
        PlanError::Version {
            found: 2,
            expected: 1,
            ..
        }
    ));
    assert_eq!(
        message,
        " format_version 2 is not supported (this autopart reads version 1); re-run `autopart compile` to write the plan again"
    );
}

#[test]
fn unreadable_file_is_a_read_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("missing.ron");
    let err = read_plan(&path).expect_err("missing");
    assert!(matches!(err, PlanError::Read { .. }));
    assert!(
        err.to_string()
            .starts_with(&format!("cannot read {}: ", path.display()))
    );
}

#[test]
fn a_failed_write_leaves_what_was_there() {
    let graph = llama_mini();
    let plan = llama_mini_plan(&graph);
    let dir = tempfile::tempdir().expect("temp dir");

    // The target is a directory holding a file: the rename fails.
    let target = dir.path().join("plan.ron");
    fs::create_dir(&target).expect("mkdir");
    fs::write(target.join("keep.txt"), "kept\n").expect("writes");
    let err = write_plan(&plan, &target).expect_err("cannot replace a directory");
    assert!(matches!(err, PlanError::Write { .. }));
    assert!(
        err.to_string()
            .starts_with(&format!("cannot write {}: ", target.display()))
    );
    assert_eq!(
        fs::read_to_string(target.join("keep.txt")).expect("kept"),
        "kept\n"
    );

    // The directory does not exist: an existing plan elsewhere is untouched.
    let good = dir.path().join("good.ron");
    write_plan(&plan, &good).expect("writes");
    let before = fs::read(&good).expect("reads");
    let err = write_plan(&plan, &dir.path().join("absent").join("plan.ron"))
        .expect_err("no such directory");
    assert!(matches!(err, PlanError::Write { .. }));
    assert_eq!(fs::read(&good).expect("reads"), before);

    // Nothing but what we made is left behind.
    let mut names: Vec<_> = fs::read_dir(dir.path())
        .expect("lists")
        .map(|e| e.expect("entry").file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["good.ron", "plan.ron"]);
}

#[test]
fn parse_plan_names_its_origin() {
    let err = parse_plan("(format_version: 1,", Path::new("inline.ron")).expect_err("truncated");
    assert!(err.to_string().starts_with("inline.ron:1:"), "{err}");
}
