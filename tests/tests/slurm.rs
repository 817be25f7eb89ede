//! Slurm as a real component: a single-node Slurm (Debian's slurmctld,
//! slurmd and munge, started by `scripts/slurm.sh start`, idempotent) runs
//! compiled llama-mini plans.
//!
//! - `srun -n 2 autopart run OUT` (Debian's `MpiDefault=none`: no PMI) is
//!   refused before MPI starts, saying to add `--mpi=pmix`;
//! - `srun --mpi=pmix -n 2 autopart run OUT` trains with the losses of the
//!   same plan under `mpirun`, bitwise;
//! - an `sbatch` job running `autopart launch -- srun --mpi=pmix -K ...
//!   --resume auto` whose rank 1 is SIGKILLed after step 3 restarts and
//!   finishes with the losses of the uninterrupted `mpirun` run.
//!
//! Starting Slurm needs root; `AUTOPART_TEST_NO_SLURM=1` skips these tests
//! (saying so) where it cannot run.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use autopart_tests::plans::DP2_ZERO1;
use autopart_tests::{autopart_bin, compile, launch_binary_env, test_slurm};

fn slurm() -> Option<String> {
    test_slurm().expect("the test Slurm")
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn text(o: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `cmd args` with `SLURM_CONF` and a time limit.
fn slurm_cmd(conf: &str, cmd: &str, args: &[String], env: &[(&str, &str)]) -> Output {
    let mut all = vec![cmd.to_string()];
    all.extend(args.iter().cloned());
    // `launch_binary_env` with one process runs the command itself.
    let mut envs = vec![("SLURM_CONF", conf)];
    envs.extend(env.iter().copied());
    let sh = PathBuf::from("/usr/bin/env");
    launch_binary_env(1, &sh, &all, &envs, Duration::from_secs(300)).expect("slurm command")
}

fn loss_text(metrics: &Path) -> Vec<String> {
    autopart_tests::loss_text(metrics).expect("metrics")
}

fn run_args(out: &Path, metrics: &Path, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        s(&autopart_bin().expect("autopart")),
        "run".into(),
        s(out),
        "--seed".into(),
        "7".into(),
        "--metrics".into(),
        s(metrics),
    ];
    v.extend(extra.iter().map(ToString::to_string));
    v
}

/// The same plan under mpirun, for reference.
fn mpirun(out: &Path, metrics: &Path, extra: &[&str]) {
    let args = run_args(out, metrics, extra);
    let o = launch_binary_env(
        2,
        &autopart_bin().expect("autopart"),
        &args[1..],
        &[],
        Duration::from_secs(300),
    )
    .expect("mpirun");
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn srun_with_pmix_trains_and_plain_srun_says_to_add_it() {
    let Some(conf) = slurm() else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("dp2");
    compile(&out, DP2_ZERO1).expect("compile");
    let reference = dir.path().join("mpirun.jsonl");
    mpirun(&out, &reference, &["--steps", "4"]);

    let bare = dir.path().join("bare.jsonl");
    let mut args = vec!["-n".to_string(), "2".into()];
    args.extend(run_args(&out, &bare, &["--steps", "4"]));
    let o = slurm_cmd(&conf, "srun", &args, &[]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("srun --mpi=pmix -n 2") && t.contains("without PMI"),
        "{t}"
    );
    assert!(!t.contains("MPI_INIT"), "refused before MPI starts:\n{t}");

    let pmix = dir.path().join("pmix.jsonl");
    let mut args = vec!["--mpi=pmix".to_string(), "-n".into(), "2".into()];
    args.extend(run_args(&out, &pmix, &["--steps", "4"]));
    let o = slurm_cmd(&conf, "srun", &args, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(loss_text(&pmix), loss_text(&reference));
}

#[test]
fn an_sbatch_job_under_launch_survives_a_killed_rank() {
    let Some(conf) = slurm() else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("dp2");
    compile(&out, DP2_ZERO1).expect("compile");
    let every = ["--steps", "6", "--checkpoint-every", "2"];
    let reference = dir.path().join("ref.jsonl");
    let ck_ref = s(&dir.path().join("ck-ref"));
    let mut a = every.to_vec();
    a.extend(["--checkpoint-dir", &ck_ref]);
    mpirun(&out, &reference, &a);

    let metrics = dir.path().join("job.jsonl");
    let ck = s(&dir.path().join("ck"));
    let mut a = every.to_vec();
    a.extend(["--checkpoint-dir", &ck, "--resume", "auto"]);
    let run = run_args(&out, &metrics, &a).join(" ");
    let log = dir.path().join("job.log");
    let script = dir.path().join("job.sbatch");
    std::fs::write(
        &script,
        format!(
            "#!/bin/bash\n#SBATCH -n 2\n#SBATCH -o {}\nset -e\n{} launch --max-restarts 2 --backoff 0 -- srun --mpi=pmix -K -n 2 {run}\n",
            s(&log),
            s(&autopart_bin().expect("autopart"))
        ),
    )
    .expect("script");
    let o = slurm_cmd(
        &conf,
        "sbatch",
        &["--wait".into(), s(&script)],
        &[("AUTOPART_FAULT_KILL_AT_STEP", "1:3")],
    );
    let job_log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(o.status.success(), "{}\n{job_log}", text(&o));
    assert!(
        job_log.contains("attempt 1 failed") && job_log.contains("attempt 2 succeeded"),
        "{job_log}"
    );
    assert!(
        job_log.contains("resumed from") && job_log.contains("step_2"),
        "{job_log}"
    );
    assert_eq!(loss_text(&metrics), loss_text(&reference));
}
