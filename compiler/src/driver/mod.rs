//! The compile driver: the whole pipeline from a model to a plan binary, as
//! a straight line of named passes.
//!
//! ```text
//! Request ──resolve──▶ Inputs
//!   trace      Inputs                          ─▶ Traced     (graph, summary)     verify: ir::verify
//!   ties       Traced, constraints             ─▶ Ties       (tied params, pins)  verify: readers exist
//!   custom-ops Traced, registry                ─▶ CustomOps  (crate, fn, attrs)   verify: every custom op resolved
//!   search     Traced, Ties                    ─▶ Searched   (candidates)         verify: tied readers agree
//!   plan       Searched                        ─▶ Planned    (plan.ron, report)   verify: validate_plan, RON round trip
//!   lower      Planned                         ─▶ Lowered    (ExecProgram)        verify: lower::verify
//!   rewrite    Lowered                         ─▶ Rewritten  (ExecProgram, report) verify: lower::verify
//!   codegen    Rewritten, CustomOps, plan hash ─▶ Generated  (crate files)        verify: every stage has a file
//!   build      Generated                       ─▶ Built      (binary, stamp)      verify: stamp = plan hash
//! ```
//!
//! Each pass is a function from its typed inputs to its hand-off; the
//! driver runs the pass's verifier on the result, writes the pass's
//! artifact into the output folder (`plan.ron`, `report.md`, `program.txt`,
//! `rewrite.txt`, `gencode/`, the binary; each atomically), and tells the
//! [`Observer`] (which prints a hand-off for `--dump-after PASS`). A pass
//! never reads another pass's files: hand-offs travel in memory.
//!
//! Policies are passes with results of their own, not retries on an error:
//! tied weights ([`Ties`]) are resolved before the search (readers pinned to
//! the same split, vocab-parallel where legal at a tp, else replicated, and
//! pp = 1), custom ops ([`CustomOps`]) before the search (so that a missing
//! implementation is reported before minutes of search).

pub mod build;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use autopart_vocab::fs::write_atomic;
use autopart_vocab::hash::plan_hash;

pub use build::BuildProfile;

use crate::anno::{Dim, Factor, Registry, Shape, builtin_registry};
use crate::codegen::{CodegenOptions, CustomOpImpl, GeneratedFile};
use crate::cost::{Cluster, Group, load_cluster};
use crate::ir::{Graph, OpKind};
use crate::lower::{AdapterCost, ExecProgram};
use crate::plan::{
    DType, Plan, layer_pattern, parse_plan, plan_to_ron, render_alternatives, render_report,
    validate_plan,
};
use crate::rewrite::{Limits, RewriteReport};
use crate::search::reprice::Unpriced;
use crate::search::to_plan::{PlanContext, to_plan};
use crate::search::{Constraints, SearchInput, SearchResult, TiedReader, TiedWeight, search};
use crate::trace::{ModelConfig, Summary, TraceOptions, load_model, trace_model};

/// The passes, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Pass {
    Trace,
    Ties,
    CustomOps,
    Search,
    Plan,
    Lower,
    Rewrite,
    Codegen,
    Build,
}

impl Pass {
    pub const ALL: [Pass; 9] = [
        Pass::Trace,
        Pass::Ties,
        Pass::CustomOps,
        Pass::Search,
        Pass::Plan,
        Pass::Lower,
        Pass::Rewrite,
        Pass::Codegen,
        Pass::Build,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Pass::Trace => "trace",
            Pass::Ties => "ties",
            Pass::CustomOps => "custom-ops",
            Pass::Search => "search",
            Pass::Plan => "plan",
            Pass::Lower => "lower",
            Pass::Rewrite => "rewrite",
            Pass::Codegen => "codegen",
            Pass::Build => "build",
        }
    }
}

impl fmt::Display for Pass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Pass {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Pass::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Pass::ALL.iter().map(|p| p.name()).collect();
                format!("unknown pass '{s}' (expected one of {})", names.join(", "))
            })
    }
}

/// What to compile: the command line's `compile` flags, typed.
#[derive(Clone, Debug)]
pub struct Request {
    /// A preset or a path to a HuggingFace `config.json`.
    pub model: String,
    /// A registered op replacing the head's projection and cross-entropy.
    pub loss: Option<String>,
    /// Annotation files registering custom ops.
    pub annotations: Vec<PathBuf>,
    /// A cluster preset or a RON file.
    pub cluster: String,
    pub plan_gpus: u32,
    /// Default: `plan_gpus`.
    pub runtime_gpus: Option<u32>,
    /// Default: the model's context, capped at 8192.
    pub seq_len: Option<u64>,
    /// Default: about 2M tokens, a multiple of the runtime GPUs.
    pub global_batch: Option<u64>,
    pub dtype: DType,
    /// Dimensions the user fixed.
    pub constraints: Constraints,
    /// How many plans to keep (the best and its alternatives).
    pub top_k: usize,
    /// Run the egg collective rewrites.
    pub rewrite: bool,
    /// Let the rewrite split a replicated stream on the sequence dim
    /// ([`rewrite`]); off, the stream keeps the plan's state.
    pub rewrite_stream: bool,
    /// The output folder.
    pub out: PathBuf,
    /// The last pass to run (`None`: every pass).
    pub stop_after: Option<Pass>,
    pub build_profile: BuildProfile,
}

