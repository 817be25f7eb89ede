//! Cluster specifications: what one device and its links can do.
//!
//! This module owns the [`Cluster`] type, its RON format, the built-in presets
//! (`compiler/clusters/*.ron`, embedded in the binary) and their validation. It
//! holds figures only; turning figures into times is the job of
//! [`super::time`] and [`super::collective`], and it must not know about
//! graphs, plans or meshes.
//!
//! Every figure is per device (one GPU, one NeuronCore, one CPU rank) and
//! carries its unit in its name. Link bandwidths are unidirectional, per
//! device: what one member of a ring can push to its neighbour. The inter-node
//! figure is a device's share of its node's NICs, so it already accounts for
//! devices that share a NIC.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ir::DType;

/// Built-in presets: name and RON text, embedded at build time.
const PRESETS: &[(&str, &str)] = &[
    ("a100-80gb", include_str!("../../clusters/a100-80gb.ron")),
    ("h100", include_str!("../../clusters/h100.ron")),
    ("h200", include_str!("../../clusters/h200.ron")),
    ("mi300x", include_str!("../../clusters/mi300x.ron")),
    ("trn1", include_str!("../../clusters/trn1.ron")),
    ("cpu", include_str!("../../clusters/cpu.ron")),
];

/// Names of the built-in presets, in a stable order.
pub fn preset_names() -> impl Iterator<Item = &'static str> {
    PRESETS.iter().map(|&(name, _)| name)
}

/// Loads a cluster from a preset name (see [`preset_names`]) or from a path to
/// a RON file, and validates it.
///
/// A preset name wins over a file of the same name in the working directory.
/// A string that is neither a preset nor an existing file is reported as an
/// unknown preset (listing the presets) unless it looks like a path (it has a
/// `/` or ends in `.ron`), in which case the file error is reported.
pub fn load_cluster(name_or_path: &str) -> Result<Cluster, ClusterError> {
    if let Some(&(name, text)) = PRESETS.iter().find(|&&(name, _)| name == name_or_path) {
        return Cluster::from_ron_str(text, &format!("clusters/{name}.ron"));
    }
    let path = Path::new(name_or_path);
    let looks_like_path = name_or_path.contains(std::path::MAIN_SEPARATOR)
        || name_or_path.contains('/')
        || name_or_path.ends_with(".ron");
    if !looks_like_path && !path.exists() {
        return Err(ClusterError::UnknownPreset {
            name: name_or_path.to_owned(),
            presets: preset_names().collect::<Vec<_>>().join(", "),
        });
    }
    let text = std::fs::read_to_string(path).map_err(|source| ClusterError::Read {
        path: path.to_owned(),
        source,
    })?;
    Cluster::from_ron_str(&text, &path.display().to_string())
}

