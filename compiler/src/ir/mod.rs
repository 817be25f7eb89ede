//! The dataflow IR: one training step's forward graph.
//!
//! Tensors and ops live in arenas addressed by typed indices ([`TensorId`],
//! [`OpId`]); the producer and consumer tables are side tables kept in step
//! with the arenas. Every op carries its resolved [`Annotation`], its
//! attributes, the layer it belongs to and the source name of the traced
//! module (`layers.3.self_attn.q_proj`), which is what later stages (cost,
//! search, lower, codegen) need. The graph prints as a stable text form for
//! snapshots ([`std::fmt::Display`]) and is checked by [`verify`].
//!
//! This module knows nothing about models, costs or plans.

mod graph;
mod verify;

pub use graph::{AttrValue, DType, Graph, Op, OpId, OpKind, Role, Tensor, TensorId};
pub use verify::{VerifyError, verify};
