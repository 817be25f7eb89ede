//! The ops against reference formulas written out by hand, and the shard
//! properties the layouts rely on, on one process (`SoloComm` for the
//! vocab-parallel loss; the sharded versions run in `mpi_ops`).

use autopart_runtime::comm::SoloComm;
use autopart_runtime::ops::{self, IGNORE_INDEX, Mask};
use tch::{Device, IndexOp, Kind, Tensor};

const CPU: (Kind, Device) = (Kind::Float, Device::Cpu);

fn randn(shape: &[i64], seed: i64) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randn(shape, CPU)
}

fn assert_close(got: &Tensor, want: &Tensor, tol: f64, what: &str) {
    assert_eq!(got.size(), want.size(), "{what}: shapes");
    let diff = (got.to_kind(Kind::Double) - want.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[]);
    assert!(diff <= tol, "{what}: max diff {diff:e} > {tol:e}");
}

#[test]
fn rms_norm_matches_the_formula_by_hand() {
    tch::set_num_threads(1);
    let x = randn(&[2, 3, 5], 1);
    let w = randn(&[5], 2);
    let eps = 1e-5;
    let got = ops::rms_norm(&x, &w, eps).expect("shapes agree");
    let xs = Vec::<f32>::try_from(&x.flatten(0, -1)).expect("f32");
    let ws = Vec::<f32>::try_from(&w).expect("f32");
    let mut want = Vec::new();
    for row in xs.chunks(5) {
        let ms = row.iter().map(|v| (v * v) as f64).sum::<f64>() / 5.0;
        let r = 1.0 / (ms + eps).sqrt();
        want.extend(row.iter().zip(&ws).map(|(v, w)| (*v as f64 * r) as f32 * w));
    }
    assert_close(
        &got,
        &Tensor::from_slice(&want).view([2, 3, 5]),
        1e-5,
        "rms_norm",
    );
}

#[test]
fn layer_norm_linear_and_elementwise_ops_match_their_formulas() {
    let x = randn(&[2, 3, 6], 3);
    let (w, b) = (randn(&[6], 4), randn(&[6], 5));
    let mean = x.mean_dim(-1, true, Kind::Float);
    let var = (&x - &mean).square().mean_dim(-1, true, Kind::Float);
    let want = (&x - &mean) / (var + 1e-5).sqrt() * &w + &b;
    assert_close(
        &ops::layer_norm(&x, &w, &b, 1e-5).expect("ok"),
        &want,
        1e-5,
        "layer_norm",
    );

    let weight = randn(&[4, 6], 6);
    let bias = randn(&[4], 7);
    let want = x.matmul(&weight.tr());
    assert_close(
        &ops::linear(&x, &weight).expect("ok"),
        &want,
        1e-5,
        "linear",
    );
    assert_close(
        &ops::linear_bias(&x, &weight, &bias).expect("ok"),
        &(&want + &bias),
        1e-5,
        "linear_bias",
    );
    assert!(
        ops::linear(&x, &randn(&[4, 5], 8)).is_err(),
        "k mismatch is an error"
    );
    // Saving weights whole (ZeRO-3): the same products and gradients, and a
    // graph that holds the weight itself, so swapping its data out and back
    // in leaves backward correct.
    let grads = |whole: bool| {
        let before = ops::save_weights_whole(whole);
        let xw = x.detach().set_requires_grad(true);
        let mut ww = weight.detach().set_requires_grad(true);
        let bw = bias.detach().set_requires_grad(true);
        let y = ops::linear_bias(
            &ops::linear(&xw, &ww).expect("ok"),
            &ww.matmul(&ww.tr()),
            &bw,
        )
        .expect("ok");
        assert!(ops::linear(&x, &randn(&[4, 5], 8)).is_err(), "k mismatch");
        ops::save_weights_whole(before);
        if whole {
            let full = ww.detach().copy();
            ww.set_data(&Tensor::empty([0], CPU));
            ww.set_data(&full);
        }
        y.square().sum(Kind::Float).backward();
        (y.detach(), xw.grad(), ww.grad(), bw.grad())
    };
    let (a, b) = (grads(false), grads(true));
    // Relative to each tensor's largest element (float rounding only).
    let rel = |got: &Tensor, want: &Tensor, what: &str| {
        let scale = want.abs().max().double_value(&[]).max(1e-12);
        assert_close(got, want, 1e-5 * scale, what);
    };
    rel(&b.0, &a.0, "linear, weights whole");
    rel(&b.1, &a.1, "x grad, weights whole");
    rel(&b.2, &a.2, "weight grad, weights whole");
    rel(&b.3, &a.3, "bias grad, weights whole");

    let (g, u) = (randn(&[2, 3, 6], 9), randn(&[2, 3, 6], 10));
    let silu = &g / (g.neg().exp() + 1.0);
    assert_close(
        &ops::swiglu(&g, &u).expect("ok"),
        &(silu * &u),
        1e-6,
        "swiglu",
    );
    let c = (2.0 / std::f64::consts::PI).sqrt();
    let want = &x
        * 0.5
        * ((&x + x.pow_tensor_scalar(3) * 0.044715) * c)
            .tanh()
            .g_add_scalar(1.0);
    assert_close(&ops::gelu(&x).expect("ok"), &want, 1e-6, "gelu");
    assert_close(&ops::add(&g, &u).expect("ok"), &(&g + &u), 0.0, "add");
}

