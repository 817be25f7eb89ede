//! Fuzz tests of the checkpoint format's readers and of the vocabulary's
//! text forms: thousands of generated inputs each, and no input may panic.
//!
//! A valid two-rank checkpoint is written once with the format's own writers
//! (`begin`, `write_rank`, `complete`); every case copies its files into a
//! fresh folder and damages them: bytes flipped, inserted, deleted or cut;
//! JSON values of the manifest (`COMPLETE`), the rank indexes
//! (`rank-R.json`) and the safetensors headers replaced by zero, negative,
//! huge, mistyped or missing ones; files dropped, folders renamed. Half the
//! cases then fix the sizes and CRC-32s the manifest and indexes record, so
//! that the damage reaches the checks behind the checksums. `read_manifest`,
//! `list`, `resolve` and `Checkpoint::open` must return `Ok` or `Err`; a
//! checkpoint that opens must read every region of every state it lists, and
//! verify, without panicking. docs/fuzzing.md lists the tests and their case
//! counts; `PROPTEST_CASES=N` runs N cases of each.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use autopart_vocab::ckpt::{
    self, Checkpoint, DataPosition, Dtype, FORMAT, MARKER, Manifest, OptimSettings, Piece,
    PlanIdentity, Region, Resume, RngState, State, flat_range_regions,
};
use autopart_vocab::launcher::Launcher;
use autopart_vocab::{DType, Device, Recompute, Schedule, ZeroStage};
use proptest::prelude::*;
use proptest::sample::{Index, select};
use serde_json::{Value, json};

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

/// A temporary folder, in memory where the machine has /dev/shm.
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = tempfile::Builder::new().prefix("fuzz-ckpt").tempdir_in(shm) {
            return dir;
        }
    }
    tempfile::tempdir().expect("temp dir")
}

// ----- the valid checkpoint every case starts from ---------------------------

const STEP: u64 = 7;

fn manifest(world: usize) -> Manifest {
    Manifest {
        format: FORMAT,
        autopart_version: "fuzz".into(),
        step: STEP,
        model: "tiny".into(),
        plan: PlanIdentity {
            hash: "0123456789abcdef".into(),
            tp: 2,
            pp: 1,
            dp: 1,
            plan_gpus: 2,
            runtime_gpus: 2,
            schedule: "1f1b".into(),
            zero: 1,
            micro_batch: 1,
            micro_batches: 1,
            seq_len: 8,
            vocab: 16,
        },
        world_size: world,
        optim: OptimSettings {
            peak_lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 0,
            total_steps: 10,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            clip: Some(1.0),
        },
        optimizer_steps: STEP,
        data: DataPosition::Tokens {
            path: "tokens.bin".into(),
            tokens: 4096,
            dtype: "u16".into(),
            next_step: STEP,
        },
        rng: RngState {
            seed: 3,
            note: String::new(),
        },
        created_unix: 1_700_000_000,
        tensors: BTreeMap::new(),
        files: vec![],
        model_config: None,
        loss_scale: None,
    }
}

fn piece(tensor: &str, state: State, shape: &[u64], region: Region, dtype: Dtype) -> Piece {
    let n = region.numel() as usize * dtype.size();
    Piece {
        tensor: tensor.into(),
        state,
        global_shape: shape.to_vec(),
        region,
        dtype,
        data: (0..n).map(|i| (i * 37 % 251) as u8).collect(),
    }
}

fn rows(lo: u64, hi: u64, cols: u64) -> Region {
    Region {
        offset: vec![lo, 0],
        shape: vec![hi - lo, cols],
    }
}

fn cols(lo: u64, hi: u64, rows: u64) -> Region {
    Region {
        offset: vec![0, lo],
        shape: vec![rows, hi - lo],
    }
}

