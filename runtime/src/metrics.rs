//! Per-step training metrics: what one step did ([`StepRecord`]), how it
//! reads on the console ([`StepRecord::console_line`]) and in a JSON-lines
//! file ([`MetricsLog`]), and the process memory they report ([`Memory`]).
//!
//! Memory is the resident set of the process as Linux reports it in
//! `/proc/self/status`: `VmRSS` (now) and `VmHWM` (the peak so far). A run
//! takes the baseline (`VmRSS` before the model is built) and each step
//! reports the peak over every rank of the world and each rank's own peak
//! over its baseline, in world-rank order ([`peak_over_world`]); elsewhere
//! than Linux both are unknown.
//!
//! This module formats and gathers; it does not decide when a step happens
//! or which rank writes (the plan binary's [`crate::app`] does).

use crate::comm::{CommError, Communicator};
use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use tch::Tensor;
use thiserror::Error;

/// What one optimizer step did.
#[derive(Clone, Debug, PartialEq)]
pub struct StepRecord {
    /// Steps done so far, from 1.
    pub step: u64,
    /// Steps in the run.
    pub steps: u64,
    /// Mean loss over the global batch.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate of this step.
    pub lr: f64,
    /// Wall-clock seconds of the step (batch, forward, backward, update).
    pub step_s: f64,
    /// Of `step_s`, rank 0's seconds in the forward and backward passes
    /// (with the pipeline's sends and receives and the gradient reductions
    /// they overlap).
    pub forward_backward_s: f64,
    /// Of `step_s`, rank 0's seconds in the optimizer step: what is left of
    /// the gradient reduction, clipping, the AdamW update and ZeRO's
    /// gathers.
    pub optimizer_s: f64,
    /// Labels of the global batch that count in the loss (those not
    /// masked): the loss is their mean.
    pub loss_tokens: u64,
    /// `loss_tokens` per second of the step.
    pub tokens_per_s: f64,
    /// `tokens_per_s` divided by the run's processes (devices).
    pub tokens_per_s_per_device: f64,
    /// Model FLOPs utilisation of the step ([`FlopCount`]); `None` without
    /// a peak (`--peak-tflops`).
    pub mfu: Option<f64>,
    /// Peak resident set (`VmHWM`), the most of any rank.
    pub peak_rss_bytes: Option<u64>,
    /// Peak resident set over the rank's baseline, the most of any rank.
    pub rss_over_baseline_bytes: Option<u64>,
    /// Each rank's peak resident set over its own baseline, by world rank
    /// (empty when some rank cannot read its memory). Pipeline stages hold
    /// different layers, so their peaks differ.
    pub rank_peaks_over_baseline_bytes: Vec<u64>,
    /// Seconds checkpointing held training up after this step (copying the
    /// state, writing it when synchronous, waiting for the previous save);
    /// `None` when the run saves no checkpoints.
    pub checkpoint_block_s: Option<f64>,
    /// The checkpoint that became complete at this step's boundary.
    pub checkpoint_saved: Option<crate::checkpoint::Saved>,
    /// Steps of this run so far whose update was skipped (a non-finite loss
    /// or gradient norm under `--skip-nonfinite-steps`, or a batch whose
    /// labels are all masked).
    pub skipped_steps: u64,
    /// The mean loss over the held-out set, on the steps it was computed.
    pub eval_loss: Option<f64>,
}

impl StepRecord {
    /// `step 3/10  loss 5.4012  grad_norm 2.31  lr 3.0e-3  0.41 s  1250 tok/s  rss +120 MiB`
    pub fn console_line(&self) -> String {
        let mut line = format!(
            "step {}/{}  loss {:.4}  grad_norm {:.2}  lr {:.1e}  {:.2} s  {:.0} tok/s",
            self.step,
            self.steps,
            self.loss,
            self.grad_norm,
            self.lr,
            self.step_s,
            self.tokens_per_s
        );
        if let Some(mfu) = self.mfu {
            let _ = write!(line, "  mfu {:.1}%", mfu * 100.0);
        }
        if let Some(over) = self.rss_over_baseline_bytes {
            let _ = write!(line, "  rss +{} MiB", over >> 20);
        }
        line
    }

