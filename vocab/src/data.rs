//! The prepared-data format: what `autopart data prepare` writes and the
//! runtime reads (no tokenizer and no libtorch here; both sides share this
//! module so the layout has one definition).
//!
//! ```text
//! DIR/                 a complete prepared data set (renamed into place last)
//!   manifest.json      format version, tokenizer (file, FNV-1a hash, vocab
//!                      size, EOS and pad ids), dtype, seq_len, counts, the
//!                      source files with their sizes and hashes, the
//!                      format (text or instruction) and its template
//!   tokens.bin         rows × (seq_len + 1) token ids, little-endian u16 or
//!                      u32 (u16 when the vocabulary has at most 65536 ids)
//!   mask.bin           rows × seq_len bytes, one per label position:
//!                      1 = the label counts in the loss and in the token
//!                      count, 0 = it does not (prompt or padding); present
//!                      for instruction data and for padded rows only
//!   docs.bin           the document index: one u64 LE per document, the
//!                      position in tokens.bin (in ids, row · (seq_len + 1)
//!                      + column) of the document's first token, increasing
//! DIR.partial/         a preparation in progress, or one a crash interrupted
//! DIR.deleting/        the folder a `--force` run replaced, being removed
//! ```
//!
//! Rows are fixed-size, so the row index is implicit: row `i` is ids
//! `i·(seq_len+1) .. (i+1)·(seq_len+1)` of `tokens.bin`. A row's tokens are
//! its first `seq_len` ids, its labels its last `seq_len` (the next token of
//! each), and `mask.bin`'s row `i` is aligned with the labels. Packed rows
//! cut one token stream (documents, each followed by EOS) so that row
//! `i + 1` starts with row `i`'s last token: every token after the first is
//! a label exactly once, as in the flat token files of nanoGPT. Padded rows
//! (one instruction record each) stand alone and end in pad ids whose
//! label positions have mask 0.
//!
//! Durability: every file is written into `DIR.partial`, fsynced, the
//! manifest last; then the folder is renamed to `DIR`. A folder without
//! `manifest.json`, or named `.partial`, is never complete. This module
//! must not depend on how the ids were made (tokenizers live in the
//! compiler's CLI).

use crate::fs::{sync_dir, write_atomic};
use crate::hash::Fnv1a;
use serde::{Deserialize, Serialize};
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// The format version in every manifest.
pub const FORMAT: u32 = 1;
/// The manifest's file name: written last, present only in a complete folder.
pub const MANIFEST: &str = "manifest.json";
pub const TOKENS: &str = "tokens.bin";
pub const MASK: &str = "mask.bin";
pub const DOCS: &str = "docs.bin";
const PARTIAL: &str = ".partial";
const DELETING: &str = ".deleting";

/// The width of one token id in `tokens.bin`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenDtype {
    /// Two bytes, little-endian: vocabularies of at most 65536 ids.
    U16,
    /// Four bytes, little-endian.
    U32,
}

impl TokenDtype {
    /// The narrowest width that holds every id below `vocab_size`.
    pub fn for_vocab(vocab_size: u64) -> Self {
        if vocab_size <= 1 << 16 {
            TokenDtype::U16
        } else {
            TokenDtype::U32
        }
    }

    /// Bytes per id.
    pub fn width(self) -> u64 {
        match self {
            TokenDtype::U16 => 2,
            TokenDtype::U32 => 4,
        }
    }

    /// The largest vocabulary this width holds.
    pub fn max_vocab(self) -> u64 {
        match self {
            TokenDtype::U16 => 1 << 16,
            TokenDtype::U32 => 1 << 32,
        }
    }

    fn encode(self, id: u32, out: &mut Vec<u8>) {
        match self {
            // The writer checked id < vocab_size <= 65536.
            TokenDtype::U16 => out.extend_from_slice(&(id as u16).to_le_bytes()),
            TokenDtype::U32 => out.extend_from_slice(&id.to_le_bytes()),
        }
    }
}

/// How the rows were made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", deny_unknown_fields)]
pub enum Format {
    /// Plain documents, packed.
    Text,
    /// Instruction / context / response records rendered through `template`;
    /// the mask covers the response tokens and the EOS after them.
    Instruction {
        /// The prompt template (`{instruction}`, `{context}`, and an optional
        /// `{?context}...{/context}` section kept only when there is context).
        template: String,
        /// The JSONL fields read.
        instruction_field: String,
        context_field: String,
        response_field: String,
        /// One record per row (`padded`) or records packed into rows (`packed`).
        rows: RowLayout,
    },
}

