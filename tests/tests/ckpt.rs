//! Checkpoints end to end: compiled llama-mini plans run under `mpirun
//! autopart run OUT` with `--checkpoint-dir`, then resumed.
//!
//! - Exact resume: 10 steps uninterrupted vs the same run resumed from its
//!   step-5 checkpoint (asynchronous saves on the resumed run): the same
//!   loss and gradient norm text at every step and byte-identical final
//!   weights.
//! - Reshard: a checkpoint of plan A resumed under plan B trains on with the
//!   losses of the uninterrupted plan-A run (1e-5 relative), for four pairs
//!   that change tp, pp, dp, the ZeRO stage and the process count, one to an
//!   interleaved schedule and one to a single process.
//! - A rank killed with SIGKILL in the middle of a save: `--resume auto`
//!   ignores (and reports) the interrupted `step_N.partial` and resumes from
//!   the previous complete checkpoint, matching the uninterrupted run;
//!   `--keep 2` leaves the newest two.
//! - Errors: a checkpoint of another model (the tensor named), a corrupt
//!   shard (its file named), optimizer settings that differ (the flag
//!   named, `--override-optim-settings` accepted), `--resume latest` with
//!   nothing to resume, and a full disk during a save (a small tmpfs: the
//!   run stops with the error, the previous checkpoint stays loadable).
//!
//! Every run trains from seed 7 with AdamW eps 1e-6 (see `mpi_app.rs` for
//! why weights compared across plans need it).

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use autopart_tests::plans::{DP2_ZERO1, DP2_ZERO3, PP2_1F1B, PP2_INTERLEAVED, SINGLE, TP2};
use autopart_tests::{
    StepMetrics, autopart, autopart_bin, compile, compile_model, launch_binary_env, launch_job,
    mpirun_prefix, read_metrics, read_safetensors,
};

const RTOL: f64 = 1e-5;
const TIMEOUT: Duration = Duration::from_secs(300);

/// A compiled plan and its process count.
struct Plan {
    out: PathBuf,
    np: usize,
}

fn plan(dir: &Path, name: &str, args: &[&str]) -> Plan {
    let out = dir.join(name);
    compile(&out, args).unwrap_or_else(|e| panic!("compile {name}: {e:#}"));
    let np = args
        .iter()
        .position(|a| *a == "--plan-ngpus")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(1);
    Plan { out, np }
}

