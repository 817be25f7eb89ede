//! The `main` of a plan binary: flags, launcher checks, the training loop
//! and its console and metrics output, around a program's [`StageModule`]s.
//!
//! A generated plan crate's `src/main.rs` is a [`PlanMeta`] constant and one
//! call:
//!
//! ```ignore
//! use autopart_runtime::app::{self, PlanMeta, StageCtx};
//! const PLAN: PlanMeta = PlanMeta { model: "llama-mini", /* … */ };
//! fn main() -> std::process::ExitCode {
//!     app::main(&PLAN, |ctx: StageCtx| match ctx.coord.pp {
//!         0 => Ok(Box::new(stage_0::Stage::new(ctx.coord, ctx.mesh.tp, ctx.seed)?)),
//!         _ => Ok(Box::new(stage_1::Stage::new(ctx.coord, ctx.mesh.tp, ctx.seed)?)),
//!     })
//! }
//! ```
//!
//! [`main`] parses the flags ([`Options`]; `--help` prints [`help`]), checks
//! the launcher's process count against the plan before any MPI or model
//! work, initialises MPI, builds the mesh (the plan's, with dp multiplied by
//! the number of replicas when the run has more GPUs than the plan), builds
//! this rank's stage through the closure, and trains: each step takes a
//! global batch (from `--data` or synthetic), runs
//! [`program::train_step_with`] and reports a [`StepRecord`] (a console line
//! on rank 0, a JSON line with `--metrics`). With `--save-params DIR`, each
//! rank then writes its parameters to `DIR/rank-<global rank>.safetensors`
//! ([`save_params`]).
//!
//! Errors never panic: they print `error: …` on stderr and exit non-zero (2
//! for bad flags and a wrong process count, 1 otherwise). Errors every rank
//! meets alike (flags, plan, data) are printed by rank 0 only; an error of one
//! rank during training is printed with its rank and aborts the MPI job, so
//! that the other ranks do not wait for it forever.
//!
//! This module owns the process: arguments, exit codes and console output.
//! The step itself is [`crate::program`]'s, the numbers [`crate::metrics`]'s.

use crate::checkpoint::{SaveError, SaveOptions, SaveReport, Saver};
use crate::comm::{CommError, Communicator, Groups, MeshComms, MpiComm};
use crate::data::{DataError, EvalSet, JsonRows, Source, TokenDtype};
use crate::exec::{ExecError, Param};
use crate::init::InitFrom;
use crate::mesh::{Coord, Mesh};
use crate::metrics::{self, FlopCount, Memory, MetricsError, MetricsLog, StepRecord};
use crate::optim::{AdamW, LrSchedule, OptimError};
use crate::program::{self, PipelinePlan, StageModule};
pub use crate::schedule::Schedule;
use crate::tensorboard::EventWriter;
pub use crate::zero::ZeroStage;
use crate::zero::{DEFAULT_BUCKET_BYTES, DpOptimizer, OptimConfig};
pub use autopart_vocab::DType;
use autopart_vocab::ckpt::{self, CkptError, Manifest, Resume};
use clap::error::ErrorKind;
use clap::{CommandFactory, Parser, value_parser};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;
use tch::Tensor;
use thiserror::Error;

/// What a plan binary knows about its plan, written by code generation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PlanMeta {
    /// The model's name, for the console.
    pub model: &'static str,
    /// `plan.ron`'s hash ([`autopart_vocab::hash::plan_hash`]; empty for a
    /// hand-written plan binary): checkpoints record it.
    pub plan_hash: &'static str,
    pub vocab: i64,
    pub seq_len: i64,
    /// Sequences per step of one replica of the plan: `micro_batch *
    /// micro_batches * dp`. A run on `runtime_gpus` trains on `global_batch
    /// * runtime_gpus / plan_gpus` sequences per step.
    pub global_batch: i64,
    /// Sequences per micro-batch.
    pub micro_batch: i64,
    /// Micro-batches per dp rank and step.
    pub micro_batches: usize,
    pub tp: usize,
    pub pp: usize,
    pub dp: usize,
    /// GPUs of one replica of the plan: `tp * pp * dp`.
    pub plan_gpus: usize,
    /// Processes of a run: `plan_gpus` times the number of replicas.
    pub runtime_gpus: usize,
    pub schedule: Schedule,
    pub zero: ZeroStage,
    /// The dtype parameters and activations train in: the parameters are
    /// initialised in f32 (the same values whatever the plan) and cast to
    /// it; bf16 / f16 keep f32 master weights in the optimizer, f16 scales
    /// the loss dynamically ([`crate::zero::LossScaler`]).
    pub dtype: DType,
    /// The dtype gradients are summed in over dp (`Fp32` by default, as
    /// Megatron's `accumulate_allreduce_grads_in_fp32`; `Bf16` halves the
    /// bytes).
    pub reduce_dtype: DType,
    /// The compiler's predicted peak memory of each pipeline stage, in bytes
    /// (empty when unknown).
    pub predicted_peak_bytes: &'static [u64],
    /// The compiler's predicted time of one step, in seconds.
    pub predicted_step_s: f64,
    /// The model's HuggingFace `config.json` (compact JSON; empty for a
    /// hand-written plan binary): `--init-from` checks an HF folder against
    /// it, and checkpoints carry it as `config.json` for `autopart ckpt
    /// export --hf`.
    pub hf_config: &'static str,
}

impl PlanMeta {
    /// Checks that the fields agree with each other.
    pub fn validate(&self) -> Result<(), AppError> {
        let bad = |msg: String| Err(AppError::Meta(msg));
        if self.vocab < 1 || self.seq_len < 1 || self.micro_batch < 1 || self.micro_batches == 0 {
            return bad(format!(
                "vocab {}, seq_len {}, micro_batch {} and micro_batches {} must be positive",
                self.vocab, self.seq_len, self.micro_batch, self.micro_batches
            ));
        }
        if self.tp == 0 || self.pp == 0 || self.dp == 0 {
            return bad(format!(
                "mesh tp={} pp={} dp={} has an empty axis",
                self.tp, self.pp, self.dp
            ));
        }
        if self.plan_gpus != self.tp * self.pp * self.dp {
            return bad(format!(
                "plan_gpus {} is not tp {} x pp {} x dp {}",
                self.plan_gpus, self.tp, self.pp, self.dp
            ));
        }
        if self.runtime_gpus == 0 || self.runtime_gpus % self.plan_gpus != 0 {
            return bad(format!(
                "runtime_gpus {} is not a multiple of plan_gpus {}",
                self.runtime_gpus, self.plan_gpus
            ));
        }
        if self.global_batch != self.micro_batch * self.micro_batches as i64 * self.dp as i64 {
            return bad(format!(
                "global_batch {} is not micro_batch {} x micro_batches {} x dp {}",
                self.global_batch, self.micro_batch, self.micro_batches, self.dp
            ));
        }
        if !self.predicted_peak_bytes.is_empty() && self.predicted_peak_bytes.len() != self.pp {
            return bad(format!(
                "{} predicted peaks for {} pipeline stages",
                self.predicted_peak_bytes.len(),
                self.pp
            ));
        }
        Ok(())
    }

    /// How many copies of the plan a run holds (its extra data parallelism).
    pub fn replicas(&self) -> usize {
        self.runtime_gpus / self.plan_gpus.max(1)
    }

    /// The mesh of a run: the plan's tp and pp, and its dp times the replicas.
    pub fn runtime_mesh(&self) -> Mesh {
        Mesh {
            tp: self.tp,
            dp: self.dp * self.replicas(),
            pp: self.pp,
        }
    }

    /// Sequences per step of a run (every replica's batch).
    pub fn runtime_batch(&self) -> i64 {
        self.global_batch * self.replicas() as i64
    }
}

/// What the stage-building closure of [`main`] gets: this rank's place on
/// the run's mesh and the parameter seed (`--seed`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StageCtx {
    /// `coord.pp` is the pipeline stage to build, `coord.tp` the tp shard.
    pub coord: Coord,
    pub mesh: Mesh,
    pub seed: u64,
}

/// The stage-building closure's result.
pub type BuiltStage = Result<Box<dyn StageModule>, ExecError>;

/// Help text after the flags of `--help`.
const AFTER_HELP: &str = "Run it under mpirun or srun: rank and world size come from the launcher.

Metrics: tokens/s counts the labels that count in the loss (masked ones
do not). MFU = F * B * seq / step_s / (T * 1e12 * processes), with T from
--peak-tflops, B * seq the token positions of the global batch and
F = 6*N + 12*L*h*seq model FLOPs per token (PaLM): N the parameters that
multiply activations (all but an untied input embedding and GPT-2's
position table), L layers, h the model width (from the plan's
config.json; without one, F = 6*N over all parameters).";

