//! `autopart launch [--max-restarts N] [--backoff SECONDS] -- LAUNCHER COMMAND...`:
//! runs a job and restarts it when it fails, as `torchrun --max-restarts`
//! and Slurm's requeue do. A job resumes where it stopped by passing
//! `--resume auto` to `autopart run` (the latest complete checkpoint, or a
//! fresh start).

use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;

/// The attempt number (0 for the first run) every attempt's environment
/// holds, like torchrun's `TORCHELASTIC_RESTART_COUNT`.
pub const RESTART_COUNT_ENV: &str = "AUTOPART_RESTART_COUNT";

#[derive(Debug, Args)]
pub struct LaunchArgs {
    /// Restart the job up to N times when it fails (a non-zero exit status
    /// or death by a signal). Exit status 2, a usage error of autopart's
    /// binaries (bad flags, a wrong process count), is not retried.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub max_restarts: u32,
    /// Seconds to wait before each restart.
    #[arg(long, value_name = "SECONDS", default_value = "5", value_parser = non_negative)]
    pub backoff: f64,
    /// The job, after `--`: a launcher and its command, e.g. `mpirun -np 8
    /// autopart run out --checkpoint-dir ck --checkpoint-every 50 --resume auto`.
    #[arg(
        last = true,
        required = true,
        num_args = 1..,
        value_name = "LAUNCHER COMMAND"
    )]
    pub command: Vec<String>,
}

fn non_negative(v: &str) -> Result<f64, String> {
    match v.parse::<f64>() {
        // A wait `Duration` holds (under 2^64 s), as `sleep` needs.
        Ok(x) if x >= 0.0 && Duration::try_from_secs_f64(x).is_ok() => Ok(x),
        _ => Err("expected a number of seconds >= 0 (and below 2^64)".into()),
    }
}

/// How an attempt ended, in words.
fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        (None, None) => status.to_string(),
    }
}

fn log(line: &str) {
    eprintln!("[autopart launch] {line}");
}

/// Runs the job until it succeeds, restarting it after each failure up to
/// `--max-restarts` times.
pub fn launch(args: &LaunchArgs) -> Result<()> {
    let (program, rest) = args
        .command
        .split_first()
        .context("no command after `--`")?;
    // In u64: `--max-restarts 4294967295` is 2^32 attempts.
    let attempts = u64::from(args.max_restarts) + 1;
    let mut last = None;
    for attempt in 0..attempts {
        log(&format!(
            "attempt {} of {attempts}: {}",
            attempt + 1,
            args.command.join(" ")
        ));
        let started = Instant::now();
        let status = Command::new(program)
            .args(rest)
            .env(RESTART_COUNT_ENV, attempt.to_string())
            .status()
            .with_context(|| format!("starting {program}"))?;
        let took = started.elapsed().as_secs_f64();
        if status.success() {
            log(&format!(
                "attempt {} succeeded after {took:.1} s",
                attempt + 1
            ));
            return Ok(());
        }
        log(&format!(
            "attempt {} failed after {took:.1} s: {}",
            attempt + 1,
            describe(status)
        ));
        if status.code() == Some(2) {
            bail!(
                "the job failed with exit status 2 (a usage error: its flags or process count are wrong); not restarting it"
            );
        }
        last = Some(status);
        if attempt + 1 < attempts {
            log(&format!(
                "restarting in {} s (restart {} of {})",
                args.backoff,
                attempt + 1,
                args.max_restarts
            ));
            std::thread::sleep(Duration::from_secs_f64(args.backoff));
        }
    }
    bail!(
        "the job failed {attempts} time{} ({} restart{}); the last attempt: {}",
        if attempts == 1 { "" } else { "s" },
        args.max_restarts,
        if args.max_restarts == 1 { "" } else { "s" },
        last.map_or_else(|| "?".into(), describe)
    )
}
