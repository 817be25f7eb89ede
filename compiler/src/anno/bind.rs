//! Binding an annotation to concrete tensor shapes.
//!
//! A [`Binding`] gives every identifier of an annotation its length and says
//! how many dims each `*` stands for. [`Annotation::bind`] computes it from the
//! actual shapes (inputs, and outputs when known) and op attributes, checking
//! that they agree; [`Annotation::output_shapes`] goes the other way. This
//! module owns rank matching and size unification; it says nothing about
//! which splits are legal (that is `rule`).

use std::collections::BTreeMap;
use std::fmt;

use thiserror::Error;

use super::ast::{Annotation, Dim, Factor, Mark, Shape};

/// The lengths an annotation's identifiers take for one call of the op.
///
/// `sizes` holds every identifier of the annotation after a successful
/// [`Annotation::bind`]. The dims a `*` stands for are recorded under the
/// names `*0`, `*1`, … (names no identifier can take), `star_rank` of them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Binding {
    pub sizes: BTreeMap<String, u64>,
    pub star_rank: usize,
}

impl Binding {
    /// The length of identifier `id`, if bound.
    pub fn size(&self, id: &str) -> Option<u64> {
        self.sizes.get(id).copied()
    }

    /// The lengths of the dims every `*` expands to.
    pub fn star_sizes(&self) -> Vec<Option<u64>> {
        (0..self.star_rank)
            .map(|i| self.size(&star_key(i)))
            .collect()
    }
}

fn star_key(i: usize) -> String {
    format!("*{i}")
}

/// Whether a tensor is an input or an output of the op.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Side {
    Input,
    Output,
}

/// One tensor argument of an op: `input 0`, `output 1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorRef {
    pub side: Side,
    pub index: usize,
}

impl fmt::Display for TensorRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.side {
            Side::Input => write!(f, "input {}", self.index),
            Side::Output => write!(f, "output {}", self.index),
        }
    }
}

/// Why concrete shapes do not fit an annotation.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum BindError {
    #[error("expected {expected} {what}, found {found}")]
    Arity {
        what: &'static str,
        expected: usize,
        found: usize,
    },
    #[error("{tensor} is not a tensor, but the annotation gives it shape '{shape}'")]
    NotATensor { tensor: TensorRef, shape: String },
    #[error("{tensor}: expected rank {expected} for shape '{shape}', found rank {found}")]
    Rank {
        tensor: TensorRef,
        shape: String,
        expected: String,
        found: usize,
    },
    #[error("{tensor}: '*' stands for {found} dims here but for {expected} dims in {first}")]
    StarRank {
        tensor: TensorRef,
        expected: usize,
        found: usize,
        first: TensorRef,
    },
    #[error("{tensor} dim {dim} '{written}': expected {expected} ({reason}), found {found}")]
    Mismatch {
        tensor: TensorRef,
        dim: usize,
        written: String,
        expected: u64,
        reason: String,
        found: u64,
    },
    #[error(
        "{tensor} dim {dim} '{written}': expected a multiple of {known} (the known factors), found {found}"
    )]
    Indivisible {
        tensor: TensorRef,
        dim: usize,
        written: String,
        known: u64,
        found: u64,
    },
    #[error(
        "{tensor} dim {dim} '{written}': cannot size factors {factors} from the dim's length {found}; expected all but one of them sized by another tensor or an attribute"
    )]
    UnsizedGroup {
        tensor: TensorRef,
        dim: usize,
        written: String,
        factors: String,
        found: u64,
    },
    #[error(
        "attribute '{name}' = {value} cannot be the length of a dim; expected a non-negative integer"
    )]
    BadAttr { name: String, value: i64 },
    #[error("output {index}: no size for '{name}' in the binding")]
    Unsized { index: usize, name: String },
}

/// Where a size was first seen, for error messages.
#[derive(Clone, Debug)]
enum Origin {
    Attr(String),
    Dim(TensorRef, usize),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Attr(name) => write!(f, "attribute '{name}'"),
            Origin::Dim(t, d) => write!(f, "as at {t} dim {d}"),
        }
    }
}

/// One dim of a tensor after `*` expansion.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Slot<'a> {
    Dim(&'a Dim),
    /// The `i`-th dim a `*` stands for.
    Star(usize),
}

