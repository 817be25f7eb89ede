//! autopart: a graph compiler that partitions models into parallel training plans.
//!
//! The stages, each a module with its own hand-off type (see docs/ARCHITECTURE.md):
//! [`trace`] builds an [`ir::Graph`] whose ops carry [`anno`] annotations;
//! [`plan`] is the search's output (`plan.ron`, its validation and report);
//! later stages (search, lower, rewrite, codegen) consume them.

pub mod anno;
pub mod cli;
pub mod codegen;
pub mod cost;
pub mod driver;
pub mod ir;
pub mod lower;
pub mod plan;
pub mod rewrite;
pub mod rouge;
pub mod search;
pub mod trace;
pub mod validate;