/// A training cluster: identical nodes of `devices_per_node` devices, a fast
/// link inside a node and a slower one between nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// Preset or user-chosen name, shown in reports.
    pub name: String,
    /// Devices (ranks) per node; ranks `k * devices_per_node ..` share node `k`.
    pub devices_per_node: u32,
    /// Dense peak arithmetic rate of one device per dtype.
    pub peak_flops_per_s: PeakFlops,
    /// Memory capacity of one device.
    pub memory_bytes: u64,
    /// Memory a plan must leave free: allocator fragmentation, runtime
    /// context, collective buffers.
    pub memory_reserve_bytes: u64,
    /// Peak device-memory bandwidth of one device.
    pub hbm_bytes_per_s: f64,
    /// Link between devices of the same node.
    pub intra_node: Link,
    /// Link between devices of different nodes (a device's share of the NICs).
    pub inter_node: Link,
    /// Achieved fractions of the peaks above.
    pub efficiency: Efficiency,
    /// How the software stack computes attention (default: flash).
    #[serde(default)]
    pub attention_kernel: AttentionKernel,
    /// Memory the allocator holds beyond a device's live peak, as a
    /// fraction of it: freed buffers kept for reuse and the holes between
    /// live ones. Default 0 (a GPU caching allocator's slack is part of
    /// `memory_reserve_bytes`); host memory under glibc malloc needs it.
    #[serde(default)]
    pub allocator_overhead: f64,
    /// Whose memory behaviour the plan is priced on (default: ours).
    #[serde(default)]
    pub memory_stack: MemoryStack,
    /// Fixed seconds of one op's forward beyond its roofline time (kernel
    /// launch, libtorch dispatch and autograd bookkeeping); its backward
    /// pays the op's backward factor of it. Default 0: on large GPU
    /// workloads it hides behind the queue; `autopart profile` measures it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub op_overhead_s: f64,
    /// Achieved bandwidth of single bandwidth-bound ops, by annotation name
    /// (`rms_norm`, `rope`, `add`, ...), over the bytes of their inputs and
    /// outputs: an op listed here is priced at its own rate instead of
    /// `hbm_bytes_per_s · efficiency.memory_bound` (an RMSNorm in f32 runs
    /// several passes, an add one). `autopart profile` measures them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub op_bandwidth_bytes_per_s: BTreeMap<String, f64>,
    /// Achieved attention FLOP/s per dtype (the annotation files' count),
    /// overriding `peak · efficiency.attention` (a CPU's bf16 attention can
    /// be slower than its f32 one while its bf16 GEMMs are faster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_flops_per_s: Option<PeakFlops>,
    /// How a GEMM's achieved rate varies with its shape: points (FLOPs per
    /// element moved, fraction of `peak_flops_per_s · efficiency.matmul`)
    /// in increasing intensity. A GEMM between two points runs at the
    /// fraction interpolated in the logarithm of its intensity, one outside
    /// them at the nearest point's. Empty (the default): every GEMM at the
    /// peak. `autopart profile` measures it: on a CPU a GEMM with a 64-wide
    /// side runs at about half the rate of a 1024-wide one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matmul_rate_curve: Vec<(f64, f64)>,
    /// The same for attention (FLOPs per element of q, k, v and the output,
    /// which grows with the sequence), as a fraction of its rate
    /// (`attention_flops_per_s`, else `peak · efficiency.attention`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attention_rate_curve: Vec<(f64, f64)>,
    /// How collectives within a node slow down with their size, by collective
    /// (`all_reduce`, `all_gather`, `reduce_scatter`, `all_to_all`,
    /// `broadcast`, `send_recv`): points (bytes, fraction of
    /// `intra_node.bandwidth_bytes_per_s · efficiency.collective`). On a CPU
    /// a 1 MiB message copies through caches at several times the rate of a
    /// 64 MiB one, and a reduce-scatter (which sums) runs at half an
    /// all-gather's. Groups across nodes keep the plain link figures.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub intra_node_curves: BTreeMap<String, Vec<(f64, f64)>>,
    /// Seconds of the runtime's optimizer step per parameter element it
    /// updates (clipping by the global norm, AdamW on f32 master weights
    /// and moments, clearing the gradient), overriding the estimate of
    /// twice the optimizer state's bytes at `hbm_bytes_per_s` (the update
    /// makes about a dozen passes over memory). `autopart profile` measures
    /// it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimizer_s_per_param: Option<f64>,
    /// Whether collectives run beside compute (a GPU's copy engines and
    /// NICs: gradient reduction hides behind the backward, ZeRO-3's gathers
    /// behind the layers before them). `false` on CPU ranks, whose
    /// collectives are memory copies by the very cores that compute: each
    /// is paid in full. Default `true`; `autopart profile` on CPU writes
    /// `false`.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub comm_overlaps_compute: bool,
    /// Whether tensor-parallel collectives hide behind the GEMMs beside them
    /// (Transformer Engine's userbuffer overlap, on in NeMo's recipes): a
    /// layer then pays the larger of its compute and its tp communication
    /// instead of their sum. Default `false`: autopart's runtime, like
    /// Megatron-LM without TE, runs them in line.
    #[serde(default, skip_serializing_if = "is_false")]
    pub tp_comm_overlaps_compute: bool,
    /// Whether the all-gather of updated weights under ZeRO-1/2 hides behind
    /// the next step's forward (Megatron's distributed optimizer with
    /// `overlap_param_gather`, on in NeMo's recipes). Default `false`:
    /// autopart's runtime gathers after the optimizer step.
    #[serde(default, skip_serializing_if = "is_false")]
    pub param_gather_overlaps_forward: bool,
    /// Where the figures came from when `autopart profile` wrote the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured: Option<Measured>,
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

fn is_false(v: &bool) -> bool {
    !*v
}

fn yes() -> bool {
    true
}

fn is_true(v: &bool) -> bool {
    *v
}

