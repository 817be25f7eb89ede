//! Syntax tree of one annotation: `inputs -> outputs`, each a list of shapes.

use serde::{Deserialize, Serialize};

/// How a named dimension may be partitioned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Mark {
    /// Plain identifier: may be split; outputs that carry it are split alike.
    Spatial,
    /// `+`: may be split; outputs that lack it become partial sums (V).
    Reduce,
    /// `^`: never split.
    Frozen,
}

/// One factor of a tensor dimension.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Factor {
    /// A named factor such as `b`, `k+` or `d^`.
    Named { name: String, mark: Mark },
    /// A fixed size such as `1` or `64`; always frozen.
    Number(u64),
    /// `?`: one dimension of any size that may only be replicated.
    Anon,
}

/// One tensor dimension as written in a shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Dim {
    /// A single factor: `b`, `k+`, `64`, `?`.
    Single(Factor),
    /// `(a b ...)`: one tensor dimension made of several factors; only the
    /// first may be split; a factor's size may come from an op attribute of
    /// the same name.
    Group(Vec<Factor>),
    /// `*`: as many anonymous, unsplittable dims as the tensor has beyond the
    /// others; every `*` of one annotation expands to the same count.
    Star,
}

/// The annotation of one tensor argument.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Shape {
    /// A tensor with these dims (possibly none: a scalar).
    Tensor(Vec<Dim>),
    /// A lone `?`: a non-tensor argument, or a tensor of any rank that may
    /// only be replicated.
    Opaque,
}

/// One alternative of an op's annotation: `inputs -> outputs`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Annotation {
    pub inputs: Vec<Shape>,
    pub outputs: Vec<Shape>,
}
