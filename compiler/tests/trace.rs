//! Tracer tests: IR snapshot, exact parameter counts, every preset traces
//! and verifies, unknown ops and bad options are errors.

use autopart::anno::{Registry, builtin_registry};
use autopart::ir::{DType, OpKind, Role, verify};
use autopart::trace::{PRESETS, Summary, TraceError, TraceOptions, preset, trace_model};
use expect_test::expect_file;

fn trace(name: &str, batch: u64, seq: u64) -> autopart::ir::Graph {
    let model = preset(name).expect("preset exists");
    let options = TraceOptions {
        batch,
        seq_len: Some(seq),
        dtype: DType::Bf16,
        kv_copies: 1,
    };
    trace_model(&model, &options, &builtin_registry()).expect("traces")
}

#[test]
fn llama_mini_ir_snapshot() {
    let model = preset("llama-mini").expect("preset exists");
    let options = TraceOptions {
        batch: 2,
        seq_len: Some(16),
        dtype: DType::F32,
        kv_copies: 1,
    };
    let graph = trace_model(&model, &options, &builtin_registry()).expect("traces");
    // UPDATE_EXPECT=1 cargo test -p autopart --test trace  re-blesses it.
    expect_file!["snapshots/llama-mini.ir"].assert_eq(&graph.to_string());
}

#[test]
fn gpt_mini_ir_snapshot() {
    let graph = trace("gpt-mini", 2, 16);
    expect_file!["snapshots/gpt-mini.ir"].assert_eq(&graph.to_string());
}

#[test]
fn parameter_counts_are_exact() {
    for (name, expected) in [
        ("llama3-8b", 8_030_261_248u64),
        ("llama2-7b", 6_738_415_616),
        ("llama3-70b", 70_553_706_496),
        ("llama2-13b", 13_015_864_320),
        ("llama2-70b", 68_976_648_192),
        // GPT-2 small as published (tied head, 1024 learned positions).
        ("gpt2", 124_439_808),
    ] {
        let graph = trace(name, 1, 128);
        assert_eq!(graph.n_params(), expected, "{name}");
    }
}

#[test]
fn every_preset_traces_and_verifies() {
    let registry = builtin_registry();
    for name in PRESETS {
        let model = preset(name).expect("listed presets exist");
        let graph = trace_model(&model, &TraceOptions::default(), &registry)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        verify(&graph).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert_eq!(u64::from(graph.n_layers()), model.n_layers(), "{name}");
        // One loss, a scalar-like single element, produced last.
        let (last_id, last) = graph.ops().last().expect("non-empty graph");
        assert_eq!(last.kind, OpKind::Mean, "{name}");
        let loss = graph.tensor(last.outputs[0]);
        assert_eq!(loss.numel(), 1, "{name}");
        assert_eq!(graph.topo_order().expect("acyclic").last(), Some(&last_id));
        // Every layer has the same op sequence: the search solves one layer
        // and reuses it.
        let kinds =
            |l: u32| -> Vec<OpKind> { graph.layer_ops(l).map(|(_, o)| o.kind.clone()).collect() };
        for l in 1..graph.n_layers() {
            assert_eq!(kinds(l), kinds(0), "{name} layer {l}");
        }
        // Inputs and labels are the only non-parameter leaves.
        let leaves: Vec<Role> = graph
            .tensors()
            .filter(|(id, t)| graph.producer(*id).is_none() && t.role != Role::Parameter)
            .map(|(_, t)| t.role)
            .collect();
        assert_eq!(leaves, vec![Role::Input, Role::Label], "{name}");
    }
}

#[test]
fn flops_per_token_matches_the_six_n_rule_of_thumb() {
    // Training FLOPs per token ~ 6 x (non-embedding params + head) plus
    // attention 12 * layers * hidden * seq (no causal discount).
    let registry = builtin_registry();
    let graph = trace("llama3-8b", 1, 8192);
    let summary = Summary::new(&graph, "llama", &registry).expect("summary");
    let n = graph.n_params() as f64;
    let embed = 128_256.0 * 4096.0;
    let expected = 6.0 * (n - embed) + 12.0 * 32.0 * 4096.0 * 8192.0;
    let rel = (summary.flops_per_token - expected).abs() / expected;
    assert!(
        rel < 0.01,
        "flops/token {} vs {expected} ({rel})",
        summary.flops_per_token
    );
    assert_eq!(summary.params, 8_030_261_248);
    assert_eq!(summary.params_by_kind["embedding"], 525_336_576);
    assert_eq!(summary.params_by_kind["head"], 525_336_576);
    assert_eq!(summary.ops_by_kind["attention"], 32);
}

#[test]
fn tied_head_shares_the_embedding() {
    let graph = trace("gpt-mini", 1, 8);
    let head = graph
        .ops()
        .find(|(_, o)| o.name == "lm_head")
        .map(|(_, o)| o.inputs[1])
        .expect("lm_head exists");
    assert_eq!(graph.tensor(head).name, "transformer.wte.weight");
    assert_eq!(graph.consumers(head).len(), 2);
}

#[test]
fn an_op_missing_from_the_registry_names_op_and_file() {
    // A registry with everything but the elementwise family.
    let mut registry = Registry::default();
    for file in ["embedding", "linear", "norm", "attention", "loss"] {
        let path = format!("{}/../annotations/{file}.ron", env!("CARGO_MANIFEST_DIR"));
        registry
            .load_file(std::path::Path::new(&path))
            .expect("built-in file loads");
    }
    let model = preset("llama-mini").expect("preset exists");
    let err = trace_model(&model, &TraceOptions::default(), &registry).expect_err("add is missing");
    assert!(matches!(err, TraceError::UnknownOp { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("'add'"), "{msg}");
    assert!(msg.contains("layers.0.attn_residual"), "{msg}");
    assert!(msg.contains("annotations/elementwise.ron"), "{msg}");
}

#[test]
fn bad_tracing_options_are_errors() {
    let registry = builtin_registry();
    let gpt = preset("gpt-mini").expect("preset exists");
    let too_long = TraceOptions {
        seq_len: Some(65),
        ..TraceOptions::default()
    };
    let msg = trace_model(&gpt, &too_long, &registry)
        .expect_err("64 positions only")
        .to_string();
    assert!(msg.contains("exceeds the 64 learned positions"), "{msg}");
    let zero = TraceOptions {
        batch: 0,
        ..TraceOptions::default()
    };
    assert!(trace_model(&gpt, &zero, &registry).is_err());
}

#[test]
fn unknown_preset_lists_the_known_ones() {
    let msg = preset("llama4-1t").expect_err("not a preset").to_string();
    assert!(msg.contains("unknown preset"), "{msg}");
    for name in PRESETS {
        assert!(msg.contains(name), "{msg} lacks {name}");
    }
}