/// `mpirun -np N autopart run OUT --seed 7 --adam-eps 1e-6 --metrics M ARGS`.
fn run(p: &Plan, metrics: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut all = vec![
        "run".to_string(),
        p.out.display().to_string(),
        "--seed".into(),
        "7".into(),
        "--adam-eps".into(),
        "1e-6".into(),
        "--metrics".into(),
        metrics.display().to_string(),
    ];
    all.extend(args.iter().map(ToString::to_string));
    launch_binary_env(p.np, &autopart_bin().expect("autopart"), &all, env, TIMEOUT).expect("launch")
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// [`run`], which must succeed; returns its metrics and console output.
fn train(p: &Plan, metrics: &Path, args: &[&str]) -> (Vec<StepMetrics>, String) {
    let out = run(p, metrics, args, &[]);
    let t = text(&out);
    assert!(
        out.status.success(),
        "{} {args:?} failed:\n{t}",
        p.out.display()
    );
    (read_metrics(metrics).expect("metrics"), t)
}

fn loss_text(metrics: &Path) -> Vec<String> {
    autopart_tests::loss_text(metrics).expect("metrics")
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= RTOL * b.abs().max(1e-12)
}

#[test]
fn resume_under_the_same_plan_is_exact() {
    let dir = tempfile::tempdir().expect("temp dir");
    let p = plan(dir.path(), "dp2", DP2_ZERO1);
    let ck = dir.path().join("ck");
    let (whole, params) = (dir.path().join("whole.jsonl"), dir.path().join("pa"));
    train(
        &p,
        &whole,
        &[
            "--steps",
            "10",
            "--checkpoint-dir",
            &s(&ck),
            "--checkpoint-every",
            "5",
            "--save-params",
            &s(&params),
        ],
    );
    let lines = std::fs::read_to_string(&whole).expect("metrics");
    assert!(
        lines
            .lines()
            .nth(4)
            .is_some_and(|l| l.contains("\"checkpoint_saved\":{\"step\":5")),
        "{lines}"
    );
    let (resumed, params_b) = (dir.path().join("resumed.jsonl"), dir.path().join("pb"));
    let (m, out) = train(
        &p,
        &resumed,
        &[
            "--steps",
            "10",
            "--checkpoint-dir",
            &s(&ck),
            "--resume",
            "5",
            "--async-checkpoint",
            "--save-params",
            &s(&params_b),
        ],
    );
    assert!(
        out.contains("resumed from") && out.contains("step_5"),
        "{out}"
    );
    assert_eq!(
        m.iter().map(|m| m.step).collect::<Vec<_>>(),
        (6..=10).collect::<Vec<_>>()
    );
    assert_eq!(loss_text(&resumed), loss_text(&whole)[5..].to_vec());
    for rank in 0..2 {
        let f = format!("rank-{rank}.safetensors");
        assert_eq!(
            read_safetensors(&params.join(&f)).expect("whole run"),
            read_safetensors(&params_b.join(&f)).expect("resumed run"),
            "{f}"
        );
    }
    // The first run's step 10 (a later step than the resumed run's start)
    // was moved aside, and the resumed run wrote its own, complete.
    assert!(out.contains("moved aside"), "{out}");
    let names = listing(&ck);
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(names[1].starts_with("step_10.superseded-"), "{names:?}");
    assert_eq!([&names[0], &names[2]], ["step_10", "step_5"]);
    assert!(ck.join("step_10/COMPLETE").is_file());
}

/// Trains plan `a` for 10 steps with a checkpoint at step 5, resumes it
/// under plan `b` and compares steps 6–10 with plan `a`'s.
fn reshard(a: &[&str], b: &[&str]) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (pa, pb) = (plan(dir.path(), "a", a), plan(dir.path(), "b", b));
    let ck = dir.path().join("ck");
    let (want, _) = train(
        &pa,
        &dir.path().join("a.jsonl"),
        &[
            "--steps",
            "10",
            "--checkpoint-dir",
            &s(&ck),
            "--checkpoint-every",
            "5",
        ],
    );
    let (got, out) = train(
        &pb,
        &dir.path().join("b.jsonl"),
        &["--steps", "10", "--resume", &s(&ck.join("step_5"))],
    );
    assert!(out.contains("resumed from"), "{out}");
    assert_eq!(got.len(), 5, "{got:?}");
    let mut worst = 0.0f64;
    for (g, w) in got.iter().zip(&want[5..]) {
        assert_eq!(g.step, w.step);
        assert!(
            close(g.loss, w.loss) && close(g.grad_norm, w.grad_norm),
            "{a:?} -> {b:?}: step {}: loss {} / grad norm {} vs {} / {} uninterrupted",
            g.step,
            g.loss,
            g.grad_norm,
            w.loss,
            w.grad_norm
        );
        worst = worst.max((g.loss - w.loss).abs() / w.loss.abs());
    }
    eprintln!("{a:?} -> {b:?}: worst relative loss difference {worst:.2e}");
}

#[test]
fn reshard_dp2_zero1_to_tp2() {
    reshard(DP2_ZERO1, TP2);
}

#[test]
fn reshard_tp2_to_pp2_interleaved() {
    reshard(TP2, PP2_INTERLEAVED);
}

#[test]
fn reshard_pp2_to_a_single_process() {
    reshard(PP2_1F1B, SINGLE);
}

#[test]
fn reshard_single_process_to_dp2_zero3() {
    reshard(SINGLE, DP2_ZERO3);
}

