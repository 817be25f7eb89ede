//! Model families and their presets.
//!
//! `llama` covers Llama 2, Llama 3 and Llama 3.1 (GQA, RoPE, SwiGLU, RMSNorm,
//! tied or untied head); `gpt` covers GPT-2/3 style models (learned
//! positions, LayerNorm, GeLU MLP, tied embeddings; grouped-query and
//! untied variants for pricing). Each family builds its
//! forward graph, ending in a scalar cross-entropy loss, through a [`Tracer`].

mod gpt;
mod llama;

use std::path::Path;

use super::config::{ConfigError, ModelConfig};
use super::{TraceError, TraceOptions, Tracer};
use crate::anno::Registry;
use crate::ir::Graph;

/// A Llama-family model (HF `LlamaConfig` field meanings).
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub name: String,
    pub hidden: u64,
    pub intermediate: u64,
    pub n_layers: u64,
    pub n_heads: u64,
    pub n_kv_heads: u64,
    pub head_dim: u64,
    pub vocab: u64,
    pub max_positions: u64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Rotary frequency scaling (Llama 3.1's `llama3`, or `linear`);
    /// `None` is plain RoPE.
    pub rope_scaling: Option<RopeScaling>,
    pub tie_embeddings: bool,
    /// A registered op that replaces the head's projection and
    /// cross-entropy (`hidden, head weight, labels -> per-token loss`), e.g.
    /// `chunked_ce`; `None` keeps `lm_head` + `cross_entropy`.
    pub loss_op: Option<String>,
    /// The config.json's special token ids, carried into the plan's own.
    pub token_ids: TokenIds,
}

/// A config.json's `bos_token_id`, `eos_token_id` and `pad_token_id` (a
/// number or a list of numbers), as given: the compiler does not use them,
/// but the config.json the plan carries (and `ckpt export --hf` writes)
/// keeps them, so that generation stops where transformers' would.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TokenIds(pub Vec<(String, serde_json::Value)>);

impl TokenIds {
    /// The keys this carries.
    pub const KEYS: [&'static str; 3] = ["bos_token_id", "eos_token_id", "pad_token_id"];

    /// The ids of `obj` (other shapes of those fields are left out).
    pub fn of(obj: &serde_json::Map<String, serde_json::Value>) -> Self {
        let id = |v: &serde_json::Value| v.as_u64().is_some();
        Self(
            Self::KEYS
                .iter()
                .filter_map(|&k| {
                    let v = obj.get(k)?;
                    let ok = id(v)
                        || v.as_array()
                            .is_some_and(|a| !a.is_empty() && a.iter().all(id));
                    ok.then(|| (k.to_string(), v.clone()))
                })
                .collect(),
        )
    }

    /// Adds the ids to a config.json object.
    pub fn write_into(&self, json: &mut serde_json::Value) {
        for (k, v) in &self.0 {
            json[k.as_str()] = v.clone();
        }
    }
}

/// How the rotary frequencies are rescaled for longer contexts, as
/// transformers' `rope_type` names them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    /// Llama 3.1: low frequencies divided by `factor`, high ones kept, a
    /// smooth blend between (wavelengths measured against
    /// `original_max_positions`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_positions: u64,
    },
    /// Positions divided by `factor`.
    Linear { factor: f64 },
}

/// A GPT-2/3 style model.
#[derive(Clone, Debug, PartialEq)]
pub struct GptConfig {
    pub name: String,
    pub n_layers: u64,
    pub hidden: u64,
    pub n_heads: u64,
    /// Key/value heads: `n_heads` in GPT-2/3 (multi-head attention); fewer
    /// in grouped-query variants such as Nemotron-4, which `validate`
    /// prices (HF's GPT-2 format has no such field, so those are not
    /// compiled into plans).
    pub n_kv_heads: u64,
    /// MLP inner width (4 × hidden in GPT-2/3).
    pub ffn: u64,
    pub vocab: u64,
    pub n_positions: u64,
    pub layer_norm_eps: f64,
    /// The head reuses the token embedding (GPT-2/3); `false` gives it its
    /// own `lm_head.weight` (Nemotron-4).
    pub tie_embeddings: bool,
    /// The config.json's special token ids, carried into the plan's own.
    pub token_ids: TokenIds,
}

#[allow(clippy::too_many_arguments)]
fn llama(
    name: &str,
    hidden: u64,
    intermediate: u64,
    n_layers: u64,
    n_heads: u64,
    n_kv_heads: u64,
    vocab: u64,
    max_positions: u64,
    rms_norm_eps: f64,
    rope_theta: f64,
) -> ModelConfig {
    ModelConfig::Llama(LlamaConfig {
        name: name.to_string(),
        hidden,
        intermediate,
        n_layers,
        n_heads,
        n_kv_heads,
        head_dim: hidden / n_heads,
        vocab,
        max_positions,
        rms_norm_eps,
        rope_theta,
        rope_scaling: None,
        tie_embeddings: false,
        loss_op: None,
        token_ids: TokenIds::default(),
    })
}

/// Llama 3.1's published rotary scaling (its HF config.json).
const LLAMA31_ROPE: RopeScaling = RopeScaling::Llama3 {
    factor: 8.0,
    low_freq_factor: 1.0,
    high_freq_factor: 4.0,
    original_max_positions: 8192,
};

fn with_rope_scaling(mut cfg: ModelConfig, scaling: RopeScaling) -> ModelConfig {
    if let ModelConfig::Llama(c) = &mut cfg {
        c.rope_scaling = Some(scaling);
    }
    cfg
}