/// How records are laid into rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RowLayout {
    /// One stream cut into rows that share their boundary token.
    Packed,
    /// One record per row, filled up with pad ids.
    Padded,
}

/// The tokenizer the ids come from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerInfo {
    /// The tokenizer file as given to `prepare`.
    pub file: String,
    /// FNV-1a (64-bit) of the tokenizer file's bytes, 16 hex digits.
    pub fnv1a: String,
    /// Ids run from 0 to `vocab_size - 1` (added tokens included).
    pub vocab_size: u64,
    pub eos_id: u32,
    pub eos_token: String,
    pub pad_id: u32,
    pub pad_token: String,
}

/// One input file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    pub file: String,
    pub bytes: u64,
    /// FNV-1a (64-bit) of its bytes, 16 hex digits.
    pub fnv1a: String,
    /// Documents (text) or records (instruction) read from it.
    pub documents: u64,
}

/// A data file's size and FNV-1a hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSum {
    pub file: String,
    pub bytes: u64,
    pub fnv1a: String,
}

/// What was read and what was left out.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Counts {
    /// Rows in `tokens.bin`.
    pub rows: u64,
    /// Ids of the inputs kept in the rows (document tokens and EOS; each
    /// token once, padding not counted).
    pub tokens: u64,
    /// Label positions with mask 1: what the loss averages over.
    pub loss_tokens: u64,
    /// Label positions with mask 0 (prompts, padding); `loss_tokens +
    /// masked_tokens = rows · seq_len`.
    pub masked_tokens: u64,
    /// Pad ids written.
    pub pad_tokens: u64,
    /// Documents (or records) whose first token is in the rows: `docs.bin`'s entries.
    pub documents: u64,
    /// Documents read but not in the rows: empty ones, records too long
    /// for a row (padded layout), or the ones in a dropped last row.
    pub documents_dropped: u64,
    /// Tokens of the inputs not in any row (a dropped last row, dropped records).
    pub tokens_dropped: u64,
}

/// `manifest.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    pub format: Format,
    pub tokenizer: TokenizerInfo,
    pub dtype: TokenDtype,
    /// Tokens per row fed to the model; rows hold `seq_len + 1` ids.
    pub seq_len: u64,
    pub counts: Counts,
    pub sources: Vec<Source>,
    /// `tokens.bin`, `docs.bin` and (when there is one) `mask.bin`.
    pub files: Vec<FileSum>,
}

impl Manifest {
    /// Ids per row in `tokens.bin`.
    pub fn row_ids(&self) -> u64 {
        self.seq_len.saturating_add(1)
    }

    /// Whether there is a `mask.bin`.
    pub fn has_mask(&self) -> bool {
        self.files.iter().any(|f| f.file == MASK)
    }
}

/// Everything that can go wrong writing or reading prepared data; each
/// names the file and what was expected.
#[derive(Debug, Error)]
pub enum DataError {
    #[error("{}: {error}", path.display())]
    Io { path: PathBuf, error: io::Error },
    #[error("{}: {msg}", path.display())]
    Format { path: PathBuf, msg: String },
    #[error(
        "{} already exists: pass --force to replace it, or choose another --out",
        path.display()
    )]
    Exists { path: PathBuf },
    #[error("{}: row {row} is out of range (the data has {rows} rows)", path.display())]
    RowOutOfRange { path: PathBuf, row: u64, rows: u64 },
    #[error(
        "{}: row {row} column {column} holds id {id}, not below the vocabulary size {vocab_size}",
        path.display()
    )]
    IdOutOfRange {
        path: PathBuf,
        row: u64,
        column: u64,
        id: u64,
        vocab_size: u64,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DataError + '_ {
    move |error| DataError::Io {
        path: path.to_path_buf(),
        error,
    }
}

fn format_err(path: &Path, msg: impl Into<String>) -> DataError {
    DataError::Format {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// `DIR.partial` (a sibling of `DIR`), where a preparation writes.
pub fn partial_dir(dir: &Path) -> PathBuf {
    sibling(dir, PARTIAL)
}

fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    dir.with_file_name(name)
}

fn hex(h: u64) -> String {
    format!("{h:016x}")
}

// ----- writing ---------------------------------------------------------------

/// What the rows need to know about the ids: their range, the EOS and pad
/// ids, the row length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub vocab_size: u64,
    pub seq_len: u64,
    pub eos_id: u32,
    pub pad_id: u32,
    /// Whether `mask.bin` is written (instruction data; text data written
    /// with a padded last row).
    pub mask: bool,
}

