//! Runtime overhead: one training step (forward, backward, SGD; fp32, CPU)
//! of a Llama through the runtime on one rank vs the same model written
//! directly in tch.
//!
//! `cargo run --release -p autopart-runtime --example overhead -- [--threads N] [--steps N] [--warmup N] [--model NAME]`
//!
//! `--steps` is a minimum: workloads whose step is short run for about two
//! seconds per contestant. `--model` keeps the workloads whose name contains NAME.
//!
//! Before timing, each workload asserts that both give the same loss (to
//! 1e-5 relative) on two consecutive steps. Steps of the contestants are
//! interleaved so that all see the same machine noise. The table gives the
//! median step time through the runtime (`runtime`), written directly in tch
//! (`tch`) and written directly but calling the runtime's ops in one autograd
//! graph without the tape (`tch+ops`), the minimum of each, and
//! `ratio` = runtime / tch (medians). The difference splits into the ops'
//! share (`tch+ops - tch`) and the tape's (`runtime - tch+ops`).
#![allow(clippy::print_stdout)]

#[path = "../benches/common/overhead.rs"]
mod overhead;

use overhead::{DirectModel, Ops, RuntimeModel, Workload, check_same_loss};
use std::time::Instant;

struct Args {
    threads: i32,
    steps: usize,
    warmup: usize,
    model: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        threads: 1,
        steps: 20,
        warmup: 3,
        model: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} expects a number"))?;
        let bad = |_| format!("{flag} expects a number, got {value:?}");
        match flag.as_str() {
            "--threads" => args.threads = value.parse().map_err(bad)?,
            "--steps" => args.steps = value.parse().map_err(bad)?,
            "--warmup" => args.warmup = value.parse().map_err(bad)?,
            "--model" => args.model = Some(value),
            _ => {
                return Err(format!(
                    "unknown flag {flag}; expected --threads, --steps, --warmup or --model"
                ));
            }
        }
    }
    if args.steps == 0 || args.threads <= 0 || args.warmup == 0 {
        return Err("--steps, --warmup and --threads must be positive".into());
    }
    Ok(args)
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

fn timed(f: impl FnOnce() -> f64) -> f64 {
    let start = Instant::now();
    std::hint::black_box(f());
    start.elapsed().as_secs_f64() * 1e3
}

fn main() -> Result<(), String> {
    let args = parse_args()?;
    tch::set_num_threads(args.threads);
    tch::set_num_interop_threads(1);
    println!(
        "one training step (forward + backward + SGD), fp32 CPU, {} intra-op thread(s), \
         median of at least {} steps after {} warm-up",
        args.threads, args.steps, args.warmup
    );
    println!(
        "{:<12} {:>7} {:>9} | {:>23} | {:>23} | {:>23} | {:>6} | {:>8} {:>8}",
        "", "", "", "runtime ms", "tch ms", "tch+ops ms", "", "ops", "tape"
    );
    println!(
        "{:<12} {:>7} {:>9} | {:>11} {:>11} | {:>11} {:>11} | {:>11} {:>11} | {:>6} | {:>8} {:>8}",
        "model",
        "b x l",
        "params",
        "median",
        "min",
        "median",
        "min",
        "median",
        "min",
        "ratio",
        "ms",
        "ms"
    );
    for w in [
        Workload::mini(),
        Workload::mini_large_batch(),
        Workload::cpu512(),
    ] {
        let [(l0, _), (l1, _)] = check_same_loss(&w);
        let batch = w.batch();
        if args
            .model
            .as_ref()
            .is_some_and(|m| !w.name.contains(m.as_str()))
        {
            continue;
        }
        let mut rt = RuntimeModel::new(w.cfg);
        let mut direct = DirectModel::new(w.cfg, Ops::Tch);
        let mut direct_ops = DirectModel::new(w.cfg, Ops::Runtime);
        let mut warm_ms = f64::INFINITY;
        for _ in 0..args.warmup {
            warm_ms = warm_ms.min(timed(|| rt.step(&batch)));
            direct.step(&batch);
            direct_ops.step(&batch);
        }
        // Small workloads run longer than `--steps`, for a stable median on a busy machine.
        let steps = args.steps.max((2000.0 / warm_ms) as usize).min(1000);
        let mut times = [Vec::new(), Vec::new(), Vec::new()];
        for _ in 0..steps {
            times[0].push(timed(|| rt.step(&batch)));
            times[1].push(timed(|| direct.step(&batch)));
            times[2].push(timed(|| direct_ops.step(&batch)));
        }
        let mins = times
            .each_ref()
            .map(|xs| xs.iter().copied().fold(f64::INFINITY, f64::min));
        let [rt_ms, tch_ms, ops_ms] = times.each_mut().map(|xs| median(xs));
        println!(
            "{:<12} {:>7} {:>9} | {:>11.3} {:>11.3} | {:>11.3} {:>11.3} | {:>11.3} {:>11.3} | {:>6.3} | {:>8.3} {:>8.3}",
            w.name,
            format!("{}x{}", w.batch, w.seq),
            w.n_params(),
            rt_ms,
            mins[0],
            tch_ms,
            mins[1],
            ops_ms,
            mins[2],
            rt_ms / tch_ms,
            ops_ms - tch_ms,
            rt_ms - ops_ms,
        );
        println!(
            "{:<12} ({steps} steps; losses agree to 1e-5: step 0 {l0:.6}, step 1 {l1:.6})",
            ""
        );
    }
    Ok(())
}