/// The dims of `dims` once every `*` stands for `star_rank` dims.
pub(crate) fn expand(dims: &[Dim], star_rank: usize) -> Vec<Slot<'_>> {
    let mut slots = Vec::new();
    for dim in dims {
        match dim {
            Dim::Star => slots.extend((0..star_rank).map(Slot::Star)),
            d => slots.push(Slot::Dim(d)),
        }
    }
    slots
}

/// Whether a shape is exactly the number `1`, which also matches a scalar.
pub(crate) fn is_scalar_one(dims: &[Dim]) -> bool {
    matches!(dims, [Dim::Single(Factor::Number(1))])
}

impl Annotation {
    /// Whether tensors of these ranks fit this annotation's inputs (`None`:
    /// a non-tensor argument, which only `?` accepts).
    pub fn matches_ranks(&self, inputs: &[Option<usize>]) -> bool {
        inputs.len() == self.inputs.len()
            && star_rank(
                self.inputs.iter().zip(inputs.iter().copied()),
                Side::Input,
                None,
            )
            .is_ok()
    }

    /// Every identifier with its mark, in order of first appearance.
    pub fn ids(&self) -> Vec<(&str, Mark)> {
        let mut seen: Vec<(&str, Mark)> = Vec::new();
        for factor in self.factors() {
            if let Factor::Named { name, mark } = factor {
                if !seen.iter().any(|(n, _)| n == name) {
                    seen.push((name, *mark));
                }
            }
        }
        seen
    }

    /// The identifiers that may be split: not frozen, never a later factor
    /// of a group, and at most once in every tensor. In order of first
    /// appearance.
    pub fn splittable_ids(&self) -> Vec<&str> {
        self.ids()
            .into_iter()
            .filter(|&(id, mark)| mark != Mark::Frozen && self.split_obstacle(id).is_none())
            .map(|(id, _)| id)
            .collect()
    }

    /// All factors of all shapes, inputs first.
    fn factors(&self) -> impl Iterator<Item = &Factor> {
        self.inputs
            .iter()
            .chain(&self.outputs)
            .filter_map(|s| match s {
                Shape::Tensor(dims) => Some(dims),
                Shape::Opaque => None,
            })
            .flatten()
            .flat_map(|d| match d {
                Dim::Single(f) => std::slice::from_ref(f),
                Dim::Group(fs) => fs.as_slice(),
                Dim::Star => &[],
            })
    }

    /// The tensors with their shapes, inputs first.
    pub(crate) fn tensors(&self) -> impl Iterator<Item = (TensorRef, &Shape)> {
        let ins = self.inputs.iter().enumerate().map(|(index, s)| {
            (
                TensorRef {
                    side: Side::Input,
                    index,
                },
                s,
            )
        });
        let outs = self.outputs.iter().enumerate().map(|(index, s)| {
            (
                TensorRef {
                    side: Side::Output,
                    index,
                },
                s,
            )
        });
        ins.chain(outs)
    }

    /// Why `id` may not be split whatever its mark: it is a later factor of
    /// a group, or it appears in two dims of one tensor.
    pub(crate) fn split_obstacle(&self, id: &str) -> Option<SplitObstacle> {
        for (tensor, shape) in self.tensors() {
            let Shape::Tensor(dims) = shape else {
                continue;
            };
            let mut count = 0;
            for (dim, d) in dims.iter().enumerate() {
                let names = |f: &Factor| matches!(f, Factor::Named { name, .. } if name == id);
                match d {
                    Dim::Single(f) if names(f) => count += 1,
                    Dim::Group(fs) => {
                        if fs.iter().skip(1).any(names) {
                            return Some(SplitObstacle::LaterFactor {
                                tensor,
                                dim,
                                group: d.to_string(),
                            });
                        }
                        if fs.first().is_some_and(names) {
                            count += 1;
                        }
                    }
                    _ => {}
                }
            }
            if count > 1 {
                return Some(SplitObstacle::Repeated { tensor });
            }
        }
        None
    }

