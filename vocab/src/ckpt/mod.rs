//! The checkpoint format: what a run writes, what a resumed run (under any
//! plan) and `autopart ckpt` read.
//!
//! ```text
//! DIR/step_N/              a complete checkpoint (renamed into place last)
//!   COMPLETE               the manifest (JSON): model, plan, step, training
//!                          state, every file with its size and CRC-32
//!   rank-R.safetensors     the pieces global rank R held
//!   rank-R.json            their index: per piece the tensor, its state
//!                          (param, master, exp_avg, exp_avg_sq), the
//!                          global shape, the region, dtype and CRC-32
//! DIR/step_N.partial/      a save in progress, or one a crash interrupted
//! DIR/step_N.deleting/     a checkpoint being removed by --keep
//! ```
//!
//! Every piece is a [`Region`] of a global tensor, so a checkpoint does not
//! depend on the plan that wrote it: a rank of any other plan assembles the
//! regions its own shards need from the pieces that intersect them
//! ([`Checkpoint::read_region`]), reading only those pieces (each checked
//! against its CRC-32). Each element of each tensor's state is in exactly
//! one piece ([`complete`] checks the coverage before marking).
//!
//! Durability: every file is written atomically (temporary sibling, fsync,
//! rename); the manifest is written only after every rank's files are
//! there, then the `.partial` folder is renamed to `step_N` and the parent
//! synced. A folder is loadable only if it is named `step_N` and holds
//! `COMPLETE`. Removal renames to `.deleting` first, so a removal cut short
//! never leaves a folder that looks complete.

mod region;

pub use region::{Region, copy_region, flat_range_regions};

use crate::fs::{sync_dir, write_atomic, write_atomic_at};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// The format version in every manifest and index.
pub const FORMAT: u32 = 1;
/// The manifest's file name: present only in a complete checkpoint.
pub const MARKER: &str = "COMPLETE";
const PARTIAL: &str = ".partial";
const DELETING: &str = ".deleting";

/// What a piece holds of a parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// The parameter's values, in the parameter's dtype.
    Param,
    /// The f32 master copy, written only when the parameter is not f32.
    Master,
    /// AdamW's first moment (f32).
    ExpAvg,
    /// AdamW's second moment (f32).
    ExpAvgSq,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Param => "param",
            State::Master => "master",
            State::ExpAvg => "exp_avg",
            State::ExpAvgSq => "exp_avg_sq",
        }
    }
}

/// Element types a checkpoint holds (safetensors' names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Dtype {
    F32,
    F64,
    BF16,
    F16,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::F64 => 8,
            Dtype::F32 => 4,
            Dtype::BF16 | Dtype::F16 => 2,
        }
    }

    fn safetensors(self) -> safetensors::Dtype {
        match self {
            Dtype::F32 => safetensors::Dtype::F32,
            Dtype::F64 => safetensors::Dtype::F64,
            Dtype::BF16 => safetensors::Dtype::BF16,
            Dtype::F16 => safetensors::Dtype::F16,
        }
    }
}

/// One region of one tensor's state, with its bytes (row-major,
/// little-endian), as a rank hands it to [`write_rank`].
#[derive(Clone, Debug, PartialEq)]
pub struct Piece {
    pub tensor: String,
    pub state: State,
    pub global_shape: Vec<u64>,
    pub region: Region,
    pub dtype: Dtype,
    pub data: Vec<u8>,
}

impl Piece {
    /// The key of the piece in its safetensors file.
    fn key(&self, i: usize) -> String {
        format!("{}/{}/{i}", self.state.name(), self.tensor)
    }
}

/// A piece's entry in its rank's index.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Its name in the safetensors file.
    pub key: String,
    pub tensor: String,
    pub state: State,
    pub global_shape: Vec<u64>,
    pub region: Region,
    pub dtype: Dtype,
    pub crc32: u32,
}

/// `rank-R.json`: what `rank-R.safetensors` holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankIndex {
    pub format: u32,
    pub rank: usize,
    pub file: String,
    pub bytes: u64,
    pub crc32: u32,
    pub entries: Vec<Entry>,
}

/// A file of the checkpoint with its size and CRC-32.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSum {
    pub file: String,
    pub bytes: u64,
    pub crc32: u32,
}

/// The plan that wrote a checkpoint (for the record: any plan can read it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanIdentity {
    /// `plan.ron`'s hash (empty for a hand-written plan binary).
    pub hash: String,
    pub tp: usize,
    pub pp: usize,
    pub dp: usize,
    pub plan_gpus: usize,
    pub runtime_gpus: usize,
    /// `1f1b`, `gpipe`, `interleaved-V`.
    pub schedule: String,
    pub zero: u8,
    pub micro_batch: i64,
    pub micro_batches: usize,
    pub seq_len: i64,
    pub vocab: i64,
}

