//! `autopart ckpt export DIR/step_N --hf OUT_DIR`: a checkpoint as a
//! HuggingFace model folder that transformers loads with `from_pretrained`:
//! `config.json` (the plan's, which the checkpoint's manifest carries) and
//! the parameters in safetensors, sharded with `model.safetensors.index.json`
//! above `--max-shard-size`.
//!
//! Llama's names are HF's; GPT-2's q, k and v projections are fused back
//! into `c_attn` and its `Conv1D` weights transposed to `(in, out)`. Each
//! tensor is the f32 master copy when the checkpoint holds one, else the
//! parameter as saved. The folder is written as `OUT_DIR.partial` and renamed
//! when complete; an existing OUT_DIR is replaced only with `--force`.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use autopart_vocab::ckpt::{Checkpoint, Dtype, Region, State};
use autopart_vocab::fs::{sync_dir, write_atomic, write_atomic_with};
use clap::Args;
use serde_json::{Value, json};

use crate::trace::ModelConfig;

#[derive(Debug, Args)]
pub(super) struct ExportArgs {
    /// A complete checkpoint folder, DIR/step_N.
    step: PathBuf,
    /// The HuggingFace model folder to write (config.json, safetensors).
    #[arg(long, value_name = "OUT_DIR")]
    hf: PathBuf,
    /// Largest safetensors file before the weights are sharded
    /// (model-0000k-of-0000n.safetensors with an index), in bytes; the
    /// suffixes KB, MB, GB (powers of 1000) and KiB, MiB, GiB are accepted.
    #[arg(long, value_name = "SIZE", default_value = "5GB", value_parser = parse_size)]
    max_shard_size: u64,
    /// The model's config.json, for checkpoints whose manifest carries none
    /// (written by a hand-written plan binary).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Replace OUT_DIR if it exists.
    #[arg(long)]
    force: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("expected a byte count like 5GB or 200MiB, got {s:?}"))?;
    let mult: u64 = match unit {
        "" | "B" => 1,
        "KB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => {
            return Err(format!(
                "unknown size unit {unit:?} (B, KB, MB, GB, KiB, MiB, GiB)"
            ));
        }
    };
    n.checked_mul(mult)
        .filter(|&b| b > 0)
        .ok_or_else(|| format!("{s} is not a positive size below 2^64 bytes"))
}

/// One HF tensor: the checkpoint tensors it is made of, concatenated along
/// the last dim, each transposed first when `transpose`.
struct Out {
    name: String,
    parts: Vec<String>,
    transpose: bool,
    shape: Vec<u64>,
    dtype: Dtype,
}

/// The state a tensor is exported from: the f32 master copy if saved.
fn state_of(ck: &Checkpoint, tensor: &str) -> State {
    if ck.has(tensor, State::Master) {
        State::Master
    } else {
        State::Param
    }
}

/// The HF tensors of the checkpoint, in name order.
fn plan_outputs(ck: &Checkpoint, model: &ModelConfig) -> Result<Vec<Out>> {
    let m = &ck.manifest;
    let dtype_of = |t: &str| -> Dtype {
        let state = state_of(ck, t);
        ck.dtype(t, state)
            .unwrap_or_else(|| m.tensors.get(t).map_or(Dtype::F32, |i| i.dtype))
    };
    let shape_of = |t: &str| -> Result<Vec<u64>> {
        m.tensors
            .get(t)
            .map(|i| i.shape.clone())
            .with_context(|| format!("{}: holds no tensor {t}", ck.path.display()))
    };
    let mut outs = Vec::new();
    let gpt = matches!(model, ModelConfig::Gpt(_));
    let mut fused = std::collections::HashSet::new();
    for tensor in m.tensors.keys() {
        if !gpt {
            outs.push(Out {
                name: tensor.clone(),
                parts: vec![tensor.clone()],
                transpose: false,
                shape: shape_of(tensor)?,
                dtype: dtype_of(tensor),
            });
            continue;
        }
        // GPT-2: q/k/v back into c_attn; Conv1D weights (in, out).
        let qkv = ["q_proj", "k_proj", "v_proj"];
        let mut done = false;
        for kind in ["weight", "bias"] {
            for p in qkv {
                if let Some(layer) = tensor.strip_suffix(&format!(".attn.{p}.{kind}")) {
                    let name = format!("{layer}.attn.c_attn.{kind}");
                    if fused.insert(name.clone()) {
                        let parts: Vec<String> = qkv
                            .iter()
                            .map(|q| format!("{layer}.attn.{q}.{kind}"))
                            .collect();
                        let mut shape = shape_of(&parts[0])?;
                        for part in &parts[1..] {
                            if shape_of(part)? != shape {
                                bail!(
                                    "{}: {part} is not shaped like {} ({shape:?})",
                                    ck.path.display(),
                                    parts[0]
                                );
                            }
                        }
                        if kind == "weight" {
                            shape.reverse();
                        }
                        if let Some(last) = shape.last_mut() {
                            *last *= 3;
                        }
                        outs.push(Out {
                            name,
                            dtype: dtype_of(&parts[0]),
                            transpose: kind == "weight",
                            parts,
                            shape,
                        });
                    }
                    done = true;
                }
            }
        }
        if done {
            continue;
        }
        let conv1d = [
            ".attn.c_proj.weight",
            ".mlp.c_fc.weight",
            ".mlp.c_proj.weight",
        ];
        let transpose = conv1d.iter().any(|s| tensor.ends_with(s));
        let mut shape = shape_of(tensor)?;
        if transpose {
            shape.reverse();
        }
        outs.push(Out {
            name: tensor.clone(),
            parts: vec![tensor.clone()],
            transpose,
            shape,
            dtype: dtype_of(tensor),
        });
    }
    outs.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(outs)
}

