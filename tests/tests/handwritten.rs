//! The generated llama-mini against the hand-written one: the same plan,
//! trained from the same seed on the same synthetic tokens, must give the
//! same per-step losses and gradient norms (1e-5 relative) and, after the
//! last step, the same parameters on every rank (`--save-params`, compared
//! tensor by tensor: |generated - hand-written| <= 1e-6 + 1e-5 |hand-written|).
//!
//! The generated side is `autopart compile` of llama-mini (as in `e2e.rs`)
//! run with `autopart run`. The hand-written side is the runtime's test
//! Llama (`runtime/tests/support/llama.rs`) behind `app::main`, as
//! `runtime/examples/plan_app.rs` runs it, built as a plan crate next to the
//! generated one: the generated `Cargo.toml` and `build.rs` (package renamed),
//! a `src/main.rs` holding the generated crate's `PlanMeta` verbatim and a
//! stage closure that builds `LlamaStage`, and `src/llama.rs` a copy of the
//! support file. It is built by `build_plan_crate` the way `autopart compile`
//! builds generated crates, so it reuses their dependency builds (libtorch's
//! bindings included) in the shared target folder.
//!
//! Both train 5 steps with the plan binary's default optimizer (AdamW,
//! cosine, clipping at 1.0) from seed 7. The plans pin what the hand-written
//! model is told (no recompute, no sequence parallelism); the rest — mesh,
//! micro-batching, schedule, ZeRO — comes from the shared `PlanMeta`.

use std::path::{Path, PathBuf};

use autopart_tests::{
    SavedTensor, TrainRun, build_plan_crate, compile, read_safetensors, train_binary, train_run,
};

const STEPS: u32 = 5;
const RTOL: f64 = 1e-5;
const WEIGHT_RTOL: f64 = 1e-5;
const WEIGHT_ATOL: f64 = 1e-6;

/// The hand-written model, copied into the hand-written plan crate.
const LLAMA_RS: &str = include_str!("../../runtime/tests/support/llama.rs");

/// The hand-written plan crate's `src/main.rs`; `{plan}` is the generated
/// crate's `PlanMeta` constant.
const MAIN_RS: &str = r#"//! llama-mini written by hand (the runtime's tests/support/llama.rs) as a
//! plan binary, with the PlanMeta of a generated crate. Written by
//! autopart-tests' tests/handwritten.rs.

#[allow(dead_code)]
mod llama;

use autopart_runtime::app::{self, BuiltStage, PlanMeta, Schedule, StageCtx, ZeroStage};
use llama::{LlamaConfig, LlamaStage, Recompute, SeqParallel, TrainPlan};
use std::process::ExitCode;

{plan}

/// This rank's stage of the plan, on the run's mesh.
fn build(ctx: StageCtx) -> BuiltStage {
    let plan = TrainPlan {
        mesh: ctx.mesh,
        seq_parallel: SeqParallel::Off,
        recompute: Recompute::None,
        schedule: PLAN.schedule,
        micro_batches: PLAN.micro_batches,
    };
    Ok(Box::new(LlamaStage::new(
        LlamaConfig::mini(),
        plan,
        ctx.coord,
        ctx.seed,
    )?))
}

fn main() -> ExitCode {
    app::main(&PLAN, build)
}
"#;

/// The `const PLAN: PlanMeta = PlanMeta { … };` item of a generated `main.rs`.
fn plan_meta_item(main_rs: &str) -> &str {
    let start = main_rs
        .find("const PLAN: PlanMeta = PlanMeta {")
        .expect("the generated main.rs defines PLAN");
    let len = main_rs[start..]
        .find("\n};")
        .expect("the PLAN item ends with `};`")
        + "\n};".len();
    &main_rs[start..start + len]
}

