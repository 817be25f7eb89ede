//! Differential training test: llama-mini trained for 5 SGD steps under each
//! plan (dp2, tp2, pp2, tp2+sp, tp2·pp2, pp4, dp2·tp2·pp2; recompute full and
//! selective; GPipe and 1F1B) must give the single-device run's per-step
//! losses (1e-5 relative) and, after training, its weights (1e-5 absolute,
//! every tp shard all-gathered and compared on every rank, so every pp stage
//! and every dp replica is checked).
//!
//! `cargo test -p autopart-runtime --test mpi_train` re-launches this binary
//! once per world size (`mpirun -np 2`, `4`, `8`); each job runs the plans of
//! that size one after the other and the single-device reference in-process.
//! The optimizer is plain SGD written here, so what is compared is gradients.

mod common;

use autopart_runtime::comm::{Communicator, MeshComms, MpiComm, SoloComm};
use autopart_runtime::exec::{Adapter, Keep, Tape};
use autopart_runtime::mesh::{Coord, Mesh};
use autopart_runtime::model::llama::{
    Batch, Groups, LlamaConfig, LlamaStage, Recompute, SeqParallel, TrainPlan,
};
use autopart_runtime::schedule::Schedule;
use common::Check;
use std::collections::HashMap;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};

const GROUP_ENV: &str = "AUTOPART_TRAIN_WORLD";
const TIMEOUT: Duration = Duration::from_secs(240);
const SEED: u64 = 1234;
const STEPS: usize = 5;
const LR: f64 = 0.5;
const BATCH: i64 = 4;
const SEQ: i64 = 16;
const LOSS_RTOL: f64 = 1e-5;
const WEIGHT_ATOL: f64 = 1e-5;

fn plan(
    (tp, dp, pp): (usize, usize, usize),
    seq_parallel: SeqParallel,
    recompute: Recompute,
    schedule: Schedule,
    micro_batches: usize,
) -> TrainPlan {
    TrainPlan {
        mesh: Mesh { tp, dp, pp },
        seq_parallel,
        recompute,
        schedule,
        micro_batches,
    }
}

/// The plans run by a job of `world` ranks.
fn plans(world: usize) -> Vec<(&'static str, TrainPlan)> {
    use Recompute::{Full, None, Selective};
    use Schedule::{GPipe, OneFOneB};
    use SeqParallel::{Off, On};
    match world {
        2 => vec![
            ("dp2", plan((1, 2, 1), Off, None, GPipe, 1)),
            ("tp2", plan((2, 1, 1), Off, None, GPipe, 1)),
            ("tp2+sp", plan((2, 1, 1), On, None, GPipe, 1)),
            ("pp2 1f1b mb4", plan((1, 1, 2), Off, None, OneFOneB, 4)),
            ("pp2 gpipe mb2", plan((1, 1, 2), Off, None, GPipe, 2)),
            ("tp2 recompute full", plan((2, 1, 1), Off, Full, GPipe, 1)),
            (
                "tp2+sp recompute sel",
                plan((2, 1, 1), On, Selective, GPipe, 2),
            ),
        ],
        4 => vec![
            ("tp2.pp2 1f1b mb2", plan((2, 1, 2), Off, None, OneFOneB, 2)),
            ("tp2+sp.pp2 gpipe full", plan((2, 1, 2), On, Full, GPipe, 2)),
            (
                "pp4 1f1b mb4 sel",
                plan((1, 1, 4), Off, Selective, OneFOneB, 4),
            ),
        ],
        8 => vec![
            (
                "dp2.tp2.pp2 1f1b mb2",
                plan((2, 2, 2), Off, None, OneFOneB, 2),
            ),
            (
                "dp2.tp2+sp.pp2 full",
                plan((2, 2, 2), On, Full, OneFOneB, 2),
            ),
        ],
        _ => Vec::new(),
    }
}

fn main() -> ExitCode {
    if let Some(code) = common::nextest_listing("mpi_train") {
        return code;
    }
    match std::env::var(GROUP_ENV) {
        Ok(w) => run_rank(w.parse().unwrap_or(0)),
        Err(_) => launch_all(),
    }
}

