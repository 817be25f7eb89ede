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
//! [`LlamaStage`] is a [`StageModule`]: it records one micro-batch's forward
//! through one model chunk, and the generic driver of [`autopart_runtime::program`]
//! orders micro-batches and moves activations, exactly as for generated code.
//!
//! The loss is the mean over every token of the global batch. The program
//! owns no optimizer: [`LlamaStage::train_step`] leaves complete gradients in
//! the parameters' `.grad()`, and [`LlamaStage::train_step_with`] hands them
//! to a [`DpOptimizer`] (bucketed dp averaging, clipping, AdamW, ZeRO).
//!
//! Test support, not part of the runtime's API: the runtime's tests,
//! examples and benches include this file with `#[path = "…"] mod llama;`,
//! and `autopart-tests` builds it into the hand-written plan binary that its
//! differential test runs against the generated llama-mini. It uses only the
//! runtime's public API, as generated code does.

use autopart_runtime::comm::{Communicator, Groups};
use autopart_runtime::data::Batch;
use autopart_runtime::exec::{
    Adapter, ExecError, Init, Keep, Param, ParamSpec, Tape, TpGrad, ValueId, sync_grads,
};
use autopart_runtime::mesh::{Coord, Mesh};
use autopart_runtime::ops::{self, Mask};
use autopart_runtime::program::{self, PipelinePlan, StageModule};
use autopart_runtime::schedule::Schedule;
use autopart_runtime::zero::{DpOptimizer, StepStats};
use std::collections::HashMap;
use tch::Tensor;

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

/// Which segments are rerun in backward instead of keeping activations:
/// the plan's own `Recompute` (`Selective`: the core attention only, as
/// Megatron; `Full`: every segment of every layer).
pub use autopart_runtime::vocab::Recompute;

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
        let n_chunks = plan.schedule.chunks() as usize;
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

    /// This plan's pipeline plan at this stage's coordinate.
    pub fn pipeline(&self) -> PipelinePlan {
        PipelinePlan {
            mesh: self.plan.mesh,
            coord: self.coord,
            schedule: self.plan.schedule,
            micro_batches: self.plan.micro_batches,
        }
    }

    /// Checks what the driver cannot know: that the sequence splits over tp
    /// under sequence parallelism.
    fn check_batch(&self, batch: &Batch) -> Result<(), ExecError> {
        if self.plan.seq_parallel == SeqParallel::On {
            let seq = batch.tokens.size().get(1).copied().unwrap_or(0);
            check_divides("sequence", seq, self.plan.mesh.tp)?;
        }
        Ok(())
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

    /// [`program::train_step_with`] under this stage's plan.
    pub fn train_step_with(
        &mut self,
        g: &Groups<'_>,
        batch: &Batch,
        opt: &mut DpOptimizer,
    ) -> Result<(f64, StepStats), ExecError> {
        self.check_batch(batch)?;
        program::train_step_with(self, &self.pipeline(), g, batch, opt)
    }

    /// [`program::forward_backward`] under this stage's plan.
    pub fn forward_backward(&mut self, g: &Groups<'_>, batch: &Batch) -> Result<f64, ExecError> {
        self.check_batch(batch)?;
        program::forward_backward(self, &self.pipeline(), g, batch)
    }
}

impl StageModule for LlamaStage {
    fn params(&self) -> &[Param] {
        &self.params
    }

    fn params_mut(&mut self) -> &mut [Param] {
        &mut self.params
    }

    fn n_chunks(&self) -> usize {
        self.chunks.len()
    }

    fn boundary_shape(&self, mbs: i64, seq: i64) -> Vec<i64> {
        let local = match self.plan.seq_parallel {
            SeqParallel::On => seq / self.plan.mesh.tp as i64,
            SeqParallel::Off => seq,
        };
        vec![mbs, local, self.cfg.hidden]
    }

    /// One autograd graph per micro-batch when nothing communicates inside
    /// the step and nothing is recomputed.
    fn fusable(&self, tp_size: usize) -> bool {
        tp_size == 1 && self.plan.recompute == Recompute::None
    }

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
}