/// The learning-rate schedule and optimizer settings of a run.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimSettings {
    pub peak_lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Global-norm clipping (`None`: off).
    pub clip: Option<f64>,
}

/// Where the run's data stood.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, tag = "source", rename_all = "snake_case")]
pub enum DataPosition {
    /// Synthetic tokens: step `s` draws from seed `seed + s`.
    Synthetic { seed: u64, next_step: u64 },
    /// A token file: step `s` takes windows `s·rows ..` (wrapping around).
    Tokens {
        path: String,
        tokens: u64,
        dtype: String,
        next_step: u64,
    },
    /// A prepared data folder (`autopart data prepare`): step `s` takes
    /// rows `perm[(s·batch + i) mod rows]` of a permutation drawn from
    /// `seed` (reshuffled every epoch), so the position is `next_step`.
    Prepared {
        path: String,
        rows: u64,
        /// FNV-1a of `tokens.bin` as its manifest records it: tells folders apart.
        tokens_fnv1a: String,
        seed: u64,
        next_step: u64,
    },
}

/// The random state of a run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngState {
    /// The run's `--seed` (parameters and synthetic data derive from it).
    pub seed: u64,
    /// What else draws random numbers during training (none today: there
    /// is no dropout, and data order is a function of the step).
    pub note: String,
}

/// `COMPLETE`: the manifest of a complete checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub autopart_version: String,
    /// Optimizer steps taken when it was saved (the step it resumes after).
    pub step: u64,
    pub model: String,
    pub plan: PlanIdentity,
    pub world_size: usize,
    pub optim: OptimSettings,
    /// AdamW's step count (its bias corrections).
    pub optimizer_steps: u64,
    pub data: DataPosition,
    pub rng: RngState,
    /// Seconds since the Unix epoch when it was completed.
    pub created_unix: u64,
    /// Every tensor with its global shape and the states saved of it.
    pub tensors: BTreeMap<String, TensorInfo>,
    /// Every file but the manifest.
    pub files: Vec<FileSum>,
    /// The model's HuggingFace `config.json` (the plan's), so that
    /// `autopart ckpt export --hf` needs nothing but the checkpoint; absent
    /// in checkpoints of hand-written plan binaries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_config: Option<serde_json::Value>,
    /// f16 training's dynamic loss scale when saved, so that a resumed run
    /// scales as the uninterrupted one would; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<LossScale>,
}

/// The state of a dynamic loss scaler (f16 training).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossScale {
    pub scale: f64,
    /// Good steps since the scale last changed.
    pub good_steps: u64,
    /// Good steps in a row after which the scale doubles.
    pub growth_interval: u64,
}

impl Manifest {
    /// Bytes of all files.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }
}

/// A tensor of a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorInfo {
    pub shape: Vec<u64>,
    /// The dtype of its `param` state.
    pub dtype: Dtype,
    pub states: Vec<State>,
}

