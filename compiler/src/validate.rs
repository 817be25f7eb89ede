//! Validation of the cost model against published training runs.
//!
//! Each row of a runs file (`shared/data/published_runs.csv` for A100s,
//! `published_runs_h100.csv` for H100s) gives a model, a GPU count, a
//! parallel configuration and what was measured: tokens/s per GPU where the
//! file has that column (convention-free, the H100 file), else TFLOP/s per
//! GPU under that source's FLOP-counting convention. The row's
//! configuration is evaluated with everything the source published fixed
//! (what it left out, such as the micro-batch size or the recompute of an
//! older recipe, is searched), the predicted step time is converted into
//! the measured unit, and compared. The free search on the same model, GPUs,
//! batch and sequence must find a plan at least as fast. This module reads
//! rows and computes; the CLI prints, with the error per hardware type.
//!
//! Rows the tracer can only approximate are priced as the nearest model it
//! traces, and [`Run::approximation`] says how: Nemotron-4 is a GPT with
//! grouped-query attention and an untied head (its squared-ReLU MLP and
//! rotary positions cost what GeLU and learned positions cost, to within a
//! memory-bound kernel); the tied/untied head is read from the row's notes
//! (`untied embeddings`), the only place the files record it.

use std::path::Path;

use thiserror::Error;

use crate::anno::Registry;
use crate::cost::Cluster;
use crate::ir::DType;
use crate::plan::{Recompute, Schedule, ZeroStage};
use crate::search::{Constraints, SearchInput, search};
use crate::trace::{GptConfig, LlamaConfig, ModelConfig, TraceOptions, trace_model};

#[derive(Debug, Error)]
pub enum ValidateError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {what}")]
    Row {
        path: String,
        line: usize,
        what: String,
    },
}

/// One published run.
#[derive(Clone, Debug)]
pub struct Run {
    pub line: usize,
    pub source: String,
    pub model: ModelConfig,
    pub seq_len: u64,
    pub gpu: String,
    pub n_gpus: u32,
    pub tp: u32,
    pub pp: u32,
    pub dp: u32,
    pub virtual_stages: Option<u32>,
    pub sequence_parallel: bool,
    pub zero: ZeroStage,
    /// `None`: the source did not publish it (searched).
    pub recompute: Option<Recompute>,
    pub micro_batch: Option<u64>,
    pub global_batch: u64,
    pub measured: Measured,
    /// How the traced model departs from the published one, if it does.
    pub approximation: Option<String>,
    /// The run's stack is NeMo (the notes name it): Megatron-Core with
    /// Transformer Engine, whose recipes overlap tp communication with the
    /// GEMMs and the distributed optimizer's gradient reduction and weight
    /// gather with compute.
    pub nemo: bool,
}

/// What a row measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Measured {
    /// Tokens per second per GPU.
    TokensPerS(f64),
    /// TFLOP/s per GPU under the source's convention.
    Tflops(f64, Convention),
}

impl Measured {
    pub fn value(&self) -> f64 {
        match *self {
            Measured::TokensPerS(v) | Measured::Tflops(v, _) => v,
        }
    }

    pub fn unit(&self) -> &'static str {
        match self {
            Measured::TokensPerS(_) => "tok/s",
            Measured::Tflops(..) => "TFLOP/s",
        }
    }
}

/// How a source counts FLOPs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Convention {
    /// Narayanan et al. 2021 eq. 3: `96·B·s·l·h²·(1 + s/6h + V/16lh)` per
    /// batch, recompute forward included.
    Narayanan,
    /// Hardware FLOPs with full recompute: `8N + 16·l·h·s` per token.
    HardwareRecompute,
    /// `6N + 12·l·h·s` per token (torchtitan; no recompute, no causal discount).
    SixN,
}

