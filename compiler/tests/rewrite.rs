//! The e-graph rewrite of lowered programs: each rule on small hand-built
//! programs, and whole programs from the search (llama-mini, Llama 3 8B)
//! that must verify and never get more expensive.

use std::collections::BTreeMap;

use autopart::anno::{Layout, builtin_registry};
use autopart::cost::{Cluster, Group, load_cluster};
use autopart::ir::{DType, OpKind};
use autopart::lower::{
    AdapterCost, AdapterKind, Block, BlockInput, BlockKind, ExecProgram, LocalOp, Operand,
    ParamDecl, ParamInit, Segment, StageProgram, State, Step, ValueDecl, Vid, lower, verify,
};
use autopart::plan::{Recompute, Schedule};
use autopart::rewrite::{Limits, RewriteReport, rewrite};
use autopart::search::to_plan::{PlanContext, to_plan};
use autopart::search::{Constraints, SearchInput, search};
use autopart::trace::{Summary, TraceOptions, preset, trace_model};

// ---------------------------------------------------------------------------
// Hand-built programs: tp 2, a stream of [4, 4096, 4096] f32 (large enough
// that bandwidth, not latency, prices the collectives).

const TP: u64 = 2;
const FULL: [u64; 3] = [4, 4096, 4096];

fn st(fwd: Layout, grad: Layout) -> State {
    State { fwd, grad }
}

const R: State = State::REPLICATED;

fn d(dim: usize) -> State {
    State::produced(Layout::D(dim))
}

fn local(full: &[u64], state: State) -> Vec<u64> {
    let mut s = full.to_vec();
    if let Layout::D(dim) = state.fwd {
        s[dim] /= TP;
    }
    s
}

/// Builds a block: values are declared as they are made.
struct B {
    kind: BlockKind,
    inputs: Vec<BlockInput>,
    values: Vec<ValueDecl>,
    steps: Vec<Step>,
    open: Vec<LocalOp>,
}

impl B {
    fn new(kind: BlockKind) -> Self {
        B {
            kind,
            inputs: Vec::new(),
            values: Vec::new(),
            steps: Vec::new(),
            open: Vec::new(),
        }
    }

    fn value(&mut self, name: &str, full: &[u64], dtype: DType, state: State) -> Vid {
        self.values.push(ValueDecl {
            name: name.into(),
            shape: local(full, state),
            dtype,
            state,
        });
        Vid(self.values.len() as u32 - 1)
    }

    fn input(&mut self, input: BlockInput, name: &str, full: &[u64], state: State) -> Vid {
        let dtype = if input == BlockInput::Stream {
            DType::F32
        } else {
            DType::I64
        };
        self.inputs.push(input);
        self.value(name, full, dtype, state)
    }

    fn flush(&mut self) {
        if self.open.is_empty() {
            return;
        }
        let ops = std::mem::take(&mut self.open);
        let made: Vec<Vid> = ops.iter().flat_map(|o| o.outputs.clone()).collect();
        let mut inputs = Vec::new();
        for op in &ops {
            for operand in &op.inputs {
                if let Operand::Value(v) = operand
                    && !made.contains(v)
                    && !inputs.contains(v)
                {
                    inputs.push(*v);
                }
            }
        }
        self.steps.push(Step::Segment(Segment {
            name: ops[0].traced.clone(),
            attention_core: false,
            inputs,
            ops,
            outputs: made,
        }));
    }

    fn adapter(&mut self, kind: AdapterKind, input: Vid) -> Vid {
        self.flush();
        let from = &self.values[input.index()];
        let mut full = from.shape.clone();
        if let Layout::D(dim) = from.state.fwd {
            full[dim] *= TP;
        }
        let dtype = from.dtype;
        let name = format!("{}_{kind}", from.name);
        let output = self.value(&name, &full, dtype, kind.states().1);
        self.steps.push(Step::Adapter {
            kind,
            input,
            output,
        });
        output
    }

