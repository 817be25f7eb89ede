//! The plan search: exact against brute force on reduced spaces, the
//! sharding it finds, user constraints and their errors.

use autopart::anno::{Layout, Registry, builtin_registry};
use autopart::cost::{Cluster, load_cluster};
use autopart::ir::{DType, Graph, OpId};
use autopart::plan::{Recompute, Schedule, ZeroStage};
use autopart::search::model::{Config, evaluate_fixed};
use autopart::search::sharding::{Segment, SegmentCtx, boundaries};
use autopart::search::{
    Constraints, SearchInput, check_tp, kv_copies, kv_copy_degrees, search, solve_segments,
};
use autopart::trace::{ModelConfig, TraceOptions, preset, trace_model};

fn traced(model: &str, seq: u64, dtype: DType) -> (ModelConfig, Graph, Registry) {
    let registry = builtin_registry();
    let cfg = preset(model).expect("preset");
    let graph = trace_model(
        &cfg,
        &TraceOptions {
            batch: 1,
            seq_len: Some(seq),
            dtype,
            kv_copies: 1,
        },
        &registry,
    )
    .expect("traces");
    (cfg, graph, registry)
}

fn layer_segment(
    graph: &Graph,
    registry: &Registry,
    cluster: &Cluster,
    tp: u32,
    boundary: Layout,
) -> Segment {
    let ops: Vec<OpId> = graph.layer_ops(0).map(|(id, _)| id).collect();
    segment(graph, registry, cluster, tp, boundary, &ops)
}

/// The segment of `ops` at tp, two sequences a micro-batch.
fn segment(
    graph: &Graph,
    registry: &Registry,
    cluster: &Cluster,
    tp: u32,
    boundary: Layout,
    ops: &[OpId],
) -> Segment {
    let (bin, bout) = boundaries(graph, ops);
    let ctx = SegmentCtx {
        graph,
        registry,
        cluster,
        tp,
        boundary,
        scale: 2.0,
    };
    Segment::build(&ctx, ops, bin, bout).expect("builds")
}

/// The search's solver (variable elimination) and z3's MaxSAT both equal
/// brute-force enumeration on a reduced space (two candidate splits per
/// op: replicated, and the last legal split).
#[test]
fn sharding_matches_brute_force() {
    let (_, graph, registry) = traced("llama-mini", 64, DType::F32);
    for (cluster_name, tp, boundary) in [
        ("a100-80gb", 2, Layout::R),
        ("a100-80gb", 2, Layout::D(1)),
        ("cpu", 4, Layout::R),
    ] {
        let cluster = load_cluster(cluster_name).expect("preset");
        let mut seg = layer_segment(&graph, &registry, &cluster, tp, boundary);
        // 2^16 assignments: the first 16 ops keep two candidates, the last
        // three run replicated (debug-build brute force stays in seconds).
        let n_ops = seg.ops.len();
        for (i, op) in seg.ops.iter_mut().enumerate() {
            let last = op.choices.len() - 1;
            op.choices = if i + 3 < n_ops {
                vec![op.choices[0].clone(), op.choices[last].clone()]
            } else {
                vec![op.choices[0].clone()]
            };
        }
        assert_eq!(seg.space_size(), 65536.0);
        let (z3_assignment, z3_cost) = seg.solve_z3(&cluster, &[]).expect("solves");
        let (ve_assignment, ve_cost) = seg.solve(&cluster, &[]).expect("solves");
        let (_, bf_cost) = seg.brute_force(&cluster);
        assert_eq!(z3_cost, bf_cost, "{cluster_name} tp={tp} {boundary}");
        assert_eq!(ve_cost, bf_cost, "{cluster_name} tp={tp} {boundary}");
        assert_eq!(seg.evaluate(&cluster, &z3_assignment), z3_cost);
        assert_eq!(seg.evaluate(&cluster, &ve_assignment), ve_cost);
    }
}

