//! tch implementations of the built-in ops, named as in the compiler's
//! annotation files (`annotations/*.ron`), plus the shard-aware variants the
//! layouts need: vocab-parallel embedding (a shard of the table, partial sums)
//! and vocab-parallel cross-entropy (statistics all-reduced over the tp group).
//!
//! Every op is differentiable by libtorch autograd inside a segment. The ops
//! never communicate, except `vocab_parallel_cross_entropy`, whose collectives
//! carry their backward duals explicitly (see its doc). Shape mistakes are
//! errors, never panics. Shapes use the annotation letters: b batch, l and s
//! sequence, h heads, d head size, e/n hidden and vocab.

use crate::comm::{CommError, Communicator};
use tch::{Kind, Reduction, Tensor};
use thiserror::Error;

/// What can go wrong in an op.
#[derive(Debug, Error)]
pub enum OpError {
    #[error("{op}: {msg}")]
    Shape { op: &'static str, msg: String },
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// Labels equal to this contribute no loss and no gradient (PyTorch's convention).
pub const IGNORE_INDEX: i64 = -100;

fn shape_err(op: &'static str, msg: String) -> OpError {
    OpError::Shape { op, msg }
}

fn expect_dims(op: &'static str, what: &str, t: &Tensor, dims: usize) -> Result<Vec<i64>, OpError> {
    let size = t.size();
    if size.len() != dims {
        return Err(shape_err(
            op,
            format!("{what} must have {dims} dims, got {size:?}"),
        ));
    }
    Ok(size)
}

/// Vocab-parallel token embedding. `weight` holds rows
/// `vocab_start..vocab_start + n` of the table; ids outside that range give
/// zero rows, so the outputs of all shards sum to the full lookup.
/// ids `[b, l]` (int64), weight `[n, e]` -> `[b, l, e]`.
pub fn embedding(ids: &Tensor, weight: &Tensor, vocab_start: i64) -> Result<Tensor, OpError> {
    const OP: &str = "embedding";
    expect_dims(OP, "ids", ids, 2)?;
    let n = expect_dims(OP, "weight", weight, 2)?[0];
    // A table that covers every id (one rank, or ids that happen to fall in
    // the first shard) needs no mask.
    if vocab_start == 0 && ids.numel() > 0 {
        let (lo, hi) = (ids.f_min()?.int64_value(&[]), ids.f_max()?.int64_value(&[]));
        if lo >= 0 && hi < n {
            return Ok(Tensor::f_embedding(weight, ids, -1, false, false)?);
        }
    }
    let local = ids.f_sub_scalar(vocab_start)?;
    let mask = local.f_ge(0)?.f_logical_and(&local.f_lt(n)?)?;
    let safe = local.f_where_self(&mask, &local.f_zeros_like()?)?;
    let rows = Tensor::f_embedding(weight, &safe, -1, false, false)?;
    Ok(rows.f_mul(&mask.f_unsqueeze(-1)?.f_to_kind(weight.kind())?)?)
}

/// Learned position embedding (GPT). Looks up rows `positions + seq_start`
/// of `weight [p, e]`: pass local positions `0..l` and the shard's sequence
/// start, or global positions and 0. positions `[b, l]` -> `[b, l, e]`.
pub fn pos_embedding(
    positions: &Tensor,
    weight: &Tensor,
    seq_start: i64,
) -> Result<Tensor, OpError> {
    const OP: &str = "pos_embedding";
    expect_dims(OP, "positions", positions, 2)?;
    let p = expect_dims(OP, "weight", weight, 2)?[0];
    let pos = positions.f_add_scalar(seq_start)?;
    if pos.numel() > 0 {
        let (lo, hi) = (pos.f_min()?.int64_value(&[]), pos.f_max()?.int64_value(&[]));
        if lo < 0 || hi >= p {
            return Err(shape_err(
                OP,
                format!("positions {lo}..={hi} outside the table's {p} rows"),
            ));
        }
    }
    Ok(Tensor::f_embedding(weight, &pos, -1, false, false)?)
}

/// Positions `seq_start..seq_start + l` for every row of a `[b, l]` batch.
pub fn positions(b: i64, l: i64, seq_start: i64) -> Result<Tensor, OpError> {
    let row = Tensor::f_arange_start(seq_start, seq_start + l, (Kind::Int64, tch::Device::Cpu))?;
    Ok(row.f_unsqueeze(0)?.f_expand([b, l], false)?)
}

/// `x W^T`: x `[.., k]`, weight `[n, k]` -> `[.., n]`.
pub fn linear(x: &Tensor, weight: &Tensor) -> Result<Tensor, OpError> {
    if saving_weights_whole() {
        return weight_first(x, weight, None);
    }
    Ok(x.f_linear::<Tensor>(weight, None)?)
}

/// `x W^T + bias`: x `[.., k]`, weight `[n, k]`, bias `[n]` -> `[.., n]`.
pub fn linear_bias(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor, OpError> {
    if saving_weights_whole() {
        return weight_first(x, weight, Some(bias));
    }
    Ok(x.f_linear(weight, Some(bias))?)
}

thread_local! {
    static WEIGHTS_WHOLE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn saving_weights_whole() -> bool {
    WEIGHTS_WHOLE.with(std::cell::Cell::get)
}

/// While `on`, [`linear`] and [`linear_bias`] compute `(W x^T)^T` so that
/// autograd saves the weight tensor itself rather than a transposed view of
/// it (as `x.linear(W)` does): ZeRO-3 can then free a layer's gathered
/// weights after its forward by swapping the parameter's data
/// (`Tensor::set_data`) and swap them back before its backward. The
/// results are the same products (to float rounding); the output costs one
/// more copy. Per thread; returns the previous setting.
pub fn save_weights_whole(on: bool) -> bool {
    WEIGHTS_WHOLE.with(|c| c.replace(on))
}

/// `x W^T (+ bias)` as `(W x^T)^T`, the weight as `mm`'s first operand.
fn weight_first(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor, OpError> {
    let size = x.size();
    let ws = weight.size();
    let (k, n) = match (size.last(), &ws[..]) {
        (Some(&k), &[n, wk]) if k == wk => (k, n),
        _ => {
            return Err(shape_err(
                "linear",
                format!("x {size:?} and weight {ws:?} do not multiply"),
            ));
        }
    };
    let x2 = x.f_reshape([-1, k])?.f_tr()?;
    let y = match bias {
        Some(b) => b.f_unsqueeze(1)?.f_addmm(weight, &x2)?,
        None => weight.f_mm(&x2)?,
    };
    let mut out = size;
    if let Some(last) = out.last_mut() {
        *last = n;
    }
    Ok(y.f_tr()?.f_contiguous()?.f_view(out.as_slice())?)
}

/// RMSNorm as in HF Llama: `x / sqrt(mean(x^2) + eps)` in f32, cast back to
/// x's kind, times `weight [d]`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor, OpError> {
    let x32 = x.f_to_kind(Kind::Float)?;
    let var = x32.f_square()?.f_mean_dim(-1, true, Kind::Float)?;
    let normed = x32.f_mul(&var.f_add_scalar(eps)?.f_rsqrt()?)?;
    Ok(normed.f_to_kind(x.kind())?.f_mul(weight)?)
}

/// LayerNorm over the last dim with `weight [d]` and `bias [d]`.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor, OpError> {
    let d = weight.size();
    Ok(x.f_layer_norm(d.as_slice(), Some(weight), Some(bias), eps, true)?)
}

/// `[b, l, h*d]` -> `[b, l, h, d]`.
pub fn split_heads(x: &Tensor, h: i64) -> Result<Tensor, OpError> {
    const OP: &str = "split_heads";
    let s = expect_dims(OP, "x", x, 3)?;
    if h <= 0 || s[2] % h != 0 {
        return Err(shape_err(
            OP,
            format!("{} features do not split into {h} heads", s[2]),
        ));
    }
    Ok(x.f_reshape([s[0], s[1], h, s[2] / h])?)
}

/// `[b, l, h, d]` -> `[b, l, h*d]`.
pub fn merge_heads(x: &Tensor) -> Result<Tensor, OpError> {
    let s = expect_dims("merge_heads", "x", x, 4)?;
    Ok(x.f_reshape([s[0], s[1], s[2] * s[3]])?)
}

/// Rotary position embedding, HF Llama's rotate-half convention (element i
/// pairs with i + d/2), computed in f32 and cast back. Token j of `x` sits at
/// position `position_offset + j` (the shard's start when the sequence is split).
/// x `[b, l, h, d]`, d even.
pub fn rope(x: &Tensor, theta: f64, position_offset: i64) -> Result<Tensor, OpError> {
    rope_with(x, theta, None, position_offset)
}

/// How the rotary frequencies are rescaled (transformers' `rope_type`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    /// Llama 3.1: wavelengths longer than `original_max_positions /
    /// low_freq_factor` are stretched by `factor`, those shorter than
    /// `original_max_positions / high_freq_factor` kept, those between
    /// blended smoothly.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_positions: i64,
    },
    /// Every frequency divided by `factor`.
    Linear { factor: f64 },
}

impl RopeScaling {
    /// The bits that tell two scalings apart (the tables' cache key).
    fn key(&self) -> [u64; 5] {
        match *self {
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_positions,
            } => [
                1,
                factor.to_bits(),
                low_freq_factor.to_bits(),
                high_freq_factor.to_bits(),
                original_max_positions as u64,
            ],
            RopeScaling::Linear { factor } => [2, factor.to_bits(), 0, 0, 0],
        }
    }

