//! Optimizer step pieces: the learning-rate schedule ([`LrSchedule`], linear
//! warm-up then cosine decay), AdamW with decoupled weight decay ([`AdamW`]
//! hyper-parameters, [`AdamWState`] moments), and gradient clipping by the
//! global L2 norm across all shards ([`clip_grad_norm`]).
//!
//! This module owns the update arithmetic and its numerics: moments are kept
//! in f32 whatever the parameters' kind, and the update is computed in f32 and
//! written back in each parameter's own kind, matching `torch.optim.AdamW` and
//! `torch.nn.utils.clip_grad_norm_`. It does not decide which rank holds which
//! parameter or gradient, nor average gradients over data-parallel replicas:
//! callers pass the local tensors and, for the norm, which of them this rank
//! counts ([`crate::zero`] does the data-parallel part). The only collectives
//! here are the all-reduces of the sum of squares in [`clip_grad_norm`] and
//! [`clip_grad_norm_over`] ([`sum_over`]), over the groups the caller passes.

use crate::comm::{CommError, Communicator};
use std::f64::consts::PI;
use tch::{Kind, Tensor};
use thiserror::Error;

/// What can go wrong in an optimizer call.
#[derive(Debug, Error)]
pub enum OptimError {
    #[error("{what}: expected {expected} entries, got {got}")]
    LengthMismatch {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("{what} {idx}: shape {got:?} differs from the parameter's {expected:?}")]
    ShapeMismatch {
        what: &'static str,
        idx: usize,
        expected: Vec<i64>,
        got: Vec<i64>,
    },
    #[error("gradient {idx} is undefined")]
    UndefinedGrad { idx: usize },
    #[error("invalid hyper-parameter: {0}")]
    Invalid(String),
    #[error("global gradient norm is {0}, not finite; gradients left unscaled")]
    NonFiniteNorm(f64),
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] autopart_vocab::ckpt::CkptError),
    #[error("checkpoint: {0}")]
    Restore(String),
}

fn invalid(msg: String) -> OptimError {
    OptimError::Invalid(msg)
}

/// Linear warm-up to `peak_lr`, then cosine decay to `min_lr` at
/// `total_steps`, then constant `min_lr`. Steps count from 0 (the first
/// optimizer step is step 0).
///
/// - `step < warmup_steps`: `peak_lr * (step + 1) / warmup_steps`, so step 0
///   already trains and step `warmup_steps - 1` reaches `peak_lr`;
/// - `warmup_steps <= step < total_steps`: with
///   `t = (step - warmup_steps) / (total_steps - warmup_steps)`,
///   `min_lr + (peak_lr - min_lr) * (1 + cos(pi * t)) / 2`, so the first
///   step after warm-up is at `peak_lr`;
/// - `step >= total_steps`: `min_lr`.
///
/// With `warmup_steps == 0` there is no warm-up; with
/// `total_steps <= warmup_steps` there is no decay and every step from
/// `warmup_steps` on is at `min_lr`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LrSchedule {
    pub peak_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub min_lr: f64,
}

impl LrSchedule {
    /// Checks that both rates are finite, `0 <= min_lr <= peak_lr`.
    pub fn validate(&self) -> Result<(), OptimError> {
        let (peak, min) = (self.peak_lr, self.min_lr);
        if !(peak.is_finite() && min.is_finite() && 0.0 <= min && min <= peak) {
            return Err(invalid(format!(
                "lr schedule needs finite 0 <= min_lr <= peak_lr, got min_lr {min}, peak_lr {peak}"
            )));
        }
        Ok(())
    }

    /// The learning rate of optimizer step `step` (from 0).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            // The fraction first: peak * (step + 1) overflows for a peak
            // near f64::MAX / warmup_steps.
            return self.peak_lr * ((step + 1) as f64 / self.warmup_steps as f64);
        }
        if step >= self.total_steps {
            return self.min_lr;
        }
        // Here warmup_steps <= step < total_steps, so the span is at least 1.
        let t = (step - self.warmup_steps) as f64 / (self.total_steps - self.warmup_steps) as f64;
        self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1.0 + (PI * t).cos())
    }
}

