//! Llama (RMSNorm, RoPE, GQA attention, SwiGLU, untied head) as a program
//! partitioned over a (tp, dp, pp) mesh, parametrised by a [`TrainPlan`]:
//!
//! - tp: Megatron splits. q/k/v/gate/up are column-parallel (output dim),
//!   o/down row-parallel (input dim), attention runs on this rank's kv-head
//!   groups, the embedding and the head are vocab-parallel and the loss is
//!   vocab-parallel cross-entropy. Without sequence parallelism the norms run
//!   replicated between `Copy` (f) and `AllReduce` (g) adapters; with it the
//!   residual stream is split along the sequence between `GatherForShards`
//!   and `ReduceScatter` adapters, and the norm weights' gradients are partial
//!   sums completed over tp.
//! - dp: the batch is split; gradients are summed over dp (each rank's loss is
//!   already divided by the global token count, so the sum is the average),
//!   per parameter by [`LlamaStage::train_step`] or in buckets (and ZeRO
//!   shards) by the [`DpOptimizer`] of [`LlamaStage::train_step_with`].
//! - pp: layers are split into contiguous stages; the first stage embeds, the
//!   last one normalises, projects and computes the loss; activations and
//!   their gradients travel over the pp group in the order of the
//!   [`Schedule`]. Under [`Schedule::Interleaved`] with `v` chunks the layers
//!   are split into `pp * v` model chunks assigned round-robin (stage `s`
//!   holds chunks `s`, `s + pp`, …) and activations go around the pp ring.
//!
//! The loss is the mean over every token of the global batch. The program
//! owns no optimizer: [`LlamaStage::train_step`] leaves complete gradients in
//! the parameters' `.grad()`, and [`LlamaStage::train_step_with`] hands them
//! to a [`DpOptimizer`] (bucketed dp averaging, clipping, AdamW, ZeRO).

use crate::comm::Communicator;
pub use crate::comm::Groups;
use crate::exec::{
    Adapter, ExecError, Init, Keep, Param, ParamSpec, Tape, TpGrad, ValueId, complete_tp_grads,
    sync_grads,
};
use crate::mesh::{Coord, Mesh};
use crate::ops::{self, Mask};
use crate::schedule::{self, Action, ChunkAction, Schedule, Work};
use crate::zero::{DpOptimizer, StepStats};
use std::collections::HashMap;
use tch::{Kind, Tensor};

/// Model hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LlamaConfig {
    pub n_layers: usize,
    pub hidden: i64,
    pub n_heads: i64,
    pub n_kv_heads: i64,
    pub ffn: i64,
    pub vocab: i64,
    pub rms_eps: f64,
    pub rope_theta: f64,
}

impl LlamaConfig {
    /// llama-mini: 4 layers, hidden 64, 4 heads of 16, 2 kv heads, ffn 176, vocab 256.
    pub fn mini() -> Self {
        Self {
            n_layers: 4,
            hidden: 64,
            n_heads: 4,
            n_kv_heads: 2,
            ffn: 176,
            vocab: 256,
            rms_eps: 1e-5,
            rope_theta: 10000.0,
        }
    }

    fn head_dim(&self) -> i64 {
        self.hidden / self.n_heads
    }
}

/// Whether the residual stream is split along the sequence over tp.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SeqParallel {
    Off,
    On,
}

/// Which segments are rerun in backward instead of keeping activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Recompute {
    None,
    /// The core attention only (Megatron's selective recompute).
    Selective,
    /// Every segment of every layer.
    Full,
}

/// How one training step is partitioned and ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TrainPlan {
    pub mesh: Mesh,
    pub seq_parallel: SeqParallel,
    pub recompute: Recompute,
    pub schedule: Schedule,
    pub micro_batches: usize,
}

impl TrainPlan {
    /// The single-device plan: the reference every partition must match.
    pub fn single() -> Self {
        Self {
            mesh: Mesh {
                tp: 1,
                dp: 1,
                pp: 1,
            },
            seq_parallel: SeqParallel::Off,
            recompute: Recompute::None,
            schedule: Schedule::GPipe,
            micro_batches: 1,
        }
    }
}

/// A global batch: `tokens` and `labels`, both `[batch, seq]` int64.
#[derive(Debug)]
pub struct Batch {
    pub tokens: Tensor,
    pub labels: Tensor,
}