/// What can go wrong with a checkpoint; each names the file.
#[derive(Debug, Error)]
pub enum CkptError {
    /// (The I/O error is in the message, not a `source`, so that chained
    /// printers do not repeat it.)
    #[error("{}: {error}", path.display())]
    Io { path: PathBuf, error: io::Error },
    #[error("{}: {msg}", path.display())]
    Format { path: PathBuf, msg: String },
    #[error("{}: checksum mismatch in {what} (CRC-32 {got:08x}, the index says {want:08x}): the file is corrupt", path.display())]
    Checksum {
        path: PathBuf,
        what: String,
        want: u32,
        got: u32,
    },
    #[error("{}: {got} bytes, the index says {want}: the file is truncated or was replaced", path.display())]
    Size { path: PathBuf, want: u64, got: u64 },
    #[error("{}: not a complete checkpoint (no {MARKER}): {why}", path.display())]
    Incomplete { path: PathBuf, why: String },
    #[error("{}: no complete checkpoint to resume from{}", dir.display(), if incomplete.is_empty() { String::new() } else { format!(" (incomplete: {})", incomplete.join(", ")) })]
    NoCheckpoint {
        dir: PathBuf,
        incomplete: Vec<String>,
    },
    #[error("{}: has no tensor {tensor}{}", path.display(), hint.as_deref().map(|h| format!(" ({h})")).unwrap_or_default())]
    MissingTensor {
        path: PathBuf,
        tensor: String,
        hint: Option<String>,
    },
    #[error("{}: tensor {tensor} has shape {got:?}, this model's is {want:?}", path.display())]
    Shape {
        path: PathBuf,
        tensor: String,
        want: Vec<u64>,
        got: Vec<u64>,
    },
    #[error("{}: {tensor} has no {} state", path.display(), state.name())]
    MissingState {
        path: PathBuf,
        tensor: String,
        state: State,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CkptError + '_ {
    move |error| CkptError::Io {
        path: path.to_path_buf(),
        error,
    }
}

fn format_err(path: &Path, msg: impl Into<String>) -> CkptError {
    CkptError::Format {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// `DIR/step_N`.
pub fn step_dir(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("step_{step}"))
}

/// `DIR/step_N.partial`, where a save of step N writes.
pub fn partial_dir(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("step_{step}{PARTIAL}"))
}

/// The safetensors file of global rank `rank`.
pub fn rank_file(rank: usize) -> String {
    format!("rank-{rank}.safetensors")
}

/// The index file of global rank `rank`.
pub fn rank_index_file(rank: usize) -> String {
    format!("rank-{rank}.json")
}

/// Writes rank `rank`'s pieces into `dir` (a `.partial` folder):
/// `rank-R.safetensors`, then its index `rank-R.json`, each atomically and
/// fsynced. Returns the index.
pub fn write_rank(dir: &Path, rank: usize, pieces: &[Piece]) -> Result<RankIndex, CkptError> {
    let file = rank_file(rank);
    let path = dir.join(&file);
    let mut entries = Vec::with_capacity(pieces.len());
    let mut views = Vec::with_capacity(pieces.len());
    for (i, p) in pieces.iter().enumerate() {
        let want = p.region.numel() as usize * p.dtype.size();
        if p.data.len() != want || !p.region.fits(&p.global_shape) {
            return Err(format_err(
                &path,
                format!(
                    "piece {} of {} holds {} bytes for region {} of {:?} ({want} expected)",
                    p.state.name(),
                    p.tensor,
                    p.data.len(),
                    p.region,
                    p.global_shape
                ),
            ));
        }
        let key = p.key(i);
        entries.push(Entry {
            key: key.clone(),
            tensor: p.tensor.clone(),
            state: p.state,
            global_shape: p.global_shape.clone(),
            region: p.region.clone(),
            dtype: p.dtype,
            crc32: crc32fast::hash(&p.data),
        });
        views.push((key, FlatView(p, [p.region.numel() as usize])));
    }
    write_atomic_at(&path, |tmp| {
        safetensors::serialize_to_file(views, &None, tmp)
            .map_err(|e| io::Error::other(format!("{e:?}")))
    })
    .map_err(io_err(&path))?;
    let (bytes, crc32) = file_crc(&path)?;
    let index = RankIndex {
        format: FORMAT,
        rank,
        file,
        bytes,
        crc32,
        entries,
    };
    let json_path = dir.join(rank_index_file(rank));
    let json =
        serde_json::to_vec_pretty(&index).map_err(|e| format_err(&json_path, e.to_string()))?;
    write_atomic(&json_path, &json).map_err(io_err(&json_path))?;
    Ok(index)
}

/// A piece as safetensors sees it: flat (its region's shape is in the
/// index), of its dtype.
struct FlatView<'a>(&'a Piece, [usize; 1]);

impl safetensors::View for FlatView<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.0.dtype.safetensors()
    }
    fn shape(&self) -> &[usize] {
        &self.1
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.0.data)
    }
    fn data_len(&self) -> usize {
        self.0.data.len()
    }
}

/// The size and CRC-32 of a whole file.
pub fn file_crc(path: &Path) -> Result<(u64, u32), CkptError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).map_err(io_err(path))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((n, h.finalize()))
}

/// Rank 0's first act of a save: an empty `step_N.partial` (a stale one
/// from an interrupted save is removed). The other ranks write into it
/// only after this returned (a barrier).
pub fn begin(dir: &Path, step: u64) -> Result<PathBuf, CkptError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let partial = partial_dir(dir, step);
    if partial.exists() {
        fs::remove_dir_all(&partial).map_err(io_err(&partial))?;
    }
    fs::create_dir(&partial).map_err(io_err(&partial))?;
    sync_dir(dir);
    Ok(partial)
}