    /// One JSON object on one line (no trailing newline). Non-finite numbers
    /// and unknown memory are `null`; unknown per-rank peaks are `[]`.
    pub fn json(&self) -> String {
        let num = |x: f64| {
            if x.is_finite() {
                format!("{x:?}")
            } else {
                "null".to_string()
            }
        };
        let bytes = |b: Option<u64>| b.map_or_else(|| "null".to_string(), |b| b.to_string());
        let ranks: Vec<String> = self
            .rank_peaks_over_baseline_bytes
            .iter()
            .map(u64::to_string)
            .collect();
        let saved = self.checkpoint_saved.map_or_else(
            || "null".to_string(),
            |s| {
                format!(
                    "{{\"step\":{},\"bytes\":{},\"seconds\":{},\"write_s\":{}}}",
                    s.step,
                    s.bytes,
                    num(s.seconds),
                    num(s.write_s)
                )
            },
        );
        let block = self
            .checkpoint_block_s
            .map_or_else(|| "null".to_string(), num);
        let opt = |x: Option<f64>| x.map_or_else(|| "null".to_string(), num);
        format!(
            "{{\"step\":{},\"loss\":{},\"grad_norm\":{},\"lr\":{},\"step_s\":{},\"forward_backward_s\":{},\"optimizer_s\":{},\"loss_tokens\":{},\"tokens_per_s\":{},\"tokens_per_s_per_device\":{},\"mfu\":{},\"peak_rss_bytes\":{},\"rss_over_baseline_bytes\":{},\"rank_peaks_over_baseline_bytes\":[{}],\"checkpoint_block_s\":{block},\"checkpoint_saved\":{saved},\"skipped_steps\":{},\"eval_loss\":{}}}",
            self.step,
            num(self.loss),
            num(self.grad_norm),
            num(self.lr),
            num(self.step_s),
            num(self.forward_backward_s),
            num(self.optimizer_s),
            self.loss_tokens,
            num(self.tokens_per_s),
            num(self.tokens_per_s_per_device),
            opt(self.mfu),
            bytes(self.peak_rss_bytes),
            bytes(self.rss_over_baseline_bytes),
            ranks.join(","),
            self.skipped_steps,
            opt(self.eval_loss),
        )
    }
}

/// The model FLOPs of training on one token, for MFU: `6·N + 12·L·h·s`
/// (PaLM, appendix B; Megatron-LM's count without its vocabulary term,
/// which `N` holds): `6·N` for the forward (2·N) and backward (4·N) of
/// the matmuls with the `N` parameters that multiply activations, and
/// `12·L·h·s` for attention's scores and weighted sums (`L` layers, model
/// width `h`, sequence length `s`). `N` is every parameter except the
/// ones only looked up: an untied input embedding table and GPT-2's
/// position table (a tied table is the LM head, a matmul, and counts). The
/// count is the model's, whatever the plan: recomputation, padding and
/// communication are not counted, so MFU compares plans fairly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlopCount {
    /// `N`: parameters that multiply activations.
    pub matmul_params: u64,
    /// `L`; 0 when unknown (a plan without a config.json), which drops the
    /// attention term.
    pub layers: u64,
    /// `h`.
    pub hidden: u64,
    /// `s`.
    pub seq: u64,
}

impl FlopCount {
    /// The count of a model of `params` parameters in all (each counted
    /// once) and sequence length `seq`, with `L`, `h` and the lookup tables
    /// read from its HuggingFace `config.json` (`num_hidden_layers` or
    /// `n_layer`, `hidden_size` or `n_embd`, `vocab_size`,
    /// `tie_word_embeddings`, GPT-2's `n_positions`). Without a config (or
    /// one without these fields) `N` is every parameter and there is no
    /// attention term.
    pub fn of_model(params: u64, seq: u64, hf_config: &str) -> Self {
        let bare = Self {
            matmul_params: params,
            layers: 0,
            hidden: 0,
            seq,
        };
        let Ok(cfg) = serde_json::from_str::<serde_json::Value>(hf_config) else {
            return bare;
        };
        let int = |keys: &[&str]| {
            keys.iter()
                .find_map(|k| cfg.get(*k).and_then(serde_json::Value::as_u64))
        };
        let (Some(layers), Some(hidden)) = (
            int(&["num_hidden_layers", "n_layer"]),
            int(&["hidden_size", "n_embd"]),
        ) else {
            return bare;
        };
        let gpt2 = cfg.get("model_type").and_then(serde_json::Value::as_str) == Some("gpt2");
        // HF's defaults: Llama unties, GPT-2 ties.
        let tied = cfg
            .get("tie_word_embeddings")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(gpt2);
        let mut lookup = 0u64;
        if !tied {
            lookup += int(&["vocab_size"]).unwrap_or(0).saturating_mul(hidden);
        }
        if gpt2 {
            lookup += int(&["n_positions"]).unwrap_or(0).saturating_mul(hidden);
        }
        Self {
            matmul_params: params.saturating_sub(lookup),
            layers,
            hidden,
            seq,
        }
    }

