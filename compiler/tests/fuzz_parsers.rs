//! Fuzz tests of every user-facing parser of the compiler, thousands of
//! generated inputs each: arbitrary text, and mutations of real files (bytes
//! flipped, inserted, deleted, cut; tokens of the format spliced in; spans
//! copied; numbers replaced by zero, negative, huge and non-finite values).
//! Each parser must return `Ok` or `Err` and never panic, and what it
//! accepts must go through what consumes it downstream (binding, tracing,
//! validation, search, lowering) without a panic either. A crash found here
//! is fixed in the source and kept as a named regression test at the end of
//! this file. docs/fuzzing.md lists the inputs and their case counts;
//! `PROPTEST_CASES=N` runs N cases of each test instead.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use autopart::anno::{
    Annotation, Dim, Factor, Formula, Registry, Shape, builtin_registry, parse_annotation,
    partition,
};
use autopart::cost::{
    Cluster, Collective, ComputeKind, Group, LinkLevel, collective_time, compute_time, mesh_groups,
};
use autopart::driver::{self, Pass, Quiet, Request};
use autopart::ir::{DType as GraphDType, Graph};
use autopart::plan::{
    DType, Plan, parse_plan, plan_to_ron, render_alternatives, render_report, render_summary,
    validate_plan,
};
use autopart::search::{Constraints, check_tp};
use autopart::trace::{ModelConfig, TraceOptions, preset, trace_model};
use proptest::prelude::*;
use proptest::sample::{Index, select};

// ============================================================================
// Shared machinery

/// `default` cases, or `PROPTEST_CASES` when it is set.
fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        // A failure prints its minimal input; it becomes a named test below.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A temporary folder, in memory where the machine has /dev/shm (the
/// compile driver fsyncs what it writes).
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = tempfile::Builder::new().prefix("fuzz").tempdir_in(shm) {
            return dir;
        }
    }
    tempfile::tempdir().expect("temp dir")
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_path_buf()
}

fn read(rel: &str) -> String {
    let path = repo().join(rel);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Numbers a damaged file may hold in place of another.
const NUMBERS: &[&str] = &[
    "0",
    "1",
    "-1",
    "2",
    "3",
    "7",
    "64",
    "255",
    "65536",
    "2147483648",
    "4294967295",
    "4294967296",
    "9007199254740993",
    "9223372036854775807",
    "9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",
    "340282366920938463463374607431768211456",
    "-9223372036854775808",
    "-4294967296",
    "1e308",
    "1e309",
    "-1e308",
    "1e-320",
    "0.0",
    "-0.0",
    "0.5",
    "NaN",
    "inf",
    "-inf",
    "1e3",
    "0x10",
    "1_000",
    "00",
];

/// Tokens of RON files.
const RON_TOKENS: &[&str] = &[
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    ",",
    ":",
    "\"",
    "'",
    "Some(",
    "None",
    "r#\"",
    "\"#",
    "/*",
    "*/",
    "//",
    "\\",
    "\\u{",
    "\\u{}",
    "\\x",
    "\\\n",
    "\n",
    "b\"",
    "#![enable(implicit_some)]",
    "true",
    "-",
    ".",
    "e",
    "inf",
    "NaN",
    "é",
    "\u{0}",
    "\u{feff}",
    "🦀",
    "name: ",
    "()",
    "[]",
];

/// Tokens of JSON files.
const JSON_TOKENS: &[&str] = &[
    "{", "}", "[", "]", ",", ":", "\"", "\\", "\\u", "\\ud800", "null", "true", "false", "[]",
    "{}", "-", "e", ".", "1e999", "\u{0}", "\u{feff}", "é",
];

/// Tokens of annotations and formulas.
const ANNO_TOKENS: &[&str] = &[
    "->",
    ",",
    "(",
    ")",
    "*",
    "?",
    "+",
    "^",
    "-",
    " ",
    "\n",
    "1",
    "0",
    "b",
    "k+",
    "n^",
    "(h d)",
    "99999999999999999999",
    "é",
    "\u{0}",
    "/",
    ".",
    "e",
];

/// Tokens of CSV files.
const CSV_TOKENS: &[&str] = &[
    ",", "\"", "\n", "\r\n", " ", "gpt", "llama", "yes", "no", "full",
];

#[derive(Clone, Debug)]
enum Mutation {
    Flip(Index, u8),
    Insert(Index, Vec<u8>),
    Delete(Index, usize),
    Truncate(Index),
    /// Replaces the n-th number of the text.
    Number(Index, String),
    Copy {
        from: Index,
        len: usize,
        to: Index,
    },
}

fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => select(NUMBERS).prop_map(str::to_string),
        1 => any::<u64>().prop_map(|v| v.to_string()),
        1 => any::<i64>().prop_map(|v| v.to_string()),
        1 => any::<f64>().prop_map(|v| format!("{v:e}")),
        2 => (0u64..20).prop_map(|v| v.to_string()),
    ]
}

fn mutation(tokens: &'static [&'static str]) -> impl Strategy<Value = Mutation> {
    let bytes = prop_oneof![
        3 => select(tokens).prop_map(|t| t.as_bytes().to_vec()),
        1 => prop::collection::vec(any::<u8>(), 1..4),
    ];
    prop_oneof![
        2 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        3 => (any::<Index>(), bytes).prop_map(|(i, b)| Mutation::Insert(i, b)),
        2 => (any::<Index>(), 1usize..16).prop_map(|(i, n)| Mutation::Delete(i, n)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        6 => (any::<Index>(), number()).prop_map(|(i, v)| Mutation::Number(i, v)),
        1 => (any::<Index>(), 1usize..64, any::<Index>())
            .prop_map(|(from, len, to)| Mutation::Copy { from, len, to }),
    ]
}

fn mutations(tokens: &'static [&'static str]) -> impl Strategy<Value = Vec<Mutation>> {
    // Mostly one or two: more rarely leave a file its parser gets past.
    prop_oneof![
        3 => prop::collection::vec(mutation(tokens), 1..3),
        1 => prop::collection::vec(mutation(tokens), 3..8),
    ]
}