impl Request {
    /// A request with the command line's defaults.
    pub fn new(model: impl Into<String>, plan_gpus: u32) -> Self {
        Self {
            model: model.into(),
            loss: None,
            annotations: Vec::new(),
            cluster: "a100-80gb".into(),
            plan_gpus,
            runtime_gpus: None,
            seq_len: None,
            global_batch: None,
            dtype: DType::Bf16,
            constraints: Constraints::default(),
            top_k: 5,
            rewrite: true,
            rewrite_stream: false,
            out: PathBuf::from("out"),
            stop_after: None,
            build_profile: BuildProfile::Release,
        }
    }
}

/// The request resolved: registry, model, cluster and the defaulted sizes.
#[derive(Debug)]
pub struct Inputs {
    pub registry: Registry,
    pub model: ModelConfig,
    pub cluster: Cluster,
    /// The `--cluster` argument, as the plan records it.
    pub cluster_spec: String,
    pub model_spec: String,
    pub annotation_files: Vec<String>,
    pub seq_len: u64,
    pub plan_gpus: u32,
    pub runtime_gpus: u32,
    pub global_batch: u64,
    pub dtype: DType,
}

/// The registry of built-in ops plus the user's annotation files.
pub fn registry(files: &[PathBuf]) -> Result<Registry> {
    let mut registry = builtin_registry();
    for file in files {
        registry
            .load_file(file)
            .with_context(|| format!("loading annotation file {}", file.display()))?;
    }
    Ok(registry)
}

/// The model `spec` names (a preset or a `config.json`), with its head's
/// loss replaced by the custom op `loss`.
pub fn model(spec: &str, loss: Option<&str>) -> Result<ModelConfig> {
    let mut model = load_model(spec).with_context(|| format!("loading model '{spec}'"))?;
    if let Some(op) = loss {
        model.set_loss_op(op).map_err(anyhow::Error::msg)?;
    }
    Ok(model)
}

/// Loads what the request names and fills in its defaults.
pub fn resolve(req: &Request) -> Result<Inputs> {
    let registry = registry(&req.annotations)?;
    let model = model(&req.model, req.loss.as_deref())?;
    let cluster =
        load_cluster(&req.cluster).with_context(|| format!("loading cluster '{}'", req.cluster))?;
    if req.plan_gpus == 0 {
        bail!("--plan-ngpus must be at least 1");
    }
    let seq_len = req.seq_len.unwrap_or_else(|| model.default_seq_len());
    if seq_len == 0 {
        bail!("--seq-len must be at least 1");
    }
    let runtime_gpus = req.runtime_gpus.unwrap_or(req.plan_gpus);
    let global_batch = match req.global_batch {
        Some(0) => bail!("--global-batch must be at least 1"),
        Some(g) => g,
        None => {
            let per_gpu =
                (1u64 << 21).div_ceil(seq_len.saturating_mul(u64::from(runtime_gpus.max(1))));
            per_gpu.max(1) * u64::from(runtime_gpus.max(1))
        }
    };
    Ok(Inputs {
        registry,
        model,
        cluster,
        cluster_spec: req.cluster.clone(),
        model_spec: req.model.clone(),
        annotation_files: req
            .annotations
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
        seq_len,
        plan_gpus: req.plan_gpus,
        runtime_gpus,
        global_batch,
        dtype: req.dtype,
    })
}

// ---------------------------------------------------------------- trace

/// The model's training-step graph at one sequence of the plan's length.
#[derive(Debug)]
pub struct Traced {
    pub graph: Graph,
    pub summary: Summary,
}

impl fmt::Display for Traced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.graph, self.summary)
    }
}

/// `trace`: the graph at batch 1 and the plan's sequence length.
pub fn trace(inputs: &Inputs) -> Result<Traced> {
    trace_at(
        &inputs.model,
        &inputs.registry,
        1,
        Some(inputs.seq_len),
        inputs.dtype,
    )
}

/// The training-step graph of `model` at `batch` sequences of `seq_len`
/// tokens (default: the model's context, capped) and its summary.
pub fn trace_at(
    model: &ModelConfig,
    registry: &Registry,
    batch: u64,
    seq_len: Option<u64>,
    dtype: DType,
) -> Result<Traced> {
    let options = TraceOptions {
        batch,
        seq_len,
        dtype: dtype.into(),
        kv_copies: 1,
    };
    let graph = trace_model(model, &options, registry)
        .with_context(|| format!("tracing {}", model.name()))?;
    let summary = Summary::new(&graph, model.family(), registry)
        .with_context(|| format!("summarising {}", model.name()))?;
    let traced = Traced { graph, summary };
    verify_traced(&traced)?;
    Ok(traced)
}

