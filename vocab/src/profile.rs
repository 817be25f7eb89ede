//! `autopart profile`'s raw measurements.
//!
//! The runtime's profiler (the `autopart-profile` binary, started under the
//! launcher like a plan) times ops and collectives and writes one [`Raw`]
//! record as JSON; the compiler (`autopart profile`) fits the cluster file's
//! figures to it with its own cost formulas. Sizes follow the compiler's
//! conventions, so the fit inverts the very formulas that price plans:
//!
//! - compute samples carry the forward FLOPs as the annotation files count
//!   them (a causal attention is counted whole, `4·b·l·s·h·d`) and the bytes
//!   its inputs and outputs occupy; each is timed forward alone and forward
//!   plus backward (autograd, as training runs it);
//! - collective samples carry the `bytes` argument of
//!   `autopart::cost::collective_time`: the tensor for all-reduce, broadcast
//!   and send/recv, the gathered tensor for all-gather, the tensor before
//!   scattering for reduce-scatter, each rank's buffer for all-to-all.
//!
//! Every time is the median of repeated runs on each rank, then the largest
//! over ranks (the slowest rank sets a step's pace); compute is timed on all
//! ranks at once, as in training, where ranks share cores and memory.

use serde::{Deserialize, Serialize};

/// The version of the JSON written here; readers refuse others.
pub const FORMAT_VERSION: u32 = 1;

/// One profiling run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    pub format_version: u32,
    /// Seconds since the Unix epoch when profiling started.
    pub started_unix_s: u64,
    /// Wall seconds the profiling took.
    pub seconds: f64,
    /// Processes in the run.
    pub ranks: u32,
    /// Each rank's host name, by rank.
    pub hosts: Vec<String>,
    /// Torch threads per process.
    pub threads: u32,
    /// `cpu` (the device the samples ran on).
    pub device: String,
    /// The launcher variable the process count came from (`OMPI_COMM_WORLD_SIZE`, ...).
    pub launcher: Option<String>,
    /// Physical memory of rank 0's host (`MemTotal`), when known.
    pub host_memory_bytes: Option<u64>,
    /// Seconds each timed sample ran for at least.
    pub budget_s: f64,
    pub compute: Vec<ComputeSample>,
    pub collectives: Vec<CollectiveSample>,
}

/// The cost model's classes of compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ComputeClass {
    /// GEMMs (`linear`): FLOP-bound.
    Matmul,
    /// The runtime's attention op.
    Attention,
    /// Element-wise ops and norms: bandwidth-bound.
    MemoryBound,
    /// Chains of ops on tiny tensors: the fixed cost of one op.
    Overhead,
    /// The runtime's optimizer step (clipping, AdamW, clearing the
    /// gradients) over f32 parameters whose bytes `bytes` holds; `fwd_s`
    /// and `fwd_bwd_s` are both the step's seconds.
    Optimizer,
}

/// One op (or chain of `ops` ops) timed at one shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComputeSample {
    pub class: ComputeClass,
    /// The op's annotation name (`linear`, `rms_norm`, ...; `layers` for the
    /// fixed-cost chains).
    pub op: String,
    /// What ran, with its shape: `linear 512x1024x2816 f32`.
    pub name: String,
    /// `f32`, `bf16`, `f16`.
    pub dtype: String,
    /// Forward FLOPs in the annotation files' count.
    pub flops: f64,
    /// Bytes of the forward's inputs and outputs.
    pub bytes: f64,
    /// Ops the sample runs per forward (1 except for overhead chains).
    pub ops: u32,
    /// Forward seconds.
    pub fwd_s: f64,
    /// Forward plus backward seconds.
    pub fwd_bwd_s: f64,
}

/// The collectives the runtime issues.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CollectiveKind {
    AllReduce,
    AllGather,
    ReduceScatter,
    AllToAll,
    Broadcast,
    SendRecv,
}

