//! End to end: `autopart compile` of llama-mini under a fixed plan (lowering,
//! code generation, cargo build of the plan binary), then `mpirun -np N
//! autopart run OUT` for 5 steps. Each plan's per-step losses and gradient
//! norms must equal those of the single-process plan (compiled and run the
//! same way) within 1e-5 relative.
//!
//! Every run trains from seed 7 on synthetic tokens with the plan binary's
//! default optimizer (AdamW, warm-up and cosine, clipping at 1.0), 8
//! sequences of 16 tokens per step.

use std::path::Path;

use autopart_tests::{
    StepMetrics, autopart, compile, compile_model, launch, read_safetensors, train,
};

const STEPS: u32 = 5;
const RTOL: f64 = 1e-5;

fn reference(dir: &Path, model: &str, run_args: &[&str]) -> Vec<StepMetrics> {
    let out = dir.join("single");
    compile_model(&out, model, &["--plan-ngpus", "1"]).expect("compile the single-device plan");
    train(1, &out, STEPS, run_args).expect("train the single-device plan")
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= RTOL * b.abs().max(1e-12)
}

/// Compiles the plan `args` into a temp folder, trains it on `np`
/// processes and compares with the single-device run.
fn same_as_single_device(np: usize, args: &[&str]) {
    same_as_single_device_with(np, args, &[]);
}

/// As [`same_as_single_device`], both runs with `run_args`.
fn same_as_single_device_with(np: usize, args: &[&str], run_args: &[&str]) {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("plan");
    compile(&out, args).expect("compile the plan");
    compare_with_single_device(np, &out, "llama-mini", args, run_args);
}

/// Trains the plan compiled in `out` (from `args`) and compares it with the
/// single-device plan, compiled next to it.
fn compare_with_single_device(
    np: usize,
    out: &Path,
    model: &str,
    args: &[&str],
    run_args: &[&str],
) {
    let dir = out.parent().expect("the plan folder has a parent");
    let got = train(np, out, STEPS, run_args).expect("train the plan");
    let want = reference(dir, model, run_args);
    assert_same_steps(args, &got, &want);
}

/// Per-step losses and gradient norms within [`RTOL`] of the reference's.
fn assert_same_steps(args: &[&str], got: &[StepMetrics], want: &[StepMetrics]) {
    assert_eq!(got.len(), want.len(), "{args:?}: steps");
    let mut worst = 0.0f64;
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.step, w.step);
        assert!(
            close(g.loss, w.loss),
            "{args:?}: step {} loss {} vs single-device {}",
            g.step,
            g.loss,
            w.loss
        );
        assert!(
            close(g.grad_norm, w.grad_norm),
            "{args:?}: step {} grad norm {} vs single-device {}",
            g.step,
            g.grad_norm,
            w.grad_norm
        );
        assert!(g.step_s > 0.0 && g.tokens_per_s > 0.0, "{g:?}");
        worst = worst
            .max((g.loss - w.loss).abs() / w.loss.abs())
            .max((g.grad_norm - w.grad_norm).abs() / w.grad_norm.abs());
    }
    eprintln!("{args:?}: worst relative difference {worst:.2e}");
    // Training moves the loss: the comparison is not between constants.
    assert!(
        want.first().map(|m| m.loss) != want.last().map(|m| m.loss),
        "{want:?}"
    );
}

/// tp4 on llama-mini's 2 kv heads: each kv head is copied twice, one copy
/// per tp rank (NxD's `kv_size_multiplier`), the copies' gradients summed.
/// Losses and gradient norms as the single-device run's, and the final
/// weights too, read back from each run's checkpoint merged by `autopart
/// ckpt merge` (the copies are stored once, as the model's tensors).
#[test]
fn tp4_on_2_kv_heads() {
    let args = autopart_tests::plans::TP4_KV_COPIES;
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("plan");
    compile(&out, args).expect("compile the plan");
    let plan = std::fs::read_to_string(out.join("plan.ron")).expect("plan.ron");
    assert!(plan.contains("kv_copies: 2"), "{plan}");
    let program = std::fs::read_to_string(out.join("program.txt")).expect("program.txt");
    assert!(
        program.contains("self_attn.k_proj.weight (x2)"),
        "{program}"
    );
    same_steps_and_weights(4, &out, "llama-mini", args);
}

