//! Runs a test body on every rank of an `mpirun` job.
//!
//! Started by `cargo test` (no launcher around it), the binary re-launches
//! itself as `mpirun -np N <self>` and exits with the job's status. Started by
//! `mpirun` directly, it runs the body. Each rank collects failures in a
//! [`Check`]; the job fails when any rank reports a failure or no check ran.

#![allow(dead_code)]

use autopart_runtime::comm::{CommError, Communicator, MpiComm};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};

const CHILD_ENV: &str = "AUTOPART_MPI_CHILD";
const TIMEOUT: Duration = Duration::from_secs(300);

/// The custom-harness side of cargo-nextest's protocol: asked for its list
/// (`--list --format terse`), the binary names one test after itself (none
/// when only ignored tests are listed); the run itself (`NAME --exact`) then
/// proceeds as under `cargo test`. Returns the exit code when the call was
/// only a listing.
pub fn nextest_listing(name: &str) -> Option<ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--list") {
        return None;
    }
    if !args.iter().any(|a| a == "--ignored") {
        // The listing protocol is stdout itself.
        #[allow(clippy::print_stdout)]
        {
            println!("{name}: test");
        }
    }
    Some(ExitCode::SUCCESS)
}

pub fn main_under_mpirun(np: usize, body: fn(&MpiComm, &mut Check)) -> ExitCode {
    if std::env::var_os(CHILD_ENV).is_some() {
        return run_rank(body);
    }
    if launch(np, CHILD_ENV, "1", TIMEOUT) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Runs this binary as `mpirun -np {np}` with `{env}={value}` set on every
/// rank, waiting at most `timeout`; true when the job succeeded.
pub fn launch(np: usize, env: &str, value: &str, timeout: Duration) -> bool {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("cannot find own executable: {e}");
            return false;
        }
    };
    let mut child = match Command::new("mpirun")
        .args([
            "--allow-run-as-root",
            "--oversubscribe",
            "--bind-to",
            "none",
        ])
        .args(["-np", &np.to_string(), "-x", &format!("{env}={value}")])
        .arg(&exe)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env(env, value)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cannot start mpirun (is it on PATH?): {e}");
            return false;
        }
    };
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return true,
            Ok(Some(status)) => {
                eprintln!("mpirun -np {np} failed: {status}");
                return false;
            }
            Ok(None) if start.elapsed() > timeout => {
                eprintln!("mpirun -np {np} still running after {timeout:?}; killing it");
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => {
                eprintln!("waiting for mpirun: {e}");
                return false;
            }
        }
    }
}

