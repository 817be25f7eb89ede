//! Reading regions of tensors from safetensors files (HuggingFace model
//! folders) by positioned reads: only the bytes of the requested region are
//! read, so a rank loading its tp shard of a large model touches only its
//! share of each file. Every header field is checked against the file
//! before any data is read; a truncated or damaged file is an error naming it.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde_json::Value;
use thiserror::Error;

use crate::ckpt::{Dtype, Region};

/// What can go wrong reading a safetensors file.
#[derive(Debug, Error)]
pub enum StError {
    #[error("{}: cannot {what}: {source}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{}: {what}", path.display())]
    Format { path: PathBuf, what: String },
}

/// One tensor's entry in a safetensors header.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    /// Absolute byte offset of the data in the file.
    pub start: u64,
}

/// A safetensors file opened for region reads.
#[derive(Debug)]
pub struct StFile {
    path: PathBuf,
    file: File,
    tensors: BTreeMap<String, Entry>,
}

/// The largest header read (HF writes a few hundred KiB for 400B models).
const MAX_HEADER: u64 = 100 << 20;

fn dtype_of(name: &str) -> Option<Dtype> {
    Some(match name {
        "F32" => Dtype::F32,
        "F64" => Dtype::F64,
        "BF16" => Dtype::BF16,
        "F16" => Dtype::F16,
        _ => return None,
    })
}