    /// Rescales `inv_freq` (f32, `[d/2]`) as transformers'
    /// `_compute_llama3_parameters` and `_compute_linear_scaling_rope_parameters` do.
    fn apply(&self, inv_freq: &Tensor) -> Result<Tensor, OpError> {
        match *self {
            RopeScaling::Linear { factor } => Ok(inv_freq.f_div_scalar(factor)?),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_positions,
            } => {
                let old = original_max_positions as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                let wavelen = inv_freq
                    .f_reciprocal()?
                    .f_mul_scalar(2.0 * std::f64::consts::PI)?;
                let stretched = inv_freq.f_div_scalar(factor)?;
                let long = wavelen.f_gt(low_wavelen)?;
                let scaled = stretched.f_where_self(&long, inv_freq)?;
                let smooth = wavelen
                    .f_reciprocal()?
                    .f_mul_scalar(old)?
                    .f_sub_scalar(low_freq_factor)?
                    .f_div_scalar(high_freq_factor - low_freq_factor)?;
                let blended = smooth
                    .f_neg()?
                    .f_add_scalar(1.0)?
                    .f_mul(&scaled)?
                    .f_div_scalar(factor)?
                    .f_add(&smooth.f_mul(&scaled)?)?;
                let medium = wavelen
                    .f_lt(high_wavelen)?
                    .f_logical_not()?
                    .f_logical_and(&long.f_logical_not()?)?;
                Ok(blended.f_where_self(&medium, &scaled)?)
            }
        }
    }
}

