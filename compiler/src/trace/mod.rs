//! The tracer: model code runs against symbolic tensors and records ops.
//!
//! A [`Tracer`] owns the [`Graph`] under construction. Each recorded op is
//! looked up in the annotation [`Registry`] by its kind name, the first
//! annotation alternative matching the input ranks is resolved onto the op,
//! and the output shapes are inferred from that annotation (so a model never
//! computes shapes by hand, and a shape the annotation cannot explain is an
//! error at trace time). Model families live in [`models`]; they build a
//! [`ModelConfig`] from a preset or a HuggingFace `config.json`.
//!
//! The tracer knows nothing about partitioning or costs.

pub mod config;
pub mod models;
mod summary;

use std::collections::BTreeMap;

use thiserror::Error;

use crate::anno::{Registry, RegistryError};
use crate::ir::{AttrValue, DType, Graph, Op, OpKind, Role, Tensor, TensorId, VerifyError, verify};

pub use config::{ConfigError, ModelConfig};
pub use models::{
    GptConfig, LlamaConfig, PRESETS, RopeScaling, TokenIds, load_model, preset, trace_model,
};
pub use summary::{Summary, SummaryError};

/// Tracing inputs that are not part of the model: batch, sequence, dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceOptions {
    /// Sequences per step (the global batch the graph is traced for).
    pub batch: u64,
    /// Tokens per sequence; `None` takes the model's default.
    pub seq_len: Option<u64>,
    /// Dtype of parameters and activations.
    pub dtype: DType,
    /// Copies of each GQA kv head (1: none). With `m` copies the graph has
    /// `m` times the kv heads, each query group reading its own copy, so
    /// that tp may be up to `m` times the model's kv-head count; the kv
    /// projections are marked as copies ([`crate::ir::Graph::copies`]).
    pub kv_copies: u64,
}

impl Default for TraceOptions {
    fn default() -> Self {
        Self {
            batch: 1,
            seq_len: None,
            dtype: DType::Bf16,
            kv_copies: 1,
        }
    }
}

#[derive(Debug, Error)]
pub enum TraceError {
    #[error(
        "op '{op}' ({site}) has no annotation: no loaded annotation file registers it{}",
        match file { Some(f) => format!(" (the built-in {f} should; is the file complete?)"), None => "; register it in a file passed with --annotations FILE".to_string() }
    )]
    UnknownOp {
        op: String,
        site: String,
        file: Option<&'static str>,
    },
    #[error("op '{op}' ({site}): {source}")]
    Annotation {
        op: String,
        site: String,
        #[source]
        source: Box<RegistryError>,
    },
    #[error(
        "op '{op}' ({site}): input shapes {shapes:?} do not fit annotation [{annotation}]: {detail}"
    )]
    Shape {
        op: String,
        site: String,
        shapes: Vec<Vec<u64>>,
        annotation: String,
        detail: String,
    },
    #[error("invalid tracing option: {0}")]
    Option(String),
    /// A tensor (or the whole graph) beyond the sizes autopart supports:
    /// past them, element and byte counts would overflow.
    #[error(
        "tensor '{tensor}' of shape {shape:?} has {elements} elements, more than the 2^48 autopart supports: is a size of the model, --batch or --seq-len too large?"
    )]
    TooLarge {
        tensor: String,
        shape: Vec<u64>,
        /// The count, or "over 2^64".
        elements: String,
    },
    #[error(
        "the traced graph's tensors hold {elements} elements, more than the 2^56 autopart supports: is a size of the model, --batch or --seq-len too large?"
    )]
    GraphTooLarge { elements: u128 },
    #[error("traced graph fails verification:\n{}", .0.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"))]
    Verify(Vec<VerifyError>),
}

/// The most elements one traced tensor may have (a 2^24 x 2^24 matrix; the
/// largest tensors of real models have under 2^36).
pub const MAX_TENSOR_ELEMENTS: u64 = 1 << 48;
/// The most elements all tensors of a traced graph may have together. With
/// both limits, element and byte counts (and their sums over a graph, a
/// stage or a plan) stay far inside u64.
pub const MAX_GRAPH_ELEMENTS: u128 = 1 << 56;

/// A symbolic tensor: a handle into the graph being traced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sym(pub TensorId);

/// Records ops into a [`Graph`] as model code calls it.
#[derive(Debug)]
pub struct Tracer<'r> {
    graph: Graph,
    registry: &'r Registry,
    layer: Option<u32>,
}

impl<'r> Tracer<'r> {
    pub fn new(name: impl Into<String>, registry: &'r Registry) -> Self {
        Self {
            graph: Graph::new(name),
            registry,
            layer: None,
        }
    }

    /// Declares a tensor fed by the data loader.
    pub fn input(&mut self, name: &str, shape: &[u64], dtype: DType, role: Role) -> Sym {
        Sym(self.graph.add_tensor(Tensor {
            name: name.to_string(),
            shape: shape.to_vec(),
            dtype,
            role,
        }))
    }

    /// Declares a trainable parameter.
    pub fn param(&mut self, name: &str, shape: &[u64], dtype: DType) -> Sym {
        self.input(name, shape, dtype, Role::Parameter)
    }

