//! `autopart data prepare` through the real binary, with a byte-level BPE
//! tokenizer trained here (tokenizers crate) on the license texts every
//! Debian machine has (/usr/share/common-licenses), read back with the
//! format's reader (`autopart_vocab::data::PreparedData`).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use autopart_vocab::data::{PreparedData, Row, TokenDtype};
use autopart_vocab::hash::fnv1a;
use serde_json::{Value, json};
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::{AddedToken, Tokenizer};

const LICENSES: &str = "/usr/share/common-licenses";
const EOS: &str = "<|endoftext|>";

fn license(name: &str) -> PathBuf {
    Path::new(LICENSES).join(name)
}

/// Every regular file under /usr/share/common-licenses (symlinks like GPL
/// -> GPL-3 skipped), sorted.
fn license_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(LICENSES)
        .expect("the license texts")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            fs::symlink_metadata(p)
                .map(|m| m.is_file())
                .unwrap_or(false)
        })
        .collect();
    files.sort();
    assert!(files.len() >= 5, "{files:?}");
    files
}

/// A byte-level BPE trained once per test binary on a few license texts,
/// saved as tokenizer.json in a folder that outlives the tests.
fn tokenizer_file() -> &'static Path {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tmp").keep();
        let path = dir.join("tokenizer.json");
        let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
            .show_progress(false)
            .vocab_size(1500)
            .min_frequency(2)
            .special_tokens(vec![
                AddedToken::from(EOS.to_string(), true),
                AddedToken::from("<pad>".to_string(), true),
            ])
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build()
            .into();
        let mut tokenizer = Tokenizer::new(BPE::default());
        let byte_level = ByteLevel::new(false, true, true);
        tokenizer.with_pre_tokenizer(Some(byte_level));
        tokenizer.with_decoder(Some(byte_level));
        let files = ["GPL-3", "Apache-2.0", "MPL-2.0"]
            .map(|f| license(f).to_string_lossy().into_owned())
            .to_vec();
        tokenizer
            .train_from_files(&mut trainer, files)
            .expect("trains");
        tokenizer.save(&path, false).expect("saves");
        path
    })
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_file(tokenizer_file()).expect("loads")
}

fn encode(t: &Tokenizer, text: &str) -> Vec<u32> {
    t.encode(text, false).expect("encodes").get_ids().to_vec()
}

fn decode(t: &Tokenizer, ids: &[u32]) -> String {
    t.decode(ids, false).expect("decodes")
}

fn autopart(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_autopart"))
        .args(args)
        .output()
        .expect("the binary runs")
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// `data prepare` with the test tokenizer; must succeed. Returns stdout.
fn prepare(out: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "data".to_string(),
        "prepare".into(),
        "--tokenizer".into(),
        s(tokenizer_file()),
        "--out".into(),
        s(out),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = autopart(&args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{args:?}: {stderr}");
    String::from_utf8(o.stdout).expect("utf-8")
}

/// `data prepare` that must fail with `code`, every needle in stderr, no
/// panic, and neither OUT nor OUT.partial left behind.
fn prepare_fails(out: &Path, extra: &[&str], code: i32, needles: &[&str]) {
    let mut args = vec!["data", "prepare", "--out"];
    let out_s = s(out);
    args.push(&out_s);
    args.extend_from_slice(extra);
    let o = autopart(&args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(code), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "{args:?}: {stderr} lacks {n:?}");
    }
    assert!(!out.exists(), "{} left behind", out.display());
    let partial = out.with_file_name(format!(
        "{}.partial",
        out.file_name().expect("name").to_string_lossy()
    ));
    assert!(!partial.exists(), "{} left behind", partial.display());
}

fn rows(data: &PreparedData) -> Vec<Row> {
    (0..data.rows())
        .map(|i| data.row(i).expect("row"))
        .collect()
}

/// The packed stream back from the rows: the first token, then every
/// label that counts (padding is masked and only ends the stream).
fn stream(data: &PreparedData) -> Vec<u32> {
    let rows = rows(data);
    let mut out = vec![rows[0].tokens[0]];
    for r in &rows {
        out.extend(
            r.labels
                .iter()
                .zip(&r.mask)
                .filter(|&(_, &m)| m == 1)
                .map(|(&l, _)| l),
        );
    }
    out
}

/// Splits ids at `eos` (each piece without it; the trailing empty piece
/// after a final EOS dropped).
fn split(ids: &[u32], eos: u32) -> Vec<Vec<u32>> {
    let mut pieces: Vec<Vec<u32>> = ids.split(|&i| i == eos).map(<[u32]>::to_vec).collect();
    if pieces.last().is_some_and(Vec::is_empty) {
        pieces.pop();
    }
    pieces
}

fn folder_bytes(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .expect("list")
        .map(|e| {
            let e = e.expect("entry");
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).expect("read"),
            )
        })
        .collect()
}

