//! Proptest strategies for valid annotations and shapes that fit them,
//! shared by the parser and rule tests. Test-only.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::ast::{Annotation, Dim, Factor, Mark, Shape};

const NAMES: [&str; 6] = ["a", "b", "c", "d", "e", "f"];

#[derive(Clone, Debug)]
enum RawFactor {
    Id(usize),
    Num(u64),
    Anon,
}

#[derive(Clone, Debug)]
enum RawDim {
    Single(RawFactor),
    Group(Vec<RawFactor>),
    Star,
}

#[derive(Clone, Debug)]
enum RawShape {
    Opaque,
    Tensor(Vec<RawDim>),
}

fn raw_factor() -> impl Strategy<Value = RawFactor> {
    prop_oneof![
        6 => (0..NAMES.len()).prop_map(RawFactor::Id),
        1 => (1u64..5).prop_map(RawFactor::Num),
        1 => Just(RawFactor::Anon),
    ]
}

fn raw_dim() -> impl Strategy<Value = RawDim> {
    prop_oneof![
        8 => raw_factor().prop_map(RawDim::Single),
        2 => prop::collection::vec(raw_factor(), 1..4).prop_map(RawDim::Group),
        1 => Just(RawDim::Star),
    ]
}

fn raw_shape() -> impl Strategy<Value = RawShape> {
    prop_oneof![
        1 => Just(RawShape::Opaque),
        8 => prop::collection::vec(raw_dim(), 1..5).prop_map(RawShape::Tensor),
    ]
}

fn mark() -> impl Strategy<Value = Mark> {
    prop_oneof![
        2 => Just(Mark::Spatial),
        2 => Just(Mark::Reduce),
        1 => Just(Mark::Frozen),
    ]
}

/// Valid annotations: up to 3 inputs and 3 outputs over six identifiers,
/// with numbers, `?`, `*`, groups and opaque shapes; output identifiers
/// always come from the inputs.
pub(crate) fn annotation() -> impl Strategy<Value = Annotation> {
    (
        prop::collection::vec(mark(), NAMES.len()),
        prop::collection::vec(raw_shape(), 0..4),
        prop::collection::vec(raw_shape(), 0..4),
    )
        .prop_map(|(marks, ins, outs)| build(&marks, &ins, &outs))
}

fn build(marks: &[Mark], ins: &[RawShape], outs: &[RawShape]) -> Annotation {
    let named = |i: usize| Factor::Named {
        name: NAMES[i].to_string(),
        mark: marks[i],
    };
    let input_ids: Vec<usize> = {
        let mut ids = Vec::new();
        for s in ins {
            if let RawShape::Tensor(dims) = s {
                for d in dims {
                    let fs: &[RawFactor] = match d {
                        RawDim::Single(f) => std::slice::from_ref(f),
                        RawDim::Group(fs) => fs,
                        RawDim::Star => &[],
                    };
                    for f in fs {
                        if let RawFactor::Id(i) = f {
                            if !ids.contains(i) {
                                ids.push(*i);
                            }
                        }
                    }
                }
            }
        }
        ids
    };
    let input_star = ins
        .iter()
        .any(|s| matches!(s, RawShape::Tensor(d) if d.iter().any(|d| matches!(d, RawDim::Star))));

    let factor = |f: &RawFactor, output: bool| match f {
        RawFactor::Id(i) if !output => named(*i),
        // Outputs may only name input identifiers: map onto them, or fall
        // back to a number when the inputs name none.
        RawFactor::Id(i) if input_ids.is_empty() => Factor::Number(*i as u64 + 1),
        RawFactor::Id(i) => named(input_ids[i % input_ids.len()]),
        RawFactor::Num(n) => Factor::Number(*n),
        RawFactor::Anon => Factor::Anon,
    };
    let shape = |s: &RawShape, output: bool| match s {
        RawShape::Opaque => Shape::Opaque,
        RawShape::Tensor(dims) => {
            let dims: Vec<Dim> = dims
                .iter()
                .map(|d| match d {
                    RawDim::Single(f) => Dim::Single(factor(f, output)),
                    RawDim::Group(fs) => Dim::Group(fs.iter().map(|f| factor(f, output)).collect()),
                    RawDim::Star if output && !input_star => Dim::Single(Factor::Number(1)),
                    RawDim::Star => Dim::Star,
                })
                .collect();
            // A lone `?` is written for an opaque shape.
            if matches!(dims.as_slice(), [Dim::Single(Factor::Anon)]) {
                Shape::Opaque
            } else {
                Shape::Tensor(dims)
            }
        }
    };
    Annotation {
        inputs: ins.iter().map(|s| shape(s, false)).collect(),
        outputs: outs.iter().map(|s| shape(s, true)).collect(),
    }
}

