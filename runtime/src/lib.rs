//! autopart-runtime: everything the generated per-stage programs call at run time.
//!
//! It owns communicators, op implementations, segment/adapter execution,
//! pipeline schedules, optimizers, checkpoints, data and metrics. It never
//! depends on the compiler (`autopart`): generated code links only this crate
//! (and the crates of custom ops).
//!
//! The modules land with the runtime issue; this crate currently exposes only
//! the mesh arithmetic that both the generated code and the launcher share.

pub mod mesh;