/// Trains the plan compiled in `out` (from `args`) and the single-device
/// plan of `model`, each saving a checkpoint after the last step: the same
/// losses and gradient norms ([`assert_same_steps`]) and the same final
/// weights, read back from each checkpoint merged by `autopart ckpt merge`
/// (copied kv heads and tied weights are stored once, as the model's
/// tensors).
fn same_steps_and_weights(np: usize, out: &Path, model: &str, args: &[&str]) {
    let dir = out.parent().expect("the plan folder has a parent");
    let ck = |name: &str| dir.join(name).display().to_string();
    let (ck_plan, ck_single) = (ck("ck-plan"), ck("ck-single"));
    let every = STEPS.to_string();
    let with_ck = |d: &str| -> Vec<String> {
        ["--checkpoint-dir", d, "--checkpoint-every", &every]
            .map(String::from)
            .to_vec()
    };
    let (a_plan, a_single) = (with_ck(&ck_plan), with_ck(&ck_single));
    let a_plan: Vec<&str> = a_plan.iter().map(String::as_str).collect();
    let a_single: Vec<&str> = a_single.iter().map(String::as_str).collect();
    let got = train(np, out, STEPS, &a_plan).expect("train the plan");
    let want = reference(dir, model, &a_single);
    assert_same_steps(args, &got, &want);
    let merged = |ck: &str| {
        let file = Path::new(ck).with_extension("safetensors");
        let step = format!("{ck}/step_{STEPS}");
        let file_s = file.display().to_string();
        let o = autopart(&["ckpt", "merge", &step, "--out", &file_s]).expect("run ckpt merge");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        read_safetensors(&file).expect("read the merged checkpoint")
    };
    let (w_plan, w_single) = (merged(&ck_plan), merged(&ck_single));
    assert_eq!(
        w_plan.keys().collect::<Vec<_>>(),
        w_single.keys().collect::<Vec<_>>(),
        "{args:?}: the same tensors"
    );
    // AdamW scales each element's update by its own gradient history, so
    // float-order differences in near-zero gradients move weights by a few
    // per cent of lr (3e-4) a step: measured up to 7e-6 after 5 steps for a
    // plain tp2 plan of llama-mini. 1e-5 absolute bounds it.
    let mut worst = 0.0f64;
    for (name, t) in &w_plan {
        let r = &w_single[name];
        assert_eq!(t.shape, r.shape, "{name}");
        for (a, b) in t.values.iter().zip(&r.values) {
            worst = worst.max((a - b).abs());
        }
    }
    eprintln!("{args:?}: worst weight difference {worst:.2e}");
    assert!(worst <= 1e-5, "{args:?}: final weights differ by {worst:e}");
}

/// gpt-mini's tied embedding across two pipeline stages: the first stage's
/// embedding and the last stage's head each hold a copy, their gradients
/// summed between the stages (Megatron's embedding group).
#[test]
fn gpt_mini_pp2_tied_embeddings() {
    let args = autopart_tests::plans::PP2_1F1B;
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("plan");
    compile_model(&out, "gpt-mini", args).expect("compile the plan");
    let stage1 = std::fs::read_to_string(out.join("gencode/src/stage_1.rs")).expect("stage_1.rs");
    assert!(stage1.contains("head_tied_params()"), "{stage1}");
    same_steps_and_weights(2, &out, "gpt-mini", args);
}

