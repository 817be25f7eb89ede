//! The cost model against published runs (shared/data/published_runs.csv):
//! the accuracy targets and the free search never losing to the experts.

use std::path::Path;

use autopart::anno::builtin_registry;
use autopart::cost::load_cluster;
use autopart::validate::{read_runs, validate_run};

fn runs_file() -> String {
    format!(
        "{}/../../shared/data/published_runs.csv",
        env!("CARGO_MANIFEST_DIR")
    )
}

#[test]
fn predictions_meet_the_accuracy_targets() {
    let runs = read_runs(Path::new(&runs_file())).expect("published runs parse");
    assert!(runs.len() >= 20, "{} runs", runs.len());
    let registry = builtin_registry();
    let mut errors = Vec::new();
    for run in &runs {
        let cluster = load_cluster(&run.gpu).expect("preset for the run's gpu");
        // The free search is checked where it is quick (up to 64 GPUs);
        // `autopart validate` checks every row.
        let free = run.n_gpus <= 64;
        let r = validate_run(run, &cluster, &registry, free)
            .unwrap_or_else(|e| panic!("line {}: {e}", run.line));
        errors.push(r.error.abs());
        assert!(
            r.free_step_s <= r.fixed_step_s * (1.0 + 1e-9),
            "line {}: free search {} s slower than published {} s",
            run.line,
            r.free_step_s,
            r.fixed_step_s
        );
    }
    errors.sort_by(f64::total_cmp);
    let median = errors[errors.len() / 2];
    let worst = errors[errors.len() - 1];
    assert!(median <= 0.10, "median |error| {median}");
    assert!(worst <= 0.25, "worst |error| {worst}");
}

#[test]
fn a_malformed_runs_file_names_the_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("runs.csv");
    let text = std::fs::read_to_string(runs_file()).expect("read");
    let mut lines: Vec<&str> = text.lines().take(3).collect();
    lines[2] = "narayanan2021_table1,gpt,24";
    std::fs::write(&path, lines.join("\n")).expect("write");
    let msg = read_runs(&path).expect_err("short row").to_string();
    assert!(msg.contains("runs.csv:3:"), "{msg}");
    assert!(msg.contains("expected 25 as in the header"), "{msg}");
}