/// The provenance `autopart profile` records: when, how and on what each
/// figure was measured, or which preset it was taken from and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Measured {
    /// UTC time the profiling started (RFC 3339).
    pub at: String,
    /// The command that measured (the launcher's process count with it).
    pub command: String,
    /// Host names, one per node.
    pub hosts: Vec<String>,
    /// Processes, and torch threads per process.
    pub ranks: u32,
    pub threads: u32,
    /// The preset the figures that could not be measured came from.
    pub base: String,
    /// Figure (its path in this file) → how it was measured, or why not.
    pub figures: BTreeMap<String, String>,
}

/// The training stack whose memory behaviour the memory model follows where
/// stacks differ. Plans run on autopart's runtime; published runs (see
/// `validate`) ran on Megatron-LM, DeepSpeed or FSDP.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryStack {
    /// autopart's runtime: ZeRO-3 gathers each layer one layer ahead (two
    /// layers' weights whole at a time), ZeRO-2/3 stream each layer's
    /// gradients into f32 slices, f32 master weights whenever the weights
    /// are not f32, and full recompute keeps each layer's input.
    #[default]
    Autopart,
    /// Megatron-LM / DeepSpeed / FSDP: ZeRO-3 gathers one layer at a time,
    /// ZeRO-2 shards gradients, mixed precision keeps f32 master weights,
    /// and full recompute keeps only each layer's input.
    Reference,
}

/// The attention implementation the cost model assumes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttentionKernel {
    /// Fused, tiled attention (FlashAttention, PyTorch SDPA): scores never
    /// reach device memory.
    #[default]
    Flash,
    /// Scores and probabilities written to and read back from device
    /// memory, with attention dropout (Megatron-LM before FlashAttention,
    /// 2021): memory traffic of several passes over b·h·l·s elements.
    Materialized,
}

/// Dense peak FLOP/s of one device per dtype. `fp32` is the rate an fp32
/// matmul gets by default in PyTorch (no TF32).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeakFlops {
    pub bf16: f64,
    pub fp16: f64,
    pub fp32: f64,
}

/// One level of the interconnect, as one device sees it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    /// Unidirectional bandwidth per device: what a ring member sends to its
    /// neighbour per second.
    pub bandwidth_bytes_per_s: f64,
    /// Latency of one step (one message hop) of a collective.
    pub latency_s: f64,
}

/// Achieved fractions of peak, each in (0, 1]. The preset values are initial
/// estimates, to be calibrated against published runs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Efficiency {
    /// Fraction of peak FLOP/s reached by large GEMMs.
    pub matmul: f64,
    /// Fraction of HBM bandwidth reached by memory-bound kernels.
    pub memory_bound: f64,
    /// Fraction of link bandwidth reached by collectives.
    pub collective: f64,
    /// Fraction of peak FLOP/s reached by fused attention kernels; `matmul`
    /// when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention: Option<f64>,
}

impl PeakFlops {
    /// Peak FLOP/s for `dtype`. Integer ops (index arithmetic, gathers) run
    /// on the same vector units as fp32 and are priced at the fp32 rate.
    pub fn for_dtype(&self, dtype: DType) -> f64 {
        match dtype {
            DType::Bf16 => self.bf16,
            DType::F16 => self.fp16,
            DType::F32 | DType::I64 => self.fp32,
        }
    }
}

/// Which level of the interconnect a group of ranks communicates over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum LinkLevel {
    IntraNode,
    InterNode,
}

impl fmt::Display for LinkLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LinkLevel::IntraNode => "intra-node",
            LinkLevel::InterNode => "inter-node",
        })
    }
}

impl Cluster {
    /// How much of a collective `compute_s` seconds of compute beside it
    /// can hide: all of it where collectives overlap compute, none on CPU
    /// ranks ([`Self::comm_overlaps_compute`]).
    pub fn comm_hidden_by(&self, compute_s: f64) -> f64 {
        if self.comm_overlaps_compute {
            compute_s
        } else {
            0.0
        }
    }

    /// The built-in preset `name`, if there is one.
    pub fn preset(name: &str) -> Option<Cluster> {
        PRESETS
            .iter()
            .find(|&&(preset, _)| preset == name)
            // The presets are validated by the tests, so a preset that fails
            // to load is a build defect; `None` keeps this path panic-free.
            .and_then(|&(preset, text)| {
                Cluster::from_ron_str(text, &format!("clusters/{preset}.ron")).ok()
            })
    }