    #[allow(clippy::too_many_arguments)]
    fn op(
        &mut self,
        name: &str,
        kind: OpKind,
        annotation: &str,
        split: Option<&str>,
        inputs: Vec<(Operand, State)>,
        full: &[u64],
        out: State,
    ) -> Vid {
        let v = self.value(name, full, DType::F32, out);
        let (inputs, input_states) = inputs.into_iter().unzip();
        self.open.push(LocalOp {
            traced: name.into(),
            kind,
            split: split.map(String::from),
            annotation: annotation.into(),
            inputs,
            input_states,
            outputs: vec![v],
            attrs: BTreeMap::new(),
            offset_unit: None,
        });
        v
    }

    fn finish(mut self, output: Vid) -> Block {
        self.flush();
        Block {
            kind: self.kind,
            inputs: self.inputs,
            values: self.values,
            steps: self.steps,
            output,
        }
    }
}

fn val(v: Vid, s: State) -> (Operand, State) {
    (Operand::Value(v), s)
}

fn par(name: &str, s: State) -> (Operand, State) {
    (Operand::Param(name.into()), s)
}

fn param(name: &str, shape: &[u64], tp_dim: Option<usize>, block: BlockKind) -> ParamDecl {
    ParamDecl {
        name: name.into(),
        pattern: name.into(),
        layer: None,
        block,
        shape: shape.to_vec(),
        local_shape: match tp_dim {
            Some(dim) => local(shape, d(dim)),
            None => shape.to_vec(),
        },
        dtype: DType::F32,
        init: ParamInit::Normal { std: 0.02 },
        tp_dim,
        tp_grad_partial: false,
        copies: 1,
        tied_blocks: Vec::new(),
    }
}

fn program(
    stream: State,
    seq_len: u64,
    embed: Block,
    layer: Block,
    head: Block,
    params: Vec<ParamDecl>,
) -> ExecProgram {
    ExecProgram {
        model: "tiny".into(),
        family: "llama".into(),
        tp: TP as u32,
        pp: 1,
        dp: 1,
        plan_gpus: TP as u32,
        runtime_gpus: TP as u32,
        micro_batch: FULL[0],
        micro_batches: 1,
        global_batch: FULL[0],
        seq_len,
        vocab: 64,
        schedule: Schedule::OneFOneB,
        zero: autopart::plan::ZeroStage::Off,
        dtype: autopart::plan::DType::Fp32,
        reduce_dtype: autopart::plan::DType::Fp32,
        sequence_parallel: false,
        predicted_step_s: 0.0,
        stream_shape: local(&FULL, stream),
        stream_state: stream,
        embed,
        layer,
        head,
        params,
        stages: vec![StageProgram {
            index: 0,
            chunks: vec![(0, 2)],
            embedding: true,
            head: true,
            recompute: Recompute::None,
            predicted_peak_bytes: 0,
        }],
    }
}

/// An embedding split on its embedding dim, made `stream` by `adapters`.
fn embed(adapters: &[AdapterKind]) -> (Block, ParamDecl) {
    let mut b = B::new(BlockKind::Embed);
    let tokens = b.input(BlockInput::Tokens, "tokens", &FULL[..2], R);
    let mut e = b.op(
        "embed_tokens",
        OpKind::Embedding,
        "b l, v e -> b l e",
        Some("e"),
        vec![val(tokens, R), par("emb", d(1))],
        &FULL,
        d(2),
    );
    for &k in adapters {
        e = b.adapter(k, e);
    }
    (
        b.finish(e),
        param("emb", &[64, FULL[2]], Some(1), BlockKind::Embed),
    )
}

/// A head that reads the stream in `stream` and reduces it to a partial loss.
fn head(stream: State) -> Block {
    let mut b = B::new(BlockKind::Head);
    let x = b.input(BlockInput::Stream, "x", &FULL, stream);
    let split = matches!(stream.fwd, Layout::D(_)).then_some("l");
    let out_state = if split.is_some() {
        State::produced(Layout::V)
    } else {
        R
    };
    let loss = b.op(
        "mean",
        OpKind::Mean,
        "b l d -> ",
        split,
        vec![val(x, stream)],
        &[1],
        out_state,
    );
    b.finish(loss)
}

fn a100() -> Cluster {
    load_cluster("a100-80gb").expect("preset")
}

