//! Arenas of tensors and ops, typed ids, and the text form.

use std::collections::BTreeMap;
use std::fmt;

use petgraph::graph::{DiGraph, NodeIndex};
use serde::{Deserialize, Serialize};

use crate::anno::Annotation;

/// Index of a tensor in [`Graph`]'s tensor arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TensorId(pub u32);

/// Index of an op in [`Graph`]'s op arena (ops are stored in trace order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct OpId(pub u32);

impl TensorId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl OpId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for TensorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "%{}", self.0)
    }
}

impl fmt::Display for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DType {
    Bf16,
    F16,
    F32,
    I64,
}

impl DType {
    pub fn size_bytes(self) -> u64 {
        match self {
            DType::Bf16 | DType::F16 => 2,
            DType::F32 => 4,
            DType::I64 => 8,
        }
    }

    pub fn is_float(self) -> bool {
        !matches!(self, DType::I64)
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::Bf16 => "bf16",
            DType::F16 => "f16",
            DType::F32 => "f32",
            DType::I64 => "i64",
        }
    }
}

impl From<autopart_vocab::DType> for DType {
    fn from(d: autopart_vocab::DType) -> Self {
        match d {
            autopart_vocab::DType::Bf16 => DType::Bf16,
            autopart_vocab::DType::Fp16 => DType::F16,
            autopart_vocab::DType::Fp32 => DType::F32,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a tensor is to the training step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Role {
    /// Fed by the data loader (token ids).
    Input,
    /// Fed by the data loader, used only by the loss (target token ids).
    Label,
    /// A trainable weight.
    Parameter,
    /// Produced by an op.
    Activation,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Input => "input",
            Role::Label => "label",
            Role::Parameter => "param",
            Role::Activation => "act",
        }
    }
}

/// A tensor: global (unpartitioned) shape, dtype, role and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<u64>,
    pub dtype: DType,
    pub role: Role,
}

impl Tensor {
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }

    pub fn size_bytes(&self) -> u64 {
        self.numel() * self.dtype.size_bytes()
    }
}

/// The closed set of ops the built-in tracers emit, plus user-registered ops.
///
/// [`OpKind::name`] is the key into the annotation registry.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum OpKind {
    Embedding,
    PosEmbedding,
    Linear,
    LinearBias,
    RmsNorm,
    LayerNorm,
    SplitHeads,
    MergeHeads,
    Rope,
    Attention,
    Add,
    SwiGlu,
    Gelu,
    CrossEntropy,
    Mean,
    /// An op registered by a user annotation file, by its registered name.
    Custom(String),
}

impl OpKind {
    /// Every built-in kind, in a fixed order.
    pub const BUILTIN: [OpKind; 15] = [
        OpKind::Embedding,
        OpKind::PosEmbedding,
        OpKind::Linear,
        OpKind::LinearBias,
        OpKind::RmsNorm,
        OpKind::LayerNorm,
        OpKind::SplitHeads,
        OpKind::MergeHeads,
        OpKind::Rope,
        OpKind::Attention,
        OpKind::Add,
        OpKind::SwiGlu,
        OpKind::Gelu,
        OpKind::CrossEntropy,
        OpKind::Mean,
    ];

    /// The op's name in annotation files.
    pub fn name(&self) -> &str {
        match self {
            OpKind::Embedding => "embedding",
            OpKind::PosEmbedding => "pos_embedding",
            OpKind::Linear => "linear",
            OpKind::LinearBias => "linear_bias",
            OpKind::RmsNorm => "rms_norm",
            OpKind::LayerNorm => "layer_norm",
            OpKind::SplitHeads => "split_heads",
            OpKind::MergeHeads => "merge_heads",
            OpKind::Rope => "rope",
            OpKind::Attention => "attention",
            OpKind::Add => "add",
            OpKind::SwiGlu => "swiglu",
            OpKind::Gelu => "gelu",
            OpKind::CrossEntropy => "cross_entropy",
            OpKind::Mean => "mean",
            OpKind::Custom(name) => name,
        }
    }

    /// The kind whose annotation-file name is `name`; unknown names are custom ops.
    pub fn from_name(name: &str) -> OpKind {
        OpKind::BUILTIN
            .iter()
            .find(|k| k.name() == name)
            .cloned()
            .unwrap_or_else(|| OpKind::Custom(name.to_string()))
    }

    /// The built-in annotation file that registers this kind (None for custom ops).
    pub fn builtin_file(&self) -> Option<&'static str> {
        Some(match self {
            OpKind::Embedding | OpKind::PosEmbedding => "annotations/embedding.ron",
            OpKind::Linear | OpKind::LinearBias => "annotations/linear.ron",
            OpKind::RmsNorm | OpKind::LayerNorm => "annotations/norm.ron",
            OpKind::SplitHeads | OpKind::MergeHeads | OpKind::Rope | OpKind::Attention => {
                "annotations/attention.ron"
            }
            OpKind::Add | OpKind::SwiGlu | OpKind::Gelu => "annotations/elementwise.ron",
            OpKind::CrossEntropy | OpKind::Mean => "annotations/loss.ron",
            OpKind::Custom(_) => return None,
        })
    }
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An op attribute value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum AttrValue {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
}

