//! The overhead benchmark's contestants, shared by `benches/overhead.rs`
//! (criterion) and `examples/overhead.rs` (the printed table): one SGD
//! training step of a Llama run through the runtime on one rank
//! ([`RuntimeModel`]: `LlamaStage::train_step` over one-rank `MeshComms`, the
//! code path generated programs take) and the same step written directly
//! against tch ([`DirectModel`]: plain tensors, one autograd graph, one
//! `backward`), either with plain tch ops ([`Ops::Tch`]) or with the
//! runtime's `ops` module ([`Ops::Runtime`]).
//!
//! All start from the same weights (the runtime's partition-independent
//! initialisation), compute the same math and update with the same SGD, so
//! [`check_same_loss`] can hold them to 1e-5 before anything is timed.
//! Nothing here touches the runtime's internals.

// The hand-written Llama (test support, not the runtime's API).
#[allow(dead_code)]
#[path = "../../tests/support/llama.rs"]
mod llama;

use autopart_runtime::comm::{Groups, MeshComms, SoloComm};
use autopart_runtime::data::Batch;
use autopart_runtime::exec::ParamSpec;
use autopart_runtime::ops::{self, Mask, OpError};
use llama::{LlamaConfig, LlamaStage, SeqParallel, TrainPlan, param_specs};
use tch::{Kind, Reduction, Tensor};

/// Seed of the weights, the same for both contestants.
pub const SEED: u64 = 7;
/// SGD learning rate.
pub const LR: f64 = 0.1;

/// A model size and the batch one step trains on.
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    pub name: &'static str,
    pub cfg: LlamaConfig,
    pub batch: i64,
    pub seq: i64,
}

impl Workload {
    /// llama-mini at the differential tests' batch, 4 × 16.
    pub fn mini() -> Self {
        Self {
            name: "llama-mini",
            cfg: LlamaConfig::mini(),
            batch: 4,
            seq: 16,
        }
    }

    /// llama-mini on a batch large enough that compute, not op dispatch, dominates.
    pub fn mini_large_batch() -> Self {
        Self {
            name: "llama-mini",
            cfg: LlamaConfig::mini(),
            batch: 32,
            seq: 64,
        }
    }

    /// A CPU-sized Llama: hidden 512, 8 layers, 8 heads, 4 kv heads, ffn 1376, vocab 1024.
    pub fn cpu512() -> Self {
        Self {
            name: "llama-512x8",
            cfg: LlamaConfig {
                n_layers: 8,
                hidden: 512,
                n_heads: 8,
                n_kv_heads: 4,
                ffn: 1376,
                vocab: 1024,
                ..LlamaConfig::mini()
            },
            batch: 4,
            seq: 128,
        }
    }

    /// The synthetic batch both contestants train on.
    pub fn batch(&self) -> Batch {
        Batch::synthetic(self.cfg.vocab, self.batch, self.seq, 100).expect("synthetic batch")
    }

    /// Number of parameters of the full model.
    pub fn n_params(&self) -> i64 {
        param_specs(&self.cfg, SeqParallel::Off)
            .iter()
            .map(|s| s.shape.iter().product::<i64>())
            .sum()
    }
}

fn solo() -> MeshComms<SoloComm> {
    MeshComms::solo()
}

/// `p -= LR * grad`, then zero the gradient.
fn sgd<'t>(params: impl Iterator<Item = &'t mut Tensor>) {
    tch::no_grad(|| {
        for p in params {
            let g = p.grad();
            assert!(g.defined(), "every parameter gets a gradient");
            let _ = p
                .f_sub_(&g.f_mul_scalar(LR).expect("lr * grad"))
                .expect("sgd update");
            p.zero_grad();
        }
    });
}

/// The model run through the runtime: a one-stage [`LlamaStage`] on one rank.
#[derive(Debug)]
pub struct RuntimeModel {
    comms: MeshComms<SoloComm>,
    stage: LlamaStage,
}

impl RuntimeModel {
    pub fn new(cfg: LlamaConfig) -> Self {
        let comms = solo();
        let stage =
            LlamaStage::new(cfg, TrainPlan::single(), comms.coord, SEED).expect("plan fits");
        Self { comms, stage }
    }