/// The parsed flags of a run: one clap argument per flag, whose doc comment
/// is its `--help` line. Parse them with [`parse_args`] (or clap's
/// `Options::try_parse_from`, which takes the program name first).
#[derive(Clone, Debug, PartialEq, Parser)]
#[command(
    name = "PLAN_BINARY",
    about = "Trains the plan this binary was built from.",
    after_help = AFTER_HELP,
    args_override_self = true
)]
pub struct Options {
    /// Optimizer steps.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 10,
        value_parser = value_parser!(u64).range(1..)
    )]
    pub steps: u64,
    /// Train on a folder made by `autopart data prepare` (its rows in
    /// a shuffled order drawn from --seed, the same for every plan; masked
    /// labels count neither in the loss nor in tokens/s) or a token file
    /// (flat little-endian ids, no header: nanoGPT/Megatron .bin, read in
    /// order). Default: synthetic tokens drawn from the seed.
    #[arg(long, value_name = "FILE|DIR")]
    pub data: Option<PathBuf>,
    /// Width of the token ids in --data and --eval-data token files.
    #[arg(long, value_name = "u16|u32", default_value = "u16", value_parser = parse_dtype)]
    pub data_dtype: TokenDtype,
    /// Initialise the parameters from DIR: a HuggingFace model folder
    /// (config.json and model.safetensors, or model-*-of-*.safetensors with
    /// model.safetensors.index.json; Llama or GPT-2, checked against the
    /// plan's config) or an autopart checkpoint (DIR/step_N: its parameters;
    /// the optimizer starts fresh). Each rank reads only its shards. A
    /// checkpoint found by --resume takes precedence.
    #[arg(long, value_name = "DIR")]
    pub init_from: Option<PathBuf>,
    /// Write one JSON object per step to FILE (rank 0).
    #[arg(long, value_name = "FILE")]
    pub metrics: Option<PathBuf>,
    /// Write TensorBoard event files into DIR (rank 0): the scalars loss,
    /// grad_norm, lr, step_s, tokens_per_s, tokens_per_s_per_device, mfu,
    /// peak_rss_bytes and eval_loss, under the metrics file's names.
    #[arg(long, value_name = "DIR")]
    pub tensorboard: Option<PathBuf>,
    /// Each device's peak in TFLOP/s (dense, in the run's dtype): with it,
    /// every step reports its MFU (see below).
    #[arg(long, value_name = "T", value_parser = positive, allow_negative_numbers = true)]
    pub peak_tflops: Option<f64>,
    /// Held-out data (a prepared folder, a token file read in order, or
    /// FILE.json {"input_ids": [[...], ...]}, rows of up to seq_len + 1
    /// ids): its mean loss, forward only, is reported after the last step
    /// and every --eval-every steps (eval_loss in the metrics).
    #[arg(long, value_name = "FILE|DIR", help_heading = "Evaluation")]
    pub eval_data: Option<PathBuf>,
    /// Do not train: load the parameters (--init-from or --resume),
    /// evaluate --eval-data once (mean next-token loss and perplexity, as
    /// transformers computes with labels=input_ids) and exit. `autopart
    /// eval` runs this.
    #[arg(
        long,
        requires = "eval_data",
        conflicts_with_all = ["metrics", "tensorboard", "checkpoint_dir", "save_params", "eval_every"],
        help_heading = "Evaluation"
    )]
    pub eval_only: bool,
    /// With --eval-only or --generate: print one JSON object on stdout
    /// ({"loss", "perplexity", "tokens", "rows", "batches"} or {"new_ids"});
    /// other lines go to stderr.
    #[arg(long, help_heading = "Evaluation")]
    pub json: bool,
    /// Do not train: load the parameters (--init-from or --resume) and
    /// generate up to --max-new-tokens ids after --prompt-ids, with a KV
    /// cache, greedy unless --temperature is given; print them (with
    /// --json, {"new_ids": [...]}). A one-process plan only. `autopart
    /// generate` runs this.
    #[arg(
        long,
        requires = "prompt",
        conflicts_with_all = ["eval_only", "metrics", "tensorboard", "checkpoint_dir", "save_params"],
        help_heading = "Generation"
    )]
    pub generate: bool,
    /// The prompt's token ids, comma-separated.
    #[arg(
        long,
        value_name = "ID,ID,...",
        value_delimiter = ',',
        requires = "generate",
        group = "prompt",
        help_heading = "Generation"
    )]
    pub prompt_ids: Vec<i64>,
    /// Several prompts, each continued on its own: FILE.json {"input_ids":
    /// [[...], ...]}; with --json, "new_ids" is then a list per prompt.
    #[arg(
        long,
        value_name = "FILE",
        requires = "generate",
        group = "prompt",
        help_heading = "Generation"
    )]
    pub prompts: Option<PathBuf>,
    /// The most ids to generate.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 32,
        value_parser = value_parser!(u32).range(1..=1_000_000),
        help_heading = "Generation"
    )]
    pub max_new_tokens: u32,
    /// Sample from softmax(logits / T) instead of taking the most likely
    /// id (drawn from --seed).
    #[arg(long, value_name = "T", value_parser = positive, allow_negative_numbers = true, help_heading = "Generation")]
    pub temperature: Option<f64>,
    /// With --temperature: draw only from the most likely ids whose
    /// probabilities sum to P.
    #[arg(long, value_name = "P", default_value = "1", value_parser = parse_top_p, allow_negative_numbers = true, help_heading = "Generation")]
    pub top_p: f64,
    /// End-of-sequence ids (comma-separated): generation stops after one.
    #[arg(
        long,
        value_name = "ID,ID,...",
        value_delimiter = ',',
        help_heading = "Generation"
    )]
    pub eos_ids: Vec<i64>,
    /// Evaluate every N steps too.
    #[arg(
        long,
        value_name = "N",
        requires = "eval_data",
        value_parser = value_parser!(u64).range(1..),
        help_heading = "Evaluation"
    )]
    pub eval_every: Option<u64>,
    /// Evaluate on the first K global batches of --eval-data only.
    /// Default: all of it.
    #[arg(
        long,
        value_name = "K",
        requires = "eval_data",
        value_parser = value_parser!(u64).range(1..),
        help_heading = "Evaluation"
    )]
    pub eval_batches: Option<u64>,
    /// With --eval-only: also write the logits of the first evaluation
    /// batch to FILE, a safetensors file holding `logits`, `[rows, seq,
    /// vocab]` in f32 (the whole batch, gathered from the last pipeline
    /// stage's ranks), to compare with another implementation's.
    #[arg(
        long,
        value_name = "FILE",
        requires = "eval_only",
        help_heading = "Evaluation"
    )]
    pub logits: Option<PathBuf>,
    /// Seed of the parameters and of the synthetic data.
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub seed: u64,
    /// Peak learning rate.
    #[arg(
        long,
        value_name = "LR",
        default_value = "3e-4",
        value_parser = non_negative,
        allow_negative_numbers = true
    )]
    pub lr: f64,
    /// Final learning rate of the cosine decay [default: lr / 10].
    #[arg(long, value_name = "LR", value_parser = non_negative, allow_negative_numbers = true)]
    pub min_lr: Option<f64>,
    /// Linear warm-up steps.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub warmup: u64,
    /// AdamW weight decay.
    #[arg(
        long,
        value_name = "WD",
        default_value = "0.01",
        value_parser = non_negative,
        allow_negative_numbers = true
    )]
    pub weight_decay: f64,
    /// Clip the global gradient norm to NORM; 0 turns clipping off.
    // Fully qualified: clap's derive would otherwise make the flag optional.
    #[allow(unused_qualifications)]
    #[arg(
        long,
        value_name = "NORM",
        default_value = "1.0",
        value_parser = parse_clip,
        allow_negative_numbers = true
    )]
    pub clip: std::option::Option<f64>,
    /// AdamW epsilon.
    #[arg(
        long,
        value_name = "EPS",
        default_value = "1e-8",
        value_parser = non_negative,
        allow_negative_numbers = true
    )]
    pub adam_eps: f64,
    /// Gradient bucket size in MiB (fractions allowed).
    #[arg(
        id = "bucket_mb",
        long = "bucket-mb",
        value_name = "MB",
        default_value = DEFAULT_BUCKET_MB,
        value_parser = parse_bucket_mb,
        allow_negative_numbers = true
    )]
    pub bucket_bytes: usize,
    /// Torch threads per process.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1,
        value_parser = value_parser!(i32).range(1..=MAX_THREADS)
    )]
    pub threads: i32,
    /// After the last step, each rank writes its parameters as it holds them
    /// (its pipeline stage, its tp shards, under their names) to
    /// DIR/rank-<global rank>.safetensors; under ZeRO-3 they are gathered
    /// over dp first. Each file is written atomically.
    #[arg(long, value_name = "DIR")]
    pub save_params: Option<PathBuf>,
    /// Save checkpoints into DIR/step_N (each rank its own shards, a
    /// COMPLETE manifest written last); always after the last step.
    #[arg(long, value_name = "DIR", help_heading = "Checkpoints")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Also save every N steps.
    #[arg(
        long,
        value_name = "N",
        requires = "checkpoint_dir",
        value_parser = value_parser!(u64).range(1..),
        help_heading = "Checkpoints"
    )]
    pub checkpoint_every: Option<u64>,
    /// Keep only the newest K complete checkpoints (older ones are deleted
    /// after the newest is complete). Default: keep all.
    #[arg(
        long,
        value_name = "K",
        requires = "checkpoint_dir",
        value_parser = value_parser!(u64).range(1..),
        help_heading = "Checkpoints"
    )]
    pub keep: Option<u64>,
    /// Write checkpoints in a background thread while training goes on
    /// (the state is copied at the step boundary; the next save waits for
    /// the previous one; a failed write stops the run).
    #[arg(long, requires = "checkpoint_dir", help_heading = "Checkpoints")]
    pub async_checkpoint: bool,
    /// Resume from a checkpoint: `latest` (the newest complete one in
    /// --checkpoint-dir; an error if there is none), `auto` (the same, or a
    /// fresh start if there is none: what an automatic restart passes), a
    /// step number (DIR/step_N) or a checkpoint folder. Any plan and
    /// process count can resume any checkpoint of the same model.
    #[arg(
        long,
        value_name = "latest|auto|STEP|PATH",
        help_heading = "Checkpoints"
    )]
    pub resume: Option<Resume>,
    /// On resume, use this run's learning-rate schedule and AdamW settings
    /// even where they differ from the checkpoint's (otherwise a difference
    /// is an error).
    #[arg(long, requires = "resume", help_heading = "Checkpoints")]
    pub override_optim_settings: bool,
    /// Stop after step N (after saving a checkpoint with
    /// --checkpoint-dir), keeping --steps as the length of the schedule:
    /// for runs split over time-limited jobs.
    #[arg(
        long,
        value_name = "N",
        value_parser = value_parser!(u64).range(1..),
        help_heading = "Checkpoints"
    )]
    pub exit_at_step: Option<u64>,
    /// When a step's loss or gradient norm is not finite (NaN or Inf), skip
    /// its update (counted in the metrics' skipped_steps) instead of
    /// stopping the run. Either way no update and no checkpoint is made from
    /// non-finite values.
    #[arg(long)]
    pub skip_nonfinite_steps: bool,
    /// Do not return the heap's free pages to the system between
    /// micro-batches (`malloc_trim`; a few percent of step time on the
    /// memory benchmark, for 5-15% less resident memory).
    #[arg(long)]
    pub no_malloc_trim: bool,
    /// Under ZeRO-3, gather each layer's weights when it runs instead of one
    /// layer ahead on a thread of its own (which needs MPI with
    /// MPI_THREAD_MULTIPLE and holds two layers' weights at a time).
    #[arg(long)]
    pub no_prefetch: bool,
    /// End the job when a collective or point-to-point transfer has not
    /// completed after SECONDS (a rank stopped or hung), with a message
    /// naming the rank, the operation and the step; 0 waits forever.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value = "600",
        value_parser = parse_timeout,
        allow_negative_numbers = true
    )]
    pub collective_timeout: f64,
}

