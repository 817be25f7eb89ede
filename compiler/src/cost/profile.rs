//! Fitting a cluster file to `autopart profile`'s measurements.
//!
//! The runtime's profiler ([`autopart_vocab::profile::Raw`]) times ops and
//! collectives; this module turns the samples into the figures a
//! [`Cluster`] holds by inverting the formulas that price plans
//! ([`super::time::compute_time`] plus [`Cluster::op_overhead_s`] per op,
//! backward at the op's backward factor; [`super::collective`]'s ring
//! formulas), so that a profiled cluster predicts what it measured:
//!
//! - `op_overhead_s`: a chain of tiny ops (a Llama layer's op mix on 1×4×64
//!   tensors) forward plus backward, divided by the ops and by 1 + 2 (an
//!   op's forward and its backward at twice the forward);
//! - `peak_flops_per_s.<dtype>`: the median `linear` of that dtype over the
//!   shapes, forward plus backward with the fixed cost taken off, at 3× the
//!   forward FLOPs, with `efficiency.matmul` 1 (the rate is the achieved one);
//! - `efficiency.attention`: the median f32 attention at 1 + 2.5 times its
//!   forward FLOPs (FlashAttention-2's backward factor) over the f32 peak;
//! - `hbm_bytes_per_s`: the median bandwidth-bound op at 3× its forward
//!   bytes, `efficiency.memory_bound` 1;
//! - rate curves: `matmul_rate_curve` and `attention_rate_curve` (each f32
//!   sample's rate over the median, by FLOPs per element moved; the half
//!   types' rates are their samples over the f32 curve), so each shape is
//!   priced at the rate its size ran at. Bandwidth-bound ops keep one median
//!   rate each: the profile's small tensors stay in cache between repeats,
//!   which a step's do not (a curve by size priced the 1024x8 Llama's
//!   micro-batch 1 faster than its micro-batch 4, the reverse of measured);
//! - links ([`fit_link`]): over every collective of the world group (one
//!   node) or of one rank per node (across nodes), bandwidth from the
//!   messages of 1 MiB and up, latency from the smallest, with
//!   `efficiency.collective` 1 (the fitted bandwidth is the achieved one);
//!   within a node, `intra_node_curves` then gives each collective's rate at
//!   each message size over that bandwidth (one line priced a CPU's 64 MiB
//!   all-reduce 80% fast);
//! - `optimizer_s_per_param`: the runtime's optimizer step over a layer's
//!   f32 parameters, per parameter (median over the layer widths);
//! - memory: the host's memory over the ranks on it (CPU ranks share it).
//!
//! What cannot be measured (the inter-node link on one node, the memory
//! reserve, the allocator's slack) comes from a base preset, and the file
//! says so figure by figure ([`Measured::figures`]).

use std::collections::BTreeMap;

use autopart_vocab::profile::{CollectiveKind, CollectiveSample, ComputeClass, Raw};

use super::cluster::{Cluster, Measured};
use super::collective::{Collective, Group, collective_time};
use super::time::curve_factor;

/// The fitted cluster and the fit's per-sample report.
#[derive(Debug)]
pub struct Fitted {
    pub cluster: Cluster,
    /// One line per sample: what ran, measured and as the fitted cluster
    /// prices it.
    pub rows: Vec<FitRow>,
}

/// One sample against the fitted cluster.
#[derive(Debug, Clone)]
pub struct FitRow {
    pub what: String,
    pub measured_s: f64,
    pub predicted_s: f64,
}

impl FitRow {
    pub fn error(&self) -> f64 {
        self.predicted_s / self.measured_s - 1.0
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    })
}

/// A rate curve from `(x, fraction)` samples: in increasing `x`, samples
/// of equal `x` averaged, non-finite or non-positive ones left out.
fn curve(points: impl Iterator<Item = (f64, f64)>) -> Vec<(f64, f64)> {
    let mut points: Vec<(f64, f64)> = points
        .filter(|&(x, f)| x.is_finite() && x > 0.0 && f.is_finite() && f > 0.0)
        .collect();
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut out: Vec<(f64, f64, u32)> = Vec::new();
    for (x, f) in points {
        match out.last_mut() {
            Some((lx, sum, n)) if (*lx - x).abs() <= 1e-9 * x => {
                *sum += f;
                *n += 1;
            }
            _ => out.push((x, f, 1)),
        }
    }
    out.into_iter()
        .map(|(x, sum, n)| (x, sum / f64::from(n)))
        .collect()
}

