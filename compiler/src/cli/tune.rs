//! `autopart compile --tune K`: the K best predicted plans, each built and
//! trained a few steps under the launcher on the real machines; the plan
//! that measured fastest (and fits the device's memory) is the one compiled
//! into OUT, and OUT/tune.md reports predicted against measured for each.
//!
//! This is what ATorch's dry runs do, over the cost model's top K instead of
//! a black-box search: the analytic model ranks thousands of plans, the
//! machine decides among the few it cannot tell apart. Each candidate goes
//! to OUT/tune/plan-N (its own compile with every dimension pinned to the
//! candidate's, so its plan.ron is the candidate), trains with synthetic
//! data, and is timed by its metrics (median step time over the steps after
//! the first, the largest resident set of any rank).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use autopart_vocab::fs::write_atomic;

use crate::cost::load_cluster;
use crate::driver::{self, Pass, Request};
use crate::plan::Plan;

/// The `--tune` flags.
#[derive(Clone, Debug)]
pub struct TuneOptions {
    /// Plans to try.
    pub k: usize,
    /// Steps each plan trains (the first is not timed).
    pub steps: u64,
    /// The launcher, `{np}` standing for the plan's process count.
    pub launcher: String,
}

/// One tried plan.
#[derive(Debug)]
pub struct Tried {
    pub plan: Plan,
    pub outcome: Outcome,
}

#[derive(Debug)]
pub enum Outcome {
    /// Median step seconds, the largest peak resident set of any rank and
    /// that peak over the rank's baseline.
    Measured {
        step_s: f64,
        peak_bytes: Option<u64>,
        over_baseline_bytes: Option<u64>,
    },
    /// It did not build or run: why.
    Failed(String),
}

/// What `--tune` chose and the report it wrote.
#[derive(Debug)]
pub struct Tuned {
    pub tried: Vec<Tried>,
    /// Index into `tried` of the plan compiled into OUT.
    pub chosen: usize,
    pub report: String,
    pub report_path: PathBuf,
}

/// Pins every dimension of `plan` over the user's constraints (their
/// splits kept), so that a compile gives exactly that plan.
fn pinned(req: &Request, plan: &Plan) -> Request {
    let mut r = req.clone();
    let c = &mut r.constraints;
    c.tp = Some(plan.mesh.tp);
    c.pp = Some(plan.mesh.pp);
    c.dp = Some(plan.mesh.dp);
    c.micro_batch = Some(plan.micro_batch);
    c.schedule = Some(plan.schedule);
    c.zero = Some(plan.zero);
    c.sequence_parallel = Some(plan.sequence_parallel);
    c.reduce_dtype = Some(plan.reduce_dtype);
    let modes: Vec<_> = plan.stages.iter().map(|s| s.recompute).collect();
    if modes.windows(2).all(|w| w[0] == w[1]) {
        c.recompute = modes.first().copied();
    }
    r.top_k = 1;
    r
}

/// One line naming a plan's dimensions.
fn describe(p: &Plan) -> String {
    let recompute: Vec<String> = p.stages.iter().map(|s| s.recompute.to_string()).collect();
    let mut recompute = recompute;
    recompute.dedup();
    format!(
        "tp{} pp{} dp{} mb{}x{} {} ZeRO-{} SP {} recompute {}",
        p.mesh.tp,
        p.mesh.pp,
        p.mesh.dp,
        p.micro_batch,
        p.n_micro_batches,
        p.schedule,
        p.zero as u8,
        if p.sequence_parallel { "on" } else { "off" },
        recompute.join("/")
    )
}

/// The launcher's words for a plan of `n` processes running `OUT`.
fn launch_command(
    launcher: &str,
    n: u32,
    dir: &Path,
    steps: u64,
    metrics: &Path,
) -> Result<Command> {
    let words: Vec<String> = launcher
        .split_whitespace()
        .map(|w| w.replace("{np}", &n.to_string()))
        .collect();
    let Some((program, args)) = words.split_first() else {
        bail!("--tune-launcher is empty (expected e.g. \"mpirun -np {{np}}\")");
    };
    let autopart = std::env::current_exe().context("locating the autopart binary")?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .arg(autopart)
        .arg("run")
        .arg(dir)
        .arg("--steps")
        .arg(steps.to_string())
        .arg("--metrics")
        .arg(metrics);
    Ok(cmd)
}

