//! The partition annotation language (../shared/ANNOTATIONS.md).
//!
//! This module owns the syntax tree of an annotation, its parser (errors with
//! line:col spans), its canonical printer, binding an annotation to concrete
//! tensor shapes, the partition rule it implies (split identifier X into k
//! parts → the layout of every input and output), and the registry that loads
//! op signatures from RON annotation files. It knows nothing about graphs,
//! costs or plans: those stages call into it.

mod ast;
mod bind;
mod parse;
mod registry;
mod rule;
#[cfg(test)]
mod testgen;

pub use ast::{Annotation, Dim, Factor, Mark, Shape};
pub use bind::{BindError, Binding, Side, TensorRef};
pub use parse::{ParseError, parse_annotation};
pub use registry::{
    AttrKind, AttrSpec, FlopsSpec, Formula, FormulaError, ImplSpec, Location, OpSignature,
    Registry, RegistryError, builtin_registry,
};
pub use rule::{Layout, PartitionError, PartitionRule, partition};