#[test]
fn the_trained_tokenizer_is_lossless_on_every_license_text() {
    let t = tokenizer();
    for file in license_files() {
        let text = fs::read_to_string(&file).expect("utf-8 license");
        let ids = encode(&t, &text);
        assert!(ids.len() < text.len(), "{}: no merges", file.display());
        assert_eq!(decode(&t, &ids), text, "{}", file.display());
    }
}

#[test]
fn prepared_text_reads_back_as_the_documents_joined_with_eos() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = tmp.path().join("text");
    let inputs = ["GPL-3", "Apache-2.0", "BSD", "Artistic"].map(license);
    let mut args = vec!["--seq-len", "48", "--last-row", "pad", "--input"];
    let input_s: Vec<String> = inputs.iter().map(|p| s(p)).collect();
    args.extend(input_s.iter().map(String::as_str));
    let stdout = prepare(&out, &args);
    assert!(stdout.contains("prepared"), "{stdout}");

    let t = tokenizer();
    let eos = t.token_to_id(EOS).expect("eos");
    let texts: Vec<String> = inputs
        .iter()
        .map(|p| fs::read_to_string(p).expect("read"))
        .collect();
    let encoded: Vec<Vec<u32>> = texts.iter().map(|x| encode(&t, x)).collect();
    let tokens: u64 = encoded.iter().map(|e| e.len() as u64 + 1).sum();

    let data = PreparedData::open(&out).expect("opens");
    data.verify().expect("verifies");
    let m = data.manifest();
    assert_eq!(m.seq_len, 48);
    assert_eq!(m.dtype, TokenDtype::U16);
    assert_eq!(m.tokenizer.vocab_size, 1500);
    assert_eq!(m.tokenizer.eos_id, eos);
    assert_eq!(m.tokenizer.pad_token, "<pad>");
    let tok_bytes = fs::read(tokenizer_file()).expect("read");
    assert_eq!(m.tokenizer.fnv1a, format!("{:016x}", fnv1a(&tok_bytes)));
    let c = &m.counts;
    assert_eq!(c.tokens, tokens);
    assert_eq!(c.documents, 4);
    assert_eq!((c.documents_dropped, c.tokens_dropped), (0, 0));
    // Every token after the first is a label once; the last row's padding
    // is masked.
    assert_eq!(c.loss_tokens, tokens - 1);
    assert_eq!(c.rows, (tokens - 1).div_ceil(48));
    assert_eq!(c.masked_tokens, c.rows * 48 - c.loss_tokens);
    assert_eq!(c.pad_tokens, c.masked_tokens);
    for (src, (path, text)) in m.sources.iter().zip(inputs.iter().zip(&texts)) {
        assert_eq!(src.file, s(path));
        assert_eq!(src.bytes, text.len() as u64);
        assert_eq!(src.fnv1a, format!("{:016x}", fnv1a(text.as_bytes())));
        assert_eq!(src.documents, 1);
    }

    // The rows are the documents, each followed by EOS, and decode to the texts.
    let ids = stream(&data);
    let mut want = Vec::new();
    for e in &encoded {
        want.extend_from_slice(e);
        want.push(eos);
    }
    assert_eq!(ids, want);
    let docs: Vec<String> = split(&ids, eos).iter().map(|d| decode(&t, d)).collect();
    assert_eq!(docs, texts);
    // Rows overlap by one token; labels are the tokens shifted by one.
    let all = rows(&data);
    for w in all.windows(2) {
        assert_eq!(w[1].tokens[0], w[0].labels[47]);
    }
    for r in &all {
        assert_eq!(r.tokens[1..], r.labels[..47]);
    }
    // The document index points at each document's first token.
    let width = 49u64;
    let index = data.documents().expect("index");
    assert_eq!(index.len(), 4);
    for (p, e) in index.iter().zip(&encoded) {
        let (row, col) = (p / width, p % width);
        let r = &all[row as usize];
        let id = if col == 0 {
            r.tokens[0]
        } else {
            r.labels[col as usize - 1]
        };
        assert_eq!(id, e[0], "document at {p}");
    }
}