/// The files of a two-rank checkpoint of step 7, by name: a 6x4 f32 weight
/// (params as rows, rank 0's as two ZeRO flat slices; moments as columns),
/// a bf16 vector with its f32 master copy, and an f32 scalar.
fn seed_files() -> &'static Vec<(String, Vec<u8>)> {
    static FILES: OnceLock<Vec<(String, Vec<u8>)>> = OnceLock::new();
    FILES.get_or_init(|| {
        let tmp = scratch();
        let dir = tmp.path();
        let w = [6u64, 4];
        let mut rank0 = Vec::new();
        for (lo, hi) in [(0, 5), (5, 12)] {
            for r in flat_range_regions(&[3, 4], lo, hi) {
                rank0.push(piece("w", State::Param, &w, r, Dtype::F32));
            }
        }
        rank0.push(piece("w", State::ExpAvg, &w, cols(0, 2, 6), Dtype::F32));
        rank0.push(piece(
            "e",
            State::Param,
            &[5],
            Region::whole(&[5]),
            Dtype::BF16,
        ));
        let rank1 = vec![
            piece("w", State::Param, &w, rows(3, 6, 4), Dtype::F32),
            piece("w", State::ExpAvg, &w, cols(2, 4, 6), Dtype::F32),
            piece("e", State::Master, &[5], Region::whole(&[5]), Dtype::F32),
            piece("s", State::Param, &[], Region::whole(&[]), Dtype::F32),
        ];
        let partial = ckpt::begin(dir, STEP).expect("begin");
        ckpt::write_rank(&partial, 0, &rank0).expect("rank 0");
        ckpt::write_rank(&partial, 1, &rank1).expect("rank 1");
        let step = ckpt::complete(dir, manifest(2), 2).expect("complete");
        let mut files: Vec<(String, Vec<u8>)> = fs::read_dir(&step)
            .expect("step folder")
            .map(|e| {
                let e = e.expect("entry");
                let name = e.file_name().to_string_lossy().into_owned();
                (name, fs::read(e.path()).expect("file"))
            })
            .collect();
        files.sort();
        // The seed itself must open and read back: the cases damage it.
        let ck = Checkpoint::open(&step).expect("the seed checkpoint opens");
        ck.verify().expect("the seed checkpoint verifies");
        files
    })
}

// ----- mutations -------------------------------------------------------------

/// Numbers as a damaged file may hold them.
const NUMBERS: &[&str] = &[
    "0",
    "1",
    "-1",
    "2",
    "3",
    "8",
    "255",
    "65536",
    "4294967295",
    "4294967296",
    "9007199254740993",
    "9223372036854775807",
    "9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775809",
    "1e308",
    "1e999",
    "-0",
    "0.5",
    "00",
];