/// `--bucket-mb`'s default: [`DEFAULT_BUCKET_BYTES`] in MiB.
const DEFAULT_BUCKET_MB: &str = "25";
const _: () = assert!(DEFAULT_BUCKET_BYTES == 25 << 20, "update DEFAULT_BUCKET_MB");

impl Default for Options {
    fn default() -> Self {
        match Options::try_parse_from(["PLAN_BINARY"]) {
            Ok(o) => o,
            // The defaults are literals checked by the unit tests.
            Err(e) => panic!("the default flags do not parse: {e}"),
        }
    }
}

fn parse_dtype(value: &str) -> Result<TokenDtype, DataError> {
    value.parse()
}

fn positive(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err("expected a finite number > 0".into()),
    }
}

fn non_negative(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err("expected a finite number >= 0".into()),
    }
}

/// `--threads`' ceiling: far above any machine's cores, low enough that
/// libtorch's pools are never asked for billions of threads.
const MAX_THREADS: i64 = 4096;

/// `--collective-timeout`: seconds that fit a `Duration` (below 2^64).
fn parse_timeout(value: &str) -> Result<f64, String> {
    let s = non_negative(value)?;
    match std::time::Duration::try_from_secs_f64(s) {
        Ok(_) => Ok(s),
        Err(_) => Err("expected seconds below 2^64 (0 waits forever)".into()),
    }
}

fn parse_top_p(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(p) if p > 0.0 && p <= 1.0 => Ok(p),
        _ => Err(format!("'{value}' is not a probability in (0, 1]")),
    }
}

fn parse_clip(value: &str) -> Result<Option<f64>, String> {
    let c = non_negative(value)?;
    Ok((c > 0.0).then_some(c))
}

fn parse_bucket_mb(value: &str) -> Result<usize, String> {
    let bytes = non_negative(value)? * (1u64 << 20) as f64;
    if !(1.0..=usize::MAX as f64).contains(&bytes) {
        return Err("expected a positive size in MiB".into());
    }
    Ok(bytes as usize)
}

impl Options {
    /// The watchdog's timeout; `None` for `--collective-timeout 0`.
    pub fn collective_timeout(&self) -> Option<std::time::Duration> {
        std::time::Duration::try_from_secs_f64(self.collective_timeout)
            .ok()
            .filter(|d| !d.is_zero())
    }

    /// The optimizer these flags ask for, with ZeRO stage `zero`.
    pub fn optim_config(&self, zero: ZeroStage) -> OptimConfig {
        OptimConfig {
            adamw: AdamW {
                eps: self.adam_eps,
                weight_decay: self.weight_decay,
                ..AdamW::default()
            },
            lr: LrSchedule {
                peak_lr: self.lr,
                warmup_steps: self.warmup,
                total_steps: self.steps,
                min_lr: self.min_lr.unwrap_or(self.lr / 10.0),
            },
            max_norm: self.clip,
            bucket_bytes: self.bucket_bytes,
            zero,
            reduce: tch::Kind::Float,
        }
    }
}

/// The `--help` text.
pub fn help() -> String {
    Options::command().render_help().to_string()
}

/// What the command line asks for.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// `--help` / `-h`: print this text and exit.
    Help(String),
    Train(Box<Options>),
}

/// Parses the flags (without the program name). Each flag takes its value
/// as the next argument or after `=`; a flag given twice keeps the last value.
pub fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Command, AppError> {
    let argv = std::iter::once("PLAN_BINARY".to_string()).chain(args);
    let o = match Options::try_parse_from(argv) {
        Ok(o) => o,
        Err(e) if e.kind() == ErrorKind::DisplayHelp => return Ok(Command::Help(e.to_string())),
        Err(e) => return Err(usage(e)),
    };
    if o.json && !(o.eval_only || o.generate) {
        let e = Options::command().error(
            ErrorKind::MissingRequiredArgument,
            "--json prints the result of --eval-only or --generate: pass one of them",
        );
        return Err(usage(e));
    }
    if let Err(e) = o.optim_config(ZeroStage::Off).validate() {
        let e = Options::command().error(ErrorKind::ValueValidation, e);
        return Err(usage(e));
    }
    Ok(Command::Train(Box::new(o)))
}

/// A clap error as a usage error: its message, a usage line and the hint
/// to `--help`, without clap's `error: ` (the report adds its own).
fn usage(e: clap::Error) -> AppError {
    let text = e.render().to_string();
    let text = text.trim_end();
    AppError::Usage(text.strip_prefix("error: ").unwrap_or(text).to_string())
}