/// JSONL of paragraphs of the license texts, with the text under `field`.
fn paragraphs_jsonl(path: &Path, field: &str) -> Vec<String> {
    let mut paras = Vec::new();
    for f in ["GPL-3", "MPL-2.0", "LGPL-2.1"] {
        let text = fs::read_to_string(license(f)).expect("read");
        paras.extend(
            text.split("\n\n")
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(str::to_string),
        );
    }
    let lines: Vec<String> = paras
        .iter()
        .enumerate()
        .map(|(i, p)| json!({ "id": i, field: p }).to_string())
        .collect();
    fs::write(path, lines.join("\n") + "\n\n").expect("write");
    paras
}

#[test]
fn jsonl_documents_are_their_text_field_and_any_thread_count_writes_the_same_bytes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let jsonl = tmp.path().join("paras.jsonl");
    let paras = paragraphs_jsonl(&jsonl, "content");
    assert!(paras.len() > 200, "{}", paras.len());
    let j = s(&jsonl);
    let gpl = s(&license("GPL-2"));
    let run = |name: &str, threads: &str| {
        let out = tmp.path().join(name);
        let args = [
            "--input",
            &j,
            &gpl,
            "--text-field",
            "content",
            "--doc-separator",
            "blank-line",
            "--seq-len",
            "64",
            "--threads",
            threads,
            "--json",
        ];
        let stdout = prepare(&out, &args);
        let v: Value = serde_json::from_str(&stdout).expect("one JSON object");
        assert_eq!(v["threads"], json!(threads.parse::<u64>().expect("n")));
        folder_bytes(&out)
    };
    let one = run("t1", "1");
    let two = run("t2", "2");
    let again = run("t2-again", "2");
    assert_eq!(
        one.keys().collect::<Vec<_>>(),
        ["docs.bin", "manifest.json", "tokens.bin"]
    );
    assert!(one == two, "--threads 1 and 2 differ");
    assert!(two == again, "two runs differ");

    let t = tokenizer();
    let eos = t.token_to_id(EOS).expect("eos");
    let data = PreparedData::open(&tmp.path().join("t2")).expect("opens");
    let gpl_paras: Vec<String> = fs::read_to_string(license("GPL-2"))
        .expect("read")
        .split("\n\n")
        .map(|p| p.trim_end_matches('\n').to_string())
        .filter(|p| !p.trim().is_empty())
        .map(|p| p.trim_start_matches('\n').to_string())
        .collect();
    let m = data.manifest();
    assert_eq!(m.sources[0].documents, paras.len() as u64);
    assert_eq!(m.sources[1].documents, gpl_paras.len() as u64);
    // The last partial row was dropped: the decoded stream is a prefix of
    // the documents joined with EOS.
    let docs: Vec<String> = split(&stream(&data), eos)
        .iter()
        .map(|d| decode(&t, d))
        .collect();
    let want: Vec<&String> = paras.iter().chain(&gpl_paras).collect();
    let full = docs.len() - 1;
    assert_eq!(docs[..full].iter().collect::<Vec<_>>(), want[..full]);
    assert!(want[full].starts_with(&docs[full]));
    assert!(m.counts.tokens_dropped > 0 && m.counts.tokens_dropped <= 64);
}

/// Dolly-format records (instruction, context, response, category) made
/// from the license text's sentences; every third one has no context.
fn dolly_records(n: usize) -> Vec<Value> {
    // Runs of 5 to 24 of the license's words.
    let text = fs::read_to_string(license("Apache-2.0")).expect("read");
    let words: Vec<&str> = text.split_whitespace().collect();
    let mut sentences = Vec::new();
    let mut at = 0;
    while at + 30 < words.len() {
        let len = 5 + (sentences.len() * 7) % 20;
        sentences.push(words[at..at + len].join(" "));
        at += len;
    }
    (0..n)
        .map(|i| {
            let pick = |k: usize| sentences[(i * 7 + k * 13) % sentences.len()].clone();
            let context = if i % 3 == 2 { String::new() } else { pick(1) };
            json!({
                "instruction": format!("Summarise clause {i}: {}", pick(0)),
                "context": context,
                "response": pick(2),
                "category": "summarization",
            })
        })
        .collect()
}