fn run(p: &ExecProgram, cluster: &Cluster) -> (ExecProgram, RewriteReport) {
    run_with(p, cluster, true)
}

/// [`run`], the stream free to move to the sequence dim or not.
fn run_with(p: &ExecProgram, cluster: &Cluster, seq_stream: bool) -> (ExecProgram, RewriteReport) {
    verify(p).expect("the hand-built program verifies");
    let cost = AdapterCost {
        cluster,
        group: Group::within_node(TP as u32),
    };
    let (out, report) = rewrite(p, &cost, &Limits::default(), seq_stream).expect("rewrites");
    verify(&out).expect("the rewritten program verifies");
    assert!(
        report.seconds_after() <= report.seconds_before(),
        "{report}"
    );
    (out, report)
}

fn adapters(b: &Block) -> Vec<AdapterKind> {
    b.adapters().map(|(k, _, _)| k).collect()
}

/// A layer block that applies `adapters` to the stream and returns it.
fn adapter_layer(stream: State, kinds: &[AdapterKind]) -> Block {
    let mut b = B::new(BlockKind::Layer);
    let mut x = b.input(BlockInput::Stream, "x", &FULL, stream);
    for &k in kinds {
        x = b.adapter(k, x);
    }
    b.finish(x)
}

fn adapter_program(stream: State, kinds: &[AdapterKind]) -> ExecProgram {
    let (e, emb) = match stream.fwd {
        Layout::R => embed(&[AdapterKind::Gather { dim: 2 }]),
        _ => embed(&[AdapterKind::AllToAll { from: 2, to: 1 }]),
    };
    // No sequence length matches: the stream keeps its state.
    program(
        stream,
        0,
        e,
        adapter_layer(stream, kinds),
        head(stream),
        vec![emb],
    )
}

#[test]
fn gather_after_chunk_cancels() {
    let cluster = a100();
    let p = adapter_program(
        R,
        &[
            AdapterKind::Chunk { dim: 1 },
            AdapterKind::Gather { dim: 1 },
        ],
    );
    let (out, report) = run(&p, &cluster);
    assert!(report.applied);
    assert_eq!(adapters(&out.layer), vec![]);
    assert_eq!(out.layer.output, Vid(0), "the layer passes its input on");
}

#[test]
fn chunk_after_gather_cancels() {
    let cluster = a100();
    let p = adapter_program(
        d(1),
        &[
            AdapterKind::Gather { dim: 1 },
            AdapterKind::Chunk { dim: 1 },
        ],
    );
    let (out, report) = run(&p, &cluster);
    assert!(report.applied);
    assert_eq!(adapters(&out.layer), vec![]);
}

#[test]
fn inverse_all_to_alls_cancel() {
    let cluster = a100();
    let p = adapter_program(
        d(1),
        &[
            AdapterKind::AllToAll { from: 1, to: 2 },
            AdapterKind::AllToAll { from: 2, to: 1 },
        ],
    );
    let (out, _) = run(&p, &cluster);
    assert_eq!(adapters(&out.layer), vec![]);
}

#[test]
fn gather_then_chunk_on_another_dim_is_an_all_to_all() {
    let cluster = a100();
    let (e, emb) = embed(&[
        AdapterKind::Gather { dim: 2 },
        AdapterKind::Chunk { dim: 1 },
    ]);
    let p = program(d(1), 0, e, adapter_layer(d(1), &[]), head(d(1)), vec![emb]);
    let (out, _) = run(&p, &cluster);
    assert_eq!(
        adapters(&out.embed),
        vec![AdapterKind::AllToAll { from: 2, to: 1 }]
    );
}

/// A Megatron MLP: column- then row-parallel linear between `pre` and `post`.
fn mlp(b: &mut B, x: Vid) -> Vid {
    let hidden = [FULL[0], FULL[1], 2 * FULL[2]];
    let h = b.op(
        "up_proj",
        OpKind::Linear,
        "b l k, n k -> b l n",
        Some("n"),
        vec![val(x, st(Layout::R, Layout::V)), par("w1", d(0))],
        &hidden,
        d(2),
    );
    b.op(
        "down_proj",
        OpKind::Linear,
        "b l k, n k -> b l n",
        Some("k"),
        vec![val(h, d(2)), par("w2", d(1))],
        &FULL,
        State::produced(Layout::V),
    )
}