fn split_csv(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for ch in line.chars() {
        match ch {
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// Reads a runs file.
pub fn read_runs(path: &Path) -> Result<Vec<Run>, ValidateError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ValidateError::Io {
        path: p.clone(),
        source,
    })?;
    let mut lines = text.lines().enumerate();
    let header: Vec<String> = match lines.next() {
        Some((_, h)) => split_csv(h),
        None => {
            return Err(ValidateError::Row {
                path: p,
                line: 1,
                what: "empty file, expected a header row".into(),
            });
        }
    };
    let mut runs = Vec::new();
    for (i, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let line_no = i + 1;
        let cells = split_csv(line);
        let row_err = |what: String| ValidateError::Row {
            path: p.clone(),
            line: line_no,
            what,
        };
        if cells.len() != header.len() {
            return Err(row_err(format!(
                "{} fields, expected {} as in the header",
                cells.len(),
                header.len()
            )));
        }
        let get = |name: &str| -> Result<&str, ValidateError> {
            header
                .iter()
                .position(|h| h == name)
                .map(|i| cells[i].trim())
                .ok_or_else(|| row_err(format!("no column '{name}' in the header")))
        };
        let num = |name: &str| -> Result<u64, ValidateError> {
            let v = get(name)?;
            v.parse::<u64>()
                .map_err(|_| row_err(format!("column '{name}': expected an integer, found '{v}'")))
        };
        let opt_num = |name: &str| -> Result<Option<u64>, ValidateError> {
            let v = get(name)?;
            if v.is_empty() {
                Ok(None)
            } else {
                v.parse::<u64>().map(Some).map_err(|_| {
                    row_err(format!("column '{name}': expected an integer, found '{v}'"))
                })
            }
        };
        let has = |name: &str| header.iter().any(|h| h == name);
        let seq_len = num("seq_len")?;
        let family = get("family")?;
        let (layers, hidden, heads, vocab) = (
            num("n_layers")?,
            num("hidden")?,
            num("heads")?,
            num("vocab")?,
        );
        let kv_heads = if has("kv_heads") {
            opt_num("kv_heads")?.unwrap_or(heads)
        } else {
            heads
        };
        let notes = if has("notes") { get("notes")? } else { "" };
        let untied = notes.to_ascii_lowercase().contains("untied embedding");
        let name = format!("{}-{}l-{}h", family, layers, hidden);
        let mut approximation = Vec::new();
        let model = match family {
            "gpt" => {
                if kv_heads != heads {
                    approximation.push(format!("GQA {kv_heads} kv heads"));
                }
                if untied {
                    approximation.push("untied head".to_string());
                }
                if notes.contains("squared-ReLU") || notes.contains("RoPE") {
                    approximation
                        .push("GeLU and learned positions priced for squared-ReLU and RoPE".into());
                }
                ModelConfig::Gpt(GptConfig {
                    name,
                    n_layers: layers,
                    hidden,
                    n_heads: heads,
                    n_kv_heads: kv_heads,
                    ffn: num("ffn")?,
                    vocab,
                    n_positions: seq_len,
                    layer_norm_eps: 1e-5,
                    tie_embeddings: !untied,
                    token_ids: Default::default(),
                })
            }
            "llama" => ModelConfig::Llama(LlamaConfig {
                name,
                hidden,
                intermediate: num("ffn")?,
                n_layers: layers,
                n_heads: heads,
                n_kv_heads: kv_heads,
                head_dim: hidden / heads.max(1),
                vocab,
                max_positions: seq_len,
                rms_norm_eps: 1e-5,
                rope_theta: 10_000.0,
                rope_scaling: None,
                tie_embeddings: false,
                loss_op: None,
                token_ids: Default::default(),
            }),
            other => return Err(row_err(format!("family '{other}': expected gpt or llama"))),
        };
        model.validate().map_err(|e| row_err(e.to_string()))?;
        if has("cp") {
            if let Some(cp) = opt_num("cp")?.filter(|&cp| cp != 1) {
                return Err(row_err(format!(
                    "cp {cp}: context parallelism is not modelled (expected 1 or empty)"
                )));
            }
        }
        let tokens = if has("measured_tokens_per_s_per_gpu") {
            let v = get("measured_tokens_per_s_per_gpu")?;
            if v.is_empty() {
                None
            } else {
                Some(v.parse::<f64>().ok().filter(|x| *x > 0.0).ok_or_else(|| {
                    row_err(format!(
                        "measured_tokens_per_s_per_gpu: expected a positive number, found '{v}'"
                    ))
                })?)
            }
        } else {
            None
        };
        let measured = match tokens {
            Some(t) => Measured::TokensPerS(t),
            None => {
                let c = get("flops_convention")?;
                let convention = if c.contains("96*B*s*l*h^2") {
                    Convention::Narayanan
                } else if c.contains("hardware FLOPs") {
                    Convention::HardwareRecompute
                } else if c.contains("6*N") {
                    Convention::SixN
                } else {
                    return Err(row_err(format!(
                        "flops_convention '{c}' is not one autopart knows, and the row \
                         gives no measured_tokens_per_s_per_gpu"
                    )));
                };
                let v = get("measured_tflops_per_gpu")?;
                let tflops = v.parse::<f64>().ok().filter(|x| *x > 0.0).ok_or_else(|| {
                    row_err(format!(
                        "measured_tflops_per_gpu: expected a positive number, found '{v}'"
                    ))
                })?;
                Measured::Tflops(tflops, convention)
            }
        };
        let recompute = match get("recompute")? {
            "" => None,
            r => Some(r.parse::<Recompute>().map_err(&row_err)?),
        };
        let sequence_parallel = match get("sequence_parallel")? {
            "yes" | "true" => true,
            "no" | "false" | "" => false,
            other => {
                return Err(row_err(format!(
                    "sequence_parallel '{other}': expected yes/true or no/false"
                )));
            }
        };
        let n_gpus = u32::try_from(num("n_gpus")?)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| row_err("n_gpus: expected a positive 32-bit count".into()))?;
        let degree = |name: &str| -> Result<u32, ValidateError> {
            u32::try_from(num(name)?)
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| row_err(format!("{name}: expected a positive 32-bit degree")))
        };
        runs.push(Run {
            line: line_no,
            source: get("source")?.to_string(),
            model,
            seq_len,
            gpu: get("gpu")?.to_string(),
            n_gpus,
            tp: degree("tp")?,
            pp: degree("pp")?,
            dp: degree("dp")?,
            virtual_stages: opt_num("virtual_stages")?.map(|v| v as u32),
            sequence_parallel,
            recompute,
            zero: u8::try_from(num("zero")?)
                .ok()
                .and_then(|z| ZeroStage::try_from(z).ok())
                .ok_or_else(|| row_err("zero: expected 0, 1, 2 or 3".into()))?,
            micro_batch: opt_num("micro_batch")?,
            global_batch: num("global_batch")?,
            measured,
            approximation: (!approximation.is_empty()).then(|| approximation.join("; ")),
            nemo: notes.contains("NeMo"),
        });
    }
    Ok(runs)
}

