//! Training data: the global [`Batch`] of one step, drawn from a seed
//! ([`Batch::synthetic`]), a flat token file ([`TokenFile`]) or a prepared
//! folder ([`PreparedRows`], written by `autopart data prepare`); [`Source`]
//! is whichever of them a run reads, and [`EvalSet`] a held-out set read in
//! order.
//!
//! A token file is the flat format of nanoGPT's and Megatron's `.bin` files:
//! token ids one after the other, little-endian, each of a fixed width
//! ([`TokenDtype::U16`], the default, fits vocabularies up to 65536;
//! [`TokenDtype::U32`] the rest), no header. The file is read as `(len - 1) /
//! seq` windows of `seq + 1` tokens starting every `seq` tokens; a window gives
//! one row of tokens (its first `seq` ids) and of labels (its last `seq`, the
//! next token of each). Step `s` takes windows `s * batch .. (s + 1) * batch`,
//! wrapping around at the end of the file.
//!
//! A prepared folder's `R` rows are read in a shuffled order: step `s`'s
//! global batch is rows `perm_e[(s·B + i) mod R]` for `i` in `0..B`, where
//! `e = (s·B + i) / R` is the epoch and `perm_e` = [`permutation`]`(seed +
//! e, R)` (Fisher–Yates driven by splitmix64). The order is a pure function
//! of the seed and the step, and `B` is the run's global batch, so it does
//! not depend on the plan (tp, pp, dp): every plan trains on the same
//! global batches, and a resumed run continues the sequence. Labels whose
//! `mask.bin` byte is 0 become [`IGNORE_INDEX`]: they count neither in the
//! loss nor in [`Batch::loss_tokens`].
//!
//! Every rank reads the whole global batch (a few hundred KiB even for
//! large batches); the pipeline driver ([`crate::program`]) takes each dp
//! rank's disjoint rows out of it. This module owns reading and checking
//! data; it does not split a batch over ranks.

use crate::exec::ExecError;
use crate::ops::IGNORE_INDEX;
use autopart_vocab::ckpt::DataPosition;
use autopart_vocab::data::{PreparedData, Row};
use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use tch::{Kind, Tensor};
use thiserror::Error;

/// A global batch: `tokens` and `labels`, both `[batch, seq]` int64; a
/// label equal to [`IGNORE_INDEX`] counts neither in the loss nor in the
/// token count.
#[derive(Debug)]
pub struct Batch {
    pub tokens: Tensor,
    pub labels: Tensor,
}

impl Batch {
    /// Labels that count in the loss (those not [`IGNORE_INDEX`]): the
    /// loss is their mean, and tokens/s counts them.
    pub fn loss_tokens(&self) -> Result<i64, tch::TchError> {
        self.labels
            .f_ne(IGNORE_INDEX)?
            .f_sum(Kind::Int64)?
            .f_int64_value(&[])
    }

    /// Rows with at least one label that counts.
    pub fn loss_rows(&self) -> Result<u64, tch::TchError> {
        let counts = self.labels.f_ne(IGNORE_INDEX)?.f_any_dim(1, false)?;
        Ok(counts.f_sum(Kind::Int64)?.f_int64_value(&[])? as u64)
    }

    /// `rows` rows of `seq + 1` ids (tokens then the last label) as a batch.
    fn from_windows(
        ids: &[i64],
        labels_ignored: &[bool],
        rows: i64,
        seq: i64,
    ) -> Result<Self, DataError> {
        let windows = Tensor::f_from_slice(ids)?.f_view([rows, seq + 1])?;
        let tokens = windows.f_narrow(1, 0, seq)?.f_contiguous()?;
        let mut labels = windows.f_narrow(1, 1, seq)?.f_contiguous()?;
        if labels_ignored.iter().any(|&x| x) {
            let ignored = Tensor::f_from_slice(labels_ignored)?.f_view([rows, seq])?;
            labels = labels.f_masked_fill(&ignored, IGNORE_INDEX)?;
        }
        Ok(Self { tokens, labels })
    }

    /// Uniform random tokens and labels drawn from `seed`, the same on every rank.
    pub fn synthetic(vocab: i64, batch: i64, seq: i64, seed: i64) -> Result<Self, ExecError> {
        Ok(Self::draw(vocab, batch, seq, seed)?)
    }

    fn draw(vocab: i64, batch: i64, seq: i64, seed: i64) -> Result<Self, tch::TchError> {
        let opts = (Kind::Int64, tch::Device::Cpu);
        tch::manual_seed(seed);
        let tokens = Tensor::f_randint(vocab, [batch, seq], opts)?;
        let labels = Tensor::f_randint(vocab, [batch, seq], opts)?;
        Ok(Self { tokens, labels })
    }
}

/// The width of one token id in a token file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum TokenDtype {
    /// Two bytes, little-endian (nanoGPT's `np.uint16`).
    #[default]
    U16,
    /// Four bytes, little-endian.
    U32,
}

impl TokenDtype {
    /// Bytes per token id.
    pub fn width(self) -> u64 {
        match self {
            TokenDtype::U16 => 2,
            TokenDtype::U32 => 4,
        }
    }
}