/// JSON tokens spliced into files.
const TOKENS: &[&str] = &[
    "{", "}", "[", "]", ",", ":", "\"", "\\", "\\u", "\\ud800", "null", "true", "[]", "{}", "-",
    "e", ".", "\u{0}", "\u{feff}", "é",
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
        1 => (0u64..16).prop_map(|v| v.to_string()),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let bytes = prop_oneof![
        select(TOKENS).prop_map(|t| t.as_bytes().to_vec()),
        prop::collection::vec(any::<u8>(), 1..4),
    ];
    prop_oneof![
        2 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        2 => (any::<Index>(), bytes).prop_map(|(i, b)| Mutation::Insert(i, b)),
        2 => (any::<Index>(), 1usize..16).prop_map(|(i, n)| Mutation::Delete(i, n)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        4 => (any::<Index>(), number()).prop_map(|(i, v)| Mutation::Number(i, v)),
        1 => (any::<Index>(), 1usize..48, any::<Index>())
            .prop_map(|(from, len, to)| Mutation::Copy { from, len, to }),
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
            while j < b.len() && (b[j].is_ascii_digit() || b[j] == b'.') {
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

fn mutate(b: &mut Vec<u8>, mutations: &[Mutation]) {
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
                let spans = numbers(b);
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
}

fn json_number() -> impl Strategy<Value = Value> {
    let numbers: Vec<Value> = vec![
        json!(0),
        json!(1),
        json!(-1),
        json!(2),
        json!(3),
        json!(4),
        json!(5),
        json!(6),
        json!(7),
        json!(255),
        json!(u32::MAX),
        json!(u64::from(u32::MAX) + 1),
        json!(1u64 << 50),
        json!(1u64 << 53),
        json!(1u64 << 62),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(1e308),
        json!(-1e308),
        json!(0.5),
        json!(-0.0),
    ];
    prop_oneof![
        4 => select(numbers),
        1 => any::<u64>().prop_map(Value::from),
        1 => any::<i64>().prop_map(Value::from),
        2 => (0u64..16).prop_map(Value::from),
    ]
}

fn json_string() -> impl Strategy<Value = Value> {
    let strings: Vec<Value> = [
        "",
        "x",
        "w",
        "e",
        "s",
        "param",
        "master",
        "exp_avg",
        "exp_avg_sq",
        "F32",
        "BF16",
        "F16",
        "F64",
        "I8",
        "rank-0.safetensors",
        "rank-1.safetensors",
        "rank-0.json",
        "rank-1.json",
        "COMPLETE",
        "../COMPLETE",
        "/dev/null",
        "param/w/0",
        "param/w/1",
        "exp_avg/w/0",
        "synthetic",
        "tokens",
    ]
    .iter()
    .map(|s| json!(s))
    .collect();
    select(strings)
}

fn json_shape() -> impl Strategy<Value = Value> {
    let shapes: Vec<Value> = vec![
        json!([]),
        json!([0]),
        json!([0, 0]),
        json!([0, 4]),
        json!([6, 4]),
        json!([4, 6]),
        json!([3, 4]),
        json!([6, 2]),
        json!([1, 1]),
        json!([5]),
        json!([1]),
        json!([6, 4, 1]),
        json!([u64::MAX, 2]),
        json!([2, u64::MAX]),
        json!([1u64 << 32, 1u64 << 32]),
        json!([1u64 << 40, 1u64 << 40, 1u64 << 40]),
        json!([0, 96]),
        json!([96, 0]),
        json!([0, 18446744073709551615u64]),
        json!([[]]),
        json!(["param", "master"]),
        json!(["exp_avg", "exp_avg"]),
    ];
    prop_oneof![
        4 => select(shapes),
        1 => prop::collection::vec(any::<u64>(), 0..4).prop_map(|v| json!(v)),
        1 => prop::collection::vec(0u64..8, 0..4).prop_map(|v| json!(v)),
    ]
}

/// Any value a damaged JSON file may hold where another was.
fn json_value() -> impl Strategy<Value = Value> {
    let other: Vec<Value> = vec![
        json!(null),
        json!(true),
        json!({}),
        json!({"offset": [0, 0], "shape": [6, 4]}),
        json!({"offset": [u64::MAX, 0], "shape": [2, 4]}),
        json!({"offset": [], "shape": []}),
        json!({"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}),
    ];
    prop_oneof![
        2 => json_number(),
        1 => json_string(),
        2 => json_shape(),
        1 => select(other),
    ]
}

#[derive(Clone, Debug)]
enum JsonOp {
    /// Replaces the value with one of the same kind (a number by a number,
    /// an array by a shape, ...).
    Like(Value, Value, Value),
    /// Replaces it with any value.
    Any(Value),
    Remove,
    /// An array grows a copy of its last element; an object an unknown key.
    Grow,
}

#[derive(Clone, Debug)]
struct JsonEdit {
    /// Picks among the values under the keys the readers check (`shape`,
    /// `offset`, `data_offsets`, ...) when `focus`, else among all values.
    at: Index,
    focus: bool,
    op: JsonOp,
}

fn json_edit() -> impl Strategy<Value = JsonEdit> {
    let op = prop_oneof![
        6 => (json_number(), json_shape(), json_string())
            .prop_map(|(n, a, s)| JsonOp::Like(n, a, s)),
        2 => json_value().prop_map(JsonOp::Any),
        2 => Just(JsonOp::Remove),
        1 => Just(JsonOp::Grow),
    ];
    (any::<Index>(), prop::bool::weighted(0.7), op).prop_map(|(at, focus, op)| JsonEdit {
        at,
        focus,
        op,
    })
}

/// Keys whose values the checkpoint readers check against each other.
const FOCUS: &[&str] = &[
    "shape",
    "offset",
    "global_shape",
    "region",
    "data_offsets",
    "tensors",
    "entries",
    "files",
    "file",
    "key",
    "tensor",
    "state",
    "states",
    "dtype",
    "bytes",
    "rank",
    "world_size",
    "format",
    "step",
    "created_unix",
];

/// JSON pointers to every value of `v`, the root first.
fn pointers(v: &Value, here: String, out: &mut Vec<String>) {
    out.push(here.clone());
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let k = k.replace('~', "~0").replace('/', "~1");
                pointers(x, format!("{here}/{k}"), out);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                pointers(x, format!("{here}/{i}"), out);
            }
        }
        _ => {}
    }
}

fn focused(pointer: &str) -> bool {
    pointer
        .rsplit('/')
        .take(3)
        .any(|segment| FOCUS.contains(&segment))
}

fn edit_json(v: &mut Value, edits: &[JsonEdit]) {
    for e in edits {
        let mut all = Vec::new();
        pointers(v, String::new(), &mut all);
        let focus: Vec<String> = all.iter().filter(|p| focused(p)).cloned().collect();
        let pool = if e.focus && !focus.is_empty() {
            &focus
        } else {
            &all
        };
        let at = pool[e.at.index(pool.len())].clone();
        match &e.op {
            JsonOp::Like(number, shape, string) => {
                if let Some(slot) = v.pointer_mut(&at) {
                    *slot = match slot {
                        Value::Number(_) => number.clone(),
                        Value::Array(_) => shape.clone(),
                        Value::String(_) => string.clone(),
                        _ => number.clone(),
                    };
                }
            }
            JsonOp::Any(new) => {
                if let Some(slot) = v.pointer_mut(&at) {
                    *slot = new.clone();
                }
            }
            JsonOp::Remove => {
                let Some(cut) = at.rfind('/') else { continue };
                let key = at[cut + 1..].replace("~1", "/").replace("~0", "~");
                match v.pointer_mut(&at[..cut]) {
                    Some(Value::Object(m)) => {
                        m.remove(&key);
                    }
                    Some(Value::Array(a)) => {
                        if let Ok(i) = key.parse::<usize>() {
                            if i < a.len() {
                                a.remove(i);
                            }
                        }
                    }
                    _ => {}
                }
            }
            JsonOp::Grow => match v.pointer_mut(&at) {
                Some(Value::Array(a)) => {
                    if let Some(last) = a.last().cloned() {
                        a.push(last);
                    }
                }
                Some(Value::Object(m)) => {
                    m.insert("unknown_field".into(), json!(1));
                }
                _ => {}
            },
        }
    }
}

/// Splits a safetensors file into its header JSON and data.
fn split_safetensors(b: &[u8]) -> Option<(Value, Vec<u8>)> {
    let n = u64::from_le_bytes(b.get(..8)?.try_into().ok()?) as usize;
    let header = serde_json::from_slice(b.get(8..8usize.checked_add(n)?)?).ok()?;
    Some((header, b[8 + n..].to_vec()))
}

fn join_safetensors(header: &Value, data: &[u8]) -> Vec<u8> {
    let mut text = header.to_string().into_bytes();
    while text.len() % 8 != 0 {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(data);
    out
}

/// What a case does to one file (chosen by index among the files).
#[derive(Clone, Debug)]
enum Damage {
    Bytes(Index, Vec<Mutation>),
    /// Edits the JSON of `COMPLETE` or a rank index.
    Json(Index, Vec<JsonEdit>),
    /// Edits a safetensors header's JSON (its length prefix follows).
    Header(Index, Vec<JsonEdit>),
    /// Removes a file.
    Drop(Index),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        3 => (any::<Index>(), prop::collection::vec(mutation(), 1..5))
            .prop_map(|(i, m)| Damage::Bytes(i, m)),
        5 => (any::<Index>(), prop::collection::vec(json_edit(), 1..4))
            .prop_map(|(i, e)| Damage::Json(i, e)),
        3 => (any::<Index>(), prop::collection::vec(json_edit(), 1..3))
            .prop_map(|(i, e)| Damage::Header(i, e)),
        1 => any::<Index>().prop_map(Damage::Drop),
    ]
}

/// Folders next to the checkpoint, and the name it is given.
const FOLDERS: &[&str] = &[
    "step_7",
    "step_7.partial",
    "step_7.deleting",
    "step_07",
    "step_",
    "step_x",
    "step_99999999999999999999",
    "step_18446744073709551615",
    "step_3",
    "step_9.partial",
    "unrelated",
];

#[derive(Clone, Debug)]
struct Case {
    damage: Vec<Damage>,
    /// Records the damaged files' sizes and CRC-32s in the indexes and the
    /// manifest, as if the damage had been written by autopart.
    fix_sums: bool,
    /// The checkpoint folder's name.
    name: &'static str,
    /// An empty folder beside it.
    sibling: Option<&'static str>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(damage(), 0..4),
        any::<bool>(),
        prop_oneof![8 => Just("step_7"), 1 => select(FOLDERS)],
        prop::option::weighted(0.2, select(FOLDERS)),
    )
        .prop_map(|(damage, fix_sums, name, sibling)| Case {
            damage,
            fix_sums,
            name,
            sibling,
        })
}

fn is_json(name: &str) -> bool {
    name == MARKER || name.ends_with(".json")
}

/// Writes the damaged checkpoint under `dir`; returns its folder.
fn write_case(dir: &Path, case: &Case) -> PathBuf {
    let mut files: Vec<(String, Vec<u8>)> = seed_files().clone();
    for d in &case.damage {
        match d {
            Damage::Bytes(i, m) => {
                if !files.is_empty() {
                    let k = i.index(files.len());
                    mutate(&mut files[k].1, m);
                }
            }
            Damage::Json(i, edits) => {
                let json: Vec<usize> = (0..files.len()).filter(|&k| is_json(&files[k].0)).collect();
                if json.is_empty() {
                    continue;
                }
                let k = json[i.index(json.len())];
                if let Ok(mut v) = serde_json::from_slice::<Value>(&files[k].1) {
                    edit_json(&mut v, edits);
                    files[k].1 = serde_json::to_vec_pretty(&v).expect("JSON writes");
                }
            }
            Damage::Header(i, edits) => {
                let st: Vec<usize> = (0..files.len())
                    .filter(|&k| files[k].0.ends_with(".safetensors"))
                    .collect();
                if st.is_empty() {
                    continue;
                }
                let k = st[i.index(st.len())];
                if let Some((mut header, data)) = split_safetensors(&files[k].1) {
                    edit_json(&mut header, edits);
                    files[k].1 = join_safetensors(&header, &data);
                }
            }
            Damage::Drop(i) => {
                if !files.is_empty() {
                    files.remove(i.index(files.len()));
                }
            }
        }
    }
    if case.fix_sums {
        fix_sums(&mut files);
    }
    let step = dir.join(case.name);
    fs::create_dir_all(&step).expect("step folder");
    for (name, bytes) in &files {
        fs::write(step.join(name), bytes).expect("write");
    }
    if let Some(sibling) = case.sibling {
        let _ = fs::create_dir_all(dir.join(sibling));
    }
    step
}

/// Records each file's actual size and CRC-32 in the rank indexes (for the
/// safetensors files) and then in the manifest (for every file).
fn fix_sums(files: &mut [(String, Vec<u8>)]) {
    let sum = |b: &[u8]| (b.len() as u64, crc32fast::hash(b));
    let sums: BTreeMap<String, (u64, u32)> = files
        .iter()
        .filter(|(n, _)| n.ends_with(".safetensors"))
        .map(|(n, b)| (n.clone(), sum(b)))
        .collect();
    for (name, bytes) in files.iter_mut() {
        if !name.ends_with(".json") {
            continue;
        }
        let Ok(mut v) = serde_json::from_slice::<Value>(bytes) else {
            continue;
        };
        let file = v.get("file").and_then(Value::as_str).map(str::to_string);
        if let (Some(file), Some(obj)) = (file, v.as_object_mut()) {
            if let Some(&(n, crc)) = sums.get(&file) {
                obj.insert("bytes".into(), json!(n));
                obj.insert("crc32".into(), json!(crc));
            }
        }
        *bytes = serde_json::to_vec_pretty(&v).expect("JSON writes");
    }
    let all: BTreeMap<String, (u64, u32)> =
        files.iter().map(|(n, b)| (n.clone(), sum(b))).collect();
    for (name, bytes) in files.iter_mut() {
        if name != MARKER {
            continue;
        }
        let Ok(mut v) = serde_json::from_slice::<Value>(bytes) else {
            continue;
        };
        if let Some(list) = v.get_mut("files").and_then(Value::as_array_mut) {
            for f in list {
                let file = f.get("file").and_then(Value::as_str).map(str::to_string);
                if let (Some(file), Some(obj)) = (file, f.as_object_mut()) {
                    if let Some(&(n, crc)) = all.get(&file) {
                        obj.insert("bytes".into(), json!(n));
                        obj.insert("crc32".into(), json!(crc));
                    }
                }
            }
        }
        *bytes = serde_json::to_vec_pretty(&v).expect("JSON writes");
    }
}

const STATES: [State; 4] = [State::Param, State::Master, State::ExpAvg, State::ExpAvgSq];

/// Everything a reader of the checkpoint may call; none of it may panic.
fn read_everything(dir: &Path, step: &Path) {
    let _ = ckpt::read_manifest(step);
    let _ = ckpt::list(dir);
    for resume in [
        Resume::Latest,
        Resume::Auto,
        Resume::Step(STEP),
        Resume::Path(step.to_path_buf()),
    ] {
        let _ = ckpt::resolve(&resume, Some(dir));
    }
    let Ok(ck) = Checkpoint::open(step) else {
        return;
    };
    let _ = ck.verify();
    let _ = ck.manifest.bytes();
    let names: Vec<String> = ck.manifest.tensors.keys().cloned().collect();
    for name in names.iter().map(String::as_str).chain(["w", "nope"]) {
        let Ok(shape) = ck.shape(name).map(<[u64]>::to_vec) else {
            continue;
        };
        let _ = ck.check_shape(name, &shape);
        for state in STATES {
            let _ = ck.dtype(name, state);
            let _ = ck.has(name, state);
            let _ = ck.read_region(name, state, &Region::whole(&shape));
            // A corner and the middle: regions other plans' shards ask for.
            let half: Vec<u64> = shape.iter().map(|&d| d / 2).collect();
            let rest: Vec<u64> = shape.iter().zip(&half).map(|(&d, &h)| d - h).collect();
            let _ = ck.read_region(
                name,
                state,
                &Region {
                    offset: half,
                    shape: rest,
                },
            );
        }
    }
}

proptest! {
    #![proptest_config(cases(2000))]

    /// Damaged checkpoints open, read and verify cleanly or fail with an
    /// error.
    #[test]
    fn damaged_checkpoints_never_panic(case in case()) {
        let tmp = scratch();
        let step = write_case(tmp.path(), &case);
        read_everything(tmp.path(), &step);
    }
}

proptest! {
    #![proptest_config(cases(2000))]

    /// Any bytes as a manifest, a rank index or a safetensors file.
    #[test]
    fn arbitrary_checkpoint_files_never_panic(
        which in 0usize..5,
        bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..64),
            "\\PC{0,64}".prop_map(String::into_bytes),
            // A safetensors length prefix, then anything.
            (any::<u64>(), prop::collection::vec(any::<u8>(), 0..32)).prop_map(|(n, rest)| {
                let mut b = n.to_le_bytes().to_vec();
                b.extend(rest);
                b
            }),
        ],
    ) {
        let tmp = scratch();
        let step = tmp.path().join("step_7");
        fs::create_dir(&step).expect("step folder");
        for (name, seed) in seed_files() {
            fs::write(step.join(name), seed).expect("write");
        }
        let name = &seed_files()[which % seed_files().len()].0;
        fs::write(step.join(name), &bytes).expect("write");
        read_everything(tmp.path(), &step);
    }
}