impl Batch {
    /// Uniform random tokens and labels drawn from `seed`, the same on every rank.
    pub fn synthetic(vocab: i64, batch: i64, seq: i64, seed: i64) -> Result<Self, ExecError> {
        let opts = (Kind::Int64, tch::Device::Cpu);
        tch::manual_seed(seed);
        let tokens = Tensor::f_randint(vocab, [batch, seq], opts)?;
        let labels = Tensor::f_randint(vocab, [batch, seq], opts)?;
        Ok(Self { tokens, labels })
    }
}

/// Every parameter of the full model (HF Llama names), with its tp split.
pub fn param_specs(cfg: &LlamaConfig, sp: SeqParallel) -> Vec<ParamSpec> {
    let normal = Init::Normal { std: 0.02 };
    let norm_grad = match sp {
        SeqParallel::On => TpGrad::Partial,
        SeqParallel::Off => TpGrad::Complete,
    };
    let spec = |name: String, shape: Vec<i64>, init, tp_dim, tp_grad| ParamSpec {
        name,
        shape,
        init,
        tp_dim,
        tp_grad,
    };
    let (h, d) = (cfg.hidden, cfg.head_dim());
    let mut out = vec![spec(
        "model.embed_tokens.weight".into(),
        vec![cfg.vocab, h],
        normal,
        Some(0),
        TpGrad::Complete,
    )];
    for i in 0..cfg.n_layers {
        let p = |n: &str| format!("model.layers.{i}.{n}");
        let c = TpGrad::Complete;
        out.extend([
            spec(
                p("input_layernorm.weight"),
                vec![h],
                Init::Ones,
                None,
                norm_grad,
            ),
            spec(
                p("self_attn.q_proj.weight"),
                vec![cfg.n_heads * d, h],
                normal,
                Some(0),
                c,
            ),
            spec(
                p("self_attn.k_proj.weight"),
                vec![cfg.n_kv_heads * d, h],
                normal,
                Some(0),
                c,
            ),
            spec(
                p("self_attn.v_proj.weight"),
                vec![cfg.n_kv_heads * d, h],
                normal,
                Some(0),
                c,
            ),
            spec(
                p("self_attn.o_proj.weight"),
                vec![h, cfg.n_heads * d],
                normal,
                Some(1),
                c,
            ),
            spec(
                p("post_attention_layernorm.weight"),
                vec![h],
                Init::Ones,
                None,
                norm_grad,
            ),
            spec(
                p("mlp.gate_proj.weight"),
                vec![cfg.ffn, h],
                normal,
                Some(0),
                c,
            ),
            spec(
                p("mlp.up_proj.weight"),
                vec![cfg.ffn, h],
                normal,
                Some(0),
                c,
            ),
            spec(
                p("mlp.down_proj.weight"),
                vec![h, cfg.ffn],
                normal,
                Some(1),
                c,
            ),
        ]);
    }
    out.push(spec(
        "model.norm.weight".into(),
        vec![h],
        Init::Ones,
        None,
        norm_grad,
    ));
    out.push(spec(
        "lm_head.weight".into(),
        vec![cfg.vocab, h],
        normal,
        Some(0),
        TpGrad::Complete,
    ));
    out
}

fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

fn check_divides(what: &str, n: i64, parts: usize) -> Result<(), ExecError> {
    if parts == 0 || n % parts as i64 != 0 {
        return Err(ExecError::Plan(format!(
            "{what} ({n}) does not split into {parts} parts"
        )));
    }
    Ok(())
}

/// A micro-batch between its forward and its backward: its tape, the id of
/// its received input activation and the id of its output.
type InFlight<'a> = Option<(Tape<'a>, Option<ValueId>, ValueId)>;

/// One rank's part of the model: the parameters of its pipeline stage, sharded over tp.
#[derive(Debug)]
pub struct LlamaStage {
    cfg: LlamaConfig,
    plan: TrainPlan,
    coord: Coord,
    /// The layers of each model chunk this stage holds (one chunk unless the
    /// schedule is interleaved).
    chunks: Vec<std::ops::Range<usize>>,
    params: Vec<Param>,
    index: HashMap<String, usize>,
}

