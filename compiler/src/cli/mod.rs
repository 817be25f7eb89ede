//! The `autopart` command line: clap subcommands that call library functions.
//!
//! Everything that reaches stdout is produced here; the library logs through
//! `tracing` (to stderr, filtered by `RUST_LOG`).
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

mod ckpt;
mod data;
mod eval;
mod export;
mod generate;
mod launch;
mod profile;
mod run;
mod tune;

use crate::cost::load_cluster;
use crate::driver::{self, BuildProfile, Observer, Pass, Request};
use crate::plan::{DType, Recompute, Schedule, ZeroStage, render_alternatives, render_summary};
use crate::search::Constraints;

#[derive(Debug, Parser)]
#[command(
    name = "autopart",
    version,
    about = "Partition large models into parallel training plans"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Trace a model's training-step graph and summarise it.
    Trace(TraceArgs),
    /// Search the fastest parallel plan that fits and write plan.ron + report.md.
    Compile(Box<CompileArgs>),
    /// Compare the cost model with published runs (predicted vs measured tokens/s or TFLOP/s per GPU, error per hardware type).
    Validate(ValidateArgs),
    /// Run a compiled plan: `mpirun -np N autopart run OUT [--steps N] [--data FILE] ...`
    /// (the flags after OUT go to the plan binary; `autopart run OUT --help` lists them).
    Run(RunArgs),
    /// Inspect or merge checkpoints: `autopart ckpt inspect PATH`, `autopart ckpt merge
    /// DIR/step_N --out FILE.safetensors`.
    Ckpt(ckpt::CkptArgs),
    /// Prepare training data: `autopart data prepare --tokenizer tokenizer.json --input
    /// FILE... --seq-len L --out DIR` (text or JSONL; `--format instruction` for
    /// instruction / response records with a loss mask).
    Data(data::DataArgs),
    /// Evaluate weights: mean next-token loss and perplexity over a data set,
    /// as transformers computes with labels=input_ids: `autopart eval
    /// --init-from DIR --data rows.json [--json]` (one process, a plan made
    /// for it) or `mpirun -np N autopart eval OUT --init-from DIR --data FILE`.
    Eval(Box<eval::EvalArgs>),
    /// Continue a prompt with a model's weights (KV cache, greedy unless
    /// --temperature): `autopart generate --init-from DIR --prompt TEXT
    /// --max-new-tokens 32 [--json]` (or --prompt-ids 1,2,3).
    Generate(Box<generate::GenerateArgs>),
    /// Run a job and restart it when it fails: `autopart launch --max-restarts 3 --
    /// mpirun -np 8 autopart run OUT --checkpoint-dir ck --checkpoint-every 50 --resume auto`.
    Launch(launch::LaunchArgs),
    /// Measure this machine (matmuls, attention, bandwidth-bound ops, the
    /// fixed cost of an op, every collective) under the launcher and write
    /// a cluster file for `compile --cluster FILE.ron`: `mpirun -np N
    /// autopart profile --out FILE.ron [--quick]`.
    Profile(Box<profile::ProfileArgs>),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The folder `autopart compile --out` wrote (plan.ron, the plan binary).
    out: PathBuf,
    /// Flags for the plan binary: --steps, --data, --metrics, --seed, --lr, ...
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

#[derive(Debug, Args)]
struct ValidateArgs {
    /// A runs file in the format of shared/data/published_runs.csv or
    /// published_runs_h100.csv (repeatable: the error is reported per
    /// hardware type over all of them).
    #[arg(long, required = true)]
    runs: Vec<PathBuf>,
    /// Only evaluate the published configurations (no free search): quicker
    /// calibration runs.
    #[arg(long)]
    skip_free_search: bool,
    /// Also print where each published configuration's predicted step time
    /// goes (pipeline and bubble, exposed dp communication, optimizer, tp
    /// communication per micro-batch).
    #[arg(long)]
    breakdown: bool,
}