/// The dtype a sample names (`f32`, `bf16`, `f16`).
fn dtype_of(name: &str) -> crate::ir::DType {
    match name {
        "bf16" => crate::ir::DType::Bf16,
        "f16" => crate::ir::DType::F16,
        _ => crate::ir::DType::F32,
    }
}

/// Backward as a multiple of forward, as the search prices it.
fn backward_factor(class: ComputeClass) -> f64 {
    match class {
        ComputeClass::Attention => 2.5,
        _ => 2.0,
    }
}

fn to_collective(kind: CollectiveKind) -> Collective {
    match kind {
        CollectiveKind::AllReduce => Collective::AllReduce,
        CollectiveKind::AllGather => Collective::AllGather,
        CollectiveKind::ReduceScatter => Collective::ReduceScatter,
        CollectiveKind::AllToAll => Collective::AllToAll,
        CollectiveKind::Broadcast => Collective::Broadcast,
        CollectiveKind::SendRecv => Collective::SendRecv,
    }
}

/// Coefficients (of latency, of bytes / bandwidth) of a flat ring of `n`.
fn ring_coefficients(kind: CollectiveKind, n: f64) -> (f64, f64) {
    let steps = n - 1.0;
    match kind {
        CollectiveKind::AllReduce => (2.0 * steps, 2.0 * steps / n),
        CollectiveKind::AllGather | CollectiveKind::ReduceScatter | CollectiveKind::AllToAll => {
            (steps, steps / n)
        }
        CollectiveKind::Broadcast => (steps, 1.0),
        CollectiveKind::SendRecv => (1.0, 1.0),
    }
}

/// Latency and bandwidth of `t = a·L + c·S/B` over `samples` (flat
/// rings): the bandwidth by least squares on relative error over the
/// messages of at least 1 MiB (what gradient buckets and activations
/// move; below that caches flatter the rate), the latency as the median
/// of what the smallest messages leave after their bytes; twice, each
/// with the other's estimate. `None` with no samples.
pub fn fit_link(samples: &[&CollectiveSample]) -> Option<(f64, f64)> {
    const LARGE: f64 = (1u64 << 20) as f64;
    if samples.is_empty() {
        return None;
    }
    let smallest = samples
        .iter()
        .map(|s| s.bytes)
        .fold(f64::INFINITY, f64::min);
    let large: Vec<&&CollectiveSample> = samples
        .iter()
        .filter(|s| s.bytes >= LARGE.min(samples.iter().map(|s| s.bytes).fold(0.0, f64::max)))
        .collect();
    let (mut latency, mut inv_bw) = (0.0, 0.0);
    for _ in 0..3 {
        // Minimise sum ((c·S·x + a·L - t) / t)^2 over x = 1/B.
        let (mut num, mut den) = (0.0, 0.0);
        for s in &large {
            let (a, c) = ring_coefficients(s.kind, f64::from(s.size));
            let y = c * s.bytes / s.seconds;
            num += y * (1.0 - a * latency / s.seconds);
            den += y * y;
        }
        inv_bw = (num / den).max(1e-15);
        let rest: Vec<f64> = samples
            .iter()
            .filter(|s| s.bytes == smallest)
            .map(|s| {
                let (a, c) = ring_coefficients(s.kind, f64::from(s.size));
                ((s.seconds - c * s.bytes * inv_bw) / a).max(0.0)
            })
            .collect();
        latency = median(rest).unwrap_or(0.0);
    }
    Some((latency, 1.0 / inv_bw))
}