    /// Parses and validates RON text; `origin` names the text in errors (a
    /// file path).
    pub fn from_ron_str(text: &str, origin: &str) -> Result<Cluster, ClusterError> {
        let options = ron::Options::default()
            .with_default_extension(ron::extensions::Extensions::IMPLICIT_SOME);
        let cluster: Cluster = options.from_str(text).map_err(|err| ClusterError::Parse {
            origin: origin.to_owned(),
            line: err.span.start.line,
            col: err.span.start.col,
            message: lowercase_first(&err.code.to_string()),
        })?;
        cluster.validate(origin)?;
        Ok(cluster)
    }

    /// Writes the cluster as pretty RON, the format [`Cluster::from_ron_str`]
    /// reads.
    pub fn to_ron_string(&self) -> Result<String, ron::Error> {
        ron::ser::to_string_pretty(self, ron::ser::PrettyConfig::default())
    }

    /// Checks every field; reports all invalid fields at once, each by its
    /// path in the RON file.
    pub fn validate(&self, origin: &str) -> Result<(), ClusterError> {
        // Checked in file order, so the report reads top to bottom.
        let mut problems = Vec::new();
        let mut check = |field: &'static str, ok: bool, reason: String| {
            if !ok {
                problems.push(InvalidField { field, reason });
            }
        };
        let positive = |value: f64| value.is_finite() && value > 0.0;
        let must_be_positive =
            |value: f64| format!("must be a positive finite number, got {value}");

        check(
            "devices_per_node",
            self.devices_per_node > 0,
            "must be at least 1".to_owned(),
        );
        let peaks = &self.peak_flops_per_s;
        for (field, value) in [
            ("peak_flops_per_s.bf16", peaks.bf16),
            ("peak_flops_per_s.fp16", peaks.fp16),
            ("peak_flops_per_s.fp32", peaks.fp32),
        ] {
            check(field, positive(value), must_be_positive(value));
        }
        check(
            "memory_bytes",
            self.memory_bytes > 0,
            "must be at least 1".to_owned(),
        );
        check(
            "memory_reserve_bytes",
            self.memory_bytes == 0 || self.memory_reserve_bytes < self.memory_bytes,
            format!(
                "must be less than memory_bytes ({}), got {}",
                self.memory_bytes, self.memory_reserve_bytes
            ),
        );
        check(
            "hbm_bytes_per_s",
            positive(self.hbm_bytes_per_s),
            must_be_positive(self.hbm_bytes_per_s),
        );
        for (bandwidth_field, latency_field, link) in [
            (
                "intra_node.bandwidth_bytes_per_s",
                "intra_node.latency_s",
                &self.intra_node,
            ),
            (
                "inter_node.bandwidth_bytes_per_s",
                "inter_node.latency_s",
                &self.inter_node,
            ),
        ] {
            let bandwidth = link.bandwidth_bytes_per_s;
            check(
                bandwidth_field,
                positive(bandwidth),
                must_be_positive(bandwidth),
            );
            let latency = link.latency_s;
            check(
                latency_field,
                latency.is_finite() && latency >= 0.0,
                format!("must be a finite number of seconds >= 0, got {latency}"),
            );
        }
        check(
            "allocator_overhead",
            self.allocator_overhead.is_finite() && self.allocator_overhead >= 0.0,
            format!(
                "must be a finite fraction >= 0, got {}",
                self.allocator_overhead
            ),
        );
        check(
            "op_overhead_s",
            self.op_overhead_s.is_finite() && (0.0..1.0).contains(&self.op_overhead_s),
            format!(
                "must be a finite number of seconds in [0, 1), got {}",
                self.op_overhead_s
            ),
        );
        for (name, &bw) in &self.op_bandwidth_bytes_per_s {
            check(
                "op_bandwidth_bytes_per_s",
                positive(bw),
                format!("{name}: {}", must_be_positive(bw)),
            );
        }
        type Curve<'c> = (&'static str, String, &'c [(f64, f64)]);
        let mut curves: Vec<Curve<'_>> = vec![
            ("matmul_rate_curve", String::new(), &self.matmul_rate_curve),
            (
                "attention_rate_curve",
                String::new(),
                &self.attention_rate_curve,
            ),
        ];
        for (name, points) in &self.intra_node_curves {
            curves.push(("intra_node_curves", format!("{name}: "), points));
        }
        for (field, prefix, points) in curves {
            let bad = points
                .iter()
                .position(|&(x, f)| !positive(x) || !positive(f))
                .map(|i| {
                    let (x, f) = points[i];
                    format!("{prefix}point {i} ({x}, {f}): both must be positive finite numbers")
                })
                .or_else(|| {
                    points.windows(2).position(|w| w[1].0 <= w[0].0).map(|i| {
                        format!(
                            "{prefix}points {i} and {} ({} then {}): must be in increasing order of their first number",
                            i + 1,
                            points[i].0,
                            points[i + 1].0
                        )
                    })
                });
            check(field, bad.is_none(), bad.unwrap_or_default());
        }
        if let Some(o) = self.optimizer_s_per_param {
            check(
                "optimizer_s_per_param",
                o.is_finite() && (0.0..1.0).contains(&o),
                format!("must be a finite number of seconds in [0, 1), got {o}"),
            );
        }
        if let Some(a) = &self.attention_flops_per_s {
            for (field, value) in [
                ("attention_flops_per_s.bf16", a.bf16),
                ("attention_flops_per_s.fp16", a.fp16),
                ("attention_flops_per_s.fp32", a.fp32),
            ] {
                check(field, positive(value), must_be_positive(value));
            }
        }
        let eff = &self.efficiency;
        for (field, value) in [
            ("efficiency.matmul", Some(eff.matmul)),
            ("efficiency.memory_bound", Some(eff.memory_bound)),
            ("efficiency.collective", Some(eff.collective)),
            ("efficiency.attention", eff.attention),
        ] {
            if let Some(value) = value {
                check(
                    field,
                    value > 0.0 && value <= 1.0,
                    format!("must be in (0, 1], got {value}"),
                );
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ClusterError::Invalid {
                origin: origin.to_owned(),
                problems,
            })
        }
    }

    /// Memory a plan may use on one device: capacity minus the reserve.
    pub fn usable_memory_bytes(&self) -> u64 {
        self.memory_bytes.saturating_sub(self.memory_reserve_bytes)
    }

    /// The link of `level`.
    pub fn link(&self, level: LinkLevel) -> &Link {
        match level {
            LinkLevel::IntraNode => &self.intra_node,
            LinkLevel::InterNode => &self.inter_node,
        }
    }
}

