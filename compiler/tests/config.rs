//! HuggingFace config.json parsing: the supported families and every kind of
//! bad input (each an error naming the file and field, never a panic).

use std::path::Path;

use autopart::anno::builtin_registry;
use autopart::trace::{ConfigError, ModelConfig, TraceOptions, preset, trace_model};

fn data(name: &str) -> String {
    format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn parse(text: &str) -> Result<ModelConfig, ConfigError> {
    ModelConfig::from_hf_str(text, Path::new("models/test/config.json"))
}

/// A valid Llama config with `field` replaced by `value` (or removed when
/// `value` is None).
fn llama_with(field: &str, value: Option<serde_json::Value>) -> String {
    let text = std::fs::read_to_string(data("llama3-8b.config.json")).expect("test data");
    let mut v: serde_json::Value = serde_json::from_str(&text).expect("valid json");
    let obj = v.as_object_mut().expect("object");
    match value {
        Some(x) => obj.insert(field.to_string(), x),
        None => obj.remove(field),
    };
    v.to_string()
}

#[test]
fn llama3_config_json_equals_the_preset() {
    let cfg = ModelConfig::from_hf_file(Path::new(&data("llama3-8b.config.json"))).expect("valid");
    let ModelConfig::Llama(mut got) = cfg else {
        panic!("a llama config")
    };
    let ModelConfig::Llama(want) = preset("llama3-8b").expect("preset") else {
        panic!("a llama preset")
    };
    got.name = want.name.clone();
    // The special token ids are the file's (a preset has none).
    assert_eq!(
        got.token_ids.0,
        vec![
            ("bos_token_id".to_string(), serde_json::json!(128000)),
            ("eos_token_id".to_string(), serde_json::json!(128001)),
        ]
    );
    got.token_ids = want.token_ids.clone();
    assert_eq!(got, want);
}

/// The plan's config.json (what checkpoints carry and `ckpt export --hf`
/// writes) reads back to the same config, special token ids included.
#[test]
fn the_plans_config_json_reads_back_with_its_token_ids() {
    for text in [
        llama_with(
            "eos_token_id",
            Some(serde_json::json!([128001, 128008, 128009])),
        ),
        llama_with("pad_token_id", Some(serde_json::json!("not an id"))),
        std::fs::read_to_string(data("gpt2.config.json")).expect("test data"),
    ] {
        let cfg = parse(&text).expect("valid");
        let json = cfg.to_hf_json();
        let again = parse(&json.to_string()).expect("its own config.json");
        assert_eq!(again, cfg, "{json}");
        let given: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(json["eos_token_id"], given["eos_token_id"], "{json}");
        assert_eq!(
            json.get("pad_token_id"),
            None,
            "only ids are carried: {json}"
        );
    }
}

#[test]
fn gpt2_config_json_traces_to_124m_parameters() {
    let cfg = ModelConfig::from_hf_file(Path::new(&data("gpt2.config.json"))).expect("valid");
    assert_eq!(cfg.family(), "gpt");
    let ModelConfig::Gpt(g) = &cfg else {
        panic!("a gpt config")
    };
    assert_eq!(g.ffn, 3072, "n_inner null means 4 x n_embd");
    let options = TraceOptions {
        seq_len: Some(64),
        ..TraceOptions::default()
    };
    let graph = trace_model(&cfg, &options, &builtin_registry()).expect("traces");
    assert_eq!(graph.n_params(), 124_439_808);
}

#[test]
fn tied_llama_config_has_no_separate_head() {
    let text = llama_with("tie_word_embeddings", Some(true.into()));
    let cfg = parse(&text).expect("valid");
    let graph = trace_model(
        &cfg,
        &TraceOptions {
            seq_len: Some(16),
            ..TraceOptions::default()
        },
        &builtin_registry(),
    )
    .expect("traces");
    assert_eq!(graph.n_params(), 8_030_261_248 - 128_256 * 4096);
}

#[test]
fn missing_field_is_named() {
    let err = parse(&llama_with("hidden_size", None)).expect_err("missing");
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            ConfigError::Missing { ref field, .. } if field == "hidden_size"
        ),
        "{msg}"
    );
    assert!(msg.contains("models/test/config.json"), "{msg}");
}