impl LlamaStage {
    /// Checks that `plan` fits `cfg` and initialises this rank's parameters
    /// from `seed` (identical to the single-device model's, whatever the plan).
    pub fn new(
        cfg: LlamaConfig,
        plan: TrainPlan,
        coord: Coord,
        seed: u64,
    ) -> Result<Self, ExecError> {
        let Mesh { tp, pp, .. } = plan.mesh;
        if coord.tp >= tp || coord.dp >= plan.mesh.dp || coord.pp >= pp {
            return Err(ExecError::Plan(format!(
                "coordinate {coord:?} is outside mesh {:?}",
                plan.mesh
            )));
        }
        check_divides("heads", cfg.n_heads, tp)?;
        check_divides("kv heads", cfg.n_kv_heads, tp)?;
        check_divides("ffn", cfg.ffn, tp)?;
        check_divides("vocab", cfg.vocab, tp)?;
        check_divides("hidden", cfg.hidden, cfg.n_heads as usize)?;
        let n_chunks = match plan.schedule {
            Schedule::Interleaved { chunks } => chunks,
            Schedule::GPipe | Schedule::OneFOneB => 1,
        };
        check_divides("layers", cfg.n_layers as i64, pp * n_chunks)?;
        if plan.micro_batches == 0 {
            return Err(ExecError::Plan("zero micro-batches".into()));
        }
        // Chunk c of stage s is virtual stage c * pp + s (round-robin).
        let per_chunk = cfg.n_layers / (pp * n_chunks);
        let chunks: Vec<_> = (0..n_chunks)
            .map(|c| {
                let v = c * pp + coord.pp;
                v * per_chunk..(v + 1) * per_chunk
            })
            .collect();
        let (first, last) = (coord.pp == 0, coord.pp + 1 == pp);
        let mut params = Vec::new();
        for spec in param_specs(&cfg, plan.seq_parallel) {
            let mine = match layer_of(&spec.name) {
                Some(l) => chunks.iter().any(|r| r.contains(&l)),
                None if spec.name.starts_with("model.embed_tokens") => first,
                None => last,
            };
            if mine {
                params.push(spec.materialise(seed, coord.tp, tp)?);
            }
        }
        let index = params
            .iter()
            .enumerate()
            .map(|(i, p)| (p.spec.name.clone(), i))
            .collect();
        Ok(Self {
            cfg,
            plan,
            coord,
            chunks,
            params,
            index,
        })
    }

    pub fn params(&self) -> &[Param] {
        &self.params
    }

    pub fn params_mut(&mut self) -> &mut [Param] {
        &mut self.params
    }

    fn w(&self, name: &str) -> Result<&Tensor, ExecError> {
        self.index
            .get(name)
            .map(|&i| &self.params[i].tensor)
            .ok_or_else(|| ExecError::Plan(format!("parameter {name} is not on this stage")))
    }

    /// This stage's parameters at full size (all-gathered over tp), by name.
    /// Collective over tp.
    pub fn full_weights(&self, tp: &dyn Communicator) -> Result<Vec<(String, Tensor)>, ExecError> {
        self.params
            .iter()
            .map(|p| Ok((p.spec.name.clone(), p.gather_full(tp)?)))
            .collect()
    }

    fn adapters(&self) -> (Adapter, Adapter) {
        match self.plan.seq_parallel {
            SeqParallel::On => (
                Adapter::GatherForShards { dim: 1 },
                Adapter::ReduceScatter { dim: 1 },
            ),
            SeqParallel::Off => (Adapter::Copy, Adapter::AllReduce),
        }
    }

