//! A custom op for autopart, registered by `annotations/examples/chunked_ce.ron`:
//! the output projection fused with per-token cross-entropy, computed in
//! chunks of the sequence so that the forward pass never holds the whole
//! `[b, l, vocab]` logits at once. (Autograd keeps each chunk's logits for
//! backward; saving that too needs a recomputing backward, which tch cannot
//! express as a custom function.)
//!
//! Generated code calls it as `chunked_ce::chunked_linear_cross_entropy(hidden,
//! weight, labels, chunk)` on this rank's shards: the annotation
//! `b l d^, n^ d^, b l -> b l` lets autopart split the batch or the sequence,
//! and the op does not depend on where its shard starts.

use tch::{Kind, Reduction, TchError, Tensor};

/// Labels equal to this give a zero loss (the runtime's `ops::IGNORE_INDEX`).
pub const IGNORE_INDEX: i64 = -100;

/// Per-token cross-entropy (f32, `[b, l]`) of the logits `hidden [b, l, d] x
/// weight [n, d]^T` against `labels [b, l]`, `chunk` tokens of the sequence
/// at a time.
pub fn chunked_linear_cross_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    labels: &Tensor,
    chunk: i64,
) -> Result<Tensor, TchError> {
    let (hs, ws, ls) = (hidden.size(), weight.size(), labels.size());
    let (&[b, l, d], &[n, wd], &[lb, ll]) = (hs.as_slice(), ws.as_slice(), ls.as_slice()) else {
        return Err(TchError::Shape(format!(
            "chunked_ce: hidden {hs:?}, weight {ws:?}, labels {ls:?}: expected [b, l, d], [n, d], [b, l]"
        )));
    };
    if d != wd || (b, l) != (lb, ll) {
        return Err(TchError::Shape(format!(
            "chunked_ce: hidden {hs:?}, weight {ws:?} and labels {ls:?} do not match"
        )));
    }
    if chunk < 1 {
        return Err(TchError::Shape(format!(
            "chunked_ce: chunk must be positive, got {chunk}"
        )));
    }
    let mut parts = Vec::new();
    let mut start = 0;
    while start < l {
        let len = chunk.min(l - start);
        let h = hidden.f_narrow(1, start, len)?;
        let y = labels.f_narrow(1, start, len)?;
        let logits = h.f_linear::<Tensor>(weight, None)?.f_to_kind(Kind::Float)?;
        let loss = logits.f_reshape([-1, n])?.f_cross_entropy_loss::<Tensor>(
            &y.f_reshape([-1])?,
            None,
            Reduction::None,
            IGNORE_INDEX,
            0.0,
        )?;
        parts.push(loss.f_reshape([b, len])?);
        start += len;
    }
    Tensor::f_cat(&parts, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_give_the_unchunked_loss_and_gradients() {
        tch::manual_seed(0);
        let opts = (Kind::Float, tch::Device::Cpu);
        let hidden = Tensor::randn([2, 7, 8], opts).set_requires_grad(true);
        let weight = Tensor::randn([11, 8], opts).set_requires_grad(true);
        let labels = Tensor::randint(11, [2, 7], (Kind::Int64, tch::Device::Cpu));
        let full = hidden
            .linear::<Tensor>(&weight, None)
            .reshape([-1, 11])
            .cross_entropy_loss::<Tensor>(&labels.reshape([-1]), None, Reduction::None, -100, 0.0)
            .reshape([2, 7]);
        full.sum(Kind::Float).backward();
        let (gh, gw) = (hidden.grad().copy(), weight.grad().copy());
        let _ = hidden.grad().zero_();
        let _ = weight.grad().zero_();
        let chunked =
            chunked_linear_cross_entropy(&hidden, &weight, &labels, 3).expect("chunked loss");
        assert!(chunked.allclose(&full, 1e-6, 1e-6, false));
        chunked.sum(Kind::Float).backward();
        assert!(hidden.grad().allclose(&gh, 1e-5, 1e-6, false));
        assert!(weight.grad().allclose(&gw, 1e-5, 1e-6, false));
        assert!(chunked_linear_cross_entropy(&hidden, &weight, &labels, 0).is_err());
        assert!(chunked_linear_cross_entropy(&weight, &weight, &labels, 2).is_err());
    }
}
