//! Global-norm gradient clipping under `mpirun -np 2` against the unsharded
//! computation: each rank holds half of a sharded gradient and a copy of a
//! replicated one that only rank 0 counts; the norm and the clipped shards
//! equal those of clipping the full gradients on one process.
//!
//! `cargo test -p autopart-runtime --test mpi_optim` re-launches this binary
//! as `mpirun -np 2`.

mod common;

use autopart_runtime::comm::{Communicator, MpiComm, SoloComm};
use autopart_runtime::optim::{NormShare, clip_grad_norm};
use common::Check;
use std::process::ExitCode;
use tch::{Device, Kind, Tensor};

fn main() -> ExitCode {
    if let Some(code) = common::nextest_listing("mpi_optim") {
        return code;
    }
    common::main_under_mpirun(2, body)
}

fn full(seed: i64, shape: &[i64]) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randn(shape, (Kind::Float, Device::Cpu))
}

fn body(world: &MpiComm, check: &mut Check) {
    let (me, w) = (world.rank() as i64, world.size() as i64);
    let sharded = full(1, &[8, 3]) * 2.0;
    let replicated = full(2, &[5]);
    let max_norm = 1.0;

    let mut whole = vec![sharded.copy(), replicated.copy()];
    let want_norm = clip_grad_norm(&mut whole, &[NormShare::Counted; 2], max_norm, &SoloComm)
        .expect("unsharded clip");

    let rows = 8 / w;
    let share = if me == 0 {
        NormShare::Counted
    } else {
        NormShare::Replica
    };
    let mut mine = vec![sharded.narrow(0, me * rows, rows).copy(), replicated.copy()];
    match clip_grad_norm(&mut mine, &[NormShare::Counted, share], max_norm, world) {
        Ok(norm) => {
            check.ok("clipping actually happens", want_norm > max_norm, || {
                format!("norm {want_norm}")
            });
            check.ok("global norm", (norm - want_norm).abs() < 1e-9, || {
                format!("got {norm}, want {want_norm}")
            });
            let want_shard = whole[0].narrow(0, me * rows, rows);
            check.close(
                "clipped shard",
                Ok::<_, String>(mine[0].copy()),
                &want_shard,
                1e-6,
            );
            check.close(
                "clipped replica",
                Ok::<_, String>(mine[1].copy()),
                &whole[1],
                1e-6,
            );
        }
        Err(e) => check.failures.push(format!("clip_grad_norm: {e}")),
    }
}
