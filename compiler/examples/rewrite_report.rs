//! Prints what `rewrite` does to Llama 3 8B under 8-way tensor parallelism
//! without sequence parallelism: collectives and bytes per block before and
//! after, and how each e-graph run stopped.
//!
//! `cargo run -p autopart --example rewrite_report [model] [tp] [seq_len] [cluster]`
//! (`DUMP_PROGRAM=1` also prints the rewritten program)

// This example exists to print its report.
#![allow(clippy::print_stdout)]

use anyhow::{Context, Result};
use autopart::anno::builtin_registry;
use autopart::cost::{Group, load_cluster};
use autopart::ir::DType;
use autopart::lower::{AdapterCost, lower};
use autopart::rewrite::{Limits, rewrite};
use autopart::search::to_plan::{PlanContext, to_plan};
use autopart::search::{Constraints, SearchInput, search};
use autopart::trace::{Summary, TraceOptions, load_model, trace_model};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let model_name = args.next().unwrap_or_else(|| "llama3-8b".into());
    let tp: u32 = args.next().map_or(Ok(8), |s| s.parse()).context("tp")?;
    let seq_len: u64 = args
        .next()
        .map_or(Ok(4096), |s| s.parse())
        .context("seq_len")?;
    let cluster_name = args.next().unwrap_or_else(|| "a100-80gb".into());
    let cluster_name = cluster_name.as_str();
    let dtype = if cluster_name == "cpu" {
        DType::F32
    } else {
        DType::Bf16
    };

    let registry = builtin_registry();
    let model = load_model(&model_name).with_context(|| format!("loading {model_name}"))?;
    let cluster = load_cluster(cluster_name).context("loading the cluster")?;
    let trace = |batch| {
        let options = TraceOptions {
            batch,
            seq_len: Some(seq_len),
            dtype,
        };
        trace_model(&model, &options, &registry).context("tracing")
    };
    let graph = trace(1)?;
    let summary = Summary::new(&graph, model.family(), &registry)?;
    let constraints = Constraints {
        tp: Some(tp),
        pp: Some(1),
        sequence_parallel: Some(false),
        ..Constraints::default()
    };
    let global_batch = u64::from(tp) * 4;
    let input = SearchInput {
        graph: &graph,
        registry: &registry,
        model: &model,
        cluster: &cluster,
        plan_gpus: tp,
        runtime_gpus: tp,
        global_batch,
        constraints: &constraints,
        top_k: 1,
    };
    let result = search(&input).context("searching a plan")?;
    let ctx = PlanContext {
        graph: &graph,
        model_spec: &model_name,
        family: model.family(),
        annotation_files: Vec::new(),
        loss_op: None,
        cluster: cluster_name,
        seq_len,
        dtype,
        plan_gpus: tp,
        runtime_gpus: tp,
        global_batch,
        flops_per_token: summary.flops_per_token,
        peak_flops_per_s: cluster.peak_flops_per_s.for_dtype(dtype),
    };
    let plan = to_plan(
        &ctx,
        result.plans.first().context("the search found no plan")?,
    );
    let graph = trace(plan.micro_batch)?;
    let program = lower(&graph, &plan, &cluster).context("lowering")?;
    let cost = AdapterCost {
        cluster: &cluster,
        group: Group::placed(&cluster, tp, 1),
    };
    let (rewritten, report) = rewrite(&program, &cost, &Limits::default())?;
    println!(
        "{model_name}, tp {tp}, no sequence parallelism, micro-batch {} x seq {seq_len}, {cluster_name}\n",
        plan.micro_batch
    );
    println!("{report}");
    if std::env::var_os("DUMP_PROGRAM").is_some() {
        println!("{rewritten}");
    }
    Ok(())
}