/// The byte spans of the numbers of `b`: an optional `-`, digits, an
/// optional fraction and exponent, not inside a word.
fn numbers(b: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let word_before = i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_');
        if b[i].is_ascii_digit() && !word_before {
            let start = if i > 0 && b[i - 1] == b'-' { i - 1 } else { i };
            let mut j = i;
            while j < b.len() && (b[j].is_ascii_digit() || b[j] == b'.' || b[j] == b'_') {
                j += 1;
            }
            if j < b.len() && (b[j] == b'e' || b[j] == b'E') {
                let mut k = j + 1;
                if k < b.len() && (b[k] == b'+' || b[k] == b'-') {
                    k += 1;
                }
                if k < b.len() && b[k].is_ascii_digit() {
                    j = k;
                    while j < b.len() && b[j].is_ascii_digit() {
                        j += 1;
                    }
                }
            }
            out.push((start, j));
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

fn mutate_bytes(seed: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for m in mutations {
        match m {
            Mutation::Flip(i, bit) => {
                if !b.is_empty() {
                    let k = i.index(b.len());
                    b[k] ^= 1 << bit;
                }
            }
            Mutation::Insert(i, bytes) => {
                let k = i.index(b.len() + 1);
                b.splice(k..k, bytes.iter().copied());
            }
            Mutation::Delete(i, n) => {
                if !b.is_empty() {
                    let k = i.index(b.len());
                    let end = (k + n).min(b.len());
                    b.drain(k..end);
                }
            }
            Mutation::Truncate(i) => {
                let k = i.index(b.len() + 1);
                b.truncate(k);
            }
            Mutation::Number(i, value) => {
                let spans = numbers(&b);
                if !spans.is_empty() {
                    let (s, e) = spans[i.index(spans.len())];
                    b.splice(s..e, value.bytes());
                }
            }
            Mutation::Copy { from, len, to } => {
                if !b.is_empty() {
                    let s = from.index(b.len());
                    let chunk = b[s..(s + len).min(b.len())].to_vec();
                    let t = to.index(b.len() + 1);
                    b.splice(t..t, chunk);
                }
            }
        }
    }
    b
}

/// `seed` mutated, as text (invalid UTF-8 replaced: the parsers take `&str`).
fn mutate(seed: &str, mutations: &[Mutation]) -> String {
    String::from_utf8_lossy(&mutate_bytes(seed.as_bytes(), mutations)).into_owned()
}

/// A seed and its mutations.
fn mutated(
    seeds: Vec<String>,
    tokens: &'static [&'static str],
) -> impl Strategy<Value = (usize, String)> {
    let n = seeds.len();
    (0..n, mutations(tokens)).prop_map(move |(i, m)| (i, mutate(&seeds[i], &m)))
}

/// A small deterministic generator for choices made downstream of a case.
#[derive(Clone, Debug)]
struct Pick(u64);

impl Pick {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn of<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

fn pick() -> impl Strategy<Value = Pick> {
    any::<u64>().prop_map(|s| Pick(s | 1))
}

/// Runs the `autopart` binary with a time limit; returns its exit code and
/// stderr. A crash (panic, signal) or a hang fails the test.
fn run_autopart(args: &[String], dir: &Path) -> (i32, String) {
    let err_path = dir.join("stderr.txt");
    let err = fs::File::create(&err_path).expect("stderr file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_autopart"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .env("RUST_BACKTRACE", "0")
        .spawn()
        .expect("the binary starts");
    let limit = Duration::from_secs(60);
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("autopart {args:?} ran over {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let stderr = fs::read_to_string(&err_path).unwrap_or_default();
    let code = status
        .code()
        .unwrap_or_else(|| panic!("autopart {args:?} died of a signal ({status}): {stderr}"));
    assert!(
        matches!(code, 0..=2) && !stderr.contains("panicked"),
        "autopart {args:?} exited {code}:\n{stderr}"
    );
    (code, stderr)
}

// ============================================================================
// Downstream checks shared by several parsers

/// Binds `a` to shapes (consistent ones from `pick`, then arbitrary ones),
/// infers its outputs and partitions it along each identifier.
fn exercise_annotation(a: &Annotation, p: &mut Pick) {
    const SIZES: &[u64] = &[1, 2, 3, 4, 6, 8, 64, 0, u64::MAX, 1 << 32];
    let _ = a.ids();
    let _ = a.splittable_ids();
    let stars = p.below(3);
    let mut sizes: BTreeMap<String, u64> = BTreeMap::new();
    let mut factor = |f: &Factor, p: &mut Pick| match f {
        Factor::Named { name, .. } => *sizes
            .entry(name.clone())
            .or_insert_with(|| p.of(&SIZES[..7])),
        Factor::Number(n) => *n,
        Factor::Anon => p.of(SIZES),
    };
    let mut consistent: Vec<Option<Vec<u64>>> = Vec::new();
    for shape in &a.inputs {
        consistent.push(match shape {
            Shape::Opaque => None,
            Shape::Tensor(dims) => {
                let mut out = Vec::new();
                for d in dims {
                    match d {
                        Dim::Star => {
                            for _ in 0..stars {
                                out.push(p.of(SIZES));
                            }
                        }
                        Dim::Single(f) => out.push(factor(f, p)),
                        Dim::Group(fs) => {
                            let mut prod = 1u64;
                            for f in fs {
                                prod = prod.saturating_mul(factor(f, p));
                            }
                            out.push(prod);
                        }
                    }
                }
                Some(out)
            }
        });
    }
    let arbitrary: Vec<Option<Vec<u64>>> = a
        .inputs
        .iter()
        .map(|s| match s {
            Shape::Opaque if p.below(4) > 0 => None,
            _ => Some((0..p.below(5)).map(|_| p.of(SIZES)).collect()),
        })
        .collect();
    let ids: Vec<String> = a.ids().iter().map(|(n, _)| n.to_string()).collect();
    let mut attrs: BTreeMap<String, i64> = BTreeMap::new();
    for id in &ids {
        if p.below(4) == 0 {
            attrs.insert(id.clone(), p.of(&[0i64, 1, 2, -1, i64::MIN, i64::MAX]));
        }
    }
    for shapes in [consistent, arbitrary] {
        let ranks: Vec<Option<usize>> = shapes.iter().map(|s| s.as_ref().map(Vec::len)).collect();
        let _ = a.matches_ranks(&ranks);
        let refs: Vec<Option<&[u64]>> = shapes.iter().map(|s| s.as_deref()).collect();
        let Ok(binding) = a.bind(&refs, &[], &attrs) else {
            continue;
        };
        let _ = binding.star_sizes();
        if let Ok(outs) = a.output_shapes(&binding) {
            let out_refs: Vec<Option<&[u64]>> = outs.iter().map(|s| s.as_deref()).collect();
            let _ = a.bind(&refs, &out_refs, &attrs);
        }
        for id in ids.iter().map(String::as_str).chain(["?", "*", "1", "zz"]) {
            for parts in [0, 1, 2, 3, 4, u64::MAX] {
                if let Ok(rule) = partition(a, &binding, id, parts) {
                    let _ = rule.to_string();
                }
            }
        }
    }
}

/// The training graph of `model` traced and summarised (layers capped at
/// four: a layer's ops do not depend on how many there are, and a million
/// layers would only take long).
fn exercise_model(model: &ModelConfig, registry: &Registry, p: &mut Pick) {
    let _ = model.validate();
    let _ = model.default_seq_len();
    for tp in [0, 1, 2, 3, 8, u32::MAX] {
        let _ = check_tp(model, tp);
    }
    let mut model = model.clone();
    match &mut model {
        ModelConfig::Llama(c) if c.n_layers > 4 => c.n_layers = 1 + c.n_layers % 4,
        ModelConfig::Gpt(c) if c.n_layers > 4 => c.n_layers = 1 + c.n_layers % 4,
        _ => {}
    }
    let batch = p.of(&[1, 1, 2, 3, 0, u64::MAX, 1 << 33]);
    let seq = p.of(&[
        None,
        None,
        Some(16),
        Some(1),
        Some(0),
        Some(u64::MAX),
        Some(1 << 40),
    ]);
    let dtype = p.of(&[DType::Bf16, DType::Fp16, DType::Fp32]);
    if let Ok(traced) = driver::trace_at(&model, registry, batch, seq, dtype) {
        let _ = traced.to_string();
        let _ = traced.graph.n_params();
    }
}

/// Every function of the cost model a cluster's figures flow into.
fn exercise_cluster(c: &Cluster) {
    let _ = c.to_string();
    let _ = c.usable_memory_bytes();
    let _ = c.link(LinkLevel::IntraNode);
    let _ = c.link(LinkLevel::InterNode);
    let text = c.to_ron_string().expect("a cluster writes as RON");
    let back = Cluster::from_ron_str(&text, "written.ron").expect("a valid cluster reads back");
    assert_eq!(&back, c, "a cluster reads back as written");
    for sizes in [[1, 1, 1], [2, 4, 1], [8, 2, 2], [3, 5, 7], [u32::MAX, 2, 1]] {
        for g in mesh_groups(c, &sizes) {
            for col in [
                Collective::AllReduce,
                Collective::AllGather,
                Collective::ReduceScatter,
                Collective::AllToAll,
                Collective::Broadcast,
                Collective::SendRecv,
            ] {
                for bytes in [0.0, 1.0, 1e9, 1e300] {
                    let _ = collective_time(c, col, &g, bytes);
                }
            }
        }
    }
    for g in [Group::within_node(0), Group::within_node(u32::MAX)]
        .into_iter()
        .chain(Group::across_nodes(u32::MAX, 3))
        .chain(Group::across_nodes(16, 4))
    {
        let _ = collective_time(c, Collective::AllReduce, &g, 1e6);
    }
    for kind in [
        ComputeKind::Matmul,
        ComputeKind::MemoryBound,
        ComputeKind::Attention,
    ] {
        for dtype in [
            GraphDType::Bf16,
            GraphDType::F16,
            GraphDType::F32,
            GraphDType::I64,
        ] {
            let _ = compute_time(c, 1e12, 1e9, kind, dtype);
        }
    }
}

/// A model the search solves without z3 (one attention head: only tp = 1
/// is legal), so that a case takes milliseconds: `config.json` in a folder
/// kept for the whole run.
fn tiny_model() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let dir = scratch();
        fs::write(
            dir.path().join("config.json"),
            r#"{"model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
                "num_hidden_layers": 8, "num_attention_heads": 1, "num_key_value_heads": 1,
                "vocab_size": 64, "max_position_embeddings": 64}"#,
        )
        .expect("tiny config");
        dir
    });
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| dir.path().join("config.json"))
}

/// Compiles `req` in process; it must return `Ok` or `Err`, and an error
/// must not be a panic caught on the way (the search's threads).
fn compile(req: &Request) {
    if let Err(e) = driver::compile(req, &mut Quiet) {
        let e = format!("{e:#}");
        assert!(!e.contains("panicked"), "{req:?}: {e}");
    }
}

// ============================================================================
// The annotation language (`anno::parse_annotation`)

fn builtin_annotations() -> Vec<String> {
    let mut out: Vec<String> = builtin_registry()
        .iter()
        .flat_map(|(_, sig, _)| sig.annotations.iter().map(ToString::to_string))
        .collect();
    out.extend(
        [
            "* k+, ?, n (g r^) 64 ? -> * n",
            "b l d^, n^ d^, b l -> b l",
            "b (h d) -> b h d",
            "-> 1",
            "?, b ? -> b, ?",
        ]
        .map(String::from),
    );
    out
}

fn check_annotation_text(src: &str, p: &mut Pick) -> Result<(), TestCaseError> {
    match parse_annotation(src) {
        Ok(a) => {
            let printed = a.to_string();
            let again = parse_annotation(&printed);
            prop_assert_eq!(again.as_ref(), Ok(&a), "{}", printed);
            exercise_annotation(&a, p);
        }
        Err(e) => {
            prop_assert!(e.line >= 1 && e.col >= 1, "{e:?}");
            prop_assert!(!e.expected.is_empty() && !e.found.is_empty(), "{e:?}");
            let _ = e.to_string();
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(10000))]

    /// Arbitrary text: the annotation alphabet, and any unicode.
    #[test]
    fn annotation_text_never_panics(
        src in prop_oneof![
            3 => "[a-d0-9 ,()*?^+>\\-\n]{0,40}",
            1 => "\\PC{0,24}",
            1 => any::<String>(),
        ],
        mut p in pick(),
    ) {
        check_annotation_text(&src, &mut p)?;
    }

    /// The built-in annotations mutated.
    #[test]
    fn annotation_mutations_never_panic(
        (_, src) in mutated(builtin_annotations(), ANNO_TOKENS),
        mut p in pick(),
    ) {
        check_annotation_text(&src, &mut p)?;
    }
}