/// Rank 0's last act of a save, after every rank's [`write_rank`] returned:
/// reads the `world` rank indexes, checks that every file is there at its
/// size and that every tensor's states are covered exactly, writes the
/// manifest (`manifest.files` and `tensors` filled in here), and renames
/// `step_N.partial` to `step_N` (replacing an older `step_N`).
pub fn complete(dir: &Path, mut manifest: Manifest, world: usize) -> Result<PathBuf, CkptError> {
    let step = manifest.step;
    let partial = partial_dir(dir, step);
    let mut files = Vec::new();
    let mut coverage: BTreeMap<(String, State), u64> = BTreeMap::new();
    let mut regions: BTreeMap<(String, State), Vec<Region>> = BTreeMap::new();
    let mut tensors: BTreeMap<String, TensorInfo> = BTreeMap::new();
    for rank in 0..world {
        let index_path = partial.join(rank_index_file(rank));
        let index = read_index(&index_path)?;
        if index.rank != rank {
            return Err(format_err(
                &index_path,
                format!("is the index of rank {}", index.rank),
            ));
        }
        let data = partial.join(&index.file);
        let got = fs::metadata(&data).map_err(io_err(&data))?.len();
        if got != index.bytes {
            return Err(CkptError::Size {
                path: data,
                want: index.bytes,
                got,
            });
        }
        let json_bytes = fs::read(&index_path).map_err(io_err(&index_path))?;
        files.push(FileSum {
            file: index.file.clone(),
            bytes: index.bytes,
            crc32: index.crc32,
        });
        files.push(FileSum {
            file: rank_index_file(rank),
            bytes: json_bytes.len() as u64,
            crc32: crc32fast::hash(&json_bytes),
        });
        for e in &index.entries {
            *coverage.entry((e.tensor.clone(), e.state)).or_default() += e.region.numel();
            regions
                .entry((e.tensor.clone(), e.state))
                .or_default()
                .push(e.region.clone());
            let info = tensors
                .entry(e.tensor.clone())
                .or_insert_with(|| TensorInfo {
                    shape: e.global_shape.clone(),
                    dtype: e.dtype,
                    states: vec![],
                });
            if info.shape != e.global_shape {
                return Err(format_err(
                    &index_path,
                    format!(
                        "{} has global shape {:?} here and {:?} in another rank's index",
                        e.tensor, e.global_shape, info.shape
                    ),
                ));
            }
            if e.state == State::Param {
                info.dtype = e.dtype;
            }
            if !info.states.contains(&e.state) {
                info.states.push(e.state);
                info.states.sort();
            }
        }
    }
    for ((tensor, state), rs) in &regions {
        if let Some((a, b)) = overlap(&rs.iter().collect::<Vec<_>>()) {
            return Err(format_err(
                &partial,
                format!(
                    "two pieces of {tensor}'s {} state overlap ({a} and {b})",
                    state.name()
                ),
            ));
        }
    }
    for ((tensor, state), n) in &coverage {
        let want: u64 = tensors[tensor].shape.iter().product();
        if *n != want {
            return Err(format_err(
                &partial,
                format!(
                    "the ranks saved {n} elements of {tensor}'s {} state, which has {want}",
                    state.name()
                ),
            ));
        }
    }
    manifest.files = files;
    manifest.tensors = tensors;
    let marker = partial.join(MARKER);
    let json =
        serde_json::to_vec_pretty(&manifest).map_err(|e| format_err(&marker, e.to_string()))?;
    write_atomic(&marker, &json).map_err(io_err(&marker))?;
    let done = step_dir(dir, step);
    // An older step_N is renamed away first and deleted only after the new
    // one is in place: a crash in between leaves one of them loadable
    // (`.deleting` is not, but its replacement is already renamed in).
    let old = done
        .exists()
        .then(|| dir.join(format!("step_{step}{DELETING}")));
    if let Some(old) = &old {
        if old.exists() {
            fs::remove_dir_all(old).map_err(io_err(old))?;
        }
        fs::rename(&done, old).map_err(io_err(&done))?;
    }
    fs::rename(&partial, &done).map_err(io_err(&done))?;
    sync_dir(dir);
    if let Some(old) = &old {
        fs::remove_dir_all(old).map_err(io_err(old))?;
    }
    Ok(done)
}

/// The first two regions of `regions` that overlap, if any.
fn overlap(regions: &[&Region]) -> Option<(Region, Region)> {
    for (i, a) in regions.iter().enumerate() {
        for b in &regions[i + 1..] {
            if a.intersect(b).is_some() {
                return Some(((*a).clone(), (*b).clone()));
            }
        }
    }
    None
}

/// Removes a checkpoint folder: renamed to `.deleting` first (so it stops
/// looking complete at once), then deleted.
fn remove(dir: &Path, path: &Path) -> Result<(), CkptError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let doomed = dir.join(format!("{name}{DELETING}"));
    if doomed.exists() {
        fs::remove_dir_all(&doomed).map_err(io_err(&doomed))?;
    }
    fs::rename(path, &doomed).map_err(io_err(path))?;
    sync_dir(dir);
    fs::remove_dir_all(&doomed).map_err(io_err(&doomed))
}

/// Removes a `.partial` folder of a failed save (rank 0, best effort by
/// the caller).
pub fn abandon(dir: &Path, step: u64) -> Result<(), CkptError> {
    let partial = partial_dir(dir, step);
    if partial.exists() {
        fs::remove_dir_all(&partial).map_err(io_err(&partial))?;
    }
    Ok(())
}

