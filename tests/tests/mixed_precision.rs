//! Mixed precision end to end: llama-mini compiled with `--dtype bf16` (and
//! `fp16`) trains in that dtype — weights, activations, the activations and
//! gradients between pipeline stages — with f32 master weights and moments in
//! the optimizer, and tracks the same model trained in fp32 on one process.
//!
//! **Tolerance.** Every run trains 20 steps from seed 7 on a learnable token
//! stream at lr 1e-2, 8 sequences of 16 tokens per step, so the loss falls
//! from 5.56 to about 3.7, by up to 0.2 a step. bf16 keeps 8 bits of
//! mantissa (each op's result within 2^-9 relative), f16 11; the f32 master
//! weights take every update in full, so the rounding does not accumulate in
//! the weights, but it moves the trajectory: a run slightly ahead or behind
//! the fp32 one differs most where the loss falls fastest, and by how much
//! depends on the CPU's kernels as much as on the dtype. Measured: at most
//! 4.6% at any step for bf16 and 1.5% for f16 on this project's AVX-512
//! EPYC, 4.2% for f16 in one CI run on another machine, and the loss's fall
//! over the 20 steps within 4% of fp32's. The bounds are about twice that:
//! each step's loss within [`LOSS_RTOL`] (8%) of fp32's, the fall within
//! [`DROP_RTOL`] (8%). A run that trained in fp32 after all would match bit
//! for bit and fails; so would one whose saved weights are not in the plan's
//! dtype.
//!
//! f16 scales the loss dynamically from 2^16. llama-mini's largest gradients
//! sit near f16's range at that scale, so an early step may overflow on some
//! CPUs (none does here). A skipped update leaves the run one update behind
//! fp32 (measured with the scale forced to start at 2^17, one skip at step
//! 5: 7.3% at the worst step, the fall within 5.3%), so at most
//! [`MAX_SKIPPED`] skips are allowed (the back-off and growth themselves are
//! `runtime/src/zero.rs`'s unit tests).

use std::path::Path;

use autopart_tests::{StepMetrics, autopart, compile_args, read_safetensors, train_run};

const STEPS: u32 = 20;
const LOSS_RTOL: f64 = 0.08;
const DROP_RTOL: f64 = 0.08;
/// f16 updates that may be skipped while the loss scale finds its level.
const MAX_SKIPPED: u64 = 2;

/// Compiles llama-mini into `out` in `dtype` with `extra` arguments.
fn compile_in(out: &Path, dtype: &str, extra: &[&str]) {
    let mut args = compile_args(out, "llama-mini");
    let at = args
        .iter()
        .position(|a| a == "fp32")
        .expect("compile_args sets fp32");
    args[at] = dtype.to_string();
    args.extend(extra.iter().map(ToString::to_string));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    autopart(&refs).unwrap_or_else(|e| panic!("compile {dtype} {extra:?}: {e:#}"));
}