// ============================================================================
// Flops formulas (`anno::Formula::parse`, in annotation files)

fn formula_text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-d_0-9 .eE+*/()\\-]{0,40}",
        1 => "\\PC{0,24}",
        1 => (0usize..4096).prop_map(|n| format!("{}a{}", "(".repeat(n), ")".repeat(n))),
        1 => (0usize..4096).prop_map(|n| format!("{}a", "-".repeat(n))),
        1 => (0usize..4096).prop_map(|n| vec!["a"; n + 1].join(" * ")),
    ]
}

proptest! {
    #![proptest_config(cases(10000))]

    /// A formula parses or says where it stops; one that parses evaluates
    /// to a number or an error.
    #[test]
    fn formulas_never_panic(
        src in formula_text(),
        sizes in prop::collection::vec(select(&[0u64, 1, 2, 3, 1 << 40, u64::MAX][..]), 4),
        attr in any::<i64>(),
    ) {
        match Formula::parse(&src) {
            Ok(f) => {
                let _ = f.identifiers();
                prop_assert_eq!(f.source(), src.as_str());
                let a = parse_annotation("a b c d -> a").expect("parses");
                let binding = a.bind(&[Some(&sizes)], &[], &BTreeMap::new()).expect("binds");
                let attrs = BTreeMap::from([("x".to_string(), attr), ("y".to_string(), 0)]);
                let _ = f.eval(&binding, &attrs);
            }
            Err(e) => prop_assert!(e.index <= src.chars().count(), "{e:?}"),
        }
    }
}

// ============================================================================
// Annotation files (`anno::Registry::load_str`, RON)

const BUILTIN_FILES: [&str; 6] = [
    "annotations/attention.ron",
    "annotations/elementwise.ron",
    "annotations/embedding.ron",
    "annotations/linear.ron",
    "annotations/loss.ron",
    "annotations/norm.ron",
];

/// Every construct of the format in one file.
const FULL_ANNOTATION_FILE: &str = r##"// every construct
[
    (
        name: "fused",
        doc: "raw \"quoted\" \u{e9} doc\
              continued",
        annotations: [r#"b l d^, n^ d^, b l -> b l"#, "? -> ?", "* k+, n k+ -> * n"],
        flops: Formula("2 * b * l * d * n / chunk + -1.5e3 * (l - 1)"),
        attrs: [
            (name: "chunk", kind: Int, default: Some("1024")),
            (name: "eps", kind: Float, default: "1e-5"),
            (name: "causal", kind: Bool),
            (name: "mode", kind: Str, default: Some("x")),
        ],
        implementation: Some((crate: "my_ops", path: "my_ops::fused", crate_path: Some("../my_ops"))),
    ),
    /* a block /* nested */ comment */
    (name: "profiled", annotations: ["b (h d) -> b h d"], flops: Profile, attrs: []),
]
"##;

fn annotation_files() -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = BUILTIN_FILES
        .iter()
        .map(|f| (f.to_string(), read(f)))
        .collect();
    files.push((
        "annotations/examples/chunked_ce.ron".into(),
        read("annotations/examples/chunked_ce.ron"),
    ));
    files.push(("full.ron".into(), FULL_ANNOTATION_FILE.into()));
    files
}

/// The graphs of the two small presets, traced with `registry`.
fn trace_minis(registry: &Registry) {
    for name in ["llama-mini", "gpt-mini"] {
        let model = preset(name).expect("preset");
        if let Ok(t) = driver::trace_at(&model, registry, 1, Some(16), DType::Fp32) {
            let _ = t.to_string();
        }
    }
}

fn check_annotation_file(label: &str, src: &str, p: &mut Pick) -> Result<(), TestCaseError> {
    let mut registry = Registry::new();
    if let Err(e) = registry.load_str(src, "fuzz.ron") {
        let _ = e.to_string();
        prop_assert!(registry.is_empty(), "an error registers nothing");
        return Ok(());
    }
    for (name, sig, at) in registry.iter() {
        let _ = at.to_string();
        for a in &sig.annotations {
            let ranks: Vec<Option<usize>> = a
                .inputs
                .iter()
                .map(|s| match s {
                    Shape::Opaque => None,
                    Shape::Tensor(d) => Some(d.iter().filter(|d| !matches!(d, Dim::Star)).count()),
                })
                .collect();
            let _ = registry.resolve(name, &ranks);
            exercise_annotation(a, p);
            let shapes: Vec<Vec<u64>> = ranks
                .iter()
                .map(|r| vec![p.of(&[1u64, 2, 8, 0, u64::MAX]); r.unwrap_or(0)])
                .collect();
            let refs: Vec<Option<&[u64]>> = shapes.iter().map(|s| Some(s.as_slice())).collect();
            if let Ok(b) = a.bind(&refs, &[], &BTreeMap::new()) {
                let attrs: BTreeMap<String, i64> =
                    sig.attrs.iter().map(|x| (x.name.clone(), -3)).collect();
                let _ = sig.flops.eval(&b, &attrs);
            }
        }
    }
    // A built-in file replaced by its mutation: the models must trace or
    // fail cleanly with the broken signatures.
    if BUILTIN_FILES.contains(&label) {
        let mut with = Registry::new();
        for f in BUILTIN_FILES.iter().filter(|f| **f != label) {
            with.load_str(&read(f), f).expect("built-in file");
        }
        if with.load_str(src, label).is_ok() {
            trace_minis(&with);
        }
    }
    Ok(())
}

/// An annotation file generated entry by entry.
fn generated_annotation_file() -> impl Strategy<Value = String> {
    let name = prop_oneof![
        select(&["linear", "x", "my_op", "", " a", "a b", "é", "add"][..]).prop_map(String::from),
        "[a-z_]{1,6}",
    ];
    let anno = prop_oneof![select(builtin_annotations()), "[a-d0-9 ,()*?^+>\\-]{0,20}",];
    let flops = prop_oneof![
        Just("Profile".to_string()),
        formula_text().prop_map(|f| format!("Formula({f:?})")),
        select(
            &[
                "Formula(\"2 * b * l * k * n\")",
                "Formula(\"h * d / chunk\")"
            ][..]
        )
        .prop_map(String::from),
    ];
    let attr = (
        select(&["chunk", "eps", "h", "b", "k", "x", ""][..]),
        select(&["Int", "Float", "Bool", "Str", "Other"][..]),
        prop::option::of(select(
            &[
                "1024",
                "-1",
                "1e-5",
                "1e999",
                "true",
                "x",
                "",
                "9223372036854775808",
            ][..],
        )),
    )
        .prop_map(|(n, k, d)| match d {
            Some(d) => format!("(name: {n:?}, kind: {k}, default: Some({d:?}))"),
            None => format!("(name: {n:?}, kind: {k})"),
        });
    let implementation = prop_oneof![
        Just(String::new()),
        select(&["my_ops::f", "f", "::", "a::1b", "", "a-b::c"][..])
            .prop_map(|p| format!(", implementation: Some((crate: \"c\", path: {p:?}))")),
    ];
    let entry = (
        name,
        prop::collection::vec(anno, 0..3),
        flops,
        prop::collection::vec(attr, 0..3),
        implementation,
    )
        .prop_map(|(name, annos, flops, attrs, imp)| {
            let annos: Vec<String> = annos.iter().map(|a| format!("{a:?}")).collect();
            format!(
                "(name: {name:?}, annotations: [{}], flops: {flops}, attrs: [{}]{imp})",
                annos.join(", "),
                attrs.join(", ")
            )
        });
    prop::collection::vec(entry, 0..4).prop_map(|es| format!("[\n{}\n]", es.join(",\n")))
}

proptest! {
    #![proptest_config(cases(3000))]

    /// The annotation files of the repository mutated.
    #[test]
    fn annotation_file_mutations_never_panic(
        (i, src) in mutated(annotation_files().into_iter().map(|f| f.1).collect(), RON_TOKENS),
        mut p in pick(),
    ) {
        let label = annotation_files()[i].0.clone();
        check_annotation_file(&label, &src, &mut p)?;
    }

    /// Generated files: names, annotations, formulas, attributes and
    /// implementations of every kind, valid and not.
    #[test]
    fn generated_annotation_files_never_panic(
        src in generated_annotation_file(),
        mut p in pick(),
    ) {
        check_annotation_file("generated.ron", &src, &mut p)?;
    }

    /// Arbitrary text as an annotation file.
    #[test]
    fn arbitrary_annotation_files_never_panic(
        src in prop_oneof!["\\PC{0,64}", "[\\[\\](){},:\" a-z0-9]{0,64}"],
        mut p in pick(),
    ) {
        check_annotation_file("arbitrary.ron", &src, &mut p)?;
    }
}

// ============================================================================
// config.json (`trace::ModelConfig::from_hf_str`)

fn config_files() -> Vec<String> {
    vec![
        read("compiler/tests/data/gpt2.config.json"),
        read("compiler/tests/data/llama3-8b.config.json"),
        read("examples/configs/tiny-llama.json"),
        r#"{"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 256, "n_positions": 64}"#.into(),
        r#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 256, "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": true}"#.into(),
    ]
}