/// What a folder of `DIR` is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// `step_N` with its manifest.
    Complete,
    /// `step_N.partial`: a save in progress or interrupted.
    Partial,
    /// `step_N` without a manifest (never written by autopart: damaged).
    Unmarked,
    /// `step_N.deleting`: a removal cut short.
    Deleting,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Complete => "complete",
            Status::Partial => "incomplete (save interrupted)",
            Status::Unmarked => "incomplete (no COMPLETE marker)",
            Status::Deleting => "being deleted",
        }
    }
}

/// One checkpoint folder of `DIR`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    pub step: u64,
    pub path: PathBuf,
    pub status: Status,
}

/// The checkpoint folders of `dir` by step (then status); other entries
/// are ignored. A missing `dir` has none.
pub fn list(dir: &Path) -> Result<Vec<Listed>, CkptError> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(io_err(dir)(e)),
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("step_") else {
            continue;
        };
        let (num, status) = if let Some(n) = rest.strip_suffix(PARTIAL) {
            (n, Status::Partial)
        } else if let Some(n) = rest.strip_suffix(DELETING) {
            (n, Status::Deleting)
        } else {
            let status = if entry.path().join(MARKER).is_file() {
                Status::Complete
            } else {
                Status::Unmarked
            };
            (rest, status)
        };
        if !num.bytes().all(|b| b.is_ascii_digit()) || num.is_empty() {
            continue;
        }
        let Ok(step) = num.parse() else { continue };
        if !entry.path().is_dir() {
            continue;
        }
        out.push(Listed {
            step,
            path: entry.path(),
            status,
        });
    }
    out.sort_by_key(|l| (l.step, l.status as u8));
    Ok(out)
}

/// Which checkpoint `--resume` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resume {
    /// The latest complete checkpoint; an error if there is none.
    Latest,
    /// The latest complete checkpoint, or a fresh start if there is none.
    Auto,
    /// `DIR/step_N`.
    Step(u64),
    /// A checkpoint folder.
    Path(PathBuf),
}

impl std::str::FromStr for Resume {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "" => return Err("expected latest, auto, a step number or a path".into()),
            "latest" => Resume::Latest,
            "auto" => Resume::Auto,
            _ if s.bytes().all(|b| b.is_ascii_digit()) => {
                Resume::Step(s.parse().map_err(|e| format!("step {s}: {e}"))?)
            }
            _ => Resume::Path(PathBuf::from(s)),
        })
    }
}

/// What [`resolve`] found: the checkpoint to load (if any) and the
/// incomplete folders newer than it (to report).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub path: Option<PathBuf>,
    pub skipped: Vec<Listed>,
}

/// The checkpoint `resume` names, in `dir` (`--checkpoint-dir`; needed
/// unless `resume` is a path).
pub fn resolve(resume: &Resume, dir: Option<&Path>) -> Result<Resolved, CkptError> {
    let need_dir = || {
        dir.ok_or_else(|| {
            format_err(
                Path::new("--resume"),
                "latest, auto and a step number need --checkpoint-dir",
            )
        })
    };
    match resume {
        Resume::Path(p) => {
            check_complete(p)?;
            Ok(Resolved {
                path: Some(p.clone()),
                skipped: vec![],
            })
        }
        Resume::Step(n) => {
            let p = step_dir(need_dir()?, *n);
            check_complete(&p)?;
            Ok(Resolved {
                path: Some(p),
                skipped: vec![],
            })
        }
        Resume::Latest | Resume::Auto => {
            let dir = need_dir()?;
            let all = list(dir)?;
            let latest = all.iter().rev().find(|l| l.status == Status::Complete);
            let skipped: Vec<Listed> = all
                .iter()
                .filter(|l| {
                    matches!(l.status, Status::Partial | Status::Unmarked)
                        && latest.is_none_or(|c| l.step > c.step)
                })
                .cloned()
                .collect();
            match latest {
                Some(l) => Ok(Resolved {
                    path: Some(l.path.clone()),
                    skipped,
                }),
                None if *resume == Resume::Auto => Ok(Resolved {
                    path: None,
                    skipped,
                }),
                None => Err(CkptError::NoCheckpoint {
                    dir: dir.to_path_buf(),
                    incomplete: skipped
                        .iter()
                        .map(|l| l.path.display().to_string())
                        .collect(),
                }),
            }
        }
    }
}

