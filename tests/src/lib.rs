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
    /// Updates skipped so far (non-finite steps; f16 overflows while the
    /// loss scale finds its level).
    pub skipped_steps: u64,
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
                // null on a step whose update was skipped (non-finite).
                grad_norm: if v["grad_norm"].is_null() {
                    f64::NAN
                } else {
                    num("grad_norm")?
                },
                step_s: num("step_s")?,
                tokens_per_s: num("tokens_per_s")?,
                skipped_steps: num("skipped_steps")? as u64,
            })
        })
        .collect()
}

/// `mpirun -np {np} autopart run {out} {args}` (without mpirun for one
/// process), with a time limit; returns the output, whatever the status.
pub fn launch(np: usize, out: &Path, args: &[&str], timeout: Duration) -> Result<Output> {
    let mut all = vec!["run".to_string(), out.display().to_string()];
    all.extend(args.iter().map(ToString::to_string));
    launch_binary(np, &autopart_bin()?, &all, timeout)
}

/// `mpirun -np {np} {bin} {args}` (without mpirun for one process), with a
/// time limit; returns the output, whatever the status.
pub fn launch_binary(np: usize, bin: &Path, args: &[String], timeout: Duration) -> Result<Output> {
    launch_binary_env(np, bin, args, &[], timeout)
}

/// [`launch_binary`] with extra environment variables (every rank sees them:
/// Open MPI's local ranks inherit mpirun's environment).
pub fn launch_binary_env(
    np: usize,
    bin: &Path,
    args: &[String],
    env: &[(&str, &str)],
    timeout: Duration,
) -> Result<Output> {
    let mut cmd = if np == 1 {
        Command::new(bin)
    } else {
        let mut c = Command::new("mpirun");
        c.args([
            "--allow-run-as-root",
            "--oversubscribe",
            "--bind-to",
            "none",
        ])
        .args(["-np", &np.to_string()])
        .arg(bin);
        c
    };
    cmd.args(args)
        .envs(env.iter().copied())
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
                "{} {} did not finish within {timeout:?}",
                bin.display(),
                args.join(" ")
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
    Ok(train_run(np, out, steps, extra)?.metrics)
}

/// What a training run left: rank 0's metrics and console output.
#[derive(Clone, Debug)]
pub struct TrainRun {
    pub metrics: Vec<StepMetrics>,
    pub stdout: String,
}

/// [`train`], with the console output.
pub fn train_run(np: usize, out: &Path, steps: u32, extra: &[&str]) -> Result<TrainRun> {
    let prefix = ["run".to_string(), out.display().to_string()];
    let metrics = out.join("metrics.jsonl");
    train_binary(np, &autopart_bin()?, &prefix, &metrics, steps, extra)
}

/// Runs `bin {prefix} --steps {steps} --metrics {metrics} --seed 7 {extra}`
/// on `np` processes (a plan binary with no prefix, or `autopart` with
/// `run OUT`) and returns rank 0's metrics and console output; fails unless
/// it succeeds with one metrics line per step.
pub fn train_binary(
    np: usize,
    bin: &Path,
    prefix: &[String],
    metrics: &Path,
    steps: u32,
    extra: &[&str],
) -> Result<TrainRun> {
    let _ = std::fs::remove_file(metrics);
    let mut args = prefix.to_vec();
    args.extend([
        "--steps".to_string(),
        steps.to_string(),
        "--metrics".to_string(),
        metrics.display().to_string(),
        "--seed".to_string(),
        "7".to_string(),
    ]);
    args.extend(extra.iter().map(ToString::to_string));
    let output = launch_binary(np, bin, &args, Duration::from_secs(300))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!(
            "training {} {} on {np} processes failed ({}):\n{stdout}\n{}",
            bin.display(),
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let m = read_metrics(metrics)?;
    if m.len() != steps as usize {
        bail!(
            "{} has {} steps, expected {steps}",
            metrics.display(),
            m.len()
        );
    }
    Ok(TrainRun { metrics: m, stdout })
}

/// The autopart source tree of this test crate (the workspace root).
pub fn autopart_home() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// Builds the binary crate in `dir` (package `package`, with its own
/// `[workspace]`) exactly as `autopart compile --build-profile dev` builds a
/// generated crate: the tree's `Cargo.lock` and `.cargo/config.toml`, the
/// shared target folder (`$CARGO_TARGET_DIR` or the tree's `target/`), so
/// that its dependencies are those already built for the generated plans.
/// Fails when the build fails or warns. Returns the built binary's path.
pub fn build_plan_crate(dir: &Path, package: &str) -> Result<PathBuf> {
    use autopart::driver::build::{BuildProfile, binary_path, cargo_build_command};
    let (mut cmd, target) = cargo_build_command(&autopart_home(), dir, BuildProfile::Dev)?;
    let out = cmd.output().context("running cargo")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!(
            "cargo could not build {} ({}):\n{stderr}",
            dir.display(),
            out.status
        );
    }
    if stderr.contains("warning") {
        bail!("{} builds with warnings:\n{stderr}", dir.display());
    }
    Ok(binary_path(&target, BuildProfile::Dev, package))
}

/// One tensor of a safetensors file, as f64.
#[derive(Clone, Debug, PartialEq)]
pub struct SavedTensor {
    /// As the header names it: `F32`, `BF16`, ...
    pub dtype: String,
    pub shape: Vec<usize>,
    pub values: Vec<f64>,
}

/// An IEEE half-precision value.
fn f16_to_f64(bits: u16) -> f64 {
    let sign = if bits >> 15 == 1 { -1.0 } else { 1.0 };
    let exp = i32::from((bits >> 10) & 0x1f);
    let frac = f64::from(bits & 0x3ff);
    sign * match exp {
        0 => frac * 2f64.powi(-24),
        31 if frac == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        e => (1.0 + frac / 1024.0) * 2f64.powi(e - 15),
    }
}