/// A JSON value as a config field may hold it.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::{Value, json};
    let pool: Vec<Value> = vec![
        json!(0),
        json!(1),
        json!(2),
        json!(3),
        json!(4),
        json!(8),
        json!(16),
        json!(64),
        json!(-1),
        json!(1u64 << 31),
        json!(1u64 << 32),
        json!((1u64 << 53) + 1),
        json!(1u64 << 63),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(0.5),
        json!(1e-5),
        json!(-1e-5),
        json!(0.0),
        json!(1e308),
        json!("llama"),
        json!("gpt2"),
        json!("bert"),
        json!("64"),
        json!(""),
        json!(null),
        json!(true),
        json!([64]),
        json!({"a": 1}),
    ];
    prop_oneof![
        6 => select(pool),
        1 => any::<u64>().prop_map(Value::from),
        1 => any::<f64>().prop_map(|f| json!(f)),
        4 => (1u64..70).prop_map(Value::from),
    ]
}

/// A config object with most of the fields either family reads, mostly
/// with small valid sizes (so that many trace), else with zero, negative,
/// huge, fractional and mistyped values.
fn generated_config() -> impl Strategy<Value = String> {
    use serde_json::{Value, json};
    const UINTS: &[&str] = &[
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "max_position_embeddings",
        "n_embd",
        "n_layer",
        "n_head",
        "n_inner",
        "n_positions",
    ];
    const FLOATS: &[&str] = &["rms_norm_eps", "rope_theta", "layer_norm_epsilon"];
    let good_uint = select(&[1u64, 2, 4, 8, 16, 32, 64][..]).prop_map(Value::from);
    let good_float = select(&[1e-5, 1e-6, 10_000.0, 0.5][..]).prop_map(|f| json!(f));
    let field = |good: BoxedStrategy<Value>| {
        prop::option::weighted(0.85, prop_oneof![5 => good, 1 => json_value()])
    };
    (
        prop_oneof![
            4 => select(&["llama", "gpt2"][..]).prop_map(Value::from),
            1 => json_value(),
        ],
        prop::collection::vec(field(good_uint.boxed()), UINTS.len()),
        prop::collection::vec(field(good_float.boxed()), FLOATS.len()),
        field(any::<bool>().prop_map(Value::from).boxed()),
    )
        .prop_map(|(model_type, uints, floats, tie)| {
            let mut obj = serde_json::Map::new();
            obj.insert("model_type".into(), model_type);
            let named = UINTS.iter().zip(uints).chain(FLOATS.iter().zip(floats));
            for (name, value) in named.chain([(&"tie_word_embeddings", tie)]) {
                if let Some(v) = value {
                    obj.insert((*name).into(), v);
                }
            }
            Value::Object(obj).to_string()
        })
}