fn verify_traced(t: &Traced) -> Result<()> {
    crate::ir::verify(&t.graph).map_err(|errors| {
        let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
        anyhow!(
            "the traced graph does not verify:\n  {}",
            lines.join("\n  ")
        )
    })
}

// ---------------------------------------------------------------- ties

/// Tied weights (a parameter read by more than one op, as GPT's embedding
/// and head) and the constraints the search runs under because of them.
#[derive(Clone, Debug, PartialEq)]
pub struct Ties {
    pub tied: Vec<TiedWeight>,
    /// The user's constraints plus pp = 1 when anything is tied, and the
    /// tie groups the search resolves per tp.
    pub constraints: Constraints,
}

impl fmt::Display for Ties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.tied.is_empty() {
            return writeln!(f, "no tied weights");
        }
        for t in &self.tied {
            writeln!(f, "tied {}:", t.param)?;
            for r in &t.readers {
                let dim = r.dim.as_deref().unwrap_or("-");
                writeln!(f, "  read by {} (first dim '{dim}')", r.op)?;
            }
            if t.user_pinned {
                writeln!(f, "  splits pinned by the user")?;
            } else {
                writeln!(
                    f,
                    "  every reader splits its first dim where that is legal at the tp, else runs replicated"
                )?;
            }
        }
        writeln!(
            f,
            "with pp > 1 the first and the last stage each hold a copy; their gradients are summed between them after backward (Megatron's embedding group)"
        )
    }
}

/// `ties`: finds tied parameters and pins what they need: every reader of
/// a tied parameter reads it in the same layout. Readers on different
/// pipeline stages (the embedding and the head) each hold a copy, whose
/// gradients the runtime sums between the stages.
pub fn ties(traced: &Traced, constraints: &Constraints) -> Result<Ties> {
    let tied = tied_weights(&traced.graph, constraints);
    let mut constraints = constraints.clone();
    // A user's pin on one reader decides for them all: every reader splits
    // its tied dim, or every reader runs replicated.
    for tie in tied.iter().filter(|t| t.user_pinned) {
        let mut split_dim = None;
        for r in &tie.readers {
            let Some(want) = constraints.splits.get(&r.op) else {
                continue;
            };
            let this = match want {
                None => false,
                Some(id) if Some(id) == r.dim.as_ref() => true,
                Some(id) => bail!(
                    "{} is tied between {}; a pinned split of {} must be its first dim ('{}') or None, got '{id}'",
                    tie.param,
                    reader_list(tie),
                    r.op,
                    r.dim.as_deref().unwrap_or("-")
                ),
            };
            if split_dim.is_some_and(|s| s != this) {
                bail!(
                    "{} is tied between {}: their pinned splits disagree (pin all of them split or all None)",
                    tie.param,
                    reader_list(tie)
                );
            }
            split_dim = Some(this);
        }
        for r in &tie.readers {
            let pin = if split_dim == Some(true) {
                r.dim.clone()
            } else {
                None
            };
            constraints.splits.entry(r.op.clone()).or_insert(pin);
        }
    }
    constraints.tied = tied.clone();
    Ok(Ties { tied, constraints })
}

fn reader_list(tie: &TiedWeight) -> String {
    let ops: Vec<&str> = tie.readers.iter().map(|r| r.op.as_str()).collect();
    ops.join(" and ")
}

/// Parameters read by more than one op, each with its readers' plan
/// patterns and the annotation identifier of the parameter's first dim in
/// each (the vocab, for tied embeddings).
fn tied_weights(graph: &Graph, constraints: &Constraints) -> Vec<TiedWeight> {
    let mut out = Vec::new();
    for (t, tensor) in graph.parameters() {
        let consumers = graph.consumers(t);
        if consumers.len() < 2 {
            continue;
        }
        let readers: Vec<TiedReader> = consumers
            .iter()
            .map(|&o| {
                let op = graph.op(o);
                let dim = op
                    .inputs
                    .iter()
                    .position(|&i| i == t)
                    .and_then(|i| op.annotation.inputs.get(i))
                    .and_then(|shape| match shape {
                        Shape::Tensor(dims) => match dims.first() {
                            Some(Dim::Single(Factor::Named { name, .. })) => Some(name.clone()),
                            Some(Dim::Group(fs)) => match fs.first() {
                                Some(Factor::Named { name, .. }) => Some(name.clone()),
                                _ => None,
                            },
                            _ => None,
                        },
                        Shape::Opaque => None,
                    });
                TiedReader {
                    op: layer_pattern(&op.name, op.layer),
                    dim,
                }
            })
            .collect();
        let user_pinned = readers
            .iter()
            .any(|r| constraints.splits.contains_key(&r.op));
        out.push(TiedWeight {
            param: tensor.name.clone(),
            readers,
            user_pinned,
        });
    }
    out
}

