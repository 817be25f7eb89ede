//! Cost model primitives: what the hardware can do and how long work takes.
//!
//! `cost` owns the cluster description ([`cluster`]), the roofline time of an
//! op on one device ([`time`]) and the time of collectives over groups of ranks
//! ([`collective`]), and the fit of a cluster file to `autopart profile`'s
//! measurements ([`profile`]). These are pure functions of figures: this module must not
//! depend on the graph, the plan or the search, which build on top of it.

pub mod cluster;
pub mod collective;
pub mod profile;
pub mod time;

pub use cluster::{
    AttentionKernel, Cluster, ClusterError, Efficiency, InvalidField, Link, LinkLevel, Measured,
    MemoryStack, PeakFlops, load_cluster, preset_names,
};
pub use collective::{Collective, Group, collective_time, link_level, mesh_groups};
pub use time::{ComputeKind, compute_time, op_time};