impl StFile {
    /// Opens `path` and checks its header: a JSON object of tensors (dtype,
    /// shape, data offsets) whose data lie inside the file, each exactly
    /// `numel × dtype size` bytes, without overlaps. Tensors of non-float
    /// dtypes are refused when read, not here (HF folders may hold integer
    /// buffers that nothing reads).
    pub fn open(path: &Path) -> Result<Self, StError> {
        let io = |what| {
            let path = path.to_path_buf();
            move |source| StError::Io { path, what, source }
        };
        let bad = |what: String| StError::Format {
            path: path.to_path_buf(),
            what,
        };
        let file = File::open(path).map_err(io("open it"))?;
        let size = file.metadata().map_err(io("read its size"))?.len();
        let mut len = [0u8; 8];
        file.read_exact_at(&mut len, 0).map_err(|_| {
            bad(format!(
                "{size} bytes is too short for a safetensors header"
            ))
        })?;
        let n = u64::from_le_bytes(len);
        if n > MAX_HEADER || n.saturating_add(8) > size {
            return Err(bad(format!(
                "header length {n} does not fit the file's {size} bytes: truncated or not a safetensors file"
            )));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact_at(&mut header, 8)
            .map_err(io("read its header"))?;
        let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(&header) else {
            return Err(bad("the header is not a JSON object".into()));
        };
        let data = size - 8 - n;
        let mut tensors = BTreeMap::new();
        let mut spans = Vec::new();
        for (name, v) in map {
            if name == "__metadata__" {
                continue;
            }
            let field = |f: &str| v.get(f);
            let dtype_name = field("dtype").and_then(Value::as_str).unwrap_or("");
            let shape: Option<Vec<u64>> = field("shape")
                .and_then(Value::as_array)
                .and_then(|a| a.iter().map(Value::as_u64).collect());
            let offsets: Option<Vec<u64>> = field("data_offsets")
                .and_then(Value::as_array)
                .and_then(|a| a.iter().map(Value::as_u64).collect());
            let (Some(shape), Some(offsets)) = (shape, offsets) else {
                return Err(bad(format!(
                    "header entry {name:?} lacks a shape or data_offsets"
                )));
            };
            let [b, e] = offsets[..] else {
                return Err(bad(format!("{name}: data_offsets must be two numbers")));
            };
            if e < b || e > data {
                return Err(bad(format!(
                    "{name}: data {b}..{e} lies outside the data section of {data} bytes (truncated file?)"
                )));
            }
            let Some(dtype) = dtype_of(dtype_name) else {
                // Read only to be refused: recorded without a dtype check.
                spans.push((b, e));
                continue;
            };
            let bytes = shape
                .iter()
                .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d));
            if bytes != Some(e - b) {
                return Err(bad(format!(
                    "{name}: {dtype_name} {shape:?} needs {} bytes, its data_offsets span {}",
                    bytes.map_or("more than 2^64".into(), |x| x.to_string()),
                    e - b
                )));
            }
            spans.push((b, e));
            tensors.insert(
                name,
                Entry {
                    dtype,
                    shape,
                    start: 8 + n + b,
                },
            );
        }
        spans.sort_unstable();
        if spans.windows(2).any(|w| w[1].0 < w[0].1) {
            return Err(bad("tensors' data overlap".into()));
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The float tensors, by name.
    pub fn tensors(&self) -> &BTreeMap<String, Entry> {
        &self.tensors
    }

    /// The bytes of `region` of tensor `name` (row-major, the file's dtype).
    pub fn read_region(&self, name: &str, region: &Region) -> Result<(Dtype, Vec<u8>), StError> {
        let bad = |what: String| StError::Format {
            path: self.path.clone(),
            what,
        };
        let Some(e) = self.tensors.get(name) else {
            return Err(bad(format!("holds no float tensor {name}")));
        };
        if !region.fits(&e.shape) {
            return Err(bad(format!(
                "region {region} lies outside {name}'s shape {:?}",
                e.shape
            )));
        }
        let elem = e.dtype.size() as u64;
        let n = e.shape.len();
        let mut out = vec![0u8; (region.numel() * elem) as usize];
        if out.is_empty() {
            return Ok((e.dtype, out));
        }
        // Trailing dims the region covers whole merge into one contiguous run.
        let mut k = n;
        let mut run = 1u64;
        while k > 0 {
            run *= region.shape[k - 1];
            if region.shape[k - 1] != e.shape[k - 1] {
                k -= 1;
                break;
            }
            k -= 1;
        }
        // Dims 0..k are iterated one index at a time; dim k (if any) starts at
        // its offset and the run covers it and everything after.
        let mut strides = vec![1u64; n];
        for d in (0..n.saturating_sub(1)).rev() {
            strides[d] = strides[d + 1] * e.shape[d + 1];
        }
        let mut idx = vec![0u64; k];
        let mut pos = 0usize;
        let run_bytes = (run * elem) as usize;
        loop {
            let mut flat = 0u64;
            for d in 0..n {
                let i = if d < k { idx[d] } else { 0 };
                flat += (region.offset[d] + i) * strides[d];
            }
            self.file
                .read_exact_at(&mut out[pos..pos + run_bytes], e.start + flat * elem)
                .map_err(|source| StError::Io {
                    path: self.path.clone(),
                    what: "read a tensor",
                    source,
                })?;
            pos += run_bytes;
            // Next index over dims 0..k, last fastest.
            let mut d = k;
            loop {
                if d == 0 {
                    return Ok((e.dtype, out));
                }
                d -= 1;
                idx[d] += 1;
                if idx[d] < region.shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file of f32 tensors, written with the safetensors crate.
    fn write(dir: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> PathBuf {
        let bytes: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .zip(&bytes)
            .map(|((name, shape, _), b)| {
                let view =
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                        .expect("view");
                (name.to_string(), view)
            })
            .collect();
        let path = dir.join("m.safetensors");
        safetensors::serialize_to_file(views, &None, &path).expect("write");
        path
    }

    fn floats(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    #[test]
    fn regions_are_read_from_any_corner() {
        let dir = tempfile::tempdir().expect("dir");
        let v: Vec<f32> = (0..24).map(|x| x as f32).collect();
        let path = write(
            dir.path(),
            &[
                ("w", vec![2, 3, 4], v.clone()),
                ("b", vec![3], vec![7.0, 8.0, 9.0]),
            ],
        );
        let f = StFile::open(&path).expect("open");
        let all = f
            .read_region("w", &Region::whole(&[2, 3, 4]))
            .expect("whole");
        assert_eq!(floats(&all.1), v);
        let r = Region {
            offset: vec![1, 1, 2],
            shape: vec![1, 2, 2],
        };
        let (_, got) = f.read_region("w", &r).expect("corner");
        // [1, 1..3, 2..4]: 12 + 4 + 2 = 18, 19; 12 + 8 + 2 = 22, 23.
        assert_eq!(floats(&got), vec![18.0, 19.0, 22.0, 23.0]);
        let cols = Region {
            offset: vec![0, 0, 1],
            shape: vec![2, 3, 1],
        };
        let (_, got) = f.read_region("w", &cols).expect("a column");
        assert_eq!(floats(&got), vec![1.0, 5.0, 9.0, 13.0, 17.0, 21.0]);
        let (_, got) = f
            .read_region(
                "b",
                &Region {
                    offset: vec![1],
                    shape: vec![2],
                },
            )
            .expect("bias");
        assert_eq!(floats(&got), vec![8.0, 9.0]);
        assert!(
            f.read_region(
                "w",
                &Region {
                    offset: vec![0, 0, 3],
                    shape: vec![1, 1, 2]
                }
            )
            .is_err()
        );
        assert!(f.read_region("nope", &Region::whole(&[1])).is_err());
    }

    #[test]
    fn a_truncated_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("dir");
        let path = write(dir.path(), &[("w", vec![4, 4], vec![1.0; 16])]);
        let bytes = std::fs::read(&path).expect("read");
        std::fs::write(&path, &bytes[..bytes.len() - 5]).expect("cut");
        let err = StFile::open(&path).expect_err("truncated");
        let msg = err.to_string();
        assert!(
            msg.contains("m.safetensors") && msg.contains("truncated"),
            "{msg}"
        );
        std::fs::write(&path, &bytes[..3]).expect("cut");
        assert!(StFile::open(&path).is_err());
    }
}
