//! Every collective of `MpiComm` against the value computed locally (each rank
//! builds all ranks' inputs from a seed), on the world and on the tp, dp and pp
//! groups of a tp2 x dp2 x pp1 mesh, plus the error paths.
//!
//! `cargo test -p autopart-runtime --test mpi_collectives` re-launches this
//! binary as `mpirun -np 4`; it also runs directly under
//! `mpirun --allow-run-as-root --oversubscribe -np 4 <bin>`.

mod common;

use autopart_runtime::comm::{CommError, Communicator, MeshComms, MpiComm};
use autopart_runtime::mesh::{Axis, Mesh};
use common::{Check, input};
use std::process::ExitCode;
use tch::{Kind, Tensor};

fn main() -> ExitCode {
    if let Some(code) = common::nextest_listing("mpi_collectives") {
        return code;
    }
    common::main_under_mpirun(4, body)
}

const KINDS: [Kind; 6] = [
    Kind::Float,
    Kind::Double,
    Kind::BFloat16,
    Kind::Half,
    Kind::Int64,
    Kind::Int,
];
const SHAPE: [i64; 3] = [4, 8, 6];

/// Tolerance of a sum in `kind`; transfers are always exact.
fn sum_tol(kind: Kind) -> f64 {
    match kind {
        Kind::Float => 1e-5,
        Kind::Double => 1e-12,
        Kind::BFloat16 => 1e-2,
        Kind::Half => 2e-3,
        _ => 0.0,
    }
}

fn body(world: &MpiComm, check: &mut Check) {
    let mesh = match Mesh::new(2, 2, 1) {
        Ok(m) => m,
        Err(e) => return check.failures.push(format!("mesh: {e}")),
    };
    let comms = match MeshComms::new(world.duplicate(), mesh) {
        Ok(c) => c,
        Err(e) => return check.failures.push(format!("mesh comms: {e}")),
    };
    let me = world.rank();
    let all: Vec<usize> = (0..world.size()).collect();
    check_group("world", world, &all, check);
    for axis in [Axis::Tp, Axis::Dp, Axis::Pp] {
        let members = match mesh.group(me, axis) {
            Ok(m) => m,
            Err(e) => return check.failures.push(format!("group: {e}")),
        };
        let comm = comms.axis(axis);
        check.ok(
            &format!("{axis:?} rank"),
            comm.size() == members.len(),
            || format!("size {} for members {members:?}", comm.size()),
        );
        check_group(&format!("{axis:?}"), comm, &members, check);
    }
    check_errors(world, check);
    #[cfg(feature = "nccl")]
    check_nccl_refuses_without_cuda(world, check);
}

/// Built with `--features nccl` on a machine without CUDA, NCCL set-up is a
/// clear error on every rank (and no rank hangs waiting for the others).
#[cfg(feature = "nccl")]
fn check_nccl_refuses_without_cuda(world: &MpiComm, check: &mut Check) {
    use autopart_runtime::comm::NcclComm;
    if tch::Cuda::is_available() {
        // This test covers CPU-only machines; GPU runs need one GPU per rank.
        return;
    }
    check.err("nccl without cuda", NcclComm::new(world, 0), |e| {
        matches!(e, CommError::Unavailable(_))
    });
}

/// Checks every collective of `comm`, whose ranks are the world ranks `members`.
fn check_group(name: &str, comm: &MpiComm, members: &[usize], check: &mut Check) {
    let w = members.len();
    let me = comm.rank();
    check.ok(
        &format!("{name} membership"),
        members.get(me) == Some(&check.rank),
        || format!("comm rank {me} in {members:?}"),
    );
    for (ki, &kind) in KINDS.iter().enumerate() {
        let seed = 100 * ki as i64;
        let inputs: Vec<Tensor> = members
            .iter()
            .map(|&r| input(seed, r, &SHAPE, kind))
            .collect();
        let mine = &inputs[me];
        let sum = inputs
            .iter()
            .map(|t| t.to_kind(Kind::Double))
            .reduce(|a, b| a + b)
            .map(|s| s.to_kind(kind));
        let Some(sum) = sum else { return };
        let tag = |op: &str| format!("{name} {op} {kind:?}");

        check.close(
            &tag("all_reduce"),
            comm.all_reduce(mine),
            &sum,
            sum_tol(kind),
        );

        for dim in [0i64, 1, 2, -1] {
            let want = Tensor::cat(&inputs, dim);
            check.close(
                &tag(&format!("all_gather dim {dim}")),
                comm.all_gather(mine, dim),
                &want,
                0.0,
            );

            let what = tag(&format!("reduce_scatter dim {dim}"));
            let len = SHAPE[dim.rem_euclid(3) as usize];
            if len % w as i64 == 0 {
                let want = sum.chunk(w as i64, dim)[me].shallow_clone();
                check.close(&what, comm.reduce_scatter(mine, dim), &want, sum_tol(kind));
            } else {
                check.err(&what, comm.reduce_scatter(mine, dim), |e| {
                    matches!(e, CommError::NotDivisible { .. })
                });
            }
        }

        for (split, concat) in [(0i64, 1i64), (1, 0), (1, 1), (2, 0), (-1, -2)] {
            let what = tag(&format!("all_to_all {split}->{concat}"));
            let len = SHAPE[split.rem_euclid(3) as usize];
            if len % w as i64 == 0 {
                let parts: Vec<Tensor> = inputs
                    .iter()
                    .map(|t| t.chunk(w as i64, split)[me].shallow_clone())
                    .collect();
                let want = Tensor::cat(&parts, concat);
                check.close(&what, comm.all_to_all(mine, split, concat), &want, 0.0);
            } else {
                check.err(&what, comm.all_to_all(mine, split, concat), |e| {
                    matches!(e, CommError::NotDivisible { .. })
                });
            }
        }

        for (root, want) in inputs.iter().enumerate() {
            let what = tag(&format!("broadcast root {root}"));
            check.close(&what, comm.broadcast(mine, root), want, 0.0);
        }

        if w > 1 {
            // A ring where every rank sends before it receives.
            let (next, prev) = ((me + 1) % w, (me + w - 1) % w);
            let got = comm.send_recv(mine, next, &SHAPE, kind, prev);
            check.close(&tag("send_recv ring"), got, &inputs[prev], 0.0);
            // Blocking pairs: even positions send, odd positions receive, then back.
            let peer = me ^ 1;
            if peer < w {
                let what = tag("send/recv pair");
                for round in 0..2 {
                    if (me % 2 == 0) == (round == 0) {
                        if let Err(e) = comm.send(mine, peer) {
                            check.failures.push(format!("{what}: {e}"));
                        }
                    } else {
                        check.close(&what, comm.recv(&SHAPE, kind, peer), &inputs[peer], 0.0);
                    }
                }
            }
        }
    }
    if let Err(e) = comm.barrier() {
        check.failures.push(format!("{name} barrier: {e}"));
    }
}

