//! The plan-binary `main` (`app::main`) run as users run it: this binary is
//! `examples/plan_app.rs` (llama-mini on two pipeline stages) when started
//! with `AUTOPART_APP_CHILD` set, and the test otherwise, which launches it:
//!
//! - under `mpirun -np 2` with `--steps 3 --metrics FILE`: the file must hold
//!   3 JSON lines with every field, and each step's loss, gradient norm and
//!   learning rate must equal a single-process run of the same model with the
//!   same optimizer (losses and norms 1e-5 relative);
//! - the same with `--data FILE` (a token file written here, wrapping around
//!   in the last step), against the single-process run on the same windows;
//! - under `mpirun -np 1` and without a launcher: exit status 2 and the
//!   `error: this plan runs on 2 processes …` line before any step;
//! - with a `--data` file of an odd number of bytes: a non-zero exit and one
//!   error line naming the file;
//! - `--save-params DIR` in the synthetic run: `rank-0.safetensors` and
//!   `rank-1.safetensors`, each with its pipeline stage's parameters by name,
//!   together every parameter once, equal to the single-process run's final
//!   weights (1e-5 absolute), and no temporary file left;
//! - a bad flag under `mpirun -np 2`: exit status 2 and one error line (rank
//!   0's) naming the flag; `--help`: exit 0 and the flag list once.

mod common;

#[allow(dead_code)]
#[path = "../examples/plan_app.rs"]
mod plan_app;

use autopart_runtime::app;
use autopart_runtime::comm::{Groups, MeshComms};
use autopart_runtime::data::{Batch, TokenDtype, TokenFile};
use autopart_runtime::optim::{AdamW, LrSchedule};
use autopart_runtime::zero::{DEFAULT_BUCKET_BYTES, DpOptimizer, OptimConfig, ZeroStage};
use common::{Check, max_diff};
use plan_app::llama::{LlamaConfig, LlamaStage, TrainPlan};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Output};
use std::time::Duration;
use tch::Tensor;

const CHILD_ENV: &str = "AUTOPART_APP_CHILD";
const TIMEOUT: Duration = Duration::from_secs(180);
const SEED: u64 = 5;
const STEPS: u64 = 3;
const RTOL: f64 = 1e-5;
const FIELDS: [&str; 9] = [
    "step",
    "loss",
    "grad_norm",
    "lr",
    "step_s",
    "tokens_per_s",
    "peak_rss_bytes",
    "rss_over_baseline_bytes",
    "rank_peaks_over_baseline_bytes",
];

/// The flags of every training run here, and the optimizer they mean.
/// AdamW's eps is 1e-6, not torch's 1e-8: its first updates are about
/// `lr * sign(g)`, so gradient elements at rounding level (whose sign depends
/// on the pipeline's summation order) would move saved weights by up to `lr`
/// (7e-5 with eps 1e-8 here), as in `mpi_train.rs`.
fn flags(steps: u64) -> Vec<String> {
    let s = format!(
        "--steps {steps} --seed {SEED} --lr 3e-3 --min-lr 3e-4 --warmup 1 --clip 1.0 \
         --weight-decay 0.01 --adam-eps 1e-6"
    );
    s.split_whitespace().map(String::from).collect()
}

fn optim(steps: u64) -> OptimConfig {
    OptimConfig {
        adamw: AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-6,
            weight_decay: 0.01,
        },
        lr: LrSchedule {
            peak_lr: 3e-3,
            warmup_steps: 1,
            total_steps: steps,
            min_lr: 3e-4,
        },
        max_norm: Some(1.0),
        bucket_bytes: DEFAULT_BUCKET_BYTES,
        zero: ZeroStage::Off,
        reduce: tch::Kind::Float,
    }
}