    /// Forward, backward (through the tape) and SGD; returns the loss.
    pub fn step(&mut self, batch: &Batch) -> f64 {
        let loss = self
            .stage
            .train_step(&Groups::of(&self.comms), batch)
            .expect("train step");
        sgd(self.stage.params_mut().iter_mut().map(|p| &mut p.tensor));
        loss
    }
}

struct Layer {
    ln1: Tensor,
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    ln2: Tensor,
    wg: Tensor,
    wu: Tensor,
    wd: Tensor,
}

/// Which op implementations [`DirectModel`] calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ops {
    /// Plain tch: fused embedding and cross-entropy, RoPE tables built once per step.
    Tch,
    /// `autopart_runtime::ops` (masked vocab-parallel embedding and
    /// cross-entropy over a one-rank group, RoPE tables per call), in one
    /// autograd graph without the tape: separates the ops' cost from the tape's.
    Runtime,
}

/// The same model written directly in tch.
pub struct DirectModel {
    cfg: LlamaConfig,
    ops: Ops,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    head: Tensor,
}

impl std::fmt::Debug for DirectModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectModel")
            .field("cfg", &self.cfg)
            .finish()
    }
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
    let var = x.square().mean_dim(-1, true, Kind::Float);
    x * (var + eps).rsqrt() * w
}

/// HF Llama's rotate-half RoPE with precomputed `cos`, `sin` `[1, l, 1, d]`.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let halves = x.chunk(2, -1);
    let rotated = Tensor::cat(&[&(-&halves[1]), &halves[0]], -1);
    x * cos + rotated * sin
}

impl DirectModel {
    /// The weights of [`RuntimeModel::new`]'s model, drawn the same way.
    pub fn new(cfg: LlamaConfig, ops: Ops) -> Self {
        let mut it = param_specs(&cfg, SeqParallel::Off)
            .into_iter()
            .map(|s: ParamSpec| s.init_full(SEED).expect("init").set_requires_grad(true));
        let mut next = || it.next().expect("as many specs as weights");
        let embed = next();
        let layers = (0..cfg.n_layers)
            .map(|_| Layer {
                ln1: next(),
                wq: next(),
                wk: next(),
                wv: next(),
                wo: next(),
                ln2: next(),
                wg: next(),
                wu: next(),
                wd: next(),
            })
            .collect();
        let norm = next();
        let head = next();
        Self {
            cfg,
            ops,
            embed,
            layers,
            norm,
            head,
        }
    }

    fn params_mut(&mut self) -> impl Iterator<Item = &mut Tensor> {
        let layers = self.layers.iter_mut().flat_map(|l| {
            [
                &mut l.ln1, &mut l.wq, &mut l.wk, &mut l.wv, &mut l.wo, &mut l.ln2, &mut l.wg,
                &mut l.wu, &mut l.wd,
            ]
        });
        std::iter::once(&mut self.embed)
            .chain(layers)
            .chain([&mut self.norm, &mut self.head])
    }

    /// The mean cross-entropy of `batch`, with grad.
    pub fn loss(&self, batch: &Batch) -> Tensor {
        match self.ops {
            Ops::Tch => self.loss_tch(batch),
            Ops::Runtime => self.loss_runtime_ops(batch).expect("runtime ops"),
        }
    }

    fn loss_runtime_ops(&self, batch: &Batch) -> Result<Tensor, OpError> {
        let cfg = &self.cfg;
        let (eps, theta) = (cfg.rms_eps, cfg.rope_theta);
        let mut x = ops::embedding(&batch.tokens, &self.embed, 0)?;
        for w in &self.layers {
            let h = ops::rms_norm(&x, &w.ln1, eps)?;
            let q = ops::split_heads(&ops::linear(&h, &w.wq)?, cfg.n_heads)?;
            let k = ops::split_heads(&ops::linear(&h, &w.wk)?, cfg.n_kv_heads)?;
            let v = ops::split_heads(&ops::linear(&h, &w.wv)?, cfg.n_kv_heads)?;
            let (q, k) = (ops::rope(&q, theta, 0)?, ops::rope(&k, theta, 0)?);
            let a = ops::merge_heads(&ops::attention(&q, &k, &v, Mask::Causal)?)?;
            x = ops::add(&x, &ops::linear(&a, &w.wo)?)?;
            let h = ops::rms_norm(&x, &w.ln2, eps)?;
            let act = ops::swiglu(&ops::linear(&h, &w.wg)?, &ops::linear(&h, &w.wu)?)?;
            x = ops::add(&x, &ops::linear(&act, &w.wd)?)?;
        }
        let logits = ops::linear(&ops::rms_norm(&x, &self.norm, eps)?, &self.head)?;
        let per_token = ops::vocab_parallel_cross_entropy(&logits, &batch.labels, 0, &SoloComm)?;
        ops::mean(&per_token, batch.labels.numel() as i64)
    }