proptest! {
    #![proptest_config(cases(10000))]

    /// The vocabulary's text forms (CLI values and plan fields): each parses
    /// or is refused, and what parses prints back as itself.
    #[test]
    fn terms_parse_or_refuse(
        text in prop_oneof![
            select(&[
                "gpipe", "1f1b", "interleaved", "interleaved-", "interleaved-0",
                "interleaved-1", "interleaved-2", "interleaved-4294967295",
                "interleaved-4294967296", "interleaved--2", "interleaved-+3",
                "none", "selective", "full", "0", "1", "2", "3", "4", "-1", "256",
                "bf16", "fp16", "f16", "fp32", "f32", "cpu", "cuda", "gpu",
                "latest", "auto", "", "18446744073709551615", "18446744073709551616",
                "step_3", "/tmp/x", "٣",
            ][..]).prop_map(str::to_string),
            "[a-z0-9+\\-_ ]{0,16}",
            "\\PC{0,12}",
        ],
        byte in any::<u8>(),
    ) {
        if let Ok(s) = text.parse::<Schedule>() {
            prop_assert_eq!(s.to_string().parse::<Schedule>(), Ok(s));
            prop_assert!(s.chunks() >= 1);
        }
        if let Ok(r) = text.parse::<Recompute>() {
            prop_assert_eq!(r.to_string().parse::<Recompute>(), Ok(r));
        }
        if let Ok(z) = text.parse::<ZeroStage>() {
            prop_assert_eq!(z.to_string().parse::<ZeroStage>(), Ok(z));
            let _ = z.description();
        }
        let _ = ZeroStage::try_from(byte);
        if let Ok(d) = text.parse::<DType>() {
            prop_assert_eq!(d.name().parse::<DType>(), Ok(d));
        }
        if let Ok(d) = text.parse::<Device>() {
            prop_assert_eq!(d.to_string().parse::<Device>(), Ok(d));
        }
        let _ = text.parse::<Resume>();
    }
}