/// On the full spaces (every legal split of every op: up to 3.8e7
/// assignments for a Llama layer at tp 64), variable elimination finds
/// z3's optimum cost for every segment the search solves: the ops before
/// the first layer, a layer and the ops after the last, for Llama 3 (GQA),
/// Llama 2, GPT and llama-mini, at several tp, with and without sequence
/// parallelism, and with a split pinned.
#[test]
fn elimination_equals_z3_on_full_spaces() {
    let cases = [
        ("llama3-70b", 8192, &[8u32, 64][..], "h100"),
        ("llama2-7b", 4096, &[2, 8][..], "a100-80gb"),
        ("gpt2", 1024, &[4][..], "a100-80gb"),
        ("llama-mini", 64, &[2, 4][..], "cpu"),
    ];
    let mut solved = 0;
    for (model, seq, tps, cluster_name) in cases {
        let (_, graph, registry) = traced(model, seq, DType::Bf16);
        let cluster = load_cluster(cluster_name).expect("preset");
        let all: Vec<OpId> = graph.ops().map(|(id, _)| id).collect();
        let layer: Vec<OpId> = graph.layer_ops(0).map(|(id, _)| id).collect();
        let pre: Vec<OpId> = all
            .iter()
            .copied()
            .take_while(|&o| graph.op(o).layer.is_none())
            .collect();
        let post: Vec<OpId> = all
            .iter()
            .rev()
            .copied()
            .take_while(|&o| graph.op(o).layer.is_none())
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        for &tp in tps {
            for boundary in [Layout::R, Layout::D(1)] {
                for ops in [&pre, &layer, &post] {
                    let seg = segment(&graph, &registry, &cluster, tp, boundary, ops);
                    let (_, z3) = seg.solve_z3(&cluster, &[]).expect("z3 solves");
                    let (a, ve) = seg.solve(&cluster, &[]).expect("solves");
                    assert_eq!(ve, z3, "{model} tp{tp} {boundary}: {} ops", seg.ops.len());
                    assert_eq!(seg.evaluate(&cluster, &a), ve);
                    // A pinned op: the last choice of the first op that has two.
                    if let Some(o) = seg.ops.iter().position(|op| op.choices.len() > 1) {
                        let pin = [(o, seg.ops[o].choices.len() - 1)];
                        let (_, z3) = seg.solve_z3(&cluster, &pin).expect("z3 solves");
                        let (a, ve) = seg.solve(&cluster, &pin).expect("solves");
                        assert_eq!(ve, z3, "{model} tp{tp} {boundary} pinned");
                        assert_eq!(a[o], pin[0].1);
                    }
                    solved += 1;
                }
            }
        }
    }
    assert_eq!(solved, 42);
}

fn split_of(seg: &Segment, graph: &Graph, assignment: &[usize], suffix: &str) -> Option<String> {
    seg.ops
        .iter()
        .zip(assignment)
        .find(|(o, _)| graph.op(o.op).name.ends_with(suffix))
        .and_then(|(o, &c)| o.choices[c].split.clone())
}

/// With sequence parallelism the residual stream stays split along the
/// sequence: norms and residual adds split `l`, the projections are
/// Megatron's column / row split (all-gather in, reduce-scatter out).
#[test]
fn sequence_parallel_sharding_is_megatron_sp() {
    let (_, graph, registry) = traced("llama3-8b", 4096, DType::Bf16);
    let cluster = load_cluster("a100-80gb").expect("preset");
    let seg = layer_segment(&graph, &registry, &cluster, 8, Layout::D(1));
    let (a, _) = seg.solve(&cluster, &[]).expect("solves");
    let s = |suffix| split_of(&seg, &graph, &a, suffix);
    assert_eq!(s("input_layernorm").as_deref(), Some("l"));
    assert_eq!(s("attn_residual").as_deref(), Some("l"));
    assert_eq!(s("q_proj").as_deref(), Some("n"));
    assert_eq!(s("o_proj").as_deref(), Some("k"));
    assert_eq!(s("gate_proj").as_deref(), Some("n"));
    assert_eq!(s("down_proj").as_deref(), Some("k"));
    assert_eq!(s("self_attn.attn").as_deref(), Some("g"));
}