fn verify_ties(t: &Ties, graph: &Graph) -> Result<()> {
    let patterns: std::collections::BTreeSet<String> = graph
        .ops()
        .map(|(_, op)| layer_pattern(&op.name, op.layer))
        .collect();
    for tie in &t.tied {
        if tie.readers.len() < 2 {
            bail!("tied weight {} has fewer than two readers", tie.param);
        }
        if let Some(r) = tie.readers.iter().find(|r| !patterns.contains(&r.op)) {
            bail!(
                "tied weight {}: reader {} is not an op of the graph",
                tie.param,
                r.op
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- custom ops

/// Where the generated code finds each custom op of the graph.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CustomOps(pub BTreeMap<String, CustomOpImpl>);

impl fmt::Display for CustomOps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return writeln!(f, "no custom ops");
        }
        for (name, imp) in &self.0 {
            let dir = imp
                .crate_dir
                .as_ref()
                .map_or_else(|| "crates.io".to_string(), |d| d.display().to_string());
            let attrs: Vec<&str> = imp.attrs.iter().map(|a| a.name.as_str()).collect();
            writeln!(
                f,
                "{name}: {} (crate {} at {dir}; attributes: {})",
                imp.path,
                imp.crate_name,
                if attrs.is_empty() {
                    "none".to_string()
                } else {
                    attrs.join(", ")
                }
            )?;
        }
        Ok(())
    }
}

/// `custom-ops`: the implementation of every custom op the graph uses: its
/// crate (resolved against the annotation file that registered it),
/// function and attributes.
pub fn custom_ops(traced: &Traced, registry: &Registry) -> Result<CustomOps> {
    let mut out = BTreeMap::new();
    for (_, op) in traced.graph.ops() {
        let OpKind::Custom(name) = &op.kind else {
            continue;
        };
        if out.contains_key(name) {
            continue;
        }
        let sig = registry
            .get(name)
            .with_context(|| format!("custom op '{name}' is not registered"))?;
        let imp = sig.implementation.as_ref().with_context(|| {
            format!(
                "custom op '{name}' has no implementation in its annotation file: add `implementation: Some((crate: ..., path: ..., crate_path: ...))`"
            )
        })?;
        let crate_dir = match &imp.crate_path {
            Some(dir) => {
                let file = registry
                    .source(name)
                    .map(|l| PathBuf::from(&l.file))
                    .unwrap_or_default();
                let base = file.parent().unwrap_or(Path::new("."));
                let joined = base.join(dir);
                Some(joined.canonicalize().with_context(|| {
                    format!(
                        "crate_path '{dir}' of custom op '{name}' ({}): no such folder",
                        joined.display()
                    )
                })?)
            }
            None => None,
        };
        out.insert(
            name.clone(),
            CustomOpImpl {
                crate_name: imp.crate_name.clone(),
                path: imp.path.clone(),
                crate_dir,
                attrs: sig.attrs.to_vec(),
            },
        );
    }
    Ok(CustomOps(out))
}

fn verify_custom_ops(c: &CustomOps, graph: &Graph) -> Result<()> {
    for (_, op) in graph.ops() {
        if let OpKind::Custom(name) = &op.kind
            && !c.0.contains_key(name)
        {
            bail!("custom op '{name}' ({}) has no implementation", op.name);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- search

/// The best plans found, fastest first, with what the search did.
#[derive(Debug)]
pub struct Searched {
    pub result: SearchResult,
    pub seconds: f64,
    /// The graphs with kv heads copied the search sharded, by degree
    /// ([`trace_kv_graphs`]): a plan with `kv_copies > 1` is checked against
    /// its own.
    pub kv_graphs: BTreeMap<u64, Graph>,
}

impl fmt::Display for Searched {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "searched {} configurations ({} sharding problems solved exactly) in {:.2} s",
            self.result.evaluated, self.result.sharding_solves, self.seconds
        )?;
        for (i, c) in self.result.plans.iter().enumerate() {
            let k = &c.config;
            writeln!(
                f,
                "{i}: tp {} pp {} dp {} (x{} replicas), micro-batch {} x {}, {}, zero {}, sp {}: {:.4} s/step, peak {:.2} GiB",
                k.tp,
                k.pp,
                k.dp,
                k.replicas,
                k.micro_batch,
                k.n_micro,
                k.schedule,
                k.zero,
                k.sp,
                c.eval.step_s,
                c.eval.peak_mem_bytes as f64 / GIB
            )?;
        }
        Ok(())
    }
}

/// The model traced at batch 1 with each kv head copied `m` times, for
/// every degree `m` a tp of `plan_gpus` (or the pinned `tp`) needs: the
/// graphs [`SearchInput::kv_graphs`] holds.
pub fn trace_kv_graphs(
    model: &ModelConfig,
    registry: &Registry,
    plan_gpus: u32,
    tp: Option<u32>,
    seq_len: u64,
    dtype: crate::ir::DType,
) -> Result<BTreeMap<u64, Graph>> {
    let mut graphs = BTreeMap::new();
    for m in crate::search::kv_copy_degrees(model, plan_gpus, tp) {
        let options = TraceOptions {
            batch: 1,
            seq_len: Some(seq_len),
            dtype,
            kv_copies: m,
        };
        let graph = trace_model(model, &options, registry)
            .with_context(|| format!("tracing {} with {m} copies of each kv head", model.name()))?;
        crate::ir::verify(&graph).map_err(|errors| {
            let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
            anyhow!(
                "the graph with {m} copies of each kv head does not verify:\n  {}",
                lines.join("\n  ")
            )
        })?;
        graphs.insert(m, graph);
    }
    Ok(graphs)
}

/// What the search reads: the request's model, cluster and sizes, the
/// traced graphs and the constraints with the ties' pins.
fn search_input<'a>(
    inputs: &'a Inputs,
    traced: &'a Traced,
    ties: &'a Ties,
    kv_graphs: &'a BTreeMap<u64, Graph>,
    top_k: usize,
) -> SearchInput<'a> {
    SearchInput {
        kv_graphs,
        graph: &traced.graph,
        registry: &inputs.registry,
        model: &inputs.model,
        cluster: &inputs.cluster,
        plan_gpus: inputs.plan_gpus,
        runtime_gpus: inputs.runtime_gpus,
        global_batch: inputs.global_batch,
        constraints: &ties.constraints,
        top_k: top_k.max(1),
    }
}