fn launch_all() -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("cannot find own executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut failed = Vec::new();
    for np in [2usize, 4, 8] {
        let spawned = Command::new("mpirun")
            .args([
                "--allow-run-as-root",
                "--oversubscribe",
                "--bind-to",
                "none",
            ])
            .args(["-np", &np.to_string(), "-x", &format!("{GROUP_ENV}={np}")])
            .arg(&exe)
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .env(GROUP_ENV, np.to_string())
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                eprintln!("cannot start mpirun (is it on PATH?): {e}");
                return ExitCode::FAILURE;
            }
        };
        let start = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    if !status.success() {
                        eprintln!("mpirun -np {np} failed: {status}");
                        failed.push(np);
                    }
                    break;
                }
                Ok(None) if start.elapsed() > TIMEOUT => {
                    eprintln!("mpirun -np {np} still running after {TIMEOUT:?}; killing it");
                    let _ = child.kill();
                    let _ = child.wait();
                    return ExitCode::FAILURE;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => {
                    eprintln!("waiting for mpirun: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("jobs of {failed:?} ranks failed");
        ExitCode::FAILURE
    }
}

/// Per-step losses and the full weights after training.
struct Trained {
    losses: Vec<f64>,
    weights: HashMap<String, Tensor>,
}

fn sgd(stage: &mut LlamaStage) -> Result<(), String> {
    for p in stage.params_mut() {
        let g = p.tensor.grad();
        if !g.defined() {
            return Err(format!("{} has no gradient", p.spec.name));
        }
        tch::no_grad(|| p.tensor.f_sub_(&g.f_mul_scalar(LR)?).map(drop))
            .map_err(|e| e.to_string())?;
        p.zero_grad();
    }
    Ok(())
}

fn train(plan: TrainPlan, coord: Coord, g: &Groups<'_>) -> Result<Trained, String> {
    let cfg = LlamaConfig::mini();
    let mut stage = LlamaStage::new(cfg, plan, coord, SEED).map_err(|e| e.to_string())?;
    let mut losses = Vec::new();
    for _ in 0..STEPS {
        let batch = Batch::synthetic(cfg.vocab, BATCH, SEQ, 100).map_err(|e| e.to_string())?;
        losses.push(stage.train_step(g, &batch).map_err(|e| e.to_string())?);
        sgd(&mut stage)?;
    }
    let weights = stage
        .full_weights(g.tp)
        .map_err(|e| e.to_string())?
        .into_iter()
        .collect();
    Ok(Trained { losses, weights })
}

fn reference() -> Result<Trained, String> {
    let mesh = Mesh::new(1, 1, 1).map_err(|e| e.to_string())?;
    let solo = MeshComms {
        mesh,
        coord: Coord {
            tp: 0,
            dp: 0,
            pp: 0,
        },
        world: SoloComm,
        tp: SoloComm,
        dp: SoloComm,
        pp: SoloComm,
    };
    train(TrainPlan::single(), solo.coord, &Groups::of(&solo))
}

/// (max loss relative error, max weight absolute error) of `got` against `want`.
fn compare(name: &str, got: &Trained, want: &Trained, check: &mut Check) -> (f64, f64) {
    let mut loss_err = 0f64;
    for (step, (g, w)) in got.losses.iter().zip(&want.losses).enumerate() {
        let rel = (g - w).abs() / w.abs().max(1e-12);
        loss_err = loss_err.max(rel);
        check.ok(
            &format!("{name}: loss of step {step}"),
            rel <= LOSS_RTOL,
            || format!("{g} vs single-device {w} (relative error {rel:e})"),
        );
    }
    check.ok(
        &format!("{name}: step count"),
        got.losses.len() == STEPS,
        || format!("{} losses", got.losses.len()),
    );
    let mut weight_err = 0f64;
    for (pname, t) in &got.weights {
        let Some(w) = want.weights.get(pname) else {
            check.ok(&format!("{name}: {pname}"), false, || {
                "not in the reference".into()
            });
            continue;
        };
        if t.size() != w.size() {
            check.ok(&format!("{name}: {pname}"), false, || {
                format!("shape {:?}, reference {:?}", t.size(), w.size())
            });
            continue;
        }
        let err = (t - w).abs().max().double_value(&[]);
        weight_err = weight_err.max(err);
        check.ok(
            &format!("{name}: weight {pname}"),
            err <= WEIGHT_ATOL,
            || format!("max abs error {err:e}"),
        );
    }
    (loss_err, weight_err)
}

/// The adapters the llama plans do not use (chunk, gather, all-to-all),
/// checked against single-device autograd: a loss computed from the adapted
/// value must give the full tensor's gradient, shard by shard.
fn check_other_adapters(comm: &MpiComm, check: &mut Check) {
    let (r, n) = (comm.rank() as i64, comm.size() as i64);
    tch::manual_seed(7);
    let x = Tensor::randn([2 * n, 3 * n], (Kind::Float, tch::Device::Cpu));
    let w = Tensor::randn([2 * n, 3 * n], (Kind::Float, tch::Device::Cpu));
    // d(sum(x * w))/dx = w on the full tensor.
    let rows = |t: &Tensor| t.narrow(0, 2 * r, 2);
    let cols = |t: &Tensor| t.narrow(1, 3 * r, 3);
    let cases: [(&str, Adapter, Tensor, Tensor, Tensor); 3] = [
        // R -> D(1): the loss is a partial sum; x's gradient is all of w.
        (
            "chunk",
            Adapter::Chunk { dim: 1 },
            x.copy(),
            cols(&w),
            w.copy(),
        ),
        // D(0) -> R: the loss is replicated; x's gradient is w's rows of this rank.
        (
            "gather",
            Adapter::Gather { dim: 0 },
            rows(&x),
            w.copy(),
            rows(&w),
        ),
        // D(0) -> D(1): the loss is a partial sum; the gradient keeps x's rows.
        (
            "all-to-all",
            Adapter::AllToAll { from: 0, to: 1 },
            rows(&x),
            cols(&w),
            rows(&w),
        ),
    ];
    for (name, adapter, input, weight, want) in cases {
        let mut tape = Tape::new();
        let xi = tape.input(&input);
        let got = tape
            .adapt(adapter, comm, xi)
            .and_then(|y| {
                tape.segment("dot", Keep::Activations, &[y], move |t| {
                    Ok(vec![t[0].f_mul(&weight)?.f_sum(Kind::Float)?])
                })
            })
            .and_then(|l| {
                tape.backward(vec![(
                    l[0],
                    Tensor::ones([], (Kind::Float, tch::Device::Cpu)),
                )])
            })
            .map(|g| g.get(xi).map(Tensor::copy));
        match got {
            Ok(Some(g)) => {
                let err = (&g - &want).abs().max().double_value(&[]);
                check.ok(&format!("{name} adapter gradient"), err < 1e-6, || {
                    format!("max abs error {err:e}")
                });
            }
            Ok(None) => check.failures.push(format!("{name} adapter: no gradient")),
            Err(e) => check.failures.push(format!("{name} adapter: {e}")),
        }
    }
}

fn run_plans(world: &MpiComm, check: &mut Check) {
    check_other_adapters(world, check);
    let plans = plans(world.size());
    check.ok("plans for this world size", !plans.is_empty(), || {
        format!("no plans for {} ranks", world.size())
    });
    let want = match reference() {
        Ok(r) => r,
        Err(e) => return check.failures.push(format!("single-device run: {e}")),
    };
    // The reference itself must train: the loss goes down.
    check.ok(
        "reference loss decreases",
        want.losses[STEPS - 1] < want.losses[0],
        || format!("{:?}", want.losses),
    );
    if world.rank() == 0 {
        eprintln!("reference losses: {:?}", want.losses);
        eprintln!(
            "{:<26} {:>18} {:>18}",
            "plan", "max loss rel err", "max weight abs err"
        );
    }
    for (name, plan) in plans {
        let comms = match MeshComms::new(world.duplicate(), plan.mesh) {
            Ok(c) => c,
            Err(e) => return check.failures.push(format!("{name}: mesh: {e}")),
        };
        let errs = match train(plan, comms.coord, &Groups::of(&comms)) {
            Ok(got) => compare(name, &got, &want, check),
            Err(e) => {
                // A failed rank cannot take part in further collectives.
                check.failures.push(format!("{name}: {e}"));
                return;
            }
        };
        let mine = Tensor::from_slice(&[errs.0, errs.1]).view([1, 2]);
        match world.all_gather(&mine, 0) {
            Ok(all) if world.rank() == 0 => {
                let max = all.amax([0], false);
                eprintln!(
                    "{:<26} {:>18.3e} {:>18.3e}",
                    name,
                    max.double_value(&[0]),
                    max.double_value(&[1])
                );
            }
            Ok(_) => {}
            Err(e) => check
                .failures
                .push(format!("{name}: gathering errors: {e}")),
        }
    }
}

fn run_rank(expected_world: usize) -> ExitCode {
    tch::set_num_threads(1);
    let world = match MpiComm::init_world() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("mpi init: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut check = Check::new(world.rank());
    check.ok("world size", world.size() == expected_world, || {
        format!("{} ranks, launched for {expected_world}", world.size())
    });
    run_plans(&world, &mut check);
    for f in &check.failures {
        eprintln!("rank {}: FAIL {f}", world.rank());
    }
    let counts = Tensor::from_slice(&[check.failures.len() as i64, check.passed as i64]);
    let total = match world.all_reduce(&counts) {
        Ok(t) => Vec::<i64>::try_from(&t.to_kind(Kind::Int64)).unwrap_or_default(),
        Err(e) => {
            eprintln!("rank {}: summing results: {e}", world.rank());
            return ExitCode::FAILURE;
        }
    };
    let (failed, passed) = (total.first().copied(), total.get(1).copied());
    if world.rank() == 0 {
        eprintln!(
            "{} ranks: {} checks passed, {} failed",
            world.size(),
            passed.unwrap_or(0),
            failed.unwrap_or(-1)
        );
    }
    drop(world);
    if failed == Some(0) && passed.is_some_and(|p| p > 0) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