#[test]
fn split_and_merge_heads_round_trip() {
    let x = randn(&[2, 3, 12], 11);
    let h = ops::split_heads(&x, 4).expect("12 = 4 x 3");
    assert_eq!(h.size(), vec![2, 3, 4, 3]);
    assert_close(&h.i((.., .., 1, ..)), &x.i((.., .., 3..6)), 0.0, "head 1");
    assert_close(&ops::merge_heads(&h).expect("ok"), &x, 0.0, "merge");
    assert!(ops::split_heads(&x, 5).is_err());
    assert!(ops::merge_heads(&x).is_err());
}

/// RoPE as a complex rotation: (x_i + i x_{i+d/2}) * exp(i pos theta^(-2i/d)).
fn rope_by_complex_rotation(x: &Tensor, theta: f64, offset: i64) -> Tensor {
    let s = x.size();
    let (l, d) = (s[1], s[3]);
    let half = d / 2;
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, half);
    let z = Tensor::stack(&[x1, x2], -1).view_as_complex();
    let i = Tensor::arange(half, CPU);
    let inv_freq = (i * (-2.0 * theta.ln() / d as f64)).exp();
    let pos = Tensor::arange_start(offset, offset + l, CPU);
    let angle = pos.outer(&inv_freq).view([1, l, 1, half]);
    let rot = Tensor::polar(&angle.ones_like(), &angle);
    let r = Tensor::view_as_real(&(z * rot));
    Tensor::cat(&[r.select(-1, 0), r.select(-1, 1)], -1)
}

#[test]
fn rope_matches_complex_rotation_and_offsets_split_the_sequence() {
    let x = randn(&[2, 6, 3, 8], 12);
    let got = ops::rope(&x, 10000.0, 7).expect("even d");
    assert_close(
        &got,
        &rope_by_complex_rotation(&x, 10000.0, 7),
        1e-5,
        "rope offset 7",
    );
    // A sequence shard starting at position 4 gets the same rows as the whole.
    let whole = ops::rope(&x, 500000.0, 0).expect("ok");
    let tail = ops::rope(&x.narrow(1, 4, 2), 500000.0, 4).expect("ok");
    assert_close(&tail, &whole.narrow(1, 4, 2), 1e-5, "rope shard");
    // bf16 input is rotated in f32 and rounded once.
    let xb = x.to_kind(Kind::BFloat16);
    let gotb = ops::rope(&xb, 10000.0, 7).expect("ok");
    assert_eq!(gotb.kind(), Kind::BFloat16);
    let want = rope_by_complex_rotation(&xb.to_kind(Kind::Float), 10000.0, 7);
    assert_close(&gotb, &want, 5e-2, "rope bf16");
    assert!(
        ops::rope(&randn(&[1, 2, 1, 5], 1), 10000.0, 0).is_err(),
        "odd d"
    );
}

/// softmax(q k^T / sqrt(d)) v with kv heads repeated, written out.
fn attention_by_hand(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool) -> Tensor {
    let (h, g) = (q.size()[2], k.size()[2]);
    let k = k.repeat_interleave_self_int(h / g, 2, None);
    let v = v.repeat_interleave_self_int(h / g, 2, None);
    let d = q.size()[3] as f64;
    let (qt, kt, vt) = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2));
    let mut scores = qt.matmul(&kt.transpose(-1, -2)) / d.sqrt();
    if causal {
        let (l, s) = (q.size()[1], k.size()[1]);
        let future = Tensor::ones([l, s], (Kind::Bool, Device::Cpu)).triu(1);
        scores = scores.masked_fill(&future, f64::NEG_INFINITY);
    }
    scores.softmax(-1, Kind::Float).matmul(&vt).transpose(1, 2)
}

