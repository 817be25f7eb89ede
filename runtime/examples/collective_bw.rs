//! Collective bandwidth of `MpiComm` on this machine.
//!
//! `mpirun --allow-run-as-root --oversubscribe -np 4 target/debug/examples/collective_bw`
//!
//! Prints one row per op and size: `bytes` is each rank's input, `ms` the mean
//! time of one call (slowest rank), `GB/s` = bytes / time (algorithmic
//! bandwidth). The row `all_reduce (Vec copy)` moves the same data through
//! `Vec<f32>` copies instead of lending tensor memory to MPI, to measure what
//! the zero-copy path saves.
#![allow(clippy::print_stdout)]

use autopart_runtime::comm::{CommError, Communicator, MpiComm};
use mpi::collective::SystemOperation;
use mpi::traits::CommunicatorCollectives;
use std::time::Instant;
use tch::{Kind, Tensor};

/// One timed operation.
type Op<'a> = Box<dyn Fn() -> Result<(), CommError> + 'a>;

fn main() -> Result<(), CommError> {
    tch::set_num_threads(1);
    let world = MpiComm::init_world()?;
    let (me, n) = (world.rank(), world.size());
    if me == 0 {
        println!(
            "{:<22} {:>10} {:>5} {:>10} {:>8}",
            "op", "bytes", "ranks", "ms", "GB/s"
        );
    }
    for bytes in [4usize << 10, 1 << 20, 16 << 20] {
        let elems = (bytes / 4) as i64;
        // Divisible by any rank count up to 8 for the split ops.
        let x = Tensor::randn([elems / 8, 8], (Kind::Float, tch::Device::Cpu));
        let iters = (64 << 20) / bytes.max(1 << 20) * 2 + if bytes < (1 << 20) { 200 } else { 0 };
        let ops: Vec<(&str, Op)> = vec![
            ("all_reduce", Box::new(|| world.all_reduce(&x).map(drop))),
            ("all_gather", Box::new(|| world.all_gather(&x, 0).map(drop))),
            (
                "reduce_scatter",
                Box::new(|| world.reduce_scatter(&x, 0).map(drop)),
            ),
            (
                "all_to_all",
                Box::new(|| world.all_to_all(&x, 0, 0).map(drop)),
            ),
            ("broadcast", Box::new(|| world.broadcast(&x, 0).map(drop))),
            (
                "send_recv ring",
                Box::new(|| {
                    let (next, prev) = ((me + 1) % n, (me + n - 1) % n);
                    if n > 1 {
                        let _received = world.send_recv(&x, next, &x.size(), Kind::Float, prev)?;
                    }
                    Ok(())
                }),
            ),
            (
                "all_reduce (Vec copy)",
                Box::new(|| {
                    let v = Vec::<f32>::try_from(&x.flatten(0, -1))?;
                    let mut out = vec![0f32; v.len()];
                    world
                        .raw()
                        .all_reduce_into(&v[..], &mut out[..], SystemOperation::sum());
                    drop(Tensor::from_slice(&out).view(x.size().as_slice()));
                    Ok(())
                }),
            ),
        ];
        for (name, op) in &ops {
            op()?; // warm-up
            world.barrier()?;
            let start = Instant::now();
            for _ in 0..iters {
                op()?;
            }
            let local = start.elapsed().as_secs_f64() / iters as f64;
            let times = world.all_gather(&Tensor::from_slice(&[local]), 0)?;
            let slowest = times.max().double_value(&[]);
            if me == 0 {
                println!(
                    "{:<22} {:>10} {:>5} {:>10.3} {:>8.2}",
                    name,
                    bytes,
                    n,
                    slowest * 1e3,
                    bytes as f64 / slowest / 1e9
                );
            }
        }
    }
    Ok(())
}