impl AttrValue {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            AttrValue::Str(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            AttrValue::Int(v) => Some(*v),
            _ => None,
        }
    }

    pub fn as_float(&self) -> Option<f64> {
        match self {
            AttrValue::Float(v) => Some(*v),
            AttrValue::Int(v) => Some(*v as f64),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            AttrValue::Bool(v) => Some(*v),
            _ => None,
        }
    }
}

impl fmt::Display for AttrValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttrValue::Int(v) => write!(f, "{v}"),
            // `{:?}` prints the shortest representation that round-trips.
            AttrValue::Float(v) => write!(f, "{v:?}"),
            AttrValue::Bool(v) => write!(f, "{v}"),
            AttrValue::Str(v) => write!(f, "{v:?}"),
        }
    }
}

/// One op of the traced forward graph.
#[derive(Clone, Debug, PartialEq)]
pub struct Op {
    pub kind: OpKind,
    /// Source name of the traced module, e.g. `layers.3.self_attn.q_proj`.
    pub name: String,
    pub attrs: BTreeMap<String, AttrValue>,
    pub inputs: Vec<TensorId>,
    pub outputs: Vec<TensorId>,
    /// The annotation alternative that matched this op's inputs.
    pub annotation: Annotation,
    /// Transformer layer index; `None` for ops outside the repeated layers
    /// (embeddings, final norm, head, loss).
    pub layer: Option<u32>,
}

impl Op {
    /// Integer attributes, the ones annotations may use to size grouped dims.
    pub fn int_attrs(&self) -> BTreeMap<String, i64> {
        self.attrs
            .iter()
            .filter_map(|(k, v)| v.as_int().map(|i| (k.clone(), i)))
            .collect()
    }
}

/// The dataflow graph of one training step's forward pass.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    /// The model's name (preset or config file stem).
    pub name: String,
    tensors: Vec<Tensor>,
    ops: Vec<Op>,
    /// Side table: the op producing each tensor.
    producer: Vec<Option<OpId>>,
    /// Side table: the ops reading each tensor, in op order.
    consumers: Vec<Vec<OpId>>,
    /// Parameters traced as copies: `(dim, m)` says that along `dim` each
    /// block of the model's tensor appears `m` times in a row (GQA kv heads
    /// replicated so that tp may exceed their count, NxD's
    /// `kv_size_multiplier`). The model holds one block where the graph
    /// shows `m`; their gradients sum.
    copies: BTreeMap<TensorId, (usize, u64)>,
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }

    pub fn add_tensor(&mut self, tensor: Tensor) -> TensorId {
        let id = TensorId(u32::try_from(self.tensors.len()).expect("fewer than 2^32 tensors"));
        self.tensors.push(tensor);
        self.producer.push(None);
        self.consumers.push(Vec::new());
        id
    }

    /// Appends an op. Its inputs and outputs must already be in the arena
    /// (the verifier reports double producers and dangling ids).
    pub fn add_op(&mut self, op: Op) -> OpId {
        let id = OpId(u32::try_from(self.ops.len()).expect("fewer than 2^32 ops"));
        for &t in &op.outputs {
            if let Some(slot) = self.producer.get_mut(t.index()) {
                // A second producer is kept out of the table; `verify` reports it.
                slot.get_or_insert(id);
            }
        }
        for &t in &op.inputs {
            if let Some(list) = self.consumers.get_mut(t.index()) {
                list.push(id);
            }
        }
        self.ops.push(op);
        id
    }

    pub fn tensor(&self, id: TensorId) -> &Tensor {
        &self.tensors[id.index()]
    }

    pub fn op(&self, id: OpId) -> &Op {
        &self.ops[id.index()]
    }

    pub fn get_tensor(&self, id: TensorId) -> Option<&Tensor> {
        self.tensors.get(id.index())
    }

    pub fn tensors(&self) -> impl Iterator<Item = (TensorId, &Tensor)> {
        self.tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (TensorId(i as u32), t))
    }

    pub fn ops(&self) -> impl Iterator<Item = (OpId, &Op)> {
        self.ops
            .iter()
            .enumerate()
            .map(|(i, o)| (OpId(i as u32), o))
    }

    pub fn n_tensors(&self) -> usize {
        self.tensors.len()
    }

    pub fn n_ops(&self) -> usize {
        self.ops.len()
    }

    pub fn producer(&self, id: TensorId) -> Option<OpId> {
        self.producer.get(id.index()).copied().flatten()
    }

    pub fn consumers(&self, id: TensorId) -> &[OpId] {
        self.consumers
            .get(id.index())
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    pub fn parameters(&self) -> impl Iterator<Item = (TensorId, &Tensor)> {
        self.tensors().filter(|(_, t)| t.role == Role::Parameter)
    }

    /// Total number of trainable parameters (a tied weight counts once, a
    /// parameter traced as copies once).
    pub fn n_params(&self) -> u64 {
        self.parameters()
            .map(|(id, t)| t.numel() / self.copies(id).map_or(1, |(_, m)| m.max(1)))
            .sum()
    }

    /// Marks parameter `id` as traced with `m` copies of each block along
    /// `dim` (see the field's doc).
    pub fn set_copies(&mut self, id: TensorId, dim: usize, m: u64) {
        if m > 1 {
            self.copies.insert(id, (dim, m));
        }
    }

    /// `(dim, m)` when parameter `id` was traced as copies.
    pub fn copies(&self, id: TensorId) -> Option<(usize, u64)> {
        self.copies.get(&id).copied()
    }

    /// Number of transformer layers (one more than the largest layer index).
    pub fn n_layers(&self) -> u32 {
        self.ops
            .iter()
            .filter_map(|o| o.layer)
            .max()
            .map_or(0, |l| l + 1)
    }

    /// The op-level dependency graph: node weights are op ids, an edge
    /// carries the tensor flowing from producer to consumer.
    pub fn dataflow(&self) -> DiGraph<OpId, TensorId> {
        let mut g = DiGraph::with_capacity(self.ops.len(), self.tensors.len());
        let nodes: Vec<NodeIndex> = self.ops().map(|(id, _)| g.add_node(id)).collect();
        for (id, op) in self.ops() {
            for &t in &op.inputs {
                if let Some(p) = self.producer(t) {
                    g.add_edge(nodes[p.index()], nodes[id.index()], t);
                }
            }
        }
        g
    }

    /// Ops in a topological order (ties broken by trace order), or the ops on
    /// a cycle.
    pub fn topo_order(&self) -> Result<Vec<OpId>, Vec<OpId>> {
        let g = self.dataflow();
        let mut space = petgraph::algo::DfsSpace::new(&g);
        match petgraph::algo::toposort(&g, Some(&mut space)) {
            Ok(order) => Ok(order.into_iter().map(|n| g[n]).collect()),
            Err(cycle) => {
                let sccs = petgraph::algo::tarjan_scc(&g);
                let on_cycle = sccs
                    .into_iter()
                    .find(|c| c.contains(&cycle.node_id()))
                    .unwrap_or_default();
                let mut ops: Vec<OpId> = on_cycle.into_iter().map(|n| g[n]).collect();
                ops.sort();
                Err(ops)
            }
        }
    }

    /// Ops belonging to transformer layer `layer`, in trace order.
    pub fn layer_ops(&self, layer: u32) -> impl Iterator<Item = (OpId, &Op)> {
        self.ops().filter(move |(_, o)| o.layer == Some(layer))
    }
}