    fn layer<'a>(
        &'a self,
        tape: &mut Tape<'a>,
        tp: &'a dyn Communicator,
        i: usize,
        x: ValueId,
    ) -> Result<ValueId, ExecError> {
        let w = |n: &str| self.w(&format!("model.layers.{i}.{n}"));
        let (ln1, ln2) = (
            w("input_layernorm.weight")?,
            w("post_attention_layernorm.weight")?,
        );
        let (wq, wk) = (w("self_attn.q_proj.weight")?, w("self_attn.k_proj.weight")?);
        let (wv, wo) = (w("self_attn.v_proj.weight")?, w("self_attn.o_proj.weight")?);
        let (wg, wu) = (w("mlp.gate_proj.weight")?, w("mlp.up_proj.weight")?);
        let wd = w("mlp.down_proj.weight")?;
        let (eps, theta) = (self.cfg.rms_eps, self.cfg.rope_theta);
        let heads = self.cfg.n_heads / self.plan.mesh.tp as i64;
        let kv_heads = self.cfg.n_kv_heads / self.plan.mesh.tp as i64;
        let (keep, keep_core) = match self.plan.recompute {
            Recompute::None => (Keep::Activations, Keep::Activations),
            Recompute::Selective => (Keep::Activations, Keep::Inputs),
            Recompute::Full => (Keep::Inputs, Keep::Inputs),
        };
        let (to_shards, from_shards) = self.adapters();

        let h = tape.segment("attn_norm", keep, &[x], move |t| {
            Ok(vec![ops::rms_norm(&t[0], ln1, eps)?])
        })?[0];
        let h = tape.adapt(to_shards, tp, h)?;
        let qkv = tape.segment("qkv_rope", keep, &[h], move |t| {
            let q = ops::split_heads(&ops::linear(&t[0], wq)?, heads)?;
            let k = ops::split_heads(&ops::linear(&t[0], wk)?, kv_heads)?;
            let v = ops::split_heads(&ops::linear(&t[0], wv)?, kv_heads)?;
            Ok(vec![ops::rope(&q, theta, 0)?, ops::rope(&k, theta, 0)?, v])
        })?;
        let a = tape.segment("core_attention", keep_core, &qkv, |t| {
            Ok(vec![ops::merge_heads(&ops::attention(
                &t[0],
                &t[1],
                &t[2],
                Mask::Causal,
            )?)?])
        })?[0];
        let o = tape.segment("o_proj", keep, &[a], move |t| {
            Ok(vec![ops::linear(&t[0], wo)?])
        })?[0];
        let o = tape.adapt(from_shards, tp, o)?;
        let r = tape.segment("attn_residual_norm", keep, &[x, o], move |t| {
            let x2 = ops::add(&t[0], &t[1])?;
            let h2 = ops::rms_norm(&x2, ln2, eps)?;
            Ok(vec![x2, h2])
        })?;
        let h2 = tape.adapt(to_shards, tp, r[1])?;
        let m = tape.segment("mlp", keep, &[h2], move |t| {
            let act = ops::swiglu(&ops::linear(&t[0], wg)?, &ops::linear(&t[0], wu)?)?;
            Ok(vec![ops::linear(&act, wd)?])
        })?[0];
        let m = tape.adapt(from_shards, tp, m)?;
        Ok(tape.segment("mlp_residual", keep, &[r[0], m], |t| {
            Ok(vec![ops::add(&t[0], &t[1])?])
        })?[0])
    }

    /// Whether model chunk `chunk` of this stage is the first and the last
    /// virtual stage of the pipeline.
    fn ends(&self, chunk: usize) -> (bool, bool) {
        let pp = self.plan.mesh.pp;
        (
            self.coord.pp == 0 && chunk == 0,
            self.coord.pp + 1 == pp && chunk + 1 == self.chunks.len(),
        )
    }

    /// Records one micro-batch's forward through model chunk `chunk` of this
    /// stage. `input` is the received activation (all virtual stages but the
    /// first). Returns the ids of the chunk's input activation (if any) and
    /// of its output: the activation to send, or on the last virtual stage
    /// this micro-batch's share of the loss.
    #[allow(clippy::too_many_arguments)]
    /// One autograd graph per micro-batch when nothing communicates inside
    /// the step and nothing is recomputed (tp = 1, no recompute); segments
    /// with per-segment backward otherwise.
    fn new_tape<'a>(&self, g: &Groups<'_>) -> Tape<'a> {
        if g.tp.size() == 1 && self.plan.recompute == Recompute::None {
            Tape::fused()
        } else {
            Tape::new()
        }
    }

    // The micro-batch's inputs are passed apart, as generated code will.
    #[allow(clippy::too_many_arguments)]
    fn forward<'a>(
        &'a self,
        tape: &mut Tape<'a>,
        tp: &'a dyn Communicator,
        chunk: usize,
        input: Option<Tensor>,
        tokens: &Tensor,
        labels: &Tensor,
        total_tokens: i64,
    ) -> Result<(Option<ValueId>, ValueId), ExecError> {
        let (to_shards, from_shards) = self.adapters();
        let vocab_start = self.coord.tp as i64 * (self.cfg.vocab / self.plan.mesh.tp as i64);
        let (first, last) = self.ends(chunk);
        let (input_id, mut x) = if first {
            let we = self.w("model.embed_tokens.weight")?;
            let ids = tape.input(tokens);
            let e = tape.segment("embed", Keep::Activations, &[ids], move |t| {
                Ok(vec![ops::embedding(&t[0], we, vocab_start)?])
            })?[0];
            (None, tape.adapt(from_shards, tp, e)?)
        } else {
            let t = input.ok_or_else(|| {
                ExecError::Pipeline("forward before its activation arrived".into())
            })?;
            let id = tape.input(&t);
            (Some(id), id)
        };
        let layers = self.chunks.get(chunk).cloned().ok_or_else(|| {
            ExecError::Pipeline(format!("model chunk {chunk} is not on this stage"))
        })?;
        for i in layers {
            x = self.layer(tape, tp, i, x)?;
        }
        if !last {
            return Ok((input_id, x));
        }
        let (wn, wh) = (self.w("model.norm.weight")?, self.w("lm_head.weight")?);
        let eps = self.cfg.rms_eps;
        let h = tape.segment("final_norm", Keep::Activations, &[x], move |t| {
            Ok(vec![ops::rms_norm(&t[0], wn, eps)?])
        })?[0];
        let h = tape.adapt(to_shards, tp, h)?;
        let lab = tape.input(labels);
        let loss = tape.segment("head_loss", Keep::Activations, &[h, lab], move |t| {
            let logits = ops::linear(&t[0], wh)?;
            let per_token = ops::vocab_parallel_cross_entropy(&logits, &t[1], vocab_start, tp)?;
            Ok(vec![ops::mean(&per_token, total_tokens)?])
        })?[0];
        Ok((input_id, loss))
    }

    /// Runs the forward and backward of every micro-batch of this rank's
    /// share of `batch` in the plan's schedule, exchanging activations and
    /// gradients over pp. Returns the summed loss of this rank's micro-batches
    /// (non-zero on the last stage only).
    fn run_pipeline(&self, g: &Groups<'_>, batch: &Batch) -> Result<Tensor, ExecError> {
        let Mesh { tp, dp, pp } = self.plan.mesh;
        let m = self.plan.micro_batches;
        let size = batch.tokens.size();
        let (b, l) = match size[..] {
            [b, l] => (b, l),
            _ => {
                return Err(ExecError::Plan(format!(
                    "tokens must be [batch, seq], got {size:?}"
                )));
            }
        };
        check_divides("batch", b, dp * m)?;
        if self.plan.seq_parallel == SeqParallel::On {
            check_divides("sequence", l, tp)?;
        }
        let mbs = b / (dp * m) as i64;
        let local_l = match self.plan.seq_parallel {
            SeqParallel::On => l / tp as i64,
            SeqParallel::Off => l,
        };
        let shape = [mbs, local_l, self.cfg.hidden];
        let stage = self.coord.pp;
        let (first, last) = (stage == 0, stage + 1 == pp);
        let rows = |t: &Tensor, mb: usize| -> Result<Tensor, ExecError> {
            let start = (self.coord.dp * m + mb) as i64 * mbs;
            Ok(t.f_narrow(0, start, mbs)?)
        };
        let missing = |what: &str, mb: usize| {
            ExecError::Pipeline(format!("{what} of micro-batch {mb} is missing"))
        };
        if let Schedule::Interleaved { chunks } = self.plan.schedule {
            return self.run_interleaved(g, batch, chunks, shape, &rows);
        }

        let mut inputs: Vec<Option<Tensor>> = (0..m).map(|_| None).collect();
        let mut tapes: Vec<InFlight<'_>> = (0..m).map(|_| None).collect();
        let mut out_grads: Vec<Option<Tensor>> = (0..m).map(|_| None).collect();
        let mut in_grads: Vec<Option<Tensor>> = (0..m).map(|_| None).collect();
        let mut loss = Tensor::f_zeros([], (Kind::Float, tch::Device::Cpu))?;
        let output = |tapes: &[InFlight<'_>], mb: usize| -> Result<Tensor, ExecError> {
            let (tape, _, out) = tapes[mb].as_ref().ok_or_else(|| missing("forward", mb))?;
            Ok(tape.value(*out)?.shallow_clone())
        };
        for action in schedule::actions(self.plan.schedule, pp, stage, m)? {
            match action {
                Action::RecvForward(mb) => {
                    inputs[mb] = Some(g.pp.recv(&shape, Kind::Float, stage - 1)?);
                }
                Action::Forward(mb) => {
                    let mut tape = self.new_tape(g);
                    let (inp, out) = self.forward(
                        &mut tape,
                        g.tp,
                        0,
                        inputs[mb].take(),
                        &rows(&batch.tokens, mb)?,
                        &rows(&batch.labels, mb)?,
                        b * l,
                    )?;
                    if last {
                        loss = loss.f_add(tape.value(out)?)?;
                    }
                    tapes[mb] = Some((tape, inp, out));
                }
                Action::SendForward(mb) => g.pp.send(&output(&tapes, mb)?, stage + 1)?,
                Action::RecvBackward(mb) => {
                    out_grads[mb] = Some(g.pp.recv(&shape, Kind::Float, stage + 1)?);
                }
                Action::Backward(mb) => {
                    let (tape, inp, out) =
                        tapes[mb].take().ok_or_else(|| missing("forward", mb))?;
                    let seed = if last {
                        Tensor::f_ones([], (Kind::Float, tch::Device::Cpu))?
                    } else {
                        out_grads[mb]
                            .take()
                            .ok_or_else(|| missing("output gradient", mb))?
                    };
                    let grads = tape.backward(vec![(out, seed)])?;
                    if let (Some(inp), false) = (inp, first) {
                        in_grads[mb] = Some(match grads.get(inp) {
                            Some(gr) => gr.shallow_clone(),
                            None => Tensor::f_zeros(shape, (Kind::Float, tch::Device::Cpu))?,
                        });
                    }
                }
                Action::SendBackward(mb) => {
                    let gr = in_grads[mb]
                        .take()
                        .ok_or_else(|| missing("input gradient", mb))?;
                    g.pp.send(&gr, stage - 1)?;
                }
                Action::SendForwardRecvBackward { send, recv } => {
                    let act = output(&tapes, send)?;
                    out_grads[recv] =
                        Some(g.pp.send_recv(&act, stage + 1, &shape, Kind::Float, stage + 1)?);
                }
                Action::SendBackwardRecvForward { send, recv } => {
                    let gr = in_grads[send]
                        .take()
                        .ok_or_else(|| missing("input gradient", send))?;
                    inputs[recv] =
                        Some(g.pp.send_recv(&gr, stage - 1, &shape, Kind::Float, stage - 1)?);
                }
            }
        }
        Ok(loss)
    }

    /// [`Self::run_pipeline`] for the interleaved schedule: micro-batches
    /// pass through this stage's `chunks` model chunks in the order of
    /// [`schedule::interleaved`], over the pp ring.
    fn run_interleaved(
        &self,
        g: &Groups<'_>,
        batch: &Batch,
        chunks: usize,
        shape: [i64; 3],
        rows: &dyn Fn(&Tensor, usize) -> Result<Tensor, ExecError>,
    ) -> Result<Tensor, ExecError> {
        let pp = self.plan.mesh.pp;
        let stage = self.coord.pp;
        let (next, prev) = ((stage + 1) % pp, (stage + pp - 1) % pp);
        let lists = schedule::interleaved(pp, chunks, self.plan.micro_batches)?;
        let list = lists.into_iter().nth(stage).unwrap_or_default();
        let total_tokens = batch.tokens.numel() as i64;
        let cpu = (Kind::Float, tch::Device::Cpu);
        let missing = |what: &str, w: Work| {
            ExecError::Pipeline(format!(
                "{what} of micro-batch {} in chunk {} is missing",
                w.mb, w.chunk
            ))
        };
        let mut inputs: HashMap<Work, Tensor> = HashMap::new();
        let mut tapes: HashMap<Work, (Tape<'_>, Option<ValueId>, ValueId)> = HashMap::new();
        let mut out_grads: HashMap<Work, Tensor> = HashMap::new();
        let mut in_grads: HashMap<Work, Tensor> = HashMap::new();
        let mut loss = Tensor::f_zeros([], cpu)?;
        // Sends `t` (if any) to `dst` and receives into `recv`'s slot (if any) from `src`.
        let shift = |t: Option<Tensor>,
                     dst: usize,
                     recv: Option<Work>,
                     src: usize,
                     into: &mut HashMap<Work, Tensor>|
         -> Result<(), ExecError> {
            match (t, recv) {
                (Some(t), Some(w)) => {
                    into.insert(w, g.pp.send_recv(&t, dst, &shape, Kind::Float, src)?);
                }
                (Some(t), None) => g.pp.send(&t, dst)?,
                (None, Some(w)) => {
                    into.insert(w, g.pp.recv(&shape, Kind::Float, src)?);
                }
                (None, None) => {}
            }
            Ok(())
        };
        for action in list {
            match action {
                ChunkAction::Forward(w) => {
                    let mut tape = self.new_tape(g);
                    let (inp, out) = self.forward(
                        &mut tape,
                        g.tp,
                        w.chunk,
                        inputs.remove(&w),
                        &rows(&batch.tokens, w.mb)?,
                        &rows(&batch.labels, w.mb)?,
                        total_tokens,
                    )?;
                    if self.ends(w.chunk).1 {
                        loss = loss.f_add(tape.value(out)?)?;
                    }
                    tapes.insert(w, (tape, inp, out));
                }
                ChunkAction::Backward(w) => {
                    let (tape, inp, out) = tapes.remove(&w).ok_or_else(|| missing("forward", w))?;
                    let seed = if self.ends(w.chunk).1 {
                        Tensor::f_ones([], cpu)?
                    } else {
                        out_grads
                            .remove(&w)
                            .ok_or_else(|| missing("output gradient", w))?
                    };
                    let grads = tape.backward(vec![(out, seed)])?;
                    if let Some(inp) = inp {
                        let gr = match grads.get(inp) {
                            Some(gr) => gr.shallow_clone(),
                            None => Tensor::f_zeros(shape, cpu)?,
                        };
                        in_grads.insert(w, gr);
                    }
                }
                ChunkAction::ShiftForward { send, recv } => {
                    let act = match send {
                        Some(w) => {
                            let (tape, _, out) =
                                tapes.get(&w).ok_or_else(|| missing("forward", w))?;
                            Some(tape.value(*out)?.shallow_clone())
                        }
                        None => None,
                    };
                    shift(act, next, recv, prev, &mut inputs)?;
                }
                ChunkAction::ShiftBackward { send, recv } => {
                    let gr = match send {
                        Some(w) => Some(
                            in_grads
                                .remove(&w)
                                .ok_or_else(|| missing("input gradient", w))?,
                        ),
                        None => None,
                    };
                    shift(gr, prev, recv, next, &mut out_grads)?;
                }
            }
        }
        Ok(loss)
    }

    /// One training step without the optimizer: every micro-batch forward and
    /// backward, then gradients completed over tp and dp (one all-reduce per
    /// parameter). Returns the loss of the global batch on every rank. `g`
    /// must be the groups of `self`'s mesh.
    pub fn train_step(&mut self, g: &Groups<'_>, batch: &Batch) -> Result<f64, ExecError> {
        let loss = self.forward_backward(g, batch)?;
        sync_grads(&mut self.params, g.tp, g.dp)?;
        Ok(loss)
    }

    /// One training step with `opt`: gathers the parameters (ZeRO-3), runs
    /// every micro-batch forward and backward, completes gradients over tp
    /// and lets `opt` average them over dp, clip and update. Returns the loss
    /// of the global batch on every rank. `opt` must have been built over
    /// this stage's parameters and `g`.
    pub fn train_step_with(
        &mut self,
        g: &Groups<'_>,
        batch: &Batch,
        opt: &mut DpOptimizer,
    ) -> Result<(f64, StepStats), ExecError> {
        opt.gather_params(&mut self.params, g.dp)?;
        let loss = self.forward_backward(g, batch)?;
        let stats = opt.step(&mut self.params, g)?;
        Ok((loss, stats))
    }

    /// Every micro-batch's forward and backward in the plan's schedule;
    /// afterwards each parameter's `.grad()` is complete over tp and holds
    /// this dp rank's share of the batch. Returns the loss of the global
    /// batch on every rank.
    pub fn forward_backward(&mut self, g: &Groups<'_>, batch: &Batch) -> Result<f64, ExecError> {
        let Mesh { tp, dp, pp } = self.plan.mesh;
        if (g.tp.size(), g.dp.size(), g.pp.size()) != (tp, dp, pp) {
            return Err(ExecError::Plan(format!(
                "communicators of sizes tp={} dp={} pp={} do not match mesh {:?}",
                g.tp.size(),
                g.dp.size(),
                g.pp.size(),
                self.plan.mesh
            )));
        }
        let local = self.run_pipeline(g, batch)?;
        complete_tp_grads(&mut self.params, g.tp)?;
        let mut loss = local;
        if dp > 1 {
            loss = g.dp.all_reduce(&loss)?;
        }
        if pp > 1 {
            loss = g.pp.broadcast(&loss, pp - 1)?;
        }
        Ok(loss.f_double_value(&[])?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::MeshComms;

    fn plan_err<T: std::fmt::Debug>(r: Result<T, ExecError>) -> String {
        match r {
            Err(ExecError::Plan(msg)) => msg,
            other => panic!("expected a plan error, got {other:?}"),
        }
    }

    fn with_mesh(tp: usize, dp: usize, pp: usize) -> TrainPlan {
        TrainPlan {
            mesh: Mesh { tp, dp, pp },
            ..TrainPlan::single()
        }
    }

    #[test]
    fn plans_that_do_not_fit_are_errors() {
        let cfg = LlamaConfig::mini();
        let origin = Coord {
            tp: 0,
            dp: 0,
            pp: 0,
        };
        assert!(plan_err(LlamaStage::new(cfg, with_mesh(3, 1, 1), origin, 0)).contains("heads"));
        assert!(plan_err(LlamaStage::new(cfg, with_mesh(1, 1, 3), origin, 0)).contains("layers"));
        let outside = Coord {
            tp: 2,
            dp: 0,
            pp: 0,
        };
        assert!(plan_err(LlamaStage::new(cfg, with_mesh(2, 1, 1), outside, 0)).contains("outside"));

        let comms = MeshComms::solo();
        let batch = Batch::synthetic(cfg.vocab, 4, 16, 0).expect("batch");
        let mut tp2 = LlamaStage::new(cfg, with_mesh(2, 1, 1), origin, 0).expect("fits");
        let msg = plan_err(tp2.train_step(&Groups::of(&comms), &batch));
        assert!(msg.contains("communicators"), "{msg}");
        let three = TrainPlan {
            micro_batches: 3,
            ..TrainPlan::single()
        };
        let mut stage = LlamaStage::new(cfg, three, origin, 0).expect("fits");
        let msg = plan_err(stage.train_step(&Groups::of(&comms), &batch));
        assert!(msg.contains("batch"), "{msg}");
        // 4 layers do not split into 2 stages of 3 chunks.
        let interleaved = |chunks| TrainPlan {
            schedule: Schedule::Interleaved { chunks },
            ..with_mesh(1, 1, 2)
        };
        assert!(plan_err(LlamaStage::new(cfg, interleaved(3), origin, 0)).contains("layers"));
        // One stage cannot interleave chunks: a schedule error, not a panic.
        let solo_interleaved = TrainPlan {
            schedule: Schedule::Interleaved { chunks: 2 },
            ..TrainPlan::single()
        };
        let mut stage = LlamaStage::new(cfg, solo_interleaved, origin, 0).expect("fits");
        assert!(matches!(
            stage.train_step(&Groups::of(&comms), &batch),
            Err(ExecError::Schedule(_))
        ));
    }

    #[test]
    fn initial_loss_is_that_of_a_uniform_guess() {
        // Weights of std 0.02 give near-uniform logits: loss ≈ ln(vocab).
        let cfg = LlamaConfig::mini();
        let comms = MeshComms::solo();
        let origin = Coord {
            tp: 0,
            dp: 0,
            pp: 0,
        };
        let mut stage = LlamaStage::new(cfg, TrainPlan::single(), origin, 1).expect("fits");
        let batch = Batch::synthetic(cfg.vocab, 4, 16, 0).expect("batch");
        let loss = stage.train_step(&Groups::of(&comms), &batch).expect("step");
        assert!((loss - (cfg.vocab as f64).ln()).abs() < 0.05, "loss {loss}");
        assert!(stage.params().iter().all(|p| p.tensor.grad().defined()));
    }
}