    /// Marks parameter `s` as `m` copies of each block along `dim`.
    pub fn set_copies(&mut self, s: Sym, dim: usize, m: u64) {
        self.graph.set_copies(s.0, dim, m);
    }

    /// Ops recorded from now on belong to transformer layer `layer`.
    pub fn set_layer(&mut self, layer: Option<u32>) {
        self.layer = layer;
    }

    pub fn shape(&self, s: Sym) -> &[u64] {
        &self.graph.tensor(s.0).shape
    }

    /// Records a single-output op named `site` (its source name).
    pub fn op(
        &mut self,
        kind: OpKind,
        site: &str,
        inputs: &[Sym],
        attrs: &[(&str, AttrValue)],
    ) -> Result<Sym, TraceError> {
        let outs = self.op_multi(kind, site, inputs, attrs)?;
        // A registered op always has at least one output (checked in op_multi).
        Ok(outs[0])
    }

    /// Records an op and returns all its outputs.
    pub fn op_multi(
        &mut self,
        kind: OpKind,
        site: &str,
        inputs: &[Sym],
        attrs: &[(&str, AttrValue)],
    ) -> Result<Vec<Sym>, TraceError> {
        let name = kind.name().to_string();
        if self.registry.get(&name).is_none() {
            return Err(TraceError::UnknownOp {
                op: name,
                site: site.to_string(),
                file: kind.builtin_file(),
            });
        }
        let ranks: Vec<Option<usize>> = inputs
            .iter()
            .map(|s| Some(self.graph.tensor(s.0).shape.len()))
            .collect();
        let annotation = self
            .registry
            .resolve(&name, &ranks)
            .map_err(|source| TraceError::Annotation {
                op: name.clone(),
                site: site.to_string(),
                source: Box::new(source),
            })?
            .clone();
        let attrs: BTreeMap<String, AttrValue> = attrs
            .iter()
            .map(|(k, v)| ((*k).to_string(), v.clone()))
            .collect();
        let int_attrs: BTreeMap<String, i64> = attrs
            .iter()
            .filter_map(|(k, v)| v.as_int().map(|i| (k.clone(), i)))
            .collect();
        let shapes: Vec<Vec<u64>> = inputs
            .iter()
            .map(|s| self.graph.tensor(s.0).shape.clone())
            .collect();
        let shape_err = |detail: String| TraceError::Shape {
            op: name.clone(),
            site: site.to_string(),
            shapes: shapes.clone(),
            annotation: annotation.to_string(),
            detail,
        };
        let in_refs: Vec<Option<&[u64]>> = shapes.iter().map(|s| Some(s.as_slice())).collect();
        let binding = annotation
            .bind(&in_refs, &[], &int_attrs)
            .map_err(|e| shape_err(e.to_string()))?;
        let out_shapes = annotation
            .output_shapes(&binding)
            .map_err(|e| shape_err(e.to_string()))?;
        if out_shapes.is_empty() {
            return Err(shape_err("the annotation declares no outputs".into()));
        }
        let dtype = inputs
            .iter()
            .map(|s| self.graph.tensor(s.0).dtype)
            .find(|d| d.is_float())
            .unwrap_or(DType::F32);
        let n_out = out_shapes.len();
        let mut outputs = Vec::with_capacity(n_out);
        for (i, shape) in out_shapes.into_iter().enumerate() {
            let shape =
                shape.ok_or_else(|| shape_err(format!("output {i} is not a tensor ('?')")))?;
            let tname = if n_out == 1 {
                format!("{site}.out")
            } else {
                format!("{site}.out{i}")
            };
            outputs.push(self.graph.add_tensor(Tensor {
                name: tname,
                shape,
                dtype,
                role: Role::Activation,
            }));
        }
        self.graph.add_op(Op {
            kind,
            name: site.to_string(),
            attrs,
            inputs: inputs.iter().map(|s| s.0).collect(),
            outputs: outputs.clone(),
            annotation,
            layer: self.layer,
        });
        Ok(outputs.into_iter().map(Sym).collect())
    }

    /// Ends tracing, checks the tensors' sizes ([`MAX_TENSOR_ELEMENTS`],
    /// [`MAX_GRAPH_ELEMENTS`]) and verifies the graph.
    pub fn finish(self) -> Result<Graph, TraceError> {
        let mut total: u128 = 0;
        for (_, t) in self.graph.tensors() {
            let count = t.shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
            match count {
                Some(n) if n <= MAX_TENSOR_ELEMENTS => total += u128::from(n),
                _ => {
                    return Err(TraceError::TooLarge {
                        tensor: t.name.clone(),
                        shape: t.shape.clone(),
                        elements: count.map_or_else(|| "over 2^64".into(), |n| n.to_string()),
                    });
                }
            }
        }
        if total > MAX_GRAPH_ELEMENTS {
            return Err(TraceError::GraphTooLarge { elements: total });
        }
        verify(&self.graph).map_err(TraceError::Verify)?;
        Ok(self.graph)
    }
}