    /// Binds this annotation to the actual shapes of one call: `inputs` and
    /// `outputs` give each argument's shape (`None`: not a tensor);
    /// `outputs` may be empty when the outputs are not known yet. An integer
    /// attribute named like an identifier gives that identifier's length
    /// (this is how a group such as `(h d)` learns `h`).
    pub fn bind(
        &self,
        inputs: &[Option<&[u64]>],
        outputs: &[Option<&[u64]>],
        attrs: &BTreeMap<String, i64>,
    ) -> Result<Binding, BindError> {
        if inputs.len() != self.inputs.len() {
            return Err(BindError::Arity {
                what: "inputs",
                expected: self.inputs.len(),
                found: inputs.len(),
            });
        }
        if !outputs.is_empty() && outputs.len() != self.outputs.len() {
            return Err(BindError::Arity {
                what: "outputs",
                expected: self.outputs.len(),
                found: outputs.len(),
            });
        }
        let ranked = |shape: Option<&[u64]>| shape.map(<[u64]>::len);
        let star = star_rank(
            self.inputs.iter().zip(inputs.iter().map(|s| ranked(*s))),
            Side::Input,
            None,
        )?;
        let star = star_rank(
            self.outputs.iter().zip(outputs.iter().map(|s| ranked(*s))),
            Side::Output,
            star,
        )?
        .map_or(0, |(count, _)| count);

        let mut u = Unifier::default();
        for (name, _) in self.ids() {
            if let Some(&value) = attrs.get(name) {
                let size = u64::try_from(value).map_err(|_| BindError::BadAttr {
                    name: name.into(),
                    value,
                })?;
                u.known
                    .insert(name.into(), (size, Origin::Attr(name.into())));
            }
        }

        // Every tensor dim with its actual length: singles and stars are
        // unified at once, groups once enough of their factors are known.
        let actual = inputs.iter().chain(outputs);
        let mut groups = Vec::new();
        for ((tensor, shape), sizes) in self.tensors().zip(actual) {
            let (Shape::Tensor(dims), Some(sizes)) = (shape, sizes) else {
                continue;
            };
            if is_scalar_one(dims) && sizes.is_empty() {
                continue;
            }
            for (dim, (slot, &len)) in expand(dims, star).into_iter().zip(sizes.iter()).enumerate()
            {
                let at = (tensor, dim);
                match slot {
                    Slot::Star(i) => u.unify(&star_key(i), len, at, "*")?,
                    Slot::Dim(Dim::Star) => {}
                    Slot::Dim(Dim::Single(f)) => u.unify_factor(f, len, at)?,
                    Slot::Dim(d @ Dim::Group(factors)) => {
                        groups.push((tensor, dim, d, factors, len))
                    }
                }
            }
        }
        while !groups.is_empty() {
            let before = groups.len();
            let mut pending = Vec::new();
            for g in groups {
                if !u.group(g.0, g.1, g.2, g.3, g.4)? {
                    pending.push(g);
                }
            }
            if pending.len() == before {
                let (tensor, dim, d, factors, len) = pending[0];
                let unknown: Vec<String> = factors
                    .iter()
                    .filter_map(|f| match f {
                        Factor::Named { name, .. } if !u.known.contains_key(name) => {
                            Some(format!("'{name}'"))
                        }
                        Factor::Anon => Some("'?'".into()),
                        _ => None,
                    })
                    .collect();
                return Err(BindError::UnsizedGroup {
                    tensor,
                    dim,
                    written: d.to_string(),
                    factors: unknown.join(", "),
                    found: len,
                });
            }
            groups = pending;
        }

        Ok(Binding {
            sizes: u.known.into_iter().map(|(k, (v, _))| (k, v)).collect(),
            star_rank: star,
        })
    }

    /// The output shapes this binding implies (`None` for `?` outputs). A
    /// scalar-compatible `1` output yields `[1]`.
    pub fn output_shapes(&self, binding: &Binding) -> Result<Vec<Option<Vec<u64>>>, BindError> {
        let size = |index: usize, name: &str| {
            binding.size(name).ok_or_else(|| BindError::Unsized {
                index,
                name: name.into(),
            })
        };
        let factor = |index: usize, f: &Factor| match f {
            Factor::Named { name, .. } => size(index, name),
            Factor::Number(n) => Ok(*n),
            Factor::Anon => size(index, "?"),
        };
        let mut shapes = Vec::new();
        for (index, shape) in self.outputs.iter().enumerate() {
            let Shape::Tensor(dims) = shape else {
                shapes.push(None);
                continue;
            };
            let mut out = Vec::new();
            for slot in expand(dims, binding.star_rank) {
                out.push(match slot {
                    Slot::Star(i) => size(index, &star_key(i))?,
                    Slot::Dim(Dim::Star) => continue,
                    Slot::Dim(Dim::Single(f)) => factor(index, f)?,
                    Slot::Dim(Dim::Group(fs)) => {
                        let mut product = 1u64;
                        for f in fs {
                            product = product.saturating_mul(factor(index, f)?);
                        }
                        product
                    }
                });
            }
            shapes.push(Some(out));
        }
        Ok(shapes)
    }
}