    /// FLOPs of training on one token: `6·N + 12·L·h·s`.
    pub fn per_token(&self) -> f64 {
        6.0 * self.matmul_params as f64
            + 12.0 * self.layers as f64 * self.hidden as f64 * self.seq as f64
    }

    /// Model FLOPs utilisation of a step that trained on `positions` token
    /// positions (masked ones included: they cost the same) in `step_s`
    /// seconds on `devices` devices of `peak_tflops` each:
    /// `per_token · positions / step_s / (peak_tflops · 10^12 · devices)`.
    pub fn mfu(&self, positions: u64, step_s: f64, peak_tflops: f64, devices: usize) -> f64 {
        self.per_token() * positions as f64
            / step_s.max(1e-9)
            / (peak_tflops * 1e12 * devices.max(1) as f64)
    }
}

/// What can go wrong while recording metrics.
#[derive(Debug, Error)]
pub enum MetricsError {
    #[error("{}: cannot {what}: {source}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// A JSON-lines metrics file: one [`StepRecord::json`] per line, flushed
/// after every step so that a killed run keeps its finished steps.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    out: BufWriter<File>,
}

impl MetricsLog {
    /// Creates (or truncates) `path`.
    pub fn create(path: &Path) -> Result<Self, MetricsError> {
        let file = File::create(path).map_err(|source| MetricsError::Io {
            path: path.to_path_buf(),
            what: "create it",
            source,
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
        })
    }

    /// Opens `path` for a run resumed after step `step`: keeps its lines of
    /// steps up to `step` (those of an earlier run that went further, before
    /// a crash, are dropped, so the file reads as one run) and appends. A
    /// missing file is created.
    pub fn resume(path: &Path, step: u64) -> Result<Self, MetricsError> {
        let io = |what: &'static str| {
            move |source| MetricsError::Io {
                path: path.to_path_buf(),
                what,
                source,
            }
        };
        let old = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io("read it")(e)),
        };
        let mut kept = String::new();
        for line in old.lines() {
            let line_step = line
                .strip_prefix("{\"step\":")
                .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|n| n.parse::<u64>().ok());
            if line_step.is_some_and(|s| s <= step) {
                kept.push_str(line);
                kept.push('\n');
            }
        }
        autopart_vocab::fs::write_atomic(path, kept.as_bytes()).map_err(io("rewrite it"))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(io("open it"))?;
        Ok(Self {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
        })
    }

    /// Appends `record` and flushes.
    pub fn write(&mut self, record: &StepRecord) -> Result<(), MetricsError> {
        writeln!(self.out, "{}", record.json())
            .and_then(|()| self.out.flush())
            .map_err(|source| MetricsError::Io {
                path: self.path.clone(),
                what: "write to it",
                source,
            })
    }
}

/// The process's resident set, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Memory {
    /// `VmRSS`: resident now.
    pub rss: u64,
    /// `VmHWM`: the most resident so far.
    pub hwm: u64,
}

impl Memory {
    /// This process's memory from `/proc/self/status`; `None` where that
    /// file does not exist or lacks the fields (not Linux).
    pub fn current() -> Option<Self> {
        let text = std::fs::read_to_string("/proc/self/status").ok()?;
        Self::parse_status(&text)
    }

    /// `VmRSS` and `VmHWM` out of the text of a `/proc/<pid>/status` file
    /// (lines like `VmHWM:     1234 kB`).
    pub fn parse_status(text: &str) -> Option<Self> {
        let field = |name: &str| -> Option<u64> {
            let line = text.lines().find(|l| l.starts_with(name))?;
            let mut words = line[name.len()..].split_whitespace();
            let n: u64 = words.next()?.parse().ok()?;
            match words.next() {
                Some("kB") => n.checked_mul(1024),
                _ => None,
            }
        };
        Some(Self {
            rss: field("VmRSS:")?,
            hwm: field("VmHWM:")?,
        })
    }
}

