//! Faults at random places, survived by `autopart launch` with `--resume
//! auto`: three trials under `mpirun` and three under `srun --mpi=pmix`
//! (the test Slurm of `scripts/slurm.sh`), each killing a random rank with
//! SIGKILL after a random step (`AUTOPART_FAULT_KILL_AT_STEP`, armed in the
//! first attempt only), and one killing a rank in the middle of a
//! checkpoint save (`AUTOPART_FAULT_KILL_IN_SAVE`). Every job must finish,
//! with the losses (and, for mpirun, the final weights) of the
//! uninterrupted run, bitwise.
//!
//! The random choices come from the clock, or from `AUTOPART_FAULT_SEED`
//! to repeat a run; each trial prints its rank and step.

use std::path::{Path, PathBuf};
use std::time::Duration;

use autopart_tests::plans::DP2_ZERO1;
use autopart_tests::{
    autopart_bin, compile, launch_binary_env, launch_job, loss_text, mpirun_prefix,
    read_safetensors, test_slurm,
};

const STEPS: u64 = 8;
const TIMEOUT: Duration = Duration::from_secs(300);

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// The flags of every run: 8 steps, a checkpoint every 2.
fn run_flags(dir: &Path, name: &str) -> (Vec<String>, PathBuf, PathBuf) {
    let metrics = dir.join(format!("{name}.jsonl"));
    let params = dir.join(format!("{name}-params"));
    let flags = [
        "--steps",
        "8",
        "--checkpoint-every",
        "2",
        "--seed",
        "7",
        "--adam-eps",
        "1e-6",
    ]
    .iter()
    .map(ToString::to_string)
    .chain([
        "--metrics".into(),
        s(&metrics),
        "--save-params".into(),
        s(&params),
        "--checkpoint-dir".into(),
        s(&dir.join(format!("{name}-ck"))),
        "--resume".into(),
        "auto".into(),
    ])
    .collect();
    (flags, metrics, params)
}

/// A pseudo-random number for trial `i` (FNV-1a of the seed and `i`).
fn pick(seed: u64, i: u64, n: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.to_le_bytes().iter().chain(&i.to_le_bytes()) {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    h % n
}

fn seed() -> u64 {
    std::env::var("AUTOPART_FAULT_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

/// `autopart launch --max-restarts 2 --backoff 0 -- LAUNCHER autopart run
/// OUT FLAGS` with `env`; must succeed after exactly one restart.
fn launched(launcher: &[String], out: &Path, flags: &[String], env: &[(&str, &str)]) -> String {
    let bin = autopart_bin().expect("autopart");
    let job = launch_job(2, launcher, out, flags).expect("job");
    let o = launch_binary_env(1, &bin, &job, env, TIMEOUT).expect("launch");
    let t = format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{env:?}:\n{t}");
    assert!(
        t.contains("attempt 1 failed") && t.contains("attempt 2 succeeded"),
        "{env:?}:\n{t}"
    );
    t
}

#[test]
fn random_kills_under_mpirun_and_a_kill_in_a_save_are_survived() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("dp2");
    compile(&out, DP2_ZERO1).expect("compile");
    let (flags, reference, ref_params) = run_flags(dir.path(), "ref");
    let bin = autopart_bin().expect("autopart");
    let mut args = vec!["run".to_string(), s(&out)];
    args.extend(flags);
    let o = launch_binary_env(2, &bin, &args, &[], TIMEOUT).expect("reference");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want = loss_text(&reference).expect("reference metrics");
    assert_eq!(want.len(), STEPS as usize);
    let want_params = read_safetensors(&ref_params.join("rank-1.safetensors")).expect("params");

    let seed = seed();
    let mut trials: Vec<(String, (&str, String))> = (0..3)
        .map(|i| {
            let (rank, step) = (pick(seed, i, 2), 1 + pick(seed, i + 100, STEPS - 1));
            (
                format!("trial {i}: rank {rank} killed after step {step} (seed {seed})"),
                ("AUTOPART_FAULT_KILL_AT_STEP", format!("{rank}:{step}")),
            )
        })
        .collect();
    trials.push((
        "rank 1 killed in the middle of the step-4 save".into(),
        ("AUTOPART_FAULT_KILL_IN_SAVE", "1:4".into()),
    ));
    for (i, (what, (var, value))) in trials.iter().enumerate() {
        eprintln!("{what}");
        let (flags, metrics, params) = run_flags(dir.path(), &format!("t{i}"));
        let t = launched(&mpirun_prefix(2), &out, &flags, &[(var, value)]);
        assert_eq!(loss_text(&metrics).expect("metrics"), want, "{what}:\n{t}");
        assert_eq!(
            read_safetensors(&params.join("rank-1.safetensors")).expect("params"),
            want_params,
            "{what}"
        );
        if *var == "AUTOPART_FAULT_KILL_IN_SAVE" {
            assert!(t.contains("step_4.partial") && t.contains("step_2"), "{t}");
        }
    }
}

#[test]
fn random_kills_under_srun_are_survived() {
    let Some(conf) = test_slurm().expect("the test Slurm") else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("dp2");
    compile(&out, DP2_ZERO1).expect("compile");
    let srun: Vec<String> = ["srun", "--mpi=pmix", "-K", "-n", "2"]
        .iter()
        .map(ToString::to_string)
        .collect();
    let bin = autopart_bin().expect("autopart");
    let (flags, reference, _) = run_flags(dir.path(), "ref");
    let mut args = srun[1..].to_vec();
    args.extend([s(&bin), "run".into(), s(&out)]);
    args.extend(flags);
    let o = launch_binary_env(
        1,
        Path::new("srun"),
        &args,
        &[("SLURM_CONF", &conf)],
        TIMEOUT,
    )
    .expect("reference");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want = loss_text(&reference).expect("reference metrics");
    let seed = seed();
    for i in 0..3 {
        let (rank, step) = (pick(seed, i, 2), 1 + pick(seed, i + 100, STEPS - 1));
        let what = format!("srun trial {i}: rank {rank} killed after step {step} (seed {seed})");
        eprintln!("{what}");
        let (flags, metrics, _) = run_flags(dir.path(), &format!("t{i}"));
        let kill = format!("{rank}:{step}");
        let t = launched(
            &srun,
            &out,
            &flags,
            &[
                ("SLURM_CONF", &conf),
                ("AUTOPART_FAULT_KILL_AT_STEP", &kill),
            ],
        );
        assert_eq!(loss_text(&metrics).expect("metrics"), want, "{what}:\n{t}");
    }
}