/// AdamW hyper-parameters (the learning rate comes per step). The default is
/// `torch.optim.AdamW`'s: betas (0.9, 0.999), eps 1e-8, weight decay 0.01.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamW {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

impl AdamW {
    /// Checks `0 <= beta < 1`, `eps >= 0` and `weight_decay >= 0`, all finite
    /// (torch's checks; with `eps == 0` a gradient that was always zero gives nan).
    pub fn validate(&self) -> Result<(), OptimError> {
        for (name, beta) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return Err(invalid(format!(
                    "adamw {name} must lie in [0, 1), got {beta}"
                )));
            }
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return Err(invalid(format!(
                "adamw eps must be non-negative, got {}",
                self.eps
            )));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(invalid(format!(
                "adamw weight_decay must be non-negative, got {}",
                self.weight_decay
            )));
        }
        Ok(())
    }
}

/// AdamW moments for one list of parameters: f32 tensors shaped and placed
/// like the parameters, and the number of steps taken.
#[derive(Debug)]
pub struct AdamWState {
    pub exp_avg: Vec<Tensor>,
    pub exp_avg_sq: Vec<Tensor>,
    pub steps: u64,
}

impl AdamWState {
    /// Zero moments for `params`, no steps taken.
    pub fn new(params: &[Tensor]) -> Result<Self, OptimError> {
        let zeros = |p: &Tensor| Tensor::f_zeros(p.size(), (Kind::Float, p.device()));
        Ok(Self {
            exp_avg: params.iter().map(zeros).collect::<Result<_, _>>()?,
            exp_avg_sq: params.iter().map(zeros).collect::<Result<_, _>>()?,
            steps: 0,
        })
    }

    /// One AdamW step over `params` with `grads` (same order and shapes) at
    /// learning rate `lr`, exactly as `torch.optim.AdamW` (no amsgrad, not
    /// maximising): with `k` the step number counted from 1,
    ///
    /// ```text
    /// p  <- p * (1 - lr * weight_decay)
    /// m  <- beta1 * m + (1 - beta1) * g
    /// v  <- beta2 * v + (1 - beta2) * g * g
    /// p  <- p - lr / (1 - beta1^k) * m / (sqrt(v) / sqrt(1 - beta2^k) + eps)
    /// ```
    ///
    /// Arithmetic is in f32; each parameter is updated in place (its autograd
    /// history untouched, under `no_grad`) and keeps its kind. Everything is
    /// checked before anything is written, so an error leaves state and
    /// parameters as they were.
    pub fn step(
        &mut self,
        hp: &AdamW,
        params: &mut [Tensor],
        grads: &[Tensor],
        lr: f64,
    ) -> Result<(), OptimError> {
        hp.validate()?;
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(invalid(format!(
                "learning rate must be non-negative, got {lr}"
            )));
        }
        let n = self.exp_avg.len();
        for (what, got) in [("parameters", params.len()), ("gradients", grads.len())] {
            if got != n {
                return Err(OptimError::LengthMismatch {
                    what,
                    expected: n,
                    got,
                });
            }
        }
        for (idx, ((p, g), m)) in params.iter().zip(grads).zip(&self.exp_avg).enumerate() {
            if !g.defined() {
                return Err(OptimError::UndefinedGrad { idx });
            }
            for (what, t) in [("gradient", g), ("moment of parameter", m)] {
                if t.size() != p.size() {
                    return Err(OptimError::ShapeMismatch {
                        what,
                        idx,
                        expected: p.size(),
                        got: t.size(),
                    });
                }
            }
        }