/// The same at tp2·pp2: the tied embedding vocab-parallel on both ends.
#[test]
fn gpt_mini_tp2_pp2_tied_embeddings() {
    let args = autopart_tests::plans::TP2_PP2_1F1B;
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("plan");
    compile_model(&out, "gpt-mini", args).expect("compile the plan");
    let plan = std::fs::read_to_string(out.join("plan.ron")).expect("plan.ron");
    for op in ["wte", "lm_head"] {
        let at = plan.find(&format!("op: \"{op}\"")).expect("the op's entry");
        let entry = &plan[at..plan[at..].find("inputs").map_or(plan.len(), |e| at + e)];
        assert!(
            entry.contains("split: Some(\"n\")"),
            "{op} vocab-parallel: {entry}"
        );
    }
    same_steps_and_weights(4, &out, "gpt-mini", args);
}

#[test]
fn dp2() {
    same_as_single_device(
        2,
        &["--plan-ngpus", "2", "--tp", "1", "--pp", "1", "--dp", "2"],
    );
}

#[test]
fn tp2() {
    same_as_single_device(
        2,
        &[
            "--plan-ngpus",
            "2",
            "--tp",
            "2",
            "--pp",
            "1",
            "--sp",
            "false",
        ],
    );
}

#[test]
fn tp2_without_rewrites() {
    // The lowering's own adapters (all-reduce around replicated norms).
    same_as_single_device(
        2,
        &[
            "--plan-ngpus",
            "2",
            "--tp",
            "2",
            "--pp",
            "1",
            "--sp",
            "false",
            "--no-rewrite",
        ],
    );
}

#[test]
fn tp2_sequence_parallel() {
    same_as_single_device(
        2,
        &[
            "--plan-ngpus",
            "2",
            "--tp",
            "2",
            "--pp",
            "1",
            "--sp",
            "true",
        ],
    );
}

#[test]
fn pp2_1f1b() {
    same_as_single_device(2, autopart_tests::plans::PP2_1F1B);
}

#[test]
fn pp2_interleaved() {
    same_as_single_device(2, autopart_tests::plans::PP2_INTERLEAVED);
}

#[test]
fn tp2_pp2() {
    same_as_single_device(
        4,
        &[
            "--plan-ngpus",
            "4",
            "--tp",
            "2",
            "--pp",
            "2",
            "--micro-batch",
            "2",
            "--sp",
            "false",
        ],
    );
}

#[test]
fn dp2_tp2_pp2() {
    same_as_single_device(
        8,
        &[
            "--plan-ngpus",
            "8",
            "--tp",
            "2",
            "--pp",
            "2",
            "--dp",
            "2",
            "--micro-batch",
            "1",
            "--sp",
            "false",
        ],
    );
}

#[test]
fn plan4_runtime8() {
    same_as_single_device(
        8,
        &[
            "--plan-ngpus",
            "4",
            "--runtime-ngpus",
            "8",
            "--tp",
            "2",
            "--pp",
            "2",
            "--sp",
            "false",
        ],
    );
}

#[test]
fn dp2_zero1() {
    same_as_single_device(
        2,
        &["--plan-ngpus", "2", "--tp", "1", "--dp", "2", "--zero", "1"],
    );
}

#[test]
fn dp2_zero3() {
    same_as_single_device(
        2,
        &["--plan-ngpus", "2", "--tp", "1", "--dp", "2", "--zero", "3"],
    );
}

/// ZeRO-2: each layer's gradients reduce-scattered over dp as backward
/// leaves the layer, the full gradients dropped.
#[test]
fn dp2_zero2() {
    let args = &["--plan-ngpus", "2", "--tp", "1", "--dp", "2", "--zero", "2"];
    same_steps_and_weights_of(2, args);
}

