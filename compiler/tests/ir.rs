//! The IR verifier reports every problem of a broken graph at once.

use std::collections::BTreeMap;

use autopart::anno::parse_annotation;
use autopart::ir::{DType, Graph, Op, OpKind, Role, Tensor, TensorId, VerifyError, verify};

fn tensor(g: &mut Graph, name: &str, shape: &[u64], role: Role) -> TensorId {
    g.add_tensor(Tensor {
        name: name.into(),
        shape: shape.to_vec(),
        dtype: DType::F32,
        role,
    })
}

fn op(kind: OpKind, name: &str, anno: &str, inputs: &[TensorId], outputs: &[TensorId]) -> Op {
    Op {
        kind,
        name: name.into(),
        attrs: BTreeMap::new(),
        inputs: inputs.to_vec(),
        outputs: outputs.to_vec(),
        annotation: parse_annotation(anno).expect("valid annotation"),
        layer: None,
    }
}

#[test]
fn a_well_formed_graph_verifies_and_orders_topologically() {
    let mut g = Graph::new("ok");
    let x = tensor(&mut g, "x", &[2, 4, 8], Role::Input);
    let w = tensor(&mut g, "w", &[16, 8], Role::Parameter);
    let y = tensor(&mut g, "y", &[2, 4, 16], Role::Activation);
    let z = tensor(&mut g, "z", &[2, 4, 16], Role::Activation);
    let lin = g.add_op(op(
        OpKind::Linear,
        "lin",
        "b l k+, n k+ -> b l n",
        &[x, w],
        &[y],
    ));
    let act = g.add_op(op(OpKind::Gelu, "act", "b l f -> b l f", &[y], &[z]));
    verify(&g).expect("verifies");
    assert_eq!(g.topo_order().expect("acyclic"), vec![lin, act]);
    assert_eq!(g.consumers(y), &[act]);
    assert_eq!(g.producer(z), Some(act));
    assert_eq!(g.dataflow().edge_count(), 1);
}

#[test]
fn every_problem_is_reported() {
    let mut g = Graph::new("broken");
    let x = tensor(&mut g, "x", &[2, 4, 8], Role::Input);
    let w = tensor(&mut g, "w", &[16, 8], Role::Parameter);
    // Wrong shape: the annotation says n = 16, the output claims 15.
    let y = tensor(&mut g, "y", &[2, 4, 15], Role::Activation);
    // Produced twice.
    let a = tensor(&mut g, "a", &[2, 4, 8], Role::Activation);
    // Never produced.
    let _orphan = tensor(&mut g, "orphan", &[2, 4, 8], Role::Activation);
    // A cycle: c1 -> c2 -> c1.
    let c1 = tensor(&mut g, "c1", &[2, 4, 8], Role::Activation);
    let c2 = tensor(&mut g, "c2", &[2, 4, 8], Role::Activation);
    let ew = "b l d -> b l d";
    g.add_op(op(
        OpKind::Linear,
        "lin",
        "b l k+, n k+ -> b l n",
        &[x, w],
        &[y],
    ));
    g.add_op(op(OpKind::Gelu, "p1", ew, &[x], &[a]));
    g.add_op(op(OpKind::Gelu, "p2", ew, &[x], &[a]));
    g.add_op(op(OpKind::Gelu, "writes_input", ew, &[a], &[x]));
    g.add_op(op(OpKind::Gelu, "cyc1", ew, &[c2], &[c1]));
    g.add_op(op(OpKind::Gelu, "cyc2", ew, &[c1], &[c2]));
    g.add_op(op(OpKind::Gelu, "dangling", ew, &[TensorId(99)], &[c2]));
    let errors = verify(&g).expect_err("broken");
    let has = |f: &dyn Fn(&VerifyError) -> bool| errors.iter().any(f);
    assert!(
        has(&|e| matches!(e, VerifyError::ShapeMismatch { name, .. } if name == "lin")),
        "{errors:?}"
    );
    assert!(
        has(&|e| matches!(e, VerifyError::ProducedTwice { name, .. } if name == "a")),
        "{errors:?}"
    );
    assert!(
        has(&|e| matches!(e, VerifyError::LeafProduced { name, .. } if name == "x")),
        "{errors:?}"
    );
    assert!(
        has(&|e| matches!(e, VerifyError::Unproduced { name, .. } if name == "orphan")),
        "{errors:?}"
    );
    assert!(
        has(&|e| matches!(e, VerifyError::Cycle { .. })),
        "{errors:?}"
    );
    assert!(
        has(&|e| matches!(e, VerifyError::DanglingTensor { name, .. } if name == "dangling")),
        "{errors:?}"
    );
    let text = errors[0].to_string();
    assert!(text.contains("lin"), "{text}");
}