/// The outcome for one run.
#[derive(Clone, Debug)]
pub struct RunResult {
    /// In the unit of [`Run::measured`].
    pub predicted: f64,
    pub error: f64,
    /// The published configuration's predicted step time.
    pub fixed_step_s: f64,
    pub fixed_desc: String,
    /// The published configuration fits only with the memory model's
    /// capacity lifted (it ran, so the model is pessimistic there): the
    /// free search, which respects capacity, may then be slower.
    pub fixed_over_memory: bool,
    /// The free search's best plan.
    pub free_step_s: f64,
    pub free_desc: String,
    /// Where the free search's plan departs from the published one, and
    /// what the model credits for it.
    pub why: String,
    /// Where the published configuration's predicted step time goes.
    pub breakdown: String,
}

/// The parts of a predicted step: pipeline (with its bubble), exposed
/// data-parallel communication, optimizer; per micro-batch of the slowest
/// stage, its time and the tensor-parallel communication in it.
fn breakdown(e: &crate::search::Evaluation) -> String {
    let slowest = e
        .stages
        .iter()
        .max_by(|a, b| a.micro_batch_s.total_cmp(&b.micro_batch_s));
    let mut out = format!(
        "step {:.3} s = pipeline {:.3} s (bubble {:.0}%) + exposed dp comm {:.3} s + optimizer {:.3} s",
        e.step_s,
        e.pipeline_s,
        100.0 * e.bubble_fraction,
        e.dp_comm_s,
        e.optimizer_s
    );
    if let Some(s) = slowest {
        out.push_str(&format!(
            "; slowest stage per micro-batch {:.1} ms, tp comm {:.1} ms of it",
            1e3 * s.micro_batch_s,
            1e3 * s.tp_comm_s
        ));
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let worst = e.stages.iter().max_by_key(|s| s.memory.total_bytes());
    if let Some(s) = worst {
        let m = &s.memory;
        out.push_str(&format!(
            "; peak {:.1} of {:.1} GiB (weights {:.1}, grads {:.1}, optimizer {:.1}, activations {:.1}, transient {:.1})",
            gib(e.peak_mem_bytes),
            gib(e.capacity_bytes),
            gib(m.params_bytes),
            gib(m.grads_bytes),
            gib(m.optimizer_bytes),
            gib(m.activations_bytes),
            gib(m.transient_bytes)
        ));
    }
    out
}

fn heavier(a: Recompute, b: Recompute) -> bool {
    let rank = |r: Recompute| match r {
        Recompute::None => 0,
        Recompute::Selective => 1,
        Recompute::Full => 2,
    };
    rank(a) > rank(b)
}

/// A short account of how `free` differs from `fixed`.
fn explain(fixed: &crate::search::Candidate, free: &crate::search::Candidate) -> String {
    let (a, b) = (&fixed.config, &free.config);
    let (ea, eb) = (&fixed.eval, &free.eval);
    let gib = |x: u64| x as f64 / (1u64 << 30) as f64;
    let mut parts = Vec::new();
    let ra = ea
        .stages
        .iter()
        .map(|s| s.recompute)
        .max_by_key(|r| *r as u8);
    let rb = eb
        .stages
        .iter()
        .map(|s| s.recompute)
        .max_by_key(|r| *r as u8);
    if let (Some(ra), Some(rb)) = (ra, rb) {
        if heavier(ra, rb) {
            parts.push(format!(
                "less recompute ({ra} -> {rb}): memory allows it ({:.1} of {:.1} GiB)",
                gib(eb.peak_mem_bytes),
                gib(eb.capacity_bytes)
            ));
        }
    }
    if a.zero != b.zero {
        parts.push(format!("ZeRO {} -> {}", a.zero, b.zero));
    }
    if (ea.bubble_fraction - eb.bubble_fraction).abs() > 0.01 {
        parts.push(format!(
            "pipeline bubble {:.0}% -> {:.0}% (pp {} -> {})",
            100.0 * ea.bubble_fraction,
            100.0 * eb.bubble_fraction,
            a.pp,
            b.pp
        ));
    }
    if a.tp != b.tp {
        let comm = |e: &crate::search::Evaluation| {
            e.stages.iter().map(|s| s.tp_comm_s).fold(0.0, f64::max)
        };
        parts.push(format!(
            "tp {} -> {} (tp comm per micro-batch {:.0} -> {:.0} ms)",
            a.tp,
            b.tp,
            1e3 * comm(ea),
            1e3 * comm(eb)
        ));
    }
    if a.micro_batch != b.micro_batch {
        parts.push(format!(
            "micro-batch {} -> {}",
            a.micro_batch, b.micro_batch
        ));
    }
    if (ea.dp_comm_s - eb.dp_comm_s).abs() > 1e-3 {
        parts.push(format!(
            "exposed dp comm {:.0} -> {:.0} ms",
            1e3 * ea.dp_comm_s,
            1e3 * eb.dp_comm_s
        ));
    }
    if parts.is_empty() {
        "same configuration".into()
    } else {
        parts.join("; ")
    }
}

/// FLOPs per step under the run's convention.
fn convention_flops(run: &Run, convention: Convention, n_params: f64) -> f64 {
    let s = run.seq_len as f64;
    let tokens = run.global_batch as f64 * s;
    match &run.model {
        ModelConfig::Gpt(c) => {
            let (l, h, v) = (c.n_layers as f64, c.hidden as f64, c.vocab as f64);
            match convention {
                Convention::Narayanan => {
                    96.0 * run.global_batch as f64
                        * s
                        * l
                        * h
                        * h
                        * (1.0 + s / (6.0 * h) + v / (16.0 * l * h))
                }
                Convention::HardwareRecompute => tokens * (8.0 * n_params + 16.0 * l * h * s),
                Convention::SixN => tokens * (6.0 * n_params + 12.0 * l * h * s),
            }
        }
        ModelConfig::Llama(c) => {
            let (l, h) = (c.n_layers as f64, (c.n_heads * c.head_dim) as f64);
            match convention {
                Convention::Narayanan => {
                    let v = c.vocab as f64;
                    96.0 * run.global_batch as f64
                        * s
                        * l
                        * h
                        * h
                        * (1.0 + s / (6.0 * h) + v / (16.0 * l * h))
                }
                Convention::HardwareRecompute => tokens * (8.0 * n_params + 16.0 * l * h * s),
                Convention::SixN => tokens * (6.0 * n_params + 12.0 * l * h * s),
            }
        }
    }
}

fn describe(p: &crate::search::Candidate) -> String {
    let c = &p.config;
    let mut rec: Vec<String> = p
        .eval
        .stages
        .iter()
        .map(|s| s.recompute.to_string())
        .collect();
    rec.dedup();
    format!(
        "tp{} pp{} dp{} mb{}x{} {} z{} {}{}",
        c.tp,
        c.pp,
        c.dp,
        c.micro_batch,
        c.n_micro,
        c.schedule,
        c.zero,
        rec.join("/"),
        if c.sp { " sp" } else { "" }
    )
}

/// The median of `values` (sorted in place; the mean of the middle two for
/// an even count), `None` when empty.
pub fn median(values: &mut [f64]) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some(0.5 * (values[n / 2 - 1] + values[n / 2])),
    }
}