/// Prints a small table, one figure per line, in human units.
impl fmt::Display for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const GIB: f64 = (1u64 << 30) as f64;
        writeln!(
            f,
            "cluster {}: {} devices per node",
            self.name, self.devices_per_node
        )?;
        let peaks = &self.peak_flops_per_s;
        for (label, peak) in [
            ("bf16", peaks.bf16),
            ("fp16", peaks.fp16),
            ("fp32", peaks.fp32),
        ] {
            writeln!(f, "  peak {label}        {}", scaled(peak, "FLOP/s"))?;
        }
        write!(
            f,
            "  memory           {:>9.1} GiB (reserve {:.1} GiB",
            self.memory_bytes as f64 / GIB,
            self.memory_reserve_bytes as f64 / GIB
        )?;
        if self.allocator_overhead > 0.0 {
            write!(
                f,
                ", allocator +{:.0}% of the peak",
                self.allocator_overhead * 100.0
            )?;
        }
        writeln!(f, ")")?;
        writeln!(
            f,
            "  hbm              {}",
            scaled(self.hbm_bytes_per_s, "B/s")
        )?;
        for (label, link) in [
            ("intra-node link", &self.intra_node),
            ("inter-node link", &self.inter_node),
        ] {
            writeln!(
                f,
                "  {label}  {}, {:.1} us",
                scaled(link.bandwidth_bytes_per_s, "B/s"),
                link.latency_s * 1e6
            )?;
        }
        let eff = &self.efficiency;
        write!(f, "  efficiency       matmul {:.2}", eff.matmul)?;
        if let Some(attention) = eff.attention {
            write!(f, ", attention {attention:.2}")?;
        }
        writeln!(
            f,
            ", memory-bound {:.2}, collective {:.2}",
            eff.memory_bound, eff.collective
        )?;
        if self.op_overhead_s > 0.0 {
            writeln!(f, "  op overhead      {:>9.1} us", self.op_overhead_s * 1e6)?;
        }
        if !self.comm_overlaps_compute {
            writeln!(f, "  collectives      not overlapped with compute")?;
        }
        if let Some(o) = self.optimizer_s_per_param {
            writeln!(f, "  optimizer step   {:>9.2} ns per parameter", o * 1e9)?;
        }
        if let Some(m) = &self.measured {
            writeln!(
                f,
                "  measured         {} by `{}` on {}",
                m.at,
                m.command,
                m.hosts.join(", ")
            )?;
        }
        Ok(())
    }
}

