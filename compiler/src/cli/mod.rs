//! The `autopart` command line: clap subcommands that call library functions.
//!
//! Everything that reaches stdout is produced here; the library logs through
//! `tracing` (to stderr, filtered by `RUST_LOG`).
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

mod build;

use crate::anno::{Registry, builtin_registry};
use crate::cost::load_cluster;
use crate::ir::DType;
use crate::plan::{
    Plan, Recompute, Schedule, render_alternatives, render_report, render_summary, validate_plan,
    write_plan,
};
use crate::search::to_plan::{PlanContext, to_plan};
use crate::search::{Constraints, SearchInput, search};
use crate::trace::{Summary, TraceOptions, load_model, trace_model};

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
    /// Compare the cost model with published runs (predicted vs measured TFLOP/s).
    Validate(ValidateArgs),
    /// Run a compiled plan: `mpirun -np N autopart run OUT [--steps N] [--data FILE] ...`
    /// (the flags after OUT go to the plan binary; `autopart run OUT --help` lists them).
    Run(RunArgs),
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
    /// A runs file in the format of shared/data/published_runs.csv.
    #[arg(long)]
    runs: PathBuf,
    /// Only evaluate the published configurations (no free search): quicker
    /// calibration runs.
    #[arg(long)]
    skip_free_search: bool,
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
    /// Parameter and activation dtype.
    #[arg(long, default_value = "bf16", value_parser = parse_dtype)]
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
    /// Parameter and activation dtype.
    #[arg(long, default_value = "bf16", value_parser = parse_dtype)]
    dtype: DType,
    /// Output folder for plan.ron and report.md.
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
    zero: Option<u8>,
    /// Sequence parallelism: true or false.
    #[arg(long)]
    sp: Option<bool>,
    /// Print the lowered program (every block, adapter and segment).
    #[arg(long)]
    dump_program: bool,
    /// Lower the plan as it is, without the egg collective rewrites.
    #[arg(long)]
    no_rewrite: bool,
    /// Generate the crate in OUT/gencode but do not build it.
    #[arg(long)]
    no_build: bool,
    /// Cargo profile of the plan binary: release or dev.
    #[arg(long, default_value = "release", value_parser = ["release", "dev"])]
    build_profile: String,
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    match s {
        "bf16" => Ok(DType::Bf16),
        "fp16" | "f16" => Ok(DType::F16),
        "fp32" | "f32" => Ok(DType::F32),
        other => Err(format!(
            "unknown dtype '{other}' (expected bf16, fp16 or fp32)"
        )),
    }
}

/// The registry of built-in ops plus the user's annotation files.
fn registry(files: &[PathBuf]) -> Result<Registry> {
    let mut registry = builtin_registry();
    for file in files {
        registry
            .load_file(file)
            .with_context(|| format!("loading annotation file {}", file.display()))?;
    }
    Ok(registry)
}

