//! The cost model against published runs (shared/data/published_runs.csv for
//! A100s, published_runs_h100.csv for H100s): the accuracy targets per
//! hardware type and the free search never losing to the experts.

use std::path::Path;

use autopart::anno::builtin_registry;
use autopart::cost::load_cluster;
use autopart::validate::{cluster_preset, median, read_runs, validate_run};

fn data_file(name: &str) -> String {
    format!("{}/../../shared/data/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn runs_file() -> String {
    data_file("published_runs.csv")
}

#[test]
fn a100_predictions_meet_the_accuracy_targets() {
    meets_the_targets(&runs_file(), "a100-80gb", 20);
}

/// The H100 rows do not meet the targets yet (median |error| 15.3%, worst
/// 42.1%: `docs/validation.txt`); every row must still evaluate, and the
/// free search must not lose where the published plan fits the memory
/// model.
#[test]
fn every_h100_row_evaluates() {
    let runs = read_runs(Path::new(&data_file("published_runs_h100.csv"))).expect("parse");
    assert!(runs.len() >= 19, "{} runs", runs.len());
    let registry = builtin_registry();
    for run in &runs {
        assert_eq!(run.gpu, "h100-sxm", "line {}", run.line);
        let cluster = load_cluster(cluster_preset(&run.gpu)).expect("preset for the run's gpu");
        let free = run.n_gpus <= 64;
        let r = validate_run(run, &cluster, &registry, free)
            .unwrap_or_else(|e| panic!("line {}: {e}", run.line));
        assert!(
            r.error.is_finite() && r.predicted > 0.0,
            "line {}",
            run.line
        );
        assert!(
            r.fixed_over_memory || r.free_step_s <= r.fixed_step_s * (1.0 + 1e-9),
            "line {}: free search {} s slower than published {} s",
            run.line,
            r.free_step_s,
            r.fixed_step_s
        );
    }
}

/// Every row of `file` is on `gpu`; median |error| <= 10%, worst <= 25%
/// (the median of an even count is the mean of the middle two, as
/// `autopart validate` prints it).
fn meets_the_targets(file: &str, gpu: &str, at_least: usize) {
    let runs = read_runs(Path::new(file)).expect("published runs parse");
    assert!(runs.len() >= at_least, "{} runs", runs.len());
    let registry = builtin_registry();
    let mut errors = Vec::new();
    for run in &runs {
        assert_eq!(run.gpu, gpu, "line {}", run.line);
        let cluster = load_cluster(cluster_preset(&run.gpu)).expect("preset for the run's gpu");
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
    let median = median(&mut errors).expect("some runs");
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

/// Nemotron-4 rows trace as a GPT with grouped-query attention and an
/// untied head: k/v project to the kv heads only (traced copies count once),
/// and the head is a parameter of its own.
#[test]
fn nemotron_rows_trace_with_grouped_kv_heads_and_an_untied_head() {
    use autopart::ir::DType;
    use autopart::trace::{ModelConfig, TraceOptions, trace_model};
    let runs = read_runs(Path::new(&data_file("published_runs_h100.csv"))).expect("parse");
    let run = runs.iter().find(|r| r.line == 2).expect("line 2");
    let ModelConfig::Gpt(c) = &run.model else {
        panic!("line 2 is a gpt row");
    };
    assert_eq!((c.n_heads, c.n_kv_heads, c.tie_embeddings), (48, 8, false));
    assert!(
        run.approximation
            .as_deref()
            .is_some_and(|a| a.contains("GQA 8 kv heads"))
    );
    let registry = builtin_registry();
    let (h, f, v, l, s) = (c.hidden, c.ffn, c.vocab, c.n_layers, run.seq_len);
    let kv = 8 * h / 48;
    // Per layer: q and o (h x h + bias), k and v (kv x h + bias), the MLP
    // (2 h f + f + h), two LayerNorms (4 h); then both embeddings, the
    // positions, the final LayerNorm.
    let layer = 2 * (h * h + h) + 2 * (kv * h + kv) + 2 * h * f + f + h + 4 * h;
    let expected = l * layer + 2 * v * h + s * h + 2 * h;
    for copies in [1, 2] {
        let options = TraceOptions {
            batch: 1,
            seq_len: Some(s),
            dtype: DType::Bf16,
            kv_copies: copies,
        };
        let g = trace_model(&run.model, &options, &registry).expect("trace");
        assert_eq!(g.n_params(), expected, "{copies} kv copies");
        assert!(g.parameters().any(|(_, t)| t.name == "lm_head.weight"));
        let k = g
            .parameters()
            .find(|(_, t)| t.name == "transformer.h.0.attn.k_proj.weight")
            .expect("k_proj");
        assert_eq!(k.1.shape, vec![copies * kv, h]);
    }
}