/// [`rope`] with the frequencies rescaled by `scaling` (Llama 3.1's
/// `llama3`, or `linear`).
pub fn rope_scaled(
    x: &Tensor,
    theta: f64,
    scaling: &RopeScaling,
    position_offset: i64,
) -> Result<Tensor, OpError> {
    rope_with(x, theta, Some(scaling), position_offset)
}

fn rope_with(
    x: &Tensor,
    theta: f64,
    scaling: Option<&RopeScaling>,
    position_offset: i64,
) -> Result<Tensor, OpError> {
    const OP: &str = "rope";
    let s = expect_dims(OP, "x", x, 4)?;
    let (l, d) = (s[1], s[3]);
    if d % 2 != 0 {
        return Err(shape_err(OP, format!("head size {d} is odd")));
    }
    let (cos, sin) = rope_tables(l, d, theta, scaling, position_offset, x.device())?;
    let x32 = x.f_to_kind(Kind::Float)?;
    let halves = x32.f_chunk(2, -1)?;
    let rotated = Tensor::f_cat(&[&halves[1].f_neg()?, &halves[0]], -1)?;
    let out = x32.f_mul(&cos)?.f_add(&rotated.f_mul(&sin)?)?;
    Ok(out.f_to_kind(x.kind())?)
}

/// The cos and sin tables `[1, l, 1, d]` of RoPE, computed once per
/// (length, head size, theta, scaling, offset) on CPU and reused: every
/// layer and micro-batch asks for the same ones.
fn rope_tables(
    l: i64,
    d: i64,
    theta: f64,
    scaling: Option<&RopeScaling>,
    offset: i64,
    device: tch::Device,
) -> Result<(Tensor, Tensor), OpError> {
    type Key = (i64, i64, u64, Option<[u64; 5]>, i64);
    thread_local! {
        static CACHE: std::cell::RefCell<std::collections::HashMap<Key, (Tensor, Tensor)>> =
            std::cell::RefCell::new(std::collections::HashMap::new());
    }
    let make = || -> Result<(Tensor, Tensor), OpError> {
        let opts = (Kind::Float, device);
        let exponents = Tensor::f_arange_start_step(0, d, 2, opts)?.f_div_scalar(d as f64)?;
        let mut inv_freq = Tensor::f_pow_scalar(theta, &exponents)?.f_reciprocal()?;
        if let Some(sc) = scaling {
            inv_freq = sc.apply(&inv_freq)?;
        }
        let pos = Tensor::f_arange_start(offset, offset + l, opts)?;
        let freqs = pos.f_outer(&inv_freq)?; // [l, d/2]
        let emb = Tensor::f_cat(&[&freqs, &freqs], -1)?.f_view([1, l, 1, d])?;
        Ok((emb.f_cos()?, emb.f_sin()?))
    };
    if device != tch::Device::Cpu {
        return make();
    }
    let key = (l, d, theta.to_bits(), scaling.map(RopeScaling::key), offset);
    if let Some((c, s)) = CACHE.with(|m| {
        m.borrow()
            .get(&key)
            .map(|(c, s)| (c.shallow_clone(), s.shallow_clone()))
    }) {
        return Ok((c, s));
    }
    let (c, s) = make()?;
    CACHE.with(|m| {
        m.borrow_mut()
            .insert(key, (c.shallow_clone(), s.shallow_clone()))
    });
    Ok((c, s))
}