fn trace(args: &TraceArgs) -> Result<()> {
    let registry = registry(&args.model.annotations)?;
    let mut model = load_model(&args.model.model)
        .with_context(|| format!("loading model '{}'", args.model.model))?;
    if let Some(op) = &args.model.loss {
        model.set_loss_op(op).map_err(anyhow::Error::msg)?;
    }
    let options = TraceOptions {
        batch: args.model.batch,
        seq_len: args.model.seq_len,
        dtype: args.model.dtype,
    };
    let graph = trace_model(&model, &options, &registry)
        .with_context(|| format!("tracing {}", model.name()))?;
    let summary = Summary::new(&graph, model.family(), &registry)
        .with_context(|| format!("summarising {}", model.name()))?;
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

fn compile(args: &CompileArgs) -> Result<()> {
    let registry = registry(&args.annotations)?;
    let mut model =
        load_model(&args.model).with_context(|| format!("loading model '{}'", args.model))?;
    if let Some(op) = &args.loss {
        model.set_loss_op(op).map_err(anyhow::Error::msg)?;
    }
    let cluster = load_cluster(&args.cluster)
        .with_context(|| format!("loading cluster '{}'", args.cluster))?;
    let seq_len = args.seq_len.unwrap_or_else(|| model.default_seq_len());
    let runtime = args.runtime_ngpus.unwrap_or(args.plan_ngpus);
    let global_batch = match args.global_batch {
        Some(g) => g,
        None => {
            let per_gpu = (1u64 << 21).div_ceil(seq_len * u64::from(runtime.max(1)));
            per_gpu.max(1) * u64::from(runtime.max(1))
        }
    };
    let mut constraints = match &args.constraints {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading constraints file {}", path.display()))?;
            ron::Options::default()
                .from_str::<Constraints>(&text)
                .map_err(|e| {
                    anyhow::anyhow!(
                        "{}:{}:{}: {}",
                        path.display(),
                        e.span.start.line,
                        e.span.start.col,
                        e.code
                    )
                })?
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

    let options = TraceOptions {
        batch: 1,
        seq_len: Some(seq_len),
        dtype: args.dtype,
    };
    let graph = trace_model(&model, &options, &registry)
        .with_context(|| format!("tracing {}", model.name()))?;
    let summary = Summary::new(&graph, model.family(), &registry)?;
    let tied = tied_consumers(&graph);
    let replicated_ties = tie_constraints(&tied, &mut constraints)?;
    let mut input = SearchInput {
        graph: &graph,
        registry: &registry,
        model: &model,
        cluster: &cluster,
        plan_gpus: args.plan_ngpus,
        runtime_gpus: runtime,
        global_batch,
        constraints: &constraints,
        top_k: args.top.max(1),
    };
    let started = std::time::Instant::now();
    let result = match search(&input) {
        // Tied weights split along the vocab on both ends where the vocab
        // divides; replicated on both ends where it does not.
        Err(crate::search::SearchError::Constraint(msg)) if !tied.is_empty() => {
            tracing::info!(%msg, "tied weights: vocab-parallel split not legal, replicating them");
            input.constraints = &replicated_ties;
            search(&input)
        }
        other => other,
    }
    .context("searching a plan")?;
    let elapsed = started.elapsed().as_secs_f64();
    tracing::info!(
        evaluated = result.evaluated,
        sharding_solves = result.sharding_solves,
        seconds = elapsed,
        "search finished"
    );
    let annotation_files: Vec<String> = args
        .annotations
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let ctx = PlanContext {
        graph: &graph,
        model_spec: &args.model,
        family: model.family(),
        annotation_files,
        loss_op: model.loss_op().map(str::to_string),
        cluster: &args.cluster,
        seq_len,
        dtype: args.dtype,
        plan_gpus: args.plan_ngpus,
        runtime_gpus: runtime,
        global_batch,
        flops_per_token: summary.flops_per_token,
        peak_flops_per_s: cluster.peak_flops_per_s.for_dtype(args.dtype),
    };
    let plans: Vec<Plan> = result.plans.iter().map(|c| to_plan(&ctx, c)).collect();
    let best = &plans[0];
    validate_plan(best, &graph, None).context("checking the chosen plan")?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let plan_path = args.out.join("plan.ron");
    write_plan(best, &plan_path).with_context(|| format!("writing {}", plan_path.display()))?;
    let mut report = render_report(best);
    report.push_str("\n## Alternatives (fastest first)\n\n```text\n");
    report.push_str(&render_alternatives(&plans));
    report.push_str("```\n");
    let report_path = args.out.join("report.md");
    write_atomic(&report_path, report.as_bytes())
        .with_context(|| format!("writing {}", report_path.display()))?;
    let mut program = lower_plan(best, &model, &registry, &cluster)?;
    let rewrite_path = args.out.join("rewrite.txt");
    let rewrite_report = if args.no_rewrite {
        None
    } else {
        let cost = crate::lower::AdapterCost {
            cluster: &cluster,
            group: crate::cost::Group::placed(&cluster, best.mesh.tp, 1),
        };
        let (rewritten, report) =
            crate::rewrite::rewrite(&program, &cost, &crate::rewrite::Limits::default())
                .context("rewriting the lowered program's collectives")?;
        write_atomic(&rewrite_path, report.to_string().as_bytes())
            .with_context(|| format!("writing {}", rewrite_path.display()))?;
        program = rewritten;
        Some(report)
    };
    let program_path = args.out.join("program.txt");
    write_atomic(&program_path, program.to_string().as_bytes())
        .with_context(|| format!("writing {}", program_path.display()))?;
    if args.dump_program {
        print!("{program}");
    }
    let gencode = args.out.join("gencode");
    let home = build::autopart_home()?;
    // The generated files name the plan.ron just written.
    let plan_ron =
        std::fs::read(&plan_path).with_context(|| format!("reading {}", plan_path.display()))?;
    let options = crate::codegen::CodegenOptions {
        plan_hash: crate::codegen::plan_hash(&plan_ron),
        runtime_path: home.join("runtime"),
        custom_ops: custom_op_impls(&registry, &program)?,
    };
    let package = crate::codegen::write_crate(&program, &options, &gencode)
        .context("generating the plan's code")?;
    let binary = if args.no_build {
        None
    } else {
        Some(build::build_plan_binary(
            &home,
            &gencode,
            &package,
            &args.out,
            &args.build_profile,
        )?)
    };
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
            "search_s": elapsed,
            "plan": plan_path.display().to_string(),
            "program": program_path.display().to_string(),
            "gencode": gencode.display().to_string(),
            "binary": binary.as_ref().map(|b| b.display().to_string()),
            "alternatives": plans.iter().skip(1).map(|q| serde_json::json!({
                "tp": q.mesh.tp, "pp": q.mesh.pp, "dp": q.mesh.dp,
                "micro_batch": q.micro_batch, "schedule": q.schedule.to_string(),
                "zero": q.zero, "sequence_parallel": q.sequence_parallel,
                "predicted_step_s": q.prediction.step_s,
            })).collect::<Vec<_>>(),
        });
        println!("{value}");
    } else {
        print!("{}", render_summary(best));
        println!("\nalternatives (fastest first):");
        print!("{}", render_alternatives(&plans));
        println!(
            "\nsearched {} configurations ({} sharding problems solved with z3) in {:.2} s",
            result.evaluated, result.sharding_solves, elapsed
        );
        println!(
            "wrote {}, {}, {} and the crate {}",
            plan_path.display(),
            report_path.display(),
            program_path.display(),
            gencode.display()
        );
        if let Some(report) = &rewrite_report {
            print!("\n{report}");
        }
        match &binary {
            Some(b) => println!(
                "built {}: run it with `mpirun -np {} autopart run {}`",
                b.display(),
                best.runtime_gpus,
                args.out.display()
            ),
            None => println!("not built (--no-build)"),
        }
    }
    Ok(())
}

