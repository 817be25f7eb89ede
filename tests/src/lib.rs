//! End-to-end tests live in `tests/`; this library holds their shared helpers:
//! finding the `autopart` binary, compiling a plan into a folder, running it
//! under `mpirun` and reading the metrics it writes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The `autopart` binary of this build (`target/<profile>/autopart`): the
/// test executables live in `target/<profile>/deps/`.
pub fn autopart_bin() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test executable")?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("the test executable has no target folder")?;
    let bin = profile_dir.join("autopart");
    if !bin.is_file() {
        bail!(
            "{} does not exist: build it first (`cargo build -p autopart`; `cargo nextest run --workspace` does)",
            bin.display()
        );
    }
    Ok(bin)
}

/// Runs `autopart` with `args`, failing with its output when it fails.
pub fn autopart(args: &[&str]) -> Result<Output> {
    let out = Command::new(autopart_bin()?)
        .args(args)
        .output()
        .context("running autopart")?;
    if !out.status.success() {
        bail!(
            "autopart {} failed ({}):\n{}\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// The common arguments of every end-to-end compile: `model`, a CPU
/// cluster, fp32, 16 tokens per sequence, 8 sequences per step, a dev build
/// of the plan binary (quick to build; its dependencies are optimised).
pub fn compile_args(out: &Path, model: &str) -> Vec<String> {
    [
        "compile",
        "--model",
        model,
        "--cluster",
        "cpu",
        "--dtype",
        "fp32",
        "--seq-len",
        "16",
        "--global-batch",
        "8",
        "--build-profile",
        "dev",
        "--out",
    ]
    .iter()
    .map(ToString::to_string)
    .chain([out.display().to_string()])
    .collect()
}

/// `autopart compile` of llama-mini into `out` with `extra` arguments. The
/// generated crate must build without warnings.
pub fn compile(out: &Path, extra: &[&str]) -> Result<()> {
    compile_model(out, "llama-mini", extra)
}

/// [`compile`] of `model`.
pub fn compile_model(out: &Path, model: &str, extra: &[&str]) -> Result<()> {
    let mut args = compile_args(out, model);
    args.extend(extra.iter().map(ToString::to_string));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = autopart(&refs)?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if stderr.contains("generated") && stderr.contains("warning") {
        bail!("the generated crate builds with warnings:\n{stderr}");
    }
    Ok(())
}

/// One line of the metrics file.
#[derive(Clone, Debug, PartialEq)]
pub struct StepMetrics {
    pub step: u64,
    pub loss: f64,
    pub grad_norm: f64,
    pub step_s: f64,
    pub tokens_per_s: f64,
}

/// Reads a metrics file: one JSON object per line per step.
pub fn read_metrics(path: &Path) -> Result<Vec<StepMetrics>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, line)| {
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
            let num = |k: &str| {
                v[k].as_f64().with_context(|| {
                    format!("{}:{}: no number '{k}' in {line}", path.display(), i + 1)
                })
            };
            Ok(StepMetrics {
                step: num("step")? as u64,
                loss: num("loss")?,
                grad_norm: num("grad_norm")?,
                step_s: num("step_s")?,
                tokens_per_s: num("tokens_per_s")?,
            })
        })
        .collect()
}

/// `mpirun -np {np} autopart run {out} {args}` (without mpirun for one
/// process), with a time limit; returns the output, whatever the status.
pub fn launch(np: usize, out: &Path, args: &[&str], timeout: Duration) -> Result<Output> {
    let bin = autopart_bin()?;
    let mut cmd = if np == 1 {
        Command::new(&bin)
    } else {
        let mut c = Command::new("mpirun");
        c.args([
            "--allow-run-as-root",
            "--oversubscribe",
            "--bind-to",
            "none",
        ])
        .args(["-np", &np.to_string()])
        .arg(&bin);
        c
    };
    cmd.arg("run")
        .arg(out)
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().context("starting mpirun (is it on PATH?)")?;
    let pid = child.id();
    let start = Instant::now();
    let waiter = std::thread::spawn(move || child.wait_with_output());
    while !waiter.is_finished() {
        if start.elapsed() > timeout {
            // Best effort: the job is stuck (a deadlock would hang CI).
            let _ = Command::new("kill").arg(pid.to_string()).status();
            bail!(
                "autopart run {} did not finish within {timeout:?}",
                out.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    waiter
        .join()
        .map_err(|_| anyhow::anyhow!("waiting for mpirun panicked"))?
        .context("waiting for mpirun")
}

/// Trains the compiled plan in `out` for `steps` steps on `np` processes
/// (with `extra` run arguments) and returns rank 0's metrics.
pub fn train(np: usize, out: &Path, steps: u32, extra: &[&str]) -> Result<Vec<StepMetrics>> {
    let metrics = out.join("metrics.jsonl");
    let _ = std::fs::remove_file(&metrics);
    let steps_s = steps.to_string();
    let metrics_s = metrics.display().to_string();
    let mut args = vec!["--steps", &steps_s, "--metrics", &metrics_s, "--seed", "7"];
    args.extend_from_slice(extra);
    let output = launch(np, out, &args, Duration::from_secs(300))?;
    if !output.status.success() {
        bail!(
            "training {} on {np} processes failed ({}):\n{}\n{}",
            out.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let m = read_metrics(&metrics)?;
    if m.len() != steps as usize {
        bail!(
            "{} has {} steps, expected {steps}",
            metrics.display(),
            m.len()
        );
    }
    Ok(m)
}
