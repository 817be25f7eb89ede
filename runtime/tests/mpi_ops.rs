//! Shard-aware ops under `mpirun -np 2` (one tp group of two ranks) against
//! the unsharded op on the full tensors, values and gradients: vocab-parallel
//! embedding and cross-entropy, and the column/row-split linear pair whose
//! partial sums an all-reduce completes.
//!
//! `cargo test -p autopart-runtime --test mpi_ops` re-launches this binary
//! as `mpirun -np 2`.

mod common;

use autopart_runtime::comm::{Communicator, MpiComm};
use autopart_runtime::ops::{self, IGNORE_INDEX};
use common::Check;
use std::process::ExitCode;
use tch::{Device, Kind, Tensor};

fn main() -> ExitCode {
    if let Some(code) = common::nextest_listing("mpi_ops") {
        return code;
    }
    common::main_under_mpirun(2, body)
}

fn full(seed: i64, shape: &[i64]) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randn(shape, (Kind::Float, Device::Cpu))
}

fn leaf(t: &Tensor) -> Tensor {
    t.detach().copy().set_requires_grad(true)
}

fn body(tp: &MpiComm, check: &mut Check) {
    let (me, w) = (tp.rank() as i64, tp.size() as i64);
    let vocab = 10;
    let shard = vocab / w;
    let start = me * shard;

    // Vocab-parallel embedding: partial sums all-reduce to the full lookup,
    // and each shard's gradient is its rows of the full gradient.
    let table = full(1, &[vocab, 4]);
    let ids = Tensor::from_slice(&[0i64, 3, 4, 9, 5, 2, 7, 7]).view([2, 4]);
    let upstream = full(2, &[2, 4, 4]);
    let whole = leaf(&table);
    let want = ops::embedding(&ids, &whole, 0).expect("full lookup");
    (&want * &upstream).sum(Kind::Float).backward();
    let mine = leaf(&table.narrow(0, start, shard));
    match ops::embedding(&ids, &mine, start) {
        Ok(part) => {
            check.close(
                "embedding all-reduced",
                tp.all_reduce(&part),
                &want.detach(),
                0.0,
            );
            // Backward of V -> R all-reduce is the identity: the upstream gradient as is.
            (&part * &upstream).sum(Kind::Float).backward();
            let want_grad = whole.grad().narrow(0, start, shard);
            check.close(
                "embedding shard grad",
                Ok::<_, String>(mine.grad()),
                &want_grad,
                1e-6,
            );
        }
        Err(e) => check.failures.push(format!("embedding: {e}")),
    }

    // Vocab-parallel cross-entropy against the unsharded loss and gradient.
    let logits = full(3, &[2, 4, vocab]);
    let labels = Tensor::from_slice(&[1i64, 9, 0, IGNORE_INDEX, 5, 4, 6, 2]).view([2, 4]);
    let tokens = 7; // labels that are not ignored
    let whole = leaf(&logits);
    let want = ops::cross_entropy(&whole, &labels).expect("full loss");
    ops::mean(&want, tokens).expect("mean").backward();
    let mine = leaf(&logits.narrow(2, start, shard));
    match ops::vocab_parallel_cross_entropy(&mine, &labels, start, tp) {
        Ok(loss) => {
            check.close(
                "vocab-parallel loss",
                Ok::<_, String>(loss.detach()),
                &want.detach(),
                1e-6,
            );
            match ops::mean(&loss, tokens) {
                Ok(m) => m.backward(),
                Err(e) => check.failures.push(format!("mean: {e}")),
            }
            let want_grad = whole.grad().narrow(2, start, shard);
            check.close(
                "vocab-parallel grad",
                Ok::<_, String>(mine.grad()),
                &want_grad,
                1e-6,
            );
        }
        Err(e) => check
            .failures
            .push(format!("vocab_parallel_cross_entropy: {e}")),
    }

    // Megatron MLP pair: column-split up projection, row-split down projection,
    // all-reduce of the partial sums.
    let x = full(4, &[2, 3, 6]);
    let up = full(5, &[8, 6]);
    let down = full(6, &[6, 8]);
    let want = ops::linear(
        &ops::gelu(&ops::linear(&x, &up).expect("ok")).expect("ok"),
        &down,
    )
    .expect("ok");
    let f = 8 / w;
    let h = ops::linear(&x, &up.narrow(0, me * f, f))
        .and_then(|h| ops::gelu(&h))
        .and_then(|h| ops::linear(&h, &down.narrow(1, me * f, f)));
    match h {
        Ok(partial) => check.close("tp mlp", tp.all_reduce(&partial), &want, 1e-5),
        Err(e) => check.failures.push(format!("tp mlp: {e}")),
    }
}