/// `search`: the plan space under the constraints and ties.
pub fn search_plans(
    inputs: &Inputs,
    traced: &Traced,
    ties: &Ties,
    top_k: usize,
) -> Result<Searched> {
    let kv_graphs = trace_kv_graphs(
        &inputs.model,
        &inputs.registry,
        inputs.plan_gpus,
        ties.constraints.tp,
        inputs.seq_len,
        inputs.dtype.into(),
    )?;
    let input = search_input(inputs, traced, ties, &kv_graphs, top_k);
    let started = Instant::now();
    let result = search(&input).context("searching a plan")?;
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        evaluated = result.evaluated,
        sharding_solves = result.sharding_solves,
        seconds,
        "search finished"
    );
    Ok(Searched {
        result,
        seconds,
        kv_graphs,
    })
}

fn verify_searched(s: &Searched, traced: &Traced, ties: &Ties) -> Result<()> {
    if s.result.plans.is_empty() {
        bail!("the search returned no plan");
    }
    // Every reader of a tied weight reads it in the same layout: all split
    // along the tied dim, or all replicated.
    for c in &s.result.plans {
        for tie in &ties.tied {
            let splits: Vec<bool> = tie
                .readers
                .iter()
                .filter_map(|r| {
                    c.splits.iter().find_map(|(op, split, _, _)| {
                        let op = traced.graph.op(*op);
                        (layer_pattern(&op.name, op.layer) == r.op).then_some(split.is_some())
                    })
                })
                .collect();
            if splits.iter().any(|&x| x != splits[0]) {
                bail!(
                    "tied weight {}: its readers were split differently (tp {})",
                    tie.param,
                    c.config.tp
                );
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- plan

/// The chosen plan (index 0) and its alternatives, with the text of
/// `plan.ron` and its hash.
#[derive(Debug)]
pub struct Planned {
    pub plans: Vec<Plan>,
    /// `plan.ron` of the best plan.
    pub ron: String,
    /// [`plan_hash`] of `ron`.
    pub hash: String,
}

impl Planned {
    pub fn best(&self) -> &Plan {
        &self.plans[0]
    }

    /// `report.md`: the best plan's report and the alternatives.
    pub fn report(&self) -> String {
        let mut report = render_report(self.best());
        report.push_str("\n## Alternatives (fastest first)\n\n```text\n");
        report.push_str(&render_alternatives(&self.plans));
        report.push_str("```\n");
        report
    }
}

impl fmt::Display for Planned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.ron)
    }
}

/// `plan`: the searched candidates as plans. The best is lowered and
/// rewritten as the later passes will (`rewrite` and `seq_stream` as the
/// request says), and priced again with each op's layouts as that program runs
/// them ([`crate::search::reprice`]), so that its prediction describes the
/// program the binary runs; the alternatives keep the search's pricing.
pub fn plan(
    inputs: &Inputs,
    traced: &Traced,
    ties: &Ties,
    searched: &Searched,
    rewrite_enabled: bool,
    seq_stream: bool,
) -> Result<Planned> {
    let ctx = PlanContext {
        graph: &traced.graph,
        model_spec: &inputs.model_spec,
        family: inputs.model.family(),
        annotation_files: inputs.annotation_files.clone(),
        loss_op: inputs.model.loss_op().map(str::to_string),
        cluster: &inputs.cluster_spec,
        seq_len: inputs.seq_len,
        dtype: inputs.dtype,
        plan_gpus: inputs.plan_gpus,
        runtime_gpus: inputs.runtime_gpus,
        global_batch: inputs.global_batch,
        flops_per_token: traced.summary.flops_per_token,
        peak_flops_per_s: inputs
            .cluster
            .peak_flops_per_s
            .for_dtype(inputs.dtype.into()),
    };
    let mut plans: Vec<Plan> = searched
        .result
        .plans
        .iter()
        .map(|c| to_plan(&ctx, c))
        .collect();
    let first = plans.first().context("the search returned no plan")?;
    let program = lower(inputs, first)?;
    let program = rewrite(&inputs.cluster, program, rewrite_enabled, seq_stream)?.program;
    let input = search_input(inputs, traced, ties, &searched.kv_graphs, 1);
    let mut candidate = searched.result.plans[0].clone();
    match crate::search::reprice::reprice(&input, &candidate, &program)
        .context("pricing the plan as its program runs")?
    {
        Ok(eval) => {
            candidate.eval = eval;
            plans[0] = to_plan(&ctx, &candidate);
        }
        Err(Unpriced::Unmatched(why)) => tracing::warn!(
            why,
            "the plan keeps the search's prediction: its program could not be priced op by op"
        ),
        Err(Unpriced::OverMemory) => bail!(
            "the rewritten program of the best plan needs more memory than a device holds \
             (the search priced the plan before the collective rewrites); compile with \
             --no-rewrite, or pin --sp true"
        ),
    }
    let best = &plans[0];
    let ron = plan_to_ron(best).context("writing the plan as RON")?;
    let hash = plan_hash(ron.as_bytes());
    Ok(Planned { plans, ron, hash })
}

fn verify_planned(p: &Planned, traced: &Traced, searched: &Searched) -> Result<()> {
    let graph = match p.best().trace.kv_copies {
        1 => &traced.graph,
        m => searched
            .kv_graphs
            .get(&m)
            .with_context(|| format!("no graph with {m} copies of each kv head"))?,
    };
    validate_plan(p.best(), graph, None).context("checking the chosen plan")?;
    let back = parse_plan(&p.ron, Path::new("plan.ron")).context("reading the plan back")?;
    if &back != p.best() {
        bail!("plan.ron does not read back as the plan it was written from");
    }
    Ok(())
}

// ---------------------------------------------------------------- lower

/// `lower`: traces the graph at the plan's micro-batch and lowers the plan
/// onto it.
pub fn lower(inputs: &Inputs, plan: &Plan) -> Result<ExecProgram> {
    lower_plan(plan, &inputs.model, &inputs.registry, &inputs.cluster)
}

/// Lowers `plan` for `model`: the graph traced at the plan's micro-batch and
/// sequence length, then [`crate::lower::lower`]. For a plan read back from
/// `plan.ron` as for one just searched.
pub fn lower_plan(
    plan: &Plan,
    model: &ModelConfig,
    registry: &Registry,
    cluster: &Cluster,
) -> Result<ExecProgram> {
    let want = crate::search::kv_copies(model, plan.mesh.tp);
    if plan.trace.kv_copies != want {
        bail!(
            "the plan traces {} copies of each kv head, but tp={} on {} needs {want}",
            plan.trace.kv_copies,
            plan.mesh.tp,
            model.name()
        );
    }
    let options = TraceOptions {
        batch: plan.micro_batch,
        seq_len: Some(plan.trace.seq_len),
        dtype: plan.trace.dtype.into(),
        kv_copies: plan.trace.kv_copies,
    };
    let graph = trace_model(model, &options, registry).with_context(|| {
        format!(
            "tracing {} at micro-batch {}",
            model.name(),
            plan.micro_batch
        )
    })?;
    crate::lower::lower(&graph, plan, cluster).context("lowering the plan")
}

fn verify_program(p: &ExecProgram, what: &str) -> Result<()> {
    crate::lower::verify(p).with_context(|| format!("the {what} program does not verify"))
}

// ---------------------------------------------------------------- rewrite

/// The program after the collective rewrites (or as lowered, with
/// `--no-rewrite`).
#[derive(Debug)]
pub struct Rewritten {
    pub program: ExecProgram,
    /// `None` when the rewrite was skipped.
    pub report: Option<RewriteReport>,
}

impl fmt::Display for Rewritten {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.program)?;
        match &self.report {
            Some(r) => write!(f, "\n{r}"),
            None => writeln!(f, "\n(not rewritten: --no-rewrite)"),
        }
    }
}