#[derive(Debug, Args)]
struct ModelArgs {
    /// A preset (llama-mini, llama2-7b, llama3-8b, llama3.1-405b, gpt2, ...)
    /// or a path to a HuggingFace config.json.
    #[arg(long)]
    model: String,
    /// Sequences per training step.
    #[arg(long, default_value_t = 1)]
    batch: u64,
    /// Tokens per sequence (default: the model's context, capped at 8192).
    #[arg(long)]
    seq_len: Option<u64>,
    /// Parameter and activation dtype: bf16, fp16 or fp32.
    #[arg(long, default_value = "bf16")]
    dtype: DType,
    /// Extra annotation files registering custom ops (repeatable).
    #[arg(long = "annotations", value_name = "FILE")]
    annotations: Vec<PathBuf>,
    /// A registered op replacing the head's projection and cross-entropy
    /// (hidden, head weight, labels -> per-token loss), e.g. chunked_ce.
    #[arg(long, value_name = "OP")]
    loss: Option<String>,
}

#[derive(Debug, Args)]
struct TraceArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Print one JSON object instead of the readable summary.
    #[arg(long)]
    json: bool,
    /// Print the traced graph in its text form.
    #[arg(long)]
    dump_graph: bool,
}

#[derive(Debug, Args)]
struct CompileArgs {
    /// A preset or a path to a HuggingFace config.json.
    #[arg(long)]
    model: String,
    /// GPUs one copy of the plan spans.
    #[arg(long)]
    plan_ngpus: u32,
    /// GPUs at run time: a multiple of --plan-ngpus (the plan is replicated
    /// with data parallelism). Default: --plan-ngpus.
    #[arg(long)]
    runtime_ngpus: Option<u32>,
    /// Cluster preset (a100-80gb, h100, h200, mi300x, trn1, cpu) or a RON file.
    #[arg(long, default_value = "a100-80gb")]
    cluster: String,
    /// Tokens per sequence (default: the model's context, capped at 8192).
    #[arg(long)]
    seq_len: Option<u64>,
    /// Sequences per optimizer step over all runtime GPUs (default: about
    /// 2M tokens, a multiple of the runtime GPUs).
    #[arg(long)]
    global_batch: Option<u64>,
    /// Parameter and activation dtype: bf16, fp16 or fp32.
    #[arg(long, default_value = "bf16")]
    dtype: DType,
    /// Output folder for plan.ron, report.md, program.txt, rewrite.txt,
    /// gencode/ and the plan binary.
    #[arg(long, default_value = "out")]
    out: PathBuf,
    /// How many alternatives to list.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Print one JSON object instead of the readable summary.
    #[arg(long)]
    json: bool,
    /// Extra annotation files registering custom ops (repeatable).
    #[arg(long = "annotations", value_name = "FILE")]
    annotations: Vec<PathBuf>,
    /// A registered op replacing the head's projection and cross-entropy
    /// (hidden, head weight, labels -> per-token loss), e.g. chunked_ce.
    #[arg(long, value_name = "OP")]
    loss: Option<String>,
    /// A RON constraints file (fields as the flags below, plus `splits`).
    #[arg(long)]
    constraints: Option<PathBuf>,
    #[arg(long)]
    tp: Option<u32>,
    #[arg(long)]
    pp: Option<u32>,
    #[arg(long)]
    dp: Option<u32>,
    #[arg(long)]
    micro_batch: Option<u64>,
    /// gpipe, 1f1b or interleaved-V.
    #[arg(long)]
    schedule: Option<Schedule>,
    /// none, selective or full (every stage).
    #[arg(long)]
    recompute: Option<Recompute>,
    /// ZeRO stage 0-3.
    #[arg(long)]
    zero: Option<ZeroStage>,
    /// Sequence parallelism: true or false.
    #[arg(long)]
    sp: Option<bool>,
    /// The dtype gradients are summed in over dp: fp32 (the default, as
    /// Megatron does for bf16) or bf16 (half the bytes).
    #[arg(long, value_name = "fp32|bf16")]
    reduce_dtype: Option<DType>,
    /// Print the program the crate is generated from (every block, adapter
    /// and segment, after the rewrite), as program.txt holds it.
    #[arg(long)]
    dump_program: bool,
    /// Print the hand-off of a pass once it ran and verified (repeatable):
    /// trace, ties, custom-ops, search, plan, lower, rewrite, codegen, build.
    #[arg(long, value_name = "PASS")]
    dump_after: Vec<Pass>,
    /// Stop after a pass (the files of the passes that ran are written);
    /// --no-build is --stop-after codegen.
    #[arg(long, value_name = "PASS")]
    stop_after: Option<Pass>,
    /// Lower the plan as it is, without the egg collective rewrites.
    #[arg(long)]
    no_rewrite: bool,
    /// Let the rewrite also try a replicated residual stream split on the
    /// sequence dim (sequence parallelism derived by the e-graph). Off by
    /// default: sequence parallelism is the search's choice (--sp); either
    /// way the plan is priced as its rewritten program runs.
    #[arg(long, conflicts_with = "no_rewrite")]
    rewrite_stream: bool,
    /// Generate the crate in OUT/gencode but do not build it.
    #[arg(long)]
    no_build: bool,
    /// Cargo profile of the plan binary: release or dev
    /// ($AUTOPART_BUILD_PROFILE sets the default).
    #[arg(long, env = "AUTOPART_BUILD_PROFILE", default_value = "release")]
    build_profile: BuildProfile,
    /// Build the K best predicted plans, train each a few steps under
    /// --tune-launcher, and compile the one that measured fastest within
    /// the device's memory; OUT/tune.md reports predicted against measured.
    #[arg(long, value_name = "K")]
    tune: Option<usize>,
    /// Steps each tuned plan trains (the first is not timed).
    #[arg(long, value_name = "N", default_value_t = 3, requires = "tune")]
    tune_steps: u64,
    /// The launcher of the tuning runs; {np} is the plan's process count.
    #[arg(
        long,
        value_name = "COMMAND",
        default_value = "mpirun -np {np}",
        requires = "tune"
    )]
    tune_launcher: String,
}