/// What ends the stream when it does not fill a last row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LastRow {
    /// The tokens after the last full row are left out (and counted).
    Drop,
    /// The last row is filled up with pad ids (mask 0).
    Pad,
}

/// A writer of `DIR.partial`: rows go in through [`Writer::push_document`]
/// (packed) or [`Writer::push_padded`] (one row each), then [`Writer::finish`]
/// writes the manifest and renames the folder to `DIR`. Dropping a writer
/// without finishing removes `DIR.partial`.
#[derive(Debug)]
pub struct Writer {
    dir: PathBuf,
    partial: PathBuf,
    layout: Layout,
    dtype: TokenDtype,
    /// The open files (taken by `finish`).
    files: Option<Files>,
    /// The packed stream's ids not yet in a row, with their loss flags; its
    /// first id is the last id of the previous row (when there is one).
    pending: Vec<u32>,
    pending_flags: Vec<bool>,
    /// Documents whose first token is in `pending`, as positions in it.
    pending_docs: Vec<usize>,
    counts: Counts,
    finished: bool,
    scratch: Vec<u8>,
}

#[derive(Debug)]
struct Files {
    tokens: HashedFile,
    mask: Option<HashedFile>,
    docs: HashedFile,
}

/// A buffered file that hashes and counts what goes through it.
#[derive(Debug)]
struct HashedFile {
    path: PathBuf,
    out: BufWriter<File>,
    hash: Fnv1a,
    bytes: u64,
}

impl HashedFile {
    fn create(path: PathBuf) -> Result<Self, DataError> {
        let file = File::create(&path).map_err(io_err(&path))?;
        Ok(Self {
            out: BufWriter::with_capacity(1 << 20, file),
            path,
            hash: Fnv1a::new(),
            bytes: 0,
        })
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), DataError> {
        self.hash.write(bytes);
        self.bytes += bytes.len() as u64;
        self.out.write_all(bytes).map_err(io_err(&self.path))
    }

    fn close(self, name: &str) -> Result<FileSum, DataError> {
        let file = self
            .out
            .into_inner()
            .map_err(|e| io_err(&self.path)(e.into_error()))?;
        file.sync_all().map_err(io_err(&self.path))?;
        Ok(FileSum {
            file: name.to_string(),
            bytes: self.bytes,
            fnv1a: hex(self.hash.finish()),
        })
    }
}

/// Starts writing `dir`: refuses an existing `dir` unless `force`, removes a
/// `DIR.partial` a crashed run left, and creates a fresh one.
pub fn begin(dir: &Path, layout: Layout, force: bool) -> Result<Writer, DataError> {
    if dir.file_name().is_none() {
        return Err(format_err(dir, "the output must name a folder"));
    }
    if layout.seq_len == 0 {
        return Err(format_err(dir, "seq_len must be at least 1"));
    }
    if layout.vocab_size == 0 || layout.vocab_size > 1 << 32 {
        return Err(format_err(
            dir,
            format!(
                "a vocabulary of {} ids: expected 1 to 2^32",
                layout.vocab_size
            ),
        ));
    }
    for (what, id) in [("EOS", layout.eos_id), ("pad", layout.pad_id)] {
        if u64::from(id) >= layout.vocab_size {
            return Err(format_err(
                dir,
                format!(
                    "the {what} id {id} is not below the vocabulary size {}",
                    layout.vocab_size
                ),
            ));
        }
    }
    if fs::symlink_metadata(dir).is_ok() && !force {
        return Err(DataError::Exists {
            path: dir.to_path_buf(),
        });
    }
    let partial = partial_dir(dir);
    if fs::symlink_metadata(&partial).is_ok() {
        fs::remove_dir_all(&partial).map_err(io_err(&partial))?;
    }
    fs::create_dir_all(&partial).map_err(io_err(&partial))?;
    let tokens = HashedFile::create(partial.join(TOKENS))?;
    let docs = HashedFile::create(partial.join(DOCS))?;
    let mask = if layout.mask {
        Some(HashedFile::create(partial.join(MASK))?)
    } else {
        None
    };
    Ok(Writer {
        dir: dir.to_path_buf(),
        partial,
        dtype: TokenDtype::for_vocab(layout.vocab_size),
        layout,
        files: Some(Files { tokens, mask, docs }),
        pending: Vec::new(),
        pending_flags: Vec::new(),
        pending_docs: Vec::new(),
        counts: Counts::default(),
        finished: false,
        scratch: Vec::new(),
    })
}

