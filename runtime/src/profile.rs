//! The machine profiler behind `autopart profile`: the `autopart-profile`
//! binary, started under the launcher like a plan binary.
//!
//! It times, with the runtime's own op implementations and communicators,
//! what a training step spends its time on: `linear` at the model
//! families' shapes (tokens × hidden × hidden, × FFN, FFN × hidden) in f32,
//! bf16 and f16; the attention op (causal, grouped-query) at several
//! sequence lengths; the bandwidth-bound ops (add, SwiGLU, RMSNorm, RoPE);
//! chains of the same ops on tiny tensors (an op's fixed cost: dispatch and
//! autograd); and every collective the runtime issues over the world, and,
//! when the launch spans nodes, over one node and across nodes. Compute is
//! timed on every rank at once, as training runs (ranks share cores and
//! memory bandwidth), forward alone and forward plus backward (the
//! backward seeded as the runtime seeds it, `sum(y · g)`).
//!
//! Rank 0 writes the samples as [`autopart_vocab::profile::Raw`] JSON; the
//! compiler fits a cluster file to them with its own formulas. Progress goes
//! to stderr on rank 0.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use tch::{Kind, Tensor};

use crate::comm::{CommError, Communicator, MpiComm};
use crate::ops::{self, Mask, OpError};
use autopart_vocab::launcher::Launcher;
use autopart_vocab::profile::{
    CollectiveKind, CollectiveSample, ComputeClass, ComputeSample, FORMAT_VERSION, Raw,
};

/// Flags of the `autopart-profile` binary (`autopart profile` passes them).
#[derive(Debug, Parser)]
#[command(
    name = "autopart-profile",
    about = "Measure this machine for autopart's cost model"
)]
pub struct Options {
    /// Where rank 0 writes the raw samples (JSON).
    #[arg(long, value_name = "FILE")]
    pub raw: PathBuf,
    /// Seconds each sample is repeated for at least (the median is kept).
    #[arg(long, value_name = "S", default_value_t = 0.25)]
    pub budget_s: f64,
    /// Fewer shapes and sizes (about a quarter of the time).
    #[arg(long)]
    pub quick: bool,
    /// Torch threads per process (as `autopart run`'s --threads).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub threads: i32,
    /// Largest collective message in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 64)]
    pub max_mib: u64,
}

#[derive(Debug, thiserror::Error)]
enum ProfileError {
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    #[error(transparent)]
    Op(#[from] OpError),
    #[error("optimizer sample: {0}")]
    Exec(#[from] crate::exec::ExecError),
    #[error("optimizer sample: {0}")]
    Optim(#[from] crate::optim::OptimError),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Flags(String),
}

/// The binary's `main`.
pub fn main() -> ExitCode {
    crate::malloc::pin_mmap_threshold();
    let opts = match Options::try_parse() {
        Ok(o) => o,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let world = match MpiComm::init_world() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match run(&opts, &world) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: rank {}: {e}", world.rank());
            ExitCode::FAILURE
        }
    }
}

fn run(opts: &Options, world: &MpiComm) -> Result<(), ProfileError> {
    if !(opts.budget_s.is_finite() && opts.budget_s > 0.0 && opts.budget_s <= 60.0) {
        return Err(ProfileError::Flags(format!(
            "--budget-s must be in (0, 60], got {}",
            opts.budget_s
        )));
    }
    if opts.threads < 1 || opts.max_mib == 0 || opts.max_mib > 4096 {
        return Err(ProfileError::Flags(
            "--threads must be >= 1 and --max-mib in 1..=4096".into(),
        ));
    }
    tch::set_num_threads(opts.threads);
    tch::manual_seed(0);
    let started = Instant::now();
    let started_unix_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let rank0 = world.rank() == 0;
    let hosts = host_names(world)?;
    let mut p = Profiler {
        budget: opts.budget_s,
        world,
        rank0,
        started,
    };
    let compute = p.compute(opts.quick)?;
    let collectives = p.collectives(&hosts, opts.quick, opts.max_mib << 20)?;
    if rank0 {
        let raw = Raw {
            format_version: FORMAT_VERSION,
            started_unix_s,
            seconds: started.elapsed().as_secs_f64(),
            ranks: world.size() as u32,
            hosts,
            threads: opts.threads as u32,
            device: "cpu".into(),
            launcher: Launcher::from_env().size_var.map(str::to_owned),
            host_memory_bytes: host_memory(),
            budget_s: opts.budget_s,
            compute,
            collectives,
        };
        let text =
            serde_json::to_string_pretty(&raw).map_err(|e| ProfileError::Flags(e.to_string()))?;
        autopart_vocab::fs::write_atomic(&opts.raw, text.as_bytes()).map_err(|source| {
            ProfileError::Write {
                path: opts.raw.clone(),
                source,
            }
        })?;
    }
    world.barrier()?;
    Ok(())
}

/// Every rank's host name, by rank (gathered as 64-byte records).
fn host_names(world: &MpiComm) -> Result<Vec<String>, ProfileError> {
    const LEN: usize = 64;
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into());
    let mut bytes = [0u8; LEN];
    for (b, c) in bytes.iter_mut().zip(name.bytes()) {
        *b = c;
    }
    let all = world.all_gather(&Tensor::from_slice(&bytes), 0)?;
    let all: Vec<u8> = Vec::<u8>::try_from(&all)?;
    Ok(all
        .chunks(LEN)
        .map(|c| {
            let end = c.iter().position(|&b| b == 0).unwrap_or(c.len());
            String::from_utf8_lossy(&c[..end]).into_owned()
        })
        .collect())
}

/// `MemTotal` of this host.
fn host_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

struct Profiler<'a> {
    budget: f64,
    world: &'a MpiComm,
    rank0: bool,
    started: Instant,
}

