//! GPT-2/3 style: learned positions, pre-LayerNorm blocks, GeLU MLP, head
//! tied to the token embedding. Parameter names follow HF's `GPT2LMHeadModel`,
//! except that the fused `c_attn` projection is traced as separate q/k/v
//! projections (same parameters, same FLOPs, independently shardable).

use super::GptConfig;
use crate::ir::{AttrValue, DType, OpKind, Role};
use crate::trace::{TraceError, Tracer};

pub(super) fn trace(
    t: &mut Tracer<'_>,
    c: &GptConfig,
    batch: u64,
    seq: u64,
    dtype: DType,
) -> Result<(), TraceError> {
    let h = c.hidden;
    let eps = || ("eps", AttrValue::Float(c.layer_norm_eps));

    let tokens = t.input("tokens", &[batch, seq], DType::I64, Role::Input);
    let labels = t.input("labels", &[batch, seq], DType::I64, Role::Label);
    let wte = t.param("transformer.wte.weight", &[c.vocab, h], dtype);
    let wpe = t.param("transformer.wpe.weight", &[c.n_positions, h], dtype);
    let tok = t.op(OpKind::Embedding, "wte", &[tokens, wte], &[])?;
    let pos = t.op(OpKind::PosEmbedding, "wpe", &[tokens, wpe], &[])?;
    let mut x = t.op(OpKind::Add, "embed_sum", &[tok, pos], &[])?;

    for i in 0..c.n_layers {
        t.set_layer(Some(u32::try_from(i).unwrap_or(u32::MAX)));
        let p = |s: &str| format!("transformer.h.{i}.{s}");
        let n = |s: &str| format!("h.{i}.{s}");
        let linear = |t: &mut Tracer<'_>, x, site: &str, n_out: u64, n_in: u64| {
            let w = t.param(&p(&format!("{site}.weight")), &[n_out, n_in], dtype);
            let b = t.param(&p(&format!("{site}.bias")), &[n_out], dtype);
            t.op(OpKind::LinearBias, &n(site), &[x, w, b], &[])
        };

        let ln1_w = t.param(&p("ln_1.weight"), &[h], dtype);
        let ln1_b = t.param(&p("ln_1.bias"), &[h], dtype);
        let hn = t.op(OpKind::LayerNorm, &n("ln_1"), &[x, ln1_w, ln1_b], &[eps()])?;
        let q = linear(t, hn, "attn.q_proj", h, h)?;
        let k = linear(t, hn, "attn.k_proj", h, h)?;
        let v = linear(t, hn, "attn.v_proj", h, h)?;
        let heads = [("h", AttrValue::Int(c.n_heads as i64))];
        let q = t.op(OpKind::SplitHeads, &n("attn.q_heads"), &[q], &heads)?;
        let k = t.op(OpKind::SplitHeads, &n("attn.k_heads"), &[k], &heads)?;
        let v = t.op(OpKind::SplitHeads, &n("attn.v_heads"), &[v], &heads)?;
        let a = t.op(
            OpKind::Attention,
            &n("attn.attn"),
            &[q, k, v],
            &[
                ("g", AttrValue::Int(c.n_heads as i64)),
                ("r", AttrValue::Int(1)),
                ("causal", AttrValue::Bool(true)),
            ],
        )?;
        let a = t.op(OpKind::MergeHeads, &n("attn.merge_heads"), &[a], &[])?;
        let o = linear(t, a, "attn.c_proj", h, h)?;
        x = t.op(OpKind::Add, &n("attn_residual"), &[x, o], &[])?;

        let ln2_w = t.param(&p("ln_2.weight"), &[h], dtype);
        let ln2_b = t.param(&p("ln_2.bias"), &[h], dtype);
        let hn = t.op(OpKind::LayerNorm, &n("ln_2"), &[x, ln2_w, ln2_b], &[eps()])?;
        let f = linear(t, hn, "mlp.c_fc", c.ffn, h)?;
        let f = t.op(OpKind::Gelu, &n("mlp.act"), &[f], &[])?;
        let d = linear(t, f, "mlp.c_proj", h, c.ffn)?;
        x = t.op(OpKind::Add, &n("mlp_residual"), &[x, d], &[])?;
    }

    t.set_layer(None);
    let lnf_w = t.param("transformer.ln_f.weight", &[h], dtype);
    let lnf_b = t.param("transformer.ln_f.bias", &[h], dtype);
    let x = t.op(OpKind::LayerNorm, "ln_f", &[x, lnf_w, lnf_b], &[eps()])?;
    let logits = t.op(OpKind::Linear, "lm_head", &[x, wte], &[])?;
    let per_token = t.op(
        OpKind::CrossEntropy,
        "loss.cross_entropy",
        &[logits, labels],
        &[],
    )?;
    t.op(OpKind::Mean, "loss.mean", &[per_token], &[])?;
    Ok(())
}