#[test]
fn a_rank_killed_in_a_save_resumes_from_the_previous_checkpoint() {
    let dir = tempfile::tempdir().expect("temp dir");
    let p = plan(dir.path(), "dp2", DP2_ZERO1);
    let (ck_ref, ck) = (dir.path().join("ck-ref"), dir.path().join("ck"));
    let every = ["--steps", "6", "--checkpoint-every", "2"];
    let reference = dir.path().join("ref.jsonl");
    let mut args = every.to_vec();
    let ck_ref_s = s(&ck_ref);
    args.extend(["--checkpoint-dir", &ck_ref_s, "--keep", "2"]);
    train(&p, &reference, &args);
    let left: Vec<String> = listing(&ck_ref);
    assert_eq!(left, vec!["step_4", "step_6"], "--keep 2");

    // Rank 1 dies with SIGKILL after writing its files of step 4.
    let ck_s = s(&ck);
    let mut args = every.to_vec();
    args.extend(["--checkpoint-dir", &ck_s]);
    let killed = run(
        &p,
        &dir.path().join("killed.jsonl"),
        &args,
        &[("AUTOPART_FAULT_KILL_IN_SAVE", "1:4")],
    );
    assert!(!killed.status.success(), "{}", text(&killed));
    assert_eq!(listing(&ck), vec!["step_2", "step_4.partial"]);
    assert!(!ck.join("step_4.partial/COMPLETE").exists());
    assert!(
        ck.join("step_4.partial/rank-1.json").is_file(),
        "rank 1 wrote before dying"
    );

    let inspect = autopart(&["ckpt", "inspect", &ck_s]).expect("inspect");
    let table = String::from_utf8_lossy(&inspect.stdout);
    assert!(
        table.contains("step_4.partial") || table.contains("interrupted"),
        "{table}"
    );

    let resumed = dir.path().join("resumed.jsonl");
    let mut args = every.to_vec();
    args.extend(["--checkpoint-dir", &ck_s, "--resume", "auto"]);
    let (m, out) = train(&p, &resumed, &args);
    assert!(
        out.contains("step_4.partial") && out.contains("ignoring"),
        "{out}"
    );
    assert!(out.contains("step_2"), "{out}");
    assert_eq!(m.first().map(|m| m.step), Some(3));
    assert_eq!(loss_text(&resumed), loss_text(&reference)[2..].to_vec());
    assert_eq!(listing(&ck), vec!["step_2", "step_4", "step_6"]);

    // `auto` with nothing to resume starts fresh; `latest` refuses.
    let empty = dir.path().join("empty");
    let mut args = vec!["--steps", "1", "--resume", "auto", "--checkpoint-dir"];
    let empty_s = s(&empty);
    args.push(&empty_s);
    let (m, out) = train(&p, &dir.path().join("fresh.jsonl"), &args);
    assert!(out.contains("starting from step 0"), "{out}");
    assert_eq!(m.len(), 1);
    let latest = run(
        &p,
        &dir.path().join("x.jsonl"),
        &[
            "--steps",
            "1",
            "--resume",
            "latest",
            "--checkpoint-dir",
            &s(&dir.path().join("none")),
        ],
        &[],
    );
    assert!(!latest.status.success());
    assert!(
        text(&latest).contains("no complete checkpoint"),
        "{}",
        text(&latest)
    );
}

/// The checkpoint folders of `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn bad_checkpoints_and_settings_are_clear_errors() {
    let dir = tempfile::tempdir().expect("temp dir");
    let p = plan(dir.path(), "single", SINGLE);
    let ck = dir.path().join("ck");
    let ck_s = s(&ck);
    let m = dir.path().join("m.jsonl");
    train(&p, &m, &["--steps", "2", "--checkpoint-dir", &ck_s]);
    let step2 = s(&ck.join("step_2"));

    let fails = |args: &[&str], what: &[&str]| {
        let out = run(&p, &m, args, &[]);
        let t = text(&out);
        assert!(!out.status.success(), "{args:?} succeeded:\n{t}");
        assert!(!t.contains("panicked"), "{t}");
        for w in what {
            assert!(t.contains(w), "{args:?}: no '{w}' in:\n{t}");
        }
    };
    // Other optimizer settings: refused, naming the flag, unless overridden.
    fails(
        &["--steps", "4", "--resume", &step2],
        &["--steps", "--override-optim-settings"],
    );
    fails(
        &["--steps", "2", "--lr", "1e-3", "--resume", &step2],
        &["--lr"],
    );
    train(
        &p,
        &m,
        &[
            "--steps",
            "4",
            "--resume",
            &step2,
            "--override-optim-settings",
        ],
    );
    fails(
        &["--steps", "2", "--resume", "7", "--checkpoint-dir", &ck_s],
        &["step_7"],
    );

    // Another model's checkpoint: the tensor is named.
    let gpt = dir.path().join("gpt");
    compile_model(&gpt, "gpt-mini", SINGLE).expect("compile gpt-mini");
    let gpt_ck = dir.path().join("gpt-ck");
    train(
        &Plan { out: gpt, np: 1 },
        &dir.path().join("g.jsonl"),
        &["--steps", "2", "--checkpoint-dir", &s(&gpt_ck)],
    );
    fails(
        &["--steps", "2", "--resume", &s(&gpt_ck.join("step_2"))],
        &["has no tensor model."],
    );

    // A corrupt shard: its file is named.
    let bad = dir.path().join("bad");
    copy_dir(&ck.join("step_2"), &bad);
    let file = bad.join("rank-0.safetensors");
    let mut bytes = std::fs::read(&file).expect("read");
    let at = bytes.len() - 3;
    bytes[at] ^= 0x10;
    std::fs::write(&file, bytes).expect("corrupt");
    fails(
        &["--steps", "2", "--resume", &s(&bad)],
        &["rank-0.safetensors", "checksum"],
    );
    // A truncated one.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .expect("open");
    f.set_len(100).expect("truncate");
    fails(
        &["--steps", "2", "--resume", &s(&bad)],
        &["rank-0.safetensors", "truncated"],
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("list") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
    }
}