impl CollectiveKind {
    pub const ALL: [CollectiveKind; 6] = [
        CollectiveKind::AllReduce,
        CollectiveKind::AllGather,
        CollectiveKind::ReduceScatter,
        CollectiveKind::AllToAll,
        CollectiveKind::Broadcast,
        CollectiveKind::SendRecv,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CollectiveKind::AllReduce => "all-reduce",
            CollectiveKind::AllGather => "all-gather",
            CollectiveKind::ReduceScatter => "reduce-scatter",
            CollectiveKind::AllToAll => "all-to-all",
            CollectiveKind::Broadcast => "broadcast",
            CollectiveKind::SendRecv => "send/recv",
        }
    }
}

/// One collective over one group at one size.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectiveSample {
    pub kind: CollectiveKind,
    /// Ranks in the group.
    pub size: u32,
    /// Nodes the group spans (ranks grouped by host name).
    pub nodes: u32,
    /// Members on each node it spans.
    pub ranks_per_node: u32,
    /// The cost model's `bytes` argument (module docs).
    pub bytes: f64,
    pub seconds: f64,
}

impl Raw {
    /// Parses the JSON a profiler wrote; `origin` names it in errors.
    pub fn from_json(text: &str, origin: &str) -> Result<Raw, String> {
        let raw: Raw = serde_json::from_str(text)
            .map_err(|e| format!("{origin}:{}:{}: {e}", e.line(), e.column()))?;
        if raw.format_version != FORMAT_VERSION {
            return Err(format!(
                "{origin}: format_version {} is not the {FORMAT_VERSION} this autopart reads",
                raw.format_version
            ));
        }
        let bad_time = |t: f64| !(t.is_finite() && t > 0.0);
        if let Some(s) = raw
            .compute
            .iter()
            .find(|s| bad_time(s.fwd_s) || bad_time(s.fwd_bwd_s))
        {
            return Err(format!(
                "{origin}: sample '{}' has a time that is not a positive number",
                s.name
            ));
        }
        if let Some(s) = raw
            .collectives
            .iter()
            .find(|s| bad_time(s.seconds) || s.size < 2)
        {
            return Err(format!(
                "{origin}: {} sample over {} ranks has no positive time or fewer than 2 ranks",
                s.kind.name(),
                s.size
            ));
        }
        Ok(raw)
    }

    /// Distinct hosts, in rank order of first appearance.
    pub fn nodes(&self) -> Vec<&str> {
        let mut seen: Vec<&str> = Vec::new();
        for h in &self.hosts {
            if !seen.contains(&h.as_str()) {
                seen.push(h);
            }
        }
        seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_checks() {
        let raw = Raw {
            format_version: FORMAT_VERSION,
            started_unix_s: 1,
            seconds: 2.0,
            ranks: 2,
            hosts: vec!["a".into(), "a".into()],
            threads: 1,
            device: "cpu".into(),
            launcher: None,
            host_memory_bytes: Some(1 << 30),
            budget_s: 0.1,
            compute: vec![ComputeSample {
                class: ComputeClass::Matmul,
                op: "linear".into(),
                name: "linear".into(),
                dtype: "f32".into(),
                flops: 1e9,
                bytes: 1e6,
                ops: 1,
                fwd_s: 0.01,
                fwd_bwd_s: 0.03,
            }],
            collectives: vec![CollectiveSample {
                kind: CollectiveKind::AllReduce,
                size: 2,
                nodes: 1,
                ranks_per_node: 2,
                bytes: 1e6,
                seconds: 1e-3,
            }],
        };
        let text = serde_json::to_string(&raw).expect("serializes");
        assert_eq!(Raw::from_json(&text, "x").expect("parses"), raw);
        assert_eq!(raw.nodes(), vec!["a"]);
        let old = text.replace("\"format_version\":1", "\"format_version\":7");
        assert!(
            Raw::from_json(&old, "x")
                .expect_err("an error")
                .contains("format_version 7")
        );
        let zero = text.replace("\"seconds\":0.001", "\"seconds\":0.0");
        assert!(
            Raw::from_json(&zero, "x")
                .expect_err("an error")
                .contains("all-reduce")
        );
        assert!(
            Raw::from_json("{", "f.json")
                .expect_err("an error")
                .starts_with("f.json:1:")
        );
    }
}