fn write_shape(f: &mut fmt::Formatter<'_>, t: &Tensor) -> fmt::Result {
    write!(f, "{}[", t.dtype)?;
    for (i, d) in t.shape.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write!(f, "{d}")?;
    }
    f.write_str("]")
}

/// The stable text form: leaf tensors (inputs, labels, parameters), then
/// every op in trace order with its outputs, attributes and annotation.
///
/// ```text
/// graph llama-mini
///   %0 input tokens: i64[2, 16]
///   ...
///   layer 0
///   #2 layers.0.input_layernorm = rms_norm(%3, %4) {eps: 1e-5}  [b l d^, d^ -> b l d^]
///      -> %5 layers.0.input_layernorm.out: f32[2, 16, 64]
/// ```
impl fmt::Display for Graph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "graph {}", self.name)?;
        for (id, t) in self.tensors() {
            if self.producer(id).is_none() {
                write!(f, "  {id} {} {}: ", t.role.name(), t.name)?;
                write_shape(f, t)?;
                if let Some((dim, m)) = self.copies(id) {
                    write!(f, " (each block of dim {dim} {m} times)")?;
                }
                writeln!(f)?;
            }
        }
        let mut layer = None;
        for (id, op) in self.ops() {
            if op.layer != layer {
                layer = op.layer;
                match layer {
                    Some(l) => writeln!(f, "  layer {l}")?,
                    None => writeln!(f, "  (outside layers)")?,
                }
            }
            write!(f, "  {id} {} = {}(", op.name, op.kind)?;
            for (i, t) in op.inputs.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{t}")?;
            }
            f.write_str(")")?;
            if !op.attrs.is_empty() {
                f.write_str(" {")?;
                for (i, (k, v)) in op.attrs.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{k}: {v}")?;
                }
                f.write_str("}")?;
            }
            writeln!(f, "  [{}]", op.annotation)?;
            for &o in &op.outputs {
                match self.get_tensor(o) {
                    Some(t) => {
                        write!(f, "     -> {o} {}: ", t.name)?;
                        write_shape(f, t)?;
                        writeln!(f)?;
                    }
                    None => writeln!(f, "     -> {o} <missing>")?,
                }
            }
        }
        Ok(())
    }
}
