//! Fuzz tests of the prepared-data reader: a valid folder is written once
//! with the format's own writer (`data::begin`, `Writer::finish`); every case
//! copies it and damages it: manifest values (counts, seq_len, dtype,
//! vocabulary, ids, file sizes and names) replaced by zero, negative, huge,
//! mistyped or missing ones, manifest bytes flipped or cut, `tokens.bin`,
//! `mask.bin` and `docs.bin` truncated, extended, flipped or removed.
//! `PreparedData::open` must return `Ok` or `Err`; data that opens must read
//! every row (and rows past the end), its document index, and verify,
//! without panicking. `PROPTEST_CASES=N` runs N cases.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use autopart_vocab::data::{
    self, DOCS, Format, LastRow, Layout, MANIFEST, MASK, PreparedData, RowLayout, TOKENS,
    TokenizerInfo,
};
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{Value, json};

fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = tempfile::Builder::new().prefix("fuzz-data").tempdir_in(shm) {
            return dir;
        }
    }
    tempfile::tempdir().expect("temp dir")
}

/// Two valid folders (a packed instruction set with a mask and a padded last
/// row; a text set of u32 ids), written once.
fn valid() -> &'static [PathBuf; 2] {
    static DIRS: OnceLock<[PathBuf; 2]> = OnceLock::new();
    DIRS.get_or_init(|| {
        let root = scratch().keep();
        let info = |vocab_size| TokenizerInfo {
            file: "tokenizer.json".into(),
            fnv1a: "0123456789abcdef".into(),
            vocab_size,
            eos_id: 0,
            eos_token: "</s>".into(),
            pad_id: 1,
            pad_token: "<pad>".into(),
        };
        let a = root.join("instruction");
        let layout = Layout {
            vocab_size: 50,
            seq_len: 5,
            eos_id: 0,
            pad_id: 1,
            mask: true,
        };
        let mut w = data::begin(&a, layout, false).expect("begin");
        for k in 0..7u32 {
            let ids: Vec<u32> = (0..(3 + k % 5)).map(|i| 2 + (k * 7 + i) % 48).collect();
            let flags: Vec<bool> = (0..ids.len()).map(|i| i >= ids.len() / 2).collect();
            w.push_document(&ids, &flags).expect("record");
        }
        let format = Format::Instruction {
            template: "{instruction}".into(),
            instruction_field: "instruction".into(),
            context_field: "context".into(),
            response_field: "response".into(),
            rows: RowLayout::Packed,
        };
        w.finish(format, info(50), vec![], LastRow::Pad)
            .expect("finish");
        let b = root.join("text");
        let layout = Layout {
            vocab_size: 70_000,
            seq_len: 4,
            eos_id: 0,
            pad_id: 1,
            mask: false,
        };
        let mut w = data::begin(&b, layout, false).expect("begin");
        for k in 0..5u32 {
            let ids: Vec<u32> = (0..(2 + k)).map(|i| 66_000 + k * 100 + i).collect();
            w.push_document(&ids, &[]).expect("doc");
        }
        w.finish(Format::Text, info(70_000), vec![], LastRow::Drop)
            .expect("finish");
        [a, b]
    })
}

fn copy(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("mkdir");
    for e in fs::read_dir(from).expect("list") {
        let e = e.expect("entry");
        fs::copy(e.path(), to.join(e.file_name())).expect("copy");
    }
}

/// Opens `dir` and, if it opens, reads everything it claims; nothing may panic.
fn exercise(dir: &Path) {
    let Ok(data) = PreparedData::open(dir) else {
        return;
    };
    let rows = data.rows();
    for i in 0..rows.min(64) {
        let _ = data.row(i);
    }
    assert!(data.row(rows).is_err());
    assert!(data.row(u64::MAX).is_err());
    let _ = data.documents();
    let _ = data.verify();
}

const PATHS: &[&str] = &[
    "format_version",
    "seq_len",
    "dtype",
    "counts.rows",
    "counts.tokens",
    "counts.loss_tokens",
    "counts.masked_tokens",
    "counts.pad_tokens",
    "counts.documents",
    "tokenizer.vocab_size",
    "tokenizer.eos_id",
    "tokenizer.pad_id",
    "format.kind",
    "format.rows",
    "files.0.bytes",
    "files.0.file",
    "files.1.bytes",
    "files.1.file",
    "files.2.bytes",
    "files.2.file",
    "files",
    "sources",
];