fn mlp_params() -> Vec<ParamDecl> {
    vec![
        param("w1", &[2 * FULL[2], FULL[2]], Some(0), BlockKind::Layer),
        param("w2", &[FULL[2], 2 * FULL[2]], Some(1), BlockKind::Layer),
    ]
}

#[test]
fn all_reduce_then_chunk_is_a_reduce_scatter_and_copy_of_a_gather_gathers_for_shards() {
    let cluster = a100();
    let mut b = B::new(BlockKind::Layer);
    let x = b.input(BlockInput::Stream, "x", &FULL, d(1));
    let xr = b.adapter(AdapterKind::Gather { dim: 1 }, x);
    let xc = b.adapter(AdapterKind::Copy, xr);
    let o = mlp(&mut b, xc);
    let s = b.adapter(AdapterKind::AllReduce, o);
    let out = b.adapter(AdapterKind::Chunk { dim: 1 }, s);
    let layer = b.finish(out);
    let (e, emb) = embed(&[AdapterKind::AllToAll { from: 2, to: 1 }]);
    let mut params = mlp_params();
    params.push(emb);
    let p = program(d(1), 0, e, layer, head(d(1)), params);
    let (out, _) = run(&p, &cluster);
    assert_eq!(
        adapters(&out.layer),
        vec![
            AdapterKind::GatherForShards { dim: 1 },
            AdapterKind::ReduceScatter { dim: 1 }
        ]
    );
}

/// A plain tp layer: norm, copy, MLP, all-reduce, residual add; embedding
/// split on its embedding dim, head norm before a vocab-parallel projection.
fn plain_tp_program() -> ExecProgram {
    let mut b = B::new(BlockKind::Layer);
    let x = b.input(BlockInput::Stream, "x", &FULL, R);
    let n = b.op(
        "norm",
        OpKind::RmsNorm,
        "b l d^, d^ -> b l d^",
        None,
        vec![val(x, R), par("ln", R)],
        &FULL,
        R,
    );
    let nc = b.adapter(AdapterKind::Copy, n);
    let o = mlp(&mut b, nc);
    let s = b.adapter(AdapterKind::AllReduce, o);
    let r = b.op(
        "residual",
        OpKind::Add,
        "b l d, b l d -> b l d",
        None,
        vec![val(x, R), val(s, R)],
        &FULL,
        R,
    );
    let layer = b.finish(r);

    let mut h = B::new(BlockKind::Head);
    let x = h.input(BlockInput::Stream, "x", &FULL, R);
    let n = h.op(
        "final_norm",
        OpKind::RmsNorm,
        "b l d^, d^ -> b l d^",
        None,
        vec![val(x, R), par("final_ln", R)],
        &FULL,
        R,
    );
    let nc = h.adapter(AdapterKind::Copy, n);
    let logits = h.op(
        "lm_head",
        OpKind::Linear,
        "b l k, n k -> b l n",
        Some("n"),
        vec![val(nc, st(Layout::R, Layout::V)), par("lm", d(0))],
        &[FULL[0], FULL[1], 64],
        d(2),
    );
    let loss = h.op(
        "mean",
        OpKind::Mean,
        "b l v -> ",
        Some("v"),
        vec![val(logits, d(2))],
        &[1],
        State::produced(Layout::V),
    );
    let head = h.finish(loss);

    let (e, emb) = embed(&[AdapterKind::Gather { dim: 2 }]);
    let mut params = mlp_params();
    params.extend([
        emb,
        param("ln", &FULL[2..], None, BlockKind::Layer),
        param("final_ln", &FULL[2..], None, BlockKind::Head),
        param("lm", &[64, FULL[2]], Some(0), BlockKind::Head),
    ]);
    program(R, FULL[1], e, layer, head, params)
}

