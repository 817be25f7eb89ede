//! Prints what `rewrite` does to Llama 3 8B under 8-way tensor parallelism
//! without sequence parallelism: collectives and bytes per block before and
//! after, and how each e-graph run stopped.
//!
//! `cargo run -p autopart --example rewrite_report [model] [tp] [seq_len] [cluster]`
//! (`DUMP_PROGRAM=1` also prints the rewritten program)

// This example exists to print its report.
#![allow(clippy::print_stdout)]

use anyhow::{Context, Result};
use autopart::driver::{self, Pass, Request};
use autopart::plan::DType;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let model_name = args.next().unwrap_or_else(|| "llama3-8b".into());
    let tp: u32 = args.next().map_or(Ok(8), |s| s.parse()).context("tp")?;
    let seq_len: u64 = args
        .next()
        .map_or(Ok(4096), |s| s.parse())
        .context("seq_len")?;
    let cluster_name = args.next().unwrap_or_else(|| "a100-80gb".into());

    // The compile driver up to the rewrite, in a scratch folder.
    let scratch =
        std::env::temp_dir().join(format!("autopart-rewrite-report-{}", std::process::id()));
    let mut req = Request::new(&model_name, tp);
    req.dtype = if cluster_name == "cpu" {
        DType::Fp32
    } else {
        DType::Bf16
    };
    req.cluster = cluster_name.clone();
    req.seq_len = Some(seq_len);
    req.global_batch = Some(u64::from(tp) * 4);
    req.constraints.tp = Some(tp);
    req.constraints.pp = Some(1);
    req.constraints.sequence_parallel = Some(false);
    // The stream free to move (`--rewrite-stream`): the report shows
    // sequence parallelism derived from the plain tp plan.
    req.rewrite_stream = true;
    req.top_k = 1;
    req.out = scratch.clone();
    req.stop_after = Some(Pass::Rewrite);
    let done = driver::compile(&req, &mut driver::Quiet);
    let _ = std::fs::remove_dir_all(&scratch);
    let done = done?;
    let plan = done.planned.as_ref().context("planned")?.best();
    let rewritten = done.rewritten.as_ref().context("rewritten")?;
    println!(
        "{model_name}, tp {tp}, no sequence parallelism, micro-batch {} x seq {seq_len}, {cluster_name}\n",
        plan.micro_batch
    );
    if let Some(report) = &rewritten.report {
        println!("{report}");
    }
    if std::env::var_os("DUMP_PROGRAM").is_some() {
        println!("{}", rewritten.program);
    }
    Ok(())
}