impl fmt::Display for TokenDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenDtype::U16 => "u16",
            TokenDtype::U32 => "u32",
        })
    }
}

impl FromStr for TokenDtype {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "u16" => Ok(TokenDtype::U16),
            "u32" => Ok(TokenDtype::U32),
            other => Err(DataError::Dtype(other.to_string())),
        }
    }
}

/// What can go wrong while reading training data.
#[derive(Debug, Error)]
pub enum DataError {
    #[error("token dtype {0:?} is not one of u16, u32")]
    Dtype(String),
    #[error("{}: cannot {what}: {source}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error(
        "{}: {bytes} bytes is not a whole number of {dtype} token ids ({} bytes each); is --data-dtype right?",
        path.display(),
        dtype.width()
    )]
    Ragged {
        path: PathBuf,
        bytes: u64,
        dtype: TokenDtype,
    },
    #[error(
        "{}: holds {tokens} tokens, but one window of sequence length {seq} needs {} tokens",
        path.display(),
        seq + 1
    )]
    TooShort {
        path: PathBuf,
        tokens: u64,
        seq: i64,
    },
    #[error(
        "{}: token {id} at position {position} is outside the vocabulary of {vocab} ids; is --data-dtype right?",
        path.display()
    )]
    TokenOutOfRange {
        path: PathBuf,
        position: u64,
        id: u64,
        vocab: i64,
    },
    #[error(
        "batch of {batch} rows of {seq} tokens is empty or too large (at most 2^28 token ids a step)"
    )]
    BadShape { batch: i64, seq: i64 },
    #[error(transparent)]
    Prepared(#[from] autopart_vocab::data::DataError),
    #[error(
        "{}: the rows hold {data} tokens, but this plan was compiled for sequences of {plan}; prepare the data with --seq-len {plan}, or compile the plan with --seq-len {data}",
        path.display()
    )]
    SeqLen { path: PathBuf, data: u64, plan: i64 },
    #[error(
        "{}: its tokenizer has {data} ids, more than this plan's vocabulary of {plan}; compile the plan from a config.json with vocab_size >= {data}",
        path.display()
    )]
    Vocab { path: PathBuf, data: u64, plan: i64 },
    #[error("{}: {msg}", path.display())]
    Json { path: PathBuf, msg: String },
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// The most token ids one global batch may hold: 2^28 (2 GiB as int64),
/// 16 times the 16M-token batches of the largest published Llama runs.
pub const MAX_BATCH_TOKENS: i64 = 1 << 28;

/// Refuses a batch of no rows, or of more than [`MAX_BATCH_TOKENS`] ids.
fn check_shape(batch: i64, seq: i64) -> Result<(), DataError> {
    if batch < 1
        || seq < 1
        || seq
            .checked_add(1)
            .and_then(|w| batch.checked_mul(w))
            .is_none_or(|n| n > MAX_BATCH_TOKENS)
    {
        return Err(DataError::BadShape { batch, seq });
    }
    Ok(())
}

/// A token file opened for training with sequence length `seq`.
#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
    file: File,
    dtype: TokenDtype,
    vocab: i64,
    seq: i64,
    tokens: u64,
}