#[test]
fn all_reduces_split_and_gathers_move_below_norms_and_adds() {
    let cluster = a100();
    let p = plain_tp_program();
    let (out, report) = run(&p, &cluster);
    assert!(report.applied, "{report}");
    assert_eq!(out.stream_state, d(1), "{report}");
    assert_eq!(out.stream_shape, vec![FULL[0], FULL[1] / TP, FULL[2]]);
    assert_eq!(
        adapters(&out.layer),
        vec![
            AdapterKind::GatherForShards { dim: 1 },
            AdapterKind::ReduceScatter { dim: 1 }
        ],
        "{out}"
    );
    assert_eq!(
        adapters(&out.embed),
        vec![AdapterKind::AllToAll { from: 2, to: 1 }]
    );
    assert_eq!(
        adapters(&out.head),
        vec![AdapterKind::GatherForShards { dim: 1 }]
    );
    // The norms now run on sequence shards: their weights get partial
    // gradients, completed over tp.
    for name in ["ln", "final_ln"] {
        let p = out.params.iter().find(|p| p.name == name).expect("param");
        assert!(p.tp_grad_partial, "{name}");
    }
    let norm = out
        .layer
        .ops()
        .find(|o| o.kind == OpKind::RmsNorm)
        .expect("norm");
    assert_eq!(norm.input_states, vec![d(1), st(Layout::R, Layout::V)]);
    assert_eq!(norm.split.as_deref(), Some("l"));
    assert!(report.bytes_after() <= report.bytes_before(), "{report}");
}

/// Without `seq_stream` (the driver's default) the stream keeps the plan's
/// replicated state, so the plan's memory prediction still describes the
/// program: the same plain tp program is rewritten inside its blocks only.
#[test]
fn the_stream_keeps_its_state_unless_asked() {
    let cluster = a100();
    let p = plain_tp_program();
    let (out, report) = run_with(&p, &cluster, false);
    assert_eq!(out.stream_state, R, "{report}");
    assert_eq!(out.stream_shape, p.stream_shape, "{report}");
    assert_eq!(report.stream_after, R, "{report}");
    assert!(
        report.runs.iter().all(|r| r.stream == R),
        "no run tried a split stream: {report}"
    );
    assert!(!out.sequence_parallel, "{report}");
}

#[test]
fn a_node_limit_stops_the_run_and_still_verifies() {
    let cluster = a100();
    let p = plain_tp_program();
    let cost = AdapterCost {
        cluster: &cluster,
        group: Group::within_node(TP as u32),
    };
    let limits = Limits {
        node_limit: 5,
        ..Limits::default()
    };
    let (out, report) = rewrite(&p, &cost, &limits, true).expect("rewrites");
    verify(&out).expect("verifies");
    assert!(
        report
            .runs
            .iter()
            .any(|r| r.stop_reason.starts_with("node limit")),
        "{report}"
    );
    assert!(report.seconds_after() <= report.seconds_before());
}

#[test]
fn an_inconsistent_program_is_an_error() {
    let cluster = a100();
    let mut p = plain_tp_program();
    p.layer.values[0].state = d(1);
    let cost = AdapterCost {
        cluster: &cluster,
        group: Group::within_node(TP as u32),
    };
    let err = rewrite(&p, &cost, &Limits::default(), true).expect_err("rejected");
    assert!(err.to_string().contains("inconsistent"), "{err}");
}

// ---------------------------------------------------------------------------
// Programs from the search, lowered the way `autopart compile` lowers them.

