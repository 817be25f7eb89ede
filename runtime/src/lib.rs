//! autopart-runtime: everything the generated per-stage programs call at run time.
//!
//! It owns communicators, op implementations, segment/adapter execution,
//! pipeline schedules, optimizers, data and metrics. It never
//! depends on the compiler (`autopart`): generated code links only this crate
//! (and the crates of custom ops).
//!
//! Modules: `mesh` (rank arithmetic), `comm` (collectives over tch tensors,
//! MPI for CPU, NCCL behind the `nccl` feature), `ops` (the built-in ops, named
//! as in the annotation files), `exec` (segments, adapters with their backward
//! duals, blocks (a layer run whole, recomputed or hooked), recompute,
//! partition-independent parameter initialisation),
//! `schedule` (GPipe, 1F1B and interleaved 1F1B pipeline orders, from the
//! `autopart-vocab` crate the compiler shares), `program`
//! (the [`program::StageModule`] trait a stage implements and the generic
//! pipeline driver that runs one training step of any program), `optim` (LR
//! schedule, AdamW, global-norm gradient clipping), `zero` (the data-parallel
//! optimizer step: bucketed gradient all-reduce, ZeRO-1, ZeRO-2/3 with
//! per-layer gradient streaming and ZeRO-3's per-layer gathers), `data` (the
//! global batch: synthetic or from prepared or token files), `metrics`
//! (per-step records, console line, JSON lines, resident memory),
//! `checkpoint`, `profile` (the `autopart-profile` binary: times ops and
//! collectives for `autopart profile`), `malloc` (glibc's mmap threshold pinned, so that freed
//! tensors return to the system) and `app` (the `main` of a plan binary:
//! flags, launcher checks, training loop).
//!
//! A hand-written llama-mini against this API (tp with Megatron splits and
//! SP, dp, pp with any schedule, recompute) lives with the tests, in
//! `tests/support/llama.rs`: the reference the runtime's tests, examples and
//! benches train, and the one the generated llama-mini is compared with.

pub mod app;
pub mod checkpoint;
pub mod comm;
pub mod data;
pub mod exec;
pub mod generate;
pub mod init;
pub mod malloc;
pub mod mesh;
pub mod metrics;
pub mod ops;
pub mod optim;
pub mod profile;
pub mod program;
/// The plan vocabulary shared with the compiler (`autopart-vocab`).
pub use autopart_vocab as vocab;
/// Pipeline schedules, shared with the compiler (which draws them).
pub use autopart_vocab::schedule;
pub mod tensorboard;
pub mod watchdog;
pub mod zero;