/// The process count of a plan's arguments.
fn np_of(extra: &[&str]) -> usize {
    extra
        .iter()
        .position(|a| *a == "--plan-ngpus")
        .and_then(|i| extra.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(1)
}

/// A learnable token stream (each token determines the next) in `dir`, and
/// the run flags that train on it fast enough for the loss to fall by about
/// a third in [`STEPS`] steps.
fn learnable_data(dir: &Path) -> Vec<String> {
    let data = dir.join("tokens.bin");
    let mut bytes = Vec::new();
    let mut t: u16 = 1;
    for _ in 0..4096 {
        bytes.extend_from_slice(&t.to_le_bytes());
        t = (t * 5 + 3) % 256;
    }
    std::fs::write(&data, bytes).expect("write tokens");
    ["--data", &data.display().to_string(), "--lr", "1e-2"]
        .iter()
        .map(ToString::to_string)
        .collect()
}

/// The fp32 single-process run every mixed-precision run is held to.
fn fp32_reference(dir: &Path) -> Vec<StepMetrics> {
    let out = dir.join("fp32");
    compile_in(&out, "fp32", &["--plan-ngpus", "1"]);
    let data = learnable_data(dir);
    let data: Vec<&str> = data.iter().map(String::as_str).collect();
    train_run(1, &out, STEPS, &data)
        .expect("train fp32")
        .metrics
}

/// Trains `dtype` plan `extra` and checks it against `want` (fp32) within
/// `rtol` per step; returns the run's console output.
fn tracks_fp32(
    dir: &Path,
    name: &str,
    dtype: &str,
    extra: &[&str],
    want: &[StepMetrics],
    rtol: f64,
) -> String {
    let out = dir.join(name);
    compile_in(&out, dtype, extra);
    let params = dir.join(format!("{name}-params"));
    let mut run_args = learnable_data(dir);
    run_args.extend(["--save-params".to_string(), params.display().to_string()]);
    let run_args: Vec<&str> = run_args.iter().map(String::as_str).collect();
    let run = train_run(np_of(extra), &out, STEPS, &run_args)
        .unwrap_or_else(|e| panic!("train {name}: {e:#}"));
    let got = &run.metrics;
    assert_eq!(got.len(), want.len(), "{name}: steps");
    let skipped = got.last().map_or(0, |m| m.skipped_steps);
    assert!(
        skipped <= MAX_SKIPPED,
        "{name}: {skipped} updates skipped (at most {MAX_SKIPPED} expected)"
    );
    let mut worst = 0.0f64;
    for (g, w) in got.iter().zip(want) {
        let rel = (g.loss - w.loss).abs() / w.loss.abs();
        assert!(
            rel <= rtol,
            "{name}: step {} loss {} vs fp32 {} ({rel:.2e} > {rtol})\n{name} (loss, skipped so far): {:?}\nfp32: {:?}",
            g.step,
            g.loss,
            w.loss,
            got.iter()
                .map(|m| (m.loss, m.skipped_steps))
                .collect::<Vec<_>>(),
            want.iter().map(|m| m.loss).collect::<Vec<_>>()
        );
        worst = worst.max(rel);
    }
    // It trains as far as fp32 does, and not in fp32 under another name.
    let drop = |m: &[StepMetrics]| m[0].loss - m[m.len() - 1].loss;
    let (got_drop, want_drop) = (drop(got), drop(want));
    eprintln!(
        "{name}: worst relative loss difference to fp32 over {STEPS} steps {worst:.2e}; loss drop {got_drop:.4} (fp32 {want_drop:.4})"
    );
    assert!(want_drop > 0.0, "the fp32 run does not train: {want:?}");
    assert!(
        (got_drop - want_drop).abs() <= DROP_RTOL * want_drop,
        "{name}: the loss fell by {got_drop}, fp32's by {want_drop}"
    );
    assert!(
        worst > 0.0,
        "{name}: the losses equal fp32's bit for bit: not trained in {dtype}?"
    );
    let console = run.stdout.clone();
    assert!(
        console.contains(&format!(", {}", dtype_name(dtype))),
        "{console}"
    );
    let saved = read_safetensors(&params.join("rank-0.safetensors")).expect("saved params");
    let want_dtype = if dtype == "bf16" { "BF16" } else { "F16" };
    for (n, t) in &saved {
        assert_eq!(t.dtype, want_dtype, "{name}: {n}");
    }
    console
}

/// The dtype as the console names it.
fn dtype_name(flag: &str) -> &str {
    match flag {
        "fp16" => "f16",
        other => other,
    }
}

/// bf16 on one process, at tp2 x pp2 (bf16 activations and gradients over
/// pp, tp collectives on bf16) and at dp2 under ZeRO-3 with gradients
/// reduced in bf16; each tracks the fp32 run within [`LOSS_RTOL`].
#[test]
fn bf16_plans_track_the_fp32_run() {
    let dir = tempfile::tempdir().expect("temp dir");
    let want = fp32_reference(dir.path());
    tracks_fp32(
        dir.path(),
        "bf16-single",
        "bf16",
        &["--plan-ngpus", "1"],
        &want,
        LOSS_RTOL,
    );
    let console = tracks_fp32(
        dir.path(),
        "bf16-tp2-pp2",
        "bf16",
        &["--plan-ngpus", "4", "--tp", "2", "--pp", "2", "--dp", "1"],
        &want,
        LOSS_RTOL,
    );
    assert!(console.contains("gradients reduced in f32"), "{console}");
    let console = tracks_fp32(
        dir.path(),
        "bf16-dp2-zero3",
        "bf16",
        &[
            "--plan-ngpus",
            "2",
            "--tp",
            "1",
            "--dp",
            "2",
            "--zero",
            "3",
            "--reduce-dtype",
            "bf16",
        ],
        &want,
        LOSS_RTOL,
    );
    assert!(console.contains("gradients reduced in bf16"), "{console}");
}

/// f16 at dp2 (ZeRO-0: whole f32 master copies) with dynamic loss scaling
/// tracks the fp32 run within [`LOSS_RTOL`].
#[test]
fn f16_with_dynamic_loss_scaling_tracks_the_fp32_run() {
    let dir = tempfile::tempdir().expect("temp dir");
    let want = fp32_reference(dir.path());
    let console = tracks_fp32(
        dir.path(),
        "f16-dp2",
        "fp16",
        &["--plan-ngpus", "2", "--tp", "1", "--dp", "2", "--zero", "0"],
        &want,
        LOSS_RTOL,
    );
    assert!(
        console.contains("dynamic loss scale from 65536"),
        "{console}"
    );
}

/// A bf16 run resumed from its checkpoint continues exactly: the checkpoint
/// holds the f32 master copy (ZeRO 0 here: one per parameter), not only the
/// bf16 weights, so losses and final weights equal the uninterrupted run's
/// bit for bit. An f16 run's checkpoint records its loss scale.
#[test]
fn mixed_precision_runs_resume_exactly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("bf16-dp2");
    let plan = ["--plan-ngpus", "2", "--tp", "1", "--dp", "2", "--zero", "0"];
    compile_in(&out, "bf16", &plan);
    let data = learnable_data(dir.path());
    let ck = dir.path().join("ck");
    let run = |metrics: &str, params: &str, extra: &[&str]| -> Vec<String> {
        let metrics = dir.path().join(metrics);
        let mut args: Vec<String> = data.clone();
        args.extend(
            [
                "--checkpoint-dir",
                &ck.display().to_string(),
                "--checkpoint-every",
                "3",
                "--save-params",
                &dir.path().join(params).display().to_string(),
                "--metrics",
                &metrics.display().to_string(),
            ]
            .iter()
            .chain(extra)
            .map(ToString::to_string),
        );
        let mut all = vec!["run".to_string(), out.display().to_string()];
        all.extend(["--steps", "6", "--seed", "7"].map(String::from));
        all.extend(args);
        let o = autopart_tests::launch_binary(
            2,
            &autopart_tests::autopart_bin().expect("autopart"),
            &all,
            std::time::Duration::from_secs(300),
        )
        .expect("launch");
        assert!(
            o.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        autopart_tests::loss_text(&metrics).expect("metrics")
    };
    let whole = run("whole.jsonl", "pa", &[]);
    let resumed = run("resumed.jsonl", "pb", &["--resume", "3"]);
    assert_eq!(whole.len(), 6);
    assert_eq!(resumed, whole[3..].to_vec());
    for rank in 0..2 {
        let f = format!("rank-{rank}.safetensors");
        let a = read_safetensors(&dir.path().join("pa").join(&f)).expect("whole run");
        let b = read_safetensors(&dir.path().join("pb").join(&f)).expect("resumed run");
        assert_eq!(a, b, "{f}");
        assert!(a.values().all(|t| t.dtype == "BF16"), "{f}");
    }
    let manifest = std::fs::read_to_string(ck.join("step_3/COMPLETE")).expect("manifest");
    assert!(
        !manifest.contains("loss_scale"),
        "bf16 scales no loss: {manifest}"
    );

    let out16 = dir.path().join("f16");
    compile_in(&out16, "fp16", &["--plan-ngpus", "1"]);
    let ck16 = dir.path().join("ck16");
    let mut args = data.clone();
    args.extend(["--checkpoint-dir".to_string(), ck16.display().to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    train_run(1, &out16, 2, &args).expect("train f16");
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(ck16.join("step_2/COMPLETE")).expect("manifest"),
    )
    .expect("JSON");
    assert_eq!(manifest["loss_scale"]["scale"], 65536.0, "{manifest}");
    assert_eq!(manifest["loss_scale"]["good_steps"], 2, "{manifest}");
}