fn trace(args: &TraceArgs) -> Result<()> {
    let m = &args.model;
    let registry = driver::registry(&m.annotations)?;
    let model = driver::model(&m.model, m.loss.as_deref())?;
    let driver::Traced { graph, summary } =
        driver::trace_at(&model, &registry, m.batch, m.seq_len, m.dtype)?;
    if args.json {
        let mut value = serde_json::to_value(&summary)?;
        if args.dump_graph {
            value["graph"] = serde_json::Value::String(graph.to_string());
        }
        println!("{value}");
    } else {
        if args.dump_graph {
            println!("{graph}");
        }
        print!("{summary}");
    }
    Ok(())
}

/// Reads the constraints file (if any) and lays the dimension flags over it.
fn constraints(args: &CompileArgs) -> Result<Constraints> {
    let mut constraints = match &args.constraints {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading constraints file {}", path.display()))?;
            Constraints::from_ron_str(&text, &path.display().to_string())
                .map_err(anyhow::Error::msg)?
        }
        None => Constraints::default(),
    };
    macro_rules! flag {
        ($field:ident, $value:expr) => {
            if let Some(v) = $value {
                constraints.$field = Some(v);
            }
        };
    }
    flag!(tp, args.tp);
    flag!(pp, args.pp);
    flag!(dp, args.dp);
    flag!(micro_batch, args.micro_batch);
    flag!(schedule, args.schedule);
    flag!(recompute, args.recompute);
    flag!(zero, args.zero);
    flag!(sequence_parallel, args.sp);
    flag!(reduce_dtype, args.reduce_dtype);
    Ok(constraints)
}

/// Prints the hand-offs `--dump-after` names (to stderr under `--json`, so
/// that stdout stays one JSON object).
struct Dumps<'a> {
    passes: &'a [Pass],
    to_stderr: bool,
}

impl Observer for Dumps<'_> {
    fn after(&mut self, pass: Pass, handoff: &dyn std::fmt::Display, _: std::time::Duration) {
        if self.passes.contains(&pass) {
            let text = format!("===== after {pass} =====\n{handoff}");
            if self.to_stderr {
                eprint!("{text}");
            } else {
                print!("{text}");
            }
        }
    }
}