proptest! {
    #![proptest_config(cases(10000))]

    /// Launcher variables with any values: a number is read, anything else
    /// is ignored.
    #[test]
    fn launcher_variables_never_panic(
        values in prop::collection::vec(
            prop_oneof![
                select(&[
                    "0", "1", "4", " 4 ", "-1", "4294967296", "18446744073709551615",
                    "18446744073709551616", "", "x", "1e3", "+2", "0x10",
                ][..]).prop_map(str::to_string),
                "\\PC{0,8}",
            ],
            16,
        ),
    ) {
        let names: Vec<&str> = autopart_vocab::launcher::SIZE_VARS
            .iter()
            .chain(autopart_vocab::launcher::RANK_VARS)
            .chain(autopart_vocab::launcher::LOCAL_RANK_VARS)
            .copied()
            .collect();
        let launcher = Launcher::from_vars(|n| {
            names.iter().position(|m| *m == n).map(|i| values[i % values.len()].clone())
        });
        prop_assert_eq!(launcher.launched(), launcher.size.is_some());
    }
}

// ----- regression tests: the crashes the fuzz tests found ---------------------

/// `damaged_checkpoints_never_panic`: a manifest whose shape for a tensor
/// multiplies past 2^64 (`[6, 4611686018427387904]`) overflowed in
/// `Checkpoint::open`'s coverage check. The count is checked: the pieces
/// cover no such shape, and the error says so.
#[test]
fn regression_manifest_shape_past_u64_is_an_error() {
    let tmp = scratch();
    let step = tmp.path().join("step_7");
    fs::create_dir(&step).expect("step folder");
    for (name, bytes) in seed_files() {
        let bytes = if name == MARKER {
            let mut v: Value = serde_json::from_slice(bytes).expect("manifest");
            v["tensors"]["w"]["shape"] = json!([6u64, 1u64 << 62]);
            serde_json::to_vec(&v).expect("JSON writes")
        } else {
            bytes.clone()
        };
        fs::write(step.join(name), bytes).expect("write");
    }
    let e = Checkpoint::open(&step).expect_err("no pieces cover that shape");
    let e = e.to_string();
    assert!(
        e.contains("the manifest's shape Some([6, 4611686018427387904])"),
        "{e}"
    );
}
