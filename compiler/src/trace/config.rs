//! Model configurations: validation and HuggingFace `config.json` parsing.
//!
//! A config.json is read field by field so that a missing or mistyped field
//! is reported by name, with the file it came from; JSON syntax errors carry
//! line and column.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use thiserror::Error;

use super::models::{GptConfig, LlamaConfig, RopeScaling, TokenIds};

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
        field: String,
        expected: &'static str,
    },
    #[error("{path}: field '{field}' is {found}, expected {expected}")]
    BadField {
        path: PathBuf,
        field: String,
        expected: &'static str,
        found: String,
    },
    #[error("{path}: {what} is not supported by autopart's {family} ({supported})")]
    Unsupported {
        path: PathBuf,
        family: &'static str,
        what: String,
        supported: &'static str,
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
                let positive = |x: f64| x > 0.0 && x.is_finite();
                match c.rope_scaling {
                    None => {}
                    Some(RopeScaling::Linear { factor }) if !positive(factor) => {
                        return bad(format!(
                            "rope scaling factor must be positive, got {factor}"
                        ));
                    }
                    Some(RopeScaling::Linear { .. }) => {}
                    Some(RopeScaling::Llama3 {
                        factor,
                        low_freq_factor: low,
                        high_freq_factor: high,
                        original_max_positions,
                    }) => {
                        if !(positive(factor) && positive(low) && positive(high) && low < high) {
                            return bad(format!(
                                "llama3 rope scaling needs a positive factor and 0 < low_freq_factor < high_freq_factor, got factor {factor}, low_freq_factor {low}, high_freq_factor {high}"
                            ));
                        }
                        if original_max_positions == 0 {
                            return bad(
                                "llama3 rope scaling needs original_max_position_embeddings > 0"
                                    .into(),
                            );
                        }
                    }
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
                if c.n_kv_heads == 0 || c.n_heads % c.n_kv_heads != 0 {
                    return bad(format!(
                        "{} key/value heads do not divide the {} query heads",
                        c.n_kv_heads, c.n_heads
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

    /// The model as a HuggingFace `config.json` that transformers 4.x and
    /// 5.x load (`LlamaForCausalLM`, `GPT2LMHeadModel`) and
    /// [`ModelConfig::from_hf_str`] reads back to the same config: the
    /// rotary settings are written both ways (`rope_theta` and
    /// `rope_scaling` for 4.x, `rope_parameters` for 5.x).
    pub fn to_hf_json(&self) -> Value {
        match self {
            ModelConfig::Llama(c) => {
                let mut rope =
                    serde_json::json!({ "rope_type": "default", "rope_theta": c.rope_theta });
                match c.rope_scaling {
                    None => {}
                    Some(RopeScaling::Linear { factor }) => {
                        rope["rope_type"] = "linear".into();
                        rope["factor"] = factor.into();
                    }
                    Some(RopeScaling::Llama3 {
                        factor,
                        low_freq_factor,
                        high_freq_factor,
                        original_max_positions,
                    }) => {
                        rope["rope_type"] = "llama3".into();
                        rope["factor"] = factor.into();
                        rope["low_freq_factor"] = low_freq_factor.into();
                        rope["high_freq_factor"] = high_freq_factor.into();
                        rope["original_max_position_embeddings"] = original_max_positions.into();
                    }
                }
                let scaling = if c.rope_scaling.is_some() {
                    let mut r = rope.clone();
                    if let Value::Object(o) = &mut r {
                        o.remove("rope_theta");
                    }
                    r
                } else {
                    Value::Null
                };
                let mut json = serde_json::json!({
                    "architectures": ["LlamaForCausalLM"],
                    "model_type": "llama",
                    "hidden_size": c.hidden,
                    "intermediate_size": c.intermediate,
                    "num_hidden_layers": c.n_layers,
                    "num_attention_heads": c.n_heads,
                    "num_key_value_heads": c.n_kv_heads,
                    "head_dim": c.head_dim,
                    "vocab_size": c.vocab,
                    "max_position_embeddings": c.max_positions,
                    "rms_norm_eps": c.rms_norm_eps,
                    "rope_theta": c.rope_theta,
                    "rope_scaling": scaling,
                    "rope_parameters": rope,
                    "tie_word_embeddings": c.tie_embeddings,
                    "hidden_act": "silu",
                    "attention_bias": false,
                    "mlp_bias": false,
                    "torch_dtype": "float32",
                });
                c.token_ids.write_into(&mut json);
                json
            }
            ModelConfig::Gpt(c) => {
                let mut json = serde_json::json!({
                "architectures": ["GPT2LMHeadModel"],
                "model_type": "gpt2",
                "n_embd": c.hidden,
                "n_layer": c.n_layers,
                "n_head": c.n_heads,
                "n_inner": c.ffn,
                "vocab_size": c.vocab,
                "n_positions": c.n_positions,
                "layer_norm_epsilon": c.layer_norm_eps,
                "activation_function": "gelu_new",
                "tie_word_embeddings": c.tie_embeddings,
                "torch_dtype": "float32",
                });
                c.token_ids.write_into(&mut json);
                json
            }
        }
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
        let f = Fields {
            path,
            obj: &obj,
            prefix: "",
        };
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
                f.refuse_unless("llama", "hidden_act", "silu", "silu activations")?;
                for flag in ["attention_bias", "mlp_bias"] {
                    if f.opt_bool(flag)? == Some(true) {
                        return Err(f.unsupported(
                            "llama",
                            format!("{flag}: true"),
                            "projections without bias",
                        ));
                    }
                }
                let (rope_theta, rope_scaling) = rope(&f)?;
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
                    rope_theta,
                    rope_scaling,
                    tie_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
                    loss_op: None,
                    token_ids: TokenIds::of(&obj),
                })
            }
            "gpt2" => {
                f.refuse_unless_any(
                    "gpt2",
                    "activation_function",
                    &["gelu_new", "gelu_pytorch_tanh"],
                    "the tanh approximation of GeLU (gelu_new)",
                )?;
                if f.opt_bool("scale_attn_by_inverse_layer_idx")? == Some(true) {
                    return Err(f.unsupported(
                        "gpt2",
                        "scale_attn_by_inverse_layer_idx: true".into(),
                        "attention scaled by 1/sqrt(head size) only",
                    ));
                }
                if f.opt_bool("tie_word_embeddings")? == Some(false) {
                    return Err(f.unsupported(
                        "gpt2",
                        "tie_word_embeddings: false".into(),
                        "the head tied to the token embedding",
                    ));
                }
                if f.opt_bool("scale_attn_weights")? == Some(false) {
                    return Err(f.unsupported(
                        "gpt2",
                        "scale_attn_weights: false".into(),
                        "attention scaled by 1/sqrt(head size)",
                    ));
                }
                let hidden = f.uint("n_embd")?;
                ModelConfig::Gpt(GptConfig {
                    name,
                    n_layers: f.uint("n_layer")?,
                    hidden,
                    n_heads: f.uint("n_head")?,
                    n_kv_heads: f.uint("n_head")?,
                    // Saturating: tracing refuses a width that large.
                    ffn: f.opt_uint("n_inner")?.unwrap_or(hidden.saturating_mul(4)),
                    vocab: f.uint("vocab_size")?,
                    n_positions: f.opt_uint("n_positions")?.unwrap_or(1024),
                    layer_norm_eps: f.opt_float("layer_norm_epsilon")?.unwrap_or(1e-5),
                    tie_embeddings: true,
                    token_ids: TokenIds::of(&obj),
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

/// The rotary settings: transformers 4.x writes `rope_theta` and
/// `rope_scaling` (null or an object with `rope_type`, or the older
/// `type`), 5.x one `rope_parameters` object holding both. Returns the base
/// and the scaling (`None` for `rope_type: default`).
fn rope(f: &Fields<'_>) -> Result<(f64, Option<RopeScaling>), ConfigError> {
    let top_theta = f.opt_float("rope_theta")?;
    let (obj, prefix) = match (f.get("rope_parameters"), f.get("rope_scaling")) {
        (Some(Value::Object(o)), _) => (o, "rope_parameters."),
        (Some(v), _) => return Err(f.bad("rope_parameters", "an object", v)),
        (None, Some(Value::Object(o))) => (o, "rope_scaling."),
        (None, Some(v)) => return Err(f.bad("rope_scaling", "an object or null", v)),
        (None, None) => return Ok((top_theta.unwrap_or(10_000.0), None)),
    };
    let g = Fields {
        path: f.path,
        obj,
        prefix,
    };
    let theta = g.opt_float("rope_theta")?.or(top_theta).unwrap_or(10_000.0);
    let kind = match g.get("rope_type").or_else(|| g.get("type")) {
        None => "default".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => return Err(g.bad("rope_type", "a string", v)),
    };
    let float = |field: &'static str| {
        g.opt_float(field)?.ok_or_else(|| ConfigError::Missing {
            path: g.path.to_path_buf(),
            field: format!("{}{field}", g.prefix),
            expected: "a number",
        })
    };
    let scaling = match kind.as_str() {
        "default" => None,
        "linear" => Some(RopeScaling::Linear {
            factor: float("factor")?,
        }),
        "llama3" => Some(RopeScaling::Llama3 {
            factor: float("factor")?,
            low_freq_factor: float("low_freq_factor")?,
            high_freq_factor: float("high_freq_factor")?,
            original_max_positions: g.uint("original_max_position_embeddings")?,
        }),
        other => {
            return Err(g.unsupported(
                "llama",
                format!("{prefix}rope_type {other:?}"),
                "rope types default, linear and llama3",
            ));
        }
    };
    Ok((theta, scaling))
}

/// Typed access to the fields of a config object, with errors naming them
/// (`prefix` names the enclosing object's field, `rope_scaling.`).
struct Fields<'a> {
    path: &'a Path,
    obj: &'a Map<String, Value>,
    prefix: &'static str,
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
    fn unsupported(
        &self,
        family: &'static str,
        what: String,
        supported: &'static str,
    ) -> ConfigError {
        ConfigError::Unsupported {
            path: self.path.to_path_buf(),
            family,
            what,
            supported,
        }
    }

    /// An error unless `field` is absent or the string `want`.
    fn refuse_unless(
        &self,
        family: &'static str,
        field: &'static str,
        want: &'static str,
        supported: &'static str,
    ) -> Result<(), ConfigError> {
        self.refuse_unless_any(family, field, &[want], supported)
    }

    /// An error unless `field` is absent or one of the strings `want`.
    fn refuse_unless_any(
        &self,
        family: &'static str,
        field: &'static str,
        want: &[&str],
        supported: &'static str,
    ) -> Result<(), ConfigError> {
        match self.get(field) {
            None => Ok(()),
            Some(Value::String(s)) if want.contains(&s.as_str()) => Ok(()),
            Some(Value::String(s)) => {
                Err(self.unsupported(family, format!("{}{field} {s:?}", self.prefix), supported))
            }
            Some(v) => Err(self.bad(field, "a string", v)),
        }
    }

    fn bad(&self, field: &'static str, expected: &'static str, v: &Value) -> ConfigError {
        ConfigError::BadField {
            path: self.path.to_path_buf(),
            field: format!("{}{field}", self.prefix),
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
                field: format!("{}{field}", self.prefix),
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
            field: format!("{}{field}", self.prefix),
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