/// Writes and builds the hand-written plan crate for the generated crate in
/// `gencode` into `dir`; returns the binary.
fn build_handwritten(gencode: &Path, dir: &Path) -> PathBuf {
    let read = |f: &str| {
        std::fs::read_to_string(gencode.join(f))
            .unwrap_or_else(|e| panic!("reading {}/{f}: {e}", gencode.display()))
    };
    let cargo_toml = read("Cargo.toml");
    let generated = cargo_toml
        .lines()
        .find_map(|l| l.strip_prefix("name = \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("the generated Cargo.toml names its package");
    // Unique per generated crate, so that parallel tests never share a binary.
    let package = format!("handwritten-{generated}");
    let cargo_toml = cargo_toml.replacen(
        &format!("name = \"{generated}\""),
        &format!("name = \"{package}\""),
        1,
    );
    std::fs::create_dir_all(dir.join("src")).expect("hand-written crate folder");
    let main_rs = MAIN_RS.replace("{plan}", plan_meta_item(&read("src/main.rs")));
    for (file, text) in [
        ("Cargo.toml", cargo_toml.as_str()),
        ("build.rs", read("build.rs").as_str()),
        ("src/main.rs", main_rs.as_str()),
        ("src/llama.rs", LLAMA_RS),
    ] {
        std::fs::write(dir.join(file), text).expect("writing the hand-written crate");
    }
    build_plan_crate(dir, &package).expect("build the hand-written plan crate")
}

/// The console line that describes the run (mesh, schedule, ZeRO,
/// micro-batches, parameter count).
fn header(run: &TrainRun) -> &str {
    run.stdout
        .lines()
        .find(|l| l.contains(" parameters on rank 0"))
        .unwrap_or_else(|| panic!("no header line in:\n{}", run.stdout))
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= RTOL * b.abs().max(1e-12)
}

/// The worst (absolute difference, difference over tolerance) of two tensors.
fn tensor_diff(name: &str, got: &SavedTensor, want: &SavedTensor) -> (f64, f64) {
    assert_eq!(got.shape, want.shape, "{name}: shape");
    got.values
        .iter()
        .zip(&want.values)
        .fold((0.0f64, 0.0f64), |(abs, ratio), (&g, &w)| {
            let d = (g - w).abs();
            (
                abs.max(d),
                ratio.max(d / (WEIGHT_ATOL + WEIGHT_RTOL * w.abs())),
            )
        })
}

/// Compiles llama-mini under `args`, trains the generated and the
/// hand-written binary on `np` processes and compares them.
fn generated_equals_handwritten(np: usize, args: &[&str]) {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("plan");
    let mut args = args.to_vec();
    args.extend(["--recompute", "none"]);
    compile(&out, &args).expect("compile the plan");
    let hand_bin = build_handwritten(&out.join("gencode"), &dir.path().join("handwritten"));

    let gen_params = dir.path().join("generated-params");
    let hand_params = dir.path().join("handwritten-params");
    let save = |p: &Path| p.display().to_string();
    let (gen_save, hand_save) = (save(&gen_params), save(&hand_params));
    let generated = train_run(np, &out, STEPS, &["--save-params", &gen_save])
        .expect("train the generated plan");
    let hand = train_binary(
        np,
        &hand_bin,
        &[],
        &dir.path().join("handwritten-metrics.jsonl"),
        STEPS,
        &["--save-params", &hand_save],
    )
    .expect("train the hand-written plan");

    assert_eq!(
        header(&generated),
        header(&hand),
        "{args:?}: the runs differ"
    );
    let mut worst = 0.0f64;
    for (g, w) in generated.metrics.iter().zip(&hand.metrics) {
        assert_eq!(g.step, w.step);
        for (what, a, b) in [
            ("loss", g.loss, w.loss),
            ("grad norm", g.grad_norm, w.grad_norm),
        ] {
            assert!(
                close(a, b),
                "{args:?}: step {} {what} {a} vs hand-written {b}",
                g.step
            );
            worst = worst.max((a - b).abs() / b.abs());
        }
    }
    let losses: Vec<f64> = hand.metrics.iter().map(|m| m.loss).collect();
    assert!(losses.first() != losses.last(), "{losses:?}");

    let (mut worst_abs, mut worst_ratio, mut n_tensors, mut worst_name) =
        (0.0f64, 0.0f64, 0usize, String::new());
    for rank in 0..np {
        let file = |d: &Path| d.join(format!("rank-{rank}.safetensors"));
        let got = read_safetensors(&file(&gen_params)).expect("generated parameters");
        let want = read_safetensors(&file(&hand_params)).expect("hand-written parameters");
        let names = |m: &std::collections::BTreeMap<String, SavedTensor>| {
            m.keys().cloned().collect::<Vec<_>>()
        };
        assert_eq!(
            names(&got),
            names(&want),
            "{args:?}: rank {rank} holds different parameters"
        );
        assert!(!want.is_empty(), "rank {rank} saved no parameters");
        for (name, w) in &want {
            let (abs, ratio) = tensor_diff(name, &got[name], w);
            if ratio > worst_ratio {
                worst_name = format!("rank {rank} {name}");
            }
            worst_abs = worst_abs.max(abs);
            worst_ratio = worst_ratio.max(ratio);
            n_tensors += 1;
        }
    }
    eprintln!(
        "{args:?}: losses and grad norms within {worst:.2e} relative; {n_tensors} tensors, \
         worst |diff| {worst_abs:.2e}, worst diff / tolerance {worst_ratio:.3} ({worst_name})"
    );
    assert!(
        worst_ratio <= 1.0,
        "{args:?}: {worst_name} differs by {worst_abs:e} (tolerance {WEIGHT_ATOL:e} + \
         {WEIGHT_RTOL:e} relative)"
    );
}

#[test]
fn one_rank() {
    generated_equals_handwritten(1, &["--plan-ngpus", "1"]);
}

#[test]
fn dp2_zero3() {
    generated_equals_handwritten(
        2,
        &[
            "--plan-ngpus",
            "2",
            "--tp",
            "1",
            "--pp",
            "1",
            "--dp",
            "2",
            "--zero",
            "3",
        ],
    );
}

#[test]
fn tp2() {
    generated_equals_handwritten(
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
fn pp2_1f1b() {
    generated_equals_handwritten(
        2,
        &[
            "--plan-ngpus",
            "2",
            "--tp",
            "1",
            "--pp",
            "2",
            "--schedule",
            "1f1b",
        ],
    );
}