/// The peak resident set of every rank of `world`: the most of any rank of
/// the peak and of the peak over the rank's `baseline`, and each rank's
/// peak over its baseline in rank order. A most is `None`, and the per-rank
/// list empty, when some rank cannot read its memory. Collective over `world`.
pub fn peak_over_world(
    baseline: Option<u64>,
    world: &dyn Communicator,
) -> Result<WorldPeak, MetricsError> {
    // f64 holds byte counts exactly up to 2^53 (8 PiB); -1 marks "unknown".
    let mine = match (Memory::current(), baseline) {
        (Some(m), Some(b)) => [m.hwm as f64, m.hwm.saturating_sub(b) as f64],
        (Some(m), None) => [m.hwm as f64, -1.0],
        (None, _) => [-1.0, -1.0],
    };
    let all = world.all_gather(&Tensor::from_slice(&mine), 0)?;
    let all = Vec::<f64>::try_from(&all)?;
    let column = |col: usize| -> Option<Vec<u64>> {
        let vals: Vec<f64> = all.iter().skip(col).step_by(2).copied().collect();
        if vals.iter().any(|&v| v < 0.0) {
            return None;
        }
        Some(vals.into_iter().map(|v| v as u64).collect())
    };
    let max_of = |col: usize| column(col).map(|v| v.into_iter().max().unwrap_or(0));
    Ok(WorldPeak {
        peak: max_of(0),
        over_baseline: max_of(1),
        ranks_over_baseline: column(1).unwrap_or_default(),
    })
}