fn check_config(text: &str, p: &mut Pick) {
    let registry = registry();
    match ModelConfig::from_hf_str(text, Path::new("fuzz/config.json")) {
        Ok(model) => {
            let _ = model.name();
            exercise_model(&model, registry, p);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(builtin_registry)
}

proptest! {
    #![proptest_config(cases(10000))]

    /// Real config.json files mutated.
    #[test]
    fn config_json_mutations_never_panic(
        (_, text) in mutated(config_files(), JSON_TOKENS),
        mut p in pick(),
    ) {
        check_config(&text, &mut p);
    }

    /// Generated config objects: every field either family reads, with
    /// zero, negative, huge, fractional and mistyped values.
    #[test]
    fn generated_config_json_never_panics(text in generated_config(), mut p in pick()) {
        check_config(&text, &mut p);
    }
}

// ============================================================================
// Constraints files (`search::Constraints::from_ron_str`, RON)

fn constraints_files() -> Vec<String> {
    let full = Constraints {
        tp: Some(1),
        pp: Some(2),
        dp: Some(2),
        micro_batch: Some(2),
        schedule: Some(autopart::plan::Schedule::Interleaved { chunks: 2 }),
        recompute: Some(autopart::plan::Recompute::Selective),
        zero: Some(autopart::plan::ZeroStage::One),
        sequence_parallel: Some(false),
        splits: BTreeMap::from([
            ("layers.*.mlp.down_proj".to_string(), Some("k".to_string())),
            ("lm_head".to_string(), None),
        ]),
        ..Constraints::default()
    };
    vec![
        "(tp: Some(8), zero: Some(1), splits: {\"layers.*.mlp.down_proj\": Some(\"k\")})".into(),
        ron::ser::to_string_pretty(&full, ron::ser::PrettyConfig::default())
            .expect("constraints write"),
        "(pp: Some(4), schedule: Some(GPipe), recompute: Some(Full))".into(),
        "()".into(),
    ]
}

fn generated_constraints() -> impl Strategy<Value = String> {
    let num = prop_oneof![
        4 => (0u64..10).prop_map(|v| v.to_string()),
        2 => select(NUMBERS).prop_map(str::to_string),
    ];
    let field = prop_oneof![
        ("tp|pp|dp|micro_batch", num.clone()).prop_map(|(f, n)| format!("{f}: Some({n})")),
        num.clone()
            .prop_map(|n| format!("schedule: Some(Interleaved(chunks: {n}))")),
        select(&["GPipe", "OneFOneB", "Other"][..]).prop_map(|s| format!("schedule: Some({s})")),
        select(&["None", "Selective", "Full", "Some"][..])
            .prop_map(|r| format!("recompute: Some({r})")),
        num.prop_map(|n| format!("zero: Some({n})")),
        select(&["true", "false", "1"][..]).prop_map(|b| format!("sequence_parallel: Some({b})")),
        (
            select(
                &[
                    "layers.*.mlp.down_proj",
                    "lm_head",
                    "embed_tokens",
                    "nope",
                    "",
                    "*"
                ][..]
            ),
            select(
                &[
                    "Some(\"k\")",
                    "Some(\"n\")",
                    "None",
                    "Some(\"?\")",
                    "Some(\"\")"
                ][..]
            ),
        )
            .prop_map(|(op, s)| format!("splits: {{{op:?}: {s}}}")),
        Just("tied: []".to_string()),
    ];
    prop::collection::vec(field, 0..6).prop_map(|fs| format!("({})", fs.join(", ")))
}

/// Compiles the tiny model under `c` up to the search (or the plan).
fn search_with(c: Constraints, p: &mut Pick, out: &Path) {
    let mut req = Request::new(tiny_model().display().to_string(), p.of(&[1, 2, 4, 8]));
    req.cluster = "cpu".into();
    req.seq_len = Some(16);
    req.global_batch = p.of(&[None, Some(8), Some(16)]);
    req.constraints = c;
    req.out = out.to_path_buf();
    req.stop_after = Some(p.of(&[Pass::Search, Pass::Search, Pass::Plan]));
    compile(&req);
}

fn check_constraints(text: &str, p: &mut Pick, out: &Path) {
    match Constraints::from_ron_str(text, "fuzz.ron") {
        Ok(c) => {
            if p.below(3) == 0 {
                search_with(c, p, out);
            }
        }
        Err(e) => assert!(e.starts_with("fuzz.ron:"), "{e}"),
    }
}

proptest! {
    #![proptest_config(cases(3000))]

    /// Constraints files mutated; a third of those that parse are searched
    /// under.
    #[test]
    fn constraints_mutations_never_panic(
        (_, text) in mutated(constraints_files(), RON_TOKENS),
        mut p in pick(),
    ) {
        let out = scratch();
        check_constraints(&text, &mut p, out.path());
    }

    /// Generated constraints files.
    #[test]
    fn generated_constraints_never_panic(text in generated_constraints(), mut p in pick()) {
        let out = scratch();
        check_constraints(&text, &mut p, out.path());
    }
}

// ============================================================================
// plan.ron (`plan::parse_plan`, then `validate_plan` and lowering)

const PLAN_FILES: [&str; 5] = [
    "compiler/tests/data/plans/tp2.plan.ron",
    "compiler/tests/data/plans/tp2-pp2-full.plan.ron",
    "compiler/tests/data/plans/tp2-sp-selective.plan.ron",
    "compiler/tests/data/plans/pp2-interleaved.plan.ron",
    // tp4 on llama-mini's 2 kv heads: `kv_copies: 2`.
    "compiler/tests/data/fuzz/tp4-kv-copies.plan.ron",
];

fn plan_files() -> Vec<String> {
    PLAN_FILES.iter().map(|f| read(f)).collect()
}

/// The graph a plan is validated against: its preset traced at its
/// micro-batch and sequence length (small ones only; a cache per key).
fn plan_graph(plan: &Plan) -> Option<Graph> {
    type Key = (String, u64, u64, DType, u64);
    static CACHE: OnceLock<Mutex<HashMap<Key, Option<Graph>>>> = OnceLock::new();
    let key = (
        plan.model.spec.clone(),
        plan.micro_batch,
        plan.trace.seq_len,
        plan.trace.dtype,
        plan.trace.kv_copies,
    );
    let small =
        key.1 <= 64 && key.2 <= 4096 && key.4 <= 8 && ["llama-mini", "gpt-mini"].contains(&&*key.0);
    if !small {
        return None;
    }
    let cache = CACHE.get_or_init(Mutex::default);
    let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
    cache
        .entry(key.clone())
        .or_insert_with(|| {
            let model = preset(&key.0).ok()?;
            let options = TraceOptions {
                batch: key.1,
                seq_len: Some(key.2),
                dtype: key.3.into(),
                kv_copies: key.4,
            };
            trace_model(&model, &options, registry()).ok()
        })
        .clone()
}

fn check_plan(text: &str, p: &mut Pick) -> Result<(), TestCaseError> {
    let plan = match parse_plan(text, Path::new("fuzz/plan.ron")) {
        Ok(plan) => plan,
        Err(e) => {
            let _ = e.to_string();
            return Ok(());
        }
    };
    let _ = plan.replicas();
    let _ = plan.tokens_per_step();
    // u64: a mutated plan's stages may hold 2^32 layers between them.
    let _ = plan
        .stages
        .iter()
        .map(|s| u64::from(s.n_layers()))
        .sum::<u64>();
    // What parses writes back and reads back as the same text.
    let written = plan_to_ron(&plan).expect("a parsed plan writes");
    let back = parse_plan(&written, Path::new("written.ron")).expect("a written plan reads");
    prop_assert_eq!(plan_to_ron(&back).expect("writes"), written);
    static SEED_GRAPH: OnceLock<Graph> = OnceLock::new();
    let graph = plan_graph(&plan).unwrap_or_else(|| {
        SEED_GRAPH
            .get_or_init(|| {
                let options = TraceOptions {
                    batch: 8,
                    seq_len: Some(16),
                    dtype: GraphDType::F32,
                    kv_copies: 1,
                };
                let model = preset("llama-mini").expect("preset");
                trace_model(&model, &options, registry()).expect("traces")
            })
            .clone()
    });
    let world = p.of(&[None, Some(plan.runtime_gpus), Some(0), Some(3)]);
    if let Err(e) = validate_plan(&plan, &graph, world) {
        let _ = e.to_string();
        return Ok(());
    }
    // A valid plan is reported and lowered.
    let _ = render_report(&plan);
    let _ = render_summary(&plan);
    let _ = render_alternatives(&[plan.clone(), plan.clone()]);
    if let Ok(model) = preset(&plan.model.spec) {
        let cluster = Cluster::preset("cpu").expect("preset");
        if let Ok(program) = driver::lower_plan(&plan, &model, registry(), &cluster) {
            let _ = autopart::lower::verify(&program);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(3000))]

    /// The checked-in plans mutated: numbers, stages, splits, fields.
    #[test]
    fn plan_mutations_never_panic(
        (_, text) in mutated(plan_files(), RON_TOKENS),
        mut p in pick(),
    ) {
        check_plan(&text, &mut p)?;
    }
}

proptest! {
    #![proptest_config(cases(10000))]

    /// Arbitrary text as a plan.
    #[test]
    fn arbitrary_plans_never_panic(
        text in prop_oneof!["\\PC{0,64}", "\\((format_version: [0-9]{1,12}, )?[a-z_:, ()\\[\\]0-9\"]{0,48}\\)"],
        mut p in pick(),
    ) {
        check_plan(&text, &mut p)?;
    }
}

/// A plan's choices varied at the field level, consistently (batch
/// arithmetic kept), so that many stay valid and reach lowering: micro-batch,
/// micro-batch count, replicas, schedule, ZeRO stage, sequence parallelism,
/// per-stage recompute and every prediction figure.
#[derive(Clone, Debug)]
struct PlanVariant {
    seed: usize,
    micro_batch: u64,
    n_micro: u64,
    replicas: u32,
    schedule: Option<autopart::plan::Schedule>,
    zero: autopart::plan::ZeroStage,
    sp: bool,
    recompute: Vec<autopart::plan::Recompute>,
    figures: Vec<f64>,
    bytes: Vec<u64>,
    rewrite: bool,
}

fn plan_variant() -> impl Strategy<Value = PlanVariant> {
    use autopart::plan::Schedule;
    let figure = prop_oneof![
        4 => 0.0f64..10.0,
        1 => select(&[0.0, -0.0, 1e-300, 1e300, f64::MAX, f64::MIN_POSITIVE][..]),
    ];
    let bytes = prop_oneof![
        4 => 0u64..(1 << 40),
        1 => select(&[0u64, u64::MAX, u64::MAX / 2][..]),
    ];
    (
        (
            0..PLAN_FILES.len(),
            select(&[1u64, 2, 3, 4, 8][..]),
            select(&[1u64, 2, 4, 6][..]),
            1u32..4,
            prop::option::of(select(vec![
                Schedule::GPipe,
                Schedule::OneFOneB,
                Schedule::Interleaved { chunks: 2 },
            ])),
            zero_stage(),
            any::<bool>(),
        ),
        prop::collection::vec(recompute(), 4),
        prop::collection::vec(figure, 12),
        prop::collection::vec(bytes, 12),
        prop::bool::weighted(0.1),
    )
        .prop_map(
            |(
                (seed, micro_batch, n_micro, replicas, schedule, zero, sp),
                recompute,
                figures,
                bytes,
                rewrite,
            )| {
                PlanVariant {
                    seed,
                    micro_batch,
                    n_micro,
                    replicas,
                    schedule,
                    zero,
                    sp,
                    recompute,
                    figures,
                    bytes,
                    rewrite,
                }
            },
        )
}

fn apply_variant(plan: &mut Plan, v: &PlanVariant) {
    plan.micro_batch = v.micro_batch;
    plan.n_micro_batches = v.n_micro;
    plan.runtime_gpus = plan.plan_gpus * v.replicas;
    plan.global_batch = v.micro_batch * v.n_micro * u64::from(plan.mesh.dp) * u64::from(v.replicas);
    if let Some(s) = v.schedule {
        plan.schedule = s;
    }
    plan.zero = v.zero;
    plan.sequence_parallel = v.sp;
    for (stage, r) in plan.stages.iter_mut().zip(&v.recompute) {
        stage.recompute = *r;
    }
    let p = &mut plan.prediction;
    let mut f = v.figures.iter().copied();
    let mut next = || f.next().unwrap_or(1.0);
    p.step_s = next();
    p.tokens_per_s = next();
    p.mfu = next();
    p.bubble_fraction = next();
    p.dp_comm_s = next();
    for st in &mut p.stages {
        st.micro_batch_s = next();
        st.tp_comm_s = next();
    }
    let mut b = v.bytes.iter().copied();
    let mut next = || b.next().unwrap_or(1);
    p.peak_mem_bytes = next();
    p.capacity_bytes = next();
    for st in &mut p.stages {
        let m = &mut st.memory;
        m.params_bytes = next();
        m.activations_bytes = next();
        m.transient_bytes = next();
    }
}

proptest! {
    #![proptest_config(cases(1000))]

    /// Plans varied field by field: what validates is reported, lowered,
    /// verified, (a tenth) rewritten and generated as code.
    #[test]
    fn plan_variants_lower_cleanly(v in plan_variant()) {
        let mut plan = parse_plan(&plan_files()[v.seed], Path::new("seed.plan.ron")).expect("seed plan");
        apply_variant(&mut plan, &v);
        let text = plan_to_ron(&plan).expect("writes");
        let plan = parse_plan(&text, Path::new("variant.plan.ron")).expect("reads back");
        let graph = plan_graph(&plan).expect("llama-mini traces");
        if validate_plan(&plan, &graph, Some(plan.runtime_gpus)).is_err() {
            return Ok(());
        }
        let _ = render_report(&plan);
        let _ = render_summary(&plan);
        let model = preset(&plan.model.spec).expect("preset");
        let cluster = Cluster::preset("cpu").expect("preset");
        let Ok(program) = driver::lower_plan(&plan, &model, registry(), &cluster) else {
            return Ok(());
        };
        prop_assert!(autopart::lower::verify(&program).is_ok());
        let _ = program.to_string();
        let program = match driver::rewrite(&cluster, program, v.rewrite, true) {
            Ok(r) => r.program,
            Err(_) => return Ok(()),
        };
        let hash = autopart::codegen::plan_hash(text.as_bytes());
        let _ = driver::codegen(&program, &driver::CustomOps::default(), &hash, PathBuf::from("runtime"), &model);
    }
}

// ============================================================================
// Cluster files (`cost::Cluster::from_ron_str`, RON)

const CLUSTER_FILES: [&str; 6] = [
    "compiler/clusters/a100-80gb.ron",
    "compiler/clusters/h100.ron",
    "compiler/clusters/h200.ron",
    "compiler/clusters/mi300x.ron",
    "compiler/clusters/trn1.ron",
    "compiler/clusters/cpu.ron",
];

fn cluster_files() -> Vec<String> {
    CLUSTER_FILES.iter().map(|f| read(f)).collect()
}

fn check_cluster(text: &str) -> Option<Cluster> {
    match Cluster::from_ron_str(text, "fuzz.ron") {
        Ok(c) => {
            exercise_cluster(&c);
            Some(c)
        }
        Err(e) => {
            let _ = e.to_string();
            None
        }
    }
}

proptest! {
    #![proptest_config(cases(10000))]

    /// The preset files mutated.
    #[test]
    fn cluster_mutations_never_panic((_, text) in mutated(cluster_files(), RON_TOKENS)) {
        check_cluster(&text);
    }

    /// Arbitrary text as a cluster file.
    #[test]
    fn arbitrary_clusters_never_panic(text in "\\PC{0,64}") {
        check_cluster(&text);
    }
}

proptest! {
    #![proptest_config(cases(300))]

    /// Mutated clusters that load are searched on: their figures (tiny,
    /// huge, zero latencies, one device per node) drive the cost model.
    #[test]
    fn mutated_clusters_search_cleanly(
        (_, text) in mutated(cluster_files(), &["0", "1e-300", "1e300", "1"]),
        mut p in pick(),
    ) {
        if check_cluster(&text).is_some() {
            let dir = scratch();
            let file = dir.path().join("cluster.ron");
            fs::write(&file, &text).expect("cluster file");
            let mut req = Request::new(tiny_model().display().to_string(), p.of(&[1, 2, 4, 8]));
            req.cluster = file.display().to_string();
            req.seq_len = Some(16);
            req.out = dir.path().join("out");
            req.stop_after = Some(Pass::Plan);
            compile(&req);
        }
    }
}

// ============================================================================
// Runs files (`validate::read_runs`, CSV: `autopart validate --runs FILE`)

const RUNS: &str = "source,family,n_layers,hidden,heads,kv_heads,ffn,vocab,seq_len,gpu,n_gpus,gpus_per_node,tp,pp,dp,virtual_stages,sequence_parallel,recompute,zero,micro_batch,global_batch,dtype,measured_tflops_per_gpu,flops_convention,notes
narayanan2021_table1,gpt,24,2304,24,24,9216,51200,2048,a100-80gb,32,8,1,1,32,,no,full,0,,512,fp16,137,per batch 96*B*s*l*h^2*(1+s/(6h)+V/(16*l*h)) (Narayanan eq.3; counts the recompute forward),interleaved 1F1B; micro batch not published
torchtitan,llama,32,4096,32,8,14336,128256,8192,h100,64,8,8,1,8,2,yes,selective,1,2,64,bf16,400.5,\"6*N + 12*l*h*s per token\",\"quoted, with a comma\"
hw,llama,2,64,4,2,176,256,128,cpu,2,2,2,1,1,,no,none,3,1,8,fp32,0.1,hardware FLOPs with full recompute,
";

/// The H100 file's columns: cp, tokens/s, url; GQA GPT rows, blank recompute.
const RUNS_H100: &str = "source,family,n_layers,hidden,heads,kv_heads,ffn,vocab,seq_len,gpu,n_gpus,gpus_per_node,tp,pp,cp,dp,virtual_stages,sequence_parallel,recompute,zero,micro_batch,global_batch,dtype,measured_tokens_per_s_per_gpu,measured_tflops_per_gpu,flops_convention,url,notes
nvidia,gpt,2,256,8,2,1024,512,128,h100-sxm,16,8,2,1,1,8,,true,none,1,2,64,bf16,6159.4,579.0,NeMo model FLOPs,https://example.com/a,Nemotron-4: RoPE+GQA; squared-ReLU; untied embeddings
nvidia,gpt,2,256,8,2,1024,512,128,h100-sxm,16,8,4,1,1,4,,true,,1,4,64,bf16,5789.4,614.2,older NeMo formula,https://example.com/b,
mosaic,gpt,2,128,4,4,512,512,256,h100-sxm,8,8,1,1,1,8,,false,full,3,1,16,bf16,1956,282,\"llm-foundry MFU: (6*N_params + 12*L*d*s)\",https://example.com/c,MPT
";

fn check_runs(text: &str, p: &mut Pick, dir: &Path) {
    let path = dir.join("runs.csv");
    fs::write(&path, text).expect("runs file");
    let Ok(runs) = autopart::validate::read_runs(&path) else {
        return;
    };
    let hardware = Cluster::preset("a100-80gb").expect("preset");
    for run in runs.iter().take(2) {
        let _ = autopart::validate::run_cluster(run, &hardware);
        exercise_model(&run.model, registry(), p);
    }
}

proptest! {
    #![proptest_config(cases(3000))]

    /// Runs files mutated: every column's numbers, quoting, rows.
    #[test]
    fn runs_file_mutations_never_panic(
        (_, text) in mutated(vec![RUNS.to_string(), RUNS_H100.to_string()], CSV_TOKENS),
        mut p in pick(),
    ) {
        let dir = scratch();
        check_runs(&text, &mut p, dir.path());
    }
}

// ============================================================================
// `autopart compile` numeric flags (clap, `driver::resolve`, the search)

/// Values of numeric flags as a user may type them.
fn flag_value() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => select(&[
            "0", "1", "2", "3", "4", "8", "16", "64", "-1", "4294967295", "4294967296",
            "18446744073709551615", "18446744073709551616", "1e3", "0x10", "+2", " 2", "",
            "abc", "1.5", "٣",
        ][..]).prop_map(String::from),
        3 => (1u32..9).prop_map(|v| v.to_string()),
        2 => any::<u32>().prop_map(|v| v.to_string()),
        1 => any::<u64>().prop_map(|v| v.to_string()),
        1 => any::<i64>().prop_map(|v| v.to_string()),
        1 => "[ -~]{0,6}",
    ]
}