/// Why an identifier may not be split, whatever its mark.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum SplitObstacle {
    LaterFactor {
        tensor: TensorRef,
        dim: usize,
        group: String,
    },
    Repeated {
        tensor: TensorRef,
    },
}

/// The number of dims every `*` stands for, given each shape's rank, with
/// the tensor that fixed it; errors when a rank does not fit. `known` is the
/// count already fixed by another tensor.
fn star_rank<'a>(
    shapes: impl Iterator<Item = (&'a Shape, Option<usize>)>,
    side: Side,
    known: Option<(usize, TensorRef)>,
) -> Result<Option<(usize, TensorRef)>, BindError> {
    let mut star = known;
    for (index, (shape, rank)) in shapes.enumerate() {
        let tensor = TensorRef { side, index };
        let Shape::Tensor(dims) = shape else {
            continue;
        };
        let Some(rank) = rank else {
            return Err(BindError::NotATensor {
                tensor,
                shape: shape.to_string(),
            });
        };
        if is_scalar_one(dims) && rank == 0 {
            continue;
        }
        let stars = dims.iter().filter(|d| matches!(d, Dim::Star)).count();
        let fixed = dims.len() - stars;
        let rank_error = |expected: String| BindError::Rank {
            tensor,
            shape: shape.to_string(),
            expected,
            found: rank,
        };
        if stars == 0 {
            if rank != fixed {
                let expected = if is_scalar_one(dims) {
                    "1 or 0".to_string()
                } else {
                    fixed.to_string()
                };
                return Err(rank_error(expected));
            }
            continue;
        }
        if rank < fixed || (rank - fixed) % stars != 0 {
            let expected = if stars == 1 {
                format!("at least {fixed}")
            } else {
                format!("{fixed} plus a multiple of {stars}")
            };
            return Err(rank_error(expected));
        }
        let count = (rank - fixed) / stars;
        match star {
            Some((expected, first)) if expected != count => {
                return Err(BindError::StarRank {
                    tensor,
                    expected,
                    found: count,
                    first,
                });
            }
            Some(_) => {}
            None => star = Some((count, tensor)),
        }
    }
    Ok(star)
}

/// Sizes learned so far, with where each was first seen.
#[derive(Default)]
struct Unifier {
    known: BTreeMap<String, (u64, Origin)>,
}

impl Unifier {
    fn unify(
        &mut self,
        key: &str,
        len: u64,
        (tensor, dim): (TensorRef, usize),
        written: &str,
    ) -> Result<(), BindError> {
        match self.known.get(key) {
            Some((expected, origin)) if *expected != len => Err(BindError::Mismatch {
                tensor,
                dim,
                written: written.into(),
                expected: *expected,
                reason: origin.to_string(),
                found: len,
            }),
            Some(_) => Ok(()),
            None => {
                self.known
                    .insert(key.into(), (len, Origin::Dim(tensor, dim)));
                Ok(())
            }
        }
    }

    fn unify_factor(
        &mut self,
        f: &Factor,
        len: u64,
        at: (TensorRef, usize),
    ) -> Result<(), BindError> {
        match f {
            Factor::Named { name, .. } => self.unify(name, len, at, &f.to_string()),
            Factor::Number(n) if *n != len => Err(BindError::Mismatch {
                tensor: at.0,
                dim: at.1,
                written: n.to_string(),
                expected: *n,
                reason: "a fixed size".into(),
                found: len,
            }),
            Factor::Number(_) | Factor::Anon => Ok(()),
        }
    }

