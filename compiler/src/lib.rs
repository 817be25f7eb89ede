//! autopart: a graph compiler that partitions models into parallel training plans.
//!
//! The stages, each a module with its own hand-off type (see docs/ARCHITECTURE.md):
//! [`trace`] builds an [`ir::Graph`] whose ops carry [`anno`] annotations;
//! later stages (cost, search, plan, lower, rewrite, codegen) consume it.

pub mod anno;
pub mod cli;
pub mod cost;
pub mod ir;
pub mod trace;
