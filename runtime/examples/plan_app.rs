//! A plan binary written by hand: llama-mini on two pipeline stages (1F1B,
//! two micro-batches, ZeRO-1), built around `LlamaStage` the way generated
//! plan crates are built around their stage structs, so that `app::main` can
//! be run before code generation exists.
//!
//! `mpirun --allow-run-as-root --oversubscribe -np 2 target/debug/examples/plan_app --steps 3`
//!
//! `tests/mpi_app.rs` compiles this file into its own binary and runs that
//! under `mpirun`.

// The hand-written Llama is test support, not the runtime's API.
#[allow(dead_code)]
#[path = "../tests/support/llama.rs"]
pub mod llama;

use autopart_runtime::app::{self, BuiltStage, DType, PlanMeta, Schedule, StageCtx, ZeroStage};
use llama::{LlamaConfig, LlamaStage, Recompute, SeqParallel, TrainPlan};
use std::process::ExitCode;

pub const PLAN: PlanMeta = PlanMeta {
    model: "llama-mini",
    plan_hash: "",
    vocab: 256,
    seq_len: 16,
    global_batch: 4,
    micro_batch: 2,
    micro_batches: 2,
    tp: 1,
    pp: 2,
    dp: 1,
    plan_gpus: 2,
    runtime_gpus: 2,
    schedule: Schedule::OneFOneB,
    zero: ZeroStage::One,
    dtype: DType::Fp32,
    reduce_dtype: DType::Fp32,
    predicted_peak_bytes: &[8 << 20, 8 << 20],
    predicted_step_s: 0.05,
    hf_config: "",
};

/// This rank's stage of the plan, on the run's mesh.
pub fn build(ctx: StageCtx) -> BuiltStage {
    let plan = TrainPlan {
        mesh: ctx.mesh,
        seq_parallel: SeqParallel::Off,
        recompute: Recompute::None,
        schedule: PLAN.schedule,
        micro_batches: PLAN.micro_batches,
    };
    Ok(Box::new(LlamaStage::new(
        LlamaConfig::mini(),
        plan,
        ctx.coord,
        ctx.seed,
    )?))
}

fn main() -> ExitCode {
    app::main(&PLAN, build)
}