fn write_jsonl(path: &Path, records: &[Value]) {
    let lines: Vec<String> = records.iter().map(Value::to_string).collect();
    fs::write(path, lines.join("\n") + "\n").expect("write");
}

/// The Alpaca prompts, written out here independently of the binary's template.
fn alpaca(instruction: &str, context: &str) -> String {
    if context.is_empty() {
        format!(
            "Below is an instruction that describes a task. Write a response that appropriately \
             completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
        )
    } else {
        format!(
            "Below is an instruction that describes a task, paired with an input that provides \
             further context. Write a response that appropriately completes the request.\n\n\
             ### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
        )
    }
}

#[test]
fn instruction_rows_mask_exactly_the_response_tokens() {
    let tmp = tempfile::tempdir().expect("tmp");
    let jsonl = tmp.path().join("dolly.jsonl");
    let mut records = dolly_records(40);
    // One record far longer than a row.
    records[5]["response"] = json!(fs::read_to_string(license("GPL-3")).expect("read")[..4000]);
    write_jsonl(&jsonl, &records);
    let j = s(&jsonl);
    let out = tmp.path().join("sft");
    prepare(
        &out,
        &["--format", "instruction", "--input", &j, "--seq-len", "256"],
    );
    let t = tokenizer();
    let eos = t.token_to_id(EOS).expect("eos");
    let pad = t.token_to_id("<pad>").expect("pad");
    let data = PreparedData::open(&out).expect("opens");
    data.verify().expect("verifies");
    let c = &data.manifest().counts;
    assert_eq!((c.rows, c.documents, c.documents_dropped), (39, 39, 1));
    let kept: Vec<&Value> = records
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != 5)
        .map(|(_, r)| r)
        .collect();
    let mut loss = 0;
    for (row, rec) in rows(&data).iter().zip(&kept) {
        let field = |k: &str| rec[k].as_str().expect("string").to_string();
        let (instruction, context, response) =
            (field("instruction"), field("context"), field("response"));
        // Labels with mask 1: the response's tokens and EOS, nothing else.
        let masked_in: Vec<u32> = row
            .labels
            .iter()
            .zip(&row.mask)
            .filter(|&(_, &m)| m == 1)
            .map(|(&l, _)| l)
            .collect();
        loss += masked_in.len() as u64;
        assert_eq!(masked_in.last(), Some(&eos));
        assert_eq!(decode(&t, &masked_in[..masked_in.len() - 1]), response);
        assert_eq!(masked_in[..masked_in.len() - 1], encode(&t, &response)[..]);
        // The masked-out part: the prompt, then padding.
        let first = row.mask.iter().position(|&m| m == 1).expect("a response");
        let prompt: Vec<u32> = row.tokens[..=first].to_vec();
        assert_eq!(decode(&t, &prompt), alpaca(&instruction, &context));
        let end = first + masked_in.len();
        assert!(row.mask[end..].iter().all(|&m| m == 0));
        assert!(row.labels[end..].iter().all(|&l| l == pad));
    }
    assert_eq!(c.loss_tokens, loss);

    // Truncated instead of dropped: the long record keeps a row.
    let out = tmp.path().join("sft-trunc");
    prepare(
        &out,
        &[
            "--format",
            "instruction",
            "--input",
            &j,
            "--seq-len",
            "256",
            "--overlong",
            "truncate",
            "--json",
        ],
    );
    let data = PreparedData::open(&out).expect("opens");
    let c = &data.manifest().counts;
    assert_eq!((c.rows, c.documents_dropped), (40, 0));
    assert!(c.tokens_dropped > 0);
    assert_eq!(data.row(5).expect("row").mask.last(), Some(&1));
}

