//! The hand-written Llama's own checks (`support/llama.rs`): plans that do
//! not fit it are errors, and its first loss is that of a uniform guess.

#[allow(dead_code)]
#[path = "support/llama.rs"]
mod llama;

use autopart_runtime::comm::{Groups, MeshComms};
use autopart_runtime::data::Batch;
use autopart_runtime::exec::ExecError;
use autopart_runtime::mesh::{Coord, Mesh};
use autopart_runtime::schedule::Schedule;
use llama::{LlamaConfig, LlamaStage, TrainPlan};

fn plan_err<T: std::fmt::Debug>(r: Result<T, ExecError>) -> String {
    match r {
        Err(ExecError::Plan(msg)) => msg,
        other => panic!("expected a plan error, got {other:?}"),
    }
}

fn with_mesh(tp: usize, dp: usize, pp: usize) -> TrainPlan {
    TrainPlan {
        mesh: Mesh { tp, dp, pp },
        ..TrainPlan::single()
    }
}

#[test]
fn plans_that_do_not_fit_are_errors() {
    let cfg = LlamaConfig::mini();
    let origin = Coord {
        tp: 0,
        dp: 0,
        pp: 0,
    };
    assert!(plan_err(LlamaStage::new(cfg, with_mesh(3, 1, 1), origin, 0)).contains("heads"));
    assert!(plan_err(LlamaStage::new(cfg, with_mesh(1, 1, 3), origin, 0)).contains("layers"));
    let outside = Coord {
        tp: 2,
        dp: 0,
        pp: 0,
    };
    assert!(plan_err(LlamaStage::new(cfg, with_mesh(2, 1, 1), outside, 0)).contains("outside"));

    let comms = MeshComms::solo();
    let batch = Batch::synthetic(cfg.vocab, 4, 16, 0).expect("batch");
    let mut tp2 = LlamaStage::new(cfg, with_mesh(2, 1, 1), origin, 0).expect("fits");
    let msg = plan_err(tp2.train_step(&Groups::of(&comms), &batch));
    assert!(msg.contains("communicators"), "{msg}");
    let three = TrainPlan {
        micro_batches: 3,
        ..TrainPlan::single()
    };
    let mut stage = LlamaStage::new(cfg, three, origin, 0).expect("fits");
    let msg = plan_err(stage.train_step(&Groups::of(&comms), &batch));
    assert!(msg.contains("batch"), "{msg}");
    // 4 layers do not split into 2 stages of 3 chunks.
    let interleaved = |chunks| TrainPlan {
        schedule: Schedule::Interleaved { chunks },
        ..with_mesh(1, 1, 2)
    };
    assert!(plan_err(LlamaStage::new(cfg, interleaved(3), origin, 0)).contains("layers"));
    // One stage cannot interleave chunks: a schedule error, not a panic.
    let solo_interleaved = TrainPlan {
        schedule: Schedule::Interleaved { chunks: 2 },
        ..TrainPlan::single()
    };
    let mut stage = LlamaStage::new(cfg, solo_interleaved, origin, 0).expect("fits");
    assert!(matches!(
        stage.train_step(&Groups::of(&comms), &batch),
        Err(ExecError::Schedule(_))
    ));
}

#[test]
fn initial_loss_is_that_of_a_uniform_guess() {
    // Weights of std 0.02 give near-uniform logits: loss ≈ ln(vocab).
    let cfg = LlamaConfig::mini();
    let comms = MeshComms::solo();
    let origin = Coord {
        tp: 0,
        dp: 0,
        pp: 0,
    };
    let mut stage = LlamaStage::new(cfg, TrainPlan::single(), origin, 1).expect("fits");
    let batch = Batch::synthetic(cfg.vocab, 4, 16, 0).expect("batch");
    let loss = stage.train_step(&Groups::of(&comms), &batch).expect("step");
    assert!((loss - (cfg.vocab as f64).ln()).abs() < 0.05, "loss {loss}");
    assert!(stage.params().iter().all(|p| p.tensor.grad().defined()));
}