/// The e-graph limits of the compile's rewrite: node and iteration counts
/// decide where it stops, so that the program does not depend on the
/// machine's speed; the time limit is only a safety net.
pub const REWRITE_LIMITS: Limits = Limits {
    node_limit: 10_000,
    iter_limit: 30,
    time_limit: Duration::from_secs(600),
};

/// `rewrite`: egg's collective rewrites over the lowered program, its
/// collectives priced over the program's tp group on `cluster`. The stream
/// keeps the state the plan gave it unless `seq_stream` lets a replicated
/// one be split on the sequence dim ([`crate::rewrite`]).
pub fn rewrite(
    cluster: &Cluster,
    program: ExecProgram,
    enabled: bool,
    seq_stream: bool,
) -> Result<Rewritten> {
    if !enabled {
        return Ok(Rewritten {
            program,
            report: None,
        });
    }
    let cost = AdapterCost {
        cluster,
        group: Group::placed(cluster, program.tp, 1),
    };
    let (program, report) = crate::rewrite::rewrite(&program, &cost, &REWRITE_LIMITS, seq_stream)
        .context("rewriting the lowered program's collectives")?;
    Ok(Rewritten {
        program,
        report: Some(report),
    })
}

// ---------------------------------------------------------------- codegen

/// The generated crate: its package name and files.
#[derive(Debug)]
pub struct Generated {
    pub package: String,
    pub files: Vec<GeneratedFile>,
}

