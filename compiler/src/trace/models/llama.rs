//! Llama 2 / 3 / 3.1: RMSNorm, GQA attention with RoPE, SwiGLU MLP.
//!
//! Parameter names follow HuggingFace's `LlamaForCausalLM` so checkpoints map
//! one to one; op names are the module paths without the `model.` prefix.

use super::{LlamaConfig, RopeScaling};
use crate::ir::{AttrValue, DType, OpKind, Role};
use crate::trace::{Sym, TraceError, Tracer};

pub(super) fn trace(
    t: &mut Tracer<'_>,
    c: &LlamaConfig,
    batch: u64,
    seq: u64,
    dtype: DType,
    kv_copies: u64,
) -> Result<(), TraceError> {
    let (h, v) = (c.hidden, c.vocab);
    // Saturating: an overflowing width makes a tensor that `finish` refuses
    // as too large.
    let q_width = c.n_heads.saturating_mul(c.head_dim);
    // Each kv head traced `kv_copies` times in a row (the caller checked
    // that the copies divide a group's query heads).
    let n_kv = c.n_kv_heads.saturating_mul(kv_copies);
    let kv_width = n_kv.saturating_mul(c.head_dim);
    let eps = || ("eps", AttrValue::Float(c.rms_norm_eps));

    let tokens = t.input("tokens", &[batch, seq], DType::I64, Role::Input);
    let labels = t.input("labels", &[batch, seq], DType::I64, Role::Label);
    let embed_w = t.param("model.embed_tokens.weight", &[v, h], dtype);
    let mut x = t.op(OpKind::Embedding, "embed_tokens", &[tokens, embed_w], &[])?;

    for i in 0..c.n_layers {
        t.set_layer(Some(u32::try_from(i).unwrap_or(u32::MAX)));
        let p = |s: &str| format!("model.layers.{i}.{s}");
        let n = |s: &str| format!("layers.{i}.{s}");

        let norm1_w = t.param(&p("input_layernorm.weight"), &[h], dtype);
        let hn = t.op(
            OpKind::RmsNorm,
            &n("input_layernorm"),
            &[x, norm1_w],
            &[eps()],
        )?;

        let wq = t.param(&p("self_attn.q_proj.weight"), &[q_width, h], dtype);
        let wk = t.param(&p("self_attn.k_proj.weight"), &[kv_width, h], dtype);
        let wv = t.param(&p("self_attn.v_proj.weight"), &[kv_width, h], dtype);
        t.set_copies(wk, 0, kv_copies);
        t.set_copies(wv, 0, kv_copies);
        let wo = t.param(&p("self_attn.o_proj.weight"), &[h, q_width], dtype);
        let q = t.op(OpKind::Linear, &n("self_attn.q_proj"), &[hn, wq], &[])?;
        let k = t.op(OpKind::Linear, &n("self_attn.k_proj"), &[hn, wk], &[])?;
        let vv = t.op(OpKind::Linear, &n("self_attn.v_proj"), &[hn, wv], &[])?;
        let heads = |t: &mut Tracer<'_>, x: Sym, site: &str, n_heads: u64| {
            t.op(
                OpKind::SplitHeads,
                site,
                &[x],
                &[("h", AttrValue::Int(n_heads as i64))],
            )
        };
        let q = heads(t, q, &n("self_attn.q_heads"), c.n_heads)?;
        let k = heads(t, k, &n("self_attn.k_heads"), n_kv)?;
        let vv = heads(t, vv, &n("self_attn.v_heads"), n_kv)?;
        let rope = rope_attrs(c);
        let q = t.op(OpKind::Rope, &n("self_attn.rope_q"), &[q], &rope)?;
        let k = t.op(OpKind::Rope, &n("self_attn.rope_k"), &[k], &rope)?;
        let a = t.op(
            OpKind::Attention,
            &n("self_attn.attn"),
            &[q, k, vv],
            &[
                ("g", AttrValue::Int(n_kv as i64)),
                ("r", AttrValue::Int((c.n_heads / n_kv) as i64)),
                ("causal", AttrValue::Bool(true)),
            ],
        )?;
        let a = t.op(OpKind::MergeHeads, &n("self_attn.merge_heads"), &[a], &[])?;
        let o = t.op(OpKind::Linear, &n("self_attn.o_proj"), &[a, wo], &[])?;
        x = t.op(OpKind::Add, &n("attn_residual"), &[x, o], &[])?;

        let norm2_w = t.param(&p("post_attention_layernorm.weight"), &[h], dtype);
        let hn = t.op(
            OpKind::RmsNorm,
            &n("post_attention_layernorm"),
            &[x, norm2_w],
            &[eps()],
        )?;
        let f = c.intermediate;
        let w_gate = t.param(&p("mlp.gate_proj.weight"), &[f, h], dtype);
        let w_up = t.param(&p("mlp.up_proj.weight"), &[f, h], dtype);
        let w_down = t.param(&p("mlp.down_proj.weight"), &[h, f], dtype);
        let g = t.op(OpKind::Linear, &n("mlp.gate_proj"), &[hn, w_gate], &[])?;
        let u = t.op(OpKind::Linear, &n("mlp.up_proj"), &[hn, w_up], &[])?;
        let s = t.op(OpKind::SwiGlu, &n("mlp.act"), &[g, u], &[])?;
        let d = t.op(OpKind::Linear, &n("mlp.down_proj"), &[s, w_down], &[])?;
        x = t.op(OpKind::Add, &n("mlp_residual"), &[x, d], &[])?;
    }

    t.set_layer(None);
    let norm_w = t.param("model.norm.weight", &[h], dtype);
    let x = t.op(OpKind::RmsNorm, "norm", &[x, norm_w], &[eps()])?;
    let head_w = if c.tie_embeddings {
        embed_w
    } else {
        t.param("lm_head.weight", &[v, h], dtype)
    };
    let per_token = match &c.loss_op {
        Some(op) => t.op(
            OpKind::Custom(op.clone()),
            "loss.fused",
            &[x, head_w, labels],
            &[],
        )?,
        None => {
            let logits = t.op(OpKind::Linear, "lm_head", &[x, head_w], &[])?;
            t.op(
                OpKind::CrossEntropy,
                "loss.cross_entropy",
                &[logits, labels],
                &[],
            )?
        }
    };
    t.op(OpKind::Mean, "loss.mean", &[per_token], &[])?;
    Ok(())
}

/// The rope op's attributes: `theta`, and with scaling its `rope_type` and
/// parameters (named as in transformers' config).
fn rope_attrs(c: &LlamaConfig) -> Vec<(&'static str, AttrValue)> {
    let mut attrs = vec![("theta", AttrValue::Float(c.rope_theta))];
    match c.rope_scaling {
        None => {}
        Some(RopeScaling::Linear { factor }) => {
            attrs.push(("rope_type", AttrValue::Str("linear".into())));
            attrs.push(("factor", AttrValue::Float(factor)));
        }
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_positions,
        }) => {
            attrs.push(("rope_type", AttrValue::Str("llama3".into())));
            attrs.push(("factor", AttrValue::Float(factor)));
            attrs.push(("low_freq_factor", AttrValue::Float(low_freq_factor)));
            attrs.push(("high_freq_factor", AttrValue::Float(high_freq_factor)));
            attrs.push((
                "original_max_positions",
                AttrValue::Int(i64::try_from(original_max_positions).unwrap_or(i64::MAX)),
            ));
        }
    }
    attrs
}
