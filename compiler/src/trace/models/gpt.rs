//! GPT-2/3 style: learned positions, pre-LayerNorm blocks, GeLU MLP, head
//! tied to the token embedding (or, for pricing variants, untied and with
//! grouped-query attention). Parameter names follow HF's `GPT2LMHeadModel`,
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
    kv_copies: u64,
) -> Result<(), TraceError> {
    let h = c.hidden;
    // Grouped-query variants project keys and values to fewer heads, each
    // traced `kv_copies` times in a row where tp exceeds them (the caller
    // checked that the copies divide a group's query heads).
    let n_kv = c.n_kv_heads.saturating_mul(kv_copies);
    let kv_width = n_kv.saturating_mul(h / c.n_heads.max(1));
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
        let linear_copied =
            |t: &mut Tracer<'_>, x, site: &str, n_out: u64, n_in: u64, copies: u64| {
                let w = t.param(&p(&format!("{site}.weight")), &[n_out, n_in], dtype);
                let b = t.param(&p(&format!("{site}.bias")), &[n_out], dtype);
                if copies > 1 {
                    t.set_copies(w, 0, copies);
                    t.set_copies(b, 0, copies);
                }
                t.op(OpKind::LinearBias, &n(site), &[x, w, b], &[])
            };
        let linear = |t: &mut Tracer<'_>, x, site: &str, n_out: u64, n_in: u64| {
            linear_copied(t, x, site, n_out, n_in, 1)
        };

        let ln1_w = t.param(&p("ln_1.weight"), &[h], dtype);
        let ln1_b = t.param(&p("ln_1.bias"), &[h], dtype);
        let hn = t.op(OpKind::LayerNorm, &n("ln_1"), &[x, ln1_w, ln1_b], &[eps()])?;
        let q = linear(t, hn, "attn.q_proj", h, h)?;
        let k = linear_copied(t, hn, "attn.k_proj", kv_width, h, kv_copies)?;
        let v = linear_copied(t, hn, "attn.v_proj", kv_width, h, kv_copies)?;
        let heads = [("h", AttrValue::Int(c.n_heads as i64))];
        let kv_heads = [("h", AttrValue::Int(n_kv as i64))];
        let q = t.op(OpKind::SplitHeads, &n("attn.q_heads"), &[q], &heads)?;
        let k = t.op(OpKind::SplitHeads, &n("attn.k_heads"), &[k], &kv_heads)?;
        let v = t.op(OpKind::SplitHeads, &n("attn.v_heads"), &[v], &kv_heads)?;
        let a = t.op(
            OpKind::Attention,
            &n("attn.attn"),
            &[q, k, v],
            &[
                ("g", AttrValue::Int(n_kv as i64)),
                ("r", AttrValue::Int((c.n_heads / n_kv.max(1)) as i64)),
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
    let head_w = if c.tie_embeddings {
        wte
    } else {
        t.param("lm_head.weight", &[c.vocab, h], dtype)
    };
    let logits = t.op(OpKind::Linear, "lm_head", &[x, head_w], &[])?;
    let per_token = t.op(
        OpKind::CrossEntropy,
        "loss.cross_entropy",
        &[logits, labels],
        &[],
    )?;
    t.op(OpKind::Mean, "loss.mean", &[per_token], &[])?;
    Ok(())
}