#[test]
fn wrong_type_is_named_with_what_was_found() {
    let err = parse(&llama_with("num_hidden_layers", Some("32".into()))).expect_err("string");
    assert_eq!(
        err.to_string(),
        "models/test/config.json: field 'num_hidden_layers' is the string \"32\", expected a non-negative integer"
    );
}

#[test]
fn zero_heads_is_an_error() {
    let err = parse(&llama_with("num_attention_heads", Some(0.into()))).expect_err("zero heads");
    assert!(err.to_string().contains("num_attention_heads"), "{err}");
}

#[test]
fn hidden_not_divisible_by_heads_is_an_error() {
    let err = parse(&llama_with("num_attention_heads", Some(30.into()))).expect_err("4096 % 30");
    assert!(
        err.to_string()
            .contains("hidden_size 4096 is not divisible by num_attention_heads 30"),
        "{err}"
    );
    let gpt =
        r#"{"model_type": "gpt2", "n_embd": 100, "n_layer": 2, "n_head": 3, "vocab_size": 10}"#;
    let err = parse(gpt).expect_err("100 % 3");
    assert!(
        err.to_string()
            .contains("n_embd 100 is not divisible by n_head 3"),
        "{err}"
    );
}

#[test]
fn kv_heads_must_divide_heads() {
    let err = parse(&llama_with("num_key_value_heads", Some(5.into()))).expect_err("32 % 5");
    assert!(
        err.to_string()
            .contains("num_key_value_heads 5 does not divide num_attention_heads 32"),
        "{err}"
    );
}

#[test]
fn malformed_json_has_line_and_column() {
    let err = parse("{\n  \"model_type\": \"llama\",\n  \"hidden_size\": 4096,,\n}")
        .expect_err("bad json");
    let msg = err.to_string();
    assert!(msg.starts_with("models/test/config.json:3:"), "{msg}");
    assert!(matches!(err, ConfigError::Json { line: 3, .. }), "{msg}");
}

#[test]
fn unsupported_model_type_lists_the_supported() {
    let err = parse(r#"{"model_type": "mamba"}"#).expect_err("unsupported");
    assert_eq!(
        err.to_string(),
        "models/test/config.json: model_type 'mamba' is not supported (supported: llama, gpt2)"
    );
    assert!(matches!(
        parse("[1, 2]"),
        Err(ConfigError::NotObject { .. })
    ));
}

#[test]
fn unreadable_file_is_an_error() {
    let err =
        ModelConfig::from_hf_file(Path::new("/nonexistent/config.json")).expect_err("no file");
    assert!(
        err.to_string().contains("/nonexistent/config.json"),
        "{err}"
    );
}

/// GPT-2 ties its head to the token embedding; an untied config.json is
/// refused by name rather than traced as tied.
#[test]
fn an_untied_gpt2_config_is_refused() {
    let text = std::fs::read_to_string(data("gpt2.config.json")).expect("test data");
    let mut v: serde_json::Value = serde_json::from_str(&text).expect("valid json");
    v["tie_word_embeddings"] = false.into();
    let err = parse(&v.to_string()).expect_err("untied gpt2").to_string();
    assert!(err.contains("tie_word_embeddings: false"), "{err}");
    assert!(err.contains("config.json"), "{err}");
    v["tie_word_embeddings"] = true.into();
    let ModelConfig::Gpt(c) = parse(&v.to_string()).expect("tied gpt2") else {
        panic!("gpt2 family");
    };
    assert!(c.tie_embeddings);
    assert_eq!(c.n_kv_heads, c.n_heads);
}