#[test]
fn attention_matches_explicit_softmax_with_repeated_kv_heads() {
    let q = randn(&[2, 5, 6, 4], 13);
    let k = randn(&[2, 5, 2, 4], 14);
    let v = randn(&[2, 5, 2, 4], 15);
    for (mask, causal) in [(Mask::Causal, true), (Mask::Full, false)] {
        let got = ops::attention(&q, &k, &v, mask).expect("6 heads over 2 groups");
        assert_close(
            &got,
            &attention_by_hand(&q, &k, &v, causal),
            1e-5,
            "attention",
        );
    }
    // A tp shard: query heads 3..6 with kv group 1 compute heads 3..6 of the whole.
    let whole = ops::attention(&q, &k, &v, Mask::Causal).expect("ok");
    let shard = ops::attention(
        &q.narrow(2, 3, 3),
        &k.narrow(2, 1, 1),
        &v.narrow(2, 1, 1),
        Mask::Causal,
    )
    .expect("ok");
    assert_close(&shard, &whole.narrow(2, 3, 3), 1e-6, "head shard");
    assert!(
        ops::attention(
            &q,
            &randn(&[2, 5, 4, 4], 1),
            &randn(&[2, 5, 4, 4], 2),
            Mask::Full
        )
        .is_err()
    );
}

#[test]
fn sharded_embedding_sums_to_the_full_lookup_with_matching_gradients() {
    let table = randn(&[10, 4], 16);
    let ids = Tensor::from_slice(&[0i64, 3, 4, 9, 5, 2]).view([2, 3]);
    let full = table.detach().set_requires_grad(true);
    let out = ops::embedding(&ids, &full, 0).expect("ok");
    let upstream = randn(&[2, 3, 4], 17);
    (&out * &upstream).sum(Kind::Float).backward();
    let mut sum = Tensor::zeros([2, 3, 4], CPU);
    for (start, len) in [(0i64, 4i64), (4, 6)] {
        let shard = table.narrow(0, start, len).detach().set_requires_grad(true);
        let part = ops::embedding(&ids, &shard, start).expect("ok");
        (&part * &upstream).sum(Kind::Float).backward();
        assert_close(
            &shard.grad(),
            &full.grad().narrow(0, start, len),
            1e-6,
            "shard grad",
        );
        sum += part;
    }
    assert_close(&sum, &out, 0.0, "sum of shards");
}

#[test]
fn pos_embedding_offsets_positions_and_rejects_out_of_range() {
    let table = randn(&[8, 3], 18);
    let pos = ops::positions(2, 3, 0).expect("ok");
    let got = ops::pos_embedding(&pos, &table, 4).expect("rows 4..7");
    assert_close(
        &got.i((1, .., ..)),
        &table.narrow(0, 4, 3),
        0.0,
        "rows 4..7",
    );
    assert!(ops::pos_embedding(&pos, &table, 6).is_err(), "row 8 of 8");
}

#[test]
fn cross_entropy_matches_log_softmax_and_ignores_labels() {
    let logits = randn(&[2, 3, 7], 19);
    let labels = Tensor::from_slice(&[1i64, 6, 0, IGNORE_INDEX, 3, 2]).view([2, 3]);
    let got = ops::cross_entropy(&logits, &labels).expect("ok");
    let logp = logits.log_softmax(-1, Kind::Float);
    let safe = labels.clamp_min(0);
    let valid = labels.ne(IGNORE_INDEX).to_kind(Kind::Float);
    let want = -logp.gather(-1, &safe.unsqueeze(-1), false).squeeze_dim(-1) * valid;
    assert_close(&got, &want, 1e-6, "cross_entropy");
    // The vocab-parallel form on a one-rank group is the same op, gradient included.
    let a = logits.detach().set_requires_grad(true);
    let b = logits.detach().set_requires_grad(true);
    let la = ops::mean(&ops::cross_entropy(&a, &labels).expect("ok"), 5).expect("ok");
    let lb = ops::vocab_parallel_cross_entropy(&b, &labels, 0, &SoloComm).expect("ok");
    let lb = ops::mean(&lb, 5).expect("ok");
    assert_close(&lb, &la, 1e-6, "loss");
    la.backward();
    lb.backward();
    assert_close(&b.grad(), &a.grad(), 1e-6, "grad");
}

#[test]
fn mean_of_shards_adds_up_to_the_mean() {
    let per_token = randn(&[4, 6], 20);
    let whole = ops::mean(&per_token, 24).expect("ok");
    let parts = ops::mean(&per_token.narrow(0, 0, 1), 24).expect("ok")
        + ops::mean(&per_token.narrow(0, 1, 3), 24).expect("ok");
    assert_close(&parts, &whole, 1e-6, "partial sums");
    assert!(ops::mean(&per_token, 0).is_err());
}
