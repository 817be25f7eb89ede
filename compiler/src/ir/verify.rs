//! The graph verifier: structural invariants and annotation/shape agreement.
//!
//! It collects every error instead of stopping at the first, so a broken
//! tracer or pass reports all it got wrong at once.

use std::collections::BTreeMap;

use thiserror::Error;

use super::graph::{Graph, OpId, Role, TensorId};

#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum VerifyError {
    #[error("op {op} ({name}) refers to tensor {tensor}, which does not exist")]
    DanglingTensor {
        op: OpId,
        name: String,
        tensor: TensorId,
    },
    #[error("tensor {tensor} ({name}) is produced by both {first} and {second}")]
    ProducedTwice {
        tensor: TensorId,
        name: String,
        first: OpId,
        second: OpId,
    },
    #[error("tensor {tensor} ({name}) is a {role} but op {op} produces it")]
    LeafProduced {
        tensor: TensorId,
        name: String,
        role: &'static str,
        op: OpId,
    },
    #[error("activation {tensor} ({name}) has no producing op")]
    Unproduced { tensor: TensorId, name: String },
    #[error("ops {ops:?} form a cycle")]
    Cycle { ops: Vec<OpId> },
    #[error("op {op} ({name}): shapes disagree with annotation [{annotation}]: {detail}")]
    ShapeMismatch {
        op: OpId,
        name: String,
        annotation: String,
        detail: String,
    },
}

/// Checks that every tensor is produced at most once (activations exactly
/// once, inputs and parameters never), that there are no cycles, and that
/// every op's input and output shapes bind to its annotation.
pub fn verify(graph: &Graph) -> Result<(), Vec<VerifyError>> {
    let mut errors = Vec::new();
    let mut producer: BTreeMap<TensorId, OpId> = BTreeMap::new();

    for (id, op) in graph.ops() {
        let mut dangling = false;
        for &t in op.inputs.iter().chain(&op.outputs) {
            if graph.get_tensor(t).is_none() {
                errors.push(VerifyError::DanglingTensor {
                    op: id,
                    name: op.name.clone(),
                    tensor: t,
                });
                dangling = true;
            }
        }
        for &t in &op.outputs {
            let Some(tensor) = graph.get_tensor(t) else {
                continue;
            };
            if tensor.role != Role::Activation {
                errors.push(VerifyError::LeafProduced {
                    tensor: t,
                    name: tensor.name.clone(),
                    role: tensor.role.name(),
                    op: id,
                });
            }
            if let Some(&first) = producer.get(&t) {
                errors.push(VerifyError::ProducedTwice {
                    tensor: t,
                    name: tensor.name.clone(),
                    first,
                    second: id,
                });
            } else {
                producer.insert(t, id);
            }
        }
        if dangling {
            continue;
        }
        let inputs: Vec<Option<&[u64]>> = op
            .inputs
            .iter()
            .map(|&t| Some(graph.tensor(t).shape.as_slice()))
            .collect();
        let outputs: Vec<Option<&[u64]>> = op
            .outputs
            .iter()
            .map(|&t| Some(graph.tensor(t).shape.as_slice()))
            .collect();
        if let Err(e) = op.annotation.bind(&inputs, &outputs, &op.int_attrs()) {
            errors.push(VerifyError::ShapeMismatch {
                op: id,
                name: op.name.clone(),
                annotation: op.annotation.to_string(),
                detail: e.to_string(),
            });
        }
    }

    for (id, t) in graph.tensors() {
        if t.role == Role::Activation && !producer.contains_key(&id) {
            errors.push(VerifyError::Unproduced {
                tensor: id,
                name: t.name.clone(),
            });
        }
    }

    if let Err(ops) = graph.topo_order() {
        errors.push(VerifyError::Cycle { ops });
    }

    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}
