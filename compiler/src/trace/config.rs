//! Model configurations: validation and HuggingFace `config.json` parsing.
//!
//! A config.json is read field by field so that a missing or mistyped field
//! is reported by name, with the file it came from; JSON syntax errors carry
//! line and column.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use thiserror::Error;

use super::models::{GptConfig, LlamaConfig};

/// A model of one of the supported families.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelConfig {
    Llama(LlamaConfig),
    Gpt(GptConfig),
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{col}: invalid JSON: {msg}")]
    Json {
        path: PathBuf,
        line: usize,
        col: usize,
        msg: String,
    },
    #[error("{path}: expected a JSON object at the top level")]
    NotObject { path: PathBuf },
    #[error("{path}: missing field '{field}' ({expected})")]
    Missing {
        path: PathBuf,
        field: &'static str,
        expected: &'static str,
    },
    #[error("{path}: field '{field}' is {found}, expected {expected}")]
    BadField {
        path: PathBuf,
        field: &'static str,
        expected: &'static str,
        found: String,
    },
    #[error("{path}: model_type '{model_type}' is not supported (supported: llama, gpt2)")]
    UnsupportedType { path: PathBuf, model_type: String },
    #[error("{origin}: {what}")]
    Inconsistent { origin: String, what: String },
}

/// The most transformer layers a model may have (the deepest published
/// models have about a thousand; each layer is traced op by op).
pub const MAX_LAYERS: u64 = 1 << 14;

impl ModelConfig {
    /// Replaces the head's projection and cross-entropy with the registered
    /// op `op` (`hidden, head weight, labels -> per-token loss`). Llama only.
    pub fn set_loss_op(&mut self, op: &str) -> Result<(), String> {
        match self {
            ModelConfig::Llama(c) => {
                c.loss_op = Some(op.to_string());
                Ok(())
            }
            ModelConfig::Gpt(c) => Err(format!(
                "--loss {op}: a custom loss op is supported for llama-family models, not {} (gpt)",
                c.name
            )),
        }
    }

    /// The custom loss op, if any.
    pub fn loss_op(&self) -> Option<&str> {
        match self {
            ModelConfig::Llama(c) => c.loss_op.as_deref(),
            ModelConfig::Gpt(_) => None,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            ModelConfig::Llama(c) => &c.name,
            ModelConfig::Gpt(c) => &c.name,
        }
    }

