//! `autopart profile` under mpirun and `compile --tune`: the profiled
//! cluster file loads, says where each figure came from, prices a compile,
//! and refits from its kept samples to the same figures; the tuner builds
//! and trains its candidates and compiles the one it reports as chosen.

use std::path::Path;
use std::time::Duration;

use autopart_tests::{autopart, autopart_bin, compile_args, launch_binary_env};

fn text(o: &std::process::Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A quick profile on 2 processes (small budgets: this checks the
/// machinery, not the figures).
fn profile(dir: &Path) -> String {
    let out = dir.join("box.ron");
    let args: Vec<String> = [
        "profile",
        "--quick",
        "--budget-s",
        "0.02",
        "--max-mib",
        "1",
        "--out",
    ]
    .iter()
    .map(ToString::to_string)
    .chain([out.display().to_string()])
    .collect();
    let o = launch_binary_env(
        2,
        &autopart_bin().expect("autopart"),
        &args,
        &[("AUTOPART_BUILD_PROFILE", "dev")],
        Duration::from_secs(900),
    )
    .expect("mpirun autopart profile");
    assert!(o.status.success(), "{}", text(&o));
    text(&o)
}

#[test]
fn profile_writes_a_cluster_that_prices_a_compile_and_refits_alike() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = profile(dir.path());
    let ron = std::fs::read_to_string(dir.path().join("box.ron")).expect("box.ron");
    // Every collective the runtime issues was timed over the 2 ranks.
    for c in [
        "all-reduce",
        "all-gather",
        "reduce-scatter",
        "all-to-all",
        "broadcast",
        "send/recv",
    ] {
        assert!(
            log.contains(&format!("{c} 1048576 B over 2 ranks")),
            "{c} missing:\n{log}"
        );
    }
    assert!(log.contains("devices per node"), "{log}");
    // Provenance: measured figures say when and how; the inter-node link
    // on one host says it was not measured.
    assert!(ron.contains("devices_per_node: 2"), "{ron}");
    assert!(ron.contains("\"op_overhead_s\": \"measured 20"), "{ron}");
    assert!(
        ron.contains("\"intra_node.bandwidth_bytes_per_s\": \"measured 20"),
        "{ron}"
    );
    assert!(
        ron.contains("\"inter_node.latency_s\": \"not measured (one node)"),
        "{ron}"
    );
    assert!(ron.contains("op_bandwidth_bytes_per_s"), "{ron}");
    assert!(ron.contains("rms_norm"), "{ron}");
    // It prices a compile.
    let out = dir.path().join("plan");
    let mut args = compile_args(&out, "llama-mini");
    let cluster = dir.path().join("box.ron").display().to_string();
    for (i, a) in args.clone().iter().enumerate() {
        if a == "cpu" {
            args[i] = cluster.clone();
        }
    }
    args.extend(["--plan-ngpus", "2", "--no-build"].map(String::from));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = autopart(&refs).expect("compile with the profiled cluster");
    let plan = std::fs::read_to_string(out.join("plan.ron")).expect("plan.ron");
    assert!(
        plan.contains(&format!("cluster: \"{cluster}\"")),
        "{plan}\n{}",
        text(&o)
    );
    // Refitting the kept samples gives the same figures.
    let again = dir.path().join("again.ron");
    let raw = dir.path().join("box.json").display().to_string();
    autopart(&[
        "profile",
        "--from-raw",
        &raw,
        "--out",
        &again.display().to_string(),
    ])
    .expect("refit");
    let refit = std::fs::read_to_string(&again).expect("again.ron");
    let figures = |s: &str| -> Vec<String> {
        s.lines()
            .filter(|l| !l.trim_start().starts_with("//") && !l.contains("command:"))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(figures(&ron), figures(&refit));
    // Bad samples are an error naming the file, and the cluster file is
    // not touched.
    std::fs::write(dir.path().join("bad.json"), "{\"format_version\": 1,").expect("write");
    let bad = dir.path().join("bad.json").display().to_string();
    let err = autopart(&[
        "profile",
        "--from-raw",
        &bad,
        "--out",
        &again.display().to_string(),
    ])
    .expect_err("bad samples");
    assert!(format!("{err:#}").contains("bad.json:1:"), "{err:#}");
    assert_eq!(std::fs::read_to_string(&again).expect("again.ron"), refit);
}

#[test]
fn tune_trains_the_top_plans_and_compiles_the_measured_best() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("tuned");
    let mut args = compile_args(&out, "llama-mini");
    args.extend(
        [
            "--plan-ngpus",
            "2",
            "--tune",
            "2",
            "--tune-steps",
            "2",
            "--tune-launcher",
            "mpirun --allow-run-as-root --oversubscribe --bind-to none -np {np}",
        ]
        .map(String::from),
    );
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = autopart(&refs).expect("compile --tune 2");
    let log = text(&o);
    let report = std::fs::read_to_string(out.join("tune.md")).expect("tune.md");
    let rows: Vec<&str> = report
        .lines()
        .filter(|l| l.starts_with("| 1 ") || l.starts_with("| 2 "))
        .collect();
    assert_eq!(rows.len(), 2, "{report}");
    for row in &rows {
        // A measured step time in the fourth column.
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let measured: f64 = cells[4]
            .parse()
            .unwrap_or_else(|_| panic!("no measured time: {row}\n{log}"));
        assert!(measured > 0.0, "{row}");
    }
    let chosen = rows
        .iter()
        .position(|r| r.contains("**chosen**"))
        .unwrap_or_else(|| panic!("no chosen row:\n{report}"));
    // The plan in OUT is the chosen candidate's, built and ready to run.
    let chosen_plan =
        std::fs::read_to_string(out.join(format!("tune/plan-{}/plan.ron", chosen + 1)))
            .expect("candidate plan");
    let final_plan = std::fs::read_to_string(out.join("plan.ron")).expect("plan.ron");
    let dims = |p: &str| -> Vec<String> {
        p.lines()
            .filter(|l| {
                let l = l.trim_start();
                [
                    "tp:",
                    "pp:",
                    "dp:",
                    "micro_batch:",
                    "schedule:",
                    "zero:",
                    "sequence_parallel:",
                ]
                .iter()
                .any(|k| l.starts_with(k))
            })
            .map(str::to_owned)
            .collect()
    };
    assert!(!dims(&final_plan).is_empty(), "{final_plan}");
    assert_eq!(dims(&final_plan), dims(&chosen_plan));
    assert!(out.join("autopart-plan").is_file(), "{log}");
    assert!(
        log.contains(&format!("compiling plan {} of the 2 tried", chosen + 1)),
        "{log}"
    );
}

#[test]
fn tune_rejects_bad_flags_before_any_work() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("t");
    let mut args = compile_args(&out, "llama-mini");
    args.extend(["--plan-ngpus", "2", "--tune", "2", "--tune-steps", "1"].map(String::from));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let err = autopart(&refs).expect_err("one step cannot be timed");
    assert!(
        format!("{err:#}").contains("--tune-steps must be at least 2"),
        "{err:#}"
    );
    assert!(!out.exists(), "nothing is written");
}