fn check_complete(path: &Path) -> Result<(), CkptError> {
    if !path.is_dir() {
        return Err(CkptError::Incomplete {
            path: path.to_path_buf(),
            why: "no such folder".into(),
        });
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.ends_with(PARTIAL) {
        return Err(CkptError::Incomplete {
            path: path.to_path_buf(),
            why: "its save was interrupted".into(),
        });
    }
    if name.ends_with(DELETING) {
        return Err(CkptError::Incomplete {
            path: path.to_path_buf(),
            why: "it is being deleted (--keep)".into(),
        });
    }
    if !path.join(MARKER).is_file() {
        return Err(CkptError::Incomplete {
            path: path.to_path_buf(),
            why: "no rank finished marking it".into(),
        });
    }
    Ok(())
}

/// Moves every complete (or unmarked) checkpoint of `dir` later than
/// `step` aside, to `step_N.superseded-<unix seconds>`: a folder `list`,
/// `resolve` and `prune` ignore, kept for the user. A run that starts at
/// `step` calls it so that `--resume auto` and `--keep` never take a later
/// checkpoint of another timeline for its own. Returns the moves.
pub fn supersede(dir: &Path, step: u64) -> Result<Vec<(u64, PathBuf)>, CkptError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut moved = Vec::new();
    for l in list(dir)? {
        if l.step > step && matches!(l.status, Status::Complete | Status::Unmarked) {
            let to = dir.join(format!("step_{}.superseded-{now}", l.step));
            fs::rename(&l.path, &to).map_err(io_err(&l.path))?;
            moved.push((l.step, to));
        }
    }
    if !moved.is_empty() {
        sync_dir(dir);
    }
    Ok(moved)
}

/// Keeps the newest `keep` complete checkpoints of `dir` and removes the
/// older ones (and leftovers of removals cut short). Returns the steps
/// removed. Call it only after the newest checkpoint is complete.
pub fn prune(dir: &Path, keep: usize) -> Result<Vec<u64>, CkptError> {
    let all = list(dir)?;
    let complete: Vec<&Listed> = all
        .iter()
        .filter(|l| l.status == Status::Complete)
        .collect();
    let mut removed = Vec::new();
    for l in all.iter().filter(|l| l.status == Status::Deleting) {
        fs::remove_dir_all(&l.path).map_err(io_err(&l.path))?;
    }
    if complete.len() > keep {
        for l in &complete[..complete.len() - keep] {
            remove(dir, &l.path)?;
            removed.push(l.step);
        }
    }
    Ok(removed)
}

fn read_index(path: &Path) -> Result<RankIndex, CkptError> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    let index: RankIndex =
        serde_json::from_slice(&bytes).map_err(|e| format_err(path, format!("bad index: {e}")))?;
    if index.format != FORMAT {
        return Err(format_err(
            path,
            format!("format {} (this autopart reads {FORMAT})", index.format),
        ));
    }
    if index.file != rank_file(index.rank) {
        return Err(format_err(
            path,
            format!(
                "names file {:?}, expected {:?}",
                index.file,
                rank_file(index.rank)
            ),
        ));
    }
    for e in &index.entries {
        let n = e.global_shape.len();
        let numel = e
            .global_shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d));
        let inside = e.region.offset.len() == n
            && e.region.shape.len() == n
            && (0..n).all(|d| {
                e.region.offset[d]
                    .checked_add(e.region.shape[d])
                    .is_some_and(|end| end <= e.global_shape[d])
            });
        let bytes = numel.and_then(|k| k.checked_mul(e.dtype.size() as u64));
        if !inside || bytes.is_none_or(|b| b > 1 << 50) {
            return Err(format_err(
                path,
                format!(
                    "piece {} has region {:?}+{:?} of shape {:?}: not a region of that shape",
                    e.key, e.region.offset, e.region.shape, e.global_shape
                ),
            ));
        }
    }
    Ok(index)
}

/// Reads a complete checkpoint's manifest.
pub fn read_manifest(path: &Path) -> Result<Manifest, CkptError> {
    check_complete(path)?;
    let marker = path.join(MARKER);
    let bytes = fs::read(&marker).map_err(io_err(&marker))?;
    let m: Manifest = serde_json::from_slice(&bytes)
        .map_err(|e| format_err(&marker, format!("bad manifest: {e}")))?;
    if m.format != FORMAT {
        return Err(format_err(
            &marker,
            format!("format {} (this autopart reads {FORMAT})", m.format),
        ));
    }
    Ok(m)
}

/// Where a piece lies.
#[derive(Clone, Debug)]
struct Loc {
    file: usize,
    key: String,
    region: Region,
    dtype: Dtype,
    crc32: u32,
    /// Byte range in the file.
    start: u64,
    len: u64,
}

/// A piece's place (file, byte offset) and its checked bytes.
type CachedPiece = ((usize, u64), Vec<u8>);

/// A complete checkpoint opened for reading: its manifest and where every
/// piece lies. Reading a region reads only the pieces that intersect it.
#[derive(Debug)]
pub struct Checkpoint {
    pub path: PathBuf,
    pub manifest: Manifest,
    files: Vec<(PathBuf, File)>,
    pieces: HashMap<(String, State), Vec<Loc>>,
    /// The last piece read (file, offset) and its checked bytes: a restore
    /// reads a shard's flat slice as up to 2·rank − 1 regions, which mostly
    /// fall in the same piece.
    last: std::sync::Mutex<Option<CachedPiece>>,
}