/// One compute sample before the times are combined over ranks.
struct Pending {
    class: ComputeClass,
    op: String,
    name: String,
    dtype: Kind,
    flops: f64,
    bytes: f64,
    ops: u32,
    fwd_s: f64,
    fwd_bwd_s: f64,
}

fn dtype_name(k: Kind) -> &'static str {
    match k {
        Kind::BFloat16 => "bf16",
        Kind::Half => "f16",
        _ => "f32",
    }
}

fn elem_bytes(k: Kind) -> f64 {
    match k {
        Kind::BFloat16 | Kind::Half => 2.0,
        _ => 4.0,
    }
}

fn numel(shape: &[i64]) -> f64 {
    shape.iter().map(|&d| d as f64).product()
}

/// A leaf with grad, N(0, 1) scaled by `scale`, in `kind`.
fn leaf(shape: &[i64], kind: Kind, scale: f64) -> Result<Tensor, tch::TchError> {
    Ok(Tensor::f_randn(shape, (Kind::Float, tch::Device::Cpu))?
        .f_mul_scalar(scale)?
        .f_to_kind(kind)?
        .set_requires_grad(true))
}

impl Profiler<'_> {
    fn say(&self, msg: &str) {
        if self.rank0 {
            eprintln!(
                "[profile {:>5.1}s] {msg}",
                self.started.elapsed().as_secs_f64()
            );
        }
    }

    /// Median seconds of `f` over at least three runs and `budget` seconds,
    /// after one warm-up run.
    fn time(&self, mut f: impl FnMut() -> Result<(), ProfileError>) -> Result<f64, ProfileError> {
        f()?;
        let start = Instant::now();
        let mut times = Vec::new();
        while times.len() < 3
            || (start.elapsed().as_secs_f64() < self.budget && times.len() < 10_000)
        {
            let t = Instant::now();
            f()?;
            times.push(t.elapsed().as_secs_f64());
        }
        Ok(median(times))
    }

    /// Times `forward` alone (without grad) and forward plus backward seeded
    /// with `sum(y · g)` for a fixed random `g`.
    fn fwd_bwd(
        &self,
        forward: &dyn Fn() -> Result<Tensor, ProfileError>,
    ) -> Result<(f64, f64), ProfileError> {
        let fwd_s = self.time(|| {
            let _g = tch::no_grad_guard();
            forward().map(drop)
        })?;
        let probe = forward()?;
        let seed = Tensor::f_randn_like(&probe)?;
        drop(probe);
        let fwd_bwd_s = self.time(|| {
            let y = forward()?;
            y.f_mul(&seed)?.f_sum(y.kind())?.f_backward()?;
            Ok(())
        })?;
        Ok((fwd_s, fwd_bwd_s))
    }

    fn compute(&mut self, quick: bool) -> Result<Vec<ComputeSample>, ProfileError> {
        let mut pending: Vec<Pending> = Vec::new();
        // From a small model's 64 (whose GEMMs run at half the rate of a
        // 1024-wide one on a CPU: the fit's rate curve) to 2048.
        let hiddens: &[i64] = if quick {
            &[64, 256, 1024]
        } else {
            &[64, 128, 256, 512, 1024, 2048]
        };
        let tokens: i64 = 512;
        // Matmuls: tokens x hidden -> hidden, -> FFN (2.75x, Llama's ratio
        // rounded to 64), FFN -> hidden; f32 everywhere, the half types at
        // the middle sizes.
        for &kind in &[Kind::Float, Kind::BFloat16, Kind::Half] {
            for &d in hiddens {
                if kind != Kind::Float && !(512..=1024).contains(&d) {
                    continue;
                }
                let f = (d * 11 / 4 + 63) / 64 * 64;
                for (k, n) in [(d, d), (d, f), (f, d)] {
                    let x = leaf(&[tokens, k], kind, 1.0)?;
                    let w = leaf(&[n, k], kind, (k as f64).powf(-0.5))?;
                    let (fwd_s, fwd_bwd_s) = self.fwd_bwd(&|| Ok(ops::linear(&x, &w)?))?;
                    pending.push(Pending {
                        class: ComputeClass::Matmul,
                        op: "linear".into(),
                        name: format!("linear {tokens}x{k}x{n} {}", dtype_name(kind)),
                        dtype: kind,
                        flops: 2.0 * (tokens * k * n) as f64,
                        bytes: elem_bytes(kind) * ((tokens * k + n * k + tokens * n) as f64),
                        ops: 1,
                        fwd_s,
                        fwd_bwd_s,
                    });
                }
            }
            self.say(&format!("matmul {}: done", dtype_name(kind)));
        }
        // Attention: 16 query heads of 64 on 8 kv heads, causal.
        let seqs: &[i64] = if quick {
            &[256, 1024]
        } else {
            &[128, 256, 512, 1024]
        };
        for &kind in &[Kind::Float, Kind::BFloat16, Kind::Half] {
            for &l in seqs {
                if kind != Kind::Float && l != 512 {
                    continue;
                }
                let (b, h, g, dh) = (1i64, 16i64, 8i64, 64i64);
                let q = leaf(&[b, l, h, dh], kind, 1.0)?;
                let k = leaf(&[b, l, g, dh], kind, 1.0)?;
                let v = leaf(&[b, l, g, dh], kind, 1.0)?;
                let (fwd_s, fwd_bwd_s) =
                    self.fwd_bwd(&|| Ok(ops::attention(&q, &k, &v, Mask::Causal)?))?;
                pending.push(Pending {
                    class: ComputeClass::Attention,
                    op: "attention".into(),
                    name: format!(
                        "attention b{b} l{l} h{h} g{g} d{dh} causal {}",
                        dtype_name(kind)
                    ),
                    dtype: kind,
                    flops: 4.0 * (b * l * l * h * dh) as f64,
                    bytes: elem_bytes(kind)
                        * (2.0 * numel(&[b, l, h, dh]) + 2.0 * numel(&[b, l, g, dh])),
                    ops: 1,
                    fwd_s,
                    fwd_bwd_s,
                });
            }
        }
        self.say("attention: done");
        // Bandwidth-bound ops at tokens x hidden (and the vocabulary-sized
        // ones at tokens x 8 hidden); bytes as the annotation files' shapes
        // give them: every input and output.
        let sizes: &[i64] = if quick {
            &[128, 512, 2048]
        } else {
            &[64, 128, 256, 512, 1024, 2048, 4096]
        };
        for &kind in &[Kind::Float, Kind::BFloat16] {
            for &d in sizes {
                if kind != Kind::Float && d != 2048 {
                    continue;
                }
                let shape = [1, tokens, d];
                let e = numel(&shape);
                let eb = elem_bytes(kind);
                let vocab = 8 * d;
                let a = leaf(&shape, kind, 1.0)?;
                let b = leaf(&shape, kind, 1.0)?;
                let w = leaf(&[d], kind, 1.0)?;
                let bias = leaf(&[d], kind, 1.0)?;
                let heads = leaf(&[1, tokens, d / 64, 64], kind, 1.0)?;
                let logits = leaf(&[1, tokens, vocab], kind, 1.0)?;
                let table = leaf(&[vocab, d], kind, 1.0)?;
                let ids = Tensor::f_randint(vocab, [1, tokens], (Kind::Int64, tch::Device::Cpu))?;
                let v = tokens as f64 * vocab as f64;
                type Op<'t> = (
                    &'static str,
                    f64,
                    f64,
                    Box<dyn Fn() -> Result<Tensor, ProfileError> + 't>,
                );
                let cases: Vec<Op<'_>> = vec![
                    ("add", e, 3.0 * e * eb, Box::new(|| Ok(ops::add(&a, &b)?))),
                    (
                        "swiglu",
                        4.0 * e,
                        3.0 * e * eb,
                        Box::new(|| Ok(ops::swiglu(&a, &b)?)),
                    ),
                    (
                        "gelu",
                        8.0 * e,
                        2.0 * e * eb,
                        Box::new(|| Ok(ops::gelu(&a)?)),
                    ),
                    (
                        "rms_norm",
                        4.0 * e,
                        2.0 * e * eb + d as f64 * eb,
                        Box::new(|| Ok(ops::rms_norm(&a, &w, 1e-5)?)),
                    ),
                    (
                        "layer_norm",
                        5.0 * e,
                        2.0 * e * eb + 2.0 * d as f64 * eb,
                        Box::new(|| Ok(ops::layer_norm(&a, &w, &bias, 1e-5)?)),
                    ),
                    (
                        "rope",
                        6.0 * e,
                        2.0 * e * eb,
                        Box::new(|| Ok(ops::rope(&heads, 1e4, 0)?)),
                    ),
                    (
                        "embedding",
                        0.0,
                        (v / tokens as f64) * d as f64 * eb + e * eb + tokens as f64 * 8.0,
                        Box::new(|| Ok(ops::embedding(&ids, &table, 0)?)),
                    ),
                    (
                        "cross_entropy",
                        4.0 * v,
                        v * eb + tokens as f64 * 12.0,
                        Box::new(|| Ok(ops::cross_entropy(&logits, &ids)?)),
                    ),
                ];
                for (name, flops, bytes, op) in &cases {
                    let (fwd_s, fwd_bwd_s) = self.fwd_bwd(op.as_ref())?;
                    pending.push(Pending {
                        class: ComputeClass::MemoryBound,
                        op: (*name).to_owned(),
                        name: format!("{name} {tokens}x{d} {}", dtype_name(kind)),
                        dtype: kind,
                        flops: *flops,
                        bytes: *bytes,
                        ops: 1,
                        fwd_s,
                        fwd_bwd_s,
                    });
                }
            }
        }
        self.say("bandwidth-bound ops: done");
        // Fixed cost: a layer's op mix on tiny tensors, 16 times over.
        {
            let (t, d) = (4i64, 64i64);
            let x = leaf(&[1, t, d], Kind::Float, 1.0)?;
            let w = leaf(&[d, d], Kind::Float, 0.125)?;
            let nw = leaf(&[d], Kind::Float, 1.0)?;
            const REPEATS: u32 = 16;
            // Per repeat: rms_norm, 3 linears, rope x2, attention, linear,
            // add, rms_norm, 2 linears, swiglu, linear, add = 15 ops.
            const OPS: u32 = 15;
            let chain = || -> Result<Tensor, ProfileError> {
                let mut h = x.shallow_clone();
                for _ in 0..REPEATS {
                    let n = ops::rms_norm(&h, &nw, 1e-5)?;
                    let heads = |t: &Tensor| t.f_view([1, t.size()[1], 2, 32]);
                    let q = ops::rope(&heads(&ops::linear(&n, &w)?)?, 1e4, 0)?;
                    let k = ops::rope(&heads(&ops::linear(&n, &w)?)?, 1e4, 0)?;
                    let v = heads(&ops::linear(&n, &w)?)?;
                    let a = ops::attention(&q, &k, &v, Mask::Causal)?.f_view([1, t, d])?;
                    let h1 = ops::add(&h, &ops::linear(&a, &w)?)?;
                    let n2 = ops::rms_norm(&h1, &nw, 1e-5)?;
                    let m = ops::swiglu(&ops::linear(&n2, &w)?, &ops::linear(&n2, &w)?)?;
                    h = ops::add(&h1, &ops::linear(&m, &w)?)?;
                }
                Ok(h)
            };
            let (fwd_s, fwd_bwd_s) = self.fwd_bwd(&chain)?;
            pending.push(Pending {
                class: ComputeClass::Overhead,
                op: "layers".into(),
                name: format!("{REPEATS} tiny llama layers ({OPS} ops each) on 1x{t}x{d}"),
                dtype: Kind::Float,
                flops: 0.0,
                bytes: 0.0,
                ops: REPEATS * OPS,
                fwd_s,
                fwd_bwd_s,
            });
        }
        self.say("per-op fixed cost: done");
        // The optimizer step, as training runs it (the runtime's own
        // optimizer: clipping by the global norm, AdamW in f32, clearing the
        // gradients) over one Llama layer's parameters, f32, no ZeRO.
        let dims: &[i64] = if quick { &[1024] } else { &[1024, 2048] };
        for &d in dims {
            let f = (d * 11 / 4 + 63) / 64 * 64;
            let t = self.optimizer_step(&[
                &[d, d],
                &[d, d],
                &[d, d],
                &[d, d],
                &[f, d],
                &[f, d],
                &[d, f],
                &[d],
                &[d],
            ])?;
            let numel = (4 * d * d + 3 * f * d + 2 * d) as f64;
            pending.push(Pending {
                class: ComputeClass::Optimizer,
                op: "adamw".into(),
                name: format!(
                    "optimizer step over a {d}-wide layer's 9 tensors ({numel} parameters)"
                ),
                dtype: Kind::Float,
                flops: 0.0,
                bytes: 4.0 * numel,
                ops: 9,
                fwd_s: t,
                fwd_bwd_s: t,
            });
        }
        self.say("optimizer step: done");
        // The slowest rank's median for each sample.
        let mine: Vec<f64> = pending
            .iter()
            .flat_map(|p| [p.fwd_s, p.fwd_bwd_s])
            .collect();
        let worst = self.max_over_ranks(&mine)?;
        Ok(pending
            .into_iter()
            .zip(worst.chunks(2))
            .map(|(p, t)| ComputeSample {
                class: p.class,
                op: p.op,
                name: p.name,
                dtype: dtype_name(p.dtype).to_owned(),
                flops: p.flops,
                bytes: p.bytes,
                ops: p.ops,
                fwd_s: t[0],
                fwd_bwd_s: t[1],
            })
            .collect())
    }

    /// Median seconds of the runtime's optimizer step (ZeRO off, one rank,
    /// clipping at 1) over f32 parameters of `shapes` whose gradients the
    /// untimed part of each run fills.
    fn optimizer_step(&self, shapes: &[&[i64]]) -> Result<f64, ProfileError> {
        use crate::comm::{Groups, MeshComms};
        use crate::exec::{Init, ParamSpec};
        use crate::optim::{AdamW, LrSchedule};
        use crate::zero::{DpOptimizer, OptimConfig};
        let solo = MeshComms::solo();
        let g = Groups::of(&solo);
        let mut params = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                ParamSpec::replicated(i, s, Init::Normal { std: 0.02 }).materialise(0, 0, 1)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let lr = LrSchedule {
            peak_lr: 1e-4,
            warmup_steps: 0,
            total_steps: 1_000_000,
            min_lr: 1e-5,
        };
        let cfg = OptimConfig {
            max_norm: Some(1.0),
            ..OptimConfig::new(AdamW::default(), lr)
        };
        let mut opt = DpOptimizer::new(cfg, &mut params, &g)?;
        let mut times = Vec::new();
        let start = Instant::now();
        while times.len() < 4 || (start.elapsed().as_secs_f64() < self.budget && times.len() < 1000)
        {
            for p in &params {
                p.tensor.f_sum(Kind::Float)?.f_backward()?;
            }
            let t = Instant::now();
            opt.step(&mut params, &g)?;
            times.push(t.elapsed().as_secs_f64());
        }
        // The first step allocates the moments' pages.
        times.remove(0);
        Ok(median(times))
    }

    /// The element-wise maximum of every rank's `values`.
    fn max_over_ranks(&self, values: &[f64]) -> Result<Vec<f64>, ProfileError> {
        let all = self.world.all_gather(&Tensor::from_slice(values), 0)?;
        let all = all.f_view([self.world.size() as i64, values.len() as i64])?;
        let (max, _) = all.f_max_dim(0, false)?;
        Ok(Vec::<f64>::try_from(&max)?)
    }

    fn collectives(
        &mut self,
        hosts: &[String],
        quick: bool,
        max_bytes: u64,
    ) -> Result<Vec<CollectiveSample>, ProfileError> {
        let world = self.world;
        let n = world.size();
        let mut samples: Vec<(CollectiveKind, u32, u32, u32, f64, f64)> = Vec::new();
        if n < 2 {
            self.say("one process: no collectives to time");
            return Ok(Vec::new());
        }
        // Ranks grouped by host: a node's index and this rank's place on it.
        let mut nodes: Vec<&str> = Vec::new();
        for h in hosts {
            if !nodes.contains(&h.as_str()) {
                nodes.push(h);
            }
        }
        let me = world.rank();
        let node_of = |r: usize| nodes.iter().position(|h| *h == hosts[r]).unwrap_or(0);
        let local_index = |r: usize| (0..r).filter(|&q| node_of(q) == node_of(r)).count();
        let per_node: Vec<usize> = (0..nodes.len())
            .map(|k| (0..n).filter(|&r| node_of(r) == k).count())
            .collect();
        let regular = per_node.iter().all(|&c| c == per_node[0]);
        // Groups: the world; with several nodes also one node and one rank
        // per node. Every rank takes part in every split.
        let mut groups: Vec<(String, MpiComm, u32, u32)> = Vec::new();
        groups.push((
            "world".into(),
            world.duplicate(),
            nodes.len() as u32,
            if regular { per_node[0] as u32 } else { 1 },
        ));
        if nodes.len() > 1 {
            let intra = world.split(node_of(me) as u32, me as i32)?;
            let inter = world.split(local_index(me) as u32, me as i32)?;
            if per_node[node_of(me)] > 1 {
                groups.push(("one node".into(), intra, 1, per_node[node_of(me)] as u32));
            }
            groups.push(("one rank per node".into(), inter, nodes.len() as u32, 1));
        }
        let step = if quick { 16 } else { 4 };
        let mut sizes = Vec::new();
        let mut s: u64 = 4 << 10;
        while s <= max_bytes {
            sizes.push(s);
            s *= step;
        }
        for (label, comm, g_nodes, rpn) in &groups {
            let size = comm.size();
            for kind in CollectiveKind::ALL {
                for &bytes in &sizes {
                    // Elements of f32, a multiple of the group size.
                    let elems = ((bytes / 4) as i64 / size as i64).max(1) * size as i64;
                    let full = Tensor::f_ones([elems], (Kind::Float, tch::Device::Cpu))?;
                    let shard =
                        Tensor::f_ones([elems / size as i64], (Kind::Float, tch::Device::Cpu))?;
                    let r = comm.rank();
                    let (next, prev) = ((r + 1) % size, (r + size - 1) % size);
                    let op = || -> Result<(), ProfileError> {
                        match kind {
                            CollectiveKind::AllReduce => drop(comm.all_reduce(&full)?),
                            CollectiveKind::AllGather => drop(comm.all_gather(&shard, 0)?),
                            CollectiveKind::ReduceScatter => drop(comm.reduce_scatter(&full, 0)?),
                            CollectiveKind::AllToAll => drop(comm.all_to_all(&full, 0, 0)?),
                            CollectiveKind::Broadcast => drop(comm.broadcast(&full, 0)?),
                            CollectiveKind::SendRecv => {
                                drop(comm.send_recv(&full, next, &[elems], Kind::Float, prev)?)
                            }
                        }
                        Ok(())
                    };
                    // Repetitions agreed on by every rank (rank 0's count),
                    // each started together after a barrier.
                    op()?;
                    let probe = {
                        comm.barrier()?;
                        let t = Instant::now();
                        op()?;
                        t.elapsed().as_secs_f64()
                    };
                    let reps_mine = ((self.budget / probe.max(1e-7)) as i64).clamp(3, 200);
                    let reps = comm.broadcast(&Tensor::from_slice(&[reps_mine]), 0)?;
                    let reps = reps.f_int64_value(&[0])?;
                    let mut times = Vec::new();
                    for _ in 0..reps {
                        comm.barrier()?;
                        let t = Instant::now();
                        op()?;
                        times.push(t.elapsed().as_secs_f64());
                    }
                    samples.push((
                        kind,
                        size as u32,
                        *g_nodes,
                        *rpn,
                        (elems * 4) as f64,
                        median(times),
                    ));
                }
                self.say(&format!(
                    "{} over {label} ({size} ranks): done",
                    kind.name()
                ));
            }
        }
        let mine: Vec<f64> = samples.iter().map(|s| s.5).collect();
        let worst = self.max_over_ranks(&mine)?;
        Ok(samples
            .into_iter()
            .zip(worst)
            .map(
                |((kind, size, nodes, ranks_per_node, bytes, _), seconds)| CollectiveSample {
                    kind,
                    size,
                    nodes,
                    ranks_per_node,
                    bytes,
                    seconds,
                },
            )
            .collect())
    }
}