fn compile(args: &CompileArgs) -> Result<()> {
    let dump = args.dump_after.clone();
    let stop_after = match (args.stop_after, args.no_build) {
        (Some(p), true) => Some(p.min(Pass::Codegen)),
        (Some(p), false) => Some(p),
        (None, true) => Some(Pass::Codegen),
        (None, false) => None,
    };
    let req = Request {
        model: args.model.clone(),
        loss: args.loss.clone(),
        annotations: args.annotations.clone(),
        cluster: args.cluster.clone(),
        plan_gpus: args.plan_ngpus,
        runtime_gpus: args.runtime_ngpus,
        seq_len: args.seq_len,
        global_batch: args.global_batch,
        dtype: args.dtype,
        constraints: constraints(args)?,
        top_k: args.top.max(1),
        rewrite: !args.no_rewrite,
        rewrite_stream: args.rewrite_stream,
        out: args.out.clone(),
        stop_after,
        build_profile: args.build_profile,
    };
    let mut dumps = Dumps {
        passes: &dump,
        to_stderr: args.json,
    };
    let done = match args.tune {
        Some(k) => {
            let opts = tune::TuneOptions {
                k,
                steps: args.tune_steps,
                launcher: args.tune_launcher.clone(),
            };
            let (tuned, done) = tune::tune(&req, &opts)?;
            if !args.json {
                println!("{}", tuned.report);
                println!(
                    "wrote {}; compiling plan {} of the {} tried into {}\n",
                    tuned.report_path.display(),
                    tuned.chosen + 1,
                    tuned.tried.len(),
                    args.out.display()
                );
            }
            done
        }
        None => driver::compile(&req, &mut dumps)?,
    };
    let (Some(searched), Some(planned)) = (&done.searched, &done.planned) else {
        // Stopped before the plan: the dumps were the output.
        return Ok(());
    };
    let best = planned.best();
    let plans = &planned.plans;
    let paths = &done.paths;
    let binary = done.built.as_ref().map(|b| b.binary.clone());
    if args.json {
        let p = &best.prediction;
        let value = serde_json::json!({
            "tp": best.mesh.tp,
            "pp": best.mesh.pp,
            "dp": best.mesh.dp,
            "micro_batch": best.micro_batch,
            "n_micro_batches": best.n_micro_batches,
            "global_batch": best.global_batch,
            "schedule": best.schedule.to_string(),
            "recompute": best.stages.iter().map(|s| s.recompute.to_string()).collect::<Vec<_>>(),
            "zero": best.zero,
            "sequence_parallel": best.sequence_parallel,
            "predicted_step_s": p.step_s,
            "predicted_tokens_per_s": p.tokens_per_s,
            "predicted_mfu": p.mfu,
            "peak_mem_gib": p.peak_mem_bytes as f64 / GIB,
            "capacity_gib": p.capacity_bytes as f64 / GIB,
            "search_s": searched.seconds,
            "plan": paths.plan.display().to_string(),
            "program": (done.rewritten.is_some() || done.lowered.is_some())
                .then(|| paths.program.display().to_string()),
            "gencode": done.generated.as_ref().map(|_| paths.gencode.display().to_string()),
            "binary": binary.as_ref().map(|b| b.display().to_string()),
            "alternatives": plans.iter().skip(1).map(|q| serde_json::json!({
                "tp": q.mesh.tp, "pp": q.mesh.pp, "dp": q.mesh.dp,
                "micro_batch": q.micro_batch, "schedule": q.schedule.to_string(),
                "zero": q.zero, "sequence_parallel": q.sequence_parallel,
                "predicted_step_s": q.prediction.step_s,
            })).collect::<Vec<_>>(),
        });
        println!("{value}");
        return Ok(());
    }
    if args.dump_program {
        if let Some(r) = &done.rewritten {
            print!("{}", r.program);
        } else if let Some(p) = &done.lowered {
            print!("{p}");
        }
    }
    print!("{}", render_summary(best));
    println!("\nalternatives (fastest first):");
    print!("{}", render_alternatives(plans));
    println!(
        "\nsearched {} configurations ({} sharding problems solved exactly) in {:.2} s",
        searched.result.evaluated, searched.result.sharding_solves, searched.seconds
    );
    let mut wrote = vec![
        paths.plan.display().to_string(),
        paths.report.display().to_string(),
    ];
    if done.rewritten.is_some() || done.lowered.is_some() {
        wrote.push(paths.program.display().to_string());
    }
    if done.generated.is_some() {
        wrote.push(format!("the crate {}", paths.gencode.display()));
    }
    println!("wrote {}", wrote.join(", "));
    if let Some(report) = done.rewritten.as_ref().and_then(|r| r.report.as_ref()) {
        print!("\n{report}");
    }
    match &binary {
        Some(b) => println!(
            "built {}: run it with `mpirun -np {} autopart run {}`",
            b.display(),
            best.runtime_gpus,
            args.out.display()
        ),
        None => println!(
            "not built (stopped after {})",
            stop_after.map_or("codegen".to_string(), |p| p.to_string())
        ),
    }
    Ok(())
}