/// Reads a safetensors file (the `--save-params` output) with the
/// `safetensors` crate. F32, F64, BF16 and F16.
pub fn read_safetensors(path: &Path) -> Result<std::collections::BTreeMap<String, SavedTensor>> {
    use safetensors::{Dtype, SafeTensors};
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let file = SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a safetensors file: {e:?}", path.display()))?;
    let mut out = std::collections::BTreeMap::new();
    for (name, view) in file.tensors() {
        let raw = view.data();
        let values: Vec<f64> = match view.dtype() {
            Dtype::F32 => raw
                .chunks_exact(4)
                .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
            Dtype::F64 => raw
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
            // bf16 is the upper half of an f32.
            Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|c| f64::from(f32::from_le_bytes([0, 0, c[0], c[1]])))
                .collect(),
            Dtype::F16 => raw
                .chunks_exact(2)
                .map(|c| f16_to_f64(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
            other => bail!(
                "{}: {name} has dtype {other:?}, not F32, F64, BF16 or F16",
                path.display()
            ),
        };
        let shape = view.shape().to_vec();
        let dtype = format!("{:?}", view.dtype());
        out.insert(
            name,
            SavedTensor {
                dtype,
                shape,
                values,
            },
        );
    }
    Ok(out)
}

/// The `"step":…,"loss":…,"grad_norm":…` text of each line of a metrics
/// file, for bitwise comparisons of runs.
pub fn loss_text(metrics: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(metrics)
        .with_context(|| format!("reading {}", metrics.display()))?;
    text.lines()
        .map(|l| {
            let at = l.find("\"loss\"").context("no loss")?;
            let end = l.find(",\"lr\"").context("no lr")?;
            Ok(l[..at].to_string() + &l[at..end])
        })
        .collect()
}

/// Starts the single-node test Slurm (`scripts/slurm.sh start`, idempotent)
/// and returns its `SLURM_CONF`; `None` (saying so) when it cannot start and
/// `AUTOPART_TEST_NO_SLURM` is set, an error otherwise.
pub fn test_slurm() -> Result<Option<String>> {
    let script = autopart_home().join("scripts/slurm.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("start")
        .output()
        .context("running scripts/slurm.sh")?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr).into_owned();
        if std::env::var_os("AUTOPART_TEST_NO_SLURM").is_some() {
            eprintln!("skipped: Slurm did not start ({why}) and AUTOPART_TEST_NO_SLURM is set");
            return Ok(None);
        }
        bail!("scripts/slurm.sh start failed (root needed; AUTOPART_TEST_NO_SLURM=1 skips): {why}");
    }
    let env = Command::new("bash")
        .arg(&script)
        .arg("env")
        .output()
        .context("scripts/slurm.sh env")?;
    let line = String::from_utf8_lossy(&env.stdout).into_owned();
    Ok(Some(
        line.trim()
            .strip_prefix("export SLURM_CONF=")
            .context("no SLURM_CONF line")?
            .to_string(),
    ))
}

/// The llama-mini plans the checkpoint and fault tests compile (the same
/// flags as `e2e.rs`'s, so that their binaries are shared).
pub mod plans {
    pub const SINGLE: &[&str] = &["--plan-ngpus", "1"];
    pub const DP2_ZERO1: &[&str] = &["--plan-ngpus", "2", "--tp", "1", "--dp", "2", "--zero", "1"];
    pub const DP2_ZERO3: &[&str] = &["--plan-ngpus", "2", "--tp", "1", "--dp", "2", "--zero", "3"];
    pub const PP2_1F1B: &[&str] = &[
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
    ];
    pub const PP2_INTERLEAVED: &[&str] = &[
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
    ];
    pub const TP2_PP2_1F1B: &[&str] = &[
        "--plan-ngpus",
        "4",
        "--tp",
        "2",
        "--pp",
        "2",
        "--micro-batch",
        "2",
        "--schedule",
        "1f1b",
    ];
    /// tp beyond llama-mini's 2 kv heads: each copied twice.
    pub const TP4_KV_COPIES: &[&str] = &[
        "--plan-ngpus",
        "4",
        "--tp",
        "4",
        "--pp",
        "1",
        "--sp",
        "false",
    ];
    pub const TP2: &[&str] = &[
        "--plan-ngpus",
        "2",
        "--tp",
        "2",
        "--pp",
        "1",
        "--sp",
        "true",
    ];
}

/// `mpirun` with the flags every test run uses and `-np np`.
pub fn mpirun_prefix(np: usize) -> Vec<String> {
    [
        "mpirun",
        "--allow-run-as-root",
        "--oversubscribe",
        "--bind-to",
        "none",
        "-np",
    ]
    .iter()
    .map(ToString::to_string)
    .chain([np.to_string()])
    .collect()
}

/// The arguments of `autopart launch --max-restarts N --backoff 0 --
/// LAUNCHER... autopart run OUT FLAGS...` (for [`launch_binary_env`] with
/// one process and the `autopart` binary).
pub fn launch_job(
    max_restarts: u32,
    launcher: &[String],
    out: &Path,
    flags: &[String],
) -> Result<Vec<String>> {
    let mut job: Vec<String> = vec![
        "launch".into(),
        "--max-restarts".into(),
        max_restarts.to_string(),
        "--backoff".into(),
        "0".into(),
        "--".into(),
    ];
    job.extend(launcher.iter().cloned());
    job.extend([
        autopart_bin()?.display().to_string(),
        "run".into(),
        out.display().to_string(),
    ]);
    job.extend(flags.iter().cloned());
    Ok(job)
}