/// ZeRO-3's prefetch thread gathers each layer one layer ahead: the
/// gathers are used (the tape's hint names the layer that runs next), and
/// the run is bit for bit the one that gathers each layer when it runs.
#[test]
fn dp2_zero3_prefetch_is_used_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("plan");
    compile(
        &out,
        &["--plan-ngpus", "2", "--tp", "1", "--dp", "2", "--zero", "3"],
    )
    .expect("compile the plan");
    let ahead = autopart_tests::train_run(2, &out, STEPS, &[]).expect("train with prefetch");
    let metrics = out.join("metrics.jsonl");
    let with = autopart_tests::loss_text(&metrics).expect("metrics");
    let when = autopart_tests::train_run(2, &out, STEPS, &["--no-prefetch"]).expect("train");
    let without = autopart_tests::loss_text(&metrics).expect("metrics");
    assert_eq!(with, without);
    assert!(
        when.stdout
            .contains("gathered when it runs (--no-prefetch)"),
        "{}",
        when.stdout
    );
    let line = ahead
        .stdout
        .lines()
        .find(|l| l.starts_with("ZeRO-3 prefetch: "))
        .unwrap_or_else(|| panic!("no prefetch line in:\n{}", ahead.stdout));
    let words: Vec<&str> = line.split_whitespace().collect();
    let (used, total): (u64, u64) = (
        words[2].parse().expect("used"),
        words[4].parse().expect("total"),
    );
    assert!(used > 0 && used == total, "{line}");
}

/// Per-layer ZeRO-3 with full recompute: each layer's weights gathered for
/// its forward and again for its recompute, freed after each.
#[test]
fn dp2_zero3_full_recompute() {
    let args = &[
        "--plan-ngpus",
        "2",
        "--tp",
        "1",
        "--dp",
        "2",
        "--zero",
        "3",
        "--recompute",
        "full",
    ];
    same_steps_and_weights_of(2, args);
}

/// Streamed gradients completed over tp inside the stream: sequence
/// parallel's norm weights (partial sums over tp) under ZeRO-3 at dp2.
#[test]
fn tp2_dp2_zero3_sequence_parallel() {
    let args = &[
        "--plan-ngpus",
        "4",
        "--tp",
        "2",
        "--pp",
        "1",
        "--dp",
        "2",
        "--sp",
        "true",
        "--zero",
        "3",
    ];
    same_steps_and_weights_of(4, args);
}

/// Full recompute of whole layers under tp2 with sequence parallelism: the
/// layer's collectives rerun in its recompute.
#[test]
fn tp2_full_recompute_sequence_parallel() {
    let args = &[
        "--plan-ngpus",
        "2",
        "--tp",
        "2",
        "--pp",
        "1",
        "--sp",
        "true",
        "--recompute",
        "full",
    ];
    same_steps_and_weights_of(2, args);
}

/// Compiles llama-mini under `args` and runs [`same_steps_and_weights`].
fn same_steps_and_weights_of(np: usize, args: &[&str]) {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("plan");
    compile(&out, args).expect("compile the plan");
    same_steps_and_weights(np, &out, "llama-mini", args);
}

#[test]
fn tp2_selective_recompute() {
    same_as_single_device(
        2,
        &[
            "--plan-ngpus",
            "2",
            "--tp",
            "2",
            "--pp",
            "1",
            "--sp",
            "false",
            "--recompute",
            "selective",
        ],
    );
}

#[test]
fn pp2_full_recompute() {
    same_as_single_device(
        2,
        &[
            "--plan-ngpus",
            "2",
            "--tp",
            "1",
            "--pp",
            "2",
            "--micro-batch",
            "2",
            "--schedule",
            "gpipe",
            "--recompute",
            "full",
        ],
    );
}

#[test]
fn free_search_on_a_cpu_cluster() {
    // Whatever the search picks for 4 CPU "GPUs" runs and matches.
    same_as_single_device(4, &["--plan-ngpus", "4"]);
}

#[test]
fn tp2_reading_a_token_file() {
    // A learnable stream (each token determines the next) in the u16 format.
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("tokens.bin");
    let mut bytes = Vec::new();
    let mut t: u16 = 1;
    for _ in 0..4096 {
        bytes.extend_from_slice(&t.to_le_bytes());
        t = (t * 5 + 3) % 256;
    }
    std::fs::write(&data, bytes).expect("write tokens");
    let data_s = data.display().to_string();
    same_as_single_device_with(
        2,
        &[
            "--plan-ngpus",
            "2",
            "--tp",
            "2",
            "--pp",
            "1",
            "--sp",
            "false",
        ],
        &["--data", &data_s, "--lr", "3e-3"],
    );
}