fn values() -> Vec<Value> {
    vec![
        json!(0),
        json!(1),
        json!(-1),
        json!(2),
        json!(7),
        json!(65_536),
        json!(65_537),
        json!(1u64 << 32),
        json!((1u64 << 32) + 1),
        json!(u64::MAX),
        json!(u64::MAX / 2),
        json!(1.5),
        json!("u32"),
        json!("u16"),
        json!("mask.bin"),
        json!("tokens.bin"),
        json!("docs.bin"),
        json!("../x"),
        json!("text"),
        json!("padded"),
        json!(null),
        json!(true),
        json!([]),
        json!({}),
    ]
}

/// Sets (or with `None` removes) the value at a dotted path.
fn set(v: &mut Value, path: &str, new: Option<Value>) {
    let parts: Vec<&str> = path.split('.').collect();
    let mut cur = v;
    for p in &parts[..parts.len() - 1] {
        cur = match p.parse::<usize>() {
            Ok(i) => match cur.get_mut(i) {
                Some(c) => c,
                None => return,
            },
            Err(_) => match cur.get_mut(*p) {
                Some(c) => c,
                None => return,
            },
        };
    }
    let last = parts[parts.len() - 1];
    match (cur, last.parse::<usize>()) {
        (Value::Array(a), Ok(i)) if i < a.len() => match new {
            Some(n) => a[i] = n,
            None => {
                a.remove(i);
            }
        },
        (Value::Object(o), _) => match new {
            Some(n) => {
                o.insert(last.to_string(), n);
            }
            None => {
                o.remove(last);
            }
        },
        _ => {}
    }
}

#[derive(Clone, Debug)]
enum Damage {
    /// A manifest value replaced (`None`: removed).
    Value(&'static str, Option<Value>),
    /// A file cut to a fraction of its length (per mille).
    Cut(&'static str, u32),
    /// Bytes appended to a file.
    Extend(&'static str, Vec<u8>),
    /// A byte of a file xored with a non-zero value, at a fraction of its length.
    Flip(&'static str, u32, u8),
    /// A file removed.
    Remove(&'static str),
}

fn damage() -> impl Strategy<Value = Damage> {
    let files = || select(vec![MANIFEST, TOKENS, MASK, DOCS]);
    prop_oneof![
        4 => (select(PATHS.to_vec()), proptest::option::weighted(0.9, select(values())))
            .prop_map(|(p, v)| Damage::Value(p, v)),
        1 => (files(), 0u32..1000).prop_map(|(f, k)| Damage::Cut(f, k)),
        1 => (files(), proptest::collection::vec(any::<u8>(), 1..9))
            .prop_map(|(f, b)| Damage::Extend(f, b)),
        2 => (files(), 0u32..1000, 1u8..=255).prop_map(|(f, k, x)| Damage::Flip(f, k, x)),
        1 => files().prop_map(Damage::Remove),
    ]
}

fn apply(dir: &Path, d: &Damage) {
    match d {
        Damage::Value(path, new) => {
            let p = dir.join(MANIFEST);
            // An earlier damage may have removed or broken the manifest.
            let Some(mut v) = fs::read(&p)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            else {
                return;
            };
            set(&mut v, path, new.clone());
            fs::write(&p, serde_json::to_vec(&v).expect("json")).expect("write");
        }
        Damage::Cut(f, k) => {
            let p = dir.join(f);
            if let Ok(b) = fs::read(&p) {
                let n = b.len() * *k as usize / 1000;
                fs::write(&p, &b[..n]).expect("write");
            }
        }
        Damage::Extend(f, extra) => {
            let p = dir.join(f);
            if let Ok(mut b) = fs::read(&p) {
                b.extend_from_slice(extra);
                fs::write(&p, &b).expect("write");
            }
        }
        Damage::Flip(f, k, x) => {
            let p = dir.join(f);
            if let Ok(mut b) = fs::read(&p) {
                if !b.is_empty() {
                    let i = (b.len() * *k as usize / 1000).min(b.len() - 1);
                    b[i] ^= x;
                    fs::write(&p, &b).expect("write");
                }
            }
        }
        Damage::Remove(f) => {
            let _ = fs::remove_file(dir.join(f));
        }
    }
}

#[test]
fn the_valid_folders_open_and_verify() {
    for dir in valid() {
        let data = PreparedData::open(dir).expect("opens");
        data.verify().expect("verifies");
        assert!(data.rows() >= 2);
    }
}

proptest! {
    #![proptest_config(cases(2000))]

    #[test]
    fn damaged_folders_never_panic(
        which in 0usize..2,
        damages in proptest::collection::vec(damage(), 1..4),
    ) {
        let tmp = scratch();
        let dir = tmp.path().join("data");
        copy(&valid()[which], &dir);
        for d in &damages {
            apply(&dir, d);
        }
        exercise(&dir);
    }
}