fn main() -> ExitCode {
    if let Some(code) = common::nextest_listing("mpi_app") {
        return code;
    }
    if std::env::var_os(CHILD_ENV).is_some() {
        return app::main(&plan_app::PLAN, plan_app::build);
    }
    let dir = std::env::temp_dir().join(format!("autopart-mpi-app-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("cannot create {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    let mut check = Check::new(0);
    checks(&dir, &mut check);
    let _ = std::fs::remove_dir_all(&dir);
    for f in &check.failures {
        eprintln!("FAIL {f}");
    }
    eprintln!(
        "{} checks passed, {} failed",
        check.passed,
        check.failures.len()
    );
    if check.failures.is_empty() && check.passed > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// What the single-process run gives: per-step (loss, gradient norm,
/// learning rate) and the final weights by name.
type Reference = (Vec<(f64, f64, f64)>, Vec<(String, Tensor)>);

/// [`Reference`] of one process training the plan's model on the whole batch.
fn reference(steps: u64, mut data: Option<&mut TokenFile>) -> Result<Reference, String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let meta = plan_app::PLAN;
    let solo = MeshComms::solo();
    let g = Groups::of(&solo);
    let mut stage = LlamaStage::new(LlamaConfig::mini(), TrainPlan::single(), solo.coord, SEED)
        .map_err(|e| err(&e))?;
    let mut opt = DpOptimizer::new(optim(steps), stage.params_mut(), &g).map_err(|e| err(&e))?;
    let mut out = Vec::new();
    for step in 0..steps {
        let batch = match data.as_deref_mut() {
            Some(d) => d.batch(step, meta.global_batch).map_err(|e| err(&e))?,
            None => Batch::synthetic(
                meta.vocab,
                meta.global_batch,
                meta.seq_len,
                SEED as i64 + step as i64,
            )
            .map_err(|e| err(&e))?,
        };
        let (loss, stats) = stage
            .train_step_with(&g, &batch, &mut opt)
            .map_err(|e| err(&e))?;
        out.push((loss, stats.grad_norm, stats.lr));
    }
    let weights = stage.full_weights(&solo.tp).map_err(|e| err(&e))?;
    Ok((out, weights))
}

fn run(np: Option<usize>, args: &[String], check: &mut Check, what: &str) -> Option<Output> {
    match common::run_self(np, (CHILD_ENV, "1"), args, TIMEOUT) {
        Ok(out) => Some(out),
        Err(e) => {
            check.ok(what, false, || e);
            None
        }
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn checks(dir: &Path, check: &mut Check) {
    // Synthetic data.
    let metrics = dir.join("metrics.jsonl");
    let params = dir.join("params");
    let mut args = flags(STEPS);
    args.extend([
        "--metrics".into(),
        metrics.display().to_string(),
        "--save-params".into(),
        params.display().to_string(),
    ]);
    if let Some(out) = run(Some(2), &args, check, "synthetic run") {
        let stdout = text(&out.stdout);
        check.ok("synthetic run succeeds", out.status.success(), || {
            format!(
                "{}\nstdout:\n{stdout}\nstderr:\n{}",
                out.status,
                text(&out.stderr)
            )
        });
        check.ok(
            "one console line per step",
            (1..=STEPS).all(|s| stdout.contains(&format!("step {s}/{STEPS}  loss "))),
            || stdout.clone(),
        );
        match reference(STEPS, None) {
            Ok((want, weights)) => {
                compare_metrics("synthetic", &metrics, &want, check);
                compare_saved_params(&params, &weights, check);
            }
            Err(e) => check.ok("synthetic reference", false, || e),
        }
    }

    // A token file of 9 windows: 4 rows of 16 tokens per step, so step 2 wraps around.
    let tokens: Vec<u16> = (0..150u32).map(|i| ((i * 37 + 11) % 256) as u16).collect();
    let data_path = dir.join("tokens.bin");
    let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
    if let Err(e) = std::fs::write(&data_path, bytes) {
        check.ok("write token file", false, || e.to_string());
        return;
    }
    let metrics = dir.join("metrics-data.jsonl");
    let mut args = flags(STEPS);
    args.extend([
        "--data".into(),
        data_path.display().to_string(),
        "--metrics".into(),
        metrics.display().to_string(),
    ]);
    if let Some(out) = run(Some(2), &args, check, "token-file run") {
        check.ok("token-file run succeeds", out.status.success(), || {
            format!("{}\nstderr:\n{}", out.status, text(&out.stderr))
        });
        let want = TokenFile::open(&data_path, TokenDtype::U16, 256, plan_app::PLAN.seq_len)
            .map_err(|e| e.to_string())
            .and_then(|mut d| reference(STEPS, Some(&mut d)));
        match want {
            Ok((want, _)) => compare_metrics("token file", &metrics, &want, check),
            Err(e) => check.ok("token-file reference", false, || e),
        }
    }

    usage_checks(check);

    // The wrong number of processes, with and without a launcher.
    for np in [Some(1), None] {
        let what = format!("{np:?} processes");
        let Some(out) = run(np, &flags(STEPS), check, &what) else {
            continue;
        };
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        check.ok(
            &format!("{what}: exit status 2"),
            out.status.code() == Some(2),
            || format!("{}\nstderr:\n{stderr}", out.status),
        );
        let want = "error: this plan runs on 2 processes (plan 2 GPUs x 1 replica) but the \
                    launcher started 1; run it with mpirun -np 2";
        check.ok(
            &format!("{what}: error line"),
            stderr.contains(want),
            || stderr.clone(),
        );
        check.ok(
            &format!("{what}: no training"),
            !stdout.contains("step 1/"),
            || stdout.clone(),
        );
    }

    // A data file that is not whole u16 ids: one error line naming it.
    let bad = dir.join("odd.bin");
    if let Err(e) = std::fs::write(&bad, [1u8, 2, 3, 4, 5]) {
        check.ok("write odd file", false, || e.to_string());
        return;
    }
    let mut args = flags(STEPS);
    args.extend(["--data".into(), bad.display().to_string()]);
    if let Some(out) = run(Some(2), &args, check, "bad data run") {
        let stderr = text(&out.stderr);
        check.ok("bad data: non-zero exit", !out.status.success(), || {
            out.status.to_string()
        });
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        check.ok(
            "bad data: one error line naming the file",
            errors.len() == 1 && errors[0].contains(&bad.display().to_string()),
            || stderr.clone(),
        );
        check.ok(
            "bad data: no training",
            !text(&out.stdout).contains("step 1/"),
            || text(&out.stdout),
        );
    }
}

/// A bad flag is a usage error reported once; `--help` prints the flags once.
fn usage_checks(check: &mut Check) {
    let args: Vec<String> = ["--steps", "0"].map(String::from).to_vec();
    if let Some(out) = run(Some(2), &args, check, "bad flag run") {
        let stderr = text(&out.stderr);
        check.ok(
            "bad flag: exit status 2",
            out.status.code() == Some(2),
            || format!("{}\nstderr:\n{stderr}", out.status),
        );
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        check.ok(
            "bad flag: one error line naming the flag and value",
            errors.len() == 1 && errors[0].contains("'--steps <N>'") && errors[0].contains("'0'"),
            || stderr.clone(),
        );
    }
    let help = vec!["--help".to_string()];
    if let Some(out) = run(Some(2), &help, check, "help run") {
        let stdout = text(&out.stdout);
        check.ok("help: exit status 0", out.status.success(), || {
            out.status.to_string()
        });
        check.ok(
            "help: the flags once",
            stdout.matches("--save-params <DIR>").count() == 1
                && stdout.contains("--steps <N>")
                && stdout.contains("[default: 10]"),
            || stdout.clone(),
        );
    }
}

/// The `--save-params` files of the two-stage run against the reference's
/// final weights: each rank its stage's parameters, together all of them once.
fn compare_saved_params(dir: &Path, want: &[(String, Tensor)], check: &mut Check) {
    let mut seen: Vec<String> = Vec::new();
    let mut worst = 0.0f64;
    for rank in 0..2 {
        let path = app::params_file(dir, rank);
        let saved = match Tensor::read_safetensors(&path) {
            Ok(s) => s,
            Err(e) => {
                return check.ok(&format!("saved params of rank {rank}"), false, || {
                    e.to_string()
                });
            }
        };
        check.ok(
            &format!("rank {rank} saved parameters"),
            !saved.is_empty(),
            || path.display().to_string(),
        );
        for (name, t) in saved {
            let Some((_, w)) = want.iter().find(|(n, _)| *n == name) else {
                check.ok(&format!("saved {name} is a parameter"), false, String::new);
                continue;
            };
            let same_shape = t.size() == w.size();
            check.ok(&format!("saved {name}: shape"), same_shape, || {
                format!("{:?} vs {:?}", t.size(), w.size())
            });
            if same_shape {
                let (diff, _) = max_diff(&t, w);
                worst = worst.max(diff);
                check.ok(&format!("saved {name}: values"), diff <= 1e-5, || {
                    format!("max |diff| {diff:e} against the single-process run")
                });
            }
            seen.push(name);
        }
    }
    seen.sort();
    let mut all: Vec<String> = want.iter().map(|(n, _)| n.clone()).collect();
    all.sort();
    check.ok("saved params: every parameter once", seen == all, || {
        format!("saved {seen:?}\nparameters {all:?}")
    });
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.ends_with(".safetensors"))
                .collect()
        })
        .unwrap_or_default();
    check.ok(
        "saved params: no temporary file left",
        leftovers.is_empty(),
        || format!("{leftovers:?}"),
    );
    eprintln!("saved params: worst |diff| against the single-process run {worst:.2e}");
}

/// The metrics file at `path` against the reference's (loss, norm, lr) per step.
fn compare_metrics(name: &str, path: &PathBuf, want: &[(f64, f64, f64)], check: &mut Check) {
    let content = match std::fs::read_to_string(path) {
        Ok(c) => c,
        Err(e) => return check.ok(&format!("{name}: metrics file"), false, || e.to_string()),
    };
    let lines: Vec<&str> = content.lines().collect();
    check.ok(
        &format!("{name}: one metrics line per step"),
        lines.len() == want.len(),
        || content.clone(),
    );
    for (i, (line, &(loss, norm, lr))) in lines.iter().zip(want).enumerate() {
        let v: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                check.ok(&format!("{name}: line {i} is JSON"), false, || {
                    format!("{e}: {line}")
                });
                continue;
            }
        };
        for field in FIELDS {
            check.ok(
                &format!("{name}: line {i} has {field}"),
                v.get(field).is_some(),
                || line.to_string(),
            );
        }
        check.ok(
            &format!("{name}: line {i} is step {}", i + 1),
            v["step"].as_u64() == Some(i as u64 + 1),
            || line.to_string(),
        );
        let rss_known = !cfg!(target_os = "linux") || v["peak_rss_bytes"].as_u64().is_some();
        check.ok(
            &format!("{name}: line {i} knows the rss"),
            rss_known,
            || line.to_string(),
        );
        // Both runs here are two ranks: one peak each.
        let ranks_known = !cfg!(target_os = "linux")
            || v["rank_peaks_over_baseline_bytes"]
                .as_array()
                .is_some_and(|a| a.len() == 2 && a.iter().all(|x| x.as_u64().is_some()));
        check.ok(
            &format!("{name}: line {i} has a peak per rank"),
            ranks_known,
            || line.to_string(),
        );
        for (field, want) in [("loss", loss), ("grad_norm", norm), ("lr", lr)] {
            let got = v[field].as_f64().unwrap_or(f64::NAN);
            let rel = (got - want).abs() / want.abs().max(1e-12);
            check.ok(
                &format!("{name}: step {} {field}", i + 1),
                rel <= RTOL,
                || format!("{got} vs single-process {want} (relative error {rel:e})"),
            );
        }
    }
}