#[test]
fn tp2_with_a_custom_loss_op() {
    // chunked_ce (examples/chunked_ce) computes lm_head + cross-entropy in
    // chunks of 4 tokens: the losses equal the single-device built-in head's.
    let dir = tempfile::tempdir().expect("temp dir");
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/chunked_ce");
    let anno = dir.path().join("chunked_ce.ron");
    std::fs::write(
        &anno,
        format!(
            r#"[(
    name: "chunked_ce",
    annotations: ["b l d^, n^ d^, b l -> b l"],
    flops: Formula("2 * b * l * d * n + 4 * b * l * n"),
    attrs: [(name: "chunk", kind: Int, default: Some("4"))],
    implementation: Some((
        crate: "chunked_ce",
        path: "chunked_ce::chunked_linear_cross_entropy",
        crate_path: Some("{}"),
    )),
)]
"#,
            crate_dir.display()
        ),
    )
    .expect("write the annotation file");
    let anno_s = anno.display().to_string();
    let args = [
        "--plan-ngpus",
        "2",
        "--tp",
        "2",
        "--pp",
        "1",
        "--sp",
        "false",
        "--annotations",
        &anno_s,
        "--loss",
        "chunked_ce",
    ];
    let out = dir.path().join("plan");
    compile(&out, &args).expect("compile with the custom op");
    let blocks = std::fs::read_to_string(out.join("gencode/src/blocks.rs")).expect("blocks.rs");
    assert!(
        blocks.contains("chunked_ce::chunked_linear_cross_entropy(")
            && !blocks.contains("ops::cross_entropy("),
        "{blocks}"
    );
    let toml = std::fs::read_to_string(out.join("gencode/Cargo.toml")).expect("Cargo.toml");
    assert!(toml.contains("chunked_ce = { path = "), "{toml}");
    compare_with_single_device(2, &out, "llama-mini", &args, &[]);
}

#[test]
fn gpt_tp2_with_tied_embeddings() {
    // GPT: learned positions, LayerNorm with biases, GeLU, and the token
    // embedding tied to the head (both split along the vocab).
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("plan");
    let args = ["--plan-ngpus", "2", "--tp", "2", "--sp", "false"];
    compile_model(&out, "gpt-mini", &args).expect("compile gpt-mini");
    compare_with_single_device(2, &out, "gpt-mini", &args, &[]);
}

#[test]
fn gpt_dp2_tp2_sequence_parallel() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("plan");
    let args = [
        "--plan-ngpus",
        "4",
        "--tp",
        "2",
        "--dp",
        "2",
        "--sp",
        "true",
    ];
    compile_model(&out, "gpt-mini", &args).expect("compile gpt-mini");
    compare_with_single_device(4, &out, "gpt-mini", &args, &[]);
}

#[test]
fn a_wrong_world_size_is_refused_before_any_work() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("plan");
    compile(&out, &["--plan-ngpus", "2", "--tp", "2", "--sp", "false"]).expect("compile");
    let metrics = out.join("m.jsonl");
    let output = launch(
        3,
        &out,
        &["--steps", "2", "--metrics", &metrics.display().to_string()],
        std::time::Duration::from_secs(120),
    )
    .expect("mpirun runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("runs on 2 processes"), "{stderr}");
    assert!(stderr.contains("mpirun -np 2"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!metrics.exists(), "no step may run");

    // A later compile that did not build leaves a binary that no longer
    // matches plan.ron: run refuses it.
    compile(
        &out,
        &[
            "--plan-ngpus",
            "2",
            "--tp",
            "2",
            "--sp",
            "true",
            "--no-build",
        ],
    )
    .expect("compile without building");
    let output = launch(
        2,
        &out,
        &["--steps", "1"],
        std::time::Duration::from_secs(120),
    )
    .expect("mpirun runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("not built from the current"), "{stderr}");
}

#[test]
fn run_without_a_compiled_plan_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = launch(
        1,
        dir.path(),
        &["--steps", "1"],
        std::time::Duration::from_secs(60),
    )
    .expect("autopart runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("plan.ron"), "{stderr}");
}
