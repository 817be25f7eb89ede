//! The optimizer pieces on one process: LR schedule values, AdamW against a
//! hand-computed example and against `torch.optim.AdamW` numbers, and
//! gradient clipping over a [`SoloComm`] against a direct computation and
//! `torch.nn.utils.clip_grad_norm_` numbers.
//!
//! The torch numbers were computed once with the venv's PyTorch 2.11
//! (`foreach=False`) and pasted here; the tests never run Python.

use autopart_runtime::comm::SoloComm;
use autopart_runtime::optim::{
    AdamW, AdamWState, LrSchedule, NormShare, OptimError, clip_grad_norm,
};
use tch::{Kind, Tensor};

fn values(t: &Tensor) -> Vec<f64> {
    let flat = t.to_kind(Kind::Double).flatten(0, -1);
    Vec::<f64>::try_from(&flat).expect("a cpu f64 tensor converts to a vec")
}

fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{what}[{i}]: got {g}, want {w} (all: {got:?})"
        );
    }
}

fn f32s(v: &[f32], shape: &[i64]) -> Tensor {
    Tensor::from_slice(v).view(shape)
}

#[test]
fn lr_schedule_warms_up_linearly_then_decays_by_cosine() {
    let s = LrSchedule {
        peak_lr: 1e-3,
        warmup_steps: 4,
        total_steps: 12,
        min_lr: 1e-4,
    };
    s.validate().expect("a valid schedule");
    // Warm-up: peak * (step + 1) / warmup.
    assert_eq!(s.lr(0), 1e-3 * 1.0 / 4.0);
    assert_eq!(s.lr(1), 1e-3 * 2.0 / 4.0);
    assert_eq!(s.lr(3), 1e-3);
    // Cosine over steps 4..12 (span 8): t = 0, 1/4, 1/2, 3/4.
    let close = |a: f64, b: f64| (a - b).abs() < 1e-15;
    assert!(close(s.lr(4), 1e-3));
    let quarter = 1e-4 + 9e-4 * 0.5 * (1.0 + std::f64::consts::FRAC_1_SQRT_2);
    assert!(close(s.lr(6), quarter), "{} vs {quarter}", s.lr(6));
    assert!(close(s.lr(8), 5.5e-4), "{}", s.lr(8));
    let three_quarters = 1e-4 + 9e-4 * 0.5 * (1.0 - std::f64::consts::FRAC_1_SQRT_2);
    assert!(close(s.lr(10), three_quarters), "{}", s.lr(10));
    // At and after total_steps: min_lr.
    assert_eq!(s.lr(12), 1e-4);
    assert_eq!(s.lr(1_000_000), 1e-4);
    // Strictly decreasing over the decay.
    for step in 4..12 {
        assert!(s.lr(step + 1) < s.lr(step), "step {step}");
    }
}

#[test]
fn lr_schedule_edge_cases() {
    let no_warmup = LrSchedule {
        peak_lr: 2.0,
        warmup_steps: 0,
        total_steps: 2,
        min_lr: 0.0,
    };
    assert_eq!(no_warmup.lr(0), 2.0);
    assert!((no_warmup.lr(1) - 1.0).abs() < 1e-15);
    assert_eq!(no_warmup.lr(2), 0.0);
    let no_decay = LrSchedule {
        peak_lr: 1.0,
        warmup_steps: 2,
        total_steps: 2,
        min_lr: 0.25,
    };
    assert_eq!(no_decay.lr(0), 0.5);
    assert_eq!(no_decay.lr(1), 1.0);
    assert_eq!(no_decay.lr(2), 0.25);
    let bad = LrSchedule {
        min_lr: 2.0,
        ..no_decay
    };
    assert!(matches!(bad.validate(), Err(OptimError::Invalid(_))));
}

