//! Time of the whole plan search (trace excluded) for the reference
//! cases: llama3-8b on 8 GPUs, llama3-70b on 64 and 512, llama3.1-405b on
//! 16384, all on a100-80gb at 8192 tokens per sequence.
//!
//! `cargo bench -p autopart --bench search`

use autopart::anno::builtin_registry;
use autopart::cost::load_cluster;
use autopart::ir::DType;
use autopart::search::{Constraints, SearchInput, search};
use autopart::trace::{TraceOptions, preset, trace_model};
use criterion::{Criterion, criterion_group, criterion_main};

fn bench(c: &mut Criterion) {
    let registry = builtin_registry();
    let cluster = load_cluster("a100-80gb").expect("preset");
    let constraints = Constraints::default();
    let mut group = c.benchmark_group("search");
    group.sample_size(10);
    // (model, plan GPUs, global batch in sequences of 8192 tokens)
    for (model, gpus, global_batch) in [
        ("llama3-8b", 8u32, 256u64),
        ("llama3-70b", 64, 512),
        ("llama3-70b", 512, 1024),
        ("llama3.1-405b", 16384, 2048),
    ] {
        let cfg = preset(model).expect("preset");
        let graph = trace_model(
            &cfg,
            &TraceOptions {
                batch: 1,
                seq_len: Some(8192),
                dtype: DType::Bf16,
                kv_copies: 1,
            },
            &registry,
        )
        .expect("traces");
        let input = SearchInput {
            graph: &graph,
            registry: &registry,
            model: &cfg,
            cluster: &cluster,
            plan_gpus: gpus,
            runtime_gpus: gpus,
            global_batch,
            constraints: &constraints,
            top_k: 5,
            kv_graphs: &std::collections::BTreeMap::new(),
        };
        group.bench_function(format!("{model}/{gpus}gpus"), |b| {
            b.iter(|| search(&input).expect("a plan fits"))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