/// Parameters read by more than one op (tied weights), each with its
/// consumers' plan patterns and the annotation identifier of the
/// parameter's first dim in each (the vocab, for tied embeddings).
fn tied_consumers(graph: &crate::ir::Graph) -> Vec<(String, Vec<(String, Option<String>)>)> {
    use crate::anno::{Dim, Factor, Shape};
    let mut out = Vec::new();
    for (t, tensor) in graph.parameters() {
        let consumers = graph.consumers(t);
        if consumers.len() < 2 {
            continue;
        }
        let uses = consumers
            .iter()
            .map(|&o| {
                let op = graph.op(o);
                let first_dim = op
                    .inputs
                    .iter()
                    .position(|&i| i == t)
                    .and_then(|i| op.annotation.inputs.get(i))
                    .and_then(|shape| match shape {
                        Shape::Tensor(dims) => match dims.first() {
                            Some(Dim::Single(Factor::Named { name, .. })) => Some(name.clone()),
                            Some(Dim::Group(fs)) => match fs.first() {
                                Some(Factor::Named { name, .. }) => Some(name.clone()),
                                _ => None,
                            },
                            _ => None,
                        },
                        Shape::Opaque => None,
                    });
                (crate::plan::layer_pattern(&op.name, op.layer), first_dim)
            })
            .collect();
        out.push((tensor.name.clone(), uses));
    }
    out
}

/// Constraints for tied weights: every op reading a tied parameter must
/// read it in the same layout, and (until the runtime exchanges tied
/// gradients between stages) on one pipeline stage. Pins the consumers'
/// splits to the parameter's first dim (vocab-parallel on both ends, as
/// Megatron does) in `constraints`, and returns the alternative pinning
/// every consumer replicated.
fn tie_constraints(
    tied: &[(String, Vec<(String, Option<String>)>)],
    constraints: &mut Constraints,
) -> Result<Constraints> {
    let mut replicated = constraints.clone();
    if tied.is_empty() {
        return Ok(replicated);
    }
    let names: Vec<&str> = tied.iter().map(|(n, _)| n.as_str()).collect();
    match constraints.pp {
        Some(pp) if pp > 1 => anyhow::bail!(
            "{} tied between ops; tied weights need pp=1 for now (the runtime does not exchange their gradients between pipeline stages), got --pp {pp}",
            names.join(", ")
        ),
        _ => {
            constraints.pp = Some(1);
            replicated.pp = Some(1);
        }
    }
    for (_, uses) in tied {
        if uses
            .iter()
            .any(|(op, _)| constraints.splits.contains_key(op))
        {
            // The user pinned them: their choice stands.
            continue;
        }
        for (op, first_dim) in uses {
            constraints.splits.insert(op.clone(), first_dim.clone());
            replicated.splits.insert(op.clone(), None);
        }
    }
    Ok(replicated)
}