/// `value` with the largest SI prefix that keeps it at least 1, right-aligned
/// in 9 columns: `  312.0 TFLOP/s`, `     2.04 TB/s`.
fn scaled(value: f64, unit: &str) -> String {
    let (scale, prefix) = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")]
        .into_iter()
        .find(|&(scale, _)| value >= scale)
        .unwrap_or((1.0, ""));
    let value = value / scale;
    let decimals = if value < 10.0 { 2 } else { 1 };
    format!("{value:>9.decimals$} {prefix}{unit}")
}

/// One invalid field of a cluster spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidField {
    /// Path of the field in the RON file, e.g. `efficiency.matmul`.
    pub field: &'static str,
    /// What was expected and what was found.
    pub reason: String,
}

impl fmt::Display for InvalidField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` {}", self.field, self.reason)
    }
}

/// Why a cluster could not be loaded.
#[derive(Debug, Error)]
pub enum ClusterError {
    #[error("unknown cluster preset `{name}`: expected one of {presets}, or a path to a .ron file")]
    UnknownPreset { name: String, presets: String },
    #[error("cannot read cluster file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}:{line}:{col}: {message}")]
    Parse {
        origin: String,
        line: usize,
        col: usize,
        message: String,
    },
    #[error("{origin}: invalid cluster: {}", join_problems(problems))]
    Invalid {
        origin: String,
        problems: Vec<InvalidField>,
    },
}

fn join_problems(problems: &[InvalidField]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// ron's messages start with a capital; ours are lowercase fragments.
fn lowercase_first(message: &str) -> String {
    let mut chars = message.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::expect;

    fn a100() -> Cluster {
        load_cluster("a100-80gb").expect("a100-80gb preset loads")
    }

    #[test]
    fn every_preset_loads_validates_and_is_named_after_its_file() {
        let names: Vec<_> = preset_names().collect();
        assert_eq!(
            names,
            ["a100-80gb", "h100", "h200", "mi300x", "trn1", "cpu"]
        );
        for name in names {
            let cluster = load_cluster(name).unwrap_or_else(|err| panic!("{name}: {err}"));
            assert_eq!(cluster.name, name);
            assert!(cluster.usable_memory_bytes() > 0, "{name}");
            assert_eq!(Cluster::preset(name), Some(cluster));
        }
    }

    #[test]
    fn presets_match_hardware_csv() {
        // Figures from shared/data/hardware.csv; trn1 is per NeuronCore (half a chip).
        let gib = 1u64 << 30;
        let expected = [
            ("a100-80gb", 8, 312e12, 80 * gib, 2.039e12, 300e9, 25e9),
            ("h100", 8, 989.4e12, 80 * gib, 3.35e12, 450e9, 50e9),
            ("h200", 8, 989.4e12, 141 * gib, 4.8e12, 450e9, 50e9),
            ("mi300x", 8, 1307.4e12, 192 * gib, 5.3e12, 448e9, 50e9),
            (
                "trn1",
                32,
                95e12,
                16 * gib,
                0.41e12,
                192e9,
                800e9 / 8.0 / 32.0,
            ),
        ];
        for (name, devices, bf16, memory, hbm, intra, inter) in expected {
            let c = load_cluster(name).expect("preset loads");
            assert_eq!(c.devices_per_node, devices, "{name}");
            assert_eq!(c.peak_flops_per_s.bf16, bf16, "{name}");
            assert_eq!(c.memory_bytes, memory, "{name}");
            assert_eq!(c.hbm_bytes_per_s, hbm, "{name}");
            assert_eq!(c.intra_node.bandwidth_bytes_per_s, intra, "{name}");
            assert_eq!(c.inter_node.bandwidth_bytes_per_s, inter, "{name}");
        }
    }

    #[test]
    fn display_is_a_small_table() {
        expect![[r#"
            cluster a100-80gb: 8 devices per node
              peak bf16            312.0 TFLOP/s
              peak fp16            312.0 TFLOP/s
              peak fp32             19.5 TFLOP/s
              memory                80.0 GiB (reserve 4.0 GiB)
              hbm                   2.04 TB/s
              intra-node link      300.0 GB/s, 2.0 us
              inter-node link       25.0 GB/s, 6.0 us
              efficiency       matmul 0.65, attention 0.60, memory-bound 0.80, collective 0.80
        "#]]
        .assert_eq(&a100().to_string());
    }

    #[test]
    fn ron_round_trips() {
        let cluster = a100();
        let text = cluster.to_ron_string().expect("serializes");
        let parsed = Cluster::from_ron_str(&text, "round-trip").expect("parses back");
        assert_eq!(parsed, cluster);
    }

    #[test]
    fn attention_may_be_written_bare_or_omitted() {
        let text = include_str!("../../clusters/a100-80gb.ron");
        let explicit = text.replace("attention: 0.6,", "attention: Some(0.6),");
        let omitted = text.replace("attention: 0.6,", "");
        let explicit = Cluster::from_ron_str(&explicit, "explicit").expect("Some(..) parses");
        let omitted = Cluster::from_ron_str(&omitted, "omitted").expect("omitted parses");
        assert_eq!(explicit.efficiency.attention, Some(0.6));
        assert_eq!(omitted.efficiency.attention, None);
    }

    #[test]
    fn unknown_preset_lists_the_presets() {
        let err = load_cluster("a100").expect_err("no such preset");
        assert_eq!(
            err.to_string(),
            "unknown cluster preset `a100`: expected one of a100-80gb, h100, h200, mi300x, \
             trn1, cpu, or a path to a .ron file"
        );
    }

    #[test]
    fn malformed_ron_names_line_and_column() {
        let text = "(\n    name: \"x\",\n    devices_per_node: eight,\n)";
        let err = Cluster::from_ron_str(text, "my.ron").expect_err("malformed");
        let ClusterError::Parse { line, col, .. } = &err else {
            panic!("expected a parse error, got {err}");
        };
        assert_eq!((*line, *col), (3, 23), "{err}");
        assert!(err.to_string().starts_with("my.ron:3:23: "), "{err}");
    }

    #[test]
    fn misspelt_field_is_a_parse_error_naming_it() {
        let text =
            include_str!("../../clusters/a100-80gb.ron").replace("collective:", "colective:");
        let err = Cluster::from_ron_str(&text, "typo.ron").expect_err("unknown field");
        let message = err.to_string();
        assert!(message.starts_with("typo.ron:"), "{message}");
        assert!(message.contains("colective"), "{message}");
    }

    #[test]
    fn rate_curves_must_be_positive_and_increasing() {
        let mut cluster = a100();
        cluster.matmul_rate_curve = vec![(10.0, 0.5), (5.0, 1.0)];
        cluster
            .intra_node_curves
            .insert("all_reduce".into(), vec![(1e6, 0.0)]);
        let err = cluster.validate("c.ron").expect_err("invalid");
        expect!["c.ron: invalid cluster: `matmul_rate_curve` points 0 and 1 (10 then 5): must be in increasing order of their first number; `intra_node_curves` all_reduce: point 0 (1000000, 0): both must be positive finite numbers"]
        .assert_eq(&err.to_string());
        cluster.matmul_rate_curve = vec![(5.0, 0.5), (10.0, 1.0)];
        cluster.intra_node_curves.clear();
        cluster.validate("c.ron").expect("valid");
        // They round-trip through the file format.
        let text = cluster.to_ron_string().expect("serializes");
        assert_eq!(
            Cluster::from_ron_str(&text, "c.ron").expect("reads"),
            cluster
        );
    }

    #[test]
    fn invalid_fields_are_all_named() {
        let mut cluster = a100();
        cluster.devices_per_node = 0;
        cluster.inter_node.bandwidth_bytes_per_s = 0.0;
        cluster.efficiency.matmul = 1.2;
        cluster.efficiency.attention = Some(0.0);
        cluster.memory_reserve_bytes = cluster.memory_bytes;
        let err = cluster.validate("bad.ron").expect_err("invalid");
        expect!["bad.ron: invalid cluster: `devices_per_node` must be at least 1; `memory_reserve_bytes` must be less than memory_bytes (85899345920), got 85899345920; `inter_node.bandwidth_bytes_per_s` must be a positive finite number, got 0; `efficiency.matmul` must be in (0, 1], got 1.2; `efficiency.attention` must be in (0, 1], got 0"]
        .assert_eq(&err.to_string());
    }
}
