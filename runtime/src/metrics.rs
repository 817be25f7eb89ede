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
    /// Tokens of the global batch per second of the step.
    pub tokens_per_s: f64,
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
    /// or gradient norm under `--skip-nonfinite-steps`).
    pub skipped_steps: u64,
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
        format!(
            "{{\"step\":{},\"loss\":{},\"grad_norm\":{},\"lr\":{},\"step_s\":{},\"tokens_per_s\":{},\"peak_rss_bytes\":{},\"rss_over_baseline_bytes\":{},\"rank_peaks_over_baseline_bytes\":[{}],\"checkpoint_block_s\":{block},\"checkpoint_saved\":{saved},\"skipped_steps\":{}}}",
            self.step,
            num(self.loss),
            num(self.grad_norm),
            num(self.lr),
            num(self.step_s),
            num(self.tokens_per_s),
            bytes(self.peak_rss_bytes),
            bytes(self.rss_over_baseline_bytes),
            ranks.join(","),
            self.skipped_steps,
        )
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
            tokens_per_s: 1250.2,
            peak_rss_bytes: Some(900 << 20),
            rss_over_baseline_bytes: Some(120 << 20),
            rank_peaks_over_baseline_bytes: vec![120 << 20, 100 << 20],
            checkpoint_block_s: None,
            checkpoint_saved: None,
            skipped_steps: 0,
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
             \"tokens_per_s\":1250.2,\"peak_rss_bytes\":943718400,\
             \"rss_over_baseline_bytes\":125829120,\
             \"rank_peaks_over_baseline_bytes\":[125829120,104857600],\
             \"checkpoint_block_s\":null,\"checkpoint_saved\":null,\"skipped_steps\":0}"
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
            "\"checkpoint_block_s\":0.25,\"checkpoint_saved\":{\"step\":3,\"bytes\":4096,\"seconds\":1.5,\"write_s\":0.5},\"skipped_steps\":0}"
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
                 \"checkpoint_block_s\":null,\"checkpoint_saved\":null,\"skipped_steps\":0}"
        ));
        assert!(!unknown.console_line().contains("rss"));
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
