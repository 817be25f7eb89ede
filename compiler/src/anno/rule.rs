//! The partition rule an annotation implies.
//!
//! Splitting one identifier `X` of a bound annotation into `k` parts gives
//! every input and output a [`Layout`]: tensors that carry `X` are split
//! along its dim (`D`), outputs that lose a `+` identifier hold partial sums
//! (`V`), everything else is replicated (`R`). This module decides legality
//! and layouts for one op; choosing which splits to make is the search's job,
//! and moving data between layouts is `lower`'s.

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::ast::{Annotation, Dim, Factor, Mark, Shape};
use super::bind::{Binding, Slot, SplitObstacle, TensorRef, expand};

/// How a tensor is laid out along one mesh axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Layout {
    /// Every device holds the whole tensor.
    R,
    /// Every device holds a partial sum; the parts add up to the tensor.
    V,
    /// Split along tensor dim `d` (counted after `*` expansion).
    D(usize),
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Layout::R => f.write_str("R"),
            Layout::V => f.write_str("V"),
            Layout::D(d) => write!(f, "D({d})"),
        }
    }
}

/// The layouts of an op's inputs and outputs when identifier `id` is split
/// into `parts` parts.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PartitionRule {
    pub id: String,
    pub parts: u64,
    pub inputs: Vec<Layout>,
    pub outputs: Vec<Layout>,
}

impl fmt::Display for PartitionRule {
    /// `k/2: D(2), D(1) -> V`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let join = |ls: &[Layout]| {
            ls.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        write!(
            f,
            "{}/{}: {} -> {}",
            self.id,
            self.parts,
            join(&self.inputs),
            join(&self.outputs)
        )
    }
}

/// Why an identifier may not be split as asked.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum PartitionError {
    #[error("cannot split '{id}' into 0 parts; expected at least 1")]
    ZeroParts { id: String },
    #[error("unknown identifier '{id}'; expected one of the annotation's: {known}")]
    UnknownId { id: String, known: String },
    #[error("'{id}' is frozen (^) and may not be split")]
    Frozen { id: String },
    #[error("'{id}' is a fixed-size or anonymous dim and may not be split")]
    Fixed { id: String },
    #[error(
        "'{id}' is not the first factor of group '{group}' ({tensor} dim {dim}) and may not be split"
    )]
    LaterFactor {
        id: String,
        tensor: TensorRef,
        dim: usize,
        group: String,
    },
    #[error("'{id}' names more than one dim of {tensor}, so no single dim can be split")]
    Repeated { id: String, tensor: TensorRef },
    #[error("the binding has no size for '{id}'")]
    Unsized { id: String },
    #[error("'{id}' has size {size}, which is not divisible into {parts} parts")]
    Indivisible { id: String, size: u64, parts: u64 },
}

/// The rule for splitting identifier `id` of `anno` (bound by `binding`)
/// into `parts` equal parts.
///
/// `parts == 1` splits nothing: every layout is `R` whatever `id`'s mark
/// (the id must still be one of the annotation's).
pub fn partition(
    anno: &Annotation,
    binding: &Binding,
    id: &str,
    parts: u64,
) -> Result<PartitionRule, PartitionError> {
    let err_id = || id.to_string();
    if parts == 0 {
        return Err(PartitionError::ZeroParts { id: err_id() });
    }
    let ids = anno.ids();
    let Some(&(_, mark)) = ids.iter().find(|(name, _)| *name == id) else {
        if id == "?" || id == "*" || id.parse::<u64>().is_ok() {
            return Err(PartitionError::Fixed { id: err_id() });
        }
        let known = ids
            .iter()
            .map(|(name, mark)| format!("{name}{mark}"))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(PartitionError::UnknownId {
            id: err_id(),
            known,
        });
    };
    let replicated = |shapes: &[Shape]| vec![Layout::R; shapes.len()];
    if parts == 1 {
        return Ok(PartitionRule {
            id: err_id(),
            parts,
            inputs: replicated(&anno.inputs),
            outputs: replicated(&anno.outputs),
        });
    }
    if mark == Mark::Frozen {
        return Err(PartitionError::Frozen { id: err_id() });
    }
    match anno.split_obstacle(id) {
        Some(SplitObstacle::LaterFactor { tensor, dim, group }) => {
            return Err(PartitionError::LaterFactor {
                id: err_id(),
                tensor,
                dim,
                group,
            });
        }
        Some(SplitObstacle::Repeated { tensor }) => {
            return Err(PartitionError::Repeated {
                id: err_id(),
                tensor,
            });
        }
        None => {}
    }
    let size = binding
        .size(id)
        .ok_or_else(|| PartitionError::Unsized { id: err_id() })?;
    if size % parts != 0 {
        return Err(PartitionError::Indivisible {
            id: err_id(),
            size,
            parts,
        });
    }

    let lost = match mark {
        Mark::Reduce => Layout::V,
        Mark::Spatial | Mark::Frozen => Layout::R,
    };
    let layout = |shape: &Shape, lost: Layout| match shape {
        Shape::Opaque => Layout::R,
        Shape::Tensor(dims) => dim_of(dims, binding.star_rank, id).map_or(lost, Layout::D),
    };
    Ok(PartitionRule {
        id: err_id(),
        parts,
        inputs: anno.inputs.iter().map(|s| layout(s, Layout::R)).collect(),
        outputs: anno.outputs.iter().map(|s| layout(s, lost)).collect(),
    })
}

/// The tensor dim (after `*` expansion) whose single factor or first group
/// factor is `id`.
fn dim_of(dims: &[Dim], star_rank: usize, id: &str) -> Option<usize> {
    expand(dims, star_rank).iter().position(|slot| {
        let first = match slot {
            Slot::Dim(Dim::Single(f)) => Some(f),
            Slot::Dim(Dim::Group(fs)) => fs.first(),
            Slot::Dim(Dim::Star) | Slot::Star(_) => None,
        };
        matches!(first, Some(Factor::Named { name, .. }) if name == id)
    })
}