const NUMERIC_FLAGS: [&str; 10] = [
    "--runtime-ngpus",
    "--seq-len",
    "--global-batch",
    "--tp",
    "--pp",
    "--dp",
    "--micro-batch",
    "--zero",
    "--top",
    "--schedule",
];

fn compile_flags() -> impl Strategy<Value = Vec<String>> {
    (
        flag_value(),
        prop::collection::vec(
            prop::option::weighted(0.5, flag_value()),
            NUMERIC_FLAGS.len(),
        ),
        select(&["trace", "search", "search", "plan", "codegen"][..]),
        any::<bool>(),
    )
        .prop_map(|(ngpus, values, stop, interleaved)| {
            let mut args: Vec<String> = vec!["--plan-ngpus".into(), ngpus];
            for (flag, value) in NUMERIC_FLAGS.iter().zip(values) {
                if let Some(v) = value {
                    let v = match *flag {
                        "--schedule" if interleaved => format!("interleaved-{v}"),
                        "--schedule" => "gpipe".to_string(),
                        _ => v,
                    };
                    args.push((*flag).to_string());
                    args.push(v);
                }
            }
            args.push("--stop-after".into());
            args.push(stop.into());
            args
        })
}

proptest! {
    #![proptest_config(cases(500))]

    /// The built binary with generated flag values: exit 0 (compiled), 1 (an
    /// error) or 2 (a usage error), never a panic or a signal.
    #[test]
    fn compile_flags_never_crash_the_binary(flags in compile_flags()) {
        let dir = scratch();
        let mut args: Vec<String> = [
            "compile",
            "--model",
            &tiny_model().display().to_string(),
            "--cluster",
            "cpu",
            "--json",
            "--out",
            &dir.path().join("out").display().to_string(),
        ]
        .map(String::from)
        .to_vec();
        args.extend(flags);
        run_autopart(&args, dir.path());
    }

    /// `autopart trace` with generated `--batch` and `--seq-len`.
    #[test]
    fn trace_flags_never_crash_the_binary(
        batch in flag_value(),
        seq in flag_value(),
        model in select(&["llama-mini", "gpt-mini"][..]),
    ) {
        let dir = scratch();
        let args: Vec<String> = ["trace", "--model", model, "--json", "--batch", &batch, "--seq-len", &seq]
            .map(String::from)
            .to_vec();
        run_autopart(&args, dir.path());
    }
}

fn typed_u32() -> impl Strategy<Value = u32> {
    prop_oneof![
        12 => 1u32..9,
        1 => Just(0u32),
        1 => select(&[16u32, 64, 1 << 16, 1 << 31, u32::MAX - 1, u32::MAX][..]),
        1 => any::<u32>(),
    ]
}

fn typed_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        12 => 1u64..65,
        1 => Just(0u64),
        1 => select(&[
            1u64 << 20, 1 << 32, (1 << 32) + 1, 1 << 40, 1 << 63, u64::MAX - 1, u64::MAX,
        ][..]),
        1 => any::<u64>(),
    ]
}

fn zero_stage() -> impl Strategy<Value = autopart::plan::ZeroStage> {
    select(autopart::plan::ZeroStage::ALL.to_vec())
}

fn recompute() -> impl Strategy<Value = autopart::plan::Recompute> {
    use autopart::plan::Recompute;
    select(vec![Recompute::None, Recompute::Selective, Recompute::Full])
}

/// Constraints as the flags give them: mostly absent or small.
fn typed_constraints() -> impl Strategy<Value = Constraints> {
    use autopart::plan::Schedule;
    let schedule = prop_oneof![
        Just(Schedule::GPipe),
        Just(Schedule::OneFOneB),
        typed_u32().prop_map(|chunks| Schedule::Interleaved { chunks }),
    ];
    (
        prop::option::weighted(0.3, prop_oneof![3 => Just(1u32), 1 => typed_u32()]),
        prop::option::weighted(0.4, typed_u32()),
        prop::option::weighted(0.4, typed_u32()),
        prop::option::weighted(0.4, typed_u64()),
        prop::option::weighted(0.3, schedule),
        prop::option::weighted(0.3, recompute()),
        prop::option::weighted(0.3, zero_stage()),
        prop::option::weighted(0.2, any::<bool>()),
    )
        .prop_map(
            |(tp, pp, dp, micro_batch, schedule, recompute, zero, sp)| Constraints {
                tp,
                pp,
                dp,
                micro_batch,
                schedule,
                recompute,
                zero,
                sequence_parallel: sp,
                ..Constraints::default()
            },
        )
}

