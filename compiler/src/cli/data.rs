//! `autopart data prepare|train-tokenizer`: turns text files and JSONL into
//! the prepared-data format of `autopart_vocab::data` (which owns the
//! layout, the atomic folder and the checks), tokenized with the HF
//! `tokenizers` crate (pure Rust).
//!
//! Inputs are read in order and cut into documents (a text file, its
//! blank-line paragraphs or lines; a JSONL record's `--text-field`), or,
//! under `--format instruction`, into records rendered through a prompt
//! template. Batches of documents are tokenized in parallel on a rayon pool
//! of `--threads` threads and handed to the writer in input order, so the
//! output does not depend on the thread count.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use autopart_vocab::data::{
    self, DataError, Format, LastRow, Layout, Manifest, RowLayout, Source, TokenizerInfo,
};
use autopart_vocab::fs::write_atomic_at;
use autopart_vocab::hash::{Fnv1a, fnv1a};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;
use serde_json::{Value, json};
use tokenizers::Tokenizer;

#[derive(Debug, Args)]
pub(super) struct DataArgs {
    #[command(subcommand)]
    command: DataCommand,
}

#[derive(Debug, Subcommand)]
enum DataCommand {
    /// Tokenize text files or JSONL into DIR: rows of seq_len + 1 ids
    /// (tokens.bin), a loss mask (mask.bin, instruction data), a document
    /// index (docs.bin) and manifest.json.
    Prepare(Box<PrepareArgs>),
    /// Train a byte-level BPE tokenizer (lossless on any text) on text
    /// files and write its tokenizer.json.
    TrainTokenizer(TrainArgs),
}

