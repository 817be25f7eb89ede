//! Roofline time of one op on one device.
//!
//! This module owns the conversion of an op's FLOPs and bytes moved into
//! seconds on a [`Cluster`] device. Counting those FLOPs and bytes from an
//! op's annotation and shapes belongs to the caller; communication belongs to
//! [`super::collective`].

use super::cluster::{Cluster, Efficiency};
use crate::ir::DType;

/// Which achieved rate an op runs at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ComputeKind {
    /// GEMMs and batched GEMMs: `efficiency.matmul` of peak FLOP/s.
    Matmul,
    /// Element-wise ops, norms, softmax, copies: bound by HBM bandwidth.
    MemoryBound,
    /// Fused attention kernels: `efficiency.attention` of peak FLOP/s
    /// (`efficiency.matmul` when the cluster gives none).
    Attention,
}

impl Efficiency {
    /// Achieved fraction of peak FLOP/s for ops of `kind`. Memory-bound ops
    /// use the matmul fraction: their FLOPs term only matters if an op was
    /// misclassified, and then the tensor-core rate is the optimistic bound.
    pub fn compute(&self, kind: ComputeKind) -> f64 {
        match kind {
            ComputeKind::Matmul | ComputeKind::MemoryBound => self.matmul,
            ComputeKind::Attention => self.attention.unwrap_or(self.matmul),
        }
    }
}

/// Seconds one device of `cluster` needs for an op doing `flops` floating
/// point operations in `dtype` and moving `bytes` to and from device memory:
///
/// `max(flops / (peak(dtype) · eff(kind)), bytes / (hbm · eff.memory_bound))`
///
/// Zero work takes zero time.
pub fn compute_time(
    cluster: &Cluster,
    flops: f64,
    bytes: f64,
    kind: ComputeKind,
    dtype: DType,
) -> f64 {
    let eff = &cluster.efficiency;
    let flops_s = flops / (cluster.peak_flops_per_s.for_dtype(dtype) * eff.compute(kind));
    let bytes_s = bytes / (cluster.hbm_bytes_per_s * eff.memory_bound);
    flops_s.max(bytes_s)
}

/// The fraction a rate curve (points `(x, fraction)` in increasing `x`)
/// gives at `x`: interpolated linearly in `ln x` between the points around
/// it, the nearest end point's outside them, 1 for an empty curve.
pub fn curve_factor(points: &[(f64, f64)], x: f64) -> f64 {
    let (Some(&(x0, f0)), Some(&(xn, fn_))) = (points.first(), points.last()) else {
        return 1.0;
    };
    // A NaN falls to the first point too.
    if x.is_nan() || x <= x0 {
        return f0;
    }
    if x >= xn {
        return fn_;
    }
    let i = points.partition_point(|&(px, _)| px <= x);
    let ((xa, fa), (xb, fb)) = (points[i - 1], points[i]);
    let t = (x.ln() - xa.ln()) / (xb.ln() - xa.ln());
    fa + t * (fb - fa)
}