    /// Sizes one group dim if enough of its factors are known; `Ok(false)`
    /// when it must wait for others.
    fn group(
        &mut self,
        tensor: TensorRef,
        dim: usize,
        written: &Dim,
        factors: &[Factor],
        len: u64,
    ) -> Result<bool, BindError> {
        let mut known = 1u64;
        let mut unknown_named = Vec::new();
        let mut anon = 0;
        for f in factors {
            match f {
                Factor::Named { name, .. } => match self.known.get(name) {
                    Some((n, _)) => known = known.saturating_mul(*n),
                    None => unknown_named.push(name),
                },
                Factor::Number(n) => known = known.saturating_mul(*n),
                Factor::Anon => anon += 1,
            }
        }
        let written = written.to_string();
        match (unknown_named.as_slice(), anon) {
            ([], 0) if known != len => Err(BindError::Mismatch {
                tensor,
                dim,
                written,
                expected: known,
                reason: "the product of its factors".into(),
                found: len,
            }),
            ([], 0) => Ok(true),
            ([], _) | ([_], 0) if known == 0 || len % known != 0 => Err(BindError::Indivisible {
                tensor,
                dim,
                written,
                known,
                found: len,
            }),
            ([], _) => Ok(true),
            ([name], 0) => {
                let name = (*name).clone();
                self.known
                    .insert(name, (len / known, Origin::Dim(tensor, dim)));
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test fails
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::anno::testgen;

    fn anno(src: &str) -> Annotation {
        src.parse().unwrap()
    }

    fn no_attrs() -> BTreeMap<String, i64> {
        BTreeMap::new()
    }

    fn attrs(pairs: &[(&str, i64)]) -> BTreeMap<String, i64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    fn sizes(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn binds_linear_and_infers_its_output() {
        let a = anno("b l k+, n k+ -> b l n");
        let b = a
            .bind(&[Some(&[2, 16, 64]), Some(&[256, 64])], &[], &no_attrs())
            .unwrap();
        assert_eq!(
            b.sizes,
            sizes(&[("b", 2), ("l", 16), ("k", 64), ("n", 256)])
        );
        assert_eq!(b.star_rank, 0);
        assert_eq!(a.output_shapes(&b).unwrap(), vec![Some(vec![2, 16, 256])]);
        // Outputs, when given, are checked too.
        let with_out = a.bind(
            &[Some(&[2, 16, 64]), Some(&[256, 64])],
            &[Some(&[2, 16, 256])],
            &no_attrs(),
        );
        assert_eq!(with_out, Ok(b));
    }

    #[test]
    fn mismatches_name_tensor_dim_and_sizes() {
        let a = anno("b l k+, n k+ -> b l n");
        let e = a
            .bind(&[Some(&[2, 16, 64]), Some(&[256, 32])], &[], &no_attrs())
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "input 1 dim 1 'k+': expected 64 (as at input 0 dim 2), found 32"
        );
        let e = a
            .bind(
                &[Some(&[2, 16, 64]), Some(&[256, 64])],
                &[Some(&[2, 16, 128])],
                &no_attrs(),
            )
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "output 0 dim 2 'n': expected 256 (as at input 1 dim 0), found 128"
        );
        let e = a
            .bind(&[Some(&[2, 16, 64]), Some(&[256])], &[], &no_attrs())
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "input 1: expected rank 2 for shape 'n k+', found rank 1"
        );
        let e = a.bind(&[Some(&[2, 16, 64])], &[], &no_attrs()).unwrap_err();
        assert_eq!(e.to_string(), "expected 2 inputs, found 1");
        let e = a
            .bind(&[Some(&[2, 16, 64]), None], &[], &no_attrs())
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "input 1 is not a tensor, but the annotation gives it shape 'n k+'"
        );
    }

    #[test]
    fn numbers_must_equal_the_actual_size() {
        let a = anno("b 64 -> b");
        assert!(a.bind(&[Some(&[3, 64])], &[], &no_attrs()).is_ok());
        let e = a.bind(&[Some(&[3, 32])], &[], &no_attrs()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "input 0 dim 1 '64': expected 64 (a fixed size), found 32"
        );
    }

    #[test]
    fn groups_take_factors_from_attrs_and_other_tensors() {
        let split = anno("b l (h d) -> b l h d");
        let b = split
            .bind(&[Some(&[2, 16, 64])], &[], &attrs(&[("h", 4)]))
            .unwrap();
        assert_eq!(b.sizes, sizes(&[("b", 2), ("l", 16), ("h", 4), ("d", 16)]));
        assert_eq!(
            split.output_shapes(&b).unwrap(),
            vec![Some(vec![2, 16, 4, 16])]
        );

        // g comes from the k tensor, r is inferred by division.
        let attn = anno("b l^ (g r) d^, b s^ g d^, b s^ g d^ -> b l^ (g r) d^");
        let q = [2, 16, 4, 16];
        let kv = [2, 16, 2, 16];
        let b = attn
            .bind(&[Some(&q), Some(&kv), Some(&kv)], &[], &no_attrs())
            .unwrap();
        assert_eq!((b.size("g"), b.size("r")), (Some(2), Some(2)));
        assert_eq!(attn.output_shapes(&b).unwrap(), vec![Some(q.to_vec())]);
    }