/// A cluster whose memory binds for llama-mini, so recompute, ZeRO and
/// stage placement matter.
fn tight_cluster(memory_bytes: u64) -> Cluster {
    let mut c = load_cluster("cpu").expect("preset");
    c.memory_bytes = memory_bytes;
    c.memory_reserve_bytes = 0;
    c
}

/// Every composition of `n` layers into `parts` non-empty stages.
fn compositions(n: u32, parts: u32) -> Vec<Vec<u32>> {
    if parts == 1 {
        return vec![vec![n]];
    }
    let mut out = Vec::new();
    for first in 1..=n - (parts - 1) {
        for mut rest in compositions(n - first, parts - 1) {
            rest.insert(0, first);
            out.push(rest);
        }
    }
    out
}

/// The search's best plan is the brute-force optimum over the whole
/// reduced space: every mesh, micro-batch, SP, schedule, ZeRO stage, stage
/// placement and per-stage recompute mode.
#[test]
fn search_matches_brute_force() {
    let (model, graph, registry) = traced("llama-mini", 128, DType::F32);
    let n_layers = graph.n_layers();
    let gpus = 4u32;
    let global_batch = 8u64;
    let constraints = Constraints::default();
    let full = [Recompute::None, Recompute::Selective, Recompute::Full];
    // tp 4 on the 2 kv heads shards the graph with each copied twice.
    let kv_graphs =
        autopart::driver::trace_kv_graphs(&model, &registry, gpus, None, 128, DType::F32)
            .expect("kv graphs");
    assert_eq!(kv_graphs.keys().copied().collect::<Vec<_>>(), vec![2]);
    for memory in [64u64 << 20, 9 << 20, 5 << 20] {
        let cluster = tight_cluster(memory);
        let input = SearchInput {
            graph: &graph,
            registry: &registry,
            model: &model,
            cluster: &cluster,
            plan_gpus: gpus,
            runtime_gpus: gpus,
            global_batch,
            constraints: &constraints,
            top_k: 3,
            kv_graphs: &kv_graphs,
        };
        let found = search(&input).map(|r| r.plans[0].eval.step_s);

        let mut best = f64::INFINITY;
        for tp in [1u32, 2, 4] {
            if check_tp(&model, tp).is_err() {
                continue;
            }
            for pp in [1u32, 2, 4] {
                if tp * pp > gpus || gpus % (tp * pp) != 0 || pp > n_layers {
                    continue;
                }
                let dp = gpus / (tp * pp);
                if global_batch % u64::from(dp) != 0 {
                    continue;
                }
                let per = global_batch / u64::from(dp);
                let mbs: Vec<u64> = (1..=per).filter(|m| per % m == 0).collect();
                for sp in [false, true] {
                    if sp && tp == 1 {
                        continue;
                    }
                    let solved = solve_segments(&input, tp, sp, &mbs).expect("solves");
                    for &mb in &mbs {
                        let n_micro = per / mb;
                        let mut schedules = vec![Schedule::OneFOneB, Schedule::GPipe];
                        for v in [2u32, 4] {
                            if pp > 1 && n_micro % u64::from(pp) == 0 && n_layers % (pp * v) == 0 {
                                schedules.push(Schedule::Interleaved { chunks: v });
                            }
                        }
                        for schedule in schedules {
                            for zero in ZeroStage::ALL {
                                let cfg = Config {
                                    tp,
                                    pp,
                                    dp,
                                    replicas: 1,
                                    micro_batch: mb,
                                    n_micro,
                                    schedule,
                                    zero,
                                    sp,
                                    n_layers,
                                    recompute: None,
                                    reduce_dtype: autopart::plan::DType::Fp32,
                                };
                                let placements = match schedule {
                                    Schedule::Interleaved { .. } => {
                                        vec![vec![n_layers / pp; pp as usize]]
                                    }
                                    _ => compositions(n_layers, pp),
                                };
                                let seg = &solved[&mb];
                                for layers in &placements {
                                    // Every recompute vector.
                                    let n_vec = 3usize.pow(pp);
                                    for code in 0..n_vec {
                                        let mut c = code;
                                        let rec: Vec<Recompute> = (0..pp)
                                            .map(|_| {
                                                let r = full[c % 3];
                                                c /= 3;
                                                r
                                            })
                                            .collect();
                                        if let Some(e) =
                                            evaluate_fixed(&cluster, &cfg, seg, layers, &rec)
                                        {
                                            best = best.min(e.step_s);
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        match found {
            Ok(step) => assert!(
                (step - best).abs() <= 1e-12 * best,
                "memory {memory}: search {step} vs brute force {best}"
            ),
            Err(e) => assert!(best.is_infinite(), "search failed ({e}) but {best} fits"),
        }
    }
}

/// No graphs with copied kv heads: these tests search tp up to the kv heads.
static NO_KV_GRAPHS: std::collections::BTreeMap<u64, Graph> = std::collections::BTreeMap::new();

fn compile_input<'a>(
    graph: &'a Graph,
    registry: &'a Registry,
    model: &'a ModelConfig,
    cluster: &'a Cluster,
    gpus: u32,
    global_batch: u64,
    constraints: &'a Constraints,
) -> SearchInput<'a> {
    SearchInput {
        graph,
        registry,
        model,
        cluster,
        plan_gpus: gpus,
        runtime_gpus: gpus,
        global_batch,
        constraints,
        top_k: 3,
        kv_graphs: &NO_KV_GRAPHS,
    }
}

#[test]
fn impossible_constraints_say_which_and_why() {
    let (model, graph, registry) = traced("llama3-8b", 8192, DType::Bf16);
    let cluster = load_cluster("a100-80gb").expect("preset");
    let err = |c: Constraints, gpus: u32| {
        search(&compile_input(
            &graph, &registry, &model, &cluster, gpus, 64, &c,
        ))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default()
    };
    let msg = err(
        Constraints {
            tp: Some(64),
            ..Constraints::default()
        },
        64,
    );
    assert!(
        msg.contains("tp=64 does not divide 32 attention heads"),
        "{msg}"
    );
    // tp=16 copies each of the 8 kv heads twice: legal, but this input
    // carries no graph traced that way.
    let msg = err(
        Constraints {
            tp: Some(16),
            ..Constraints::default()
        },
        16,
    );
    assert!(
        msg.contains("tp=16 needs the model traced with 2 copies of each kv head"),
        "{msg}"
    );
    let msg = err(
        Constraints {
            tp: Some(1),
            pp: Some(1),
            zero: Some(ZeroStage::Off),
            recompute: Some(Recompute::None),
            ..Constraints::default()
        },
        8,
    );
    assert!(msg.contains("needs"), "{msg}");
    assert!(msg.contains("capacity 76.0 GiB"), "{msg}");
    assert!(msg.contains("--recompute full"), "{msg}");
    let msg = err(
        Constraints {
            pp: Some(64),
            ..Constraints::default()
        },
        64,
    );
    assert!(msg.contains("pp=64 exceeds the model's 32 layers"), "{msg}");
    let msg = err(
        Constraints {
            sequence_parallel: Some(true),
            tp: Some(1),
            ..Constraints::default()
        },
        8,
    );
    assert!(msg.contains("sequence parallelism needs tp > 1"), "{msg}");
}

#[test]
fn fixed_plan_is_evaluated_as_given() {
    let (model, graph, registry) = traced("llama3-8b", 8192, DType::Bf16);
    let cluster = load_cluster("a100-80gb").expect("preset");
    let c = Constraints {
        tp: Some(2),
        pp: Some(2),
        dp: Some(2),
        micro_batch: Some(1),
        schedule: Some(Schedule::OneFOneB),
        recompute: Some(Recompute::Full),
        zero: Some(ZeroStage::One),
        sequence_parallel: Some(true),
        ..Constraints::default()
    };
    let r = search(&compile_input(
        &graph, &registry, &model, &cluster, 8, 64, &c,
    ))
    .expect("fits");
    let p = &r.plans[0];
    assert_eq!(
        (p.config.tp, p.config.pp, p.config.dp, p.config.micro_batch),
        (2, 2, 2, 1)
    );
    assert_eq!(p.config.n_micro, 32);
    assert!(p.eval.stages.iter().all(|s| s.recompute == Recompute::Full));
    assert!(p.eval.peak_mem_bytes <= p.eval.capacity_bytes);
    // Stages cover the layers in order.
    assert_eq!(p.eval.stages[0].first_layer, 0);
    assert_eq!(p.eval.stages[0].end_layer, p.eval.stages[1].first_layer);
    assert_eq!(p.eval.stages[1].end_layer, 32);
}

#[test]
fn pinned_split_is_respected_and_illegal_one_rejected() {
    let (model, graph, registry) = traced("llama-mini", 64, DType::F32);
    let cluster = load_cluster("a100-80gb").expect("preset");
    let mut c = Constraints {
        tp: Some(2),
        ..Constraints::default()
    };
    c.splits.insert(
        "layers.*.mlp.down_proj".into(),
        None, // run the down projection replicated
    );
    let r = search(&compile_input(
        &graph, &registry, &model, &cluster, 2, 8, &c,
    ))
    .expect("fits");
    let down: Vec<_> = r.plans[0]
        .splits
        .iter()
        .filter(|(id, ..)| graph.op(*id).name.ends_with("mlp.down_proj"))
        .collect();
    assert_eq!(down.len(), 4);
    assert!(down.iter().all(|(_, split, ..)| split.is_none()));
    c.splits
        .insert("layers.*.mlp.down_proj".into(), Some("d".into()));
    let msg = search(&compile_input(
        &graph, &registry, &model, &cluster, 2, 8, &c,
    ))
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(
        msg.contains("split d of layers.*.mlp.down_proj is not legal"),
        "{msg}"
    );
}

/// A tp beyond the kv heads copies each kv head tp / kv times; the graph
/// traced so has that many kv heads, its kv projections marked as copies,
/// and the model's parameter count.
#[test]
fn tp_beyond_the_kv_heads_copies_them() {
    let model = preset("llama3-8b").expect("preset"); // 32 heads, 8 kv heads
    assert_eq!([4, 8, 16, 32].map(|tp| kv_copies(&model, tp)), [1, 1, 2, 4]);
    assert!(check_tp(&model, 16).is_ok() && check_tp(&model, 32).is_ok());
    assert!(check_tp(&model, 64).is_err());
    assert_eq!(kv_copy_degrees(&model, 64, None), vec![2, 4]);
    assert_eq!(kv_copy_degrees(&model, 64, Some(16)), vec![2]);
    assert_eq!(kv_copy_degrees(&model, 8, None), Vec::<u64>::new());
    // 24 heads in 6 kv groups: tp 4 neither divides 6 nor is a multiple.
    let mut odd = model.clone();
    if let ModelConfig::Llama(c) = &mut odd {
        c.n_heads = 24;
        c.n_kv_heads = 6;
    }
    let msg = check_tp(&odd, 4).expect_err("tp 4 on 6 kv heads");
    assert!(msg.contains("neither divides 6 kv heads"), "{msg}");

    let registry = builtin_registry();
    let mini = preset("llama-mini").expect("preset"); // 4 heads, 2 kv heads of 16
    let at = |m: u64| {
        trace_model(
            &mini,
            &TraceOptions {
                batch: 1,
                seq_len: Some(16),
                dtype: DType::F32,
                kv_copies: m,
            },
            &registry,
        )
        .map_err(|e| e.to_string())
    };
    let (base, copied) = (at(1).expect("trace"), at(2).expect("trace with copies"));
    assert_eq!(base.n_params(), copied.n_params());
    let k = |g: &Graph| {
        g.parameters()
            .find(|(_, t)| t.name == "model.layers.0.self_attn.k_proj.weight")
            .map(|(id, t)| (t.shape.clone(), g.copies(id)))
            .expect("k_proj")
    };
    assert_eq!(k(&base), (vec![32, 64], None));
    assert_eq!(k(&copied), (vec![64, 64], Some((0, 2))));
    let attn = copied
        .ops()
        .find(|(_, o)| o.name == "layers.0.self_attn.attn")
        .map(|(_, o)| o.int_attrs())
        .expect("attention");
    assert_eq!((attn["g"], attn["r"]), (4, 1));
    // Copies must divide a group's 2 query heads.
    let err = at(3).expect_err("3 copies of 2-head groups");
    assert!(err.contains("do not divide"), "{err}");
}

/// A profiled CPU cluster prices what `autopart profile` measured: the
/// optimizer step per parameter it updates (ZeRO-3 over dp 2: half of
/// them), and collectives paid in full when they cannot overlap compute
/// (CPU ranks copy with the cores that compute).
#[test]
fn measured_optimizer_and_unoverlapped_collectives_are_priced() {
    let (model, graph, registry) = traced("llama-mini", 128, DType::F32);
    let c = Constraints {
        tp: Some(1),
        pp: Some(1),
        dp: Some(2),
        micro_batch: Some(2),
        recompute: Some(Recompute::None),
        zero: Some(ZeroStage::Three),
        ..Constraints::default()
    };
    let eval = |cluster: &Cluster| {
        search(&compile_input(&graph, &registry, &model, cluster, 2, 8, &c))
            .expect("fits")
            .plans[0]
            .eval
            .clone()
    };
    let base = load_cluster("cpu").expect("preset");
    let mut slow = base.clone();
    slow.optimizer_s_per_param = Some(1e-9);
    let mut slower = base.clone();
    slower.optimizer_s_per_param = Some(3e-9);
    let (a, b) = (eval(&slow), eval(&slower));
    let params = graph.n_params() as f64 / 2.0;
    let got = b.optimizer_s - a.optimizer_s;
    assert!(
        (got / (params * 2e-9) - 1.0).abs() < 1e-6,
        "{got} s for {params} parameters"
    );
    assert!((b.step_s - a.step_s - got).abs() < 1e-12);
    let overlapped = eval(&base);
    let mut cpu = base.clone();
    cpu.comm_overlaps_compute = false;
    let paid = eval(&cpu);
    assert!(
        paid.step_s > overlapped.step_s && paid.dp_comm_s >= overlapped.dp_comm_s,
        "{} vs {}",
        paid.step_s,
        overlapped.step_s
    );
}

/// The stack's communication overlap (NeMo's, as `validate` prices it):
/// with tp collectives behind the GEMMs a tp2 micro-batch pays the larger
/// of compute and communication instead of their sum, and with the weight
/// gather behind the next forward ZeRO-1 exposes less dp communication.
#[test]
fn tp_comm_and_param_gather_overlap_are_credited() {
    let (model, graph, registry) = traced("llama3-8b", 1024, DType::Bf16);
    let c = Constraints {
        tp: Some(2),
        pp: Some(1),
        dp: Some(4),
        micro_batch: Some(1),
        recompute: Some(Recompute::None),
        zero: Some(ZeroStage::One),
        sequence_parallel: Some(false),
        ..Constraints::default()
    };
    let eval = |cluster: &Cluster| {
        search(&compile_input(&graph, &registry, &model, cluster, 8, 8, &c))
            .expect("fits")
            .plans[0]
            .eval
            .clone()
    };
    let base = load_cluster("h100").expect("preset");
    let plain = eval(&base);
    let mut tp = base.clone();
    tp.tp_comm_overlaps_compute = true;
    let tp_overlapped = eval(&tp);
    let (s0, s1) = (&plain.stages[0], &tp_overlapped.stages[0]);
    assert!(s0.tp_comm_s > 0.0, "{plain:?}");
    assert_eq!(
        s0.tp_comm_s, s1.tp_comm_s,
        "the communication itself is unchanged"
    );
    assert!(
        s1.micro_batch_s < s0.micro_batch_s
            && s1.micro_batch_s >= s0.micro_batch_s - s0.tp_comm_s - 1e-12,
        "{} vs {} with {} of tp comm",
        s1.micro_batch_s,
        s0.micro_batch_s,
        s0.tp_comm_s
    );
    let mut gather = base.clone();
    gather.param_gather_overlaps_forward = true;
    let gather_overlapped = eval(&gather);
    assert!(plain.dp_comm_s > 0.0);
    assert!(
        gather_overlapped.dp_comm_s < plain.dp_comm_s,
        "{} vs {}",
        gather_overlapped.dp_comm_s,
        plain.dp_comm_s
    );
    assert_eq!(gather_overlapped.stages[0].micro_batch_s, s0.micro_batch_s);
}

/// The Reference memory stack counts a layer's activations as Megatron-LM
/// does (Korthikanti et al. 2022, with a fused attention kernel and no
/// dropout): under tp t with sequence parallelism, a GPT layer keeps
/// 32·s·b·h/t bytes in bf16 (their 34 less the two dropout masks), a Llama
/// layer 4 + 2 + 2·(1 + 2·kv/heads) + 2 + 2 + 6·ffn/h in units of s·b·h/t
/// bytes (norm inputs, qkv input, q k v, attention output, mlp input, gate
/// and up and the down projection's input); the runtime's own count holds
/// every tape value besides and is larger. (The models are large enough
/// for the solver to pick Megatron's sequence-parallel sharding; a small
/// GPT at tp8 runs its norms replicated, and is counted as it runs.)
#[test]
fn reference_activations_are_megatrons_count() {
    use autopart::search::segment_cost::SegmentCost;
    let cluster = load_cluster("h100").expect("preset");
    for (model, seq, tp, units) in [
        ("gpt3-175b", 2048u64, 8u32, 32.0),
        (
            "llama3-8b",
            4096,
            8,
            4.0 + 2.0 + 2.0 * (1.0 + 2.0 * 8.0 / 32.0) + 2.0 + 2.0 + 6.0 * 14336.0 / 4096.0,
        ),
    ] {
        let (cfg, graph, registry) = traced(model, seq, DType::Bf16);
        let h = match &cfg {
            ModelConfig::Llama(c) => c.hidden,
            ModelConfig::Gpt(c) => c.hidden,
        };
        let seg = layer_segment(&graph, &registry, &cluster, tp, Layout::D(1));
        let (a, _) = seg.solve(&cluster, &[]).expect("solves");
        // layer_segment prices two sequences a micro-batch.
        let cost = SegmentCost::new(&graph, &seg, &cluster, &a, 2.0, tp);
        let sbh_t = (2 * seq * h) as f64 / f64::from(tp);
        let got = cost.reference_none_bytes as f64 / sbh_t;
        // The attention's f32 log-sum-exp per row is all that is left over.
        assert!(
            (units..units * 1.01).contains(&got),
            "{model}: {got:.3} s·b·h/t bytes per layer, Megatron's count is {units:.3}"
        );
        assert!(cost.saved_none_bytes > cost.reference_none_bytes, "{model}");
    }
}