#[derive(Debug, Args)]
struct PrepareArgs {
    /// A HuggingFace tokenizer.json.
    #[arg(long)]
    tokenizer: PathBuf,
    /// Input files (repeatable; several may follow one --input): `.jsonl`
    /// files hold one JSON object a line, anything else is UTF-8 text.
    #[arg(long = "input", value_name = "FILE", required = true, num_args = 1..)]
    inputs: Vec<PathBuf>,
    /// Tokens per row fed to the model (rows hold seq_len + 1 ids).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1 << 32))]
    seq_len: u64,
    /// The folder to write (by way of DIR.partial, renamed at the end).
    #[arg(long)]
    out: PathBuf,
    /// Replace an existing DIR (atomically: the old one is removed only
    /// after the new one is in place).
    #[arg(long)]
    force: bool,
    /// text: documents packed into rows, every label counts; instruction:
    /// JSONL records, the loss mask covers the response tokens only.
    #[arg(long, value_enum, default_value_t = DataFormat::Text)]
    format: DataFormat,
    /// What one document of a text file is.
    #[arg(long, value_enum, default_value_t = DocSeparator::File)]
    doc_separator: DocSeparator,
    /// The JSONL field holding a document's text (text format).
    #[arg(long, default_value = "text")]
    text_field: String,
    /// The token after every document (a name or an id). Default: the
    /// tokenizer's </s>, <|endoftext|> or <|end_of_text|>.
    #[arg(long)]
    eos_token: Option<String>,
    /// The token that fills padded rows (a name or an id; its labels are
    /// masked). Default: the tokenizer's <pad>, [PAD] or <|pad|>, else EOS.
    #[arg(long)]
    pad_token: Option<String>,
    /// The tokens after the last full row (packed rows): drop them or pad
    /// the last row (then mask.bin masks the padding).
    #[arg(long, value_enum, default_value_t = LastRowArg::Drop)]
    last_row: LastRowArg,
    /// Instruction format: the JSONL field of the instruction.
    #[arg(long, default_value = "instruction")]
    instruction_field: String,
    /// Instruction format: the JSONL field of the (optional) context.
    #[arg(long, default_value = "context")]
    context_field: String,
    /// Instruction format: the JSONL field of the response.
    #[arg(long, default_value = "response")]
    response_field: String,
    /// Instruction format: a prompt template file with {instruction},
    /// {context} and an optional {?context}...{/context} section (kept only
    /// when the record has context); the response follows the prompt.
    /// Default: the Alpaca / Dolly prompt.
    #[arg(long)]
    template: Option<PathBuf>,
    /// Instruction format: pack records into rows (as text) instead of one
    /// record per padded row.
    #[arg(long)]
    pack: bool,
    /// Instruction format, padded rows: what to do with a record longer
    /// than a row (truncate keeps it when a response token still fits).
    #[arg(long, value_enum, default_value_t = Overlong::Drop)]
    overlong: Overlong,
    /// Tokenizer threads (0: one per core). The output is the same for any count.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Print one JSON object (the manifest's counts, seconds, throughput).
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum DataFormat {
    Text,
    Instruction,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum DocSeparator {
    /// A whole file is one document.
    File,
    /// Paragraphs (runs of lines between blank lines) are documents.
    BlankLine,
    /// Every non-empty line is a document.
    Line,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LastRowArg {
    Drop,
    Pad,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Overlong {
    Drop,
    Truncate,
}

#[derive(Debug, Args)]
struct TrainArgs {
    /// Text files to learn merges from (repeatable).
    #[arg(long = "input", value_name = "FILE", required = true, num_args = 1..)]
    inputs: Vec<PathBuf>,
    /// Ids in the vocabulary, special tokens and the 256 byte tokens included.
    #[arg(long, default_value_t = 4096)]
    vocab_size: usize,
    /// Special tokens, comma separated (ids 0, 1, ...).
    #[arg(long, default_value = "<|endoftext|>,<pad>", value_delimiter = ',')]
    special_tokens: Vec<String>,
    /// The tokenizer.json to write (atomically).
    #[arg(long)]
    out: PathBuf,
}

pub(super) fn data(args: &DataArgs) -> Result<()> {
    match &args.command {
        DataCommand::Prepare(a) => prepare(a),
        DataCommand::TrainTokenizer(a) => train_tokenizer(a),
    }
}

/// A `DataError` as an `anyhow` error (its message names the file).
fn de<T>(r: Result<T, DataError>) -> Result<T> {
    r.map_err(|e| anyhow!("{e}"))
}

// ----- the tokenizer ---------------------------------------------------------

fn load_tokenizer(path: &Path) -> Result<(Tokenizer, Vec<u8>)> {
    let bytes =
        std::fs::read(path).with_context(|| format!("reading tokenizer {}", path.display()))?;
    let tokenizer = Tokenizer::from_bytes(&bytes)
        .map_err(|e| anyhow!("{}: not a tokenizer.json: {e}", path.display()))?;
    Ok((tokenizer, bytes))
}

/// A token given as a name or an id, or the first of `defaults` the
/// tokenizer has.
fn resolve_token(
    tokenizer: &Tokenizer,
    path: &Path,
    given: Option<&str>,
    flag: &str,
    defaults: &[&str],
) -> Result<Option<(u32, String)>> {
    let vocab = tokenizer.get_vocab_size(true) as u64;
    if let Some(given) = given {
        if let Some(id) = tokenizer.token_to_id(given) {
            return Ok(Some((id, given.to_string())));
        }
        if let Ok(id) = given.parse::<u32>() {
            if u64::from(id) < vocab {
                let name = tokenizer.id_to_token(id).unwrap_or_else(|| id.to_string());
                return Ok(Some((id, name)));
            }
            bail!(
                "{flag} {id}: not below the vocabulary size {vocab} of {}",
                path.display()
            );
        }
        bail!(
            "{flag} {given:?}: {} has no such token (give a token it has, or an id)",
            path.display()
        );
    }
    Ok(defaults
        .iter()
        .find_map(|name| tokenizer.token_to_id(name).map(|id| (id, name.to_string()))))
}

fn encode(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let encoding = tokenizer
        .encode_fast(text, false)
        .map_err(|e| anyhow!("tokenizing: {e}"))?;
    Ok(encoding.get_ids().to_vec())
}

// ----- the prompt template ---------------------------------------------------

/// The Alpaca / Dolly prompt; without context its "Input" section and the
/// clause about it are left out, as in Alpaca's no-input prompt.
const DEFAULT_TEMPLATE: &str = "Below is an instruction that describes a task\
{?context}, paired with an input that provides further context{/context}. \
Write a response that appropriately completes the request.\n\n\
### Instruction:\n{instruction}\n\n\
{?context}### Input:\n{context}\n\n{/context}\
### Response:\n";

#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Text(String),
    Instruction,
    Context,
    /// Kept only when the record has context.
    IfContext(Vec<Piece>),
}

/// A parsed prompt template.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Template(Vec<Piece>);

impl Template {
    /// Parses `{instruction}`, `{context}`, `{?context}...{/context}` and
    /// `{{` / `}}` (literal braces); `what` names the template in errors.
    fn parse(text: &str, what: &str) -> Result<Self> {
        let mut outer: Vec<Piece> = Vec::new();
        let mut section: Option<Vec<Piece>> = None;
        let mut literal = String::new();
        let mut has_instruction = false;
        let mut rest = text;
        let at = |rest: &str| {
            let offset = text.len() - rest.len();
            let line = text[..offset].matches('\n').count() + 1;
            format!("{what} line {line}")
        };
        fn flush(literal: &mut String, into: &mut Vec<Piece>) {
            if !literal.is_empty() {
                into.push(Piece::Text(std::mem::take(literal)));
            }
        }
        while let Some(c) = rest.chars().next() {
            let target = section.as_mut().unwrap_or(&mut outer);
            if let Some(r) = rest.strip_prefix("{{") {
                literal.push('{');
                rest = r;
            } else if let Some(r) = rest.strip_prefix("}}") {
                literal.push('}');
                rest = r;
            } else if c == '{' {
                let Some(end) = rest.find('}') else {
                    bail!("{}: an unclosed {{ (write {{{{ for a brace)", at(rest));
                };
                let name = &rest[1..end];
                flush(&mut literal, target);
                match name {
                    "instruction" => {
                        has_instruction = true;
                        target.push(Piece::Instruction);
                    }
                    "context" => target.push(Piece::Context),
                    "?context" if section.is_none() => section = Some(Vec::new()),
                    "/context" if section.is_some() => {
                        let inner = section.take().unwrap_or_default();
                        outer.push(Piece::IfContext(inner));
                    }
                    "?context" => bail!("{}: {{?context}} inside {{?context}}", at(rest)),
                    "/context" => bail!("{}: {{/context}} without {{?context}}", at(rest)),
                    other => bail!(
                        "{}: unknown placeholder {{{other}}}: expected {{instruction}}, \
                         {{context}}, {{?context}}...{{/context}}, or {{{{ for a brace",
                        at(rest)
                    ),
                }
                rest = &rest[end + 1..];
            } else {
                literal.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
        if section.is_some() {
            bail!("{what}: {{?context}} is never closed by {{/context}}");
        }
        flush(&mut literal, &mut outer);
        if !has_instruction {
            bail!("{what}: no {{instruction}} placeholder");
        }
        Ok(Template(outer))
    }

    fn render(&self, instruction: &str, context: &str) -> String {
        fn go(pieces: &[Piece], instruction: &str, context: &str, out: &mut String) {
            for p in pieces {
                match p {
                    Piece::Text(t) => out.push_str(t),
                    Piece::Instruction => out.push_str(instruction),
                    Piece::Context => out.push_str(context),
                    Piece::IfContext(inner) => {
                        if !context.trim().is_empty() {
                            go(inner, instruction, context, out);
                        }
                    }
                }
            }
        }
        let mut out = String::new();
        go(&self.0, instruction, context, &mut out);
        out
    }
}

// ----- reading the inputs ----------------------------------------------------

/// What one input yields: a document's text, or a rendered record.
#[derive(Debug)]
enum Unit {
    Text(String),
    Record { prompt: String, response: String },
}

impl Unit {
    fn bytes(&self) -> usize {
        match self {
            Unit::Text(t) => t.len(),
            Unit::Record { prompt, response } => prompt.len() + response.len(),
        }
    }
}

/// How records are read and rendered.
struct Fields<'a> {
    format: DataFormat,
    text: &'a str,
    instruction: &'a str,
    context: &'a str,
    response: &'a str,
    template: &'a Template,
}

/// A JSONL line's object, or an error naming the file and line.
fn json_object(line: &[u8], file: &Path, n: u64) -> Result<serde_json::Map<String, Value>> {
    let value: Value = serde_json::from_slice(line)
        .map_err(|e| anyhow!("{}:{n}: not a JSON line: {e}", file.display()))?;
    match value {
        Value::Object(map) => Ok(map),
        other => bail!(
            "{}:{n}: a JSON {}, expected an object",
            file.display(),
            json_kind(&other)
        ),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The string field `name` (`None` when missing or null and `optional`).
fn field(
    map: &mut serde_json::Map<String, Value>,
    name: &str,
    flag: &str,
    optional: bool,
    file: &Path,
    n: u64,
) -> Result<String> {
    match map.remove(name) {
        Some(Value::String(s)) => Ok(s),
        None | Some(Value::Null) if optional => Ok(String::new()),
        None => bail!(
            "{}:{n}: no field {name:?} (set the field's name with {flag})",
            file.display()
        ),
        Some(other) => bail!(
            "{}:{n}: field {name:?} is a {}, expected a string",
            file.display(),
            json_kind(&other)
        ),
    }
}

fn jsonl_unit(line: &[u8], file: &Path, n: u64, f: &Fields) -> Result<Unit> {
    let mut map = json_object(line, file, n)?;
    match f.format {
        DataFormat::Text => Ok(Unit::Text(field(
            &mut map,
            f.text,
            "--text-field",
            false,
            file,
            n,
        )?)),
        DataFormat::Instruction => {
            let instruction = field(
                &mut map,
                f.instruction,
                "--instruction-field",
                false,
                file,
                n,
            )?;
            let context = field(&mut map, f.context, "--context-field", true, file, n)?;
            let response = field(&mut map, f.response, "--response-field", false, file, n)?;
            Ok(Unit::Record {
                prompt: f.template.render(&instruction, &context),
                response,
            })
        }
    }
}

fn utf8(bytes: Vec<u8>, file: &Path, n: Option<u64>) -> Result<String> {
    String::from_utf8(bytes).map_err(|e| {
        let at = n.map_or(String::new(), |n| format!(":{n}"));
        anyhow!(
            "{}{at}: not UTF-8 text (byte {} is invalid)",
            file.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

/// Reads an input file, handing each unit to `emit` with the bytes read
/// since the last one; returns the file's size, hash and unit count.
fn read_input(
    file: &Path,
    sep: DocSeparator,
    f: &Fields,
    emit: &mut dyn FnMut(Unit, u64) -> Result<()>,
) -> Result<Source> {
    let handle = File::open(file).with_context(|| format!("reading input {}", file.display()))?;
    if handle.metadata().map(|m| m.is_dir()).unwrap_or(false) {
        bail!("{}: a folder, expected a file", file.display());
    }
    let jsonl = file.extension().is_some_and(|e| e == "jsonl");
    if f.format == DataFormat::Instruction && !jsonl {
        bail!(
            "{}: --format instruction reads JSONL records (a .jsonl file)",
            file.display()
        );
    }
    let mut reader = BufReader::with_capacity(1 << 20, handle);
    let mut hash = Fnv1a::new();
    let mut bytes = 0u64;
    let mut documents = 0u64;
    let io = |e| anyhow::Error::new(e).context(format!("reading input {}", file.display()));
    if !jsonl && sep == DocSeparator::File {
        let mut all = Vec::new();
        reader.read_to_end(&mut all).map_err(io)?;
        hash.write(&all);
        bytes = all.len() as u64;
        documents = 1;
        emit(Unit::Text(utf8(all, file, None)?), bytes)?;
    } else {
        let mut line = Vec::new();
        let mut n = 0u64;
        let mut paragraph = String::new();
        let mut unreported = 0u64;
        loop {
            line.clear();
            let k = reader.read_until(b'\n', &mut line).map_err(io)?;
            if k == 0 {
                break;
            }
            n += 1;
            hash.write(&line);
            bytes += k as u64;
            unreported += k as u64;
            let blank = line.iter().all(u8::is_ascii_whitespace);
            if jsonl {
                if !blank {
                    documents += 1;
                    emit(
                        jsonl_unit(&line, file, n, f)?,
                        std::mem::take(&mut unreported),
                    )?;
                }
                continue;
            }
            let text = utf8(std::mem::take(&mut line), file, Some(n))?;
            match sep {
                DocSeparator::Line if !blank => {
                    documents += 1;
                    let doc = text.strip_suffix('\n').unwrap_or(&text);
                    let doc = doc.strip_suffix('\r').unwrap_or(doc);
                    emit(Unit::Text(doc.to_string()), std::mem::take(&mut unreported))?;
                }
                DocSeparator::BlankLine if blank && !paragraph.is_empty() => {
                    documents += 1;
                    let doc = paragraph.trim_end_matches(['\n', '\r']).to_string();
                    paragraph.clear();
                    emit(Unit::Text(doc), std::mem::take(&mut unreported))?;
                }
                DocSeparator::BlankLine if !blank => paragraph.push_str(&text),
                _ => {}
            }
        }
        if !paragraph.is_empty() {
            documents += 1;
            let doc = paragraph.trim_end_matches(['\n', '\r']).to_string();
            emit(Unit::Text(doc), unreported)?;
        }
    }
    Ok(Source {
        file: file.display().to_string(),
        bytes,
        fnv1a: format!("{:016x}", hash.finish()),
        documents,
    })
}

// ----- prepare ---------------------------------------------------------------

/// Text per tokenizer batch: large enough to keep every thread busy, small
/// enough to bound memory.
const BATCH_BYTES: usize = 4 << 20;

/// Tokenizes batches in parallel and hands the ids to the writer in order.
struct Sink<'a> {
    tokenizer: &'a Tokenizer,
    pool: &'a rayon::ThreadPool,
    writer: data::Writer,
    rows: RowLayout,
    overlong: Overlong,
    batch: Vec<Unit>,
    batch_bytes: usize,
    progress: ProgressBar,
    /// Input bytes read for the units in `batch`.
    batch_read: u64,
    eos: u32,
    /// Records truncated to fit their row.
    truncated: u64,
}

impl Sink<'_> {
    fn push(&mut self, unit: Unit, read: u64) -> Result<()> {
        self.batch_bytes += unit.bytes();
        self.batch_read += read;
        self.batch.push(unit);
        if self.batch_bytes >= BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        let batch = std::mem::take(&mut self.batch);
        let tokenizer = self.tokenizer;
        let encoded: Vec<Result<(Vec<u32>, usize)>> = self.pool.install(|| {
            batch
                .par_iter()
                .map(|unit| match unit {
                    Unit::Text(t) => Ok((encode(tokenizer, t)?, 0)),
                    Unit::Record { prompt, response } => {
                        let mut ids = encode(tokenizer, prompt)?;
                        let p = ids.len();
                        ids.extend(encode(tokenizer, response)?);
                        Ok((ids, p))
                    }
                })
                .collect()
        });
        for (unit, result) in batch.iter().zip(encoded) {
            let (mut ids, prompt) = result?;
            match unit {
                Unit::Text(_) if ids.is_empty() => self.writer.drop_document(0),
                Unit::Text(_) => de(self.writer.push_document(&ids, &[]))?,
                Unit::Record { .. } => {
                    let mut flags = vec![false; prompt];
                    flags.resize(ids.len(), true);
                    match self.rows {
                        RowLayout::Packed => de(self.writer.push_document(&ids, &flags))?,
                        RowLayout::Padded => {
                            ids.push(self.eos);
                            flags.push(true);
                            let width = self.writer.layout().seq_len as usize + 1;
                            // Truncation keeps a record when a response
                            // token still fits in the row as a label: ids
                            // 1..width are labels, response ids start at
                            // `prompt`.
                            if ids.len() > width
                                && self.overlong == Overlong::Truncate
                                && prompt < width
                            {
                                self.truncated += 1;
                                let cut = (ids.len() - width) as u64;
                                ids.truncate(width);
                                flags.truncate(width);
                                // The cut tokens are input left out.
                                self.writer.drop_tokens(cut);
                            }
                            de(self.writer.push_padded(&ids, &flags))?;
                        }
                    }
                }
            }
        }
        self.progress.inc(self.batch_read);
        self.batch_read = 0;
        self.batch_bytes = 0;
        Ok(())
    }
}

fn prepare(args: &PrepareArgs) -> Result<()> {
    let started = Instant::now();
    let (tokenizer, tokenizer_bytes) = load_tokenizer(&args.tokenizer)?;
    let tpath = &args.tokenizer;
    let vocab_size = tokenizer.get_vocab_size(true) as u64;
    let (eos_id, eos_token) = resolve_token(
        &tokenizer,
        tpath,
        args.eos_token.as_deref(),
        "--eos-token",
        &["</s>", "<|endoftext|>", "<|end_of_text|>"],
    )?
    .ok_or_else(|| {
        anyhow!(
            "{} has none of </s>, <|endoftext|>, <|end_of_text|>: pass --eos-token NAME or ID",
            tpath.display()
        )
    })?;
    let (pad_id, pad_token) = resolve_token(
        &tokenizer,
        tpath,
        args.pad_token.as_deref(),
        "--pad-token",
        &["<pad>", "[PAD]", "<|pad|>"],
    )?
    .unwrap_or((eos_id, eos_token.clone()));
    let (template_text, template_name) = match &args.template {
        Some(p) => (
            std::fs::read_to_string(p)
                .with_context(|| format!("reading template {}", p.display()))?,
            p.display().to_string(),
        ),
        None => (DEFAULT_TEMPLATE.to_string(), "the default template".into()),
    };
    let template = Template::parse(&template_text, &template_name)?;
    let instruction = args.format == DataFormat::Instruction;
    let rows = if args.pack {
        RowLayout::Packed
    } else {
        RowLayout::Padded
    };
    let last_row = match args.last_row {
        LastRowArg::Drop => LastRow::Drop,
        LastRowArg::Pad => LastRow::Pad,
    };
    let format = if instruction {
        Format::Instruction {
            template: template_text.clone(),
            instruction_field: args.instruction_field.clone(),
            context_field: args.context_field.clone(),
            response_field: args.response_field.clone(),
            rows,
        }
    } else {
        Format::Text
    };
    for input in &args.inputs {
        if !input.is_file() {
            bail!("input {}: no such file", input.display());
        }
    }
    let total: u64 = args
        .inputs
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    let threads = if args.threads == 0 {
        std::thread::available_parallelism().map_or(1, usize::from)
    } else {
        args.threads
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .context("starting the tokenizer threads")?;
    let layout = Layout {
        vocab_size,
        seq_len: args.seq_len,
        eos_id,
        pad_id,
        mask: instruction || last_row == LastRow::Pad,
    };
    let writer = de(data::begin(&args.out, layout, args.force))?;
    // Hidden when stderr is not a terminal.
    let progress = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{bar:30} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
    ) {
        progress.set_style(style);
    }
    let mut sink = Sink {
        tokenizer: &tokenizer,
        pool: &pool,
        writer,
        rows: if instruction { rows } else { RowLayout::Packed },
        overlong: args.overlong,
        batch: Vec::new(),
        batch_bytes: 0,
        progress,
        batch_read: 0,
        eos: eos_id,
        truncated: 0,
    };
    let fields = Fields {
        format: args.format,
        text: &args.text_field,
        instruction: &args.instruction_field,
        context: &args.context_field,
        response: &args.response_field,
        template: &template,
    };
    let mut sources = Vec::new();
    for input in &args.inputs {
        let source = read_input(input, args.doc_separator, &fields, &mut |unit, read| {
            sink.push(unit, read)
        })?;
        sources.push(source);
    }
    sink.flush()?;
    sink.progress.finish_and_clear();
    let truncated = sink.truncated;
    if sources.iter().all(|s| s.documents == 0) {
        bail!(
            "the inputs hold no {}: {}",
            if instruction { "record" } else { "text" },
            args.inputs
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let info = TokenizerInfo {
        file: tpath.display().to_string(),
        fnv1a: format!("{:016x}", fnv1a(&tokenizer_bytes)),
        vocab_size,
        eos_id,
        eos_token,
        pad_id,
        pad_token,
    };
    let (dir, manifest) = de(sink.writer.finish(format, info, sources, last_row))?;
    let seconds = started.elapsed().as_secs_f64();
    report(args, &dir, &manifest, truncated, seconds, threads);
    Ok(())
}

#[allow(clippy::print_stdout)]
fn report(
    args: &PrepareArgs,
    dir: &Path,
    m: &Manifest,
    truncated: u64,
    seconds: f64,
    threads: usize,
) {
    let c = &m.counts;
    let bytes: u64 = m.sources.iter().map(|s| s.bytes).sum();
    let mb_per_s = bytes as f64 / 1e6 / seconds.max(1e-9);
    let tokens_per_s = c.tokens as f64 / seconds.max(1e-9);
    if args.json {
        let value = json!({
            "out": dir.display().to_string(),
            "counts": c,
            "records_truncated": truncated,
            "dtype": m.dtype,
            "seq_len": m.seq_len,
            "input_bytes": bytes,
            "seconds": seconds,
            "threads": threads,
            "mb_per_s": mb_per_s,
            "tokens_per_s": tokens_per_s,
        });
        println!("{value}");
        return;
    }
    println!(
        "prepared {}: {} rows of {} ids ({:?}), {} tokens, {} count in the loss, {} masked, {} pad",
        dir.display(),
        c.rows,
        m.row_ids(),
        m.dtype,
        c.tokens,
        c.loss_tokens,
        c.masked_tokens,
        c.pad_tokens
    );
    println!(
        "{} documents in the rows; {} left out ({} tokens){}",
        c.documents,
        c.documents_dropped,
        c.tokens_dropped,
        if truncated > 0 {
            format!("; {truncated} records truncated")
        } else {
            String::new()
        }
    );
    println!(
        "read {} files, {:.2} MB in {seconds:.2} s on {threads} threads: {mb_per_s:.2} MB/s, {tokens_per_s:.0} tokens/s",
        m.sources.len(),
        bytes as f64 / 1e6
    );
}

// ----- train-tokenizer -------------------------------------------------------

#[allow(clippy::print_stdout)]
fn train_tokenizer(args: &TrainArgs) -> Result<()> {
    use tokenizers::AddedToken;
    use tokenizers::decoders::byte_level::ByteLevel;
    use tokenizers::models::TrainerWrapper;
    use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
    let mut files = Vec::new();
    for input in &args.inputs {
        if !input.is_file() {
            bail!("input {}: no such file", input.display());
        }
        files.push(input.to_string_lossy().into_owned());
    }
    let specials: Vec<AddedToken> = args
        .special_tokens
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| AddedToken::from(s.clone(), true))
        .collect();
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(args.vocab_size)
        .min_frequency(2)
        .special_tokens(specials)
        // Every byte is a token: nothing is ever unknown, so decoding is lossless.
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    let mut tokenizer = Tokenizer::new(BPE::default());
    // No prefix space: decode(encode(text)) == text.
    let byte_level = ByteLevel::new(false, true, true);
    tokenizer.with_pre_tokenizer(Some(byte_level));
    tokenizer.with_decoder(Some(byte_level));
    tokenizer
        .train_from_files(&mut trainer, files)
        .map_err(|e| anyhow!("training the tokenizer: {e}"))?;
    write_atomic_at(&args.out, |tmp| {
        tokenizer
            .save(tmp, false)
            .map_err(|e| std::io::Error::other(e.to_string()))
    })
    .with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "wrote {}: byte-level BPE, {} ids",
        args.out.display(),
        tokenizer.get_vocab_size(true)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_template_is_alpacas_with_and_without_input() {
        let t = Template::parse(DEFAULT_TEMPLATE, "default").expect("parses");
        assert_eq!(
            t.render("Add 2 and 3.", ""),
            "Below is an instruction that describes a task. Write a response that \
             appropriately completes the request.\n\n### Instruction:\nAdd 2 and 3.\n\n\
             ### Response:\n"
        );
        assert_eq!(
            t.render("Sum them.", "2, 3"),
            "Below is an instruction that describes a task, paired with an input that \
             provides further context. Write a response that appropriately completes the \
             request.\n\n### Instruction:\nSum them.\n\n### Input:\n2, 3\n\n### Response:\n"
        );
    }

    #[test]
    fn templates_with_unknown_placeholders_or_open_sections_are_errors() {
        let t = Template::parse("{{x}} {instruction}: {context}", "t").expect("parses");
        assert_eq!(t.render("i", "c"), "{x} i: c");
        for (text, needle) in [
            (
                "{instruction} {input}",
                "line 1: unknown placeholder {input}",
            ),
            ("{context}", "no {instruction}"),
            ("{instruction}\n{?context}", "never closed"),
            ("{instruction}\n{/context}", "line 2: {/context} without"),
            ("{instruction} {", "unclosed"),
        ] {
            let err = Template::parse(text, "t").expect_err(text).to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