/// Runs this binary with `args` and `{env}={value}` set, under `mpirun -np
/// {np}` or, with `np` `None`, directly (a one-process MPI world); waits at
/// most `timeout` and returns its status and output.
pub fn run_self(
    np: Option<usize>,
    (env, value): (&str, &str),
    args: &[String],
    timeout: Duration,
) -> Result<std::process::Output, String> {
    use std::io::Read;
    use std::process::Stdio;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
    let mut cmd = match np {
        Some(np) => {
            let mut c = Command::new("mpirun");
            c.args([
                "--allow-run-as-root",
                "--oversubscribe",
                "--bind-to",
                "none",
            ])
            .args(["-np", &np.to_string(), "-x", &format!("{env}={value}")])
            .arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    let mut child = cmd
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env(env, value)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    // Drained on threads so that a chatty child never blocks on a full pipe.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{cmd:?} still running after {timeout:?}; killed it"
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(format!("waiting for {cmd:?}: {e}")),
        }
    };
    Ok(std::process::Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

fn run_rank(body: fn(&MpiComm, &mut Check)) -> ExitCode {
    tch::set_num_threads(1);
    let world = match MpiComm::init_world() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("mpi init: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut check = Check::new(world.rank());
    body(&world, &mut check);
    report(world, &check)
}

/// Prints this rank's failures, sums the counts over the job, and finalises
/// MPI. The job passes when no rank failed and some check ran.
pub fn report(world: MpiComm, check: &Check) -> ExitCode {
    for f in &check.failures {
        eprintln!("rank {}: FAIL {f}", world.rank());
    }
    let counts = Tensor::from_slice(&[check.failures.len() as i64, check.passed as i64]);
    let total = match world.all_reduce(&counts) {
        Ok(t) => Vec::<i64>::try_from(&t.to_kind(Kind::Int64)).unwrap_or_default(),
        Err(e) => {
            eprintln!("rank {}: summing results: {e}", world.rank());
            return ExitCode::FAILURE;
        }
    };
    let (failed, passed) = (total.first().copied(), total.get(1).copied());
    if world.rank() == 0 {
        eprintln!(
            "{} ranks: {} checks passed, {} failed",
            world.size(),
            passed.unwrap_or(0),
            failed.unwrap_or(-1)
        );
    }
    drop(world); // finalises MPI before exiting
    if failed == Some(0) && passed.is_some_and(|p| p > 0) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Failures and the number of passed checks on one rank.
#[derive(Debug)]
pub struct Check {
    pub rank: usize,
    pub failures: Vec<String>,
    pub passed: usize,
}

impl Check {
    pub fn new(rank: usize) -> Self {
        Self {
            rank,
            failures: Vec::new(),
            passed: 0,
        }
    }

    pub fn ok(&mut self, what: &str, cond: bool, detail: impl FnOnce() -> String) {
        if cond {
            self.passed += 1;
        } else {
            self.failures.push(format!("{what}: {}", detail()));
        }
    }

    /// `got` has `want`'s shape and kind and lies within `tol * (1 + max|want|)` of it.
    pub fn close<E: std::fmt::Display>(
        &mut self,
        what: &str,
        got: Result<Tensor, E>,
        want: &Tensor,
        tol: f64,
    ) {
        let got = match got {
            Ok(g) => g,
            Err(e) => return self.failures.push(format!("{what}: error {e}")),
        };
        if got.size() != want.size() || got.kind() != want.kind() {
            return self.failures.push(format!(
                "{what}: got {:?} {:?}, want {:?} {:?}",
                got.size(),
                got.kind(),
                want.size(),
                want.kind()
            ));
        }
        let (diff, scale) = max_diff(&got, want);
        self.ok(what, diff <= tol * (1.0 + scale), || {
            format!("max |got - want| = {diff:e} > {tol:e} * (1 + {scale})")
        });
    }

    pub fn err<T>(&mut self, what: &str, r: Result<T, CommError>, expect: fn(&CommError) -> bool) {
        match r {
            Err(e) if expect(&e) => self.passed += 1,
            Err(e) => self.failures.push(format!("{what}: wrong error {e}")),
            Ok(_) => self.failures.push(format!("{what}: expected an error")),
        }
    }
}

/// (max |a - b|, max |b|), compared in f64.
pub fn max_diff(a: &Tensor, b: &Tensor) -> (f64, f64) {
    if b.numel() == 0 {
        return (0.0, 0.0);
    }
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    let diff = (&a - &b).abs().max().double_value(&[]);
    let scale = b.abs().max().double_value(&[]);
    (diff, scale)
}

/// Rank `rank`'s input for test `seed`: the same on every rank that builds it.
pub fn input(seed: i64, rank: usize, shape: &[i64], kind: Kind) -> Tensor {
    tch::manual_seed(seed * 1009 + rank as i64);
    let opts = (Kind::Float, tch::Device::Cpu);
    match kind {
        Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 => {
            Tensor::randint_low(-50, 50, shape, (kind, tch::Device::Cpu))
        }
        Kind::Uint8 => Tensor::randint_low(0, 50, shape, (kind, tch::Device::Cpu)),
        Kind::Bool => Tensor::randn(shape, opts).gt(0.0),
        _ => Tensor::randn(shape, opts).to_kind(kind),
    }
}