/// Local mistakes are errors on every rank, and a message of the wrong size
/// stays queued so that a correct `recv` still gets it.
fn check_errors(world: &MpiComm, check: &mut Check) {
    let me = world.rank();
    let t = input(7, me, &[2, 3], Kind::Float);
    check.err("broadcast root out of range", world.broadcast(&t, 4), |e| {
        matches!(e, CommError::RankOutOfRange { rank: 4, size: 4 })
    });
    check.err("send to self", world.send(&t, me), |e| {
        matches!(e, CommError::SelfMessage { .. })
    });
    check.err("recv from rank 9", world.recv(&[2], Kind::Float, 9), |e| {
        matches!(e, CommError::RankOutOfRange { .. })
    });
    check.err("all_gather dim 2 of 2-d", world.all_gather(&t, 2), |e| {
        matches!(
            e,
            CommError::DimOutOfRange {
                dim: 2,
                ndim: 2,
                ..
            }
        )
    });
    check.err(
        "all_to_all concat dim -3",
        world.all_to_all(&t, 0, -3),
        |e| matches!(e, CommError::DimOutOfRange { .. }),
    );
    let c = Tensor::zeros([2], (Kind::ComplexFloat, tch::Device::Cpu));
    check.err("all_reduce complex", world.all_reduce(&c), |e| {
        matches!(e, CommError::UnsupportedKind { .. })
    });
    let b = input(8, me, &[4], Kind::Bool);
    check.err("all_reduce bool", world.all_reduce(&b), |e| {
        matches!(e, CommError::UnsupportedKind { .. })
    });
    let bools: Vec<Tensor> = (0..4).map(|r| input(8, r, &[4], Kind::Bool)).collect();
    let want = Tensor::cat(&bools, 0);
    check.close("all_gather bool", world.all_gather(&b, 0), &want, 0.0);
    // Non-contiguous inputs are made contiguous first.
    let full: Vec<Tensor> = (0..4).map(|r| input(9, r, &[3, 4], Kind::Float)).collect();
    let want = Tensor::cat(&full.iter().map(|x| x.tr()).collect::<Vec<_>>(), 0);
    check.close(
        "all_gather transposed",
        world.all_gather(&full[me].tr(), 0),
        &want,
        0.0,
    );
    // Rank 0 sends 6 elements; rank 1 first expects 4 (an error), then 6.
    let msg = input(10, 0, &[6], Kind::Float);
    match me {
        0 => {
            if let Err(e) = world.send(&msg, 1) {
                check.failures.push(format!("send 6 elements: {e}"));
            }
        }
        1 => {
            check.err(
                "recv of the wrong size",
                world.recv(&[4], Kind::Float, 0),
                |e| {
                    matches!(
                        e,
                        CommError::SizeMismatch {
                            got: 6,
                            expected: 4,
                            ..
                        }
                    )
                },
            );
            check.close(
                "recv after a size error",
                world.recv(&[6], Kind::Float, 0),
                &msg,
                0.0,
            );
        }
        _ => {}
    }
    let empty = Tensor::zeros([0, 3], (Kind::Float, tch::Device::Cpu));
    check.close(
        "all_reduce of an empty tensor",
        world.all_reduce(&empty),
        &empty,
        0.0,
    );
}
