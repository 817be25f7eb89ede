//! Criterion benchmark of the runtime's overhead: one training step
//! (forward, backward, SGD; fp32, one intra-op thread) of llama-mini and of
//! a 512-hidden, 8-layer Llama, through the runtime on one rank and written
//! directly in tch. `examples/overhead.rs` prints the same comparison as a table.
//!
//! `cargo bench -p autopart-runtime --bench overhead`

// Shared with the example, which also prints parameter counts.
#[allow(dead_code)]
#[path = "common/overhead.rs"]
mod overhead;

use criterion::{Criterion, criterion_group, criterion_main};
use overhead::{DirectModel, Ops, RuntimeModel, Workload, check_same_loss};
use std::hint::black_box;
use std::time::Duration;

fn train_step(c: &mut Criterion) {
    tch::set_num_threads(1);
    for (w, samples, secs) in [
        (Workload::mini(), 50, 5),
        (Workload::mini_large_batch(), 20, 10),
        (Workload::cpu512(), 10, 20),
    ] {
        check_same_loss(&w);
        let batch = w.batch();
        let mut group = c.benchmark_group(format!("train_step/{}/{}x{}", w.name, w.batch, w.seq));
        group
            .sample_size(samples)
            .measurement_time(Duration::from_secs(secs));
        let mut rt = RuntimeModel::new(w.cfg);
        group.bench_function("runtime", |b| b.iter(|| black_box(rt.step(&batch))));
        let mut direct = DirectModel::new(w.cfg, Ops::Tch);
        group.bench_function("direct", |b| b.iter(|| black_box(direct.step(&batch))));
        group.finish();
    }
}

criterion_group!(benches, train_step);
criterion_main!(benches);