impl Writer {
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    fn files(&mut self) -> Result<&mut Files, DataError> {
        match &mut self.files {
            Some(files) => Ok(files),
            None => Err(format_err(&self.partial, "written to after finish")),
        }
    }

    fn check_ids(&self, ids: &[u32]) -> Result<(), DataError> {
        match ids
            .iter()
            .find(|&&id| u64::from(id) >= self.layout.vocab_size)
        {
            Some(id) => Err(format_err(
                &self.partial,
                format!(
                    "the tokenizer produced id {id}, not below its vocabulary size {}",
                    self.layout.vocab_size
                ),
            )),
            None => Ok(()),
        }
    }

    /// Appends one document to the packed stream: its ids, each with its
    /// loss flag (`flags` empty: every label counts), then EOS (whose label
    /// counts). Full rows are written as they form.
    pub fn push_document(&mut self, ids: &[u32], flags: &[bool]) -> Result<(), DataError> {
        if !flags.is_empty() && flags.len() != ids.len() {
            return Err(format_err(
                &self.partial,
                format!("{} ids but {} loss flags", ids.len(), flags.len()),
            ));
        }
        self.check_ids(ids)?;
        // The first id of the stream is never a label; a document starting
        // there is still in the rows.
        self.pending_docs.push(self.pending.len());
        self.pending.extend_from_slice(ids);
        self.pending.push(self.layout.eos_id);
        if flags.is_empty() {
            self.pending_flags.resize(self.pending.len(), true);
        } else {
            self.pending_flags.extend_from_slice(flags);
            self.pending_flags.push(true);
        }
        let width = self.layout.seq_len as usize + 1;
        let mut start = 0;
        while self.pending.len() - start >= width {
            self.write_packed_row(start, width)?;
            start += width - 1;
        }
        if start > 0 {
            self.pending.drain(..start);
            self.pending_flags.drain(..start);
            self.pending_docs.retain_mut(|p| {
                let keep = *p >= start;
                *p = p.wrapping_sub(start);
                keep
            });
        }
        Ok(())
    }

    /// Writes `pending[start .. start + width]` as a row; documents starting
    /// in it (and not at its shared first id, already in the previous row)
    /// go into the index.
    fn write_packed_row(&mut self, start: usize, width: usize) -> Result<(), DataError> {
        let first = self.counts.rows * width as u64;
        let shared = usize::from(self.counts.rows > 0);
        let starts: Vec<u64> = self
            .pending_docs
            .iter()
            .filter(|&&p| p >= start + shared && p < start + width)
            .map(|&p| first + (p - start) as u64)
            .collect();
        for position in starts {
            self.write_doc(position)?;
        }
        self.pending_docs.retain(|&p| p >= start + width);
        self.counts.tokens += (width - shared) as u64;
        let mut bytes = std::mem::take(&mut self.scratch);
        bytes.clear();
        for &id in &self.pending[start..start + width] {
            self.dtype.encode(id, &mut bytes);
        }
        let mask: Vec<u8> = self.pending_flags[start + 1..start + width]
            .iter()
            .map(|&f| u8::from(f))
            .collect();
        self.files()?.tokens.write(&bytes)?;
        self.write_mask(&mask)?;
        self.scratch = bytes;
        self.counts.rows += 1;
        Ok(())
    }

    fn write_doc(&mut self, position: u64) -> Result<(), DataError> {
        self.counts.documents += 1;
        self.files()?.docs.write(&position.to_le_bytes())
    }

    fn write_mask(&mut self, mask: &[u8]) -> Result<(), DataError> {
        let ones = mask.iter().filter(|&&m| m == 1).count() as u64;
        self.counts.loss_tokens += ones;
        self.counts.masked_tokens += mask.len() as u64 - ones;
        match &mut self.files()?.mask {
            Some(file) => file.write(mask),
            None if ones == mask.len() as u64 => Ok(()),
            None => Err(format_err(
                &self.partial,
                "a row with masked labels, but the layout has no mask",
            )),
        }
    }