fn gpt(name: &str, n_layers: u64, hidden: u64, n_heads: u64, vocab: u64, seq: u64) -> ModelConfig {
    ModelConfig::Gpt(GptConfig {
        name: name.to_string(),
        n_layers,
        hidden,
        n_heads,
        n_kv_heads: n_heads,
        ffn: 4 * hidden,
        vocab,
        n_positions: seq,
        layer_norm_eps: 1e-5,
        tie_embeddings: true,
        token_ids: TokenIds::default(),
    })
}

/// Names of the built-in presets, in the order `preset` lists them.
pub const PRESETS: [&str; 15] = [
    "llama-mini",
    "llama2-7b",
    "llama2-13b",
    "llama2-70b",
    "llama3-8b",
    "llama3-70b",
    "llama3.1-8b",
    "llama3.1-70b",
    "llama3.1-405b",
    "gpt-mini",
    "gpt2",
    "gpt2-medium",
    "gpt2-large",
    "gpt2-xl",
    "gpt3-175b",
];

/// A built-in model preset, or an error listing the known ones.
pub fn preset(name: &str) -> Result<ModelConfig, ConfigError> {
    // Figures from the models' published HF configs.
    let cfg = match name {
        "llama-mini" => llama(name, 64, 176, 4, 4, 2, 256, 128, 1e-5, 10_000.0),
        "llama2-7b" => llama(name, 4096, 11008, 32, 32, 32, 32000, 4096, 1e-5, 10_000.0),
        "llama2-13b" => llama(name, 5120, 13824, 40, 40, 40, 32000, 4096, 1e-5, 10_000.0),
        "llama2-70b" => llama(name, 8192, 28672, 80, 64, 8, 32000, 4096, 1e-5, 10_000.0),
        "llama3-8b" => llama(name, 4096, 14336, 32, 32, 8, 128256, 8192, 1e-5, 500_000.0),
        "llama3-70b" => llama(name, 8192, 28672, 80, 64, 8, 128256, 8192, 1e-5, 500_000.0),
        "llama3.1-8b" => with_rope_scaling(
            llama(
                name, 4096, 14336, 32, 32, 8, 128256, 131072, 1e-5, 500_000.0,
            ),
            LLAMA31_ROPE,
        ),
        "llama3.1-70b" => with_rope_scaling(
            llama(
                name, 8192, 28672, 80, 64, 8, 128256, 131072, 1e-5, 500_000.0,
            ),
            LLAMA31_ROPE,
        ),
        "llama3.1-405b" => with_rope_scaling(
            llama(
                name, 16384, 53248, 126, 128, 8, 128256, 131072, 1e-5, 500_000.0,
            ),
            LLAMA31_ROPE,
        ),
        "gpt-mini" => gpt(name, 2, 64, 4, 256, 64),
        "gpt2" => gpt(name, 12, 768, 12, 50257, 1024),
        "gpt2-medium" => gpt(name, 24, 1024, 16, 50257, 1024),
        "gpt2-large" => gpt(name, 36, 1280, 20, 50257, 1024),
        "gpt2-xl" => gpt(name, 48, 1600, 25, 50257, 1024),
        "gpt3-175b" => gpt(name, 96, 12288, 96, 50257, 2048),
        _ => {
            return Err(ConfigError::Inconsistent {
                origin: format!("--model {name}"),
                what: format!(
                    "unknown preset (known presets: {}; or pass a path to a HuggingFace config.json)",
                    PRESETS.join(", ")
                ),
            });
        }
    };
    Ok(cfg)
}

/// A preset name, or a path to a HuggingFace `config.json` (any argument
/// that names an existing file or ends in `.json`).
pub fn load_model(spec: &str) -> Result<ModelConfig, ConfigError> {
    let path = Path::new(spec);
    if spec.ends_with(".json") || path.is_file() {
        ModelConfig::from_hf_file(path)
    } else {
        preset(spec)
    }
}

/// `copies` traced copies of each kv head must divide a kv group's query
/// heads; returns `copies`.
fn check_kv_copies(n_heads: u64, n_kv_heads: u64, copies: u64) -> Result<u64, TraceError> {
    let group = n_heads / n_kv_heads.max(1);
    if copies == 0 || group % copies != 0 {
        return Err(TraceError::Option(format!(
            "{copies} copies of each kv head do not divide the {group} query heads of a kv group"
        )));
    }
    Ok(copies)
}

/// Traces one training step's forward graph of `model`, ending in the loss.
pub fn trace_model(
    model: &ModelConfig,
    options: &TraceOptions,
    registry: &Registry,
) -> Result<Graph, TraceError> {
    model
        .validate()
        .map_err(|e| TraceError::Option(e.to_string()))?;
    let seq = options.seq_len.unwrap_or_else(|| model.default_seq_len());
    if options.batch == 0 {
        return Err(TraceError::Option("--batch must be at least 1".into()));
    }
    if seq == 0 {
        return Err(TraceError::Option("--seq-len must be at least 1".into()));
    }
    let mut tracer = Tracer::new(model.name(), registry);
    match model {
        ModelConfig::Llama(c) => {
            let m = check_kv_copies(c.n_heads, c.n_kv_heads, options.kv_copies)?;
            llama::trace(&mut tracer, c, options.batch, seq, options.dtype, m)?
        }
        ModelConfig::Gpt(c) => {
            if seq > c.n_positions {
                return Err(TraceError::Option(format!(
                    "--seq-len {seq} exceeds the {} learned positions of {}",
                    c.n_positions, c.name
                )));
            }
            let m = check_kv_copies(c.n_heads, c.n_kv_heads, options.kv_copies)?;
            gpt::trace(&mut tracer, c, options.batch, seq, options.dtype, m)?
        }
    }
    tracer.finish()
}