impl TokenFile {
    /// Opens `path` and checks that it holds whole `dtype` ids and at least
    /// one window of `seq + 1` tokens. Ids are checked against `vocab` as
    /// windows are read.
    pub fn open(path: &Path, dtype: TokenDtype, vocab: i64, seq: i64) -> Result<Self, DataError> {
        let io = |what| {
            let path = path.to_path_buf();
            move |source| DataError::Io { path, what, source }
        };
        let file = File::open(path).map_err(io("open it"))?;
        let bytes = file.metadata().map_err(io("read its size"))?.len();
        if bytes % dtype.width() != 0 {
            return Err(DataError::Ragged {
                path: path.to_path_buf(),
                bytes,
                dtype,
            });
        }
        let tokens = bytes / dtype.width();
        if seq < 1 || tokens < seq as u64 + 1 {
            return Err(DataError::TooShort {
                path: path.to_path_buf(),
                tokens,
                seq,
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            dtype,
            vocab,
            seq,
            tokens,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of token ids in the file.
    pub fn len(&self) -> u64 {
        self.tokens
    }

    /// Whether the file holds no token (never true of an opened file).
    pub fn is_empty(&self) -> bool {
        self.tokens == 0
    }

    /// Number of distinct windows; step batches cycle through them.
    pub fn windows(&self) -> u64 {
        // `open` guarantees tokens >= seq + 1, so this is at least 1.
        (self.tokens - 1) / self.seq as u64
    }

    /// The global batch of step `step` (from 0): `batch` windows starting at
    /// window `step * batch`, wrapping around the file.
    pub fn batch(&mut self, step: u64, batch: i64) -> Result<Batch, DataError> {
        let seq = self.seq;
        check_shape(batch, seq)?;
        let n = self.windows();
        // step * batch mod n, without overflow.
        let first = (u128::from(step) * batch as u128 % u128::from(n)) as u64;
        let mut ids: Vec<i64> = Vec::new();
        if ids.try_reserve_exact((batch * (seq + 1)) as usize).is_err() {
            return Err(DataError::BadShape { batch, seq });
        }
        for row in 0..batch as u64 {
            let window = (first + row % n) % n;
            self.read_window(window, &mut ids)?;
        }
        Batch::from_windows(&ids, &[], batch, seq)
    }

    /// Batch `index` of the file read in order for evaluation: windows
    /// `index * batch ..`; rows past the last window are padding whose
    /// labels are all [`IGNORE_INDEX`].
    pub fn eval_batch(&mut self, index: u64, batch: i64) -> Result<Batch, DataError> {
        let seq = self.seq;
        check_shape(batch, seq)?;
        let n = self.windows();
        let mut ids: Vec<i64> = Vec::with_capacity((batch * (seq + 1)) as usize);
        let mut ignored = Vec::with_capacity((batch * seq) as usize);
        for row in 0..batch as u64 {
            let window = index.saturating_mul(batch as u64).saturating_add(row);
            let pad = window >= n;
            if pad {
                ids.resize(ids.len() + (seq + 1) as usize, 0);
            } else {
                self.read_window(window, &mut ids)?;
            }
            ignored.resize(ignored.len() + seq as usize, pad);
        }
        Batch::from_windows(&ids, &ignored, batch, seq)
    }

    /// Appends window `window`'s `seq + 1` ids to `out`, checked against the vocabulary.
    fn read_window(&mut self, window: u64, out: &mut Vec<i64>) -> Result<(), DataError> {
        let width = self.dtype.width();
        let start = window * self.seq as u64;
        let mut buf = vec![0u8; (self.seq as u64 + 1) as usize * width as usize];
        let io = |what| {
            let path = self.path.clone();
            move |source| DataError::Io { path, what, source }
        };
        self.file
            .seek(SeekFrom::Start(start * width))
            .map_err(io("seek in it"))?;
        self.file.read_exact(&mut buf).map_err(io("read it"))?;
        for (i, chunk) in buf.chunks_exact(width as usize).enumerate() {
            let id = match self.dtype {
                TokenDtype::U16 => u64::from(u16::from_le_bytes([chunk[0], chunk[1]])),
                TokenDtype::U32 => {
                    u64::from(u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]))
                }
            };
            if id >= self.vocab.max(0) as u64 {
                return Err(DataError::TokenOutOfRange {
                    path: self.path.clone(),
                    position: start + i as u64,
                    id,
                    vocab: self.vocab,
                });
            }
            // id < vocab <= i64::MAX.
            out.push(id as i64);
        }
        Ok(())
    }
}

/// splitmix64 (Steele, Lea and Flood 2014): the generator behind
/// [`permutation`]. Returns the next output and advances `state`.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The permutation of `0..n` drawn from `seed`: Fisher–Yates from the last
/// position down, position `i` swapped with `j = ⌊x · (i + 1) / 2^64⌋` for
/// the next splitmix64 output `x` (started at state `seed`). The same seed
/// and `n` give the same permutation on every machine.
pub fn permutation(seed: u64, n: u64) -> Vec<u64> {
    let mut perm: Vec<u64> = (0..n).collect();
    let mut state = seed;
    for i in (1..perm.len()).rev() {
        let x = splitmix64(&mut state);
        let j = ((u128::from(x) * (i as u128 + 1)) >> 64) as usize;
        perm.swap(i, j);
    }
    perm
}

/// A prepared data folder opened for training: its rows in the shuffled
/// order of the module docs.
#[derive(Debug)]
pub struct PreparedRows {
    data: PreparedData,
    seed: u64,
    /// The permutation of epoch `epoch` (empty before the first read):
    /// positions are read in increasing order, so each epoch's is drawn once.
    perm: Vec<u64>,
    epoch: u64,
    row: Row,
}

impl PreparedRows {
    /// Opens the folder `dir` and checks it against the plan: its rows are
    /// `seq` tokens long and its tokenizer's ids fit a vocabulary of `vocab`.
    /// `seed` draws the order.
    pub fn open(dir: &Path, vocab: i64, seq: i64, seed: u64) -> Result<Self, DataError> {
        let data = PreparedData::open(dir)?;
        let m = data.manifest();
        if i64::try_from(m.seq_len).ok() != Some(seq) {
            return Err(DataError::SeqLen {
                path: dir.to_path_buf(),
                data: m.seq_len,
                plan: seq,
            });
        }
        if m.tokenizer.vocab_size > vocab.max(0) as u64 {
            return Err(DataError::Vocab {
                path: dir.to_path_buf(),
                data: m.tokenizer.vocab_size,
                plan: vocab,
            });
        }
        Ok(Self {
            data,
            seed,
            perm: Vec::new(),
            epoch: 0,
            row: Row::default(),
        })
    }

    pub fn path(&self) -> &Path {
        self.data.dir()
    }

    /// Rows in the folder (at least one).
    pub fn rows(&self) -> u64 {
        self.data.rows()
    }

    /// `tokens.bin`'s FNV-1a as the manifest records it.
    pub fn tokens_fnv1a(&self) -> String {
        let m = self.data.manifest();
        m.files
            .iter()
            .find(|f| f.file == autopart_vocab::data::TOKENS)
            .map(|f| f.fnv1a.clone())
            .unwrap_or_default()
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The row at `position` of the shuffled sequence (position `s·B + i`
    /// is row `i` of step `s`).
    pub fn row_at(&mut self, position: u64) -> u64 {
        let n = self.rows();
        let epoch = position / n;
        if self.perm.is_empty() || self.epoch != epoch {
            self.perm = permutation(self.seed.wrapping_add(epoch), n);
            self.epoch = epoch;
        }
        // `perm` holds n >= 1 entries and position % n < n.
        self.perm[(position % n) as usize]
    }

    /// The global batch of step `step` (from 0): rows at positions
    /// `step * batch ..` of the shuffled sequence.
    pub fn batch(&mut self, step: u64, batch: i64) -> Result<Batch, DataError> {
        check_shape(batch, self.data.seq_len() as i64)?;
        let first = step.saturating_mul(batch as u64);
        let rows: Vec<Option<u64>> = (0..batch as u64)
            .map(|i| Some(self.row_at(first.saturating_add(i))))
            .collect();
        self.read(&rows)
    }

    /// Batch `index` of the folder read in order for evaluation: rows
    /// `index * batch ..`; rows past the last are padding whose labels are
    /// all [`IGNORE_INDEX`].
    pub fn eval_batch(&mut self, index: u64, batch: i64) -> Result<Batch, DataError> {
        check_shape(batch, self.data.seq_len() as i64)?;
        let n = self.rows();
        let rows: Vec<Option<u64>> = (0..batch as u64)
            .map(|i| Some(index.saturating_mul(batch as u64).saturating_add(i)).filter(|&r| r < n))
            .collect();
        self.read(&rows)
    }

    /// Reads `rows` (`None`: a padding row) into a batch; masked labels
    /// become [`IGNORE_INDEX`].
    fn read(&mut self, rows: &[Option<u64>]) -> Result<Batch, DataError> {
        let seq = self.data.seq_len() as usize;
        let mut ids: Vec<i64> = Vec::with_capacity(rows.len() * (seq + 1));
        let mut ignored: Vec<bool> = Vec::with_capacity(rows.len() * seq);
        for r in rows {
            match *r {
                Some(r) => {
                    self.data.read_row(r, &mut self.row)?;
                    ids.extend(self.row.tokens.iter().map(|&t| i64::from(t)));
                    ids.push(self.row.labels.last().map_or(0, |&t| i64::from(t)));
                    ignored.extend(self.row.mask.iter().map(|&m| m == 0));
                }
                None => {
                    ids.resize(ids.len() + seq + 1, 0);
                    ignored.resize(ignored.len() + seq, true);
                }
            }
        }
        Batch::from_windows(&ids, &ignored, rows.len() as i64, seq as i64)
    }
}

/// Whether `path` is a prepared folder (a directory) rather than a token file.
fn is_prepared(path: &Path) -> bool {
    path.is_dir()
}

/// What a run trains on.
#[derive(Debug)]
pub enum Source {
    /// Uniform random tokens: step `s` draws from `seed + s`.
    Synthetic {
        vocab: i64,
        seq: i64,
        seed: u64,
    },
    Tokens(TokenFile),
    /// Boxed: a folder's reader is far larger than the other variants.
    Prepared(Box<PreparedRows>),
}

impl Source {
    /// `path` opened as a prepared folder when it is a directory, else as a
    /// token file of `dtype` ids; synthetic tokens without a path. `seed`
    /// draws synthetic tokens and a folder's order.
    pub fn open(
        path: Option<&Path>,
        dtype: TokenDtype,
        vocab: i64,
        seq: i64,
        seed: u64,
    ) -> Result<Self, DataError> {
        Ok(match path {
            None => Source::Synthetic { vocab, seq, seed },
            Some(p) if is_prepared(p) => {
                Source::Prepared(Box::new(PreparedRows::open(p, vocab, seq, seed)?))
            }
            Some(p) => Source::Tokens(TokenFile::open(p, dtype, vocab, seq)?),
        })
    }

    /// The global batch of step `step` (from 0), of `batch` rows.
    pub fn batch(&mut self, step: u64, batch: i64) -> Result<Batch, DataError> {
        match self {
            Source::Synthetic { vocab, seq, seed } => Ok(Batch::draw(
                *vocab,
                batch,
                *seq,
                (*seed as i64).wrapping_add(step as i64),
            )?),
            Source::Tokens(f) => f.batch(step, batch),
            Source::Prepared(p) => p.batch(step, batch),
        }
    }

    /// Where the data stands before step `next_step`, as a checkpoint records it.
    pub fn position(&self, dtype: TokenDtype, next_step: u64) -> DataPosition {
        match self {
            Source::Synthetic { seed, .. } => DataPosition::Synthetic {
                seed: *seed,
                next_step,
            },
            Source::Tokens(f) => DataPosition::Tokens {
                path: f.path().display().to_string(),
                tokens: f.len(),
                dtype: dtype.to_string(),
                next_step,
            },
            Source::Prepared(p) => DataPosition::Prepared {
                path: p.path().display().to_string(),
                rows: p.rows(),
                tokens_fnv1a: p.tokens_fnv1a(),
                seed: p.seed(),
                next_step,
            },
        }
    }
}

/// A held-out set (`--eval-data`): a token file's windows or a prepared
/// folder's rows, in order (no shuffle), in batches of the run's global
/// batch, the last one filled up with padding rows that count nothing.
#[derive(Debug)]
pub enum EvalSet {
    Tokens(TokenFile),
    Prepared(Box<PreparedRows>),
    Rows(JsonRows),
}

impl EvalSet {
    /// `path` as a prepared folder (a directory), JSON rows (a `.json`
    /// file, see [`JsonRows`]) or a token file of `dtype` ids.
    pub fn open(path: &Path, dtype: TokenDtype, vocab: i64, seq: i64) -> Result<Self, DataError> {
        Ok(if is_prepared(path) {
            EvalSet::Prepared(Box::new(PreparedRows::open(path, vocab, seq, 0)?))
        } else if is_json(path) {
            EvalSet::Rows(JsonRows::open(path, vocab, seq)?)
        } else {
            EvalSet::Tokens(TokenFile::open(path, dtype, vocab, seq)?)
        })
    }

    /// Batches of `batch` rows that cover the whole set.
    pub fn batches(&self, batch: i64) -> u64 {
        let rows = match self {
            EvalSet::Tokens(f) => f.windows(),
            EvalSet::Prepared(p) => p.rows(),
            EvalSet::Rows(r) => r.rows.len() as u64,
        };
        rows.div_ceil(batch.max(1) as u64)
    }

    /// Batch `index` (from 0) of `batch` rows.
    pub fn batch(&mut self, index: u64, batch: i64) -> Result<Batch, DataError> {
        match self {
            EvalSet::Tokens(f) => f.eval_batch(index, batch),
            EvalSet::Prepared(p) => p.eval_batch(index, batch),
            EvalSet::Rows(r) => r.eval_batch(index, batch),
        }
    }
}

/// Whether `path` names JSON rows (by its extension).
pub fn is_json(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
}

/// Rows of token ids from a JSON file `{"input_ids": [[...], ...]}`, one
/// row a sequence of any length from 2 to `seq + 1` ids. As transformers
/// with `labels=input_ids`, each row predicts its own next tokens: a row of
/// `n` ids is `n - 1` tokens and labels, padded to `seq` with labels that
/// count nothing (causal attention: the padding after a row does not change
/// its predictions).
#[derive(Debug)]
pub struct JsonRows {
    rows: Vec<Vec<i64>>,
    seq: i64,
}

/// The longest row [`JsonRows::read`] accepts: 2^20 ids.
pub const MAX_JSON_ROW: usize = 1 << 20;

impl JsonRows {
    /// Reads and checks the rows of `path` (ids in `0..vocab`, at least
    /// `min_len` a row), without a sequence length.
    pub fn read(path: &Path, vocab: i64, min_len: usize) -> Result<Vec<Vec<i64>>, DataError> {
        let bad = |msg: String| DataError::Json {
            path: path.to_path_buf(),
            msg,
        };
        let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            what: "read",
            source,
        })?;
        #[derive(serde::Deserialize)]
        struct File {
            input_ids: Vec<Vec<i64>>,
        }
        let file: File = serde_json::from_str(&text).map_err(|e| {
            bad(format!(
                "{e}; expected {{\"input_ids\": [[id, ...], ...]}} (one row of token ids per sequence)"
            ))
        })?;
        if file.input_ids.is_empty() {
            return Err(bad("input_ids holds no rows".into()));
        }
        for (i, row) in file.input_ids.iter().enumerate() {
            if row.len() < min_len || row.len() > MAX_JSON_ROW {
                return Err(bad(format!(
                    "row {i} holds {} ids; a row needs {min_len} to {MAX_JSON_ROW}{}",
                    row.len(),
                    if min_len == 2 {
                        " (its tokens and one more to predict)"
                    } else {
                        ""
                    }
                )));
            }
            if let Some((j, &id)) = row
                .iter()
                .enumerate()
                .find(|&(_, &id)| id < 0 || id >= vocab)
            {
                return Err(bad(format!(
                    "row {i}, position {j}: id {id} is outside the vocabulary of {vocab} ids"
                )));
            }
        }
        Ok(file.input_ids)
    }

    /// The rows of `path` for a plan of sequence length `seq`.
    pub fn open(path: &Path, vocab: i64, seq: i64) -> Result<Self, DataError> {
        check_shape(1, seq).map_err(|e| DataError::Json {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        let rows = Self::read(path, vocab, 2)?;
        if let Some((i, row)) = rows
            .iter()
            .enumerate()
            .find(|(_, r)| r.len() as i64 > seq + 1)
        {
            return Err(DataError::Json {
                path: path.to_path_buf(),
                msg: format!(
                    "row {i} holds {} ids, but this plan's sequences hold {seq} tokens (rows of at most {} ids); compile the plan with --seq-len {}",
                    row.len(),
                    seq + 1,
                    row.len() - 1
                ),
            });
        }
        Ok(Self { rows, seq })
    }

    /// Batch `index`: rows `index * batch ..`, padded to the sequence length;
    /// rows past the last are padding whose labels are all [`IGNORE_INDEX`].
    pub fn eval_batch(&mut self, index: u64, batch: i64) -> Result<Batch, DataError> {
        check_shape(batch, self.seq)?;
        let seq = self.seq as usize;
        let mut ids: Vec<i64> = Vec::with_capacity(batch as usize * (seq + 1));
        let mut ignored: Vec<bool> = Vec::with_capacity(batch as usize * seq);
        for i in 0..batch as u64 {
            let row = index
                .checked_mul(batch as u64)
                .and_then(|r| r.checked_add(i))
                .and_then(|r| self.rows.get(r as usize));
            let row = row.map_or(&[][..], Vec::as_slice);
            ids.extend_from_slice(row);
            ids.resize(ids.len() + seq + 1 - row.len(), 0);
            // Label j is id j + 1: it counts while that id is the row's.
            let counted = row.len().saturating_sub(1);
            ignored.extend((0..seq).map(|j| j >= counted));
        }
        Batch::from_windows(&ids, &ignored, batch, self.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A file under the system's temp folder, removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn with(name: &str, bytes: &[u8]) -> Self {
            let path =
                std::env::temp_dir().join(format!("autopart-data-{}-{name}", std::process::id()));
            let mut f = File::create(&path).expect("create temp file");
            f.write_all(bytes).expect("write temp file");
            Self(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn u16_bytes(ids: impl IntoIterator<Item = u16>) -> Vec<u8> {
        ids.into_iter().flat_map(u16::to_le_bytes).collect()
    }

    fn rows(t: &Tensor) -> Vec<Vec<i64>> {
        Vec::<Vec<i64>>::try_from(t).expect("int64 rows")
    }

    #[test]
    fn windows_shift_labels_by_one_and_wrap_around() {
        // 0..11: windows of 4 + 1 tokens start at 0 and 4 (two of them).
        let f = TempFile::with("wrap", &u16_bytes(0..11));
        let mut data = TokenFile::open(&f.0, TokenDtype::U16, 100, 4).expect("open");
        assert_eq!((data.len(), data.windows()), (11, 2));
        let b = data.batch(0, 3).expect("step 0");
        assert_eq!(
            rows(&b.tokens),
            vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7], vec![0, 1, 2, 3]]
        );
        assert_eq!(
            rows(&b.labels),
            vec![vec![1, 2, 3, 4], vec![5, 6, 7, 8], vec![1, 2, 3, 4]]
        );
        // Step 1 starts at window 3 mod 2 = 1.
        let b = data.batch(1, 3).expect("step 1");
        assert_eq!(rows(&b.tokens)[0], vec![4, 5, 6, 7]);
        assert_eq!(b.tokens.kind(), Kind::Int64);
    }

    #[test]
    fn u32_ids_are_read_little_endian() {
        let ids: [u32; 3] = [70_000, 1, 65_536];
        let bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
        let f = TempFile::with("u32", &bytes);
        let mut data = TokenFile::open(&f.0, TokenDtype::U32, 100_000, 2).expect("open");
        let b = data.batch(0, 1).expect("batch");
        assert_eq!(rows(&b.tokens), vec![vec![70_000, 1]]);
        assert_eq!(rows(&b.labels), vec![vec![1, 65_536]]);
    }

    #[test]
    fn bad_files_are_errors_that_name_the_file() {
        let short = TempFile::with("short", &u16_bytes(0..4));
        let err = TokenFile::open(&short.0, TokenDtype::U16, 100, 4).expect_err("too short");
        assert!(
            matches!(err, DataError::TooShort { tokens: 4, .. }),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(&short.0.display().to_string()) && msg.contains("needs 5"),
            "{msg}"
        );

        let ragged = TempFile::with("ragged", &[1, 0, 2]);
        let err = TokenFile::open(&ragged.0, TokenDtype::U16, 100, 1).expect_err("odd size");
        assert!(matches!(err, DataError::Ragged { bytes: 3, .. }), "{err}");

        let big = TempFile::with("vocab", &u16_bytes([1, 2, 3, 300, 5]));
        let mut data = TokenFile::open(&big.0, TokenDtype::U16, 256, 2).expect("open");
        data.batch(0, 1).expect("window 0 is in range");
        let err = data.batch(1, 1).expect_err("token 300");
        assert!(
            matches!(
                err,
                DataError::TokenOutOfRange {
                    position: 3,
                    id: 300,
                    ..
                }
            ),
            "{err}"
        );

        let missing = std::env::temp_dir().join("autopart-data-no-such-file.bin");
        let err = TokenFile::open(&missing, TokenDtype::U16, 256, 2).expect_err("missing");
        assert!(matches!(err, DataError::Io { .. }), "{err}");
        assert!(err.to_string().contains("no-such-file"), "{err}");

        assert!("u8".parse::<TokenDtype>().is_err());
        assert_eq!("u32".parse::<TokenDtype>().ok(), Some(TokenDtype::U32));
    }

    /// A padded instruction folder of `seq_len` 4, vocabulary 100: record
    /// `r` is prompt `10 + r, 11 + r`, response `12 + r`, EOS (0); pad 99.
    fn instruction_folder(root: &Path, records: u32) -> PathBuf {
        use autopart_vocab::data::{Format, LastRow, Layout, RowLayout, TokenizerInfo, begin};
        let dir = root.join("sft");
        let layout = Layout {
            vocab_size: 100,
            seq_len: 4,
            eos_id: 0,
            pad_id: 99,
            mask: true,
        };
        let mut w = begin(&dir, layout, false).expect("begin");
        for r in 0..records {
            let fits = w
                .push_padded(&[10 + r, 11 + r, 12 + r, 0], &[false, false, true, true])
                .expect("push");
            assert!(fits);
        }
        let format = Format::Instruction {
            template: "{instruction}".into(),
            instruction_field: "instruction".into(),
            context_field: "context".into(),
            response_field: "response".into(),
            rows: RowLayout::Padded,
        };
        let tokenizer = TokenizerInfo {
            file: "tokenizer.json".into(),
            fnv1a: "0000000000000000".into(),
            vocab_size: 100,
            eos_id: 0,
            eos_token: "</s>".into(),
            pad_id: 99,
            pad_token: "<pad>".into(),
        };
        w.finish(format, tokenizer, vec![], LastRow::Drop)
            .expect("finish");
        dir
    }

    #[test]
    fn permutations_are_deterministic_and_differ_by_seed() {
        let p = permutation(7, 1000);
        let mut sorted = p.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..1000).collect::<Vec<u64>>());
        assert_eq!(p, permutation(7, 1000));
        assert_ne!(p, permutation(8, 1000));
        assert_ne!(p, sorted, "a shuffle moves rows");
        assert_eq!(permutation(3, 1), vec![0]);
        assert!(permutation(3, 0).is_empty());
        // splitmix64's published first output from state 0.
        let mut state = 0;
        assert_eq!(splitmix64(&mut state), 0xe220_a839_7b1d_cdaf);
    }

    #[test]
    fn prepared_batches_follow_the_seeded_order_and_mask_prompts() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = instruction_folder(tmp.path(), 5);
        let mut data = PreparedRows::open(&dir, 128, 4, 11).expect("open");
        assert_eq!(data.rows(), 5);
        // Step 2 of batch 3 reads positions 6, 7, 8: epoch 1's perm[1..4].
        let later = data.batch(2, 3).expect("step 2");
        let perm1 = permutation(11 + 1, 5);
        let firsts: Vec<i64> = rows(&later.tokens).iter().map(|r| r[0]).collect();
        let want: Vec<i64> = perm1[1..4].iter().map(|&r| 10 + r as i64).collect();
        assert_eq!(firsts, want);
        // A pure function of the step: the same batch after reading others.
        let _ = data.batch(0, 3).expect("step 0");
        let again = data.batch(2, 3).expect("step 2 again");
        assert_eq!(rows(&again.tokens), rows(&later.tokens));
        assert_eq!(rows(&again.labels), rows(&later.labels));
        // Row r: tokens r+10 r+11 r+12 0, labels masked except response + EOS.
        let ig = IGNORE_INDEX;
        for (t, l) in rows(&later.tokens).iter().zip(rows(&later.labels)) {
            let r = t[0];
            assert_eq!(t, &vec![r, r + 1, r + 2, 0]);
            assert_eq!(l, vec![ig, r + 2, 0, ig]);
        }
        // Two labels of each row count: the loss divides by 6, not 12.
        assert_eq!(later.loss_tokens().expect("count"), 6);
    }

    #[test]
    fn masked_labels_get_no_gradient() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = instruction_folder(tmp.path(), 4);
        let mut data = PreparedRows::open(&dir, 100, 4, 0).expect("open");
        let b = data.batch(0, 4).expect("batch");
        let n = b.loss_tokens().expect("count");
        tch::manual_seed(0);
        let logits =
            Tensor::randn([4, 4, 100], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let per_token = crate::ops::cross_entropy(&logits, &b.labels).expect("ce");
        let loss = crate::ops::mean(&per_token, n).expect("mean");
        loss.backward();
        let grad_norm = logits.grad().abs().sum_dim_intlist(-1, false, Kind::Float);
        let norms = Vec::<Vec<f32>>::try_from(&grad_norm).expect("rows");
        let labels = rows(&b.labels);
        for (norm, label) in norms.iter().zip(&labels) {
            for (g, l) in norm.iter().zip(label) {
                if *l == IGNORE_INDEX {
                    assert_eq!(*g, 0.0, "{labels:?}");
                } else {
                    assert!(*g > 0.0, "{labels:?}");
                }
            }
        }
        // The loss is the mean over the labels that count.
        let want = per_token.sum(Kind::Float).double_value(&[]) / n as f64;
        assert!((loss.double_value(&[]) - want).abs() < 1e-6);
        assert_eq!(n, 8);
    }

    #[test]
    fn json_rows_predict_their_own_next_tokens_padded_to_the_plan() {
        let tmp = tempfile::tempdir().expect("tmp");
        let path = tmp.path().join("rows.json");
        std::fs::write(
            &path,
            r#"{"input_ids": [[5, 6, 7], [1, 2, 3, 4, 9], [8, 8]]}"#,
        )
        .expect("w");
        let mut set = EvalSet::open(&path, TokenDtype::U16, 10, 4).expect("open");
        assert_eq!(set.batches(2), 2);
        let b = set.batch(0, 2).expect("batch 0");
        assert_eq!(rows(&b.tokens), vec![vec![5, 6, 7, 0], vec![1, 2, 3, 4]]);
        let i = IGNORE_INDEX;
        assert_eq!(rows(&b.labels), vec![vec![6, 7, i, i], vec![2, 3, 4, 9]]);
        assert_eq!(b.loss_tokens().expect("count"), 6);
        assert_eq!(b.loss_rows().expect("rows"), 2);
        let b = set.batch(1, 2).expect("batch 1");
        assert_eq!(
            rows(&b.labels),
            vec![vec![8, i, i, i], vec![i; 4]],
            "a padding row"
        );
        assert_eq!(b.loss_rows().expect("rows"), 1);

        let err = |text: &str, seq: i64| {
            std::fs::write(&path, text).expect("w");
            let e = EvalSet::open(&path, TokenDtype::U16, 10, seq).expect_err(text);
            let msg = e.to_string();
            assert!(msg.contains("rows.json"), "{msg}");
            msg
        };
        assert!(err(r#"{"input_ids": [[1, 2, 3, 4, 5, 6]]}"#, 4).contains("--seq-len 5"));
        assert!(err(r#"{"input_ids": [[1, 12]]}"#, 4).contains("id 12 is outside"));
        assert!(err(r#"{"input_ids": [[1]]}"#, 4).contains("row 0 holds 1 ids"));
        assert!(err(r#"{"input_ids": []}"#, 4).contains("no rows"));
        assert!(err(r#"{"ids": [[1, 2]]}"#, 4).contains("expected {\"input_ids\""));
        assert!(err("[1, 2", 4).contains("expected"));
    }

    #[test]
    fn eval_batches_read_in_order_and_pad_the_last() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = instruction_folder(tmp.path(), 3);
        let mut set = EvalSet::open(&dir, TokenDtype::U16, 100, 4).expect("open");
        assert_eq!(set.batches(2), 2);
        let b = set.batch(1, 2).expect("batch 1");
        assert_eq!(rows(&b.tokens)[0][0], 12, "row 2 in order");
        assert_eq!(rows(&b.labels)[1], vec![IGNORE_INDEX; 4], "padding");
        assert_eq!(b.loss_tokens().expect("count"), 2);

        let f = TempFile::with("eval", &u16_bytes(0..11));
        let mut set = EvalSet::open(&f.0, TokenDtype::U16, 100, 4).expect("open");
        assert_eq!(set.batches(4), 1);
        let b = set.batch(0, 4).expect("batch");
        assert_eq!(rows(&b.tokens)[1], vec![4, 5, 6, 7]);
        assert_eq!(b.loss_tokens().expect("count"), 8);
    }

    #[test]
    fn folders_that_do_not_fit_the_plan_are_errors_naming_them() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = instruction_folder(tmp.path(), 2);
        let shown = dir.display().to_string();
        let err = Source::open(Some(&dir), TokenDtype::U16, 100, 8, 0).expect_err("seq");
        let msg = err.to_string();
        assert!(
            matches!(
                err,
                DataError::SeqLen {
                    data: 4,
                    plan: 8,
                    ..
                }
            ),
            "{msg}"
        );
        assert!(msg.contains(&shown) && msg.contains("--seq-len 8"), "{msg}");
        let err = Source::open(Some(&dir), TokenDtype::U16, 64, 4, 0).expect_err("vocab");
        let msg = err.to_string();
        assert!(
            matches!(
                err,
                DataError::Vocab {
                    data: 100,
                    plan: 64,
                    ..
                }
            ),
            "{msg}"
        );
        assert!(
            msg.contains(&shown) && msg.contains("vocab_size >= 100"),
            "{msg}"
        );
        let empty = tmp.path().join("empty");
        std::fs::create_dir(&empty).expect("mkdir");
        let err = Source::open(Some(&empty), TokenDtype::U16, 64, 4, 0).expect_err("no manifest");
        assert!(err.to_string().contains("empty"), "{err}");
        let pos = Source::open(Some(&dir), TokenDtype::U16, 100, 4, 9)
            .expect("fits")
            .position(TokenDtype::U16, 3);
        assert!(
            matches!(&pos, DataPosition::Prepared { rows: 2, seed: 9, next_step: 3, tokens_fnv1a, .. } if tokens_fnv1a.len() == 16),
            "{pos:?}"
        );
    }
}