    /// Writes one record as its own row: `ids` (already ending in EOS, if it
    /// should), each with its loss flag, filled up with pad ids. Returns
    /// false (and counts the record as dropped) when it does not fit.
    pub fn push_padded(&mut self, ids: &[u32], flags: &[bool]) -> Result<bool, DataError> {
        if flags.len() != ids.len() {
            return Err(format_err(
                &self.partial,
                format!("{} ids but {} loss flags", ids.len(), flags.len()),
            ));
        }
        self.check_ids(ids)?;
        let width = self.layout.seq_len as usize + 1;
        if ids.len() > width || ids.len() < 2 {
            self.counts.documents_dropped += 1;
            self.counts.tokens_dropped += ids.len() as u64;
            return Ok(false);
        }
        self.write_doc(self.counts.rows * width as u64)?;
        let mut bytes = std::mem::take(&mut self.scratch);
        bytes.clear();
        for &id in ids {
            self.dtype.encode(id, &mut bytes);
        }
        let pads = width - ids.len();
        for _ in 0..pads {
            self.dtype.encode(self.layout.pad_id, &mut bytes);
        }
        self.files()?.tokens.write(&bytes)?;
        self.scratch = bytes;
        let mut mask: Vec<u8> = flags[1..].iter().map(|&f| u8::from(f)).collect();
        mask.resize(width - 1, 0);
        self.write_mask(&mask)?;
        self.counts.tokens += ids.len() as u64;
        self.counts.pad_tokens += pads as u64;
        self.counts.rows += 1;
        Ok(true)
    }

    /// Counts a document that was read but left out before it reached the
    /// writer (empty, or too long).
    pub fn drop_document(&mut self, tokens: u64) {
        self.counts.documents_dropped += 1;
        self.counts.tokens_dropped += tokens;
    }

    /// Counts input tokens left out of a record that was kept (truncated).
    pub fn drop_tokens(&mut self, tokens: u64) {
        self.counts.tokens_dropped += tokens;
    }

    /// Ends the packed stream (its last partial row dropped or padded),
    /// writes the manifest and renames `DIR.partial` to `DIR` (an existing
    /// `DIR` is renamed aside first and removed after). Fails when no row
    /// was written.
    pub fn finish(
        mut self,
        format: Format,
        tokenizer: TokenizerInfo,
        sources: Vec<Source>,
        last_row: LastRow,
    ) -> Result<(PathBuf, Manifest), DataError> {
        let width = self.layout.seq_len as usize + 1;
        let shared = usize::from(self.counts.rows > 0);
        // Ids beyond the previous row's shared last one.
        let rest = self.pending.len().saturating_sub(shared);
        if rest > 0 {
            let docs_left = self.pending_docs.iter().filter(|&&p| p >= shared).count() as u64;
            match last_row {
                LastRow::Pad if self.pending.len() >= 2 => {
                    let pads = width - self.pending.len();
                    let n = self.pending.len();
                    self.pending.resize(width, self.layout.pad_id);
                    self.pending_flags.resize(width, false);
                    self.write_packed_row(0, width)?;
                    // The pad ids are not input tokens.
                    self.counts.tokens -= pads as u64;
                    self.counts.pad_tokens += pads as u64;
                    debug_assert!(n + pads == width);
                }
                _ => {
                    self.counts.documents_dropped += docs_left;
                    self.counts.tokens_dropped += rest as u64;
                }
            }
        }
        if self.counts.rows == 0 {
            return Err(format_err(
                &self.dir,
                format!(
                    "the inputs make no row: {} tokens were read, a row needs {} (seq_len + 1); \
                     pass a smaller --seq-len{}",
                    self.counts.tokens_dropped,
                    width,
                    if matches!(format, Format::Text) {
                        " or --last-row pad"
                    } else {
                        ""
                    }
                ),
            ));
        }
        let Files { tokens, mask, docs } = self
            .files
            .take()
            .ok_or_else(|| format_err(&self.partial, "finished twice"))?;
        let mut files = vec![tokens.close(TOKENS)?, docs.close(DOCS)?];
        if let Some(mask) = mask {
            files.push(mask.close(MASK)?);
        }
        let manifest = Manifest {
            format_version: FORMAT,
            format,
            tokenizer,
            dtype: self.dtype,
            seq_len: self.layout.seq_len,
            counts: self.counts.clone(),
            sources,
            files,
        };
        let path = self.partial.join(MANIFEST);
        let mut json =
            serde_json::to_vec_pretty(&manifest).map_err(|e| format_err(&path, e.to_string()))?;
        json.push(b'\n');
        write_atomic(&path, &json).map_err(io_err(&path))?;
        replace_dir(&self.partial, &self.dir)?;
        self.finished = true;
        Ok((self.dir.clone(), manifest))
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if !self.finished {
            // Best effort: a folder named .partial is never read as data,
            // and the next run removes it anyway.
            let _ = fs::remove_dir_all(&self.partial);
        }
    }
}