/// Median step time (steps after the first) and memory from a metrics file.
fn read_metrics(path: &Path) -> Result<Outcome> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut steps = Vec::new();
    let (mut peak, mut over) = (None, None);
    for (i, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a JSON metrics line", path.display(), i + 1))?;
        if let Some(s) = v.get("step_s").and_then(serde_json::Value::as_f64) {
            steps.push(s);
        }
        let max =
            |a: Option<u64>, key: &str| match (a, v.get(key).and_then(serde_json::Value::as_u64)) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
        peak = max(peak, "peak_rss_bytes");
        over = max(over, "rss_over_baseline_bytes");
    }
    if steps.is_empty() {
        bail!("{} has no step", path.display());
    }
    let mut timed: Vec<f64> = if steps.len() > 1 {
        steps[1..].to_vec()
    } else {
        steps
    };
    let step_s = crate::validate::median(&mut timed).unwrap_or(0.0);
    Ok(Outcome::Measured {
        step_s,
        peak_bytes: peak,
        over_baseline_bytes: over,
    })
}

/// Builds and runs one candidate; failures become [`Outcome::Failed`].
fn try_plan(req: &Request, plan: &Plan, dir: &Path, opts: &TuneOptions) -> Outcome {
    let mut r = pinned(req, plan);
    r.out = dir.to_owned();
    r.stop_after = None;
    let compiled = match driver::compile(&r, &mut driver::Quiet) {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(format!("compile: {e:#}")),
    };
    if compiled.built.is_none() {
        return Outcome::Failed("not built".into());
    }
    let metrics = dir.join("metrics.jsonl");
    let log = dir.join("run.log");
    let run = (|| -> Result<()> {
        let mut cmd = launch_command(&opts.launcher, plan.runtime_gpus, dir, opts.steps, &metrics)?;
        let file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let status = cmd
            .stdout(file.try_clone()?)
            .stderr(file)
            .status()
            .with_context(|| format!("starting the launcher `{}`", opts.launcher))?;
        if !status.success() {
            let tail: Vec<String> = std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .rev()
                .take(3)
                .map(str::to_owned)
                .collect();
            bail!(
                "the run failed ({status}; {}): {}",
                log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
            );
        }
        Ok(())
    })();
    match run.and_then(|()| read_metrics(&metrics)) {
        Ok(o) => o,
        Err(e) => Outcome::Failed(format!("{e:#}")),
    }
}

/// Runs `--tune`: search, try the top K, compile the measured best into
/// `req.out` (as far as `req.stop_after` says) and write OUT/tune.md.
pub fn tune(req: &Request, opts: &TuneOptions) -> Result<(Tuned, driver::Compiled)> {
    if opts.k == 0 {
        bail!("--tune must be at least 1");
    }
    if opts.steps < 2 {
        bail!("--tune-steps must be at least 2 (the first step is not timed)");
    }
    let cluster =
        load_cluster(&req.cluster).with_context(|| format!("--cluster {}", req.cluster))?;
    let tune_dir = req.out.join("tune");
    let mut search = req.clone();
    search.out = tune_dir.join("search");
    search.stop_after = Some(Pass::Plan);
    search.top_k = req.top_k.max(opts.k);
    let searched = driver::compile(&search, &mut driver::Quiet)?;
    let plans = searched
        .planned
        .map(|p| p.plans)
        .context("the search found no plan")?;
    let k = opts.k.min(plans.len());
    let mut tried = Vec::new();
    for (i, plan) in plans.into_iter().take(k).enumerate() {
        let dir = tune_dir.join(format!("plan-{}", i + 1));
        eprintln!(
            "[tune {}/{k}] {} (predicted {:.3} s/step): building and training {} steps on {} processes...",
            i + 1,
            describe(&plan),
            plan.prediction.step_s,
            opts.steps,
            plan.runtime_gpus
        );
        let outcome = try_plan(req, &plan, &dir, opts);
        match &outcome {
            Outcome::Measured { step_s, .. } => {
                eprintln!("[tune {}/{k}] measured {step_s:.3} s/step", i + 1)
            }
            Outcome::Failed(why) => eprintln!("[tune {}/{k}] failed: {why}", i + 1),
        }
        tried.push(Tried { plan, outcome });
    }
    let fits = |t: &Tried| match t.outcome {
        Outcome::Measured { peak_bytes, .. } => {
            peak_bytes.is_none_or(|p| p <= cluster.memory_bytes)
        }
        Outcome::Failed(_) => false,
    };
    let step = |t: &Tried| match t.outcome {
        Outcome::Measured { step_s, .. } => step_s,
        Outcome::Failed(_) => f64::INFINITY,
    };
    let chosen = (0..tried.len())
        .filter(|&i| fits(&tried[i]))
        .min_by(|&a, &b| step(&tried[a]).total_cmp(&step(&tried[b])))
        .context("no tried plan ran within the device's memory (see OUT/tune/plan-*/run.log)")?;
    let mut last = pinned(req, &tried[chosen].plan);
    last.top_k = req.top_k;
    let compiled = driver::compile(&last, &mut driver::Quiet)?;
    let report = render(&tried, chosen, &cluster.name, cluster.memory_bytes, opts);
    let report_path = req.out.join("tune.md");
    write_atomic(&report_path, report.as_bytes())
        .with_context(|| format!("writing {}", report_path.display()))?;
    Ok((
        Tuned {
            tried,
            chosen,
            report,
            report_path,
        },
        compiled,
    ))
}