impl fmt::Display for Generated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "package {}", self.package)?;
        for file in &self.files {
            write!(f, "// ===== {} =====\n{}", file.path, file.text)?;
        }
        Ok(())
    }
}

/// `codegen`: the plan's crate.
pub fn codegen(
    program: &ExecProgram,
    custom: &CustomOps,
    plan_hash: &str,
    runtime_path: PathBuf,
    model: &ModelConfig,
) -> Result<Generated> {
    if let ModelConfig::Gpt(c) = model {
        anyhow::ensure!(
            c.n_kv_heads == c.n_heads && c.tie_embeddings,
            "{}: a GPT with grouped-query attention or an untied head has no \
             HuggingFace GPT-2 config; such models are priced (`autopart validate`), \
             not compiled into plans",
            c.name
        );
    }
    let options = CodegenOptions {
        runtime_path,
        custom_ops: custom.0.clone(),
        plan_hash: plan_hash.to_string(),
        hf_config: model.to_hf_json().to_string(),
    };
    let (package, files) =
        crate::codegen::generate_files(program, &options).context("generating the plan's code")?;
    Ok(Generated { package, files })
}

fn verify_generated(g: &Generated, program: &ExecProgram) -> Result<()> {
    let has = |path: &str| g.files.iter().any(|f| f.path == path);
    for path in ["Cargo.toml", "build.rs", "src/main.rs", "src/blocks.rs"] {
        if !has(path) {
            bail!("the generated crate has no {path}");
        }
    }
    for s in &program.stages {
        let path = format!("src/stage_{}.rs", s.index);
        if !has(&path) {
            bail!(
                "the generated crate has no {path} for pipeline stage {}",
                s.index
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- build

/// The built plan binary.
#[derive(Debug)]
pub struct Built {
    pub binary: PathBuf,
}

impl fmt::Display for Built {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.binary.display())
    }
}

fn verify_built(b: &Built, out: &Path, hash: &str) -> Result<()> {
    if !b.binary.is_file() {
        bail!("{} was not written", b.binary.display());
    }
    let stamp = build::plan_stamp(out)?;
    if stamp.trim() != hash {
        bail!("the plan binary's stamp does not match plan.ron");
    }
    Ok(())
}

// ---------------------------------------------------------------- driver

/// Told after each pass, once its hand-off verified and its artifact is
/// written.
pub trait Observer {
    fn after(&mut self, pass: Pass, handoff: &dyn fmt::Display, elapsed: Duration);
}

/// Observes nothing.
#[derive(Debug, Default)]
pub struct Quiet;

impl Observer for Quiet {
    fn after(&mut self, _: Pass, _: &dyn fmt::Display, _: Duration) {}
}

/// What a compile produced, pass by pass (`None` past `stop_after`), and
/// the files it wrote.
#[derive(Debug)]
pub struct Compiled {
    pub inputs: Inputs,
    pub traced: Traced,
    pub ties: Option<Ties>,
    pub custom_ops: Option<CustomOps>,
    pub searched: Option<Searched>,
    pub planned: Option<Planned>,
    pub lowered: Option<ExecProgram>,
    pub rewritten: Option<Rewritten>,
    pub generated: Option<Generated>,
    pub built: Option<Built>,
    pub paths: Paths,
}

/// Where a compile writes.
#[derive(Clone, Debug)]
pub struct Paths {
    pub out: PathBuf,
    pub plan: PathBuf,
    pub report: PathBuf,
    pub program: PathBuf,
    pub rewrite: PathBuf,
    pub gencode: PathBuf,
}

impl Paths {
    pub fn new(out: &Path) -> Self {
        Self {
            out: out.to_path_buf(),
            plan: out.join("plan.ron"),
            report: out.join("report.md"),
            program: out.join("program.txt"),
            rewrite: out.join("rewrite.txt"),
            gencode: out.join("gencode"),
        }
    }
}

fn write(path: &Path, text: &str) -> Result<()> {
    write_atomic(path, text.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

/// Runs one pass: the pass, its verifier, the writing of its artifact
/// (only once it verified), then the observer. A verifier's failure is an
/// internal error naming the pass (a pass's own errors already say what
/// they were doing).
fn step<T: fmt::Display>(
    obs: &mut dyn Observer,
    pass: Pass,
    run: impl FnOnce() -> Result<T>,
    check: impl FnOnce(&T) -> Result<()>,
    write: impl FnOnce(&T) -> Result<()>,
) -> Result<T> {
    let started = Instant::now();
    let out = run()?;
    check(&out).with_context(|| format!("internal error after pass {pass}"))?;
    write(&out)?;
    let elapsed = started.elapsed();
    tracing::info!(%pass, seconds = elapsed.as_secs_f64(), "pass done");
    obs.after(pass, &out, elapsed);
    Ok(out)
}

/// Writes nothing.
fn nothing<T>(_: &T) -> Result<()> {
    Ok(())
}

/// Compiles `req`: every pass in order, up to `req.stop_after`. Writes
/// `plan.ron` and `report.md` after `plan`, `program.txt` after `rewrite`
/// (after `lower` when it stops there; `rewrite.txt` when the rewrite ran),
/// `gencode/` after `codegen` and the binary with its stamp after `build`,
/// each atomically and only once the pass's result verified; nothing is
/// written before the search succeeded.
pub fn compile(req: &Request, obs: &mut dyn Observer) -> Result<Compiled> {
    let stop = req.stop_after.unwrap_or(Pass::Build);
    let inputs = resolve(req)?;
    let paths = Paths::new(&req.out);
    let traced = step(obs, Pass::Trace, || trace(&inputs), verify_traced, nothing)?;
    let mut done = Compiled {
        inputs,
        traced,
        ties: None,
        custom_ops: None,
        searched: None,
        planned: None,
        lowered: None,
        rewritten: None,
        generated: None,
        built: None,
        paths,
    };
    if stop == Pass::Trace {
        return Ok(done);
    }
    let c = &mut done;
    let ties = step(
        obs,
        Pass::Ties,
        || ties(&c.traced, &req.constraints),
        |t| verify_ties(t, &c.traced.graph),
        nothing,
    )?;
    c.ties = Some(ties);
    if stop == Pass::Ties {
        return Ok(done);
    }
    let custom = step(
        obs,
        Pass::CustomOps,
        || custom_ops(&c.traced, &c.inputs.registry),
        |x| verify_custom_ops(x, &c.traced.graph),
        nothing,
    )?;
    c.custom_ops = Some(custom);
    if stop == Pass::CustomOps {
        return Ok(done);
    }
    let ties = c.ties.as_ref().context("ties")?;
    let searched = step(
        obs,
        Pass::Search,
        || search_plans(&c.inputs, &c.traced, ties, req.top_k),
        |s| verify_searched(s, &c.traced, ties),
        nothing,
    )?;
    c.searched = Some(searched);
    if stop == Pass::Search {
        return Ok(done);
    }
    let searched = c.searched.as_ref().context("search")?;
    let paths = &c.paths;
    let planned = step(
        obs,
        Pass::Plan,
        || {
            plan(
                &c.inputs,
                &c.traced,
                ties,
                searched,
                req.rewrite,
                req.rewrite_stream,
            )
        },
        |p| verify_planned(p, &c.traced, searched),
        |p| {
            std::fs::create_dir_all(&paths.out)
                .with_context(|| format!("creating {}", paths.out.display()))?;
            write(&paths.plan, &p.ron)?;
            write(&paths.report, &p.report())
        },
    )?;
    c.planned = Some(planned);
    if stop == Pass::Plan {
        return Ok(done);
    }
    let planned = c.planned.as_ref().context("plan")?;
    let lowered = step(
        obs,
        Pass::Lower,
        || lower(&c.inputs, planned.best()),
        |p| verify_program(p, "lowered"),
        |p| {
            if stop == Pass::Lower {
                write(&paths.program, &p.to_string())?;
            }
            Ok(())
        },
    )?;
    if stop == Pass::Lower {
        c.lowered = Some(lowered);
        return Ok(done);
    }
    let rewritten = step(
        obs,
        Pass::Rewrite,
        || {
            rewrite(
                &c.inputs.cluster,
                lowered.clone(),
                req.rewrite,
                req.rewrite_stream,
            )
        },
        |r| verify_program(&r.program, "rewritten"),
        |r| {
            if let Some(report) = &r.report {
                write(&paths.rewrite, &report.to_string())?;
            }
            write(&paths.program, &r.program.to_string())
        },
    )?;
    c.lowered = Some(lowered);
    c.rewritten = Some(rewritten);
    if stop == Pass::Rewrite {
        return Ok(done);
    }
    let home = build::autopart_home()?;
    let program = &c.rewritten.as_ref().context("rewrite")?.program;
    let custom = c.custom_ops.as_ref().context("custom ops")?;
    let generated = step(
        obs,
        Pass::Codegen,
        || {
            codegen(
                program,
                custom,
                &planned.hash,
                home.join("runtime"),
                &c.inputs.model,
            )
        },
        |g| verify_generated(g, program),
        |g| {
            crate::codegen::write_files(&g.files, &paths.gencode).context("writing the plan's code")
        },
    )?;
    c.generated = Some(generated);
    if stop == Pass::Codegen {
        return Ok(done);
    }
    let generated = c.generated.as_ref().context("codegen")?;
    // cargo writes the binary; the stamp is written once it is in place.
    let built = step(
        obs,
        Pass::Build,
        || {
            let binary = build::build_plan_binary(
                &home,
                &paths.gencode,
                &generated.package,
                &paths.out,
                req.build_profile,
            )?;
            Ok(Built { binary })
        },
        |b| verify_built(b, &paths.out, &planned.hash),
        nothing,
    )?;
    c.built = Some(built);
    Ok(done)
}

const GIB: f64 = (1u64 << 30) as f64;