/// `[rows, cols]` to `[cols, rows]`, `elem` bytes an element.
fn transpose2(data: &[u8], rows: usize, cols: usize, elem: usize) -> Vec<u8> {
    let mut out = vec![0u8; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            let from = (r * cols + c) * elem;
            let to = (c * rows + r) * elem;
            out[to..to + elem].copy_from_slice(&data[from..from + elem]);
        }
    }
    out
}

/// The bytes of `o`, read from the checkpoint.
fn tensor_bytes(ck: &Checkpoint, o: &Out) -> Result<Vec<u8>> {
    let elem = o.dtype.size();
    let mut parts = Vec::new();
    for t in &o.parts {
        let shape = ck.manifest.tensors[t].shape.clone();
        let (dtype, mut data) = ck
            .read_region(t, state_of(ck, t), &Region::whole(&shape))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if dtype != o.dtype {
            bail!(
                "{}: {t} is {dtype:?}, the other parts of {} {:?}",
                ck.path.display(),
                o.name,
                o.dtype
            );
        }
        if o.transpose {
            let [rows, cols] = shape[..] else {
                bail!("{}: {t} is {shape:?}, not a matrix", ck.path.display());
            };
            data = transpose2(&data, rows as usize, cols as usize, elem);
        }
        parts.push(data);
    }
    if parts.len() == 1 {
        return Ok(parts.remove(0));
    }
    // Concatenate along the last dim: row by row.
    let last = *o.shape.last().unwrap_or(&1) as usize / parts.len() * elem;
    let rows = parts[0].len() / last.max(1);
    let mut out = Vec::with_capacity(parts.iter().map(Vec::len).sum());
    for r in 0..rows {
        for p in &parts {
            out.extend_from_slice(&p[r * last..(r + 1) * last]);
        }
    }
    Ok(out)
}

fn st_dtype(d: Dtype) -> &'static str {
    match d {
        Dtype::F32 => "F32",
        Dtype::F64 => "F64",
        Dtype::BF16 => "BF16",
        Dtype::F16 => "F16",
    }
}

fn numel(shape: &[u64]) -> u64 {
    shape.iter().product()
}

/// Writes one safetensors file of `outs` (data in order).
fn write_file(path: &Path, ck: &Checkpoint, outs: &[&Out]) -> Result<()> {
    let mut json = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    let mut offset = 0u64;
    for o in outs {
        let bytes = numel(&o.shape) * o.dtype.size() as u64;
        json.push_str(&format!(
            ",{}:{{\"dtype\":\"{}\",\"shape\":{},\"data_offsets\":[{offset},{}]}}",
            serde_json::to_string(&o.name)?,
            st_dtype(o.dtype),
            serde_json::to_string(&o.shape)?,
            offset + bytes
        ));
        offset += bytes;
    }
    json.push('}');
    while json.len() % 8 != 0 {
        json.push(' ');
    }
    write_atomic_with(path, |f| {
        f.write_all(&(json.len() as u64).to_le_bytes())?;
        f.write_all(json.as_bytes())?;
        for o in outs {
            let data = tensor_bytes(ck, o).map_err(|e| std::io::Error::other(format!("{e:#}")))?;
            f.write_all(&data)?;
        }
        Ok(())
    })
    .with_context(|| format!("writing {}", path.display()))
}