/// Where the generated code finds each custom op of `program`: its crate
/// (resolved against the annotation file that registered it), function and
/// attributes.
fn custom_op_impls(
    registry: &Registry,
    program: &crate::lower::ExecProgram,
) -> Result<std::collections::BTreeMap<String, crate::codegen::CustomOpImpl>> {
    let mut out = std::collections::BTreeMap::new();
    for block in program.blocks() {
        for op in block.ops() {
            let crate::ir::OpKind::Custom(name) = &op.kind else {
                continue;
            };
            let sig = registry
                .get(name)
                .with_context(|| format!("custom op '{name}' is not registered"))?;
            let imp = sig.implementation.as_ref().with_context(|| {
                format!(
                    "custom op '{name}' has no implementation in its annotation file: add `implementation: Some((crate: ..., path: ..., crate_path: ...))`"
                )
            })?;
            let crate_dir = match &imp.crate_path {
                Some(dir) => {
                    let file = registry
                        .source(name)
                        .map(|l| PathBuf::from(&l.file))
                        .unwrap_or_default();
                    let base = file.parent().unwrap_or(std::path::Path::new("."));
                    let joined = base.join(dir);
                    Some(joined.canonicalize().with_context(|| {
                        format!(
                            "crate_path '{dir}' of custom op '{name}' ({}): no such folder",
                            joined.display()
                        )
                    })?)
                }
                None => None,
            };
            let attrs = sig.attrs.iter().cloned().collect();
            out.insert(
                name.clone(),
                crate::codegen::CustomOpImpl {
                    crate_name: imp.crate_name.clone(),
                    path: imp.path.clone(),
                    crate_dir,
                    attrs,
                },
            );
        }
    }
    Ok(out)
}

/// Lowers `plan` for `model`: traces the graph at the plan's micro-batch
/// and sequence length, then [`crate::lower::lower`].
fn lower_plan(
    plan: &Plan,
    model: &crate::trace::ModelConfig,
    registry: &Registry,
    cluster: &crate::cost::Cluster,
) -> Result<crate::lower::ExecProgram> {
    let dtype = match plan.trace.dtype.as_str() {
        "fp32" | "f32" => DType::F32,
        "fp16" | "f16" => DType::F16,
        _ => DType::Bf16,
    };
    let options = TraceOptions {
        batch: plan.micro_batch,
        seq_len: Some(plan.trace.seq_len),
        dtype,
    };
    let graph = trace_model(model, &options, registry).with_context(|| {
        format!(
            "tracing {} at micro-batch {}",
            model.name(),
            plan.micro_batch
        )
    })?;
    crate::lower::lower(&graph, plan, cluster).context("lowering the plan")
}

const GIB: f64 = (1u64 << 30) as f64;

fn validate(args: &ValidateArgs) -> Result<()> {
    let registry = builtin_registry();
    let runs = crate::validate::read_runs(&args.runs)?;
    println!(
        "{:<22} {:>5} {:>6}  {:<38} {:>9} {:>9} {:>7}  {:<38} {:>8}",
        "source",
        "line",
        "GPUs",
        "published config (as evaluated)",
        "measured",
        "predicted",
        "error",
        "free search best",
        "speed-up"
    );
    let mut errors = Vec::new();
    for (i, run) in runs.iter().enumerate() {
        eprint!(
            "\r[{}/{}] {} line {}   ",
            i + 1,
            runs.len(),
            run.source,
            run.line
        );
        let cluster = load_cluster(&run.gpu)
            .with_context(|| format!("line {}: cluster for gpu '{}'", run.line, run.gpu))?;
        match crate::validate::validate_run(run, &cluster, &registry, !args.skip_free_search) {
            Ok(r) => {
                errors.push(r.error.abs());
                println!(
                    "{:<22} {:>5} {:>6}  {:<38} {:>9.1} {:>9.1} {:>+6.1}%  {:<38} {:>7.2}x",
                    run.source,
                    run.line,
                    run.n_gpus,
                    r.fixed_desc,
                    run.measured_tflops,
                    r.predicted_tflops,
                    100.0 * r.error,
                    r.free_desc,
                    r.fixed_step_s / r.free_step_s
                );
                if !args.skip_free_search {
                    println!("{:>36}why: {}", "", r.why);
                }
            }
            Err(e) => println!(
                "{:<22} {:>5} {:>6}  error: {e}",
                run.source, run.line, run.n_gpus
            ),
        }
    }
    eprintln!();
    errors.sort_by(f64::total_cmp);
    if !errors.is_empty() {
        let median = errors[errors.len() / 2];
        let worst = errors[errors.len() - 1];
        println!(
            "\n{} runs: median |error| {:.1}%, worst {:.1}% (targets: 10%, 25%)",
            errors.len(),
            100.0 * median,
            100.0 * worst
        );
    }
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file and a rename, so an
/// existing file is never left half-written.
fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("out")
    ));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
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
        Command::Run(args) => build::run(&args.out, &args.args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