proptest! {
    #![proptest_config(cases(2000))]

    /// The same flags, typed, through the library's compile driver: every
    /// combination of sizes and constraints resolves, searches and plans
    /// or fails with an error.
    #[test]
    fn compile_requests_never_panic(
        plan_gpus in typed_u32(),
        runtime in prop_oneof![
            6 => Just(None),
            1 => (0u32..4).prop_map(Some),
            1 => typed_u32().prop_map(|r| Some(r | 1 << 31)),
        ],
        seq in prop::option::weighted(0.5, typed_u64()),
        global in prop::option::weighted(0.5, typed_u64()),
        constraints in typed_constraints(),
        top_k in select(&[0usize, 1, 5, usize::MAX][..]),
        stop in select(&[Pass::Search, Pass::Search, Pass::Search, Pass::Plan, Pass::Codegen][..]),
    ) {
        let dir = scratch();
        let mut req = Request::new(tiny_model().display().to_string(), plan_gpus);
        req.cluster = "cpu".into();
        // A small factor: a multiple of the plan GPUs, or not.
        req.runtime_gpus = runtime.map(|r| if r < 4 { plan_gpus.saturating_mul(r) } else { r });
        req.seq_len = seq;
        req.global_batch = global;
        req.constraints = constraints;
        req.top_k = top_k;
        req.out = dir.path().join("out");
        req.stop_after = Some(stop);
        compile(&req);
    }

    /// `--stop-after` / `--dump-after` pass names and `--build-profile`.
    #[test]
    fn pass_names_parse_or_refuse(name in prop_oneof![
        select(&[
            "trace", "ties", "custom-ops", "search", "plan", "lower", "rewrite", "codegen",
            "build", "release", "dev", "debug",
        ][..]).prop_map(String::from),
        "[a-z\\-]{0,12}",
    ]) {
        if let Ok(pass) = name.parse::<Pass>() {
            prop_assert_eq!(pass.to_string(), name.clone());
        }
        if let Ok(profile) = name.parse::<driver::BuildProfile>() {
            prop_assert_eq!(profile.to_string().parse::<driver::BuildProfile>(), Ok(profile));
        }
    }
}

// ============================================================================
// `autopart launch` numeric flags

/// `--backoff` values: none that parses and waits (the job is `true`, or
/// `false` restarted at most once), so that no case sleeps.
fn backoff() -> impl Strategy<Value = String> {
    select(
        &[
            "0",
            "0.0",
            "-0",
            "1e-300",
            "-1",
            "2e19",
            "18446744073709551616",
            "1e300",
            "1e400",
            "inf",
            "-inf",
            "NaN",
            "",
            "abc",
            "0x1",
            "5s",
        ][..],
    )
    .prop_map(String::from)
}

proptest! {
    #![proptest_config(cases(300))]

    /// `--max-restarts` and `--backoff` with generated values: exit 0, 1 or
    /// 2, never a panic.
    #[test]
    fn launch_flags_never_crash_the_binary(
        restarts in prop_oneof![
            3 => select(&["0", "1"][..]).prop_map(String::from),
            1 => flag_value(),
        ],
        backoff in backoff(),
        job in select(&["true", "false"][..]),
    ) {
        let dir = scratch();
        // A failing job is restarted at most once (it would wait `backoff`
        // between attempts and run `restarts + 1` times).
        let restarts = match (job, restarts.trim().parse::<u64>()) {
            ("false", Ok(n)) if n > 1 => "1".to_string(),
            _ => restarts,
        };
        let args: Vec<String> = ["launch", "--max-restarts", &restarts, "--backoff", &backoff, "--", job]
            .map(String::from)
            .to_vec();
        run_autopart(&args, dir.path());
    }
}

// ============================================================================
// Checkpoints through `autopart ckpt inspect` and `merge`

/// The files of a valid two-rank checkpoint (step 3), by name.
fn checkpoint_files() -> &'static Vec<(String, Vec<u8>)> {
    use autopart_vocab::ckpt::{
        self, DataPosition, Dtype, FORMAT, Manifest, OptimSettings, Piece, PlanIdentity, Region,
        RngState, State,
    };
    static FILES: OnceLock<Vec<(String, Vec<u8>)>> = OnceLock::new();
    FILES.get_or_init(|| {
        let tmp = scratch();
        let piece = |tensor: &str, state, shape: &[u64], region: Region, dtype: Dtype| {
            let n = region.numel() as usize * dtype.size();
            Piece {
                tensor: tensor.into(),
                state,
                global_shape: shape.to_vec(),
                region,
                dtype,
                data: (0..n).map(|i| (i % 251) as u8).collect(),
            }
        };
        let half = |lo: u64| Region {
            offset: vec![lo, 0],
            shape: vec![2, 3],
        };
        let partial = ckpt::begin(tmp.path(), 3).expect("begin");
        let rank0 = [
            piece("w", State::Param, &[4, 3], half(0), Dtype::BF16),
            piece("w", State::Master, &[4, 3], half(0), Dtype::F32),
            piece("w", State::ExpAvg, &[4, 3], half(0), Dtype::F32),
        ];
        let rank1 = [
            piece("w", State::Param, &[4, 3], half(2), Dtype::BF16),
            piece("w", State::Master, &[4, 3], half(2), Dtype::F32),
            piece("w", State::ExpAvg, &[4, 3], half(2), Dtype::F32),
            piece("b", State::Param, &[3], Region::whole(&[3]), Dtype::F32),
        ];
        ckpt::write_rank(&partial, 0, &rank0).expect("rank 0");
        ckpt::write_rank(&partial, 1, &rank1).expect("rank 1");
        let manifest = Manifest {
            format: FORMAT,
            autopart_version: "fuzz".into(),
            step: 3,
            model: "tiny".into(),
            plan: PlanIdentity {
                hash: String::new(),
                tp: 1,
                pp: 1,
                dp: 2,
                plan_gpus: 2,
                runtime_gpus: 2,
                schedule: "1f1b".into(),
                zero: 1,
                micro_batch: 1,
                micro_batches: 1,
                seq_len: 8,
                vocab: 16,
            },
            world_size: 2,
            optim: OptimSettings {
                peak_lr: 1e-3,
                min_lr: 1e-4,
                warmup_steps: 0,
                total_steps: 10,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
                clip: None,
            },
            optimizer_steps: 3,
            data: DataPosition::Synthetic {
                seed: 0,
                next_step: 3,
            },
            rng: RngState {
                seed: 0,
                note: String::new(),
            },
            created_unix: 1_700_000_000,
            tensors: BTreeMap::new(),
            files: vec![],
            model_config: None,
            loss_scale: None,
        };
        let step = ckpt::complete(tmp.path(), manifest, 2).expect("complete");
        let mut files: Vec<(String, Vec<u8>)> = fs::read_dir(&step)
            .expect("step folder")
            .map(|e| {
                let e = e.expect("entry");
                let name = e.file_name().to_string_lossy().into_owned();
                (name, fs::read(e.path()).expect("file"))
            })
            .collect();
        files.sort();
        files
    })
}

proptest! {
    #![proptest_config(cases(200))]

    /// `ckpt inspect` (of the folder and of the step, with `--verify`) and
    /// `ckpt merge` on a damaged checkpoint: exit 0 or 1, never a panic.
    #[test]
    fn ckpt_commands_never_crash_the_binary(
        which in 0usize..5,
        damage in mutations(JSON_TOKENS),
    ) {
        let dir = scratch();
        let step = dir.path().join("ck").join("step_3");
        fs::create_dir_all(&step).expect("step folder");
        let files = checkpoint_files();
        let which = which % files.len();
        for (i, (name, bytes)) in files.iter().enumerate() {
            let bytes = if i == which { mutate_bytes(bytes, &damage) } else { bytes.clone() };
            fs::write(step.join(name), bytes).expect("write");
        }
        let s = |p: &Path| p.display().to_string();
        let merged = s(&dir.path().join("merged.safetensors"));
        for args in [
            vec!["ckpt".to_string(), "inspect".into(), s(&dir.path().join("ck")), "--json".into()],
            vec!["ckpt".into(), "inspect".into(), s(&step), "--verify".into()],
            vec!["ckpt".into(), "merge".into(), s(&step), "--out".into(), merged, "--with-optimizer".into()],
        ] {
            run_autopart(&args, dir.path());
        }
    }
}

// ============================================================================
// Regression tests: the crashes the fuzz tests found, minimal inputs.

/// The error of a compile of the tiny model, which must fail cleanly.
fn compile_error(req: &Request) -> String {
    match driver::compile(req, &mut Quiet) {
        Ok(_) => panic!("{req:?} compiled"),
        Err(e) => format!("{e:#}"),
    }
}

fn tiny_request(plan_gpus: u32, out: &Path) -> Request {
    let mut req = Request::new(tiny_model().display().to_string(), plan_gpus);
    req.cluster = "cpu".into();
    req.seq_len = Some(16);
    req.out = out.to_path_buf();
    req.stop_after = Some(Pass::Search);
    req
}