    // `x = x + y` on purpose: tch's `+=` is an in-place add, which would
    // overwrite a tensor autograd saved for backward.
    #[allow(clippy::assign_op_pattern)]
    fn loss_tch(&self, batch: &Batch) -> Tensor {
        let cfg = &self.cfg;
        let (b, l) = (batch.tokens.size()[0], batch.tokens.size()[1]);
        let d = cfg.hidden / cfg.n_heads;
        let opts = (Kind::Float, tch::Device::Cpu);
        let inv_freq = Tensor::pow_scalar(
            cfg.rope_theta,
            &(Tensor::arange_start_step(0, d, 2, opts) / d as f64),
        )
        .reciprocal();
        let freqs = Tensor::arange(l, opts).outer(&inv_freq);
        let emb = Tensor::cat(&[&freqs, &freqs], -1).view([1, l, 1, d]);
        let (cos, sin) = (emb.cos(), emb.sin());

        let mut x = Tensor::embedding(&self.embed, &batch.tokens, -1, false, false);
        for w in &self.layers {
            let h = rms_norm(&x, &w.ln1, cfg.rms_eps);
            let q = rope(
                &h.linear::<Tensor>(&w.wq, None).view([b, l, cfg.n_heads, d]),
                &cos,
                &sin,
            );
            let k = rope(
                &h.linear::<Tensor>(&w.wk, None)
                    .view([b, l, cfg.n_kv_heads, d]),
                &cos,
                &sin,
            );
            let v = h
                .linear::<Tensor>(&w.wv, None)
                .view([b, l, cfg.n_kv_heads, d]);
            let a = Tensor::scaled_dot_product_attention::<Tensor>(
                &q.transpose(1, 2),
                &k.transpose(1, 2),
                &v.transpose(1, 2),
                None,
                0.0,
                true,
                None,
                cfg.n_heads != cfg.n_kv_heads,
            )
            .transpose(1, 2)
            .reshape([b, l, cfg.hidden]);
            x = x + a.linear::<Tensor>(&w.wo, None);
            let h = rms_norm(&x, &w.ln2, cfg.rms_eps);
            let act = h.linear::<Tensor>(&w.wg, None).silu() * h.linear::<Tensor>(&w.wu, None);
            x = x + act.linear::<Tensor>(&w.wd, None);
        }
        let logits = rms_norm(&x, &self.norm, cfg.rms_eps).linear::<Tensor>(&self.head, None);
        logits.view([-1, cfg.vocab]).cross_entropy_loss::<Tensor>(
            &batch.labels.view([-1]),
            None,
            Reduction::Mean,
            -100,
            0.0,
        )
    }

    /// Forward, backward and SGD; returns the loss.
    pub fn step(&mut self, batch: &Batch) -> f64 {
        let loss = self.loss(batch);
        loss.backward();
        let value = loss.double_value(&[]);
        sgd(self.params_mut());
        value
    }
}

/// Runs two steps of both contestants from the same weights and panics
/// unless their losses agree to 1e-5 relative: the first checks the forward
/// pass, the second the gradients and the update. Returns the losses.
pub fn check_same_loss(w: &Workload) -> [(f64, f64); 2] {
    let batch = w.batch();
    let mut rt = RuntimeModel::new(w.cfg);
    let mut direct = DirectModel::new(w.cfg, Ops::Tch);
    let mut direct_ops = DirectModel::new(w.cfg, Ops::Runtime);
    [0, 1].map(|step| {
        let (a, b, c) = (rt.step(&batch), direct.step(&batch), direct_ops.step(&batch));
        for (what, x) in [("direct", b), ("direct with the runtime's ops", c)] {
            let rel = (a - x).abs() / x.abs();
            assert!(
                rel <= 1e-5,
                "{}: step {step} loss {a} through the runtime vs {x} {what} (relative error {rel:e})",
                w.name
            );
        }
        (a, b)
    })
}