/// The cluster preset for a runs file's `gpu` (hardware.csv's names; the
/// presets drop the form factor).
pub fn cluster_preset(gpu: &str) -> &str {
    match gpu {
        "h100-sxm" => "h100",
        other => other,
    }
}

/// The cluster a run is priced on: the hardware preset, with the memory
/// behaviour of the published stacks (Megatron-LM, DeepSpeed, FSDP: ZeRO-3
/// per layer, full recompute keeping layer inputs), the attention kernel
/// of the run's software stack (Narayanan et al. 2021 predates
/// FlashAttention: Megatron then materialised the scores) and its
/// communication overlap (NeMo: tp collectives behind the GEMMs, the
/// distributed optimizer's weight gather behind the next forward).
pub fn run_cluster(run: &Run, hardware: &Cluster) -> Cluster {
    let mut c = hardware.clone();
    c.memory_stack = crate::cost::MemoryStack::Reference;
    if run.nemo {
        c.tp_comm_overlaps_compute = true;
        c.param_gather_overlaps_forward = true;
    }
    if matches!(run.measured, Measured::Tflops(_, Convention::Narayanan)) {
        c.attention_kernel = crate::cost::AttentionKernel::Materialized;
    }
    c
}

/// Evaluates one run: its fixed configuration and (unless `free_search` is
/// false) the free search.
pub fn validate_run(
    run: &Run,
    hardware: &Cluster,
    registry: &Registry,
    free_search: bool,
) -> Result<RunResult, String> {
    let cluster = &run_cluster(run, hardware);
    let options = TraceOptions {
        batch: 1,
        seq_len: Some(run.seq_len),
        dtype: DType::Bf16,
        kv_copies: 1,
    };
    let graph = trace_model(&run.model, &options, registry).map_err(|e| e.to_string())?;
    let kv_graphs = crate::driver::trace_kv_graphs(
        &run.model,
        registry,
        run.n_gpus,
        None,
        run.seq_len,
        DType::Bf16,
    )
    .map_err(|e| format!("{e:#}"))?;
    let fixed = Constraints {
        tp: Some(run.tp),
        pp: Some(run.pp),
        dp: Some(run.dp),
        micro_batch: run.micro_batch,
        schedule: match run.virtual_stages {
            Some(v) if v >= 2 => Some(Schedule::Interleaved { chunks: v }),
            Some(_) if run.pp > 1 => Some(Schedule::OneFOneB),
            _ => None,
        },
        recompute: run.recompute,
        zero: Some(run.zero),
        sequence_parallel: Some(run.sequence_parallel && run.tp > 1),
        ..Constraints::default()
    };
    fn mk<'a>(
        graph: &'a crate::ir::Graph,
        registry: &'a Registry,
        run: &'a Run,
        cluster: &'a Cluster,
        c: &'a Constraints,
        kv_graphs: &'a std::collections::BTreeMap<u64, crate::ir::Graph>,
    ) -> SearchInput<'a> {
        SearchInput {
            graph,
            registry,
            model: &run.model,
            cluster,
            plan_gpus: run.n_gpus,
            runtime_gpus: run.n_gpus,
            global_batch: run.global_batch,
            constraints: c,
            top_k: 1,
            kv_graphs,
        }
    }
    // The published configuration ran, so it fits: evaluate it even where
    // the memory model disagrees, by lifting capacity (and say so).
    let fixed_plan = match search(&mk(&graph, registry, run, cluster, &fixed, &kv_graphs)) {
        Ok(r) => r.plans.into_iter().next(),
        Err(_) => None,
    };
    let (fixed_plan, note) = match fixed_plan {
        Some(p) => (p, String::new()),
        None => {
            let mut big = cluster.clone();
            big.memory_bytes *= 4;
            let r = search(&mk(&graph, registry, run, &big, &fixed, &kv_graphs))
                .map_err(|e| e.to_string())?;
            let p = r
                .plans
                .into_iter()
                .next()
                .ok_or_else(|| "no plan".to_string())?;
            (p, " (over memory model)".to_string())
        }
    };
    let free = Constraints::default();
    let free_plan = if free_search {
        search(&mk(&graph, registry, run, cluster, &free, &kv_graphs))
            .map_err(|e| e.to_string())?
            .plans
            .into_iter()
            .next()
            .ok_or_else(|| "no plan".to_string())?
    } else {
        fixed_plan.clone()
    };
    let per_gpu_s = fixed_plan.eval.step_s * f64::from(run.n_gpus);
    let predicted = match run.measured {
        Measured::TokensPerS(_) => (run.global_batch * run.seq_len) as f64 / per_gpu_s,
        Measured::Tflops(_, convention) => {
            convention_flops(run, convention, graph.n_params() as f64) / per_gpu_s / 1e12
        }
    };
    let measured = run.measured.value();
    Ok(RunResult {
        predicted,
        error: (predicted - measured) / measured,
        fixed_step_s: fixed_plan.eval.step_s,
        fixed_over_memory: !note.is_empty(),
        fixed_desc: format!("{}{note}", describe(&fixed_plan)),
        free_step_s: free_plan.eval.step_s,
        free_desc: describe(&free_plan),
        why: explain(&fixed_plan, &free_plan),
        breakdown: breakdown(&fixed_plan.eval),
    })
}