/// Seconds of one op's forward named `op` (its annotation name): as
/// [`compute_time`], except that a bandwidth-bound op with a measured rate
/// of its own (`Cluster::op_bandwidth_bytes_per_s`) and attention with
/// measured FLOP/s (`Cluster::attention_flops_per_s`) use those, GEMMs and
/// attention scaled by the cluster's measured curve for their FLOPs per
/// element moved ([`curve_factor`]), plus the cluster's fixed cost of an op
/// (`Cluster::op_overhead_s`).
pub fn op_time(
    cluster: &Cluster,
    op: &str,
    flops: f64,
    bytes: f64,
    kind: ComputeKind,
    dtype: DType,
) -> f64 {
    let eff = &cluster.efficiency;
    let elements = bytes / dtype.size_bytes() as f64;
    let intensity = if elements > 0.0 {
        flops / elements
    } else {
        0.0
    };
    let hbm_s = bytes / (cluster.hbm_bytes_per_s * eff.memory_bound);
    let peak = cluster.peak_flops_per_s.for_dtype(dtype);
    let roofline = match kind {
        ComputeKind::MemoryBound => {
            let flops_s = flops / (peak * eff.matmul);
            let bytes_s = match cluster.op_bandwidth_bytes_per_s.get(op) {
                Some(&bw) => bytes / bw,
                None => hbm_s,
            };
            flops_s.max(bytes_s)
        }
        ComputeKind::Attention => {
            let rate = match &cluster.attention_flops_per_s {
                Some(rates) => rates.for_dtype(dtype),
                None => peak * eff.compute(kind),
            };
            let factor = curve_factor(&cluster.attention_rate_curve, intensity);
            (flops / (rate * factor)).max(hbm_s)
        }
        ComputeKind::Matmul => {
            let factor = curve_factor(&cluster.matmul_rate_curve, intensity);
            (flops / (peak * eff.matmul * factor)).max(hbm_s)
        }
    };
    roofline + cluster.op_overhead_s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::cluster::load_cluster;

    /// The a100 preset with fixed efficiency factors, so the formulas are
    /// checked independently of the preset's calibration.
    fn a100() -> Cluster {
        let mut c = load_cluster("a100-80gb").expect("a100-80gb preset loads");
        c.efficiency.matmul = 0.8;
        c.efficiency.attention = Some(0.6);
        c.efficiency.memory_bound = 0.8;
        c
    }

    fn assert_close(got: f64, want: f64) {
        assert!(
            (got - want).abs() <= 1e-9 * want.abs().max(1e-12),
            "got {got}, want {want}"
        );
    }

    #[test]
    fn large_gemm_is_compute_bound() {
        // 8192^3 GEMM in bf16: 2·8192³ = 1.0995e12 FLOP; operands and result
        // 3·8192²·2 B = 402.7 MB. Compute: 1.0995e12 / (312e12 · 0.8)
        // = 4.405 ms; memory: 4.027e8 / (2.039e12 · 0.8) = 0.247 ms.
        let n = 8192.0_f64;
        let flops = 2.0 * n * n * n;
        let bytes = 3.0 * n * n * 2.0;
        let t = compute_time(&a100(), flops, bytes, ComputeKind::Matmul, DType::Bf16);
        assert_close(t, flops / (312e12 * 0.8));
        assert!((t - 4.405e-3).abs() < 1e-6, "{t}");
    }

    #[test]
    fn elementwise_op_is_memory_bound() {
        // GELU over 2^28 bf16 elements: read and write 2^28 · 2 B each = 1 GiB
        // moved; about 8 FLOP per element = 2.1e9 FLOP. Memory: 2^30 /
        // (2.039e12 · 0.8) = 0.658 ms, far above the compute term.
        let elements = (1u64 << 28) as f64;
        let bytes = elements * 2.0 * 2.0;
        let t = compute_time(
            &a100(),
            8.0 * elements,
            bytes,
            ComputeKind::MemoryBound,
            DType::Bf16,
        );
        assert_close(t, (1u64 << 30) as f64 / (2.039e12 * 0.8));
        assert!((t - 0.658e-3).abs() < 1e-6, "{t}");
    }

    #[test]
    fn attention_uses_its_own_efficiency_or_matmuls() {
        let mut cluster = a100();
        let flops = 1e12;
        let t = compute_time(&cluster, flops, 0.0, ComputeKind::Attention, DType::Bf16);
        assert_close(t, flops / (312e12 * 0.6));
        cluster.efficiency.attention = None;
        let t = compute_time(&cluster, flops, 0.0, ComputeKind::Attention, DType::Bf16);
        assert_close(t, flops / (312e12 * 0.8));
    }

    #[test]
    fn dtype_selects_the_peak() {
        let cluster = a100();
        let t32 = compute_time(&cluster, 1e12, 0.0, ComputeKind::Matmul, DType::F32);
        assert_close(t32, 1e12 / (19.5e12 * 0.8));
        let t16 = compute_time(&cluster, 1e12, 0.0, ComputeKind::Matmul, DType::F16);
        assert_close(t16, 1e12 / (312e12 * 0.8));
    }

    #[test]
    fn measured_op_rates_and_the_fixed_cost_override_the_roofline() {
        let mut cluster = a100();
        let bytes = 1e9;
        let plain = op_time(
            &cluster,
            "rms_norm",
            0.0,
            bytes,
            ComputeKind::MemoryBound,
            DType::F32,
        );
        assert_close(
            plain,
            compute_time(&cluster, 0.0, bytes, ComputeKind::MemoryBound, DType::F32),
        );
        cluster
            .op_bandwidth_bytes_per_s
            .insert("rms_norm".into(), 1e11);
        cluster.op_overhead_s = 1e-5;
        let t = op_time(
            &cluster,
            "rms_norm",
            0.0,
            bytes,
            ComputeKind::MemoryBound,
            DType::F32,
        );
        assert_close(t, bytes / 1e11 + 1e-5);
        // Other ops keep the cluster-wide bandwidth.
        let add = op_time(
            &cluster,
            "add",
            0.0,
            bytes,
            ComputeKind::MemoryBound,
            DType::F32,
        );
        assert_close(add, plain + 1e-5);
        cluster.attention_flops_per_s = Some(crate::cost::PeakFlops {
            bf16: 1e12,
            fp16: 2e12,
            fp32: 4e12,
        });
        let att = op_time(
            &cluster,
            "attention",
            1e12,
            0.0,
            ComputeKind::Attention,
            DType::Bf16,
        );
        assert_close(att, 1.0 + 1e-5);
    }

    #[test]
    fn curves_interpolate_in_the_log_and_clamp_at_the_ends() {
        let curve = [(10.0, 0.5), (1000.0, 1.0)];
        assert_eq!(curve_factor(&[], 5.0), 1.0);
        assert_eq!(curve_factor(&curve, 1.0), 0.5);
        assert_eq!(curve_factor(&curve, 0.0), 0.5);
        assert_eq!(curve_factor(&curve, 1e6), 1.0);
        assert!((curve_factor(&curve, 100.0) - 0.75).abs() < 1e-12);
        let three = [(1.0, 2.0), (2.0, 1.0), (4.0, 3.0)];
        assert!((curve_factor(&three, 2.0) - 1.0).abs() < 1e-12);
        assert!((curve_factor(&three, 8f64.sqrt()) - 2.0).abs() < 1e-12);
        // A GEMM at a curve's point runs at that fraction of the peak.
        let mut cluster = a100();
        cluster.op_overhead_s = 0.0;
        let full = op_time(
            &cluster,
            "linear",
            1e12,
            1e6,
            ComputeKind::Matmul,
            DType::F32,
        );
        cluster.matmul_rate_curve = vec![(1e3, 0.25), (1e6, 1.0)];
        let slow = op_time(
            &cluster,
            "linear",
            1e12,
            1e6,
            ComputeKind::Matmul,
            DType::F32,
        );
        // 1e12 FLOPs over 2.5e5 f32 elements: intensity 4e6, past the end.
        assert_close(slow, full);
        let small = op_time(
            &cluster,
            "linear",
            1e9,
            4e6,
            ComputeKind::Matmul,
            DType::F32,
        );
        assert_close(small, 1e9 / (19.5e12 * 0.8 * 0.25));
    }

    #[test]
    fn no_work_takes_no_time() {
        let t = compute_time(&a100(), 0.0, 0.0, ComputeKind::Matmul, DType::Bf16);
        assert_eq!(t, 0.0);
    }
}