    pub fn family(&self) -> &'static str {
        match self {
            ModelConfig::Llama(_) => "llama",
            ModelConfig::Gpt(_) => "gpt",
        }
    }

    pub fn n_layers(&self) -> u64 {
        match self {
            ModelConfig::Llama(c) => c.n_layers,
            ModelConfig::Gpt(c) => c.n_layers,
        }
    }

    /// The sequence length traced when the user gives none: the model's
    /// context, capped at 8192 (long-context variants are traced at 8K by
    /// default, as their pre-training mostly ran).
    pub fn default_seq_len(&self) -> u64 {
        match self {
            ModelConfig::Llama(c) => c.max_positions.min(8192),
            ModelConfig::Gpt(c) => c.n_positions.min(8192),
        }
    }

    /// Checks the structural constraints the tracer relies on. `origin`
    /// names the preset or file in the error.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let origin = self.name().to_string();
        let bad = |what: String| {
            Err(ConfigError::Inconsistent {
                origin: origin.clone(),
                what,
            })
        };
        match self {
            ModelConfig::Llama(c) => {
                for (field, v) in [
                    ("hidden_size", c.hidden),
                    ("intermediate_size", c.intermediate),
                    ("num_hidden_layers", c.n_layers),
                    ("num_attention_heads", c.n_heads),
                    ("num_key_value_heads", c.n_kv_heads),
                    ("vocab_size", c.vocab),
                    ("max_position_embeddings", c.max_positions),
                    ("head_dim", c.head_dim),
                ] {
                    if v == 0 {
                        return bad(format!("{field} must be positive, got 0"));
                    }
                }
                if c.n_layers > MAX_LAYERS {
                    return bad(format!(
                        "num_hidden_layers {} is more than the {MAX_LAYERS} autopart supports",
                        c.n_layers
                    ));
                }
                if c.n_heads % c.n_kv_heads != 0 {
                    return bad(format!(
                        "num_key_value_heads {} does not divide num_attention_heads {}",
                        c.n_kv_heads, c.n_heads
                    ));
                }
                if c.head_dim % 2 != 0 {
                    return bad(format!("head_dim {} must be even for RoPE", c.head_dim));
                }
                if !(c.rms_norm_eps > 0.0 && c.rms_norm_eps.is_finite()) {
                    return bad(format!(
                        "rms_norm_eps must be positive, got {}",
                        c.rms_norm_eps
                    ));
                }
                if !(c.rope_theta > 0.0 && c.rope_theta.is_finite()) {
                    return bad(format!("rope_theta must be positive, got {}", c.rope_theta));
                }
            }
            ModelConfig::Gpt(c) => {
                for (field, v) in [
                    ("n_embd", c.hidden),
                    ("n_layer", c.n_layers),
                    ("n_head", c.n_heads),
                    ("n_inner", c.ffn),
                    ("vocab_size", c.vocab),
                    ("n_positions", c.n_positions),
                ] {
                    if v == 0 {
                        return bad(format!("{field} must be positive, got 0"));
                    }
                }
                if c.n_layers > MAX_LAYERS {
                    return bad(format!(
                        "n_layer {} is more than the {MAX_LAYERS} autopart supports",
                        c.n_layers
                    ));
                }
                if c.hidden % c.n_heads != 0 {
                    return bad(format!(
                        "n_embd {} is not divisible by n_head {}",
                        c.hidden, c.n_heads
                    ));
                }
                if !(c.layer_norm_eps > 0.0 && c.layer_norm_eps.is_finite()) {
                    return bad(format!(
                        "layer_norm_epsilon must be positive, got {}",
                        c.layer_norm_eps
                    ));
                }
            }
        }
        Ok(())
    }

    /// Reads and validates a HuggingFace `config.json` (Llama or GPT-2).
    pub fn from_hf_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_hf_str(&text, path)
    }

    /// Parses the text of a `config.json`; `path` is used in errors and for
    /// the model name (the parent folder, or the file stem).
    pub fn from_hf_str(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let value: Value = serde_json::from_str(text).map_err(|e| ConfigError::Json {
            path: path.to_path_buf(),
            line: e.line(),
            col: e.column(),
            msg: e.to_string(),
        })?;
        let Value::Object(obj) = value else {
            return Err(ConfigError::NotObject {
                path: path.to_path_buf(),
            });
        };
        let f = Fields { path, obj: &obj };
        let name = model_name(path);
        let model_type = f.string("model_type", "\"llama\" or \"gpt2\"")?;
        let cfg = match model_type.as_str() {
            "llama" => {
                let hidden = f.uint("hidden_size")?;
                let n_heads = f.uint("num_attention_heads")?;
                let n_kv_heads = f.opt_uint("num_key_value_heads")?.unwrap_or(n_heads);
                let head_dim = match f.opt_uint("head_dim")? {
                    Some(d) => d,
                    None => {
                        if n_heads == 0 || hidden % n_heads != 0 {
                            return Err(ConfigError::Inconsistent {
                                origin: path.display().to_string(),
                                what: format!(
                                    "hidden_size {hidden} is not divisible by num_attention_heads {n_heads}"
                                ),
                            });
                        }
                        hidden / n_heads
                    }
                };
                ModelConfig::Llama(LlamaConfig {
                    name,
                    hidden,
                    intermediate: f.uint("intermediate_size")?,
                    n_layers: f.uint("num_hidden_layers")?,
                    n_heads,
                    n_kv_heads,
                    head_dim,
                    vocab: f.uint("vocab_size")?,
                    max_positions: f.opt_uint("max_position_embeddings")?.unwrap_or(2048),
                    rms_norm_eps: f.opt_float("rms_norm_eps")?.unwrap_or(1e-6),
                    rope_theta: f.opt_float("rope_theta")?.unwrap_or(10_000.0),
                    tie_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
                    loss_op: None,
                })
            }
            "gpt2" => {
                let hidden = f.uint("n_embd")?;
                ModelConfig::Gpt(GptConfig {
                    name,
                    n_layers: f.uint("n_layer")?,
                    hidden,
                    n_heads: f.uint("n_head")?,
                    // Saturating: tracing refuses a width that large.
                    ffn: f.opt_uint("n_inner")?.unwrap_or(hidden.saturating_mul(4)),
                    vocab: f.uint("vocab_size")?,
                    n_positions: f.opt_uint("n_positions")?.unwrap_or(1024),
                    layer_norm_eps: f.opt_float("layer_norm_epsilon")?.unwrap_or(1e-5),
                })
            }
            other => {
                return Err(ConfigError::UnsupportedType {
                    path: path.to_path_buf(),
                    model_type: other.to_string(),
                });
            }
        };
        cfg.validate().map_err(|e| match e {
            ConfigError::Inconsistent { what, .. } => ConfigError::Inconsistent {
                origin: path.display().to_string(),
                what,
            },
            other => other,
        })?;
        Ok(cfg)
    }
}

fn model_name(path: &Path) -> String {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
    if stem == "config" {
        if let Some(dir) = path
            .parent()
            .and_then(|p| p.file_name())
            .and_then(|s| s.to_str())
        {
            return dir.to_string();
        }
    }
    stem.to_string()
}

/// Typed access to the fields of a config object, with errors naming them.
struct Fields<'a> {
    path: &'a Path,
    obj: &'a Map<String, Value>,
}

fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

impl Fields<'_> {
    fn bad(&self, field: &'static str, expected: &'static str, v: &Value) -> ConfigError {
        ConfigError::BadField {
            path: self.path.to_path_buf(),
            field,
            expected,
            found: describe(v),
        }
    }

    fn get(&self, field: &'static str) -> Option<&Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }

    fn string(&self, field: &'static str, expected: &'static str) -> Result<String, ConfigError> {
        match self.get(field) {
            None => Err(ConfigError::Missing {
                path: self.path.to_path_buf(),
                field,
                expected,
            }),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(self.bad(field, expected, v)),
        }
    }

    fn opt_uint(&self, field: &'static str) -> Result<Option<u64>, ConfigError> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.bad(field, "a non-negative integer", v)),
        }
    }

    fn uint(&self, field: &'static str) -> Result<u64, ConfigError> {
        self.opt_uint(field)?.ok_or_else(|| ConfigError::Missing {
            path: self.path.to_path_buf(),
            field,
            expected: "a non-negative integer",
        })
    }

    fn opt_float(&self, field: &'static str) -> Result<Option<f64>, ConfigError> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.bad(field, "a number", v)),
        }
    }

    fn opt_bool(&self, field: &'static str) -> Result<Option<bool>, ConfigError> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.bad(field, "true or false", v)),
        }
    }
}