/// Peak memory over a world of ranks, from [`peak_over_world`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorldPeak {
    /// The most `VmHWM` of any rank.
    pub peak: Option<u64>,
    /// The most `VmHWM` over baseline of any rank.
    pub over_baseline: Option<u64>,
    /// Each rank's `VmHWM` over its baseline, by rank; empty when unknown.
    pub ranks_over_baseline: Vec<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::SoloComm;

    fn record() -> StepRecord {
        StepRecord {
            step: 3,
            steps: 10,
            loss: 5.40123,
            grad_norm: 2.314,
            lr: 3e-3,
            step_s: 0.4134,
            forward_backward_s: 0.375,
            optimizer_s: 0.03125,
            loss_tokens: 512,
            tokens_per_s: 1250.2,
            tokens_per_s_per_device: 625.1,
            mfu: None,
            peak_rss_bytes: Some(900 << 20),
            rss_over_baseline_bytes: Some(120 << 20),
            rank_peaks_over_baseline_bytes: vec![120 << 20, 100 << 20],
            checkpoint_block_s: None,
            checkpoint_saved: None,
            skipped_steps: 0,
            eval_loss: None,
        }
    }

    #[test]
    fn console_line_and_json_say_the_same_step() {
        let r = record();
        assert_eq!(
            r.console_line(),
            "step 3/10  loss 5.4012  grad_norm 2.31  lr 3.0e-3  0.41 s  1250 tok/s  rss +120 MiB"
        );
        assert_eq!(
            r.json(),
            "{\"step\":3,\"loss\":5.40123,\"grad_norm\":2.314,\"lr\":0.003,\"step_s\":0.4134,\
             \"forward_backward_s\":0.375,\"optimizer_s\":0.03125,\"loss_tokens\":512,\"tokens_per_s\":1250.2,\"tokens_per_s_per_device\":625.1,\
             \"mfu\":null,\"peak_rss_bytes\":943718400,\
             \"rss_over_baseline_bytes\":125829120,\
             \"rank_peaks_over_baseline_bytes\":[125829120,104857600],\
             \"checkpoint_block_s\":null,\"checkpoint_saved\":null,\"skipped_steps\":0,\
             \"eval_loss\":null}"
        );
        let saving = StepRecord {
            checkpoint_block_s: Some(0.25),
            checkpoint_saved: Some(crate::checkpoint::Saved {
                step: 3,
                bytes: 4096,
                seconds: 1.5,
                write_s: 0.5,
            }),
            ..r.clone()
        };
        assert!(saving.json().ends_with(
            "\"checkpoint_block_s\":0.25,\"checkpoint_saved\":{\"step\":3,\"bytes\":4096,\"seconds\":1.5,\"write_s\":0.5},\"skipped_steps\":0,\"eval_loss\":null}"
        ));
        let unknown = StepRecord {
            loss: f64::NAN,
            peak_rss_bytes: None,
            rss_over_baseline_bytes: None,
            rank_peaks_over_baseline_bytes: Vec::new(),
            ..r.clone()
        };
        assert!(unknown.json().contains("\"loss\":null"));
        assert!(unknown.json().ends_with(
            "\"rss_over_baseline_bytes\":null,\"rank_peaks_over_baseline_bytes\":[],\
                 \"checkpoint_block_s\":null,\"checkpoint_saved\":null,\"skipped_steps\":0,\
                 \"eval_loss\":null}"
        ));
        assert!(!unknown.console_line().contains("rss"));
        let known = StepRecord {
            mfu: Some(0.123),
            eval_loss: Some(4.5),
            ..r.clone()
        };
        assert!(
            known.console_line().contains("  mfu 12.3%  rss"),
            "{}",
            known.console_line()
        );
        assert!(known.json().contains("\"mfu\":0.123,"), "{}", known.json());
        assert!(
            known.json().ends_with("\"eval_loss\":4.5}"),
            "{}",
            known.json()
        );
    }

    #[test]
    fn flops_follow_the_formula_and_the_config() {
        // llama-mini-like: untied 256 x 64 embedding, 4 layers, width 64.
        let cfg = r#"{"model_type":"llama","num_hidden_layers":4,"hidden_size":64,"vocab_size":256,"tie_word_embeddings":false}"#;
        let f = FlopCount::of_model(100_000, 16, cfg);
        assert_eq!(
            (f.matmul_params, f.layers, f.hidden, f.seq),
            (100_000 - 256 * 64, 4, 64, 16)
        );
        assert_eq!(
            f.per_token(),
            6.0 * (100_000 - 16_384) as f64 + 12.0 * 4.0 * 64.0 * 16.0
        );
        // GPT-2 ties its table (it stays) but looks positions up.
        let gpt2 =
            r#"{"model_type":"gpt2","n_layer":2,"n_embd":8,"vocab_size":50,"n_positions":32}"#;
        assert_eq!(
            FlopCount::of_model(1000, 4, gpt2).matmul_params,
            1000 - 32 * 8
        );
        // No config: every parameter, no attention term.
        let bare = FlopCount::of_model(1000, 4, "");
        assert_eq!(bare.per_token(), 6000.0);
        // 6000 FLOPs x 1000 positions in 0.5 s on 2 devices of 1e-6 TFLOP/s (1e6 FLOP/s).
        let mfu = bare.mfu(1000, 0.5, 1e-6, 2);
        assert!((mfu - 6.0).abs() < 1e-9, "{mfu}");
    }

    #[test]
    fn proc_status_fields_are_read_in_bytes() {
        let text = "Name:\tx\nVmHWM:\t    2048 kB\nVmRSS:\t    1024 kB\nThreads:\t1\n";
        assert_eq!(
            Memory::parse_status(text),
            Some(Memory {
                rss: 1 << 20,
                hwm: 2 << 20
            })
        );
        assert_eq!(Memory::parse_status("VmRSS:\t12 kB\n"), None);
        assert_eq!(Memory::parse_status("VmRSS: x kB\nVmHWM: 1 kB\n"), None);
        if cfg!(target_os = "linux") {
            let m = Memory::current().expect("linux has /proc/self/status");
            assert!(m.hwm >= m.rss && m.rss > 0, "{m:?}");
            let w = peak_over_world(Some(m.rss), &SoloComm).expect("one rank");
            assert!(w.peak.is_some_and(|p| p >= m.hwm), "{w:?}");
            assert_eq!(
                w.over_baseline.map(|o| vec![o]),
                Some(w.ranks_over_baseline)
            );
        }
    }

    #[test]
    fn metrics_file_has_one_flushed_line_per_step() {
        let path =
            std::env::temp_dir().join(format!("autopart-metrics-{}.jsonl", std::process::id()));
        let mut log = MetricsLog::create(&path).expect("create");
        log.write(&record()).expect("write");
        // Flushed: readable before the log is dropped.
        let text = std::fs::read_to_string(&path).expect("read back");
        assert_eq!(text, format!("{}\n", record().json()));
        drop(log);
        let _ = std::fs::remove_file(&path);
        let bad = Path::new("/nonexistent-dir/metrics.jsonl");
        let err = MetricsLog::create(bad).expect_err("no such folder");
        assert!(
            err.to_string().contains("/nonexistent-dir/metrics.jsonl"),
            "{err}"
        );
    }
}