impl Checkpoint {
    /// Opens `path` (`DIR/step_N`): the manifest, every rank index and
    /// every safetensors header; checks every file's size.
    pub fn open(path: &Path) -> Result<Self, CkptError> {
        let manifest = read_manifest(path)?;
        let sums: HashMap<&str, &FileSum> = manifest
            .files
            .iter()
            .map(|f| (f.file.as_str(), f))
            .collect();
        let mut files = Vec::new();
        let mut pieces: HashMap<(String, State), Vec<Loc>> = HashMap::new();
        for rank in 0..manifest.world_size {
            let index_name = rank_index_file(rank);
            let index_path = path.join(&index_name);
            let json = fs::read(&index_path).map_err(io_err(&index_path))?;
            if let Some(sum) = sums.get(index_name.as_str()) {
                let got = crc32fast::hash(&json);
                if got != sum.crc32 {
                    return Err(CkptError::Checksum {
                        path: index_path,
                        what: "the index".into(),
                        want: sum.crc32,
                        got,
                    });
                }
            }
            let index = read_index(&index_path)?;
            let data = path.join(&index.file);
            let got = fs::metadata(&data).map_err(io_err(&data))?.len();
            let want = sums
                .get(index.file.as_str())
                .map_or(index.bytes, |f| f.bytes);
            if got != want {
                return Err(CkptError::Size {
                    path: data,
                    want,
                    got,
                });
            }
            let offsets = header_offsets(&data)?;
            let file = files.len();
            let handle = File::open(&data).map_err(io_err(&data))?;
            files.push((data.clone(), handle));
            for e in index.entries {
                let Some(&(start, len)) = offsets.get(&e.key) else {
                    return Err(format_err(&data, format!("has no piece {}", e.key)));
                };
                if len != e.region.numel() * e.dtype.size() as u64
                    || start.saturating_add(len) > got
                {
                    return Err(format_err(
                        &data,
                        format!("piece {} holds {len} bytes, not region {}", e.key, e.region),
                    ));
                }
                pieces.entry((e.tensor, e.state)).or_default().push(Loc {
                    file,
                    key: e.key,
                    region: e.region,
                    dtype: e.dtype,
                    crc32: e.crc32,
                    start,
                    len,
                });
            }
        }
        for ((tensor, state), locs) in &pieces {
            let rs: Vec<&Region> = locs.iter().map(|l| &l.region).collect();
            if let Some((a, b)) = overlap(&rs) {
                return Err(format_err(
                    path,
                    format!(
                        "two pieces of {tensor}'s {} state overlap ({a} and {b})",
                        state.name()
                    ),
                ));
            }
            let shape = manifest.tensors.get(tensor).map(|t| &t.shape);
            // Checked: the manifest's shape is read, not trusted (a shape
            // whose element count overflows u64 matches no pieces).
            let n = rs.iter().fold(0u64, |acc, r| acc.saturating_add(r.numel()));
            let want = shape.and_then(|s| s.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d)));
            if want != Some(n) || !rs.iter().all(|r| shape.is_some_and(|s| r.fits(s))) {
                return Err(format_err(
                    path,
                    format!(
                        "the pieces of {tensor}'s {} state cover {n} elements, the manifest's shape {shape:?}",
                        state.name()
                    ),
                ));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            manifest,
            files,
            pieces,
            last: std::sync::Mutex::new(None),
        })
    }

    /// The dtype of `state` of `tensor`, if it was saved.
    pub fn dtype(&self, tensor: &str, state: State) -> Option<Dtype> {
        self.pieces
            .get(&(tensor.to_string(), state))
            .and_then(|l| l.first())
            .map(|l| l.dtype)
    }

    /// The global shape of `tensor`, or an error naming it.
    pub fn shape(&self, tensor: &str) -> Result<&[u64], CkptError> {
        match self.manifest.tensors.get(tensor) {
            Some(t) => Ok(&t.shape),
            None => Err(CkptError::MissingTensor {
                path: self.path.clone(),
                tensor: tensor.to_string(),
                hint: Some(format!(
                    "it holds {} tensors of model {}{}",
                    self.manifest.tensors.len(),
                    self.manifest.model,
                    self.manifest
                        .tensors
                        .keys()
                        .next()
                        .map(|k| format!(", such as {k}"))
                        .unwrap_or_default()
                )),
            }),
        }
    }

    /// Checks that `tensor` exists with global shape `want`.
    pub fn check_shape(&self, tensor: &str, want: &[u64]) -> Result<(), CkptError> {
        let got = self.shape(tensor)?;
        if got != want {
            return Err(CkptError::Shape {
                path: self.path.clone(),
                tensor: tensor.to_string(),
                want: want.to_vec(),
                got: got.to_vec(),
            });
        }
        Ok(())
    }

    /// Whether `state` of `tensor` was saved.
    pub fn has(&self, tensor: &str, state: State) -> bool {
        self.pieces.contains_key(&(tensor.to_string(), state))
    }

    /// The bytes of `region` of `tensor`'s `state` (row-major), assembled
    /// from the pieces that intersect it, each read once and checked
    /// against its CRC-32. All pieces of a state share one dtype.
    pub fn read_region(
        &self,
        tensor: &str,
        state: State,
        region: &Region,
    ) -> Result<(Dtype, Vec<u8>), CkptError> {
        let shape = self.shape(tensor)?;
        if !region.fits(shape) {
            return Err(format_err(
                &self.path,
                format!("region {region} lies outside {tensor}'s shape {shape:?}"),
            ));
        }
        let Some(locs) = self.pieces.get(&(tensor.to_string(), state)) else {
            return Err(CkptError::MissingState {
                path: self.path.clone(),
                tensor: tensor.to_string(),
                state,
            });
        };
        let dtype = locs[0].dtype;
        let elem = dtype.size();
        let mut out = vec![0u8; region.numel() as usize * elem];
        let mut covered = 0u64;
        for loc in locs {
            let Some(part) = loc.region.intersect(region) else {
                continue;
            };
            let (path, f) = &self.files[loc.file];
            if loc.dtype != dtype {
                return Err(format_err(
                    path,
                    format!("{} is {:?}, other pieces {dtype:?}", loc.key, loc.dtype),
                ));
            }
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            let id = (loc.file, loc.start);
            if last.as_ref().is_none_or(|(k, _)| *k != id) {
                let mut buf = vec![0u8; loc.len as usize];
                f.read_exact_at(&mut buf, loc.start).map_err(io_err(path))?;
                let got = crc32fast::hash(&buf);
                if got != loc.crc32 {
                    return Err(CkptError::Checksum {
                        path: path.clone(),
                        what: format!("piece {}", loc.key),
                        want: loc.crc32,
                        got,
                    });
                }
                *last = Some((id, buf));
            }
            let buf = match last.as_ref() {
                Some((_, b)) => b,
                None => continue,
            };
            copy_region(buf, &loc.region, &mut out, region, &part, elem);
            covered += part.numel();
        }
        if covered != region.numel() {
            return Err(format_err(
                &self.path,
                format!(
                    "its pieces cover {covered} of the {} elements of {tensor}'s {} state in region {region}",
                    region.numel(),
                    state.name()
                ),
            ));
        }
        Ok((dtype, out))
    }

    /// Checks every file's CRC-32 against the manifest (reads everything).
    pub fn verify(&self) -> Result<(), CkptError> {
        for f in &self.manifest.files {
            let path = self.path.join(&f.file);
            let (bytes, crc) = file_crc(&path)?;
            if bytes != f.bytes {
                return Err(CkptError::Size {
                    path,
                    want: f.bytes,
                    got: bytes,
                });
            }
            if crc != f.crc32 {
                return Err(CkptError::Checksum {
                    path,
                    what: "the whole file".into(),
                    want: f.crc32,
                    got: crc,
                });
            }
        }
        Ok(())
    }
}