/// `formulas_never_panic`: `((((…a…))))` 4096 deep overflowed the stack
/// of the recursive-descent parser (an abort, not a panic). Nesting and
/// operator counts are bounded now, with an error at the char past the
/// bound.
/// Found by `plan_mutations_never_panic` in a CI run: a stage of layers
/// 0..2^32-1 next to another; the test's own sum of layers overflowed u32.
/// The plan must still be read, written back and lowered (or refused)
/// without a panic.
#[test]
fn regression_stage_layers_past_u32() {
    let text = fs::read_to_string(format!(
        "{}/tests/data/fuzz/stage-layers-past-u32.plan.ron",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("test data");
    check_plan(&text, &mut Pick(1)).expect("no failure");
}

#[test]
fn regression_deeply_nested_formula_is_refused() {
    let deep = format!("{}a{}", "(".repeat(100_000), ")".repeat(100_000));
    let e = Formula::parse(&deep).expect_err("too deep");
    assert_eq!(e.index, 64, "{e:?}");
    assert_eq!(e.expected, "parentheses and signs nested at most 64 deep");
    assert_eq!(e.found, "'('");
    let signs = format!("{}a", "-".repeat(100_000));
    assert!(Formula::parse(&signs).is_err());
    let long = vec!["a"; 100_000].join(" * ");
    let e = Formula::parse(&long).expect_err("too long");
    assert_eq!(e.expected, "a formula of at most 1024 operators", "{e:?}");
    // What real formulas need still parses.
    let nested = format!("{}a{}", "(".repeat(64), ")".repeat(64));
    assert!(Formula::parse(&nested).is_ok());
    assert!(Formula::parse("2 * b * l * k * n + -(b * l * n) / (2 - -1)").is_ok());
    // In an annotation file the error points at the char.
    let src = format!(
        "[(name: \"x\", annotations: [\"a -> a\"], flops: Formula(\"{}a\"))]",
        "(".repeat(70)
    );
    let e = Registry::new()
        .load_str(&src, "ops.ron")
        .expect_err("too deep")
        .to_string();
    assert_eq!(
        e,
        "ops.ron:1:119: invalid flops formula: expected parentheses and signs nested at most 64 deep, found '('"
    );
}

/// `generated_config_json_never_panics`: GPT-2's default `n_inner` (4 ×
/// `n_embd`) overflowed u64.
#[test]
fn regression_gpt2_n_embd_of_2_62_is_an_error() {
    let text = r#"{"model_type":"gpt2","n_embd":4611686018427387904,"n_head":1,"n_layer":1,"vocab_size":8}"#;
    let model = ModelConfig::from_hf_str(text, Path::new("fuzz/config.json")).expect("parses");
    let e = trace_error(&model, 1, 16);
    assert!(e.contains("more than the 2^48 autopart supports"), "{e}");
}

/// Traces `model`, which must fail: the error.
fn trace_error(model: &ModelConfig, batch: u64, seq: u64) -> String {
    match driver::trace_at(model, registry(), batch, Some(seq), DType::Fp32) {
        Ok(t) => panic!("{} traced: {}", model.name(), t.summary),
        Err(e) => format!("{e:#}"),
    }
}

/// `trace_flags_never_crash_the_binary`, `config_json_mutations_never_panic`,
/// `runs_file_mutations_never_panic`: a batch, sequence or model size whose
/// tensors' element counts overflow u64 panicked in the summary. The tracer
/// now refuses a tensor of more than 2^48 elements, naming it, and a graph
/// of more than 2^56.
#[test]
fn regression_tensors_past_2_48_elements_are_refused() {
    let mini = preset("llama-mini").expect("preset");
    assert_eq!(
        trace_error(&mini, 1 << 62, 4),
        "tracing llama-mini: tensor 'tokens' of shape [4611686018427387904, 4] has over 2^64 elements, more than the 2^48 autopart supports: is a size of the model, --batch or --seq-len too large?"
    );
    let text = r#"{"model_type": "llama", "hidden_size": 1099511627776, "intermediate_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 1, "vocab_size": 1099511627776}"#;
    let model = ModelConfig::from_hf_str(text, Path::new("big/config.json")).expect("parses");
    let e = trace_error(&model, 1, 1);
    assert!(
        e.contains("tensor 'model.embed_tokens.weight' of shape [1099511627776, 1099511627776] has over 2^64 elements"),
        "{e}"
    );
    // Every tensor within 2^48 elements, all of them past 2^56 together.
    let text = r#"{"model_type": "llama", "hidden_size": 8, "intermediate_size": 8,
        "num_hidden_layers": 512, "num_attention_heads": 1, "vocab_size": 8}"#;
    let deep = ModelConfig::from_hf_str(text, Path::new("deep/config.json")).expect("parses");
    let e = trace_error(&deep, 1 << 20, 1 << 20);
    assert!(
        e.contains("elements, more than the 2^56 autopart supports"),
        "{e}"
    );
    let dir = scratch();
    let (code, stderr) = run_autopart(
        &[
            "trace",
            "--model",
            "llama-mini",
            "--batch",
            "4611686018427387904",
            "--seq-len",
            "4",
        ]
        .map(String::from),
        dir.path(),
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("more than the 2^48"), "{stderr}");
}

/// A config with a million layers traced for minutes; the layer count is
/// bounded.
#[test]
fn regression_layer_count_is_bounded() {
    let text = r#"{"model_type": "llama", "hidden_size": 8, "intermediate_size": 8,
        "num_hidden_layers": 1000000, "num_attention_heads": 1, "vocab_size": 8}"#;
    let e = ModelConfig::from_hf_str(text, Path::new("deep/config.json")).expect_err("too deep");
    assert_eq!(
        e.to_string(),
        "deep/config.json: num_hidden_layers 1000000 is more than the 16384 autopart supports"
    );
}

/// `compile_flags_never_crash_the_binary`: `--tp 2 --pp 2 --dp 1073741824`
/// overflowed u32 in the mesh check (`tp * pp * dp`).
#[test]
fn regression_tp_pp_dp_product_overflow_is_an_error() {
    let dir = scratch();
    let mut req = Request::new("llama-mini", 4);
    req.cluster = "cpu".into();
    req.seq_len = Some(16);
    req.out = dir.path().to_path_buf();
    req.stop_after = Some(Pass::Search);
    req.constraints = Constraints {
        tp: Some(2),
        pp: Some(2),
        dp: Some(1 << 30),
        ..Constraints::default()
    };
    assert_eq!(
        compile_error(&req),
        "searching a plan: tp=2 x pp=2 x dp=1073741824 = 4294967296 is not the 4 plan GPUs"
    );
}

/// `compile_requests_never_panic`: `--global-batch 18446744073709551615`
/// ran for hours (the search enumerated divisors up to the batch). Divisors
/// take O(sqrt n) now, and the global batch is bounded.
#[test]
fn regression_huge_global_batch_is_refused_at_once() {
    let dir = scratch();
    let started = Instant::now();
    let mut req = tiny_request(1, dir.path());
    req.global_batch = Some(u64::MAX);
    assert_eq!(
        compile_error(&req),
        "searching a plan: global batch 18446744073709551615 is not between 1 and the 4294967296 sequences autopart plans for"
    );
    // The largest accepted one searches in moments.
    req.global_batch = Some(1 << 32);
    let _ = driver::compile(&req, &mut Quiet);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}

/// `mutated_clusters_search_cleanly`: a cluster with `hbm_bytes_per_s:
/// 1e-300` (positive and finite, so valid) made op times saturate the
/// picosecond counts, whose sums then overflowed in a search thread ("a
/// sharding thread panicked"). The sums saturate now.
#[test]
fn regression_absurdly_slow_cluster_searches() {
    let dir = scratch();
    let text = read("compiler/clusters/cpu.ron")
        .replace("hbm_bytes_per_s: 20e9", "hbm_bytes_per_s: 1e-300");
    assert!(text.contains("1e-300"));
    let file = dir.path().join("slow.ron");
    fs::write(&file, text).expect("cluster file");
    let mut req = tiny_request(2, &dir.path().join("out"));
    req.cluster = file.display().to_string();
    req.stop_after = Some(Pass::Plan);
    compile(&req);
}

/// Found reading `autopart launch` for its numeric flags:
/// `--max-restarts 4294967295` overflowed u32 (attempts = restarts + 1),
/// and a `--backoff` past 2^64 seconds panicked in `Duration`.
#[test]
fn regression_launch_extreme_flags() {
    let dir = scratch();
    let run = |args: &[&str]| {
        run_autopart(
            &args.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            dir.path(),
        )
    };
    let (code, stderr) = run(&["launch", "--max-restarts", "4294967295", "--", "true"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("attempt 1 of 4294967296"), "{stderr}");
    let (code, stderr) = run(&[
        "launch",
        "--max-restarts",
        "1",
        "--backoff",
        "1e300",
        "--",
        "false",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("expected a number of seconds >= 0 (and below 2^64)"),
        "{stderr}"
    );
}

/// `plan_mutations_never_panic`: a valid plan whose predicted memory holds
/// `params_bytes: 18446744073709551615` overflowed the report's sum of the
/// memory parts. The sum saturates.
#[test]
fn regression_plan_memory_figures_past_u64_report() {
    let mut plan = parse_plan(&read(PLAN_FILES[1]), Path::new("seed.plan.ron")).expect("parses");
    plan.prediction.stages[0].memory.params_bytes = u64::MAX;
    let text = plan_to_ron(&plan).expect("writes");
    assert!(
        text.contains("params_bytes: 18446744073709551615"),
        "{text}"
    );
    let plan = parse_plan(&text, Path::new("plan.ron")).expect("reads back");
    let graph = plan_graph(&plan).expect("llama-mini traces");
    validate_plan(&plan, &graph, None).expect("the plan is valid: memory is a prediction");
    assert_eq!(plan.prediction.stages[0].memory.total_bytes(), u64::MAX);
    let report = render_report(&plan);
    assert!(report.contains("GiB"), "{report}");
}

/// `compile_requests_never_panic`: `--seq-len 1099511627776 --global-batch
/// 4294967296` made the memory model's byte counts (which scale with the
/// micro-batch) overflow in a search thread. They saturate, and a plan that
/// large does not fit.
#[test]
fn regression_huge_micro_batch_memory_saturates() {
    let dir = scratch();
    let mut req = tiny_request(1, dir.path());
    req.seq_len = Some(1 << 40);
    req.global_batch = Some(1 << 32);
    req.constraints.tp = Some(1);
    let e = compile_error(&req);
    assert!(!e.contains("panicked"), "{e}");
    assert!(e.contains("no plan fits"), "{e}");
}