pub(super) fn export(args: &ExportArgs) -> Result<()> {
    let ck = Checkpoint::open(&args.step).map_err(|e| anyhow::anyhow!("{e}"))?;
    let config: Value = match (&args.config, &ck.manifest.model_config) {
        (Some(path), _) => serde_json::from_str(
            &fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        )
        .with_context(|| format!("{}: not JSON", path.display()))?,
        (None, Some(c)) => c.clone(),
        (None, None) => bail!(
            "{}: the checkpoint carries no model config.json (a hand-written plan binary wrote it); pass --config FILE",
            args.step.display()
        ),
    };
    let config_path = args.step.join("COMPLETE");
    let model = ModelConfig::from_hf_str(&config.to_string(), &config_path)
        .context("the checkpoint's model config")?;
    let outs = plan_outputs(&ck, &model)?;

    // Shards in name order, each below the size limit (a larger tensor alone).
    let mut shards: Vec<Vec<&Out>> = vec![vec![]];
    let mut size = 0u64;
    for o in &outs {
        let bytes = numel(&o.shape) * o.dtype.size() as u64;
        if size > 0 && size + bytes > args.max_shard_size {
            shards.push(vec![]);
            size = 0;
        }
        size += bytes;
        if let Some(last) = shards.last_mut() {
            last.push(o);
        }
    }

    let out = &args.hf;
    if out.exists() && !args.force {
        bail!("{} exists; pass --force to replace it", out.display());
    }
    let name = out
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} has no folder name", out.display()))?;
    let partial = out.with_file_name(format!("{name}.partial"));
    if partial.exists() {
        fs::remove_dir_all(&partial).with_context(|| format!("removing {}", partial.display()))?;
    }
    fs::create_dir_all(&partial).with_context(|| format!("creating {}", partial.display()))?;
    let mut cfg = config.clone();
    if let Value::Object(o) = &mut cfg {
        o.insert("autopart_checkpoint_step".into(), json!(ck.manifest.step));
    }
    write_atomic(
        &partial.join("config.json"),
        serde_json::to_string_pretty(&cfg)?.as_bytes(),
    )
    .with_context(|| format!("writing {}/config.json", partial.display()))?;
    let n = shards.len();
    let total: u64 = outs
        .iter()
        .map(|o| numel(&o.shape) * o.dtype.size() as u64)
        .sum();
    if n == 1 {
        write_file(&partial.join("model.safetensors"), &ck, &shards[0])?;
    } else {
        let mut weight_map = BTreeMap::new();
        for (i, shard) in shards.iter().enumerate() {
            let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
            write_file(&partial.join(&file), &ck, shard)?;
            for o in shard {
                weight_map.insert(o.name.clone(), file.clone());
            }
            eprintln!("wrote {file} ({} tensors)", shard.len());
        }
        let index = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        write_atomic(
            &partial.join("model.safetensors.index.json"),
            serde_json::to_string_pretty(&index)?.as_bytes(),
        )?;
    }
    // Swap in: an old folder is renamed aside first, removed last.
    let old = out.with_file_name(format!("{name}.deleting"));
    if out.exists() {
        if old.exists() {
            fs::remove_dir_all(&old)?;
        }
        fs::rename(out, &old).with_context(|| format!("moving {} aside", out.display()))?;
    }
    fs::rename(&partial, out).with_context(|| format!("renaming {}", partial.display()))?;
    if let Some(parent) = out.parent() {
        sync_dir(if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        });
    }
    if old.exists() {
        fs::remove_dir_all(&old)?;
    }
    println!(
        "wrote {}: {} ({}) at step {}, {} tensors in {n} file{}, {:.1} MiB",
        out.display(),
        model.name(),
        model.family(),
        ck.manifest.step,
        outs.len(),
        if n == 1 { "" } else { "s" },
        total as f64 / (1u64 << 20) as f64
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("200MiB"), Ok(200 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err());
        assert!(parse_size("5XB").is_err());
        assert!(parse_size("99999999999999999999GB").is_err());
    }

    #[test]
    fn transpose_swaps_rows_and_columns() {
        let d: Vec<u8> = (0..6).collect();
        // [[0, 1, 2], [3, 4, 5]] -> [[0, 3], [1, 4], [2, 5]]
        assert_eq!(transpose2(&d, 2, 3, 1), vec![0, 3, 1, 4, 2, 5]);
    }
}