/// What can stop a run.
#[derive(Debug, Error)]
pub enum AppError {
    /// Bad flags: clap's message with the usage line.
    #[error("{0}")]
    Usage(String),
    #[error(
        "this plan runs on {want} processes (plan {plan} GPUs x {replicas} replica{}) but the launcher started {got}; run it with mpirun -np {want}",
        if *replicas == 1 { "" } else { "s" }
    )]
    World {
        want: usize,
        plan: usize,
        replicas: usize,
        got: usize,
    },
    #[error("plan metadata: {0}")]
    Meta(String),
    /// Started by a launcher MPI cannot use (srun without PMI).
    #[error("{0}")]
    Launch(String),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("metrics: {0}")]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error(transparent)]
    Optim(#[from] OptimError),
    #[error("resume: {0}")]
    Resume(#[from] CkptError),
    #[error("resume: {0}")]
    ResumeMismatch(String),
    #[error(
        "step {step}: the loss is {loss} and the gradient norm {grad_norm}: not finite, so the run stops before the update; {}; pass --skip-nonfinite-steps to skip such steps instead",
        match latest { Some(s) => format!("the latest complete checkpoint, step_{s}, holds finite state"), None => "no checkpoint was written from it".into() }
    )]
    NonFinite {
        step: u64,
        loss: f64,
        grad_norm: f64,
        latest: Option<u64>,
    },
    /// A checkpoint that one rank could not read (not alike on every rank).
    #[error("resume: {0}")]
    Restore(CkptError),
    #[error(transparent)]
    Save(#[from] SaveError),
    /// The `--init-from` folder, checked before training (alike on every rank).
    #[error(transparent)]
    Init(#[from] crate::init::InitError),
    #[error(transparent)]
    Generate(#[from] crate::generate::GenError),
    /// This rank's shards of `--init-from`.
    #[error("{0}")]
    InitLoad(crate::init::InitError),
    /// Another rank could not load its `--init-from` shards (it reports why).
    #[error("--init-from: {0} rank(s) could not load their parameters (see their message)")]
    InitElsewhere(usize),
    #[error("--save-params: {}: {source}", path.display())]
    SaveParams {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--logits: {}: {source}", path.display())]
    Logits {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl AppError {
    /// The process's exit status for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            AppError::Usage(_) | AppError::World { .. } | AppError::Launch(_) => 2,
            _ => 1,
        }
    }

    /// Whether every rank meets this error alike (so rank 0 alone reports it).
    fn alike_on_every_rank(&self) -> bool {
        matches!(
            self,
            AppError::Usage(_)
                | AppError::World { .. }
                | AppError::Launch(_)
                | AppError::Meta(_)
                | AppError::Data(_)
                | AppError::Resume(_)
                | AppError::ResumeMismatch(_)
                | AppError::Init(_)
                | AppError::Save(SaveError::Failed { .. })
                | AppError::NonFinite { .. }
        )
    }
}

/// The process count and this process's rank as the launcher set them in
/// the environment (Open MPI, MPICH/PMI, PMIx, Slurm), before MPI starts.
pub use autopart_vocab::launcher::Launcher;

fn check_world(meta: &PlanMeta, got: usize) -> Result<(), AppError> {
    if got != meta.runtime_gpus {
        return Err(AppError::World {
            want: meta.runtime_gpus,
            plan: meta.plan_gpus,
            replicas: meta.replicas(),
            got,
        });
    }
    Ok(())
}

/// The `main` of a plan binary: runs [`run`] on the process's arguments and
/// turns its error into an `error: …` line and an exit status.
pub fn main(meta: &PlanMeta, build: impl Fn(StageCtx) -> BuiltStage) -> ExitCode {
    run(meta, &build, std::env::args().skip(1))
}

/// [`main`] with explicit arguments (without the program name).
pub fn run(
    meta: &PlanMeta,
    build: &dyn Fn(StageCtx) -> BuiltStage,
    args: impl IntoIterator<Item = String>,
) -> ExitCode {
    // Before any tensor: freed memory goes back to the system (malloc.rs).
    crate::malloc::pin_mmap_threshold();
    let launcher = Launcher::from_env();
    // Rank 0 reports every error; other ranks only those of their own.
    let report = |e: &AppError, rank: usize| {
        if rank == 0 {
            eprintln!("error: {e}");
        } else if !e.alike_on_every_rank() {
            eprintln!("error: rank {rank}: {e}");
        }
    };
    let rank = launcher.rank.unwrap_or(0);
    let prepared = match prepare(meta, &launcher, args) {
        Ok(Some(p)) => p,
        Ok(None) => {
            if rank == 0 {
                say(help().trim_end());
            }
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            report(&e, rank);
            return ExitCode::from(e.exit_code());
        }
    };
    let world = match MpiComm::init_world() {
        Ok(w) => w,
        Err(e) => {
            let e = AppError::from(e);
            report(&e, rank);
            return ExitCode::from(e.exit_code());
        }
    };
    let rank = world.rank();
    if let Err(e) = check_world(meta, world.size()) {
        report(&e, rank);
        return ExitCode::from(e.exit_code());
    }
    let comms = match MeshComms::new(world, meta.runtime_mesh()) {
        Ok(c) => c,
        Err(e) => {
            let e = AppError::from(e);
            report(&e, rank);
            return ExitCode::from(e.exit_code());
        }
    };
    match train(meta, build, prepared, &comms) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.alike_on_every_rank() => {
            report(&e, rank);
            ExitCode::from(e.exit_code())
        }
        Err(e) => {
            report(&e, rank);
            // Other ranks may wait for this one in a collective: end the job.
            use mpi::traits::Communicator as _;
            comms.world.raw().abort(i32::from(e.exit_code()))
        }
    }
}

/// Prints a line of the console output of a run (rank 0's job). A closed
/// stdout (`| head`) does not stop training: the line is dropped.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

/// A console line that is not a result: on stdout, or on stderr when stdout
/// is for one JSON object (`--eval-only --json`).
fn note(opts: &Options, line: &str) {
    if opts.json {
        eprintln!("{line}");
    } else {
        say(line);
    }
}

/// Everything a run checks and opens before MPI starts.
#[derive(Debug)]
struct Prepared {
    opts: Options,
    data: Source,
    eval: Option<EvalSet>,
    metrics: Option<MetricsLog>,
    /// `--tensorboard`'s writer (rank 0).
    tensorboard: Option<EventWriter>,
    resume: Option<ResumeFrom>,
    /// `--init-from`, opened; `None` when resuming from a checkpoint.
    init: Option<InitFrom>,
    /// What rank 0 says about the resume before training.
    notes: Vec<String>,
}

/// The checkpoint a run resumes from.
#[derive(Debug)]
struct ResumeFrom {
    path: PathBuf,
    manifest: Manifest,
}

/// Parses the flags and checks the plan, the launcher's process count, the
/// data and the checkpoint to resume from (and that its optimizer settings
/// are this run's); opens the metrics file on rank 0 (keeping the lines up
/// to the resumed step). `None` for `--help`.
fn prepare(
    meta: &PlanMeta,
    launcher: &Launcher,
    args: impl IntoIterator<Item = String>,
) -> Result<Option<Prepared>, AppError> {
    let opts = match parse_args(args)? {
        Command::Help(_) => return Ok(None),
        Command::Train(o) => *o,
    };
    meta.validate()?;
    if let Some(hint) = launcher.missing_pmi("autopart run OUT") {
        return Err(AppError::Launch(hint));
    }
    if let Some(size) = launcher.size {
        check_world(meta, size)?;
    }
    let data = Source::open(
        opts.data.as_deref(),
        opts.data_dtype,
        meta.vocab,
        meta.seq_len,
        opts.seed,
    )?;
    let eval = match &opts.eval_data {
        Some(path) => Some(EvalSet::open(
            path,
            opts.data_dtype,
            meta.vocab,
            meta.seq_len,
        )?),
        None => None,
    };
    if let Some(dir) = &opts.save_params {
        std::fs::create_dir_all(dir).map_err(|source| AppError::SaveParams {
            path: dir.clone(),
            source,
        })?;
    }
    let mut notes = Vec::new();
    let resume = match &opts.resume {
        None => None,
        Some(spec) => {
            let found = ckpt::resolve(spec, opts.checkpoint_dir.as_deref())?;
            for l in &found.skipped {
                notes.push(format!(
                    "ignoring {}: {}",
                    l.path.display(),
                    l.status.name()
                ));
            }
            match found.path {
                None => {
                    notes.push(format!(
                        "no complete checkpoint in {}: starting from step 0",
                        opts.checkpoint_dir
                            .as_deref()
                            .unwrap_or(Path::new("."))
                            .display()
                    ));
                    None
                }
                Some(path) => {
                    let manifest = ckpt::read_manifest(&path)?;
                    check_resume(meta, &opts, &data, &path, &manifest, &mut notes)?;
                    Some(ResumeFrom { path, manifest })
                }
            }
        }
    };
    if let Some(dir) = &opts.checkpoint_dir {
        std::fs::create_dir_all(dir).map_err(|error| {
            AppError::Resume(CkptError::Io {
                path: dir.clone(),
                error,
            })
        })?;
    }
    let init = match (&opts.init_from, &resume) {
        (Some(dir), None) => {
            let from = InitFrom::open(dir)?;
            if let InitFrom::Hf(hf) = &from {
                hf.check_config(meta.hf_config)?;
            }
            Some(from)
        }
        (Some(dir), Some(r)) => {
            notes.push(format!(
                "--init-from {} is not used: resuming from {}",
                dir.display(),
                r.path.display()
            ));
            None
        }
        (None, _) => None,
    };
    // A resumed run's metrics file is opened once the state is loaded.
    let metrics = match (&opts.metrics, launcher.rank.unwrap_or(0), &resume) {
        (Some(path), 0, None) => Some(MetricsLog::create(path)?),
        _ => None,
    };
    let tensorboard = match (&opts.tensorboard, launcher.rank.unwrap_or(0)) {
        (Some(dir), 0) => Some(EventWriter::create(dir)?),
        _ => None,
    };
    Ok(Some(Prepared {
        opts,
        data,
        eval,
        metrics,
        tensorboard,
        resume,
        init,
        notes,
    }))
}

/// The optimizer settings the flags ask for, as a checkpoint records them.
fn optim_settings(opts: &Options) -> ckpt::OptimSettings {
    let c = opts.optim_config(ZeroStage::Off);
    ckpt::OptimSettings {
        peak_lr: c.lr.peak_lr,
        min_lr: c.lr.min_lr,
        warmup_steps: c.lr.warmup_steps,
        total_steps: c.lr.total_steps,
        beta1: c.adamw.beta1,
        beta2: c.adamw.beta2,
        eps: c.adamw.eps,
        weight_decay: c.adamw.weight_decay,
        clip: c.max_norm,
    }
}

/// Checks a checkpoint against this run before anything is built: the same
/// vocabulary and sequence length, and (unless --override-optim-settings)
/// the same learning-rate schedule and AdamW settings. Differences in data
/// or seed are reported in `notes`, not refused (continuing on new data is
/// legitimate).
fn check_resume(
    meta: &PlanMeta,
    opts: &Options,
    data: &Source,
    path: &Path,
    m: &Manifest,
    notes: &mut Vec<String>,
) -> Result<(), AppError> {
    let refuse = |msg: String| {
        Err(AppError::ResumeMismatch(format!(
            "{}: {msg}",
            path.display()
        )))
    };
    if m.plan.vocab != meta.vocab {
        return refuse(format!(
            "it was trained with a vocabulary of {}, this plan has {}",
            m.plan.vocab, meta.vocab
        ));
    }
    let want = optim_settings(opts);
    let got = m.optim;
    let mut diffs = Vec::new();
    let mut cmp = |name: &str, a: f64, b: f64| {
        if a != b {
            diffs.push(format!("{name} {b} (checkpoint) vs {a} (flags)"));
        }
    };
    cmp("--lr", want.peak_lr, got.peak_lr);
    cmp("--min-lr", want.min_lr, got.min_lr);
    cmp(
        "--warmup",
        want.warmup_steps as f64,
        got.warmup_steps as f64,
    );
    cmp("--steps", want.total_steps as f64, got.total_steps as f64);
    cmp("--adam-eps", want.eps, got.eps);
    cmp("--weight-decay", want.weight_decay, got.weight_decay);
    cmp("beta1", want.beta1, got.beta1);
    cmp("beta2", want.beta2, got.beta2);
    cmp("--clip", want.clip.unwrap_or(0.0), got.clip.unwrap_or(0.0));
    if !diffs.is_empty() {
        // An evaluation does not step the optimizer: its settings do not matter.
        if !opts.override_optim_settings && !opts.eval_only {
            return refuse(format!(
                "the optimizer settings differ: {}; pass the checkpoint's values, or --override-optim-settings to use this run's",
                diffs.join(", ")
            ));
        }
        notes.push(format!(
            "--override-optim-settings: using this run's {}",
            diffs.join(", ")
        ));
    }
    if m.plan.seq_len != meta.seq_len {
        notes.push(format!(
            "the checkpoint trained on sequences of {} tokens, this plan on {}",
            m.plan.seq_len, meta.seq_len
        ));
    }
    let here = data.position(opts.data_dtype, m.step);
    let same_data = match (&m.data, &here) {
        (
            ckpt::DataPosition::Synthetic { seed: a, .. },
            ckpt::DataPosition::Synthetic { seed: b, .. },
        ) => a == b,
        (
            ckpt::DataPosition::Tokens {
                path: a, tokens: n, ..
            },
            ckpt::DataPosition::Tokens {
                path: b, tokens: k, ..
            },
        ) => a == b && n == k,
        (
            ckpt::DataPosition::Prepared {
                path: a,
                rows: n,
                tokens_fnv1a: x,
                seed: s,
                ..
            },
            ckpt::DataPosition::Prepared {
                path: b,
                rows: k,
                tokens_fnv1a: y,
                seed: t,
                ..
            },
        ) => a == b && n == k && x == y && s == t,
        _ => false,
    };
    if !same_data {
        notes.push(format!(
            "the checkpoint's data was {:?}; this run reads {:?} from step {}",
            m.data, here, m.step
        ));
    }
    Ok(())
}

/// The manifest of a checkpoint of `step` (files and tensors are filled in
/// when it completes).
fn manifest(
    meta: &PlanMeta,
    opts: &Options,
    world: usize,
    step: u64,
    optimizer_steps: u64,
    data: &Source,
) -> Manifest {
    Manifest {
        format: ckpt::FORMAT,
        autopart_version: env!("CARGO_PKG_VERSION").to_string(),
        step,
        model: meta.model.to_string(),
        plan: ckpt::PlanIdentity {
            hash: meta.plan_hash.to_string(),
            tp: meta.tp,
            pp: meta.pp,
            dp: meta.dp,
            plan_gpus: meta.plan_gpus,
            runtime_gpus: meta.runtime_gpus,
            schedule: meta.schedule.to_string(),
            zero: meta.zero.number(),
            micro_batch: meta.micro_batch,
            micro_batches: meta.micro_batches,
            seq_len: meta.seq_len,
            vocab: meta.vocab,
        },
        world_size: world,
        optim: optim_settings(opts),
        optimizer_steps,
        data: data.position(opts.data_dtype, step),
        rng: ckpt::RngState {
            seed: opts.seed,
            note: "parameters are drawn from (seed, name); training draws no random numbers (no dropout); synthetic batches are drawn from seed + step, a prepared folder's order from seed + epoch".into(),
        },
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        tensors: Default::default(),
        files: vec![],
        model_config: serde_json::from_str(meta.hf_config).ok(),
        loss_scale: None,
    }
}

/// Casts every floating-point parameter to `kind` in place (`set_data`, so
/// every handle the stage holds sees it); the values were drawn in f32.
fn cast_params(params: &mut [Param], kind: tch::Kind) -> Result<(), AppError> {
    for p in params.iter_mut() {
        let k = p.tensor.kind();
        if k != kind && matches!(k, tch::Kind::Float | tch::Kind::Double) {
            let data = p
                .tensor
                .f_detach()
                .and_then(|t| t.f_to_kind(kind))
                .map_err(ExecError::from)?;
            p.tensor.f_set_data(&data).map_err(ExecError::from)?;
        }
    }
    Ok(())
}

/// Builds this rank's stage and runs the training loop.
fn train(
    meta: &PlanMeta,
    build: &dyn Fn(StageCtx) -> BuiltStage,
    prepared: Prepared,
    comms: &MeshComms<MpiComm>,
) -> Result<(), AppError> {
    let Prepared {
        opts,
        mut data,
        mut eval,
        mut metrics,
        mut tensorboard,
        resume,
        init,
        notes,
    } = prepared;
    tch::set_num_threads(opts.threads);
    crate::malloc::set_trim(!opts.no_malloc_trim);
    if let Some(timeout) = opts.collective_timeout() {
        crate::watchdog::start(comms.world.rank(), timeout);
    }
    let g = Groups::of(comms);
    let rank0 = comms.world.rank() == 0;
    let mesh = comms.mesh;
    let baseline = Memory::current().map(|m| m.rss);
    let mut stage = build(StageCtx {
        coord: comms.coord,
        mesh,
        seed: opts.seed,
    })?;
    cast_params(stage.params_mut(), crate::exec::kind_of_dtype(meta.dtype))?;
    let plan = PipelinePlan {
        mesh,
        coord: comms.coord,
        schedule: meta.schedule,
        micro_batches: meta.micro_batches,
    };
    // Counted before ZeRO-3 releases the parameters.
    let n_params: usize = stage.params().iter().map(|p| p.tensor.numel()).sum();
    // Tied weights' copies on the last stage are counted by the first.
    let uncounted = if comms.coord.pp > 0 {
        stage.pp_tied()
    } else {
        Vec::new()
    };
    let flops = FlopCount::of_model(
        model_params(stage.params(), comms, &uncounted)?,
        meta.seq_len as u64,
        meta.hf_config,
    );
    if let Some(from) = &init {
        let t0 = Instant::now();
        let local = crate::init::load(from, stage.params_mut(), comms.coord.tp, mesh.tp);
        // Every rank learns whether any failed (a missing tensor may be on one stage only).
        let failed = f64::from(u8::from(local.is_err()));
        let failed = comms.world.all_reduce(&Tensor::from_slice(&[failed]))?;
        let failed = failed.f_double_value(&[0]).map_err(ExecError::from)?;
        match local {
            Err(e) => return Err(AppError::InitLoad(e)),
            Ok(()) if failed > 0.0 => {
                return Err(AppError::InitElsewhere(failed as usize));
            }
            Ok(()) => {}
        }
        if rank0 {
            note(
                &opts,
                &format!(
                    "initialised from {} in {:.2} s",
                    opts.init_from
                        .as_deref()
                        .unwrap_or(Path::new("?"))
                        .display(),
                    t0.elapsed().as_secs_f64()
                ),
            );
        }
    }
    let blocks = stage.blocks();
    let mut optim = opts.optim_config(meta.zero);
    optim.reduce = crate::exec::kind_of_dtype(meta.reduce_dtype);
    let mut opt = DpOptimizer::for_stage(optim, stage.params_mut(), &g, &uncounted, &blocks)?;
    // ZeRO-3 gathers the next layer ahead on a thread of its own, over a
    // duplicate of the dp group (every dp rank decides alike: same stage).
    let prefetching =
        if meta.zero == ZeroStage::Three && mesh.dp > 1 && blocks.len() > 1 && !opts.no_prefetch {
            match comms.dp.duplicate().into_sendable() {
                Some(dp) => opt.prefetch_over(dp)?,
                None => false,
            }
        } else {
            false
        };
    if rank0 {
        note(
            &opts,
            &format!(
                "{}: tp {} x pp {} x dp {} ({} x the {}-GPU plan), {:?}, ZeRO {:?}, {}{}, {} micro-batches of {}, seq {}, {} parameters on rank 0",
                meta.model,
                mesh.tp,
                mesh.pp,
                mesh.dp,
                meta.replicas(),
                meta.plan_gpus,
                meta.schedule,
                meta.zero,
                meta.dtype,
                match (meta.dtype, meta.reduce_dtype) {
                    (DType::Fp32, DType::Fp32) => String::new(),
                    (DType::Fp32, r) => format!(" (gradients reduced in {r})"),
                    (_, r) => format!(
                        " (f32 master weights, gradients reduced in {r}{})",
                        match opt.scaler() {
                            Some(s) => format!(", dynamic loss scale from {}", s.scale),
                            None => String::new(),
                        }
                    ),
                },
                meta.micro_batches,
                meta.micro_batch,
                meta.seq_len,
                n_params
            ),
        );
        if meta.zero == ZeroStage::Three && mesh.dp > 1 && blocks.len() > 1 {
            note(
                &opts,
                if prefetching {
                    "ZeRO-3: each layer's weights are gathered one layer ahead (prefetch thread)"
                } else if opts.no_prefetch {
                    "ZeRO-3: each layer's weights are gathered when it runs (--no-prefetch)"
                } else {
                    "ZeRO-3: each layer's weights are gathered when it runs (MPI lacks MPI_THREAD_MULTIPLE: no prefetch)"
                },
            );
        }
        for n in &notes {
            note(&opts, &format!("resume: {n}"));
        }
    }
    let mut start = 0;
    // Every rank must have found the same checkpoint (a shared filesystem).
    let mine = resume.as_ref().map_or(-1.0, |r| r.manifest.step as f64);
    let seen = comms.world.all_gather(&Tensor::from_slice(&[mine]), 0)?;
    let seen = Vec::<f64>::try_from(&seen).map_err(ExecError::from)?;
    if seen.iter().any(|&x| x != mine) {
        return Err(AppError::ResumeMismatch(format!(
            "the ranks found different checkpoints to resume from (steps by rank, -1 for none: {seen:?}): --checkpoint-dir must be on a filesystem every rank sees alike"
        )));
    }
    if let Some(r) = &resume {
        let t0 = Instant::now();
        let ck = ckpt::Checkpoint::open(&r.path).map_err(AppError::Restore)?;
        opt.restore(stage.params_mut(), &ck)?;
        if let (Some(_), Some(ls)) = (opt.scaler(), r.manifest.loss_scale) {
            opt.set_scaler(crate::zero::LossScaler {
                scale: ls.scale,
                good_steps: ls.good_steps,
                growth_interval: ls.growth_interval,
            })?;
        }
        // The checkpoint must not hold tensors this model lacks: each tensor
        // is counted once (tp rank 0, dp rank 0 of its stage).
        let mine = if comms.coord.tp == 0 && comms.coord.dp == 0 {
            stage.params().len() as f64
        } else {
            0.0
        };
        let total = comms.world.all_reduce(&Tensor::from_slice(&[mine]))?;
        let total = total.f_double_value(&[0]).map_err(ExecError::from)? as usize;
        if total != ck.manifest.tensors.len() {
            return Err(AppError::ResumeMismatch(format!(
                "{}: it holds {} tensors of model {}, this model ({}) has {total}: it is another model's checkpoint",
                r.path.display(),
                ck.manifest.tensors.len(),
                ck.manifest.model,
                meta.model
            )));
        }
        start = r.manifest.step;
        if rank0 {
            let p = &r.manifest.plan;
            note(
                &opts,
                &format!(
                    "resumed from {} (step {}, saved by tp {} x pp {} x dp {}, ZeRO {}, {} on {} processes) in {:.2} s",
                    r.path.display(),
                    start,
                    p.tp,
                    p.pp,
                    p.dp * (p.runtime_gpus / p.plan_gpus.max(1)),
                    p.zero,
                    p.schedule,
                    r.manifest.world_size,
                    t0.elapsed().as_secs_f64()
                ),
            );
        }
    }
    if opts.generate {
        if meta.runtime_gpus != 1 {
            return Err(AppError::Usage(format!(
                "--generate runs on a one-process plan; this one runs on {} (autopart generate without OUT makes one)",
                meta.runtime_gpus
            )));
        }
        opt.gather_params(stage.params_mut(), g.dp)?;
        let t0 = Instant::now();
        let decoder = crate::generate::Decoder::new(meta.hf_config, stage.params())?;
        let sampling = crate::generate::Sampling {
            max_new_tokens: opts.max_new_tokens as usize,
            temperature: opts.temperature,
            top_p: opts.top_p,
            seed: opts.seed,
            eos: opts.eos_ids.clone(),
        };
        let prompts = match &opts.prompts {
            Some(path) => JsonRows::read(path, meta.vocab, 1)?,
            None => vec![opts.prompt_ids.clone()],
        };
        let mut all = Vec::with_capacity(prompts.len());
        let mut shown = Instant::now();
        for (i, p) in prompts.iter().enumerate() {
            if shown.elapsed().as_secs_f64() >= 10.0 {
                shown = Instant::now();
                eprintln!("generate: prompt {i}/{}", prompts.len());
            }
            all.push(decoder.generate(p, &sampling)?);
        }
        let s = t0.elapsed().as_secs_f64();
        let n: usize = all.iter().map(Vec::len).sum();
        if opts.json {
            let ids = match opts.prompts {
                Some(_) => serde_json::json!(all),
                None => serde_json::json!(all[0]),
            };
            say(&serde_json::json!({ "new_ids": ids, "generate_s": s }).to_string());
        } else {
            for ids in &all {
                let list: Vec<String> = ids.iter().map(ToString::to_string).collect();
                say(&list.join(","));
            }
            note(&opts, &format!("generated {n} ids in {s:.2} s"));
        }
        return Ok(());
    }
    if opts.eval_only {
        let set = eval
            .as_mut()
            .ok_or_else(|| AppError::Usage("--eval-only needs --eval-data".into()))?;
        let t0 = Instant::now();
        let e = evaluate(
            stage.as_mut(),
            &plan,
            &g,
            &opt,
            set,
            meta.runtime_batch(),
            opts.eval_batches,
            rank0,
            opts.logits.as_deref(),
        )?;
        if rank0 {
            let perplexity = e.loss.exp();
            if opts.json {
                say(&serde_json::json!({
                    "loss": e.loss,
                    "perplexity": perplexity,
                    "tokens": e.tokens,
                    "rows": e.rows,
                    "batches": e.batches,
                    "eval_s": t0.elapsed().as_secs_f64(),
                })
                .to_string());
            } else {
                say(&format!(
                    "eval: loss {:.6}, perplexity {perplexity:.4} over {} tokens ({} rows, {} batches, {:.2} s)",
                    e.loss,
                    e.tokens,
                    e.rows,
                    e.batches,
                    t0.elapsed().as_secs_f64()
                ));
            }
        }
        return Ok(());
    }
    // The metrics file continues the resumed run's (opened only now that the
    // state is loaded, so a failed resume leaves it as it was).
    if rank0 && let (Some(path), Some(r)) = (&opts.metrics, &resume) {
        metrics = Some(MetricsLog::resume(path, r.manifest.step)?);
    }
    // Later checkpoints in the folder belong to another timeline (a run
    // that went further before this one resumed from an earlier step, or an
    // older run): moved aside, so that --resume auto and --keep never mix
    // them with this run's.
    if let (true, Some(dir)) = (rank0, &opts.checkpoint_dir) {
        for (step, to) in ckpt::supersede(dir, start)? {
            say(&format!(
                "checkpoint step_{step} is later than this run's start (step {start}): moved aside to {}",
                to.display()
            ));
        }
    }
    let mut saver = opts.checkpoint_dir.as_ref().map(|dir| {
        Saver::new(
            SaveOptions {
                dir: dir.clone(),
                every: opts.checkpoint_every,
                keep: opts.keep.map(|k| k as usize),
                background: opts.async_checkpoint,
            },
            comms.world.rank(),
            comms.world.size(),
        )
    });
    let stop = opts.exit_at_step.map_or(opts.steps, |e| e.min(opts.steps));
    let kill_at = crate::checkpoint::fault_hook(crate::checkpoint::FAULT_STEP_ENV);
    let nan_at = crate::checkpoint::fault_hook(crate::checkpoint::FAULT_NAN_ENV);
    let stop_at = crate::checkpoint::fault_hook(crate::checkpoint::FAULT_STOP_ENV);
    let mut skipped = 0u64;
    if start >= stop && rank0 {
        say(&format!(
            "the checkpoint is at step {start}: nothing to train (--steps {}{})",
            opts.steps,
            opts.exit_at_step
                .map(|e| format!(", --exit-at-step {e}"))
                .unwrap_or_default()
        ));
    }
    let batch_rows = meta.runtime_batch();
    let positions = (batch_rows * meta.seq_len) as u64;
    let devices = comms.world.size();
    let started = Instant::now();
    let mut step_times = Vec::with_capacity(opts.steps as usize);
    let mut last_over = None;
    for step in start..stop {
        crate::watchdog::set_step(step + 1);
        let t0 = Instant::now();
        let batch = data.batch(step, batch_rows)?;
        let loss_tokens = batch.loss_tokens().map_err(ExecError::from)?;
        opt.gather_for_step(stage.params_mut(), g.dp)?;
        // Every rank reads the same global batch, so all agree on this.
        let all_masked = loss_tokens == 0;
        let (mut forward_backward_s, mut optimizer_s) = (0.0, 0.0);
        let (loss, stats) = if all_masked {
            (f64::NAN, opt.skip(stage.params_mut())?)
        } else {
            let hooks = opt.hooks(stage.params(), &g);
            let t_fb = Instant::now();
            let loss = program::forward_backward_with(
                stage.as_mut(),
                &plan,
                &g,
                &batch,
                hooks.as_ref().map(|h| h as &dyn crate::exec::BlockHooks),
                opt.loss_scale(),
            )?;
            drop(hooks);
            forward_backward_s = t_fb.elapsed().as_secs_f64();
            if nan_at == Some((comms.world.rank(), step + 1)) {
                poison_a_gradient(stage.params_mut())?;
            }
            crate::malloc::trim_if_on();
            // The loss is the same on every rank, so all skip alike.
            let t_opt = Instant::now();
            let stats = if loss.is_finite() {
                opt.step(stage.params_mut(), &g)?
            } else {
                opt.skip(stage.params_mut())?
            };
            optimizer_s = t_opt.elapsed().as_secs_f64();
            (loss, stats)
        };
        if all_masked {
            skipped += 1;
            if rank0 {
                say(&format!(
                    "step {}: every label of the global batch is masked: nothing to learn, update skipped ({skipped} so far)",
                    step + 1
                ));
            }
        } else if stats.overflowed {
            // f16's loss scale finding its level: not a divergence.
            skipped += 1;
            if rank0 {
                say(&format!(
                    "step {}: the f16 gradients overflowed; update skipped, loss scale halved to {} ({skipped} skipped so far)",
                    step + 1,
                    opt.loss_scale()
                ));
            }
        } else if stats.skipped {
            if !opts.skip_nonfinite_steps {
                // The pending save holds an earlier, finite state: finish it.
                if let Some(saver) = saver.as_mut() {
                    for s in saver.finish(&comms.world)?.saved {
                        if rank0 {
                            say(&saved_line(&s, &opts));
                        }
                    }
                }
                return Err(AppError::NonFinite {
                    step: step + 1,
                    loss,
                    grad_norm: stats.grad_norm,
                    latest: opts
                        .checkpoint_dir
                        .as_deref()
                        .and_then(crate::checkpoint::latest_complete),
                });
            }
            skipped += 1;
            if rank0 {
                say(&format!(
                    "step {}: loss {loss}, gradient norm {}: not finite, update skipped ({skipped} so far)",
                    step + 1,
                    stats.grad_norm
                ));
            }
        }
        let step_s = t0.elapsed().as_secs_f64();
        step_times.push(step_s);
        let done = step + 1;
        if kill_at == Some((comms.world.rank(), done)) {
            crate::checkpoint::kill_self();
        }
        if stop_at == Some((comms.world.rank(), done)) {
            crate::checkpoint::stop_self();
        }
        let mut saved = SaveReport::default();
        if let Some(saver) = saver.as_mut() {
            saved = saver.poll(&comms.world)?;
            if saver.due(done, opts.steps) || done == stop {
                let copied = Instant::now();
                let pieces = opt.snapshot(stage.params())?;
                let mut m = manifest(meta, &opts, comms.world.size(), done, opt.steps(), &data);
                m.loss_scale = opt.scaler().map(|s| ckpt::LossScale {
                    scale: s.scale,
                    good_steps: s.good_steps,
                    growth_interval: s.growth_interval,
                });
                let r = saver.save(&comms.world, done, pieces, m, copied)?;
                saved.blocked_s += r.blocked_s;
                saved.saved.extend(r.saved);
                if done == stop {
                    // The run ends here: wait for the last save, so that its
                    // record says it is complete.
                    let r = saver.finish(&comms.world)?;
                    saved.blocked_s += r.blocked_s;
                    saved.saved.extend(r.saved);
                }
            }
        }
        let mut eval_line = None;
        let eval_loss = match eval.as_mut() {
            Some(set) if opts.eval_every.is_some_and(|n| done % n == 0) || done == stop => {
                let t0 = Instant::now();
                let e = evaluate(
                    stage.as_mut(),
                    &plan,
                    &g,
                    &opt,
                    set,
                    batch_rows,
                    opts.eval_batches,
                    false,
                    None,
                )?;
                eval_line = Some(format!(
                    "eval after step {done}: loss {:.4} over {} tokens ({} batches, {:.2} s)",
                    e.loss,
                    e.tokens,
                    e.batches,
                    t0.elapsed().as_secs_f64()
                ));
                Some(e.loss)
            }
            _ => None,
        };
        let peak = metrics::peak_over_world(baseline, &comms.world)?;
        last_over = peak.over_baseline;
        let tokens_per_s = loss_tokens as f64 / step_s.max(1e-9);
        let record = StepRecord {
            step: done,
            steps: opts.steps,
            loss,
            grad_norm: stats.grad_norm,
            lr: stats.lr,
            step_s,
            forward_backward_s,
            optimizer_s,
            loss_tokens: loss_tokens as u64,
            tokens_per_s,
            tokens_per_s_per_device: tokens_per_s / devices as f64,
            mfu: opts
                .peak_tflops
                .map(|t| flops.mfu(positions, step_s, t, devices)),
            peak_rss_bytes: peak.peak,
            rss_over_baseline_bytes: peak.over_baseline,
            rank_peaks_over_baseline_bytes: peak.ranks_over_baseline,
            checkpoint_block_s: saver.as_ref().map(|_| saved.blocked_s),
            checkpoint_saved: saved.saved.last().copied(),
            skipped_steps: skipped,
            eval_loss,
        };
        if rank0 {
            say(&record.console_line());
            if let Some(line) = &eval_line {
                say(line);
            }
            if let Some(tb) = tensorboard.as_mut() {
                tb.scalars(done, &scalars(&record))?;
            }
            for s in &saved.saved {
                say(&saved_line(s, &opts));
            }
            if let Some(log) = metrics.as_mut() {
                log.write(&record)?;
            }
        }
    }
    if let Some(saver) = saver.as_mut() {
        let r = saver.finish(&comms.world)?;
        if rank0 {
            for s in &r.saved {
                say(&saved_line(s, &opts));
            }
        }
    }
    if let Some(dir) = &opts.save_params {
        opt.gather_params(stage.params_mut(), g.dp)?;
        save_params(dir, comms.world.rank(), stage.params())?;
    }
    if rank0 {
        say(&summary(
            meta,
            started.elapsed().as_secs_f64(),
            &step_times,
            last_over,
        ));
        if let Some((used, wasted)) = opt.prefetch_counts() {
            say(&format!(
                "ZeRO-3 prefetch: {used} of {} layer gathers made ahead were used",
                used + wasted
            ));
        }
    }
    Ok(())
}

/// The scalars of `--tensorboard` for one step, under the metrics file's
/// names (unknown ones left out).
fn scalars(r: &StepRecord) -> Vec<(&'static str, f64)> {
    let mut v = vec![
        ("loss", r.loss),
        ("grad_norm", r.grad_norm),
        ("lr", r.lr),
        ("step_s", r.step_s),
        ("forward_backward_s", r.forward_backward_s),
        ("optimizer_s", r.optimizer_s),
        ("tokens_per_s", r.tokens_per_s),
        ("tokens_per_s_per_device", r.tokens_per_s_per_device),
    ];
    let known = [
        ("mfu", r.mfu),
        ("peak_rss_bytes", r.peak_rss_bytes.map(|b| b as f64)),
        ("eval_loss", r.eval_loss),
    ];
    v.extend(known.into_iter().filter_map(|(k, x)| x.map(|x| (k, x))));
    v
}

/// The model's parameters, each counted once over the world: a tp-split
/// tensor's shards add up to it, a replicated one counts on tp rank 0,
/// and dp replicas count on dp rank 0. Collective over the world.
fn model_params(
    params: &[Param],
    comms: &MeshComms<MpiComm>,
    uncounted: &[String],
) -> Result<u64, AppError> {
    let mine: usize = if comms.coord.dp == 0 {
        params
            .iter()
            .filter(|p| p.spec.counted_on(comms.coord.tp) && !uncounted.contains(&p.spec.name))
            .map(|p| p.tensor.numel())
            .sum()
    } else {
        0
    };
    let total = comms
        .world
        .all_reduce(&Tensor::from_slice(&[mine as f64]))?;
    Ok(total.f_double_value(&[0]).map_err(ExecError::from)? as u64)
}

/// A held-out loss: its mean over the labels that count, how many there
/// were and over how many batches.
#[derive(Clone, Copy, Debug, PartialEq)]
struct EvalLoss {
    loss: f64,
    tokens: u64,
    /// Rows with a label that counts.
    rows: u64,
    batches: u64,
}

/// The loss over `set` (its first `max_batches` global batches of `rows`
/// rows, or all of it), forward only: each batch's mean is weighted by its
/// count of labels that count. Nothing of the training state changes: no
/// gradient is made and the optimizer is not stepped (under ZeRO-3 the
/// parameters are gathered for it and released after). Collective.
#[allow(clippy::too_many_arguments)]
fn evaluate(
    stage: &mut dyn StageModule,
    plan: &PipelinePlan,
    g: &Groups<'_>,
    opt: &DpOptimizer,
    set: &mut EvalSet,
    rows: i64,
    max_batches: Option<u64>,
    progress: bool,
    logits: Option<&Path>,
) -> Result<EvalLoss, AppError> {
    let batches = set.batches(rows).min(max_batches.unwrap_or(u64::MAX));
    opt.gather_params(stage.params_mut(), g.dp)?;
    let (mut sum, mut tokens, mut counted_rows) = (0.0, 0u64, 0u64);
    let (t0, mut shown) = (Instant::now(), Instant::now());
    for k in 0..batches {
        // A long evaluation says where it is (stderr, every 10 s).
        if progress && shown.elapsed().as_secs_f64() >= 10.0 {
            shown = Instant::now();
            let rate = k as f64 / t0.elapsed().as_secs_f64().max(1e-9);
            eprintln!(
                "eval: batch {k}/{batches}, {tokens} tokens so far, about {:.0} s left",
                (batches - k) as f64 / rate.max(1e-9)
            );
        }
        let batch = set.batch(k, rows)?;
        let count = batch.loss_tokens().map_err(ExecError::from)?;
        if count == 0 {
            continue;
        }
        counted_rows += batch.loss_rows().map_err(ExecError::from)?;
        let loss = match logits {
            Some(path) if k == 0 => {
                let (loss, all) = program::forward_only_logits(&*stage, plan, g, &batch)?;
                // One rank of the last stage writes them.
                if let Some(t) = all
                    && g.coord.tp == 0
                    && g.coord.dp == 0
                {
                    autopart_vocab::fs::write_atomic_at(path, |tmp| {
                        Tensor::write_safetensors(&[("logits", t.contiguous())], tmp)
                            .map_err(|e| std::io::Error::other(e.to_string()))
                    })
                    .map_err(|source| AppError::Logits {
                        path: path.to_path_buf(),
                        source,
                    })?;
                }
                loss
            }
            _ => program::forward_only(&*stage, plan, g, &batch)?,
        };
        sum += loss * count as f64;
        tokens += count as u64;
    }
    opt.release_gathered(stage.params_mut())?;
    Ok(EvalLoss {
        loss: if tokens == 0 {
            f64::NAN
        } else {
            sum / tokens as f64
        },
        tokens,
        rows: counted_rows,
        batches,
    })
}

/// The test hook of `AUTOPART_FAULT_NAN_AT_STEP`: a NaN in the first
/// element of the first parameter's gradient.
fn poison_a_gradient(params: &mut [Param]) -> Result<(), AppError> {
    // The first gradient in `.grad()` (streamed ones are not there).
    if let Some(p) = params
        .iter()
        .find(|p| p.tensor.grad().defined() && p.tensor.grad().numel() > 0)
    {
        let g = p.tensor.grad();
        {
            tch::no_grad(|| -> Result<(), tch::TchError> {
                let _ = g.f_view([-1])?.f_narrow(0, 0, 1)?.f_fill_(f64::NAN)?;
                Ok(())
            })
            .map_err(ExecError::from)?;
        }
    }
    Ok(())
}

/// `checkpoint step_10 saved: 12.3 MiB in 0.41 s (ck/step_10)`
fn saved_line(s: &crate::checkpoint::Saved, opts: &Options) -> String {
    let dir = opts.checkpoint_dir.as_deref().unwrap_or(Path::new("."));
    format!(
        "checkpoint step_{} saved: {:.1} MiB in {:.2} s ({})",
        s.step,
        s.bytes as f64 / f64::from(1 << 20),
        s.seconds,
        ckpt::step_dir(dir, s.step).display()
    )
}

/// The file of `--save-params` that global rank `rank` writes into `dir`.
pub fn params_file(dir: &Path, rank: usize) -> PathBuf {
    dir.join(format!("rank-{rank}.safetensors"))
}

/// Writes `params` (as this rank holds them, under their names) to
/// [`params_file`]`(dir, rank)`, atomically (`autopart_vocab::fs`: a
/// temporary sibling, fsynced, renamed; removed if the write fails).
pub fn save_params(dir: &Path, rank: usize, params: &[Param]) -> Result<PathBuf, AppError> {
    let path = params_file(dir, rank);
    let tensors: Vec<(&str, Tensor)> = params
        .iter()
        .map(|p| (p.spec.name.as_str(), p.tensor.detach().contiguous()))
        .collect();
    autopart_vocab::fs::write_atomic_at(&path, |tmp| {
        Tensor::write_safetensors(&tensors, tmp).map_err(|e| std::io::Error::other(e.to_string()))
    })
    .map_err(|source| AppError::SaveParams {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// The closing line: measured against predicted step time and memory.
fn summary(meta: &PlanMeta, total_s: f64, step_times: &[f64], over: Option<u64>) -> String {
    let mut sorted = step_times.to_vec();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    let mut line = format!(
        "done: {} steps in {total_s:.1} s, median step {median:.3} s (predicted {:.3} s)",
        step_times.len(),
        meta.predicted_step_s
    );
    if let Some(over) = over {
        line += &format!(", peak rss +{} MiB over baseline", over >> 20);
    }
    if let Some(max) = meta.predicted_peak_bytes.iter().max() {
        line += &format!(" (predicted peak {} MiB per stage)", max >> 20);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    const META: PlanMeta = PlanMeta {
        model: "llama-mini",
        plan_hash: "",
        vocab: 256,
        seq_len: 16,
        global_batch: 4,
        micro_batch: 1,
        micro_batches: 2,
        tp: 2,
        pp: 2,
        dp: 2,
        plan_gpus: 8,
        runtime_gpus: 16,
        schedule: Schedule::OneFOneB,
        zero: ZeroStage::One,
        dtype: DType::Fp32,
        reduce_dtype: DType::Fp32,
        predicted_peak_bytes: &[1 << 30, 1 << 29],
        predicted_step_s: 0.1,
        hf_config: "",
    };

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    fn usage_msg(r: Result<Command, AppError>) -> String {
        match r {
            Err(e @ AppError::Usage(_)) => {
                assert_eq!(e.exit_code(), 2);
                e.to_string()
            }
            other => panic!("expected a usage error, got {other:?}"),
        }
    }

    #[test]
    fn flags_parse_with_defaults_and_both_value_styles() {
        let defaults = Options::default();
        assert_eq!(
            defaults,
            Options {
                steps: 10,
                data: None,
                init_from: None,
                data_dtype: TokenDtype::U16,
                metrics: None,
                tensorboard: None,
                peak_tflops: None,
                eval_data: None,
                eval_only: false,
                logits: None,
                json: false,
                generate: false,
                prompt_ids: vec![],
                prompts: None,
                max_new_tokens: 32,
                temperature: None,
                top_p: 1.0,
                eos_ids: vec![],
                eval_every: None,
                eval_batches: None,
                seed: 0,
                lr: 3e-4,
                min_lr: None,
                warmup: 0,
                weight_decay: 0.01,
                clip: Some(1.0),
                adam_eps: 1e-8,
                bucket_bytes: DEFAULT_BUCKET_BYTES,
                threads: 1,
                save_params: None,
                checkpoint_dir: None,
                checkpoint_every: None,
                keep: None,
                async_checkpoint: false,
                resume: None,
                override_optim_settings: false,
                exit_at_step: None,
                skip_nonfinite_steps: false,
                no_malloc_trim: false,
                no_prefetch: false,
                collective_timeout: 600.0,
            }
        );
        assert_eq!(
            parse_args(args("")).ok(),
            Some(Command::Train(Box::new(defaults)))
        );
        assert!(matches!(
            parse_args(args("--steps 3 --help")),
            Ok(Command::Help(_))
        ));
        assert!(matches!(parse_args(args("-h")), Ok(Command::Help(_))));
        let o = match parse_args(args(
            "--steps=3 --data x.bin --data-dtype u32 --metrics m.jsonl --seed 7 --lr 1e-3 \
             --min-lr=1e-4 --warmup 2 --weight-decay 0.1 --clip 0 --adam-eps 1e-6 \
             --bucket-mb 0.5 --threads 2 --save-params out/params --tensorboard tb \
             --peak-tflops 312 --eval-data val --eval-every 5 --eval-batches 2",
        )) {
            Ok(Command::Train(o)) => *o,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            o,
            Options {
                steps: 3,
                data: Some("x.bin".into()),
                init_from: None,
                data_dtype: TokenDtype::U32,
                metrics: Some("m.jsonl".into()),
                tensorboard: Some("tb".into()),
                peak_tflops: Some(312.0),
                eval_data: Some("val".into()),
                eval_only: false,
                logits: None,
                json: false,
                generate: false,
                prompt_ids: vec![],
                prompts: None,
                max_new_tokens: 32,
                temperature: None,
                top_p: 1.0,
                eos_ids: vec![],
                eval_every: Some(5),
                eval_batches: Some(2),
                seed: 7,
                lr: 1e-3,
                min_lr: Some(1e-4),
                warmup: 2,
                weight_decay: 0.1,
                clip: None,
                adam_eps: 1e-6,
                bucket_bytes: 512 * 1024,
                threads: 2,
                save_params: Some("out/params".into()),
                checkpoint_dir: None,
                checkpoint_every: None,
                keep: None,
                async_checkpoint: false,
                resume: None,
                override_optim_settings: false,
                exit_at_step: None,
                skip_nonfinite_steps: false,
                no_malloc_trim: false,
                no_prefetch: false,
                collective_timeout: 600.0,
            }
        );
        // The last of a repeated flag wins; clap's own entry point works too.
        assert_eq!(
            Options::try_parse_from(["plan", "--steps", "2", "--steps=4", "--clip", "0.5"])
                .map(|o| (o.steps, o.clip))
                .ok(),
            Some((4, Some(0.5)))
        );
        let cfg = o.optim_config(ZeroStage::Three);
        assert_eq!(
            (cfg.lr.total_steps, cfg.max_norm, cfg.zero),
            (3, None, ZeroStage::Three)
        );
        let min_lr = Options::default().optim_config(ZeroStage::Off).lr.min_lr;
        assert!((min_lr - 3e-5).abs() < 1e-12, "{min_lr}");
    }

    #[test]
    fn help_lists_every_flag_with_its_default() {
        let text = help();
        for flag in [
            "--steps <N>",
            "--data <FILE|DIR>",
            "--tensorboard <DIR>",
            "--peak-tflops <T>",
            "--eval-data <FILE|DIR>",
            "--eval-every <N>",
            "--eval-batches <K>",
            "--eval-only",
            "--json",
            "--generate",
            "--prompt-ids <ID,ID,...>",
            "--prompts <FILE>",
            "--max-new-tokens <N>",
            "--temperature <T>",
            "--top-p <P>",
            "--eos-ids <ID,ID,...>",
            "6*N + 12*L*h*seq",
            "--data-dtype <u16|u32>",
            "--metrics <FILE>",
            "--seed <S>",
            "--lr <LR>",
            "--min-lr <LR>",
            "--warmup <N>",
            "--weight-decay <WD>",
            "--clip <NORM>",
            "--adam-eps <EPS>",
            "--bucket-mb <MB>",
            "--threads <N>",
            "--save-params <DIR>",
            "--checkpoint-dir <DIR>",
            "--checkpoint-every <N>",
            "--keep <K>",
            "--async-checkpoint",
            "--resume <latest|auto|STEP|PATH>",
            "--override-optim-settings",
            "--exit-at-step <N>",
            "--skip-nonfinite-steps",
            "--no-malloc-trim",
            "--no-prefetch",
            "--collective-timeout <SECONDS>",
            "--help",
        ] {
            assert!(text.contains(flag), "{flag} missing from:\n{text}");
        }
        for default in [
            "[default: 10]",
            "[default: 3e-4]",
            "[default: 1.0]",
            "[default: 25]",
        ] {
            assert!(text.contains(default), "{default} missing from:\n{text}");
        }
        assert!(text.contains("mpirun"), "{text}");
        match parse_args(args("--help")) {
            Ok(Command::Help(h)) => assert_eq!(h.trim_end(), text.trim_end()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_flags_are_usage_errors() {
        let msg = usage_msg(parse_args(args("--stepz 3")));
        assert!(msg.contains("unexpected argument '--stepz'"), "{msg}");
        assert!(msg.contains("--help"), "{msg}");
        assert!(!msg.starts_with("error:"), "{msg}");
        let msg = usage_msg(parse_args(args("--steps")));
        assert!(
            msg.contains("'--steps <N>'") && msg.contains("value"),
            "{msg}"
        );
        let msg = usage_msg(parse_args(args("--steps 0")));
        assert!(msg.contains("'0'") && msg.contains("1.."), "{msg}");
        assert!(usage_msg(parse_args(args("--steps x"))).contains("'x'"));
        let msg = usage_msg(parse_args(args("--lr nan")));
        assert!(msg.contains("--lr") && msg.contains(">= 0"), "{msg}");
        let msg = usage_msg(parse_args(args("--lr -1")));
        assert!(msg.contains("--lr") && msg.contains(">= 0"), "{msg}");
        assert!(usage_msg(parse_args(args("--data-dtype u8"))).contains("u8"));
        assert!(usage_msg(parse_args(args("--bucket-mb 0"))).contains("--bucket-mb"));
        assert!(usage_msg(parse_args(args("--threads 0"))).contains("--threads"));
        assert!(usage_msg(parse_args(args("--peak-tflops 0"))).contains("--peak-tflops"));
        for f in ["--eval-every 5", "--eval-batches 2", "--eval-only"] {
            let msg = usage_msg(parse_args(args(f)));
            assert!(msg.contains("--eval-data"), "{f}: {msg}");
        }
        assert!(usage_msg(parse_args(args("--json"))).contains("--eval-only"));
        assert!(usage_msg(parse_args(args("--generate"))).contains("--prompt-ids"));
        assert!(
            usage_msg(parse_args(args("--generate --prompt-ids 1,2 --top-p 0"))).contains("(0, 1]")
        );
        assert!(usage_msg(parse_args(args("--generate --prompt-ids 1,x"))).contains("'x'"));
        // An evaluation writes nothing of a run's.
        for f in [
            "--metrics m",
            "--checkpoint-dir c",
            "--save-params p",
            "--eval-every 2",
        ] {
            let msg = usage_msg(parse_args(args(&format!(
                "--eval-only --eval-data v.json {f}"
            ))));
            assert!(msg.contains("cannot be used with"), "{f}: {msg}");
        }
        assert!(usage_msg(parse_args(args("stray"))).contains("'stray'"));
        // Checkpoint flags: what needs --checkpoint-dir, and the resume forms.
        for f in ["--checkpoint-every 5", "--keep 2", "--async-checkpoint"] {
            let msg = usage_msg(parse_args(args(f)));
            assert!(msg.contains("--checkpoint-dir"), "{f}: {msg}");
        }
        assert!(usage_msg(parse_args(args("--override-optim-settings"))).contains("--resume"));
        assert!(usage_msg(parse_args(args("--checkpoint-dir c --keep 0"))).contains("--keep"));
        let resume = |a: &str| match parse_args(args(a)) {
            Ok(Command::Train(o)) => o.resume,
            other => panic!("{a}: {other:?}"),
        };
        assert_eq!(resume("--resume auto"), Some(Resume::Auto));
        assert_eq!(resume("--resume latest"), Some(Resume::Latest));
        assert_eq!(resume("--resume 40"), Some(Resume::Step(40)));
        assert_eq!(
            resume("--resume ck/step_40"),
            Some(Resume::Path("ck/step_40".into()))
        );
        // The optimizer's own checks: min_lr above the peak.
        assert!(usage_msg(parse_args(args("--lr 1e-3 --min-lr 1e-2"))).contains("min_lr"));
    }

    #[test]
    fn saved_params_are_named_shards_in_one_file_per_rank() {
        let dir = std::env::temp_dir().join(format!("autopart-save-params-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let spec = |name: &str, shape: Vec<i64>, tp_dim| crate::exec::ParamSpec {
            name: name.into(),
            shape,
            init: crate::exec::Init::Normal { std: 0.02 },
            tp_dim,
            tp_grad: crate::exec::TpGrad::Complete,
        };
        let params = vec![
            spec("a.weight", vec![4, 6], Some(1))
                .materialise(3, 1, 2)
                .expect("shard"),
            spec("b.weight", vec![5], None)
                .materialise(3, 1, 2)
                .expect("replicated"),
        ];
        let path = save_params(&dir, 3, &params).expect("save");
        assert_eq!(path, dir.join("rank-3.safetensors"));
        let mut read = Tensor::read_safetensors(&path).expect("read back");
        read.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(read.len(), 2);
        for ((name, t), p) in read.iter().zip(&params) {
            assert_eq!(name, &p.spec.name);
            assert_eq!(t.size(), p.tensor.size());
            assert!(t.allclose(&p.tensor.detach(), 0.0, 0.0, false), "{name}");
        }
        let names: Vec<_> = std::fs::read_dir(&dir)
            .expect("list")
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("rank-3.safetensors")]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_run_replicates_the_plan_over_dp() {
        META.validate().expect("consistent");
        assert_eq!(META.replicas(), 2);
        assert_eq!(
            META.runtime_mesh(),
            Mesh {
                tp: 2,
                dp: 4,
                pp: 2
            }
        );
        assert_eq!(META.runtime_batch(), 8);
        let bad = |m: PlanMeta| match m.validate() {
            Err(AppError::Meta(msg)) => msg,
            other => panic!("expected a meta error, got {other:?}"),
        };
        assert!(
            bad(PlanMeta {
                runtime_gpus: 12,
                ..META
            })
            .contains("multiple")
        );
        assert!(
            bad(PlanMeta {
                plan_gpus: 4,
                ..META
            })
            .contains("plan_gpus")
        );
        assert!(
            bad(PlanMeta {
                global_batch: 8,
                ..META
            })
            .contains("global_batch")
        );
        assert!(
            bad(PlanMeta {
                predicted_peak_bytes: &[1],
                ..META
            })
            .contains("predicted")
        );
    }

    #[test]
    fn a_wrong_process_count_says_how_to_launch() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            Launcher::from_vars(|n| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == n)
                    .map(|(_, v)| v.to_string())
            })
        };
        let ompi = vars(&[("OMPI_COMM_WORLD_SIZE", "2"), ("OMPI_COMM_WORLD_RANK", "1")]);
        assert_eq!((ompi.size, ompi.rank), (Some(2), Some(1)));
        let slurm = vars(&[("SLURM_NTASKS", "4"), ("SLURM_PROCID", "3")]);
        assert_eq!((slurm.size, slurm.rank), (Some(4), Some(3)));
        assert_eq!(vars(&[("PMI_SIZE", "x")]), Launcher::default());
        let err = prepare(&META, &vars(&[("PMI_SIZE", "2")]), args("--steps 1"))
            .expect_err("2 is not 16");
        assert_eq!(err.exit_code(), 2);
        assert_eq!(
            err.to_string(),
            "this plan runs on 16 processes (plan 8 GPUs x 2 replicas) but the launcher \
             started 2; run it with mpirun -np 16"
        );
        assert!(matches!(
            prepare(&META, &vars(&[("PMI_SIZE", "16")]), args("--help")),
            Ok(None)
        ));
    }

    #[test]
    fn the_summary_compares_with_the_prediction() {
        let line = summary(&META, 1.31, &[0.3, 0.1, 0.2], Some(5 << 20));
        assert_eq!(
            line,
            "done: 3 steps in 1.3 s, median step 0.200 s (predicted 0.100 s), peak rss +5 MiB \
             over baseline (predicted peak 1024 MiB per stage)"
        );
    }
}