/// A tmpfs of `bytes` at a new folder; unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: PathBuf, bytes: u64) -> Result<Self, String> {
        std::fs::create_dir_all(&at).map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(&at)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(Self(at))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_stops_the_run_and_keeps_the_previous_checkpoint() {
    let dir = tempfile::tempdir().expect("temp dir");
    let p = plan(dir.path(), "single", SINGLE);
    // One checkpoint's size, measured.
    let probe = dir.path().join("probe");
    train(
        &p,
        &dir.path().join("p.jsonl"),
        &["--steps", "1", "--checkpoint-dir", &s(&probe)],
    );
    let size: u64 = std::fs::read_dir(probe.join("step_1"))
        .expect("list")
        .map(|e| e.expect("entry").metadata().expect("meta").len())
        .sum();
    // Room for one and a half.
    let fs = match Tmpfs::mount(dir.path().join("small"), size * 3 / 2) {
        Ok(fs) => fs,
        Err(e) if std::env::var_os("AUTOPART_TEST_NO_TMPFS").is_some() => {
            eprintln!("skipped: cannot mount a tmpfs ({e}) and AUTOPART_TEST_NO_TMPFS is set");
            return;
        }
        Err(e) => panic!(
            "this test mounts a small tmpfs (root only): {e}; set AUTOPART_TEST_NO_TMPFS=1 to skip it"
        ),
    };
    let ck = fs.0.join("ck");
    let out = run(
        &p,
        &dir.path().join("full.jsonl"),
        &[
            "--steps",
            "4",
            "--checkpoint-dir",
            &s(&ck),
            "--checkpoint-every",
            "2",
        ],
        &[],
    );
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("No space left on device"), "{t}");
    assert!(t.contains("step_4") && t.contains("still step_2"), "{t}");
    assert!(!t.contains("panicked"), "{t}");
    assert_eq!(
        listing(&ck),
        vec!["step_2"],
        "the failed save is cleaned up"
    );
    let verify = autopart(&["ckpt", "inspect", &s(&ck.join("step_2")), "--verify"])
        .expect("the previous checkpoint verifies");
    assert!(!verify.stdout.is_empty());
    let (m, _) = train(
        &p,
        &dir.path().join("again.jsonl"),
        &["--steps", "4", "--resume", &s(&ck.join("step_2"))],
    );
    assert_eq!(m.iter().map(|m| m.step).collect::<Vec<_>>(), vec![3, 4]);
}

#[test]
fn merge_of_a_sharded_checkpoint_is_the_single_process_model() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (sharded, single) = (
        plan(dir.path(), "tp2", TP2),
        plan(dir.path(), "single", SINGLE),
    );
    let ck = dir.path().join("ck");
    train(
        &sharded,
        &dir.path().join("tp2.jsonl"),
        &[
            "--steps",
            "10",
            "--checkpoint-dir",
            &s(&ck),
            "--checkpoint-every",
            "5",
        ],
    );
    // The single process stops at step 5 of the same 10-step schedule.
    let params = dir.path().join("params");
    train(
        &single,
        &dir.path().join("single.jsonl"),
        &[
            "--steps",
            "10",
            "--exit-at-step",
            "5",
            "--save-params",
            &s(&params),
        ],
    );
    let merged = dir.path().join("merged.safetensors");
    autopart(&[
        "ckpt",
        "merge",
        &s(&ck.join("step_5")),
        "--out",
        &s(&merged),
        "--with-optimizer",
    ])
    .expect("merge");
    let got = read_safetensors(&merged).expect("merged file");
    let want = read_safetensors(&params.join("rank-0.safetensors")).expect("single-process");
    let mut worst = 0.0f64;
    for (name, w) in &want {
        let g = got.get(name).unwrap_or_else(|| panic!("{name} not merged"));
        assert_eq!(g.shape, w.shape, "{name}");
        for (a, b) in g.values.iter().zip(&w.values) {
            let d = (a - b).abs();
            assert!(d <= 1e-6 + 1e-5 * b.abs(), "{name}: {a} vs {b}");
            worst = worst.max(d);
        }
        for state in ["exp_avg", "exp_avg_sq"] {
            let key = format!("optimizer/{state}/{name}");
            assert_eq!(got.get(&key).map(|t| &t.shape), Some(&w.shape), "{key}");
        }
    }
    assert_eq!(
        got.len(),
        3 * want.len(),
        "params and two moments (f32: no master copy)"
    );
    eprintln!("merge vs single process: worst absolute weight difference {worst:.2e}");
}