const GIB: f64 = (1u64 << 30) as f64;

fn validate(args: &ValidateArgs) -> Result<()> {
    let registry = crate::anno::builtin_registry();
    let mut runs = Vec::new();
    for path in &args.runs {
        runs.extend(crate::validate::read_runs(path)?);
    }
    println!(
        "{:<24} {:>5} {:>6}  {:<38} {:>9} {:>9} {:<7} {:>7}  {:<38} {:>8}",
        "source",
        "line",
        "GPUs",
        "published config (as evaluated)",
        "measured",
        "predicted",
        "unit",
        "error",
        "free search best",
        "speed-up"
    );
    // Per hardware type, in the order first seen: |error| of each run.
    let mut errors: Vec<(String, Vec<f64>)> = Vec::new();
    for (i, run) in runs.iter().enumerate() {
        eprint!(
            "\r[{}/{}] {} line {}   ",
            i + 1,
            runs.len(),
            run.source,
            run.line
        );
        let cluster = load_cluster(crate::validate::cluster_preset(&run.gpu))
            .with_context(|| format!("line {}: cluster for gpu '{}'", run.line, run.gpu))?;
        let source: String = run.source.chars().take(24).collect();
        match crate::validate::validate_run(run, &cluster, &registry, !args.skip_free_search) {
            Ok(r) => {
                match errors.iter_mut().find(|(g, _)| *g == run.gpu) {
                    Some((_, e)) => e.push(r.error.abs()),
                    None => errors.push((run.gpu.clone(), vec![r.error.abs()])),
                }
                println!(
                    "{:<24} {:>5} {:>6}  {:<38} {:>9.1} {:>9.1} {:<7} {:>+6.1}%  {:<38} {:>7.2}x",
                    source,
                    run.line,
                    run.n_gpus,
                    r.fixed_desc,
                    run.measured.value(),
                    r.predicted,
                    run.measured.unit(),
                    100.0 * r.error,
                    r.free_desc,
                    r.fixed_step_s / r.free_step_s
                );
                if let Some(a) = &run.approximation {
                    println!("{:>38}approximated: {a}", "");
                }
                if args.breakdown {
                    println!("{:>38}{}", "", r.breakdown);
                }
                if !args.skip_free_search {
                    println!("{:>38}why: {}", "", r.why);
                }
            }
            Err(e) => println!(
                "{:<24} {:>5} {:>6}  error: {e}",
                source, run.line, run.n_gpus
            ),
        }
    }
    eprintln!();
    println!();
    for (gpu, mut e) in errors {
        let median = crate::validate::median(&mut e).unwrap_or(0.0);
        println!(
            "{gpu}: {} runs: median |error| {:.1}%, worst {:.1}% (targets: 10%, 25%)",
            e.len(),
            100.0 * median,
            100.0 * e.last().copied().unwrap_or(0.0)
        );
    }
    Ok(())
}

/// Entry point of the `autopart` binary.
pub fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Trace(args) => trace(args),
        Command::Compile(args) => compile(args),
        Command::Validate(args) => validate(args),
        Command::Run(args) => run::run(&args.out, &args.args),
        Command::Ckpt(args) => ckpt::ckpt(args),
        Command::Data(args) => data::data(args),
        Command::Launch(args) => launch::launch(args),
        Command::Profile(args) => profile::profile(args),
        Command::Eval(args) => eval::eval(args),
        Command::Generate(args) => generate::generate(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