/// Renames `partial` to `dir`; an existing `dir` is renamed to
/// `DIR.deleting` first and removed after, so a crash in between leaves
/// one complete folder (`dir`, old or new) or the new one still `.partial`.
fn replace_dir(partial: &Path, dir: &Path) -> Result<(), DataError> {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    sync_dir(partial);
    let old = fs::symlink_metadata(dir)
        .is_ok()
        .then(|| sibling(dir, DELETING));
    if let Some(old) = &old {
        if fs::symlink_metadata(old).is_ok() {
            fs::remove_dir_all(old).map_err(io_err(old))?;
        }
        fs::rename(dir, old).map_err(io_err(dir))?;
    }
    fs::rename(partial, dir).map_err(io_err(dir))?;
    sync_dir(&parent);
    if let Some(old) = &old {
        let removed = if old.is_dir() {
            fs::remove_dir_all(old)
        } else {
            fs::remove_file(old)
        };
        removed.map_err(io_err(old))?;
    }
    Ok(())
}

// ----- reading ---------------------------------------------------------------

/// One row: `tokens` (the model's input), `labels` (the next token of
/// each) and `mask` (1 = the label counts), each `seq_len` long.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Row {
    pub tokens: Vec<u32>,
    pub labels: Vec<u32>,
    pub mask: Vec<u8>,
}

/// A prepared data folder, checked at open: the manifest's values agree
/// with each other and with the files' sizes. Rows are read with
/// positioned reads (`&self`, so threads can share one).
#[derive(Debug)]
pub struct PreparedData {
    dir: PathBuf,
    manifest: Manifest,
    tokens: File,
    mask: Option<File>,
}

/// The largest manifest read (a real one is a few KiB per thousand sources).
const MAX_MANIFEST_BYTES: u64 = 64 << 20;