#[test]
fn launch_restarts_a_killed_job_from_its_checkpoint_until_it_finishes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let p = plan(dir.path(), "dp2", DP2_ZERO1);
    let every = ["--steps", "8", "--checkpoint-every", "2"];
    let (reference, params_ref) = (dir.path().join("ref.jsonl"), dir.path().join("pref"));
    let mut args = every.to_vec();
    let (ck_ref, pref) = (s(&dir.path().join("ck-ref")), s(&params_ref));
    args.extend(["--checkpoint-dir", &ck_ref, "--save-params", &pref]);
    train(&p, &reference, &args);

    // Rank 1 dies with SIGKILL after step 5 in the first attempt; the
    // restart resumes from step 4 (`--resume auto`) and finishes.
    let (metrics, params) = (dir.path().join("launched.jsonl"), dir.path().join("p"));
    let ck = s(&dir.path().join("ck"));
    let mut flags: Vec<String> = Vec::new();
    let restarts: u32 = 2;
    for a in [
        "--seed",
        "7",
        "--adam-eps",
        "1e-6",
        "--metrics",
        &s(&metrics),
        "--checkpoint-dir",
        &ck,
        "--resume",
        "auto",
        "--save-params",
        &s(&params),
    ]
    .iter()
    .chain(every.iter())
    {
        flags.push(a.to_string());
    }
    let job = launch_job(restarts, &mpirun_prefix(2), &p.out, &flags).expect("job");
    let bin = autopart_bin().expect("autopart");
    let out = launch_binary_env(
        1,
        &bin,
        &job,
        &[("AUTOPART_FAULT_KILL_AT_STEP", "1:5")],
        TIMEOUT,
    )
    .expect("launch");
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("attempt 1 failed") && t.contains("restarting"),
        "{t}"
    );
    assert!(t.contains("attempt 2 succeeded"), "{t}");
    assert!(t.contains("resumed from") && t.contains("step_4"), "{t}");
    // One run's curve: steps 1-8 once each, equal to the uninterrupted run.
    assert_eq!(loss_text(&metrics), loss_text(&reference));
    for rank in 0..2 {
        let f = format!("rank-{rank}.safetensors");
        assert_eq!(
            read_safetensors(&params.join(&f)).expect("launched"),
            read_safetensors(&params_ref.join(&f)).expect("reference"),
            "{f}"
        );
    }

    // A job that always fails is given up after its restarts; a usage
    // error (exit status 2) is not retried.
    let fails = |cmd: &[&str]| {
        let mut a = vec!["launch", "--max-restarts", "1", "--backoff", "0", "--"];
        a.extend(cmd);
        let a: Vec<String> = a.iter().map(ToString::to_string).collect();
        let out = launch_binary_env(1, &bin, &a, &[], TIMEOUT).expect("launch");
        assert!(!out.status.success());
        text(&out)
    };
    let t = fails(&["sh", "-c", "exit 3"]);
    assert!(
        t.contains("attempt 2 of 2") && t.contains("failed 2 times"),
        "{t}"
    );
    assert!(t.contains("exit status 3"), "{t}");
    let t = fails(&["sh", "-c", "exit 2"]);
    assert!(
        !t.contains("attempt 2") && t.contains("not restarting"),
        "{t}"
    );
}

