//! Text generation from a model's parameters: autoregressive decoding with a
//! KV cache, greedy or sampled (temperature, top-p), for `--generate`
//! (`autopart generate`).
//!
//! It is how a user checks a trained or fine-tuned model, on one process:
//! the parameters are the plan's own (loaded by `--init-from` or
//! `--resume`), and the layers are computed with the same [`crate::ops`]
//! the generated training code calls, reading the architecture from the
//! plan's `config.json` ([`crate::app::PlanMeta::hf_config`]). The prompt is
//! run once (causal attention over it), then each new token attends to the
//! cached keys and values of every earlier position: one position a step,
//! as transformers' `generate` with its `DynamicCache`.

use crate::exec::Param;
use crate::ops::{self, Mask, OpError, RopeScaling};
use serde_json::Value;
use std::collections::HashMap;
use tch::{Kind, Tensor};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum GenError {
    #[error("--generate: the plan's config.json: {0}")]
    Config(String),
    #[error("--generate: the model has no parameter {0}")]
    Missing(String),
    #[error("--generate: {0}")]
    Input(String),
    #[error(transparent)]
    Op(#[from] OpError),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// The architectures the decoder computes, with their sizes.
#[derive(Clone, Debug, PartialEq)]
enum Arch {
    Llama {
        heads: i64,
        kv_heads: i64,
        eps: f64,
        theta: f64,
        scaling: Option<RopeScaling>,
        tied: bool,
    },
    Gpt2 {
        heads: i64,
        eps: f64,
        positions: i64,
    },
}

/// How the next token is chosen.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    pub max_new_tokens: usize,
    /// `None` (or 0): greedy, the most likely token (the first on a tie, as
    /// `torch.argmax`).
    pub temperature: Option<f64>,
    /// Nucleus sampling: only the most likely tokens whose probabilities
    /// sum to at least `top_p` are drawn from (1: all).
    pub top_p: f64,
    pub seed: u64,
    /// Generation stops after any of these ids (which is kept).
    pub eos: Vec<i64>,
}

/// A model's parameters and architecture, ready to decode.
#[derive(Debug)]
pub struct Decoder {
    arch: Arch,
    layers: usize,
    vocab: i64,
    weights: HashMap<String, Tensor>,
}

/// One layer's cached keys and values, `[1, s, kv_heads, head_dim]`.
type Cache = Vec<Option<(Tensor, Tensor)>>;

fn num(c: &Value, key: &str) -> Result<f64, GenError> {
    c.get(key)
        .and_then(Value::as_f64)
        .ok_or_else(|| GenError::Config(format!("no number {key}")))
}

fn int(c: &Value, key: &str) -> Result<i64, GenError> {
    let x = num(c, key)?;
    if x.fract() != 0.0 || !(1.0..=(1u64 << 40) as f64).contains(&x) {
        return Err(GenError::Config(format!(
            "{key} {x} is not a positive integer"
        )));
    }
    Ok(x as i64)
}

/// The rotary scaling of a config as the compiler writes it
/// (`rope_parameters`; `rope_type` default, linear or llama3).
fn rope_of(c: &Value) -> Result<(f64, Option<RopeScaling>), GenError> {
    let r = c
        .get("rope_parameters")
        .filter(|r| r.is_object())
        .unwrap_or(c);
    let theta = r
        .get("rope_theta")
        .or_else(|| c.get("rope_theta"))
        .and_then(Value::as_f64)
        .unwrap_or(10_000.0);
    let kind = r
        .get("rope_type")
        .and_then(Value::as_str)
        .unwrap_or("default");
    let scaling = match kind {
        "default" => None,
        "linear" => Some(RopeScaling::Linear {
            factor: num(r, "factor")?,
        }),
        "llama3" => Some(RopeScaling::Llama3 {
            factor: num(r, "factor")?,
            low_freq_factor: num(r, "low_freq_factor")?,
            high_freq_factor: num(r, "high_freq_factor")?,
            original_max_positions: int(r, "original_max_position_embeddings")?,
        }),
        other => {
            return Err(GenError::Config(format!(
                "rope_type {other} is not one of default, linear, llama3"
            )));
        }
    };
    Ok((theta, scaling))
}

impl Decoder {
    /// The decoder of `config` (the plan's config.json) over `params`, which
    /// must be whole (a one-process plan's, gathered).
    pub fn new(config: &str, params: &[Param]) -> Result<Self, GenError> {
        let c: Value = serde_json::from_str(config).map_err(|e| {
            GenError::Config(format!(
                "{e} (a hand-written plan binary has none: generate needs a compiled plan)"
            ))
        })?;
        let model_type = c.get("model_type").and_then(Value::as_str).unwrap_or("");
        let (arch, layers) = match model_type {
            "llama" => {
                let (theta, scaling) = rope_of(&c)?;
                let heads = int(&c, "num_attention_heads")?;
                (
                    Arch::Llama {
                        heads,
                        kv_heads: c
                            .get("num_key_value_heads")
                            .map_or(Ok(heads), |_| int(&c, "num_key_value_heads"))?,
                        eps: num(&c, "rms_norm_eps")?,
                        theta,
                        scaling,
                        tied: c
                            .get("tie_word_embeddings")
                            .and_then(Value::as_bool)
                            .unwrap_or(false),
                    },
                    int(&c, "num_hidden_layers")?,
                )
            }
            "gpt2" => (
                Arch::Gpt2 {
                    heads: int(&c, "n_head")?,
                    eps: num(&c, "layer_norm_epsilon")?,
                    positions: int(&c, "n_positions")?,
                },
                int(&c, "n_layer")?,
            ),
            other => {
                return Err(GenError::Config(format!(
                    "model_type {other:?} is not llama or gpt2"
                )));
            }
        };
        let weights: HashMap<String, Tensor> = params
            .iter()
            .map(|p| (p.spec.name.clone(), p.tensor.detach()))
            .collect();
        for p in params {
            if p.tensor.size() != p.spec.shape {
                return Err(GenError::Input(format!(
                    "parameter {} is a shard {:?} of {:?}: generate runs on a one-process plan",
                    p.spec.name,
                    p.tensor.size(),
                    p.spec.shape
                )));
            }
        }
        let vocab = int(&c, "vocab_size")?;
        let d = Self {
            arch,
            layers: layers as usize,
            vocab,
            weights,
        };
        // Every weight the layers read, checked before the first token.
        d.embedding()?;
        d.head()?;
        Ok(d)
    }

    fn w(&self, name: &str) -> Result<&Tensor, GenError> {
        self.weights
            .get(name)
            .ok_or_else(|| GenError::Missing(name.to_string()))
    }

    fn embedding(&self) -> Result<&Tensor, GenError> {
        match self.arch {
            Arch::Llama { .. } => self.w("model.embed_tokens.weight"),
            Arch::Gpt2 { .. } => self.w("transformer.wte.weight"),
        }
    }

    fn head(&self) -> Result<&Tensor, GenError> {
        match self.arch {
            Arch::Llama { tied: false, .. } => self.w("lm_head.weight"),
            _ => self.embedding(),
        }
    }

    /// The logits `[vocab]` (f32) after `ids`, which sit at positions
    /// `start..`; extends `cache` with their keys and values.
    fn step(&self, ids: &[i64], start: i64, cache: &mut Cache) -> Result<Tensor, GenError> {
        let n = ids.len() as i64;
        let tokens = Tensor::f_from_slice(ids)?.f_view([1, n])?;
        let mut x = ops::embedding(&tokens, self.embedding()?, 0)?;
        // The prompt attends causally within itself; a new token sees every
        // cached position (its queries come after all of them).
        let mask = if start == 0 { Mask::Causal } else { Mask::Full };
        if let Arch::Gpt2 { positions, .. } = self.arch {
            if start + n > positions {
                return Err(GenError::Input(format!(
                    "the sequence would reach {} tokens, past GPT-2's n_positions {positions}",
                    start + n
                )));
            }
            let pos = self
                .w("transformer.wpe.weight")?
                .f_narrow(0, start, n)?
                .f_unsqueeze(0)?;
            x = x.f_add(&pos)?;
        }
        for (i, slot) in cache.iter_mut().enumerate().take(self.layers) {
            x = match &self.arch {
                Arch::Llama {
                    heads,
                    kv_heads,
                    eps,
                    theta,
                    scaling,
                    ..
                } => {
                    let p = |s: &str| format!("model.layers.{i}.{s}");
                    let h = ops::rms_norm(&x, self.w(&p("input_layernorm.weight"))?, *eps)?;
                    let q = ops::split_heads(
                        &ops::linear(&h, self.w(&p("self_attn.q_proj.weight"))?)?,
                        *heads,
                    )?;
                    let k = ops::split_heads(
                        &ops::linear(&h, self.w(&p("self_attn.k_proj.weight"))?)?,
                        *kv_heads,
                    )?;
                    let v = ops::split_heads(
                        &ops::linear(&h, self.w(&p("self_attn.v_proj.weight"))?)?,
                        *kv_heads,
                    )?;
                    let (q, k) = match scaling {
                        Some(sc) => (
                            ops::rope_scaled(&q, *theta, sc, start)?,
                            ops::rope_scaled(&k, *theta, sc, start)?,
                        ),
                        None => (ops::rope(&q, *theta, start)?, ops::rope(&k, *theta, start)?),
                    };
                    let (k, v) = extend(slot, k, v)?;
                    let a = ops::merge_heads(&ops::attention(&q, &k, &v, mask)?)?;
                    let x = x.f_add(&ops::linear(&a, self.w(&p("self_attn.o_proj.weight"))?)?)?;
                    let h =
                        ops::rms_norm(&x, self.w(&p("post_attention_layernorm.weight"))?, *eps)?;
                    let g = ops::linear(&h, self.w(&p("mlp.gate_proj.weight"))?)?;
                    let u = ops::linear(&h, self.w(&p("mlp.up_proj.weight"))?)?;
                    let f =
                        ops::linear(&ops::swiglu(&g, &u)?, self.w(&p("mlp.down_proj.weight"))?)?;
                    x.f_add(&f)?
                }
                Arch::Gpt2 { heads, eps, .. } => {
                    let p = |s: &str| format!("transformer.h.{i}.{s}");
                    let lin = |x: &Tensor, site: &str| -> Result<Tensor, GenError> {
                        Ok(ops::linear_bias(
                            x,
                            self.w(&p(&format!("{site}.weight")))?,
                            self.w(&p(&format!("{site}.bias")))?,
                        )?)
                    };
                    let ln = |x: &Tensor, site: &str| -> Result<Tensor, GenError> {
                        Ok(ops::layer_norm(
                            x,
                            self.w(&p(&format!("{site}.weight")))?,
                            self.w(&p(&format!("{site}.bias")))?,
                            *eps,
                        )?)
                    };
                    let h = ln(&x, "ln_1")?;
                    let q = ops::split_heads(&lin(&h, "attn.q_proj")?, *heads)?;
                    let k = ops::split_heads(&lin(&h, "attn.k_proj")?, *heads)?;
                    let v = ops::split_heads(&lin(&h, "attn.v_proj")?, *heads)?;
                    let (k, v) = extend(slot, k, v)?;
                    let a = ops::merge_heads(&ops::attention(&q, &k, &v, mask)?)?;
                    let x = x.f_add(&lin(&a, "attn.c_proj")?)?;
                    let h = ln(&x, "ln_2")?;
                    let f = lin(&ops::gelu(&lin(&h, "mlp.c_fc")?)?, "mlp.c_proj")?;
                    x.f_add(&f)?
                }
            };
        }
        let last = x.f_narrow(1, n - 1, 1)?;
        let last = match self.arch {
            Arch::Llama { eps, .. } => ops::rms_norm(&last, self.w("model.norm.weight")?, eps)?,
            Arch::Gpt2 { eps, .. } => ops::layer_norm(
                &last,
                self.w("transformer.ln_f.weight")?,
                self.w("transformer.ln_f.bias")?,
                eps,
            )?,
        };
        let logits = ops::linear(&last, self.head()?)?;
        Ok(logits.f_view([-1])?.f_to_kind(Kind::Float)?)
    }

    /// The ids that follow `prompt` (at most `s.max_new_tokens`, fewer when
    /// an end-of-sequence id is generated).
    pub fn generate(&self, prompt: &[i64], s: &Sampling) -> Result<Vec<i64>, GenError> {
        if prompt.is_empty() {
            return Err(GenError::Input("the prompt holds no token".into()));
        }
        if let Some((i, &id)) = prompt
            .iter()
            .enumerate()
            .find(|&(_, &id)| id < 0 || id >= self.vocab)
        {
            return Err(GenError::Input(format!(
                "prompt id {id} (position {i}) is outside the vocabulary of {} ids",
                self.vocab
            )));
        }
        if !(s.top_p > 0.0 && s.top_p <= 1.0) {
            return Err(GenError::Input(format!(
                "top-p {} is not in (0, 1]",
                s.top_p
            )));
        }
        let sampled = s.temperature.filter(|&t| t > 0.0);
        if sampled.is_some() {
            tch::manual_seed(s.seed as i64);
        }
        let mut cache: Cache = empty_cache(self.layers);
        let mut out = Vec::with_capacity(s.max_new_tokens);
        tch::no_grad(|| -> Result<(), GenError> {
            let mut logits = self.step(prompt, 0, &mut cache)?;
            let mut pos = prompt.len() as i64;
            while out.len() < s.max_new_tokens {
                let next = match sampled {
                    None => logits.f_argmax(0, false)?.f_int64_value(&[])?,
                    Some(t) => sample(&logits, t, s.top_p)?,
                };
                out.push(next);
                if s.eos.contains(&next) || out.len() == s.max_new_tokens {
                    break;
                }
                logits = self.step(&[next], pos, &mut cache)?;
                pos += 1;
            }
            Ok(())
        })?;
        Ok(out)
    }
}

fn empty_cache(layers: usize) -> Cache {
    (0..layers).map(|_| None).collect()
}

/// Appends `k` and `v` to a layer's cache; returns the whole cache.
fn extend(
    slot: &mut Option<(Tensor, Tensor)>,
    k: Tensor,
    v: Tensor,
) -> Result<(Tensor, Tensor), GenError> {
    let (k, v) = match slot.take() {
        None => (k, v),
        Some((ck, cv)) => (Tensor::f_cat(&[ck, k], 1)?, Tensor::f_cat(&[cv, v], 1)?),
    };
    *slot = Some((k.shallow_clone(), v.shallow_clone()));
    Ok((k, v))
}

/// A token drawn from `softmax(logits / t)`, restricted to the smallest set
/// of most likely tokens whose probability reaches `top_p` (transformers'
/// `TopPLogitsWarper`: at least one token is kept).
fn sample(logits: &Tensor, t: f64, top_p: f64) -> Result<i64, GenError> {
    let scaled = logits.f_div_scalar(t)?;
    let probs = scaled.f_softmax(0, Kind::Float)?;
    let (sorted, order) = probs.f_sort(0, true)?;
    let cum = sorted.f_cumsum(0, Kind::Float)?;
    // Drop a token once the more likely ones already reach top_p.
    let before = cum.f_sub(&sorted)?;
    let drop = before.f_ge(top_p)?;
    let kept = sorted.f_masked_fill(&drop, 0.0)?;
    let pick = kept.f_multinomial(1, false)?.f_int64_value(&[0])?;
    Ok(order.f_int64_value(&[pick])?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::{Init, ParamSpec, TpGrad};

    fn param(name: &str, shape: &[i64], seed: i64) -> Param {
        tch::manual_seed(seed);
        Param {
            spec: ParamSpec {
                name: name.into(),
                shape: shape.to_vec(),
                init: Init::Zeros,
                tp_dim: None,
                tp_grad: TpGrad::Complete,
            },
            tensor: Tensor::randn(shape, (Kind::Float, tch::Device::Cpu))
                .f_mul_scalar(0.5)
                .expect("w"),
        }
    }

    fn tiny_llama() -> (String, Vec<Param>) {
        let config = serde_json::json!({
            "model_type": "llama", "hidden_size": 8, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 2,
            "vocab_size": 11, "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "tie_word_embeddings": false,
        });
        let mut ps = vec![
            param("model.embed_tokens.weight", &[11, 8], 1),
            param("model.norm.weight", &[8], 2),
            param("lm_head.weight", &[11, 8], 3),
        ];
        for i in 0..2 {
            for (j, (n, s)) in [
                ("input_layernorm.weight", vec![8]),
                ("self_attn.q_proj.weight", vec![8, 8]),
                ("self_attn.k_proj.weight", vec![4, 8]),
                ("self_attn.v_proj.weight", vec![4, 8]),
                ("self_attn.o_proj.weight", vec![8, 8]),
                ("post_attention_layernorm.weight", vec![8]),
                ("mlp.gate_proj.weight", vec![16, 8]),
                ("mlp.up_proj.weight", vec![16, 8]),
                ("mlp.down_proj.weight", vec![8, 16]),
            ]
            .into_iter()
            .enumerate()
            {
                ps.push(param(
                    &format!("model.layers.{i}.{n}"),
                    &s,
                    10 + 10 * i + j as i64,
                ));
            }
        }
        (config.to_string(), ps)
    }

    /// The cached step equals the whole sequence run again from scratch.
    #[test]
    fn the_kv_cache_gives_the_logits_of_a_full_recomputation() {
        let (config, ps) = tiny_llama();
        let d = Decoder::new(&config, &ps).expect("decoder");
        let ids = [3i64, 7, 1, 9, 4];
        let mut cache = empty_cache(2);
        let _ = d.step(&ids[..3], 0, &mut cache).expect("prompt");
        let _ = d.step(&ids[3..4], 3, &mut cache).expect("4th");
        let cached = d.step(&ids[4..], 4, &mut cache).expect("5th");
        let full = d.step(&ids, 0, &mut empty_cache(2)).expect("full");
        let diff = cached
            .f_sub(&full)
            .expect("d")
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff < 1e-5, "cached vs full logits differ by {diff}");
    }

    #[test]
    fn greedy_is_deterministic_and_stops_at_eos() {
        let (config, ps) = tiny_llama();
        let d = Decoder::new(&config, &ps).expect("decoder");
        let mut s = Sampling {
            max_new_tokens: 6,
            temperature: None,
            top_p: 1.0,
            seed: 0,
            eos: vec![],
        };
        let a = d.generate(&[1, 2, 3], &s).expect("a");
        assert_eq!(a.len(), 6);
        assert_eq!(a, d.generate(&[1, 2, 3], &s).expect("b"));
        s.eos = vec![a[2]];
        let first = a.iter().position(|&x| x == a[2]).expect("in a");
        assert_eq!(d.generate(&[1, 2, 3], &s).expect("c"), a[..=first].to_vec());
        // Sampling with a tiny top-p keeps only the most likely token: greedy.
        s.eos.clear();
        s.temperature = Some(1.0);
        s.top_p = 1e-6;
        assert_eq!(d.generate(&[1, 2, 3], &s).expect("d"), a);
        s.top_p = 1.0;
        s.seed = 5;
        let x = d.generate(&[1, 2, 3], &s).expect("x");
        assert_eq!(x, d.generate(&[1, 2, 3], &s).expect("y"), "seeded");
    }

    #[test]
    fn bad_prompts_and_configs_are_errors() {
        let (config, ps) = tiny_llama();
        let d = Decoder::new(&config, &ps).expect("decoder");
        let s = Sampling {
            max_new_tokens: 2,
            temperature: None,
            top_p: 1.0,
            seed: 0,
            eos: vec![],
        };
        assert!(d.generate(&[], &s).is_err());
        let e = d.generate(&[11], &s).expect_err("out of vocab").to_string();
        assert!(e.contains("outside the vocabulary of 11"), "{e}");
        let e = Decoder::new("{\"model_type\": \"mistral\"}", &ps).expect_err("mistral");
        assert!(e.to_string().contains("mistral"), "{e}");
        let e = Decoder::new(&config, &ps[1..]).expect_err("no embedding");
        assert!(e.to_string().contains("model.embed_tokens.weight"), "{e}");
    }
}