/// Concrete shapes that fit an annotation, with what each dim carries.
#[derive(Clone, Debug)]
pub(crate) struct Fitted {
    pub inputs: Vec<Option<Vec<u64>>>,
    pub outputs: Vec<Option<Vec<u64>>>,
    /// For every tensor dim (after `*` expansion) the identifier that names
    /// it, as a single factor or the first of a group; `None` for opaque
    /// shapes.
    pub input_labels: Vec<Option<Vec<Option<String>>>>,
    pub output_labels: Vec<Option<Vec<Option<String>>>>,
    /// An attribute for every identifier that appears in a group.
    pub attrs: BTreeMap<String, i64>,
    pub sizes: BTreeMap<String, u64>,
}

/// Shapes fitting `anno` where every identifier's length is a multiple of
/// `parts`; `seeds` drives the free choices (multiples, `?` and `*` sizes,
/// the `*` count, scalar `1`s).
pub(crate) fn fit(anno: &Annotation, parts: u64, seeds: &[u64]) -> Fitted {
    let mut seed = seeds.iter().copied().cycle();
    let mut next = move |n: u64| seed.next().unwrap_or(0) % n;
    let star_rank = next(3) as usize;
    let star_sizes: Vec<u64> = (0..star_rank).map(|_| next(4) + 1).collect();
    let mut sizes = BTreeMap::new();
    let mut attrs = BTreeMap::new();
    for (id, _) in anno.ids() {
        sizes.insert(id.to_string(), parts * (next(3) + 1));
    }
    let mut tensor = |shape: &Shape,
                      attrs: &mut BTreeMap<String, i64>|
     -> (Option<Vec<u64>>, Option<Vec<Option<String>>>) {
        let Shape::Tensor(dims) = shape else {
            return (None, None);
        };
        if matches!(dims.as_slice(), [Dim::Single(Factor::Number(1))]) && next(2) == 0 {
            return (Some(Vec::new()), Some(Vec::new()));
        }
        let mut out = Vec::new();
        let mut labels = Vec::new();
        let mut len = |f: &Factor, attrs: &mut BTreeMap<String, i64>, in_group: bool| match f {
            Factor::Named { name, .. } => {
                if in_group {
                    attrs.insert(name.clone(), sizes[name] as i64);
                }
                sizes[name]
            }
            Factor::Number(n) => *n,
            Factor::Anon => next(4) + 1,
        };
        let label = |f: Option<&Factor>| match f {
            Some(Factor::Named { name, .. }) => Some(name.clone()),
            _ => None,
        };
        for d in dims {
            match d {
                Dim::Star => {
                    out.extend(&star_sizes);
                    labels.extend(star_sizes.iter().map(|_| None));
                }
                Dim::Single(f) => {
                    out.push(len(f, attrs, false));
                    labels.push(label(Some(f)));
                }
                Dim::Group(fs) => {
                    out.push(fs.iter().map(|f| len(f, attrs, true)).product());
                    labels.push(label(fs.first()));
                }
            }
        }
        (Some(out), Some(labels))
    };
    let (inputs, input_labels) = anno.inputs.iter().map(|s| tensor(s, &mut attrs)).unzip();
    let (outputs, output_labels) = anno.outputs.iter().map(|s| tensor(s, &mut attrs)).unzip();
    Fitted {
        inputs,
        outputs,
        input_labels,
        output_labels,
        attrs,
        sizes,
    }
}
