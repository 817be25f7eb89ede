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

use autopart_tests::{StepMetrics, compile, launch, train};

const STEPS: u32 = 5;
const RTOL: f64 = 1e-5;

fn reference(dir: &Path) -> Vec<StepMetrics> {
    let out = dir.join("single");
    compile(&out, &["--plan-ngpus", "1"]).expect("compile the single-device plan");
    train(1, &out, STEPS).expect("train the single-device plan")
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= RTOL * b.abs().max(1e-12)
}

/// Compiles the plan `args` into a temp folder, trains it on `np`
/// processes and compares with the single-device run.
fn same_as_single_device(np: usize, args: &[&str]) {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("plan");
    compile(&out, args).expect("compile the plan");
    let got = train(np, &out, STEPS).expect("train the plan");
    let want = reference(dir.path());
    for (g, w) in got.iter().zip(&want) {
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
    }
    // Training moves the loss: the comparison is not between constants.
    assert!(
        want.first().map(|m| m.loss) != want.last().map(|m| m.loss),
        "{want:?}"
    );
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
            "1f1b",
        ],
    );
}

#[test]
fn pp2_interleaved() {
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
            "interleaved-2",
        ],
    );
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