#[test]
fn a_nan_gradient_stops_the_run_or_is_skipped_and_no_checkpoint_holds_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let p = plan(dir.path(), "dp2", DP2_ZERO1);
    let nan = [("AUTOPART_FAULT_NAN_AT_STEP", "1:3")];
    let ck = dir.path().join("ck");
    let args = [
        "--steps",
        "6",
        "--checkpoint-every",
        "2",
        "--checkpoint-dir",
    ];
    let mut a = args.to_vec();
    let ck_s = s(&ck);
    a.push(&ck_s);
    let out = run(&p, &dir.path().join("stop.jsonl"), &a, &nan);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(!t.contains("panicked"), "{t}");
    assert!(t.contains("step 3") && t.contains("not finite"), "{t}");
    assert!(t.contains("step_2, holds finite state"), "{t}");
    assert!(t.contains("--skip-nonfinite-steps"), "{t}");
    assert_eq!(listing(&ck), vec!["step_2"], "nothing saved after the NaN");
    // The clean checkpoint resumes.
    let (m, _) = train(
        &p,
        &dir.path().join("again.jsonl"),
        &["--steps", "6", "--resume", &s(&ck.join("step_2"))],
    );
    assert!(
        m.iter()
            .all(|m| m.loss.is_finite() && m.grad_norm.is_finite())
    );

    // --skip-nonfinite-steps: step 3's update is skipped and counted.
    let ck2 = dir.path().join("ck2");
    let mut a = args.to_vec();
    let ck2_s = s(&ck2);
    a.extend([ck2_s.as_str(), "--skip-nonfinite-steps"]);
    let metrics = dir.path().join("skip.jsonl");
    let out = run(&p, &metrics, &a, &nan);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("update skipped (1 so far)"), "{t}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&metrics)
        .expect("metrics")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let skipped: Vec<u64> = lines
        .iter()
        .map(|l| l["skipped_steps"].as_u64().expect("count"))
        .collect();
    assert_eq!(skipped, vec![0, 0, 1, 1, 1, 1]);
    assert!(lines[2]["grad_norm"].is_null(), "{}", lines[2]);
    assert!(
        lines
            .iter()
            .all(|l| l["loss"].as_f64().is_some_and(f64::is_finite))
    );
    let merged = dir.path().join("merged.safetensors");
    autopart(&[
        "ckpt",
        "merge",
        &s(&ck2.join("step_6")),
        "--out",
        &s(&merged),
        "--with-optimizer",
    ])
    .expect("merge");
    let weights = read_safetensors(&merged).expect("merged");
    assert!(
        weights
            .values()
            .all(|t| t.values.iter().all(|v| v.is_finite()))
    );
}

#[test]
fn a_stopped_rank_is_caught_by_the_watchdog_and_the_job_restarts() {
    let dir = tempfile::tempdir().expect("temp dir");
    let p = plan(dir.path(), "dp2", DP2_ZERO1);
    let every = ["--steps", "6", "--checkpoint-every", "2"];
    let reference = dir.path().join("ref.jsonl");
    let mut args = every.to_vec();
    let ck_ref = s(&dir.path().join("ck-ref"));
    args.extend(["--checkpoint-dir", &ck_ref]);
    train(&p, &reference, &args);

    // Rank 1 stops (SIGSTOP) after step 3 in the first attempt: rank 0's
    // watchdog ends the job after 3 s, and launch restarts it from step 2.
    let metrics = dir.path().join("launched.jsonl");
    let bin = autopart_bin().expect("autopart");
    let mut flags: Vec<String> = Vec::new();
    let restarts: u32 = 1;
    let ck = s(&dir.path().join("ck"));
    for a in [
        "--seed",
        "7",
        "--adam-eps",
        "1e-6",
        "--metrics",
        &s(&metrics),
        "--checkpoint-dir",
        &ck,
        "--resume",
        "auto",
        "--collective-timeout",
        "3",
    ]
    .iter()
    .chain(every.iter())
    {
        flags.push(a.to_string());
    }
    let job = launch_job(restarts, &mpirun_prefix(2), &p.out, &flags).expect("job");
    let out = launch_binary_env(
        1,
        &bin,
        &job,
        &[("AUTOPART_FAULT_STOP_AT_STEP", "1:3")],
        TIMEOUT,
    )
    .expect("launch");
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("rank 0:") && t.contains("in step 3 has not completed within 3 s"),
        "{t}"
    );
    let took: f64 = t
        .split("attempt 1 failed after ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|x| x.parse().ok())
        .unwrap_or_else(|| panic!("no first failure in:\n{t}"));
    assert!(took < 60.0, "the first attempt took {took} s to end");
    assert!(
        t.contains("attempt 2 succeeded") && t.contains("step_2"),
        "{t}"
    );
    assert_eq!(loss_text(&metrics), loss_text(&reference));
}