/// The byte range of every tensor of a safetensors file, from its header.
fn header_offsets(path: &Path) -> Result<HashMap<String, (u64, u64)>, CkptError> {
    let f = File::open(path).map_err(io_err(path))?;
    let mut len = [0u8; 8];
    f.read_exact_at(&mut len, 0)
        .map_err(|_| format_err(path, "too short for a safetensors header"))?;
    let n = u64::from_le_bytes(len);
    let size = f.metadata().map_err(io_err(path))?.len();
    if n > 100 << 20 || 8 + n > size {
        return Err(format_err(
            path,
            format!("bad safetensors header length {n}"),
        ));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact_at(&mut header, 8).map_err(io_err(path))?;
    #[derive(Deserialize)]
    struct Info {
        data_offsets: (u64, u64),
    }
    let map: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| format_err(path, format!("bad safetensors header: {e}")))?;
    let mut out = HashMap::new();
    for (k, v) in map {
        if k == "__metadata__" {
            continue;
        }
        let info: Info = serde_json::from_value(v)
            .map_err(|e| format_err(path, format!("bad header entry {k}: {e}")))?;
        let (b, e) = info.data_offsets;
        if e < b || e > size - 8 - n {
            return Err(format_err(
                path,
                format!(
                    "bad offsets of {k}: {b}..{e} in a data section of {} bytes",
                    size - 8 - n
                ),
            ));
        }
        out.insert(k, (8 + n + b, e - b));
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
