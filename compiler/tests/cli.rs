//! The `autopart` binary: JSON output and clean failures on bad input.

use std::process::{Command, Output};

fn autopart(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_autopart"))
        .args(args)
        .output()
        .expect("the binary runs")
}

fn json(args: &[&str]) -> serde_json::Value {
    let out = autopart(args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

/// Runs a command that must fail cleanly: non-zero exit, an `error:` line
/// containing `needle`, and no panic.
fn fails_with(args: &[&str], needle: &str) {
    let out = autopart(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // 1: autopart's own errors; 2: clap's usage errors.
    assert!(matches!(out.status.code(), Some(1 | 2)), "{stderr}");
    assert!(stderr.contains("error:"), "{stderr}");
    assert!(stderr.contains(needle), "{stderr} lacks {needle}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn trace_json_has_exact_params_and_flops() {
    for (model, params, layers) in [
        ("llama3-8b", 8_030_261_248u64, 32u64),
        ("llama2-7b", 6_738_415_616, 32),
        ("llama3-70b", 70_553_706_496, 80),
    ] {
        let v = json(&["trace", "--model", model, "--seq-len", "2048", "--json"]);
        assert_eq!(v["params"].as_u64(), Some(params), "{model}");
        assert_eq!(v["n_layers"].as_u64(), Some(layers), "{model}");
        assert!(v["n_ops"].as_u64().unwrap_or(0) > 18 * layers, "{model}");
        let fpt = v["flops_per_token"].as_f64().unwrap_or(0.0);
        // At least 6 x non-embedding parameters, at most 6 x all plus attention.
        assert!(fpt > 6.0 * (params as f64) * 0.8, "{model}: {fpt}");
        assert!(fpt < 6.0 * (params as f64) * 1.5, "{model}: {fpt}");
    }
}

#[test]
fn trace_summary_and_graph_dump_are_readable() {
    let out = autopart(&["trace", "--model", "llama-mini", "--dump-graph"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("graph llama-mini"), "{text}");
    assert!(text.contains("layers.3.mlp.down_proj = linear("), "{text}");
    assert!(text.contains("training FLOPs per token"), "{text}");
    assert!(text.contains("total"), "{text}");
}

#[test]
fn bad_inputs_fail_cleanly() {
    fails_with(
        &["trace", "--model", "llama9-1t"],
        "known presets: llama-mini",
    );
    fails_with(
        &["trace", "--model", "/nonexistent/config.json"],
        "/nonexistent/config.json",
    );
    fails_with(
        &["trace", "--model", "gpt-mini", "--seq-len", "100"],
        "exceeds",
    );
    fails_with(
        &[
            "trace",
            "--model",
            "llama-mini",
            "--annotations",
            "/nonexistent.ron",
        ],
        "/nonexistent.ron",
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let bad = dir.path().join("bad.ron");
    std::fs::write(&bad, "[\n  (name: \"my_op\", annotations: [\"b l d^ -> b l q\"], flops: Profile, attrs: [], implementation: None, doc: \"\"),\n]\n")
        .expect("write");
    let bad = bad.to_string_lossy().to_string();
    // The output identifier `q` does not appear in any input.
    fails_with(
        &["trace", "--model", "llama-mini", "--annotations", &bad],
        "bad.ron:2:",
    );
    let cfg = dir.path().join("config.json");
    std::fs::write(&cfg, r#"{"model_type": "llama", "hidden_size": 64}"#).expect("write");
    fails_with(
        &["trace", "--model", &cfg.to_string_lossy()],
        "missing field 'num_attention_heads'",
    );
}

#[test]
fn compile_json_writes_a_valid_plan_and_report() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("out");
    let out_s = out.to_string_lossy().to_string();
    let args = &[
        "compile",
        "--model",
        "llama-mini",
        "--plan-ngpus",
        "4",
        "--runtime-ngpus",
        "8",
        "--cluster",
        "cpu",
        "--seq-len",
        "64",
        "--global-batch",
        "16",
        "--dtype",
        "fp32",
        "--out",
        &out_s,
        "--json",
        "--no-build",
    ];
    let v = json(args);
    for key in [
        "tp",
        "pp",
        "dp",
        "micro_batch",
        "n_micro_batches",
        "schedule",
        "recompute",
        "zero",
        "sequence_parallel",
        "predicted_step_s",
        "predicted_mfu",
        "peak_mem_gib",
    ] {
        assert!(!v[key].is_null(), "missing {key} in {v}");
    }
    let tp = v["tp"].as_u64().unwrap_or(0);
    let pp = v["pp"].as_u64().unwrap_or(0);
    let dp = v["dp"].as_u64().unwrap_or(0);
    assert_eq!(tp * pp * dp, 4, "{v}");
    let plan = autopart::plan::read_plan(&out.join("plan.ron")).expect("plan.ron reads back");
    assert_eq!(plan.runtime_gpus, 8);
    assert_eq!(
        plan.global_batch,
        plan.micro_batch * plan.n_micro_batches * u64::from(plan.mesh.dp) * 2
    );
    let report = std::fs::read_to_string(out.join("report.md")).expect("report.md");
    assert!(report.contains("Alternatives"), "{report}");
    // Same inputs, byte-identical plan.
    let first = std::fs::read(out.join("plan.ron")).expect("read");
    json(args);
    assert_eq!(first, std::fs::read(out.join("plan.ron")).expect("read"));
}

#[test]
fn compile_rejects_impossible_requests_cleanly() {
    fails_with(
        &[
            "compile",
            "--model",
            "llama3-8b",
            "--plan-ngpus",
            "64",
            "--tp",
            "64",
            "--out",
            "/tmp/autopart-never",
        ],
        "tp=64 does not divide 32 attention heads",
    );
    fails_with(
        &[
            "compile",
            "--model",
            "llama-mini",
            "--plan-ngpus",
            "4",
            "--runtime-ngpus",
            "6",
        ],
        "runtime GPUs 6 must be a positive multiple of plan GPUs 4",
    );
    fails_with(
        &[
            "compile",
            "--model",
            "llama-mini",
            "--plan-ngpus",
            "2",
            "--cluster",
            "tpu-v9",
        ],
        "a100-80gb",
    );
    fails_with(
        &[
            "compile",
            "--model",
            "llama-mini",
            "--plan-ngpus",
            "2",
            "--schedule",
            "zigzag",
        ],
        "unknown schedule 'zigzag'",
    );
    fails_with(
        &[
            "compile",
            "--model",
            "gpt-mini",
            "--plan-ngpus",
            "1",
            "--loss",
            "chunked_ce",
            "--out",
            "/tmp/autopart-never",
        ],
        "not gpt-mini (gpt)",
    );
    fails_with(
        &[
            "compile",
            "--model",
            "llama-mini",
            "--plan-ngpus",
            "1",
            "--loss",
            "chunked_ce",
            "--out",
            "/tmp/autopart-never",
        ],
        "chunked_ce",
    );
    assert!(!std::path::Path::new("/tmp/autopart-never/plan.ron").exists());
}

#[test]
fn compile_reads_a_constraints_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let constraints = dir.path().join("constraints.ron");
    std::fs::write(
        &constraints,
        "(tp: Some(2), zero: Some(1), splits: {\"layers.*.mlp.down_proj\": None})\n",
    )
    .expect("write");
    let out = dir.path().join("out");
    let v = json(&[
        "compile",
        "--model",
        "llama-mini",
        "--plan-ngpus",
        "4",
        "--cluster",
        "cpu",
        "--seq-len",
        "64",
        "--global-batch",
        "8",
        "--constraints",
        &constraints.to_string_lossy(),
        "--out",
        &out.to_string_lossy(),
        "--json",
        "--no-build",
    ]);
    assert_eq!(v["tp"].as_u64(), Some(2), "{v}");
    assert_eq!(v["zero"].as_u64(), Some(1), "{v}");
    let plan = autopart::plan::read_plan(&out.join("plan.ron")).expect("plan");
    let down = plan
        .sharding
        .iter()
        .find(|s| s.op == "layers.*.mlp.down_proj")
        .expect("down_proj entry");
    assert_eq!(down.split, None);

    std::fs::write(&constraints, "(tp: Some(2),\n zeroo: Some(1))\n").expect("write");
    fails_with(
        &[
            "compile",
            "--model",
            "llama-mini",
            "--plan-ngpus",
            "4",
            "--constraints",
            &constraints.to_string_lossy(),
        ],
        "constraints.ron:2:",
    );
}
