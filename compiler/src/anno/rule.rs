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

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test fails
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::anno::testgen;

    fn bound(src: &str, inputs: &[&[u64]]) -> (Annotation, Binding) {
        let a: Annotation = src.parse().unwrap();
        let ins: Vec<Option<&[u64]>> = inputs.iter().map(|s| Some(*s)).collect();
        let b = a.bind(&ins, &[], &BTreeMap::new()).unwrap();
        (a, b)
    }

    fn rule(a: &Annotation, b: &Binding, id: &str, parts: u64) -> String {
        match partition(a, b, id, parts) {
            Ok(r) => r.to_string(),
            Err(e) => format!("error: {e}"),
        }
    }

    #[test]
    fn layouts_print_like_the_architecture_table() {
        assert_eq!(Layout::R.to_string(), "R");
        assert_eq!(Layout::V.to_string(), "V");
        assert_eq!(Layout::D(2).to_string(), "D(2)");
    }

    #[test]
    fn star_shifts_dim_indices() {
        let (a, b) = bound("* k+, n k+ -> * n", &[&[2, 16, 64], &[256, 64]]);
        assert_eq!(rule(&a, &b, "k", 4), "k/4: D(2), D(1) -> V");
        assert_eq!(rule(&a, &b, "n", 4), "n/4: R, D(0) -> D(2)");
        let (a, b) = bound("* k+, n k+ -> * n", &[&[64], &[256, 64]]);
        assert_eq!(rule(&a, &b, "n", 4), "n/4: R, D(0) -> D(0)");
    }

    #[test]
    fn spatial_lost_in_an_output_is_replicated() {
        let (a, b) = bound("b l d -> l, b", &[&[2, 4, 8]]);
        assert_eq!(rule(&a, &b, "b", 2), "b/2: D(0) -> R, D(0)");
    }

    #[test]
    fn opaque_is_always_replicated() {
        let a: Annotation = "?, b d -> b d, ?".parse().unwrap();
        let b = a
            .bind(&[None, Some(&[4, 8])], &[], &BTreeMap::new())
            .unwrap();
        assert_eq!(rule(&a, &b, "b", 2), "b/2: R, D(0) -> D(0), R");
    }

    #[test]
    fn errors_say_why() {
        let (a, b) = bound(
            "b l^ (g r) d^ 4, b s^ g d^ -> b l^ (g r) d^",
            &[&[2, 16, 4, 16, 4], &[2, 16, 2, 16]],
        );
        let cases = [
            (
                "b",
                0,
                "error: cannot split 'b' into 0 parts; expected at least 1",
            ),
            (
                "x",
                2,
                "error: unknown identifier 'x'; expected one of the annotation's: b, l^, g, r, d^, s^",
            ),
            ("l", 2, "error: 'l' is frozen (^) and may not be split"),
            (
                "4",
                2,
                "error: '4' is a fixed-size or anonymous dim and may not be split",
            ),
            (
                "?",
                2,
                "error: '?' is a fixed-size or anonymous dim and may not be split",
            ),
            (
                "r",
                2,
                "error: 'r' is not the first factor of group '(g r)' (input 0 dim 2) and may not be split",
            ),
            (
                "b",
                3,
                "error: 'b' has size 2, which is not divisible into 3 parts",
            ),
            (
                "g",
                4,
                "error: 'g' has size 2, which is not divisible into 4 parts",
            ),
        ];
        for (id, parts, expected) in cases {
            assert_eq!(
                rule(&a, &b, id, parts),
                expected,
                "splitting {id} in {parts}"
            );
        }
        let (a, b) = bound("a a -> a", &[&[4, 4]]);
        assert_eq!(
            rule(&a, &b, "a", 2),
            "error: 'a' names more than one dim of input 0, so no single dim can be split"
        );
        let a: Annotation = "b k -> b".parse().unwrap();
        assert_eq!(
            partition(&a, &Binding::default(), "k", 2),
            Err(PartitionError::Unsized { id: "k".into() })
        );
    }

    #[test]
    fn one_part_is_a_no_op() {
        let (a, b) = bound("b l k+, n k+ -> b l n", &[&[2, 16, 64], &[256, 64]]);
        for id in ["b", "k", "n"] {
            let r = partition(&a, &b, id, 1).unwrap();
            assert_eq!(r.inputs, vec![Layout::R, Layout::R]);
            assert_eq!(r.outputs, vec![Layout::R]);
        }
        // Nothing is split, so even a frozen id is fine.
        let (a, b) = bound("b d^ -> b d^", &[&[2, 3]]);
        assert_eq!(rule(&a, &b, "d", 1), "d/1: R -> R");
    }

    proptest! {
        /// For random annotations and shapes, splitting a splittable id
        /// gives D at the dim that carries it, V for outputs that lose a `+`
        /// id and R for outputs that lose a spatial one and inputs without it.
        #[test]
        fn rules_follow_the_dims(
            a in testgen::annotation(),
            seeds in prop::collection::vec(any::<u64>(), 1..16),
            parts in 2u64..4,
            pick in any::<prop::sample::Index>(),
        ) {
            let fit = testgen::fit(&a, parts, &seeds);
            let ins: Vec<Option<&[u64]>> = fit.inputs.iter().map(|s| s.as_deref()).collect();
            let outs: Vec<Option<&[u64]>> = fit.outputs.iter().map(|s| s.as_deref()).collect();
            let binding = a.bind(&ins, &outs, &fit.attrs).unwrap();

            let splittable = a.splittable_ids();
            for (id, _) in a.ids() {
                prop_assert_eq!(
                    partition(&a, &binding, id, parts).is_ok(),
                    splittable.contains(&id),
                    "splitting {} of {}", id, a
                );
            }
            if splittable.is_empty() {
                return Ok(());
            }
            let id = splittable[pick.index(splittable.len())];
            let mark = a.ids().into_iter().find(|(n, _)| *n == id).map(|(_, m)| m);
            let rule = partition(&a, &binding, id, parts).unwrap();

            let expected = |labels: &Option<Vec<Option<String>>>, lost: Layout| match labels {
                None => Layout::R,
                Some(labels) => {
                    let carrying: Vec<usize> = labels
                        .iter()
                        .enumerate()
                        .filter(|(_, l)| l.as_deref() == Some(id))
                        .map(|(d, _)| d)
                        .collect();
                    assert!(carrying.len() <= 1, "splittable ids label at most one dim");
                    carrying.first().map_or(lost, |&d| Layout::D(d))
                }
            };
            let lost = if mark == Some(Mark::Reduce) { Layout::V } else { Layout::R };
            let want_in: Vec<Layout> = fit.input_labels.iter().map(|l| expected(l, Layout::R)).collect();
            let want_out: Vec<Layout> = fit.output_labels.iter().map(|l| expected(l, lost)).collect();
            prop_assert_eq!(&rule.inputs, &want_in, "splitting {} of {}", id, a);
            prop_assert_eq!(&rule.outputs, &want_out, "splitting {} of {}", id, a);

            // A D layout always points inside the tensor.
            for (layout, shape) in rule.inputs.iter().chain(&rule.outputs).zip(fit.inputs.iter().chain(&fit.outputs)) {
                if let Layout::D(d) = layout {
                    let shape = shape.as_ref().unwrap();
                    prop_assert!(*d < shape.len());
                    prop_assert_eq!(shape[*d] % parts, 0);
                }
            }

            // Sizes that do not divide are refused, saying so.
            let size = binding.size(id).unwrap();
            prop_assert_eq!(
                partition(&a, &binding, id, size + 1),
                Err(PartitionError::Indivisible { id: id.to_string(), size, parts: size + 1 })
            );
        }
    }
}