#[test]
fn packed_instruction_data_and_a_custom_template() {
    let tmp = tempfile::tempdir().expect("tmp");
    let jsonl = tmp.path().join("qa.jsonl");
    // Other field names, context sometimes missing or null.
    let records: Vec<Value> = dolly_records(30)
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let mut v = json!({ "q": r["instruction"], "a": r["response"] });
            match i % 3 {
                0 => v["ctx"] = r["context"].clone(),
                1 => v["ctx"] = Value::Null,
                _ => {}
            }
            v
        })
        .collect();
    write_jsonl(&jsonl, &records);
    let template = tmp.path().join("template.txt");
    fs::write(
        &template,
        "Q: {instruction}\n{?context}C: {context}\n{/context}A: ",
    )
    .expect("write");
    let out = tmp.path().join("packed");
    let (j, tp) = (s(&jsonl), s(&template));
    prepare(
        &out,
        &[
            "--format",
            "instruction",
            "--pack",
            "--input",
            &j,
            "--instruction-field",
            "q",
            "--context-field",
            "ctx",
            "--response-field",
            "a",
            "--template",
            &tp,
            "--seq-len",
            "100",
            "--last-row",
            "pad",
        ],
    );
    let t = tokenizer();
    let eos = t.token_to_id(EOS).expect("eos");
    let data = PreparedData::open(&out).expect("opens");
    data.verify().expect("verifies");
    // Masked-in labels over all rows: the responses, each followed by EOS.
    let mut masked_in = Vec::new();
    let mut all = vec![data.row(0).expect("row").tokens[0]];
    for r in rows(&data) {
        for (&l, &m) in r.labels.iter().zip(&r.mask) {
            if m == 1 {
                masked_in.push(l);
            }
        }
        all.extend_from_slice(&r.labels);
    }
    let responses: Vec<String> = split(&masked_in, eos)
        .iter()
        .map(|d| decode(&t, d))
        .collect();
    let want: Vec<&str> = records
        .iter()
        .map(|r| r["a"].as_str().expect("string"))
        .collect();
    assert_eq!(responses, want);
    // The stream is prompt + response + EOS per record.
    let pieces: Vec<String> = split(&all, eos).iter().map(|d| decode(&t, d)).collect();
    for (i, (piece, rec)) in pieces.iter().zip(&records).enumerate() {
        let q = rec["q"].as_str().expect("q");
        let a = rec["a"].as_str().expect("a");
        let want = match rec.get("ctx").and_then(Value::as_str) {
            Some(c) if !c.is_empty() => format!("Q: {q}\nC: {c}\nA: {a}"),
            _ => format!("Q: {q}\nA: {a}"),
        };
        assert_eq!(piece, &want, "record {i}");
    }
    match &data.manifest().format {
        autopart_vocab::data::Format::Instruction {
            template, rows: r, ..
        } => {
            assert!(template.starts_with("Q: {instruction}"));
            assert_eq!(*r, autopart_vocab::data::RowLayout::Packed);
        }
        other => panic!("format {other:?}"),
    }
}

