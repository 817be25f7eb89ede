//! The `autopart` command line: clap subcommands that call library functions.
//!
//! Everything that reaches stdout is produced here; the library logs through
//! `tracing` (to stderr, filtered by `RUST_LOG`).
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::anno::{Registry, builtin_registry};
use crate::ir::DType;
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
    let model = load_model(&args.model.model)
        .with_context(|| format!("loading model '{}'", args.model.model))?;
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
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