impl PreparedData {
    /// Opens `dir` and checks it: the manifest parses and is of this format
    /// version, its dtype holds its vocabulary, EOS and pad ids are in it,
    /// the counts add up, and `tokens.bin`, `mask.bin` and `docs.bin` have
    /// exactly the sizes the manifest implies (the ids themselves are
    /// checked as rows are read, and all at once by [`PreparedData::verify`]).
    pub fn open(dir: &Path) -> Result<Self, DataError> {
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.ends_with(PARTIAL) || name.ends_with(DELETING) {
            return Err(format_err(
                dir,
                format!(
                    "not complete prepared data: a folder named {PARTIAL} is a preparation a \
                     crash interrupted ({DELETING}: one being removed); run prepare again"
                ),
            ));
        }
        let manifest = read_manifest(dir)?;
        let m = &manifest;
        let mpath = dir.join(MANIFEST);
        let bad = |msg: String| Err(format_err(&mpath, msg));
        if m.seq_len == 0 || m.seq_len > 1 << 32 {
            return bad(format!("seq_len {}: expected 1 to 2^32", m.seq_len));
        }
        let vocab = m.tokenizer.vocab_size;
        if vocab == 0 || vocab > m.dtype.max_vocab() {
            return bad(format!(
                "vocab_size {vocab}: expected 1 to {} for dtype {:?}",
                m.dtype.max_vocab(),
                m.dtype
            ));
        }
        if m.dtype != TokenDtype::for_vocab(vocab) {
            return bad(format!(
                "dtype {:?} for a vocabulary of {vocab}: expected {:?}",
                m.dtype,
                TokenDtype::for_vocab(vocab)
            ));
        }
        for (what, id) in [
            ("eos_id", m.tokenizer.eos_id),
            ("pad_id", m.tokenizer.pad_id),
        ] {
            if u64::from(id) >= vocab {
                return bad(format!(
                    "{what} {id} is not below the vocabulary size {vocab}"
                ));
            }
        }
        let c = &m.counts;
        if c.rows == 0 {
            return bad("0 rows: expected at least one".into());
        }
        let labels = c.rows.checked_mul(m.seq_len);
        let row_bytes = m.row_ids().checked_mul(m.dtype.width());
        let (Some(labels), Some(token_bytes)) =
            (labels, row_bytes.and_then(|b| b.checked_mul(c.rows)))
        else {
            return bad(format!(
                "{} rows of {} ids overflow a file size",
                c.rows,
                m.row_ids()
            ));
        };
        if c.loss_tokens.checked_add(c.masked_tokens) != Some(labels) {
            return bad(format!(
                "loss_tokens {} + masked_tokens {} should be rows × seq_len = {labels}",
                c.loss_tokens, c.masked_tokens
            ));
        }
        let has_mask = m.has_mask();
        if !has_mask && c.masked_tokens != 0 {
            return bad(format!(
                "{} masked tokens but no {MASK} in files",
                c.masked_tokens
            ));
        }
        if matches!(m.format, Format::Instruction { .. }) && !has_mask {
            return bad(format!("instruction data without {MASK} in files"));
        }
        let doc_bytes = c.documents.checked_mul(8);
        let mut seen = Vec::new();
        for f in &m.files {
            let want = match f.file.as_str() {
                TOKENS => Some(token_bytes),
                MASK => Some(labels),
                DOCS => doc_bytes,
                other => {
                    return bad(format!(
                        "files lists {other:?}: expected {TOKENS}, {MASK} or {DOCS}"
                    ));
                }
            };
            if seen.contains(&f.file.as_str()) {
                return bad(format!("files lists {} twice", f.file));
            }
            seen.push(f.file.as_str());
            if Some(f.bytes) != want {
                return bad(format!(
                    "files says {} has {} bytes: expected {}",
                    f.file,
                    f.bytes,
                    want.map_or("a size that fits u64".to_string(), |w| w.to_string())
                ));
            }
            check_size(&dir.join(&f.file), f.bytes)?;
        }
        for required in [TOKENS, DOCS] {
            if !seen.contains(&required) {
                return bad(format!("files lacks {required}"));
            }
        }
        let tpath = dir.join(TOKENS);
        let tokens = File::open(&tpath).map_err(io_err(&tpath))?;
        let mask = if has_mask {
            let p = dir.join(MASK);
            Some(File::open(&p).map_err(io_err(&p))?)
        } else {
            None
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
            tokens,
            mask,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Rows in the data (at least one).
    pub fn rows(&self) -> u64 {
        self.manifest.counts.rows
    }

    /// Tokens per row fed to the model.
    pub fn seq_len(&self) -> u64 {
        self.manifest.seq_len
    }

    pub fn vocab_size(&self) -> u64 {
        self.manifest.tokenizer.vocab_size
    }

    /// Row `i`: its tokens, labels and mask (all ones without `mask.bin`).
    pub fn row(&self, i: u64) -> Result<Row, DataError> {
        let mut row = Row::default();
        self.read_row(i, &mut row)?;
        Ok(row)
    }

    /// As [`PreparedData::row`], into `row`'s buffers (no allocation after
    /// the first call).
    pub fn read_row(&self, i: u64, row: &mut Row) -> Result<(), DataError> {
        let m = &self.manifest;
        if i >= m.counts.rows {
            return Err(DataError::RowOutOfRange {
                path: self.dir.clone(),
                row: i,
                rows: m.counts.rows,
            });
        }
        // open checked rows · (seq_len + 1) · width fits u64, and seq_len
        // <= 2^32, so these products and the buffer sizes fit.
        let n = m.row_ids() as usize;
        let width = m.dtype.width() as usize;
        let mut bytes = vec![0u8; n * width];
        let tpath = || self.dir.join(TOKENS);
        self.tokens
            .read_exact_at(&mut bytes, i * (n * width) as u64)
            .map_err(|e| io_err(&tpath())(e))?;
        let ids: Vec<u32> = match m.dtype {
            TokenDtype::U16 => bytes
                .chunks_exact(2)
                .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
            TokenDtype::U32 => bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        };
        if let Some((column, &id)) = ids
            .iter()
            .enumerate()
            .find(|&(_, &id)| u64::from(id) >= m.tokenizer.vocab_size)
        {
            return Err(DataError::IdOutOfRange {
                path: tpath(),
                row: i,
                column: column as u64,
                id: u64::from(id),
                vocab_size: m.tokenizer.vocab_size,
            });
        }
        row.tokens.clear();
        row.tokens.extend_from_slice(&ids[..n - 1]);
        row.labels.clear();
        row.labels.extend_from_slice(&ids[1..]);
        row.mask.clear();
        row.mask.resize(n - 1, 1);
        if let Some(mask) = &self.mask {
            let mpath = || self.dir.join(MASK);
            mask.read_exact_at(&mut row.mask, i * (n as u64 - 1))
                .map_err(|e| io_err(&mpath())(e))?;
            if let Some(column) = row.mask.iter().position(|&b| b > 1) {
                return Err(format_err(
                    &mpath(),
                    format!(
                        "row {i} column {column} holds {}: expected 0 or 1",
                        row.mask[column]
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The document index: the position in `tokens.bin` (in ids) of each
    /// document's first token, increasing.
    pub fn documents(&self) -> Result<Vec<u64>, DataError> {
        let path = self.dir.join(DOCS);
        let bytes = fs::read(&path).map_err(io_err(&path))?;
        let total = self.manifest.counts.rows * self.manifest.row_ids();
        let mut out = Vec::with_capacity(bytes.len() / 8);
        for (k, c) in bytes.chunks_exact(8).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            let p = u64::from_le_bytes(b);
            if p >= total || out.last().is_some_and(|&q| q >= p) {
                return Err(format_err(
                    &path,
                    format!(
                        "entry {k} is {p}: expected increasing positions below {total} \
                         (rows × (seq_len + 1))"
                    ),
                ));
            }
            out.push(p);
        }
        Ok(out)
    }

    /// Reads everything: each file's FNV-1a against the manifest, every id
    /// below the vocabulary, every mask byte 0 or 1, the mask's ones adding
    /// up to `loss_tokens`, the document index increasing.
    pub fn verify(&self) -> Result<(), DataError> {
        for f in &self.manifest.files {
            let path = self.dir.join(&f.file);
            let mut file = File::open(&path).map_err(io_err(&path))?;
            let mut h = Fnv1a::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let k = file.read(&mut buf).map_err(io_err(&path))?;
                if k == 0 {
                    break;
                }
                h.write(&buf[..k]);
            }
            if hex(h.finish()) != f.fnv1a {
                return Err(format_err(
                    &path,
                    format!(
                        "FNV-1a {} differs from the manifest's {}",
                        hex(h.finish()),
                        f.fnv1a
                    ),
                ));
            }
        }
        let mut row = Row::default();
        let mut ones = 0u64;
        for i in 0..self.rows() {
            self.read_row(i, &mut row)?;
            ones += row.mask.iter().map(|&b| u64::from(b)).sum::<u64>();
        }
        if ones != self.manifest.counts.loss_tokens {
            return Err(format_err(
                &self.dir.join(MASK),
                format!(
                    "{ones} label positions have mask 1, the manifest's loss_tokens says {}",
                    self.manifest.counts.loss_tokens
                ),
            ));
        }
        self.documents()?;
        Ok(())
    }
}

/// Reads and parses `dir/manifest.json`.
pub fn read_manifest(dir: &Path) -> Result<Manifest, DataError> {
    let path = dir.join(MANIFEST);
    let meta = fs::metadata(&path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            format_err(
                &path,
                format!(
                    "missing: {} is not prepared data (or its preparation did not finish)",
                    dir.display()
                ),
            )
        } else {
            io_err(&path)(e)
        }
    })?;
    if meta.len() > MAX_MANIFEST_BYTES {
        return Err(format_err(
            &path,
            format!(
                "{} bytes: a manifest is at most {MAX_MANIFEST_BYTES}",
                meta.len()
            ),
        ));
    }
    let bytes = fs::read(&path).map_err(io_err(&path))?;
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| format_err(&path, e.to_string()))?;
    let version = value
        .get("format_version")
        .and_then(serde_json::Value::as_u64);
    if version != Some(u64::from(FORMAT)) {
        return Err(format_err(
            &path,
            format!(
                "format_version {}: this build reads version {FORMAT}",
                version.map_or("missing".to_string(), |v| v.to_string())
            ),
        ));
    }
    serde_json::from_value(value).map_err(|e| format_err(&path, e.to_string()))
}

fn check_size(path: &Path, want: u64) -> Result<(), DataError> {
    let meta = fs::metadata(path).map_err(io_err(path))?;
    if !meta.is_file() {
        return Err(format_err(path, "not a regular file"));
    }
    if meta.len() != want {
        return Err(format_err(
            path,
            format!(
                "{} bytes: the manifest implies {want} (truncated or not this data's file)",
                meta.len()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
