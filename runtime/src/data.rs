//! Training data: the global [`Batch`] of one step, drawn either from a
//! seed ([`Batch::synthetic`]) or from a token file ([`TokenFile`]).
//!
//! A token file is the flat format of nanoGPT's and Megatron's `.bin` files:
//! token ids one after the other, little-endian, each of a fixed width
//! ([`TokenDtype::U16`], the default, fits vocabularies up to 65536;
//! [`TokenDtype::U32`] the rest), no header. The file is read as `(len - 1) /
//! seq` windows of `seq + 1` tokens starting every `seq` tokens; a window gives
//! one row of tokens (its first `seq` ids) and of labels (its last `seq`, the
//! next token of each). Step `s` takes windows `s * batch .. (s + 1) * batch`,
//! wrapping around at the end of the file, so every rank reads the same global
//! batch and a run is reproducible.
//!
//! This module owns reading and checking data. It does not split a batch over
//! ranks: the pipeline driver ([`crate::program`]) takes each dp rank's rows.

use crate::exec::ExecError;
use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use tch::{Kind, Tensor};
use thiserror::Error;

/// A global batch: `tokens` and `labels`, both `[batch, seq]` int64.
#[derive(Debug)]
pub struct Batch {
    pub tokens: Tensor,
    pub labels: Tensor,
}

impl Batch {
    /// Uniform random tokens and labels drawn from `seed`, the same on every rank.
    pub fn synthetic(vocab: i64, batch: i64, seq: i64, seed: i64) -> Result<Self, ExecError> {
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
    Torch(#[from] tch::TchError),
}

/// The most token ids one global batch may hold: 2^28 (2 GiB as int64),
/// 16 times the 16M-token batches of the largest published Llama runs.
pub const MAX_BATCH_TOKENS: i64 = 1 << 28;

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
        if batch < 1
            || batch
                .checked_mul(seq + 1)
                .is_none_or(|n| n > MAX_BATCH_TOKENS)
        {
            return Err(DataError::BadShape { batch, seq });
        }
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
        let windows = Tensor::f_from_slice(&ids)?.f_view([batch, seq + 1])?;
        Ok(Batch {
            tokens: windows.f_narrow(1, 0, seq)?.f_contiguous()?,
            labels: windows.f_narrow(1, 1, seq)?.f_contiguous()?,
        })
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
}