const GIB: f64 = (1u64 << 30) as f64;

/// The report: one row per tried plan.
fn render(
    tried: &[Tried],
    chosen: usize,
    cluster: &str,
    capacity: u64,
    opts: &TuneOptions,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# `compile --tune {}`: predicted against measured\n\nCluster `{cluster}` ({:.1} GiB per device); each plan trained {} steps under `{}` (synthetic data), timed over the steps after the first.\n",
        opts.k,
        capacity as f64 / GIB,
        opts.steps,
        opts.launcher
    );
    let _ = writeln!(
        out,
        "| # | plan | predicted s/step | measured s/step | error | predicted GiB | measured GiB (over baseline / peak) | |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|---|");
    for (i, t) in tried.iter().enumerate() {
        let p = &t.plan.prediction;
        let (measured, error, memory, note) = match &t.outcome {
            Outcome::Measured {
                step_s,
                peak_bytes,
                over_baseline_bytes,
            } => {
                let gib = |b: Option<u64>| {
                    b.map_or("-".to_string(), |b| format!("{:.2}", b as f64 / GIB))
                };
                let over = peak_bytes.is_some_and(|b| b > capacity);
                (
                    format!("{step_s:.3}"),
                    format!("{:+.1}%", (p.step_s / step_s - 1.0) * 100.0),
                    format!("{} / {}", gib(*over_baseline_bytes), gib(*peak_bytes)),
                    if i == chosen {
                        "**chosen**".to_string()
                    } else if over {
                        "over the device's memory: not chosen".to_string()
                    } else {
                        String::new()
                    },
                )
            }
            Outcome::Failed(why) => (
                "-".into(),
                "-".into(),
                "-".into(),
                format!("failed: {}", why.replace('|', "/")),
            ),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {:.3} | {measured} | {error} | {:.2} | {memory} | {note} |",
            i + 1,
            describe(&t.plan),
            p.step_s,
            p.peak_mem_bytes as f64 / GIB
        );
    }
    let predicted_best = 0;
    let _ = writeln!(
        out,
        "\nThe cost model ranked plan 1 first; the machine chose plan {}{}.",
        chosen + 1,
        if chosen == predicted_best {
            " (the same)".to_string()
        } else {
            match (&tried[predicted_best].outcome, &tried[chosen].outcome) {
                (Outcome::Measured { step_s: a, .. }, Outcome::Measured { step_s: b, .. }) => {
                    format!(
                        ", {:.1}% faster than plan 1 measured",
                        (a / b - 1.0) * 100.0
                    )
                }
                _ => String::new(),
            }
        }
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_median_skips_the_first_step() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("m.jsonl");
        std::fs::write(
            &path,
            "{\"step\":1,\"step_s\":9.0,\"peak_rss_bytes\":10,\"rss_over_baseline_bytes\":4}\n\
             {\"step\":2,\"step_s\":2.0,\"peak_rss_bytes\":12,\"rss_over_baseline_bytes\":5}\n\
             {\"step\":3,\"step_s\":4.0,\"peak_rss_bytes\":11,\"rss_over_baseline_bytes\":6}\n",
        )
        .expect("write");
        match read_metrics(&path).expect("reads") {
            Outcome::Measured {
                step_s,
                peak_bytes,
                over_baseline_bytes,
            } => {
                assert_eq!(step_s, 3.0);
                assert_eq!(peak_bytes, Some(12));
                assert_eq!(over_baseline_bytes, Some(6));
            }
            Outcome::Failed(w) => panic!("{w}"),
        }
        std::fs::write(&path, "not json\n").expect("write");
        let err = format!("{:#}", read_metrics(&path).expect_err("an error"));
        assert!(err.contains("m.jsonl:1"), "{err}");
    }

    #[test]
    fn launcher_words_take_the_process_count() {
        let cmd = launch_command(
            "mpirun --oversubscribe -np {np}",
            4,
            Path::new("o"),
            3,
            Path::new("m"),
        )
        .expect("command");
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(cmd.get_program(), "mpirun");
        assert_eq!(&args[..3], ["--oversubscribe", "-np", "4"]);
        assert_eq!(&args[4..], ["run", "o", "--steps", "3", "--metrics", "m"]);
        assert!(launch_command("  ", 2, Path::new("o"), 3, Path::new("m")).is_err());
    }
}