/// How attention masks future positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mask {
    /// Query i sees keys `0..=i` (top-left aligned when l != s).
    Causal,
    /// Every query sees every key.
    Full,
}

/// Grouped-query scaled-dot-product attention: query head i uses kv head
/// `i / (H / G)`, so any shard of heads works as long as each kv group keeps
/// its query heads. q `[b, l, H, d]`, k and v `[b, s, G, d]` -> `[b, l, H, d]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Mask) -> Result<Tensor, OpError> {
    const OP: &str = "attention";
    let qs = expect_dims(OP, "q", q, 4)?;
    let ks = expect_dims(OP, "k", k, 4)?;
    let vs = expect_dims(OP, "v", v, 4)?;
    if ks != vs || qs[0] != ks[0] || qs[3] != ks[3] {
        return Err(shape_err(
            OP,
            format!("q {qs:?}, k {ks:?}, v {vs:?} do not match"),
        ));
    }
    if ks[2] == 0 || qs[2] % ks[2] != 0 {
        return Err(shape_err(
            OP,
            format!("{} query heads do not group into {} kv heads", qs[2], ks[2]),
        ));
    }
    let heads_first = |t: &Tensor| t.f_transpose(1, 2);
    let out = Tensor::f_scaled_dot_product_attention::<Tensor>(
        &heads_first(q)?,
        &heads_first(k)?,
        &heads_first(v)?,
        None,
        0.0,
        mask == Mask::Causal,
        None,
        qs[2] != ks[2],
    )?;
    Ok(out.f_transpose(1, 2)?)
}

/// Element-wise sum.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor, OpError> {
    Ok(a.f_add(b)?)
}

/// `silu(gate) * up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor, OpError> {
    Ok(gate.f_silu()?.f_mul(up)?)
}

/// GeLU, tanh approximation (GPT-2).
pub fn gelu(x: &Tensor) -> Result<Tensor, OpError> {
    Ok(x.f_gelu("tanh")?)
}

/// Per-token cross-entropy in f32: logits `[b, l, n]`, labels `[b, l]` ->
/// `[b, l]`; labels equal to [`IGNORE_INDEX`] give 0.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor, OpError> {
    const OP: &str = "cross_entropy";
    keep_logits(|| Ok(logits.f_detach()?.f_to_kind(Kind::Float)?))?;
    let s = expect_dims(OP, "logits", logits, 3)?;
    let ls = expect_dims(OP, "labels", labels, 2)?;
    if ls[..] != s[..2] {
        return Err(shape_err(
            OP,
            format!("labels {ls:?} do not match logits {s:?}"),
        ));
    }
    let flat = logits.f_to_kind(Kind::Float)?.f_reshape([-1, s[2]])?;
    let loss = flat.f_cross_entropy_loss::<Tensor>(
        &labels.f_reshape([-1])?,
        None,
        Reduction::None,
        IGNORE_INDEX,
        0.0,
    )?;
    Ok(loss.f_reshape([s[0], s[1]])?)
}