#[test]
fn bad_inputs_are_clear_errors_that_leave_no_folder() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = tmp.path().join("out");
    let tok = s(tokenizer_file());
    let gpl = s(&license("GPL-3"));
    let write = |name: &str, text: &str| {
        let p = tmp.path().join(name);
        fs::write(&p, text).expect("write");
        s(&p)
    };
    let missing = s(&tmp.path().join("nope.json"));
    prepare_fails(
        &out,
        &["--tokenizer", &missing, "--input", &gpl, "--seq-len", "8"],
        1,
        &["reading tokenizer", "nope.json"],
    );
    let not_json = write("tok.txt", "hello");
    prepare_fails(
        &out,
        &["--tokenizer", &not_json, "--input", &gpl, "--seq-len", "8"],
        1,
        &["tok.txt: not a tokenizer.json"],
    );
    let bad = write("bad.jsonl", "{\"text\": \"ok\"}\n\n{\"text\": oops}\n");
    prepare_fails(
        &out,
        &["--tokenizer", &tok, "--input", &bad, "--seq-len", "8"],
        1,
        &["bad.jsonl:3: not a JSON line"],
    );
    let no_field = write("nofield.jsonl", "{\"body\": \"ok\"}\n");
    prepare_fails(
        &out,
        &["--tokenizer", &tok, "--input", &no_field, "--seq-len", "8"],
        1,
        &["nofield.jsonl:1: no field \"text\"", "--text-field"],
    );
    let number = write("num.jsonl", "{\"text\": 3}\n");
    prepare_fails(
        &out,
        &["--tokenizer", &tok, "--input", &number, "--seq-len", "8"],
        1,
        &["num.jsonl:1: field \"text\" is a number, expected a string"],
    );
    let no_response = write("inst.jsonl", "{\"instruction\": \"hi\"}\n");
    prepare_fails(
        &out,
        &[
            "--tokenizer",
            &tok,
            "--format",
            "instruction",
            "--input",
            &no_response,
            "--seq-len",
            "8",
        ],
        1,
        &["inst.jsonl:1: no field \"response\"", "--response-field"],
    );
    prepare_fails(
        &out,
        &[
            "--tokenizer",
            &tok,
            "--format",
            "instruction",
            "--input",
            &gpl,
            "--seq-len",
            "8",
        ],
        1,
        &["GPL-3: --format instruction reads JSONL"],
    );
    prepare_fails(
        &out,
        &["--tokenizer", &tok, "--input", &gpl, "--seq-len", "0"],
        2,
        &["--seq-len"],
    );
    let empty = write("empty.txt", "");
    prepare_fails(
        &out,
        &["--tokenizer", &tok, "--input", &empty, "--seq-len", "8"],
        1,
        &["no row"],
    );
    let blank = write("blank.jsonl", "\n\n");
    prepare_fails(
        &out,
        &["--tokenizer", &tok, "--input", &blank, "--seq-len", "8"],
        1,
        &["hold no text", "blank.jsonl"],
    );
    prepare_fails(
        &out,
        &[
            "--tokenizer",
            &tok,
            "--input",
            &gpl,
            "--seq-len",
            "8",
            "--eos-token",
            "<eos>",
        ],
        1,
        &["--eos-token \"<eos>\"", "no such token"],
    );
    let latin1 = tmp.path().join("latin1.txt");
    fs::write(&latin1, b"caf\xe9\n").expect("write");
    prepare_fails(
        &out,
        &[
            "--tokenizer",
            &tok,
            "--input",
            &s(&latin1),
            "--seq-len",
            "2",
        ],
        1,
        &["latin1.txt: not UTF-8 text (byte 3"],
    );
    let tiny = write("tiny.txt", "hello world");
    prepare_fails(
        &out,
        &["--tokenizer", &tok, "--input", &tiny, "--seq-len", "4096"],
        1,
        &["make no row", "--last-row pad"],
    );

    // An existing folder is kept unless --force.
    prepare(&out, &["--input", &gpl, "--seq-len", "8"]);
    let before = folder_bytes(&out);
    let o = autopart(&[
        "data",
        "prepare",
        "--tokenizer",
        &tok,
        "--input",
        &gpl,
        "--seq-len",
        "16",
        "--out",
        &s(&out),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("already exists") && stderr.contains("--force"),
        "{stderr}"
    );
    assert_eq!(folder_bytes(&out), before);
    prepare(&out, &["--input", &gpl, "--seq-len", "16", "--force"]);
    assert_eq!(
        PreparedData::open(&out).expect("opens").manifest().seq_len,
        16
    );
    let names: Vec<String> = fs::read_dir(tmp.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("out"))
        .collect();
    assert_eq!(names, ["out"]);

    // A crash's leftover .partial is replaced by the next run.
    let out2 = tmp.path().join("again");
    let partial = tmp.path().join("again.partial");
    fs::create_dir_all(&partial).expect("mkdir");
    fs::write(partial.join("tokens.bin"), b"junk").expect("write");
    prepare(&out2, &["--input", &gpl, "--seq-len", "8"]);
    assert!(!partial.exists());
    PreparedData::open(&out2)
        .expect("opens")
        .verify()
        .expect("verifies");
}

#[test]
fn train_tokenizer_writes_a_lossless_tokenizer() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = tmp.path().join("tok.json");
    let o = autopart(&[
        "data",
        "train-tokenizer",
        "--input",
        &s(&license("GPL-3")),
        "--vocab-size",
        "800",
        "--out",
        &s(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t = Tokenizer::from_file(&out).expect("loads");
    assert_eq!(t.get_vocab_size(true), 800);
    assert_eq!(t.token_to_id(EOS), Some(0));
    let text = fs::read_to_string(license("Apache-2.0")).expect("read");
    assert_eq!(decode(&t, &encode(&t, &text)), text);
}
