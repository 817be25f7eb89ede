//! What autopart's compiler and its runtime must agree on, in one place.
//!
//! The compiler writes a plan and generates code that the runtime executes;
//! both depend on this crate (and the runtime never on the compiler), so a
//! term of the plan has one spelling on both sides:
//!
//! - [`Schedule`], [`ZeroStage`], [`Recompute`], [`DType`], [`Device`]: the
//!   plan's closed enums, with their text forms (`1f1b`, `interleaved-2`,
//!   `bf16`, ...) and serde forms (`plan.ron` writes the ZeRO stage as its
//!   number and the dtype as its name).
//! - [`schedule`]: the pipeline schedules as per-stage action lists, which
//!   the runtime executes and the compiler's report draws.
//! - [`launcher`]: the process count and rank a launcher (Open MPI,
//!   MPICH/PMI, PMIx, Slurm) put in the environment.
//! - [`hash`]: FNV-1a, the plan hash that stamps binaries and generated code.
//! - [`fs`]: atomic file writes (temporary sibling, fsync, rename).
//! - [`ckpt`]: the checkpoint format (pieces as regions of global tensors,
//!   manifests, completion, listing, resume resolution, region reads).
//! - [`data`]: the prepared-data format (`autopart data prepare` writes it,
//!   the runtime reads rows of tokens, labels and loss mask).
//! - [`profile`]: `autopart profile`'s raw measurements (the runtime's
//!   profiler times ops and collectives, the compiler fits a cluster file).

pub mod ckpt;
pub mod data;
pub mod fs;
pub mod hash;
pub mod launcher;
pub mod profile;
pub mod schedule;
pub mod st;

mod terms;

pub use terms::{DType, Device, Recompute, Schedule, ZeroStage};