fn lowered(model: &str, tp: u32, sp: bool, seq_len: u64, cluster: &Cluster) -> ExecProgram {
    let registry = builtin_registry();
    let cfg = preset(model).expect("preset");
    let dtype = if cluster.name == "cpu" {
        DType::F32
    } else {
        DType::Bf16
    };
    let trace = |batch| {
        let options = TraceOptions {
            batch,
            seq_len: Some(seq_len),
            dtype,
            kv_copies: 1,
        };
        trace_model(&cfg, &options, &registry).expect("traces")
    };
    let graph = trace(1);
    let summary = Summary::new(&graph, cfg.family(), &registry).expect("summary");
    let constraints = Constraints {
        tp: Some(tp),
        pp: Some(1),
        sequence_parallel: Some(sp),
        ..Constraints::default()
    };
    let global_batch = u64::from(tp) * 4;
    let input = SearchInput {
        graph: &graph,
        registry: &registry,
        model: &cfg,
        cluster,
        plan_gpus: tp,
        runtime_gpus: tp,
        global_batch,
        constraints: &constraints,
        top_k: 1,
        kv_graphs: &BTreeMap::new(),
    };
    let result = search(&input).expect("a plan");
    let ctx = PlanContext {
        graph: &graph,
        model_spec: model,
        family: cfg.family(),
        annotation_files: Vec::new(),
        loss_op: None,
        cluster: &cluster.name,
        seq_len,
        dtype: if dtype == DType::F32 {
            autopart::plan::DType::Fp32
        } else {
            autopart::plan::DType::Bf16
        },
        plan_gpus: tp,
        runtime_gpus: tp,
        global_batch,
        flops_per_token: summary.flops_per_token,
        peak_flops_per_s: cluster.peak_flops_per_s.for_dtype(dtype),
    };
    let plan = to_plan(&ctx, result.plans.first().expect("a plan"));
    let graph = trace(plan.micro_batch);
    lower(&graph, &plan, cluster).expect("lowers")
}

fn rewrite_lowered(p: &ExecProgram, cluster: &Cluster) -> (ExecProgram, RewriteReport) {
    let cost = AdapterCost {
        cluster,
        group: Group::placed(cluster, p.tp, 1),
    };
    let (out, report) = rewrite(p, &cost, &Limits::default(), true).expect("rewrites");
    verify(&out).expect("verifies");
    assert!(
        report.seconds_after() <= report.seconds_before(),
        "{report}"
    );
    assert!(report.bytes_after() <= report.bytes_before(), "{report}");
    (out, report)
}

const MEGATRON_SP_LAYER: [AdapterKind; 4] = [
    AdapterKind::GatherForShards { dim: 1 },
    AdapterKind::ReduceScatter { dim: 1 },
    AdapterKind::GatherForShards { dim: 1 },
    AdapterKind::ReduceScatter { dim: 1 },
];

#[test]
fn llama_mini_tp2_rewrites_verify_and_never_cost_more() {
    let cluster = load_cluster("cpu").expect("preset");
    let plain = lowered("llama-mini", 2, false, 16, &cluster);
    assert!(adapters(&plain.layer).contains(&AdapterKind::AllReduce));
    let (out, report) = rewrite_lowered(&plain, &cluster);
    assert!(
        report
            .runs
            .iter()
            .all(|r| !r.stop_reason.is_empty() && r.iterations > 0)
    );

    // With sequence parallelism lowered, the layer still gathers the stream
    // for the first norm; the rewrite runs that norm on shards instead.
    let sp = lowered("llama-mini", 2, true, 16, &cluster);
    assert!(adapters(&sp.layer).contains(&AdapterKind::Gather { dim: 1 }));
    let (sp_out, _) = rewrite_lowered(&sp, &cluster);
    assert_eq!(adapters(&sp_out.layer), MEGATRON_SP_LAYER, "{sp_out}");
    // The plain plan, rewritten, is the same layer (cheaper under the cpu
    // cluster's model: the norms and adds run on half the tokens).
    assert!(report.applied, "{report}");
    assert_eq!(adapters(&out.layer), MEGATRON_SP_LAYER, "{out}");
}

#[test]
fn llama3_8b_tp8_without_sp_becomes_megatron_sp() {
    let cluster = load_cluster("a100-80gb").expect("preset");
    let plain = lowered("llama3-8b", 8, false, 4096, &cluster);
    let (out, report) = rewrite_lowered(&plain, &cluster);
    eprintln!("{report}");
    // Under the cost model the reduce-scatter + all-gather pair costs what
    // the all-reduce did, the norms and residual adds run on an eighth of
    // the tokens, and the embedding's all-gather becomes an all-to-all:
    // the sequence-parallel program is cheaper and is chosen.
    assert!(report.applied, "{report}");
    assert_eq!(out.stream_state, d(1));
    assert_eq!(adapters(&out.layer), MEGATRON_SP_LAYER, "{out}");
    assert!(!adapters(&out.layer).contains(&AdapterKind::AllReduce));
    assert!(report.seconds_after() < report.seconds_before());
}