/// Fits `base`'s figures to `raw`; `command` is recorded as how they were
/// measured.
pub fn fit(raw: &Raw, base: &Cluster, base_name: &str, command: &str) -> Result<Fitted, String> {
    let mut c = base.clone();
    let mut figures: BTreeMap<String, String> = BTreeMap::new();
    let ranks = raw.ranks.max(1);
    let nodes = raw.nodes();
    let per_node = ranks.div_ceil(nodes.len().max(1) as u32);
    let at = rfc3339(raw.started_unix_s);
    let how = |what: &str| format!("measured {at}: {what}");
    let by_class = |class| raw.compute.iter().filter(move |s| s.class == class);

    c.name = format!("profiled-{}", nodes.first().copied().unwrap_or("host"));
    c.devices_per_node = per_node;
    figures.insert(
        "devices_per_node".into(),
        how(&format!("{ranks} ranks on {} host(s)", nodes.len())),
    );

    // Fixed cost per op.
    let overhead: Vec<f64> = by_class(ComputeClass::Overhead)
        .map(|s| s.fwd_bwd_s / (f64::from(s.ops.max(1)) * 3.0))
        .collect();
    let o = median(overhead).ok_or("the profile has no fixed-cost (overhead) sample")?;
    c.op_overhead_s = o;
    figures.insert(
        "op_overhead_s".into(),
        how(&format!(
            "a Llama layer's op mix on tiny tensors, forward + backward over 3 x its ops ({:.1} us)",
            o * 1e6
        )),
    );

    // Matmul rates with the fixed cost taken off.
    let rate = |s: &autopart_vocab::profile::ComputeSample| {
        let f = 1.0 + backward_factor(s.class);
        let t = (s.fwd_bwd_s - f * o).max(s.fwd_bwd_s * 0.05);
        f * s.flops / t
    };
    let intensity = |s: &autopart_vocab::profile::ComputeSample| {
        s.flops / (s.bytes / dtype_of(&s.dtype).size_bytes() as f64)
    };
    // A dtype's rate from its samples: the median of each one's rate over
    // the f32 curve at its intensity.
    let over_curve = |samples: &[&autopart_vocab::profile::ComputeSample], curve: &[(f64, f64)]| {
        median(
            samples
                .iter()
                .map(|s| rate(s) / curve_factor(curve, intensity(s)))
                .collect(),
        )
    };
    let of_dtype = |class, dtype: &str| -> Vec<&autopart_vocab::profile::ComputeSample> {
        let dtype = dtype.to_owned();
        by_class(class).filter(move |s| s.dtype == dtype).collect()
    };
    // The f32 rate is the median over the shapes, and the shape's effect a
    // curve over FLOPs per element moved (a GEMM with a 64-wide side runs
    // at half the rate of a 1024-wide one on a CPU): each f32 sample's rate
    // over the median, samples of equal intensity averaged. The half types
    // are measured at fewer shapes: their rate is the median of each
    // sample's rate over the f32 curve at its intensity, so the curve
    // carries them to the other shapes. Efficiency 1.
    let f32_mm = of_dtype(ComputeClass::Matmul, "f32");
    let Some(peak32) = median(f32_mm.iter().map(|s| rate(s)).collect()) else {
        return Err("the profile has no f32 linear sample".into());
    };
    c.matmul_rate_curve = curve(f32_mm.iter().map(|s| (intensity(s), rate(s) / peak32)));
    figures.insert(
        "matmul_rate_curve".into(),
        how(&format!(
            "{} f32 linears: each one's rate over the f32 median, by FLOPs per element moved ({:.0} to {:.0})",
            f32_mm.len(),
            c.matmul_rate_curve.first().map_or(0.0, |p| p.0),
            c.matmul_rate_curve.last().map_or(0.0, |p| p.0),
        )),
    );
    for (dtype, field) in [("f32", "fp32"), ("bf16", "bf16"), ("f16", "fp16")] {
        let samples = of_dtype(ComputeClass::Matmul, dtype);
        let note = match over_curve(&samples, &c.matmul_rate_curve) {
            Some(dtype_rate) => {
                match dtype {
                    "f32" => c.peak_flops_per_s.fp32 = peak32,
                    "bf16" => c.peak_flops_per_s.bf16 = dtype_rate,
                    _ => c.peak_flops_per_s.fp16 = dtype_rate,
                }
                let raw: Vec<f64> = samples.iter().map(|s| rate(s)).collect();
                let lo = raw.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = raw.iter().copied().fold(0.0, f64::max);
                how(&format!(
                    "median of {} {dtype} linears{} (forward + backward at 3x the forward FLOPs, fixed cost off; {:.1} to {:.1} GFLOP/s)",
                    samples.len(),
                    if dtype == "f32" {
                        ""
                    } else {
                        " over the f32 curve at their shapes"
                    },
                    lo / 1e9,
                    hi / 1e9
                ))
            }
            None => format!("not measured: from preset {base_name}"),
        };
        figures.insert(format!("peak_flops_per_s.{field}"), note);
    }
    c.efficiency.matmul = 1.0;
    figures.insert(
        "efficiency.matmul".into(),
        "1: the peaks are the measured rates".into(),
    );

    // Attention, in the annotation files' FLOPs, per dtype (a dtype not
    // measured runs at the f32 rate), with the sequence's effect a curve as
    // the GEMMs' (FLOPs per element of q, k, v and out grow with it).
    let f32_att = of_dtype(ComputeClass::Attention, "f32");
    if let Some(a32) = median(f32_att.iter().map(|s| rate(s)).collect()) {
        c.attention_rate_curve = curve(f32_att.iter().map(|s| (intensity(s), rate(s) / a32)));
        figures.insert(
            "attention_rate_curve".into(),
            how(&format!(
                "{} f32 causal attentions: each one's rate over the f32 median, by FLOPs per element of q, k, v and out",
                f32_att.len()
            )),
        );
        let mut rates = crate::cost::PeakFlops {
            bf16: a32,
            fp16: a32,
            fp32: a32,
        };
        c.efficiency.attention = Some((a32 / peak32).clamp(1e-3, 1.0));
        figures.insert(
            "efficiency.attention".into(),
            how(
                "the f32 attention rate over the f32 linear rate (attention_flops_per_s prices it)",
            ),
        );
        for (dtype, field) in [("f32", "fp32"), ("bf16", "bf16"), ("f16", "fp16")] {
            let samples = of_dtype(ComputeClass::Attention, dtype);
            let r = if dtype == "f32" {
                Some(a32)
            } else {
                over_curve(&samples, &c.attention_rate_curve)
            };
            let note = match r {
                Some(r) => {
                    match dtype {
                        "bf16" => rates.bf16 = r,
                        "f16" => rates.fp16 = r,
                        _ => {}
                    }
                    how(&format!(
                        "median of {} {dtype} causal attentions (4·b·l·s·h·d FLOPs, backward 2.5x, fixed cost off{})",
                        samples.len(),
                        if dtype == "f32" {
                            ""
                        } else {
                            "; over the f32 curve at their shapes"
                        }
                    ))
                }
                None => "not measured: the f32 rate".into(),
            };
            figures.insert(format!("attention_flops_per_s.{field}"), note);
        }
        c.attention_flops_per_s = Some(rates);
    }

    // Bandwidth-bound ops: each op at its own median rate over the sizes,
    // the median of all as the rate of ops not measured.
    let mb_rate = |s: &autopart_vocab::profile::ComputeSample| {
        let t = (s.fwd_bwd_s - 3.0 * o).max(s.fwd_bwd_s * 0.05);
        3.0 * s.bytes / t
    };
    let f32_mb: Vec<&autopart_vocab::profile::ComputeSample> = by_class(ComputeClass::MemoryBound)
        .filter(|s| s.dtype == "f32")
        .collect();
    let Some(hbm) = median(f32_mb.iter().map(|s| mb_rate(s)).collect()) else {
        return Err("the profile has no f32 bandwidth-bound sample".into());
    };
    c.hbm_bytes_per_s = hbm;
    c.efficiency.memory_bound = 1.0;
    figures.insert(
        "hbm_bytes_per_s".into(),
        how(&format!(
            "median of {} f32 bandwidth-bound ops (3x the forward bytes, fixed cost off): the rate of ops not in op_bandwidth_bytes_per_s",
            f32_mb.len()
        )),
    );
    figures.insert(
        "efficiency.memory_bound".into(),
        "1: the bandwidth is the measured one".into(),
    );
    let mut names: Vec<&str> = f32_mb.iter().map(|s| s.op.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    for name in names {
        let rates: Vec<f64> = f32_mb
            .iter()
            .filter(|s| s.op == name)
            .map(|s| mb_rate(s))
            .collect();
        if let Some(r) = median(rates.clone()) {
            c.op_bandwidth_bytes_per_s.insert(name.to_owned(), r);
            figures.insert(
                format!("op_bandwidth_bytes_per_s.{name}"),
                how(&format!(
                    "median of {} f32 sizes, forward + backward at 3x the forward bytes",
                    rates.len()
                )),
            );
        }
    }

    // The optimizer step per parameter: the median over the layer widths.
    let per_param: Vec<f64> = by_class(ComputeClass::Optimizer)
        .filter(|s| s.bytes > 0.0)
        .map(|s| s.fwd_bwd_s / (s.bytes / 4.0))
        .collect();
    match median(per_param.clone()) {
        Some(o) => {
            c.optimizer_s_per_param = Some(o);
            figures.insert(
                "optimizer_s_per_param".into(),
                how(&format!(
                    "median of {} optimizer steps over a layer's f32 parameters (clipping, AdamW, clearing the gradients; {:.2} ns per parameter)",
                    per_param.len(),
                    o * 1e9
                )),
            );
        }
        None => {
            figures.insert(
                "optimizer_s_per_param".into(),
                "not measured (a profile from before it was): twice the optimizer state at hbm_bytes_per_s".into(),
            );
        }
    }

    // CPU ranks copy collective data with the cores that compute.
    c.comm_overlaps_compute = raw.device != "cpu";
    figures.insert(
        "comm_overlaps_compute".into(),
        if c.comm_overlaps_compute {
            format!("from the device ({})", raw.device)
        } else {
            "false: CPU collectives are memory copies by the cores that compute".into()
        },
    );

    // Links. The base's collective efficiency is folded into its
    // bandwidths, so that efficiency.collective 1 keeps an unmeasured link
    // as fast as the base priced it.
    let base_eff = base.efficiency.collective;
    c.efficiency.collective = 1.0;
    c.intra_node.bandwidth_bytes_per_s = base.intra_node.bandwidth_bytes_per_s * base_eff;
    c.inter_node.bandwidth_bytes_per_s = base.inter_node.bandwidth_bytes_per_s * base_eff;
    figures.insert(
        "efficiency.collective".into(),
        "1: the link bandwidths are the achieved ones".into(),
    );
    let intra: Vec<&CollectiveSample> = raw
        .collectives
        .iter()
        .filter(|s| s.nodes == 1 && s.size > 1)
        .collect();
    let inter: Vec<&CollectiveSample> = raw
        .collectives
        .iter()
        .filter(|s| s.nodes > 1 && s.ranks_per_node == 1)
        .collect();
    let mut curves = BTreeMap::new();
    for (label, samples, link) in [
        ("intra_node", &intra, &mut c.intra_node),
        ("inter_node", &inter, &mut c.inter_node),
    ] {
        match fit_link(samples) {
            Some((latency, bandwidth)) => {
                link.latency_s = latency;
                link.bandwidth_bytes_per_s = bandwidth;
                if label == "intra_node" {
                    // Each collective's rate at each size over the fitted
                    // bandwidth: one straight line cannot price both a
                    // cache-resident 1 MiB and a 64 MiB message.
                    for kind in CollectiveKind::ALL {
                        let points =
                            curve(samples.iter().filter(|s| s.kind == kind).filter_map(|s| {
                                let (a, coef) = ring_coefficients(s.kind, f64::from(s.size));
                                let t = s.seconds - a * latency;
                                (t > 0.0 && coef > 0.0)
                                    .then(|| (s.bytes, coef * s.bytes / t / bandwidth))
                            }));
                        if !points.is_empty() {
                            curves.insert(to_collective(kind).key().to_owned(), points);
                        }
                    }
                }
                let sizes: Vec<f64> = samples.iter().map(|s| s.bytes).collect();
                let lo = sizes.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = sizes.iter().copied().fold(0.0, f64::max);
                let text = how(&format!(
                    "{} samples (6 collectives, {} to {} bytes, {} ranks): bandwidth by least squares over those of 1 MiB and up, latency from the smallest",
                    samples.len(),
                    lo,
                    hi,
                    samples[0].size
                ));
                figures.insert(format!("{label}.bandwidth_bytes_per_s"), text.clone());
                figures.insert(format!("{label}.latency_s"), text);
            }
            None => {
                let why = if label == "intra_node" {
                    "one process per node"
                } else {
                    "one node"
                };
                let text = format!(
                    "not measured ({why}): from preset {base_name} (bandwidth x its collective efficiency {base_eff})"
                );
                figures.insert(format!("{label}.bandwidth_bytes_per_s"), text.clone());
                figures.insert(format!("{label}.latency_s"), text);
            }
        }
    }

    if !curves.is_empty() {
        figures.insert(
            "intra_node_curves".into(),
            how("each collective's rate at each message size over intra_node.bandwidth_bytes_per_s, latency off"),
        );
    }
    c.intra_node_curves = curves;

    // Memory: CPU ranks share the host's memory.
    match raw.host_memory_bytes {
        Some(total) if raw.device == "cpu" => {
            c.memory_bytes = total / u64::from(per_node.max(1));
            if c.memory_reserve_bytes >= c.memory_bytes {
                c.memory_reserve_bytes = c.memory_bytes / 8;
            }
            figures.insert(
                "memory_bytes".into(),
                how(&format!(
                    "MemTotal {total} bytes over {per_node} ranks per host"
                )),
            );
        }
        _ => {
            figures.insert(
                "memory_bytes".into(),
                format!("not measured: from preset {base_name}"),
            );
        }
    }
    for field in [
        "memory_reserve_bytes",
        "allocator_overhead",
        "attention_kernel",
        "memory_stack",
    ] {
        figures.insert(
            field.into(),
            format!("not measured: from preset {base_name}"),
        );
    }
    c.measured = Some(Measured {
        at,
        command: command.to_owned(),
        hosts: nodes.iter().map(|h| (*h).to_owned()).collect(),
        ranks,
        threads: raw.threads,
        base: base_name.to_owned(),
        figures,
    });
    c.validate("the profiled cluster")
        .map_err(|e| format!("the fit gave an invalid cluster: {e}"))?;
    let rows = report(raw, &c);
    Ok(Fitted { cluster: c, rows })
}

/// Every sample as the fitted cluster prices it.
fn report(raw: &Raw, c: &Cluster) -> Vec<FitRow> {
    use super::time::{ComputeKind, op_time};
    let mut rows = Vec::new();
    for s in &raw.compute {
        let dtype = dtype_of(&s.dtype);
        let kind = match s.class {
            ComputeClass::Matmul => ComputeKind::Matmul,
            ComputeClass::Attention => ComputeKind::Attention,
            _ => ComputeKind::MemoryBound,
        };
        if s.class == ComputeClass::Optimizer {
            rows.push(FitRow {
                what: s.name.clone(),
                measured_s: s.fwd_bwd_s,
                predicted_s: s.bytes / 4.0 * c.optimizer_s_per_param.unwrap_or(0.0),
            });
            continue;
        }
        let fwd = if s.class == ComputeClass::Overhead {
            f64::from(s.ops) * c.op_overhead_s
        } else {
            op_time(c, &s.op, s.flops, s.bytes, kind, dtype)
        };
        rows.push(FitRow {
            what: format!("{} (forward + backward)", s.name),
            measured_s: s.fwd_bwd_s,
            predicted_s: fwd * (1.0 + backward_factor(s.class)),
        });
    }
    for s in &raw.collectives {
        let group = if s.nodes <= 1 {
            Group::within_node(s.size)
        } else {
            // One rank per node: stride a node; k per node: stride 1.
            Group::placed(c, s.size, c.devices_per_node / s.ranks_per_node.max(1))
        };
        rows.push(FitRow {
            what: format!(
                "{} {} B over {} ranks on {} node(s)",
                s.kind.name(),
                s.bytes,
                s.size,
                s.nodes
            ),
            measured_s: s.seconds,
            predicted_s: collective_time(c, to_collective(s.kind), &group, s.bytes),
        });
    }
    rows
}

/// `YYYY-MM-DDTHH:MM:SSZ` of a Unix time (civil-from-days, proleptic
/// Gregorian).
pub fn rfc3339(unix_s: u64) -> String {
    let days = (unix_s / 86_400) as i64;
    let secs = unix_s % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::cluster::load_cluster;
    use crate::cost::{ComputeKind, op_time};
    use autopart_vocab::profile::{ComputeSample, FORMAT_VERSION};

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_796_169_600 + 3661), "2026-12-02T01:01:01Z");
    }

    /// A collective over the two ranks of [`two_ranks`].
    fn pair_sample(kind: CollectiveKind, bytes: f64, seconds: f64) -> CollectiveSample {
        CollectiveSample {
            kind,
            size: 2,
            nodes: 1,
            ranks_per_node: 2,
            bytes,
            seconds,
        }
    }

    /// A profile of two ranks on one 24 GiB host, started 2026-12-02.
    fn two_ranks(compute: Vec<ComputeSample>, collectives: Vec<CollectiveSample>) -> Raw {
        Raw {
            format_version: FORMAT_VERSION,
            started_unix_s: 1_796_169_600,
            seconds: 60.0,
            ranks: 2,
            hosts: vec!["box".into(), "box".into()],
            threads: 1,
            device: "cpu".into(),
            launcher: None,
            host_memory_bytes: Some(24 << 30),
            budget_s: 0.1,
            compute,
            collectives,
        }
    }

    /// A machine whose GEMMs slow down at low intensity and whose
    /// collectives slow down past a cache: the fitted curves price every
    /// sample as it ran, and carry a half type measured at one shape to the
    /// others.
    #[test]
    fn fit_prices_each_shape_at_its_measured_rate() {
        let o = 10e-6;
        let mm_rate = |intensity: f64| 100e9 * (intensity / 400.0).min(1.0);
        let add_rate = |_bytes: f64| 8e9;
        let sample = |class, op: &str, dtype: &str, flops: f64, bytes: f64, t: f64| {
            let f = 1.0 + backward_factor(class);
            ComputeSample {
                class,
                op: op.into(),
                name: format!("{op} {flops} {bytes}"),
                dtype: dtype.into(),
                flops,
                bytes,
                ops: 1,
                fwd_s: t + o,
                fwd_bwd_s: f * (t + o),
            }
        };
        let gemm = |k: f64, n: f64, dtype: &str, speedup: f64| {
            let eb = if dtype == "f32" { 4.0 } else { 2.0 };
            let flops = 2.0 * 512.0 * k * n;
            let elements = 512.0 * k + k * n + 512.0 * n;
            let t = flops / (speedup * mm_rate(flops / elements));
            sample(
                ComputeClass::Matmul,
                "linear",
                dtype,
                flops,
                eb * elements,
                t,
            )
        };
        let mut compute = vec![sample(
            ComputeClass::Overhead,
            "layers",
            "f32",
            0.0,
            0.0,
            0.0,
        )];
        compute[0].fwd_s = 15.0 * o;
        compute[0].fwd_bwd_s = 45.0 * o;
        compute[0].ops = 15;
        for d in [64.0, 128.0, 256.0, 1024.0, 2048.0] {
            compute.push(gemm(d, d, "f32", 1.0));
            compute.push(gemm(d, 2.75 * d, "f32", 1.0));
        }
        // bf16 measured at one shape only, at twice the f32 rate there.
        compute.push(gemm(1024.0, 1024.0, "bf16", 2.0));
        for e in [1e5, 1e6, 1e7, 1e8] {
            let bytes = 12.0 * e;
            compute.push(sample(
                ComputeClass::MemoryBound,
                "add",
                "f32",
                e,
                bytes,
                bytes / add_rate(bytes),
            ));
        }
        // Collectives whose bandwidth drops past a cache, reduce-scatter
        // at half the others' rate.
        let mut collectives = Vec::new();
        for kind in CollectiveKind::ALL {
            for bytes in [4096.0, 1e6, 1.6e7, 6.4e7] {
                let (a, coef) = ring_coefficients(kind, 2.0);
                let bw = if bytes < 4e6 { 4e9 } else { 1e9 };
                let bw = if kind == CollectiveKind::ReduceScatter {
                    bw / 2.0
                } else {
                    bw
                };
                collectives.push(pair_sample(kind, bytes, a * 5e-6 + coef * bytes / bw));
            }
        }
        let raw = two_ranks(compute, collectives);
        let base = load_cluster("cpu").expect("cpu preset");
        let fitted = fit(&raw, &base, "cpu", "autopart profile").expect("fits");
        for row in &fitted.rows {
            assert!(row.error().abs() < 1e-6, "{}: {}", row.what, row.error());
        }
        let c = &fitted.cluster;
        assert!(c.matmul_rate_curve.len() >= 5, "{:?}", c.matmul_rate_curve);
        // A bf16 GEMM at a 64-wide shape: twice the f32 rate at that shape.
        let want = gemm(64.0, 64.0, "bf16", 2.0);
        let t = op_time(
            c,
            "linear",
            want.flops,
            want.bytes,
            ComputeKind::Matmul,
            crate::ir::DType::Bf16,
        );
        assert!((t / want.fwd_s - 1.0).abs() < 1e-6, "{t} vs {}", want.fwd_s);
        // Without the curves the small GEMMs would be priced at the median.
        let mut flat = c.clone();
        flat.matmul_rate_curve.clear();
        let small = gemm(64.0, 64.0, "f32", 1.0);
        let t = op_time(
            &flat,
            "linear",
            small.flops,
            small.bytes,
            ComputeKind::Matmul,
            crate::ir::DType::F32,
        );
        assert!(t < 0.5 * small.fwd_s, "{t} vs {}", small.fwd_s);
        // A 64 MB reduce-scatter at its own rate; the plain link (fitted
        // to every collective) would price it nearly twice too fast.
        assert_eq!(c.intra_node_curves.len(), 6, "{:?}", c.intra_node_curves);
        let group = Group::within_node(2);
        let rs = collective_time(c, Collective::ReduceScatter, &group, 6.4e7);
        let want = 5e-6 + 0.5 * 6.4e7 / 0.5e9;
        assert!((rs / want - 1.0).abs() < 1e-6, "{rs} vs {want}");
        let mut plain = c.clone();
        plain.intra_node_curves.clear();
        let rs = collective_time(&plain, Collective::ReduceScatter, &group, 6.4e7);
        assert!(rs < 0.6 * want, "{rs} vs {want}");
    }

    /// Samples made from a known cluster are fitted back to it.
    #[test]
    fn fit_recovers_a_synthetic_machine() {
        let (peak, eff, hbm, o, lat, bw) = (50e9, 1.0, 10e9, 20e-6, 8e-6, 3e9);
        let sample = |class, name: &str, flops: f64, bytes: f64, ops: u32| {
            let op = name.to_owned();
            let f = 1.0 + backward_factor(class);
            let t = (flops / (peak * eff)).max(bytes / hbm) + f64::from(ops) * o;
            ComputeSample {
                class,
                op,
                name: name.into(),
                dtype: "f32".into(),
                flops,
                bytes,
                ops,
                fwd_s: t,
                fwd_bwd_s: f * t,
            }
        };
        let mut compute = vec![
            sample(ComputeClass::Overhead, "tiny", 0.0, 0.0, 240),
            sample(ComputeClass::Attention, "att", 1e9, 1e6, 1),
            sample(ComputeClass::MemoryBound, "add", 1e6, 1e8, 1),
        ];
        for n in [256.0, 1024.0] {
            compute.push(sample(
                ComputeClass::Matmul,
                "mm",
                2.0 * 512.0 * n * n,
                1e3,
                1,
            ));
        }
        // The optimizer at 2 ns per parameter, over two layer sizes.
        let per_param = 2e-9;
        for params in [4e6, 1.6e7] {
            compute.push(ComputeSample {
                fwd_s: params * per_param,
                fwd_bwd_s: params * per_param,
                ..sample(ComputeClass::Optimizer, "adamw", 0.0, 4.0 * params, 9)
            });
        }
        let mut collectives = Vec::new();
        for kind in CollectiveKind::ALL {
            for bytes in [4096.0, 1e6, 6.4e7] {
                let (a, c) = ring_coefficients(kind, 2.0);
                collectives.push(pair_sample(kind, bytes, a * lat + c * bytes / bw));
            }
        }
        let raw = two_ranks(compute, collectives);
        let base = load_cluster("cpu").expect("cpu preset");
        let fitted = fit(&raw, &base, "cpu", "mpirun -np 2 autopart profile").expect("fits");
        let c = &fitted.cluster;
        let close = |a: f64, b: f64| (a / b - 1.0).abs() < 1e-6;
        assert!(close(c.op_overhead_s, o), "{}", c.op_overhead_s);
        assert!(
            close(c.peak_flops_per_s.fp32, peak),
            "{}",
            c.peak_flops_per_s.fp32
        );
        assert!(close(c.hbm_bytes_per_s, hbm));
        assert!(close(c.optimizer_s_per_param.expect("fitted"), per_param));
        assert!(
            close(c.intra_node.latency_s, lat),
            "{}",
            c.intra_node.latency_s
        );
        assert!(close(c.intra_node.bandwidth_bytes_per_s, bw));
        assert_eq!(c.devices_per_node, 2);
        assert_eq!(c.memory_bytes, 12 << 30);
        for row in &fitted.rows {
            assert!(row.error().abs() < 1e-6, "{}: {}", row.what, row.error());
        }
        let m = c.measured.as_ref().expect("provenance");
        assert!(m.figures["inter_node.latency_s"].contains("not measured (one node)"));
        assert!(m.figures["op_overhead_s"].starts_with("measured 2026-12-02T00:00:00Z"));
        // The file it writes reads back as the same cluster.
        let text = c.to_ron_string().expect("serializes");
        assert_eq!(&Cluster::from_ron_str(&text, "x").expect("reads back"), c);
    }
}