        let k = self.steps + 1;
        let bias1 = 1.0 - hp.beta1.powi(k.min(i32::MAX as u64) as i32);
        let bias2_sqrt = (1.0 - hp.beta2.powi(k.min(i32::MAX as u64) as i32)).sqrt();
        let step_size = lr / bias1;
        let decay = 1.0 - lr * hp.weight_decay;
        tch::no_grad(|| -> Result<(), OptimError> {
            let moments = self.exp_avg.iter_mut().zip(self.exp_avg_sq.iter_mut());
            for ((p, g), (m, v)) in params.iter_mut().zip(grads).zip(moments) {
                let g = g.f_to_kind(Kind::Float)?;
                let n = p.numel() as i64;
                if n > CHUNK && [&*p, &g, &*m, &*v].iter().all(|t| t.is_contiguous()) {
                    let (pf, gf, mf, vf) = (
                        p.f_view([n])?,
                        g.f_view([n])?,
                        m.f_view([n])?,
                        v.f_view([n])?,
                    );
                    for (at, len) in pieces(n, CHUNK) {
                        let piece = |t: &Tensor| t.f_narrow(0, at, len);
                        let (mut pc, mut mc, mut vc) = (piece(&pf)?, piece(&mf)?, piece(&vf)?);
                        adamw_update(
                            &mut pc,
                            &piece(&gf)?,
                            &mut mc,
                            &mut vc,
                            hp,
                            step_size,
                            bias2_sqrt,
                            decay,
                        )?;
                    }
                } else {
                    adamw_update(p, &g, m, v, hp, step_size, bias2_sqrt, decay)?;
                }
            }
            Ok(())
        })?;
        self.steps = k;
        Ok(())
    }
}

/// Elements of one piece of the optimizer's element-wise work: its f32
/// scratch (2 MiB) stays under the plan binary's pinned mmap threshold
/// (4 MiB), so the heap reuses it instead of page-faulting a fresh mapping
/// for every temporary of every parameter; and big enough that the op
/// dispatch per piece is a few percent of its time.
const CHUNK: i64 = 1 << 19;

/// `(start, len)` of the consecutive pieces of at most `len` elements that
/// cover `0..n`.
fn pieces(n: i64, len: i64) -> impl Iterator<Item = (i64, i64)> {
    (0..n)
        .step_by(len as usize)
        .map(move |at| (at, len.min(n - at)))
}

/// The AdamW update of [`AdamWState::step`] on one parameter (or one piece
/// of it, all four tensors alike), with one scratch tensor reused in place
/// for every intermediate; the arithmetic, op for op, is the one that
/// function documents.
#[allow(clippy::too_many_arguments)]
fn adamw_update(
    p: &mut Tensor,
    g: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
    hp: &AdamW,
    step_size: f64,
    bias2_sqrt: f64,
    decay: f64,
) -> Result<(), OptimError> {
    let mut t = g.f_mul(g)?;
    let _ = t.f_mul_scalar_(1.0 - hp.beta2)?;
    let _ = m.f_lerp_(g, 1.0 - hp.beta1)?;
    let _ = v.f_mul_scalar_(hp.beta2)?;
    let _ = v.f_add_(&t)?;
    let _ = v.f_sqrt_out(&t)?;
    let _ = t.f_div_scalar_(bias2_sqrt)?;
    let _ = t.f_add_scalar_(hp.eps)?;
    let _ = m.f_div_out(&t, &t)?;
    let _ = t.f_mul_scalar_(step_size)?;
    if p.kind() == Kind::Float {
        let _ = p.f_mul_scalar_(decay)?;
        let _ = p.f_sub_(&t)?;
    } else {
        let mut p32 = p.f_to_kind(Kind::Float)?;
        let _ = p32.f_mul_scalar_(decay)?;
        let _ = p32.f_sub_(&t)?;
        p.f_copy_(&p32)?;
    }
    Ok(())
}

/// Whether this rank counts a gradient in the global norm. A gradient that is
/// replicated over ranks (a replicated parameter's, after its all-reduce) is
/// counted on exactly one of them, so it enters the norm once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NormShare {
    /// This rank's copy enters the global sum of squares.
    Counted,
    /// Another rank counts this gradient; it is only scaled here.
    Replica,
}

