//! The built-in annotation files against a realistic small model
//! (llama-mini: batch 2, sequence 16, hidden 64, 4 heads of 16, 2 kv heads,
//! ffn 176, vocab 256), and the custom-op example file.

#![allow(clippy::unwrap_used)] // a panic is how a test fails

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use autopart::anno::{
    Annotation, Binding, Layout, PartitionError, Registry, builtin_registry, partition,
};
use expect_test::expect;

const B: u64 = 2;
const L: u64 = 16;
const HIDDEN: u64 = 64;
const HEADS: u64 = 4;
const HEAD_DIM: u64 = 16;
const KV_HEADS: u64 = 2;
const FFN: u64 = 176;
const VOCAB: u64 = 256;
const MAX_POS: u64 = 128;

/// One call of a built-in op with llama-mini shapes.
struct Call {
    op: &'static str,
    inputs: Vec<Vec<u64>>,
    attrs: Vec<(&'static str, i64)>,
    output: Vec<u64>,
    flops: f64,
}

fn calls() -> Vec<Call> {
    let x = vec![B, L, HIDDEN];
    let heads = vec![B, L, HEADS, HEAD_DIM];
    let kv = vec![B, L, KV_HEADS, HEAD_DIM];
    let ffn = vec![B, L, FFN];
    let (b, l, d, f, n) = (B as f64, L as f64, HIDDEN as f64, FFN as f64, VOCAB as f64);
    let (h, hd, g) = (HEADS as f64, HEAD_DIM as f64, KV_HEADS as f64);
    let call = |op, inputs, attrs, output, flops| Call {
        op,
        inputs,
        attrs,
        output,
        flops,
    };
    vec![
        call(
            "embedding",
            vec![vec![B, L], vec![VOCAB, HIDDEN]],
            vec![],
            x.clone(),
            b * l * d,
        ),
        call(
            "pos_embedding",
            vec![vec![B, L], vec![MAX_POS, HIDDEN]],
            vec![],
            x.clone(),
            b * l * d,
        ),
        call(
            "linear",
            vec![x.clone(), vec![VOCAB, HIDDEN]],
            vec![],
            vec![B, L, VOCAB],
            2.0 * b * l * d * n,
        ),
        call(
            "linear_bias",
            vec![x.clone(), vec![FFN, HIDDEN], vec![FFN]],
            vec![],
            ffn.clone(),
            2.0 * b * l * d * f + b * l * f,
        ),
        call(
            "rms_norm",
            vec![x.clone(), vec![HIDDEN]],
            vec![],
            x.clone(),
            4.0 * b * l * d,
        ),
        call(
            "layer_norm",
            vec![x.clone(), vec![HIDDEN], vec![HIDDEN]],
            vec![],
            x.clone(),
            8.0 * b * l * d,
        ),
        call(
            "split_heads",
            vec![x.clone()],
            vec![("h", HEADS as i64)],
            heads.clone(),
            0.0,
        ),
        call("merge_heads", vec![heads.clone()], vec![], x.clone(), 0.0),
        call(
            "rope",
            vec![heads.clone()],
            vec![],
            heads.clone(),
            6.0 * b * l * h * hd,
        ),
        call(
            "attention",
            vec![heads.clone(), kv.clone(), kv],
            vec![
                ("g", KV_HEADS as i64),
                ("r", (HEADS / KV_HEADS) as i64),
                ("causal", 1),
            ],
            heads,
            4.0 * b * l * l * g * (h / g) * hd,
        ),
        call("add", vec![x.clone(), x.clone()], vec![], x, b * l * d),
        call(
            "swiglu",
            vec![ffn.clone(), ffn.clone()],
            vec![],
            ffn.clone(),
            4.0 * b * l * f,
        ),
        call("gelu", vec![ffn.clone()], vec![], ffn, 8.0 * b * l * f),
        call(
            "cross_entropy",
            vec![vec![B, L, VOCAB], vec![B, L]],
            vec![],
            vec![B, L],
            4.0 * b * l * n,
        ),
        call("mean", vec![vec![B, L]], vec![], vec![], b * l),
    ]
}

fn attrs(call: &Call) -> BTreeMap<String, i64> {
    call.attrs
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect()
}

/// Resolves and binds a call; checks the inferred output and the FLOPs.
fn bind(registry: &Registry, call: &Call) -> (Annotation, Binding) {
    let ranks: Vec<Option<usize>> = call.inputs.iter().map(|s| Some(s.len())).collect();
    let anno = registry
        .resolve(call.op, &ranks)
        .unwrap_or_else(|e| panic!("{e}"))
        .clone();
    let inputs: Vec<Option<&[u64]>> = call.inputs.iter().map(|s| Some(s.as_slice())).collect();
    let attrs = attrs(call);
    let binding = anno
        .bind(&inputs, &[], &attrs)
        .unwrap_or_else(|e| panic!("{}: {e}", call.op));
    // The actual output fits too (mean's scalar output matches its `1`).
    let with_output = anno.bind(&inputs, &[Some(&call.output)], &attrs);
    assert_eq!(with_output.as_ref(), Ok(&binding), "{}", call.op);
    let expected_output = if call.output.is_empty() {
        vec![1]
    } else {
        call.output.clone()
    };
    assert_eq!(
        anno.output_shapes(&binding).unwrap(),
        vec![Some(expected_output)],
        "{}",
        call.op
    );
    let sig = registry.get(call.op).unwrap();
    assert_eq!(
        sig.flops.eval(&binding, &attrs).unwrap(),
        Some(call.flops),
        "flops of {}",
        call.op
    );
    (anno, binding)
}

#[test]
fn every_builtin_op_binds_llama_mini_and_counts_flops() {
    let registry = builtin_registry();
    let calls = calls();
    let covered: Vec<&str> = calls.iter().map(|c| c.op).collect();
    for (name, _, _) in registry.iter() {
        assert!(covered.contains(&name), "no llama-mini call for {name}");
    }
    for call in &calls {
        let (anno, binding) = bind(&registry, call);
        // Every splittable id splits in two (llama-mini sizes are even), and
        // every other id is refused.
        let splittable = anno.splittable_ids();
        for (id, _) in anno.ids() {
            let rule = partition(&anno, &binding, id, 2);
            assert_eq!(
                rule.is_ok(),
                splittable.contains(&id),
                "{} {id}: {rule:?}",
                call.op
            );
        }
    }
}

fn rules(op: &str) -> BTreeMap<String, String> {
    let registry = builtin_registry();
    let calls = calls();
    let call = calls.iter().find(|c| c.op == op).unwrap();
    let (anno, binding) = bind(&registry, call);
    anno.ids()
        .into_iter()
        .map(|(id, _)| {
            let rule = match partition(&anno, &binding, id, 2) {
                Ok(r) => format!("{} -> {}", join(&r.inputs), join(&r.outputs)),
                Err(e) => format!("error: {e}"),
            };
            (id.to_string(), rule)
        })
        .collect()
}

fn join(layouts: &[Layout]) -> String {
    layouts
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn expect_rules(op: &str, expected: &[(&str, &str)]) {
    let expected: BTreeMap<String, String> = expected
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(rules(op), expected, "rules of {op}");
}

#[test]
fn linear_rules() {
    // x (b l k), W (n k) -> y (b l n)
    expect_rules(
        "linear",
        &[
            ("b", "D(0), R -> D(0)"),
            ("l", "D(1), R -> D(1)"),
            ("k", "D(2), D(1) -> V"),
            ("n", "R, D(0) -> D(2)"),
        ],
    );
}

#[test]
fn embedding_rules() {
    // ids (b l), table (n e) -> (b l e); vocab-parallel gives partial sums.
    expect_rules(
        "embedding",
        &[
            ("b", "D(0), R -> D(0)"),
            ("l", "D(1), R -> D(1)"),
            ("n", "R, D(0) -> V"),
            ("e", "R, D(1) -> D(2)"),
        ],
    );
}

#[test]
fn attention_rules() {
    // q (b l (g r) d), k and v (b s g d): batch or kv-group (head) parallel.
    expect_rules(
        "attention",
        &[
            ("b", "D(0), D(0), D(0) -> D(0)"),
            ("g", "D(2), D(2), D(2) -> D(2)"),
            (
                "r",
                "error: 'r' is not the first factor of group '(g r)' (input 0 dim 2) and may not be split",
            ),
            ("l", "error: 'l' is frozen (^) and may not be split"),
            ("s", "error: 's' is frozen (^) and may not be split"),
            ("d", "error: 'd' is frozen (^) and may not be split"),
        ],
    );
}

#[test]
fn mean_rules() {
    // A split b or l leaves partial sums of the scalar loss.
    expect_rules("mean", &[("b", "D(0) -> V"), ("l", "D(1) -> V")]);
}

#[test]
fn head_reshape_rules() {
    expect_rules(
        "split_heads",
        &[
            ("b", "D(0) -> D(0)"),
            ("l", "D(1) -> D(1)"),
            ("h", "D(2) -> D(2)"),
            (
                "d",
                "error: 'd' is not the first factor of group '(h d)' (input 0 dim 2) and may not be split",
            ),
        ],
    );
}

#[test]
fn indivisible_splits_are_refused() {
    let registry = builtin_registry();
    let calls = calls();
    let call = calls.iter().find(|c| c.op == "attention").unwrap();
    let (anno, binding) = bind(&registry, call);
    assert_eq!(
        partition(&anno, &binding, "g", 4),
        Err(PartitionError::Indivisible {
            id: "g".into(),
            size: 2,
            parts: 4
        })
    );
    let call = calls.iter().find(|c| c.op == "linear_bias").unwrap();
    let (anno, binding) = bind(&registry, call);
    // ffn 176 = 16 * 11: splits in 8 or 16, not in 32.
    assert!(partition(&anno, &binding, "n", 16).is_ok());
    assert_eq!(
        partition(&anno, &binding, "n", 32).unwrap_err().to_string(),
        "'n' has size 176, which is not divisible into 32 parts"
    );
}

/// Every built-in op with its annotation, FLOPs and the rules of splitting
/// each identifier in two, for llama-mini. Update with `UPDATE_EXPECT=1`.
#[test]
fn builtin_rules_snapshot() {
    let registry = builtin_registry();
    let mut out = String::new();
    for call in calls() {
        let sig = registry.get(call.op).unwrap();
        let (anno, _) = bind(&registry, &call);
        writeln!(out, "{} [{}] flops {}", call.op, anno, call.flops).unwrap();
        for (id, rule) in rules(call.op) {
            writeln!(out, "  {id}: {rule}").unwrap();
        }
        assert!(
            sig.implementation.is_none(),
            "built-in ops need no implementation"
        );
    }
    expect![[r#"
        embedding [b l, n+ e -> b l e] flops 2048
          b: D(0), R -> D(0)
          e: R, D(1) -> D(2)
          l: D(1), R -> D(1)
          n: R, D(0) -> V
        pos_embedding [b l, p^ e -> b l e] flops 2048
          b: D(0), R -> D(0)
          e: R, D(1) -> D(2)
          l: D(1), R -> D(1)
          p: error: 'p' is frozen (^) and may not be split
        linear [b l k+, n k+ -> b l n] flops 1048576
          b: D(0), R -> D(0)
          k: D(2), D(1) -> V
          l: D(1), R -> D(1)
          n: R, D(0) -> D(2)
        linear_bias [b l k^, n k^, n -> b l n] flops 726528
          b: D(0), R, R -> D(0)
          k: error: 'k' is frozen (^) and may not be split
          l: D(1), R, R -> D(1)
          n: R, D(0), D(0) -> D(2)
        rms_norm [b l d^, d^ -> b l d^] flops 8192
          b: D(0), R -> D(0)
          d: error: 'd' is frozen (^) and may not be split
          l: D(1), R -> D(1)
        layer_norm [b l d^, d^, d^ -> b l d^] flops 16384
          b: D(0), R, R -> D(0)
          d: error: 'd' is frozen (^) and may not be split
          l: D(1), R, R -> D(1)
        split_heads [b l (h d) -> b l h d] flops 0
          b: D(0) -> D(0)
          d: error: 'd' is not the first factor of group '(h d)' (input 0 dim 2) and may not be split
          h: D(2) -> D(2)
          l: D(1) -> D(1)
        merge_heads [b l h d -> b l (h d)] flops 0
          b: D(0) -> D(0)
          d: error: 'd' is not the first factor of group '(h d)' (output 0 dim 2) and may not be split
          h: D(2) -> D(2)
          l: D(1) -> D(1)
        rope [b l h d^ -> b l h d^] flops 12288
          b: D(0) -> D(0)
          d: error: 'd' is frozen (^) and may not be split
          h: D(2) -> D(2)
          l: D(1) -> D(1)
        attention [b l^ (g r) d^, b s^ g d^, b s^ g d^ -> b l^ (g r) d^] flops 131072
          b: D(0), D(0), D(0) -> D(0)
          d: error: 'd' is frozen (^) and may not be split
          g: D(2), D(2), D(2) -> D(2)
          l: error: 'l' is frozen (^) and may not be split
          r: error: 'r' is not the first factor of group '(g r)' (input 0 dim 2) and may not be split
          s: error: 's' is frozen (^) and may not be split
        add [b l d, b l d -> b l d] flops 2048
          b: D(0), D(0) -> D(0)
          d: D(2), D(2) -> D(2)
          l: D(1), D(1) -> D(1)
        swiglu [b l f, b l f -> b l f] flops 22528
          b: D(0), D(0) -> D(0)
          f: D(2), D(2) -> D(2)
          l: D(1), D(1) -> D(1)
        gelu [b l f -> b l f] flops 45056
          b: D(0) -> D(0)
          f: D(2) -> D(2)
          l: D(1) -> D(1)
        cross_entropy [b l n^, b l -> b l] flops 32768
          b: D(0), D(0) -> D(0)
          l: D(1), D(1) -> D(1)
          n: error: 'n' is frozen (^) and may not be split
        mean [b+ l+ -> 1] flops 32
          b: D(0) -> V
          l: D(1) -> V
    "#]]
    .assert_eq(&out);
}

fn example_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../annotations/examples/chunked_ce.ron")
}

#[test]
fn custom_op_example_loads_beside_the_builtins() {
    let mut registry = builtin_registry();
    let before = registry.len();
    registry.load_file(example_file()).unwrap();
    assert_eq!(registry.len(), before + 1);
    let sig = registry.get("chunked_ce").unwrap();
    let imp = sig.implementation.as_ref().unwrap();
    assert_eq!(imp.crate_name, "chunked_ce");
    assert_eq!(imp.path, "chunked_ce::chunked_linear_cross_entropy");
    assert_eq!(imp.crate_path.as_deref(), Some("../../examples/chunked_ce"));
    assert!(
        registry
            .source("chunked_ce")
            .unwrap()
            .file
            .ends_with("chunked_ce.ron")
    );

    let hidden = [B, L, HIDDEN];
    let weight = [VOCAB, HIDDEN];
    let labels = [B, L];
    let anno = registry
        .resolve("chunked_ce", &[Some(3), Some(2), Some(2)])
        .unwrap();
    assert_eq!(anno.to_string(), "b l d^, n^ d^, b l -> b l");
    let attrs = BTreeMap::from([("chunk".to_string(), 4)]);
    let binding = anno
        .bind(&[Some(&hidden), Some(&weight), Some(&labels)], &[], &attrs)
        .unwrap();
    assert_eq!(
        anno.output_shapes(&binding).unwrap(),
        vec![Some(vec![B, L])]
    );
    let (b, l, d, n) = (B as f64, L as f64, HIDDEN as f64, VOCAB as f64);
    assert_eq!(
        sig.flops.eval(&binding, &attrs).unwrap(),
        Some(2.0 * b * l * d * n + 4.0 * b * l * n)
    );
    let rule = |id| partition(anno, &binding, id, 2).map(|r| r.to_string());
    assert_eq!(rule("b"), Ok("b/2: D(0), R, D(0) -> D(0)".to_string()));
    assert_eq!(rule("l"), Ok("l/2: D(1), R, D(1) -> D(1)".to_string()));
    assert!(rule("n").is_err() && rule("d").is_err());

    // Loading it twice names both places.
    let e = registry.load_file(example_file()).unwrap_err().to_string();
    assert!(
        e.contains("op 'chunked_ce' is already registered by")
            && e.matches("chunked_ce.ron:").count() == 2,
        "{e}"
    );
}