thread_local! {
    /// The logits the cross-entropy ops saw while [`capture_logits`] runs.
    static LOGITS: std::cell::RefCell<Option<Vec<Tensor>>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` and returns, with its result, the logits every cross-entropy op
/// it ran was given (f32, detached), one tensor per call: whole over the
/// vocabulary (a vocab-parallel op all-gathers its shard over its group, so
/// every rank of the group must capture alike), and as this rank holds
/// them over the batch and sequence dims. For `autopart eval --logits`.
pub fn capture_logits<R>(f: impl FnOnce() -> R) -> (R, Vec<Tensor>) {
    LOGITS.with(|l| *l.borrow_mut() = Some(Vec::new()));
    let out = f();
    let kept = LOGITS.with(|l| l.borrow_mut().take()).unwrap_or_default();
    (out, kept)
}

/// Keeps the logits `make` gives when a capture is on.
fn keep_logits(make: impl FnOnce() -> Result<Tensor, OpError>) -> Result<(), OpError> {
    if LOGITS.with(|l| l.borrow().is_some()) {
        let t = make()?;
        LOGITS.with(|l| {
            if let Some(v) = l.borrow_mut().as_mut() {
                v.push(t);
            }
        });
    }
    Ok(())
}

/// Cross-entropy when the vocab dim is split over `comm` (the tp group):
/// `local_logits [b, l, n]` are columns `vocab_start..vocab_start + n` of the
/// full logits. Returns the full per-token loss `[b, l]` (f32) on every rank.
///
/// The global max and sum of exponentials are all-reduced. Autograd sees
/// `log S + (s - s.detach()) / S - (t + (t_local - t_local.detach()))`,
/// whose value is the loss and whose gradient on this shard is
/// `softmax - onehot` restricted to its columns: exactly the full op's
/// gradient, provided the incoming gradient is the same on every rank of
/// `comm` (the loss is replicated there, so it is).
pub fn vocab_parallel_cross_entropy(
    local_logits: &Tensor,
    labels: &Tensor,
    vocab_start: i64,
    comm: &dyn Communicator,
) -> Result<Tensor, OpError> {
    const OP: &str = "vocab_parallel_cross_entropy";
    // One rank holds the whole vocabulary: the fused kernel computes the same.
    if comm.size() == 1 && vocab_start == 0 {
        return cross_entropy(local_logits, labels);
    }
    let s = expect_dims(OP, "logits", local_logits, 3)?;
    let ls = expect_dims(OP, "labels", labels, 2)?;
    if ls[..] != s[..2] {
        return Err(shape_err(
            OP,
            format!("labels {ls:?} do not match logits {s:?}"),
        ));
    }
    let n = s[2];
    keep_logits(|| Ok(comm.all_gather(&local_logits.f_detach()?.f_to_kind(Kind::Float)?, 2)?))?;
    let logits = local_logits.f_to_kind(Kind::Float)?;
    // The max only stabilises exp(); its gradient cancels, so it is a constant.
    let local_max = logits.f_detach()?.f_amax([-1], true)?;
    let global_max = comm.all_gather(&local_max, -1)?.f_amax([-1], true)?;
    let shifted = logits.f_sub(&global_max)?;
    let sum_local = shifted.f_exp()?.f_sum_dim_intlist(-1, false, Kind::Float)?;
    let sum_global = comm.all_reduce(&sum_local.f_detach()?)?;
    let log_sum = sum_global.f_log()?.f_add(
        &sum_local
            .f_sub(&sum_local.f_detach()?)?
            .f_div(&sum_global)?,
    )?;
    // Target logit: the shard holding the label contributes it, the others zero.
    let local_label = labels.f_sub_scalar(vocab_start)?;
    let in_shard = local_label.f_ge(0)?.f_logical_and(&local_label.f_lt(n)?)?;
    let safe = local_label.f_where_self(&in_shard, &local_label.f_zeros_like()?)?;
    let target_local = shifted
        .f_gather(-1, &safe.f_unsqueeze(-1)?, false)?
        .f_squeeze_dim(-1)?
        .f_mul(&in_shard.f_to_kind(Kind::Float)?)?;
    let target_global = comm.all_reduce(&target_local.f_detach()?)?;
    let target = target_global.f_add(&target_local.f_sub(&target_local.f_detach()?)?)?;
    let valid = labels.f_ne(IGNORE_INDEX)?.f_to_kind(Kind::Float)?;
    Ok(log_sum.f_sub(&target)?.f_mul(&valid)?)
}

/// Sum of `per_token` divided by `total_count`, the token count of the whole
/// (unsplit) batch, so that the results of shards are partial sums of the mean.
pub fn mean(per_token: &Tensor, total_count: i64) -> Result<Tensor, OpError> {
    if total_count <= 0 {
        return Err(shape_err(
            "mean",
            format!("token count {total_count} is not positive"),
        ));
    }
    Ok(per_token
        .f_sum(Kind::Float)?
        .f_div_scalar(total_count as f64)?)
}