#[test]
fn adamw_two_steps_by_hand() {
    // beta1 1/2, beta2 3/4, lr 0.1, wd 1/2, eps 0, g = ±1/2 both steps:
    // step 1: p 1 -> 0.95 (decay), m 0.25, v 0.0625, update 0.2 * 0.25 / 0.5 = 0.1 -> 0.85;
    // step 2: p -> 0.8075, m 0.375, v 0.109375, bias-corrected denom 0.5,
    // update (0.1 / 0.75) * 0.375 / 0.5 = 0.1 -> 0.7075.
    let hp = AdamW {
        beta1: 0.5,
        beta2: 0.75,
        eps: 0.0,
        weight_decay: 0.5,
    };
    let mut params = vec![f32s(&[1.0, -1.0], &[2])];
    let grads = vec![f32s(&[0.5, -0.5], &[2])];
    let mut state = AdamWState::new(&params).expect("state");
    state.step(&hp, &mut params, &grads, 0.1).expect("step 1");
    assert_close("after step 1", &values(&params[0]), &[0.85, -0.85], 1e-6);
    assert_close(
        "m after 1",
        &values(&state.exp_avg[0]),
        &[0.25, -0.25],
        1e-7,
    );
    assert_close(
        "v after 1",
        &values(&state.exp_avg_sq[0]),
        &[0.0625, 0.0625],
        1e-7,
    );
    state.step(&hp, &mut params, &grads, 0.1).expect("step 2");
    assert_close(
        "after step 2",
        &values(&params[0]),
        &[0.7075, -0.7075],
        1e-6,
    );
    assert_close(
        "m after 2",
        &values(&state.exp_avg[0]),
        &[0.375, -0.375],
        1e-7,
    );
    assert_close(
        "v after 2",
        &values(&state.exp_avg_sq[0]),
        &[0.109375, 0.109375],
        1e-7,
    );
    assert_eq!(state.steps, 2);
}

#[test]
fn adamw_matches_torch_over_three_steps() {
    let hp = AdamW {
        beta1: 0.8,
        beta2: 0.95,
        eps: 1e-6,
        weight_decay: 0.1,
    };
    let mut params = vec![
        f32s(&[0.5, -1.0, 2.0, 0.25, 3.0, -0.75], &[2, 3]).set_requires_grad(true),
        f32s(&[1.5, -2.5], &[2]).set_requires_grad(true),
    ];
    let steps: [([f32; 6], [f32; 2], f64); 3] = [
        ([0.1, -0.2, 0.3, -0.4, 0.5, -0.6], [0.7, -0.05], 1e-2),
        ([-0.3, 0.1, 0.2, 0.05, -0.5, 1.0], [-0.2, 0.4], 5e-3),
        ([1.0, 2.0, -3.0, 0.0, 0.1, -0.1], [0.3, 0.3], 2e-2),
    ];
    let mut state = AdamWState::new(&params).expect("state");
    for (gp, gq, lr) in steps {
        let grads = [f32s(&gp, &[2, 3]), f32s(&gq, &[2])];
        state.step(&hp, &mut params, &grads, lr).expect("step");
    }
    // torch.optim.AdamW([p, q], betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, foreach=False).
    let want_p = [
        4.800733030e-01,
        -9.989035130e-01,
        1.990363121e+00,
        2.695651352e-01,
        2.979687452e+00,
        -7.429995537e-01,
    ];
    let want_q = [1.472040296e+00, -2.501212835e+00];
    assert_close("p", &values(&params[0]), &want_p, 1e-6);
    assert_close("q", &values(&params[1]), &want_q, 1e-6);
    assert!(
        params[0].requires_grad(),
        "the parameter stays a leaf that requires grad"
    );
    assert_eq!(params[0].kind(), Kind::Float);
}

#[test]
fn adamw_keeps_half_parameters_half_and_moments_f32() {
    let hp = AdamW::default();
    let start = [0.5f32, -1.0, 2.0, 3.0];
    let grad = [0.1f32, -0.2, 0.3, -0.4];
    let mut bf = vec![f32s(&start, &[4]).to_kind(Kind::BFloat16)];
    let mut full = vec![f32s(&start, &[4])];
    let mut s_bf = AdamWState::new(&bf).expect("state");
    let mut s_full = AdamWState::new(&full).expect("state");
    s_bf.step(
        &hp,
        &mut bf,
        &[f32s(&grad, &[4]).to_kind(Kind::BFloat16)],
        0.1,
    )
    .expect("bf16 step");
    s_full
        .step(&hp, &mut full, &[f32s(&grad, &[4])], 0.1)
        .expect("f32 step");
    assert_eq!(bf[0].kind(), Kind::BFloat16);
    assert_eq!(s_bf.exp_avg[0].kind(), Kind::Float);
    // The bf16 parameter is the f32 update rounded once to bf16.
    let rounded = full[0].to_kind(Kind::BFloat16);
    assert_eq!(values(&bf[0]), values(&rounded));
    // torch.optim.AdamW on the bf16 tensor (bf16 moments) lands on the same values here.
    assert_eq!(
        values(&bf[0]),
        vec![0.400390625, -0.8984375, 1.8984375, 3.09375]
    );
}

