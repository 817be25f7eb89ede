//! Runtime overhead: one training step (forward, backward, SGD; fp32, CPU)
//! of a Llama through the runtime on one rank vs the same model written
//! directly in tch.
//!
//! `cargo run --release -p autopart-runtime --example overhead -- [--threads N] [--steps N] [--warmup N]`
//!
//! Before timing, each workload asserts that both give the same loss (to
//! 1e-5 relative) on two consecutive steps. Steps of the two contestants are
//! interleaved so that both see the same machine noise; the table gives the
//! median and minimum step time of each and the ratio of the medians.
#![allow(clippy::print_stdout)]

#[path = "../benches/common/overhead.rs"]
mod overhead;

use overhead::{DirectModel, RuntimeModel, Workload, check_same_loss};
use std::time::Instant;

struct Args {
    threads: i32,
    steps: usize,
    warmup: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        threads: 1,
        steps: 20,
        warmup: 3,
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
            _ => return Err(format!("unknown flag {flag}; expected --threads, --steps or --warmup")),
        }
    }
    if args.steps == 0 || args.threads <= 0 {
        return Err("--steps and --threads must be positive".into());
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
         median of {} steps after {} warm-up",
        args.threads, args.steps, args.warmup
    );
    println!(
        "{:<12} {:>9} {:>10} {:>10} {:>10} {:>10} {:>10} {:>7}",
        "model", "b x l", "params", "rt med ms", "rt min ms", "tch med ms", "tch min ms", "ratio"
    );
    for w in [
        Workload::mini(),
        Workload::mini_large_batch(),
        Workload::cpu512(),
    ] {
        let [(l0, _), (l1, _)] = check_same_loss(&w);
        let batch = w.batch();
        let mut rt = RuntimeModel::new(w.cfg);
        let mut direct = DirectModel::new(w.cfg);
        for _ in 0..args.warmup {
            rt.step(&batch);
            direct.step(&batch);
        }
        let (mut t_rt, mut t_direct) = (Vec::new(), Vec::new());
        for _ in 0..args.steps {
            t_rt.push(timed(|| rt.step(&batch)));
            t_direct.push(timed(|| direct.step(&batch)));
        }
        let min = |xs: &[f64]| xs.iter().copied().fold(f64::INFINITY, f64::min);
        let (min_rt, min_direct) = (min(&t_rt), min(&t_direct));
        let (med_rt, med_direct) = (median(&mut t_rt), median(&mut t_direct));
        println!(
            "{:<12} {:>9} {:>10} {:>10.3} {:>10.3} {:>10.3} {:>10.3} {:>7.3}",
            w.name,
            format!("{}x{}", w.batch, w.seq),
            w.n_params(),
            med_rt,
            min_rt,
            med_direct,
            min_direct,
            med_rt / med_direct,
        );
        println!("{:<12} (losses agree: step 0 {l0:.6}, step 1 {l1:.6})", "");
    }
    Ok(())
}