    #[test]
    fn group_errors() {
        let split = anno("b l (h d) -> b l h d");
        let e = split
            .bind(&[Some(&[2, 16, 64])], &[], &no_attrs())
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "input 0 dim 2 '(h d)': cannot size factors 'h', 'd' from the dim's length 64; expected all but one of them sized by another tensor or an attribute"
        );
        let e = split
            .bind(&[Some(&[2, 16, 64])], &[], &attrs(&[("h", 5)]))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "input 0 dim 2 '(h d)': expected a multiple of 5 (the known factors), found 64"
        );
        let e = split
            .bind(&[Some(&[2, 16, 64])], &[], &attrs(&[("h", -1)]))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "attribute 'h' = -1 cannot be the length of a dim; expected a non-negative integer"
        );
        let merge = anno("b h d -> b (h d)");
        let e = merge
            .bind(&[Some(&[2, 4, 16])], &[Some(&[2, 60])], &no_attrs())
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "output 0 dim 1 '(h d)': expected 64 (the product of its factors), found 60"
        );
        // An attribute that disagrees with a tensor is a mismatch.
        let e = anno("b h d -> b (h d)")
            .bind(&[Some(&[2, 4, 16])], &[], &attrs(&[("h", 8)]))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "input 0 dim 1 'h': expected 8 (attribute 'h'), found 4"
        );
    }

    #[test]
    fn star_expands_consistently() {
        let a = anno("* k+, n k+ -> * n");
        let b = a
            .bind(&[Some(&[2, 16, 64]), Some(&[256, 64])], &[], &no_attrs())
            .unwrap();
        assert_eq!(b.star_rank, 2);
        assert_eq!(b.star_sizes(), vec![Some(2), Some(16)]);
        assert_eq!(a.output_shapes(&b).unwrap(), vec![Some(vec![2, 16, 256])]);
        let b = a
            .bind(&[Some(&[64]), Some(&[256, 64])], &[], &no_attrs())
            .unwrap();
        assert_eq!(b.star_rank, 0);
        assert_eq!(a.output_shapes(&b).unwrap(), vec![Some(vec![256])]);

        let e = a
            .bind(
                &[Some(&[2, 16, 64]), Some(&[256, 64])],
                &[Some(&[32, 256])],
                &no_attrs(),
            )
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "output 0: '*' stands for 1 dims here but for 2 dims in input 0"
        );
        let add = anno("*, * -> *");
        let e = add
            .bind(&[Some(&[2, 3]), Some(&[2, 4])], &[], &no_attrs())
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "input 1 dim 1 '*': expected 3 (as at input 0 dim 1), found 4"
        );
        let e = a
            .bind(&[Some(&[]), Some(&[256, 64])], &[], &no_attrs())
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "input 0: expected rank at least 1 for shape '* k+', found rank 0"
        );
    }

    #[test]
    fn scalar_one_matches_rank_zero() {
        let mean = anno("b+ l+ -> 1");
        let b = mean
            .bind(&[Some(&[2, 16])], &[Some(&[])], &no_attrs())
            .unwrap();
        assert_eq!(b.sizes, sizes(&[("b", 2), ("l", 16)]));
        assert!(
            mean.bind(&[Some(&[2, 16])], &[Some(&[1])], &no_attrs())
                .is_ok()
        );
        assert_eq!(mean.output_shapes(&b).unwrap(), vec![Some(vec![1])]);
        let e = mean
            .bind(&[Some(&[2, 16])], &[Some(&[2])], &no_attrs())
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "output 0 dim 0 '1': expected 1 (a fixed size), found 2"
        );
        let e = mean
            .bind(&[Some(&[2, 16])], &[Some(&[1, 1])], &no_attrs())
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "output 0: expected rank 1 or 0 for shape '1', found rank 2"
        );
        // Only a shape that is exactly `1` accepts a scalar.
        assert!(!anno("b 1 -> b").matches_ranks(&[Some(1)]));
        assert!(anno("1 -> 1").matches_ranks(&[Some(0)]));
    }

    #[test]
    fn matches_ranks_rules() {
        let a = anno("* k+, ?, n k+ -> * n");
        assert!(a.matches_ranks(&[Some(3), None, Some(2)]));
        assert!(a.matches_ranks(&[Some(1), Some(4), Some(2)]));
        assert!(!a.matches_ranks(&[Some(0), None, Some(2)]));
        assert!(!a.matches_ranks(&[Some(3), None, None]));
        assert!(!a.matches_ranks(&[Some(3), None]));
        let two = anno("* a, * b -> a b");
        assert!(two.matches_ranks(&[Some(3), Some(3)]));
        assert!(!two.matches_ranks(&[Some(3), Some(2)]));
        let double = anno("* a * -> a");
        assert!(double.matches_ranks(&[Some(5)]));
        assert!(!double.matches_ranks(&[Some(4)]));
    }

    #[test]
    fn opaque_inputs_and_outputs() {
        let a = anno("?, b d -> b d, ?");
        let b = a.bind(&[None, Some(&[2, 8])], &[], &no_attrs()).unwrap();
        assert_eq!(a.output_shapes(&b).unwrap(), vec![Some(vec![2, 8]), None]);
        let b = a.bind(&[Some(&[7, 7, 7]), Some(&[2, 8])], &[], &no_attrs());
        assert!(b.is_ok());
        let anon_out = anno("b ? -> b ?");
        let b = anon_out.bind(&[Some(&[2, 5])], &[], &no_attrs()).unwrap();
        assert_eq!(
            anon_out.output_shapes(&b).unwrap_err().to_string(),
            "output 0: no size for '?' in the binding"
        );
    }

    #[test]
    fn ids_and_splittable_ids() {
        let a = anno("b l^ (g r) d^, b s^ g d^, b s^ g d^ -> b l^ (g r) d^");
        assert_eq!(
            a.ids(),
            vec![
                ("b", Mark::Spatial),
                ("l", Mark::Frozen),
                ("g", Mark::Spatial),
                ("r", Mark::Spatial),
                ("d", Mark::Frozen),
                ("s", Mark::Frozen),
            ]
        );
        assert_eq!(a.splittable_ids(), vec!["b", "g"]);
        assert_eq!(anno("a^ a^ -> a^").splittable_ids(), Vec::<&str>::new());
        assert_eq!(anno("a b, b -> a").splittable_ids(), vec!["a", "b"]);
        assert_eq!(anno("a a -> a").splittable_ids(), Vec::<&str>::new());
    }

    proptest! {
        #[test]
        fn fitted_shapes_bind_and_outputs_are_inferred(
            a in testgen::annotation(),
            seeds in prop::collection::vec(any::<u64>(), 1..16),
        ) {
            let fit = testgen::fit(&a, 2, &seeds);
            let ins: Vec<Option<&[u64]>> = fit.inputs.iter().map(|s| s.as_deref()).collect();
            let outs: Vec<Option<&[u64]>> = fit.outputs.iter().map(|s| s.as_deref()).collect();
            let ranks: Vec<Option<usize>> = fit.inputs.iter().map(|s| s.as_ref().map(Vec::len)).collect();
            prop_assert!(a.matches_ranks(&ranks));
            let full = a.bind(&ins, &outs, &fit.attrs);
            prop_assert!(full.is_ok(), "{}: {:?}", a, full);
            let from_inputs = a.bind(&ins, &[], &fit.attrs);
            prop_assert!(from_inputs.is_ok(), "{}: {:?}", a, from_inputs);
            let from_inputs = from_inputs.unwrap();
            for (id, _) in a.ids() {
                prop_assert_eq!(from_inputs.size(id), Some(fit.sizes[id]));
            }
            let has_anon_output = a.outputs.iter().any(|s| matches!(
                s,
                Shape::Tensor(dims) if dims.iter().any(|d| match d {
                    Dim::Single(f) => *f == Factor::Anon,
                    Dim::Group(fs) => fs.contains(&Factor::Anon),
                    Dim::Star => false,
                })
            ));
            if !has_anon_output {
                let inferred = a.output_shapes(&from_inputs).unwrap();
                let expected: Vec<Option<Vec<u64>>> = fit
                    .outputs
                    .iter()
                    .zip(&a.outputs)
                    .map(|(s, shape)| match shape {
                        Shape::Tensor(dims) if is_scalar_one(dims) => Some(vec![1]),
                        _ => s.clone(),
                    })
                    .collect();
                // A `*` in an output takes its sizes from the inputs only when
                // some input has one, which the generator guarantees.
                prop_assert_eq!(inferred, expected);
            }
        }
    }
}
