//! `--init-from DIR`: the parameters of a run taken from a HuggingFace model
//! folder (`config.json` and `model.safetensors`, or shards
//! `model-*-of-*.safetensors` with `model.safetensors.index.json`) or from an
//! autopart checkpoint (`DIR/step_N`, parameters only: the optimizer starts
//! fresh at step 0).
//!
//! Each rank reads only the regions its tp shards cover, by positioned reads
//! ([`autopart_vocab::st`]), under any plan. Parameter names follow HF's, so
//! Llama maps one to one; GPT-2's `Conv1D` weights are stored `(in, out)` and
//! are transposed, and its fused `c_attn` is split into the q, k and v
//! projections the tracer makes. HF stores Llama's q and k for the
//! rotate-half rotary convention, which is the runtime's ([`crate::ops::rope`]),
//! so no permutation is needed.
//!
//! The folder's `config.json` is checked against the plan's (the numbers
//! shapes do not show: norm epsilons, rotary base and scaling, tied
//! embeddings) and every tensor's shape against the parameter's.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use autopart_vocab::ckpt::{self, Region, State};
use autopart_vocab::st::StFile;
use serde_json::Value;
use tch::Tensor;
use thiserror::Error;

use crate::exec::Param;

/// What can go wrong initialising from a folder.
#[derive(Debug, Error)]
pub enum InitError {
    #[error("--init-from {}: {what}", path.display())]
    Folder { path: PathBuf, what: String },
    #[error("--init-from: {0}")]
    St(#[from] autopart_vocab::st::StError),
    #[error("--init-from: {0}")]
    Ckpt(#[from] ckpt::CkptError),
    #[error("--init-from: {0}")]
    Torch(#[from] tch::TchError),
}

/// Where `--init-from` reads parameters.
#[derive(Debug)]
pub enum InitFrom {
    Hf(HfModel),
    Checkpoint(PathBuf),
}

/// A HuggingFace model folder, opened: its config and every safetensors
/// file's header.
#[derive(Debug)]
pub struct HfModel {
    dir: PathBuf,
    config: Value,
    files: Vec<StFile>,
    /// Tensor name to the file holding it.
    place: HashMap<String, usize>,
}

impl InitFrom {
    /// Opens `dir`: an autopart checkpoint when it holds `COMPLETE`, else an
    /// HF folder (headers read and checked, no tensor data yet).
    pub fn open(dir: &Path) -> Result<Self, InitError> {
        let folder = |what: String| InitError::Folder {
            path: dir.to_path_buf(),
            what,
        };
        if !dir.is_dir() {
            return Err(folder("not a folder".into()));
        }
        if dir.join(ckpt::MARKER).is_file() {
            return Ok(InitFrom::Checkpoint(dir.to_path_buf()));
        }
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| {
            folder(format!(
                "cannot read config.json ({e}): expected an HF model folder (config.json and model.safetensors) or an autopart checkpoint (step_N with COMPLETE)"
            ))
        })?;
        let config: Value = serde_json::from_str(&text)
            .map_err(|e| folder(format!("config.json is not JSON: {e}")))?;
        let index_path = dir.join("model.safetensors.index.json");
        let names: Vec<String> = if index_path.is_file() {
            let text = std::fs::read_to_string(&index_path)
                .map_err(|e| folder(format!("cannot read model.safetensors.index.json: {e}")))?;
            let index: Value = serde_json::from_str(&text)
                .map_err(|e| folder(format!("model.safetensors.index.json is not JSON: {e}")))?;
            let Some(map) = index.get("weight_map").and_then(Value::as_object) else {
                return Err(folder(
                    "model.safetensors.index.json has no weight_map object".into(),
                ));
            };
            let mut files: Vec<String> = Vec::new();
            for (tensor, file) in map {
                let Some(file) = file.as_str() else {
                    return Err(folder(format!(
                        "model.safetensors.index.json: weight_map[{tensor:?}] is not a file name"
                    )));
                };
                if file.contains('/') || file.starts_with('.') {
                    return Err(folder(format!(
                        "model.safetensors.index.json: {file:?} is not a file of this folder"
                    )));
                }
                if !files.iter().any(|f| f == file) {
                    files.push(file.to_string());
                }
            }
            files.sort();
            files
        } else if dir.join("model.safetensors").is_file() {
            vec!["model.safetensors".to_string()]
        } else {
            return Err(folder(
                "holds neither model.safetensors nor model.safetensors.index.json (autopart reads safetensors weights, not pytorch_model.bin)".into(),
            ));
        };
        let mut files = Vec::new();
        let mut place = HashMap::new();
        for (i, name) in names.iter().enumerate() {
            let f = StFile::open(&dir.join(name))?;
            for t in f.tensors().keys() {
                if place.insert(t.clone(), i).is_some() {
                    return Err(folder(format!("tensor {t} is in two files")));
                }
            }
            files.push(f);
        }
        Ok(InitFrom::Hf(HfModel {
            dir: dir.to_path_buf(),
            config,
            files,
            place,
        }))
    }
}

/// A config.json value as the plan's generated config writes it, with
/// transformers' defaults for what the folder's file leaves out.
fn normalized(c: &Value) -> Vec<(&'static str, Value)> {
    let num = |k: &str| c.get(k).filter(|v| !v.is_null()).cloned();
    let f = |v: Option<Value>, d: f64| Value::from(v.and_then(|v| v.as_f64()).unwrap_or(d));
    let model_type = c.get("model_type").cloned().unwrap_or(Value::Null);
    let mut out = vec![("model_type", model_type.clone())];
    match model_type.as_str() {
        Some("llama") => {
            out.push(("rms_norm_eps", f(num("rms_norm_eps"), 1e-6)));
            let rope = c
                .get("rope_parameters")
                .filter(|v| v.is_object())
                .or_else(|| c.get("rope_scaling").filter(|v| v.is_object()));
            let theta = rope
                .and_then(|r| r.get("rope_theta"))
                .cloned()
                .or_else(|| num("rope_theta"));
            out.push(("rope_theta", f(theta, 10_000.0)));
            let kind = rope
                .and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
                .and_then(Value::as_str)
                .unwrap_or("default")
                .to_string();
            out.push(("rope_type", Value::from(kind.clone())));
            for k in [
                "factor",
                "low_freq_factor",
                "high_freq_factor",
                "original_max_position_embeddings",
            ] {
                let v = rope
                    .and_then(|r| r.get(k))
                    .and_then(Value::as_f64)
                    .filter(|_| kind != "default");
                out.push((k, v.map_or(Value::Null, Value::from)));
            }
            out.push((
                "tie_word_embeddings",
                c.get("tie_word_embeddings")
                    .cloned()
                    .unwrap_or(Value::Bool(false)),
            ));
        }
        Some("gpt2") => {
            out.push(("layer_norm_epsilon", f(num("layer_norm_epsilon"), 1e-5)));
        }
        _ => {}
    }
    out
}

impl HfModel {
    /// Checks the folder's config.json against the plan's (`plan_config`,
    /// the JSON the compiler embedded; empty: nothing to check against).
    pub fn check_config(&self, plan_config: &str) -> Result<(), InitError> {
        let Ok(plan) = serde_json::from_str::<Value>(plan_config) else {
            return Ok(());
        };
        let (want, got) = (normalized(&plan), normalized(&self.config));
        let diffs: Vec<String> = want
            .iter()
            .zip(&got)
            .filter(|((_, a), (_, b))| a != b)
            .map(|((k, a), (_, b))| format!("{k} {b} (config.json) vs {a} (plan)"))
            .collect();
        if !diffs.is_empty() {
            return Err(InitError::Folder {
                path: self.dir.clone(),
                what: format!(
                    "its config.json is not the model this plan was compiled for: {}; compile with --config {}",
                    diffs.join(", "),
                    self.dir.join("config.json").display()
                ),
            });
        }
        Ok(())
    }

    fn is_gpt2(&self) -> bool {
        self.config.get("model_type").and_then(Value::as_str) == Some("gpt2")
    }

    /// The name a tensor has in this folder (GPT-2 files saved from
    /// `GPT2Model` lack the `transformer.` prefix).
    fn stored_name(&self, name: &str) -> Option<String> {
        if self.place.contains_key(name) {
            return Some(name.to_string());
        }
        let bare = name.strip_prefix("transformer.")?;
        self.place.contains_key(bare).then(|| bare.to_string())
    }

    fn shape(&self, stored: &str) -> &[u64] {
        let f = &self.files[self.place[stored]];
        &f.tensors()[stored].shape
    }

    /// Where runtime parameter `name` of `shape` lives: the stored tensor,
    /// whether it is transposed (GPT-2 `Conv1D`), the offset of the
    /// parameter inside it along its last stored dim and the number of
    /// parameters stored side by side there (q/k/v in `c_attn`: 3).
    fn source(&self, name: &str, shape: &[u64]) -> Result<(String, bool, u64, u64), String> {
        let find = |n: &str| {
            self.stored_name(n)
                .ok_or_else(|| format!("holds no tensor {n} (needed for parameter {name})"))
        };
        if !self.is_gpt2() {
            return Ok((find(name)?, false, 0, 1));
        }
        for (j, p) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
            for kind in ["weight", "bias"] {
                let Some(layer) = name.strip_suffix(&format!(".attn.{p}.{kind}")) else {
                    continue;
                };
                let fused = find(&format!("{layer}.attn.c_attn.{kind}"))?;
                let width = shape.first().copied().unwrap_or(0);
                return Ok((fused, kind == "weight", j as u64 * width, 3));
            }
        }
        let conv1d = [
            ".attn.c_proj.weight",
            ".mlp.c_fc.weight",
            ".mlp.c_proj.weight",
        ];
        let transposed = conv1d.iter().any(|s| name.ends_with(s));
        Ok((find(name)?, transposed, 0, 1))
    }

    /// The values of `region` of parameter `name` (global `shape`), f32.
    fn read(&self, name: &str, shape: &[u64], region: &Region) -> Result<Tensor, InitError> {
        let folder = |what: String| InitError::Folder {
            path: self.dir.clone(),
            what,
        };
        let (stored, transposed, at, parts) = self.source(name, shape).map_err(folder)?;
        let stored_shape = self.shape(&stored).to_vec();
        let mut want: Vec<u64> = shape.to_vec();
        if transposed {
            want.reverse();
        }
        if let Some(last) = want.last_mut() {
            *last *= parts;
        }
        let fits = stored_shape == want;
        if !fits {
            let file = self.files[self.place[&stored]].path().display().to_string();
            return Err(folder(format!(
                "{file}: tensor {stored} is {stored_shape:?}, but parameter {name} of this plan needs {:?}{}",
                shape,
                if transposed {
                    " (stored transposed, as GPT-2's Conv1D)"
                } else {
                    ""
                }
            )));
        }
        let mut r = region.clone();
        if transposed {
            r.offset.reverse();
            r.shape.reverse();
        }
        if let Some(o) = r.offset.last_mut() {
            *o += at;
        }
        let f = &self.files[self.place[&stored]];
        let (dtype, bytes) = f.read_region(&stored, &r)?;
        let dims: Vec<i64> = r.shape.iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(&bytes, &dims, crate::zero::kind_of(dtype))?
            .f_to_kind(tch::Kind::Float)?;
        Ok(if transposed {
            t.f_transpose(0, 1)?.f_contiguous()?
        } else {
            t
        })
    }
}

/// The region of the global tensor that `p`'s tp shard is.
pub fn shard_region(p: &Param, tp_rank: usize, tp_size: usize) -> Region {
    let mut offset = vec![0u64; p.spec.shape.len()];
    let mut shape: Vec<u64> = p.spec.shape.iter().map(|&x| x.max(0) as u64).collect();
    let (block, parts) = p.spec.block_of(tp_rank, tp_size);
    if let Some(d) = p.spec.tp_dim.and_then(|d| usize::try_from(d).ok())
        && d < shape.len()
        && parts > 1
    {
        shape[d] /= parts as u64;
        offset[d] = block as u64 * shape[d];
    }
    Region { offset, shape }
}

/// Copies each parameter's shard from `from` into `params` (before the
/// optimizer takes its master copies).
pub fn load(
    from: &InitFrom,
    params: &mut [Param],
    tp_rank: usize,
    tp_size: usize,
) -> Result<(), InitError> {
    let ck = match from {
        InitFrom::Checkpoint(path) => Some(ckpt::Checkpoint::open(path)?),
        InitFrom::Hf(_) => None,
    };
    tch::no_grad(|| -> Result<(), InitError> {
        for p in params.iter_mut() {
            let shape: Vec<u64> = p.spec.shape.iter().map(|&x| x.max(0) as u64).collect();
            let region = shard_region(p, tp_rank, tp_size);
            let t = match (from, &ck) {
                (InitFrom::Hf(hf), _) => hf.read(&p.spec.name, &shape, &region)?,
                (InitFrom::Checkpoint(path), ck) => {
                    let Some(ck) = ck else {
                        return Err(InitError::Folder {
                            path: path.clone(),
                            what: "the checkpoint was not opened".into(),
                        });
                    };
                    ck.check_shape(&p.spec.name, &shape)?;
                    let state = if ck.has(&p.spec.name, State::Master) {
                        State::Master
                    } else {
                        State::Param
                    };
                    let (dtype, bytes) = ck.read_region(&p.spec.name, state, &region)?;
                    let dims: Vec<i64> = region.shape.iter().map(|&d| d as i64).collect();
                    Tensor::f_from_data_size(&bytes, &dims, crate::zero::kind_of(dtype))?
                        .f_to_kind(tch::Kind::Float)?
                }
            };
            p.tensor.detach().f_copy_(&t.f_to_kind(p.tensor.kind())?)?;
        }
        Ok(())
    })
}