#[test]
fn adamw_rejects_mismatches_without_touching_anything() {
    let hp = AdamW::default();
    let mut params = vec![f32s(&[1.0, 2.0], &[2]), f32s(&[3.0], &[1])];
    let mut state = AdamWState::new(&params).expect("state");
    let err = state.step(&hp, &mut params, &[f32s(&[1.0, 1.0], &[2])], 0.1);
    assert!(
        matches!(
            err,
            Err(OptimError::LengthMismatch {
                expected: 2,
                got: 1,
                ..
            })
        ),
        "{err:?}"
    );
    let grads = [f32s(&[1.0, 1.0], &[2]), f32s(&[1.0, 1.0], &[2])];
    let err = state.step(&hp, &mut params, &grads, 0.1);
    assert!(
        matches!(err, Err(OptimError::ShapeMismatch { idx: 1, .. })),
        "{err:?}"
    );
    let bad = AdamW { beta2: 1.0, ..hp };
    let grads = [f32s(&[1.0, 1.0], &[2]), f32s(&[1.0], &[1])];
    assert!(matches!(
        state.step(&bad, &mut params, &grads, 0.1),
        Err(OptimError::Invalid(_))
    ));
    assert!(matches!(
        state.step(&hp, &mut params, &grads, f64::NAN),
        Err(OptimError::Invalid(_))
    ));
    assert_eq!(values(&params[0]), vec![1.0, 2.0]);
    assert_eq!(values(&params[1]), vec![3.0]);
    assert_eq!(state.steps, 0);
    assert_eq!(values(&state.exp_avg[0]), vec![0.0, 0.0]);
}

#[test]
fn clip_scales_by_the_global_norm_like_torch() {
    let a = [3.0f32, -4.0, 1.0, 2.0];
    let c = [12.0f32, -0.5, 0.25];
    let mut grads = vec![f32s(&a, &[2, 2]), f32s(&c, &[3])];
    let norm = clip_grad_norm(&mut grads, &[NormShare::Counted; 2], 5.0, &SoloComm).expect("clip");
    let direct: f64 = a
        .iter()
        .chain(&c)
        .map(|&x| f64::from(x).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!((norm - direct).abs() < 1e-12, "{norm} vs {direct}");
    // torch.nn.utils.clip_grad_norm_([a, c], 5.0).
    assert!((norm - 1.320274639e+01).abs() < 1e-6);
    let want_a = [
        1.136127234e+00,
        -1.514836311e+00,
        3.787090778e-01,
        7.574181557e-01,
    ];
    let want_c = [4.544508934e+00, -1.893545389e-01, 9.467726946e-02];
    assert_close("a", &values(&grads[0]), &want_a, 1e-6);
    assert_close("c", &values(&grads[1]), &want_c, 1e-6);
}

#[test]
fn clip_counts_replicas_once_and_leaves_small_grads_alone() {
    // A replica is scaled but not counted: the norm is that of the first grad.
    let mut grads = vec![f32s(&[3.0, 4.0], &[2]), f32s(&[100.0], &[1])];
    let shares = [NormShare::Counted, NormShare::Replica];
    let norm = clip_grad_norm(&mut grads, &shares, 1.0, &SoloComm).expect("clip");
    assert!((norm - 5.0).abs() < 1e-12);
    let coef = 1.0 / (5.0 + 1e-6);
    assert_close(
        "counted",
        &values(&grads[0]),
        &[3.0 * coef, 4.0 * coef],
        1e-6,
    );
    assert_close("replica", &values(&grads[1]), &[100.0 * coef], 1e-6);
    // Below max_norm nothing changes.
    let mut grads = vec![f32s(&[0.3, 0.4], &[2])];
    let norm = clip_grad_norm(&mut grads, &[NormShare::Counted], 1.0, &SoloComm).expect("clip");
    assert!((norm - 0.5).abs() < 1e-7);
    assert_eq!(values(&grads[0]), values(&f32s(&[0.3, 0.4], &[2])));
}

#[test]
fn clip_refuses_non_finite_norms_and_bad_arguments() {
    let mut grads = vec![f32s(&[f32::INFINITY, 1.0], &[2]), f32s(&[2.0], &[1])];
    let shares = [NormShare::Counted; 2];
    let err = clip_grad_norm(&mut grads, &shares, 1.0, &SoloComm);
    assert!(matches!(err, Err(OptimError::NonFiniteNorm(_))), "{err:?}");
    assert_eq!(values(&grads[1]), vec![2.0]);
    let err = clip_grad_norm(&mut grads, &shares[..1], 1.0, &SoloComm);
    assert!(
        matches!(err, Err(OptimError::LengthMismatch { .. })),
        "{err:?}"
    );
    let err = clip_grad_norm(&mut grads, &shares, 0.0, &SoloComm);
    assert!(matches!(err, Err(OptimError::Invalid(_))), "{err:?}");
}