/// Clips `grads` by their global L2 norm, as `torch.nn.utils.clip_grad_norm_`
/// (norm type 2) would on the unsharded gradients, and returns that norm.
///
/// Each rank sums the squares of the gradients it marks
/// [`NormShare::Counted`] (in f64), `comm` all-reduces the sum, and the norm
/// is its square root. When `max_norm / (norm + 1e-6) < 1`, every gradient
/// (counted or not) is scaled in place by that factor. Collective over `comm`:
/// every rank must call it, also with nothing counted.
///
/// A non-finite norm (an inf or nan gradient somewhere) is an error and no
/// gradient is scaled, so the caller can skip the step; torch's
/// `error_if_nonfinite=True` behaves the same.
pub fn clip_grad_norm(
    grads: &mut [Tensor],
    shares: &[NormShare],
    max_norm: f64,
    comm: &dyn Communicator,
) -> Result<f64, OptimError> {
    clip_grad_norm_over(grads, shares, max_norm, &[comm])
}

/// [`clip_grad_norm`] where the gradients are spread over several groups
/// (e.g. tp and pp): the sum of squares is all-reduced over each of `groups`
/// in turn, so it sums over every rank of their product. Collective over
/// every group.
pub fn clip_grad_norm_over(
    grads: &mut [Tensor],
    shares: &[NormShare],
    max_norm: f64,
    groups: &[&dyn Communicator],
) -> Result<f64, OptimError> {
    if shares.len() != grads.len() {
        return Err(OptimError::LengthMismatch {
            what: "norm shares",
            expected: grads.len(),
            got: shares.len(),
        });
    }
    check_max_norm(max_norm)?;
    if let Some(idx) = grads.iter().position(|g| !g.defined()) {
        return Err(OptimError::UndefinedGrad { idx });
    }
    let mut local = 0.0f64;
    for (g, share) in grads.iter().zip(shares) {
        if *share == NormShare::Counted {
            local += sum_of_squares(g)?;
        }
    }
    let norm = sum_over(local, groups)?.sqrt();
    scale_to_norm(grads, norm, max_norm)?;
    Ok(norm)
}

/// Checks that a clipping threshold is positive and finite.
pub fn check_max_norm(max_norm: f64) -> Result<(), OptimError> {
    if !(max_norm.is_finite() && max_norm > 0.0) {
        return Err(invalid(format!(
            "max_norm must be positive, got {max_norm}"
        )));
    }
    Ok(())
}

/// The sum of the squares of `t`'s elements, computed in f64.
pub fn sum_of_squares(t: &Tensor) -> Result<f64, OptimError> {
    let n = t.numel() as i64;
    // In pieces whose f64 copy (2 MiB) the heap reuses (see [`CHUNK`]).
    let piece_len = CHUNK / 2;
    if n <= piece_len || !t.is_contiguous() {
        let sq = t.f_to_kind(Kind::Double)?.f_square()?.f_sum(Kind::Double)?;
        return Ok(sq.f_double_value(&[])?);
    }
    let flat = t.f_view([n])?;
    let mut total = 0.0;
    for (at, len) in pieces(n, piece_len) {
        let mut d = flat
            .f_narrow(0, at, len)?
            .f_to_dtype(Kind::Double, false, true)?;
        let _ = d.f_square_()?;
        total += d.f_sum(Kind::Double)?.f_double_value(&[])?;
    }
    Ok(total)
}

/// `local` summed over every rank of each of `groups` in turn (in f64).
/// Collective over every group.
pub fn sum_over(local: f64, groups: &[&dyn Communicator]) -> Result<f64, OptimError> {
    let mut total = Tensor::from_slice(&[local]);
    for comm in groups {
        if comm.size() > 1 {
            total = comm.all_reduce(&total)?;
        }
    }
    Ok(total.f_double_value(&[0])?)
}

/// Scales `grads` in place by `max_norm / (norm + 1e-6)` when that is below 1,
/// as `clip_grad_norm_` does once it knows the global `norm`. A non-finite
/// norm is an error and nothing is scaled.
pub fn scale_to_norm(grads: &mut [Tensor], norm: f64, max_norm: f64) -> Result<(), OptimError> {
    if !norm.is_finite() {
        return Err(OptimError::NonFiniteNorm(norm));
    }
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        tch::no_grad(|| -> Result<(), OptimError> {
            for g in grads.iter_mut() {
                let _ = g.f_mul_scalar_(coef)?;
            }
            Ok(())
        })?;
    }
    Ok(())
}
