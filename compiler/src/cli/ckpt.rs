//! `autopart ckpt inspect|merge`: reads checkpoints through the format
//! module `autopart_vocab::ckpt` (no libtorch).
//!
//! `inspect` lists a `--checkpoint-dir` or summarises one `step_N` folder;
//! `merge` streams a checkpoint's tensors, whole, into one safetensors file
//! (one tensor in memory at a time), written atomically; `export` (in
//! `export.rs`) writes a HuggingFace model folder.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use autopart_vocab::ckpt::{
    self, Checkpoint, CkptError, DataPosition, Dtype, Listed, MARKER, Manifest, PlanIdentity,
    Region, Resume, State, Status,
};
use autopart_vocab::fs::write_atomic_with;
use clap::{Args, Subcommand};
use serde_json::{Value, json};

#[derive(Debug, Args)]
pub(super) struct CkptArgs {
    #[command(subcommand)]
    command: CkptCommand,
}

#[derive(Debug, Subcommand)]
enum CkptCommand {
    /// List a checkpoint directory (its step_N folders and what
    /// `--resume latest` loads) or summarise one step_N folder.
    Inspect(InspectArgs),
    /// Write a checkpoint's full (unsharded) tensors into one safetensors file.
    Merge(MergeArgs),
    /// Write a checkpoint as a HuggingFace model folder (config.json,
    /// safetensors, sharded with an index above --max-shard-size) that
    /// transformers loads with from_pretrained:
    /// `autopart ckpt export ck/step_N --hf OUT_DIR`.
    Export(super::export::ExportArgs),
}

#[derive(Debug, Args)]
struct InspectArgs {
    /// A checkpoint directory (the run's --checkpoint-dir) or one step_N folder.
    path: PathBuf,
    /// Print one JSON object instead of the readable summary.
    #[arg(long)]
    json: bool,
    /// Check every file's CRC-32 against the manifest (reads everything).
    #[arg(long)]
    verify: bool,
}

#[derive(Debug, Args)]
struct MergeArgs {
    /// A complete checkpoint folder, DIR/step_N.
    step: PathBuf,
    /// The safetensors file to write (atomically: a failed merge leaves no file).
    #[arg(long)]
    out: PathBuf,
    /// Also write the optimizer state: optimizer/exp_avg/<name>,
    /// optimizer/exp_avg_sq/<name> and (when saved) optimizer/master/<name>.
    #[arg(long)]
    with_optimizer: bool,
}

pub(super) fn ckpt(args: &CkptArgs) -> Result<()> {
    match &args.command {
        CkptCommand::Inspect(a) => inspect(a),
        CkptCommand::Merge(a) => merge(a),
        CkptCommand::Export(a) => super::export::export(a),
    }
}

/// A `CkptError` as an `anyhow` error. Its message already names the file
/// and includes the I/O cause, so the cause is not chained a second time.
fn ck<T>(r: Result<T, CkptError>) -> Result<T> {
    r.map_err(|e| anyhow!("{e}"))
}

// ----- what a path is -------------------------------------------------------

/// What `inspect` or `merge` was pointed at.
enum Target {
    /// A folder of `step_N` folders.
    Dir(Vec<Listed>),
    /// One checkpoint folder (complete or not).
    Step,
}

/// `step_N`, `step_N.partial` or `step_N.deleting`: the step and status
/// the name says (a `step_N` is complete only with its marker).
fn step_name(path: &Path) -> Option<(u64, Status)> {
    let name = path.file_name()?.to_str()?;
    let rest = name.strip_prefix("step_")?;
    let (num, status) = if let Some(n) = rest.strip_suffix(".partial") {
        (n, Status::Partial)
    } else if let Some(n) = rest.strip_suffix(".deleting") {
        (n, Status::Deleting)
    } else if path.join(MARKER).is_file() {
        (rest, Status::Complete)
    } else {
        (rest, Status::Unmarked)
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((num.parse().ok()?, status))
}

fn classify(path: &Path) -> Result<Target> {
    let meta = fs::metadata(path).with_context(|| format!("{}", path.display()))?;
    if !meta.is_dir() {
        bail!(
            "{} is a file, not a checkpoint: give a checkpoint directory or one of its step_N folders",
            path.display()
        );
    }
    let looks_like_step = step_name(path).is_some()
        || path.join(MARKER).exists()
        || path.join("rank-0.json").exists()
        || path.join(ckpt::rank_file(0)).exists();
    if looks_like_step {
        return Ok(Target::Step);
    }
    let listed = ck(ckpt::list(path))?;
    if listed.is_empty() {
        bail!(
            "{} holds no checkpoint: neither a checkpoint folder (COMPLETE, rank-R.safetensors) nor a checkpoint directory (step_N folders)",
            path.display()
        );
    }
    Ok(Target::Dir(listed))
}

/// The manifest of a step folder; a folder being deleted or not complete
/// is an error that says why.
fn step_manifest(path: &Path) -> Result<Manifest> {
    if let Some((_, Status::Deleting)) = step_name(path) {
        bail!(
            "{}: not a complete checkpoint: it is being deleted (a removal by --keep was cut short)",
            path.display()
        );
    }
    ck(ckpt::read_manifest(path))
}

// ----- formatting -----------------------------------------------------------

fn plan_text(p: &PlanIdentity) -> String {
    format!(
        "tp{} pp{} dp{} zero{} {}",
        p.tp, p.pp, p.dp, p.zero, p.schedule
    )
}

fn dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::F32 => "f32",
        Dtype::F64 => "f64",
        Dtype::BF16 => "bf16",
        Dtype::F16 => "f16",
    }
}

/// The dtype as a safetensors header spells it.
fn safetensors_dtype(d: Dtype) -> &'static str {
    match d {
        Dtype::F32 => "F32",
        Dtype::F64 => "F64",
        Dtype::BF16 => "BF16",
        Dtype::F16 => "F16",
    }
}

fn status_key(s: Status) -> &'static str {
    match s {
        Status::Complete => "complete",
        Status::Partial => "partial",
        Status::Unmarked => "unmarked",
        Status::Deleting => "deleting",
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.2}", bytes as f64 / (1u64 << 20) as f64)
}

/// A number as a person writes it: `0.001`, `1e-8`, `0.9`.
fn num(x: f64) -> String {
    if x != 0.0 && x.abs() < 1e-3 {
        format!("{x:e}")
    } else {
        format!("{x}")
    }
}

/// Seconds since the Unix epoch as `YYYY-MM-DD HH:MM:SS UTC`.
fn utc(secs: u64) -> String {
    // Days to a civil date (Howard Hinnant's algorithm).
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn shape_text(shape: &[u64]) -> String {
    let dims: Vec<String> = shape.iter().map(u64::to_string).collect();
    format!("[{}]", dims.join(", "))
}

fn states_text(states: &[State]) -> String {
    let names: Vec<&str> = states.iter().map(|s| s.name()).collect();
    names.join(", ")
}

/// Prints rows as columns (the first row is the header), right-aligning
/// the columns `right` names.
fn table(rows: &[Vec<String>], right: &[usize], indent: &str) {
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, cell)| {
                if right.contains(&c) {
                    format!("{cell:>w$}", w = widths[c])
                } else {
                    format!("{cell:<w$}", w = widths[c])
                }
            })
            .collect();
        println!("{indent}{}", cells.join("  ").trim_end());
    }
}

/// Bytes of the files directly in a folder (what is on disk, whatever the
/// manifest says).
fn folder_bytes(path: &Path) -> u64 {
    let Ok(rd) = fs::read_dir(path) else {
        return 0;
    };
    rd.filter_map(|e| e.ok()?.metadata().ok())
        .filter(fs::Metadata::is_file)
        .map(|m| m.len())
        .sum()
}

// ----- inspect --------------------------------------------------------------

fn inspect(args: &InspectArgs) -> Result<()> {
    match classify(&args.path)? {
        Target::Dir(listed) => inspect_dir(args, &listed),
        Target::Step => inspect_step(args),
    }
}

/// A listed folder with what its manifest says (complete ones).
struct Row {
    listed: Listed,
    bytes: u64,
    manifest: Option<Manifest>,
    /// Why a complete folder's manifest did not read, or why it failed
    /// `--verify`.
    error: Option<String>,
    verified: Option<bool>,
}

fn inspect_dir(args: &InspectArgs, listed: &[Listed]) -> Result<()> {
    let dir = &args.path;
    let mut rows = Vec::new();
    for l in listed {
        let mut row = Row {
            listed: l.clone(),
            bytes: folder_bytes(&l.path),
            manifest: None,
            error: None,
            verified: None,
        };
        if l.status == Status::Complete {
            match ckpt::read_manifest(&l.path) {
                Ok(m) => row.manifest = Some(m),
                Err(e) => row.error = Some(e.to_string()),
            }
            if args.verify {
                if row.error.is_none() {
                    if let Err(e) = verify_all(&l.path) {
                        row.error = Some(format!("{e:#}"));
                    }
                }
                row.verified = Some(row.error.is_none());
            }
        }
        rows.push(row);
    }
    let resolved = ck(ckpt::resolve(&Resume::Latest, Some(dir)));
    let failed: Vec<&Row> = rows.iter().filter(|r| r.verified == Some(false)).collect();
    if args.json {
        let checkpoints: Vec<Value> = rows
            .iter()
            .map(|r| {
                let m = r.manifest.as_ref();
                let mut v = json!({
                    "step": r.listed.step,
                    "path": r.listed.path.display().to_string(),
                    "status": status_key(r.listed.status),
                    "status_text": r.listed.status.name(),
                    "bytes": r.bytes,
                    "model": m.map(|m| m.model.clone()),
                    "plan": m.map(|m| plan_text(&m.plan)),
                    "world_size": m.map(|m| m.world_size),
                    "created_unix": m.map(|m| m.created_unix),
                    "tensors": m.map(|m| m.tensors.len()),
                });
                if let Some(e) = &r.error {
                    v["error"] = json!(e);
                }
                if args.verify && r.listed.status == Status::Complete {
                    v["verified"] = json!(r.verified);
                }
                v
            })
            .collect();
        let (latest, skipped) = match &resolved {
            Ok(r) => (
                r.path.as_ref().map(|p| {
                    json!({
                        "step": step_name(p).map(|(s, _)| s),
                        "path": p.display().to_string(),
                    })
                }),
                r.skipped
                    .iter()
                    .map(|l| {
                        json!({
                            "step": l.step,
                            "path": l.path.display().to_string(),
                            "status": status_key(l.status),
                        })
                    })
                    .collect::<Vec<_>>(),
            ),
            Err(_) => (None, vec![]),
        };
        let value = json!({
            "path": dir.display().to_string(),
            "checkpoints": checkpoints,
            "latest": latest,
            "skipped": skipped,
        });
        println!("{value}");
    } else {
        println!("checkpoints in {}:", dir.display());
        let mut cells = vec![
            ["step", "status", "MiB", "model", "plan", "world", "created"]
                .map(String::from)
                .to_vec(),
        ];
        if args.verify {
            cells[0].push("verify".into());
        }
        for r in &rows {
            let m = r.manifest.as_ref();
            let dash = || "-".to_string();
            let mut row = vec![
                r.listed.step.to_string(),
                r.listed.status.name().to_string(),
                mib(r.bytes),
                m.map_or_else(dash, |m| m.model.clone()),
                m.map_or_else(dash, |m| plan_text(&m.plan)),
                m.map_or_else(dash, |m| m.world_size.to_string()),
                m.map_or_else(dash, |m| utc(m.created_unix)),
            ];
            if args.verify {
                row.push(match r.verified {
                    Some(true) => "OK".into(),
                    Some(false) => "FAILED".into(),
                    None => dash(),
                });
            }
            cells.push(row);
        }
        table(&cells, &[0, 2, 5], "  ");
        for r in rows.iter().filter(|r| r.error.is_some()) {
            if let Some(e) = &r.error {
                println!("  step {}: {e}", r.listed.step);
            }
        }
        match &resolved {
            Ok(r) => {
                if let Some(p) = &r.path {
                    print!("--resume latest loads {}", p.display());
                } else {
                    print!("--resume latest finds nothing");
                }
                if r.skipped.is_empty() {
                    println!();
                } else {
                    let names: Vec<String> = r
                        .skipped
                        .iter()
                        .map(|l| format!("step {} ({})", l.step, skipped_why(l.status)))
                        .collect();
                    println!(" (it skips the newer {})", names.join(", "));
                }
            }
            Err(e) => println!("--resume latest fails ({e}); --resume auto would start afresh"),
        }
    }
    if !failed.is_empty() {
        let why: Vec<String> = failed
            .iter()
            .map(|r| r.error.clone().unwrap_or_default())
            .collect();
        bail!(
            "{} of {} complete checkpoints failed verification: {}",
            failed.len(),
            rows.iter()
                .filter(|r| r.listed.status == Status::Complete)
                .count(),
            why.join("; ")
        );
    }
    Ok(())
}

/// Why a folder `--resume latest` passes over is not loadable.
fn skipped_why(status: Status) -> &'static str {
    match status {
        Status::Partial => "save interrupted",
        Status::Unmarked => "no COMPLETE marker",
        Status::Deleting => "being deleted",
        Status::Complete => "complete",
    }
}

fn inspect_step(args: &InspectArgs) -> Result<()> {
    let path = &args.path;
    let m = step_manifest(path)?;
    let verify = args
        .verify
        .then(|| verify_all(path).map_err(|e| format!("{e:#}")));
    let verified = verify.as_ref().map(Result::is_ok);
    if args.json {
        let mut value = serde_json::to_value(&m)?;
        value["path"] = json!(path.display().to_string());
        value["bytes"] = json!(m.bytes());
        value["verified"] = json!(verified);
        if let Some(Err(e)) = &verify {
            value["verify_error"] = json!(e);
        }
        println!("{value}");
    } else {
        print_step(path, &m, verify.as_ref());
    }
    match verify {
        Some(Err(e)) => Err(anyhow!("verification failed: {e}")),
        _ => Ok(()),
    }
}

fn print_step(path: &Path, m: &Manifest, verify: Option<&Result<(), String>>) {
    let p = &m.plan;
    let o = &m.optim;
    println!("checkpoint {}", path.display());
    let field = |k: &str, v: String| println!("  {k:<11} {v}");
    field(
        "step",
        format!("{} (AdamW steps {})", m.step, m.optimizer_steps),
    );
    field("model", m.model.clone());
    let hash = if p.hash.is_empty() {
        String::new()
    } else {
        format!(", plan hash {}", p.hash)
    };
    field(
        "plan",
        format!(
            "{}, world size {} (plan GPUs {}, runtime GPUs {}{hash})",
            plan_text(p),
            m.world_size,
            p.plan_gpus,
            p.runtime_gpus
        ),
    );
    field(
        "batch",
        format!(
            "micro-batch {} x {} micro-batches, seq len {}, vocab {}",
            p.micro_batch, p.micro_batches, p.seq_len, p.vocab
        ),
    );
    field(
        "optimizer",
        format!(
            "AdamW lr {} -> {} (warm-up {} of {} steps), betas {} {}, eps {}, weight decay {}, clip {}",
            num(o.peak_lr),
            num(o.min_lr),
            o.warmup_steps,
            o.total_steps,
            num(o.beta1),
            num(o.beta2),
            num(o.eps),
            num(o.weight_decay),
            o.clip.map_or_else(|| "off".to_string(), num)
        ),
    );
    field(
        "data",
        match &m.data {
            DataPosition::Synthetic { seed, next_step } => {
                format!("synthetic tokens (seed {seed}), next step {next_step}")
            }
            DataPosition::Tokens {
                path,
                tokens,
                dtype,
                next_step,
            } => format!("{path} ({tokens} {dtype} tokens), next step {next_step}"),
            DataPosition::Prepared {
                path,
                rows,
                seed,
                next_step,
                ..
            } => format!("{path} ({rows} prepared rows, order seed {seed}), next step {next_step}"),
        },
    );
    let note = if m.rng.note.is_empty() {
        String::new()
    } else {
        format!(" ({})", m.rng.note)
    };
    field("rng", format!("seed {}{note}", m.rng.seed));
    field(
        "created",
        format!(
            "{} by autopart {} (format {})",
            utc(m.created_unix),
            m.autopart_version,
            m.format
        ),
    );
    field(
        "files",
        format!("{}, {} MiB", m.files.len(), mib(m.bytes())),
    );
    let mut cells = vec![vec!["file".to_string(), "bytes".into(), String::new()]];
    for f in &m.files {
        let on_disk = fs::metadata(path.join(&f.file)).map(|md| md.len());
        let note = match on_disk {
            Ok(n) if n == f.bytes => String::new(),
            Ok(n) => format!("{n} bytes on disk: truncated or replaced"),
            Err(_) => "missing".into(),
        };
        cells.push(vec![f.file.clone(), f.bytes.to_string(), note]);
    }
    table(&cells, &[1], "    ");
    field("tensors", m.tensors.len().to_string());
    let mut cells = vec![
        ["name", "shape", "dtype", "states"]
            .map(String::from)
            .to_vec(),
    ];
    for (name, t) in &m.tensors {
        cells.push(vec![
            name.clone(),
            shape_text(&t.shape),
            dtype_name(t.dtype).into(),
            states_text(&t.states),
        ]);
    }
    table(&cells, &[], "    ");
    match verify {
        None => {}
        Some(Ok(())) => field(
            "verify",
            format!(
                "OK ({} files match their CRC-32; each tensor's pieces cover it once)",
                m.files.len()
            ),
        ),
        Some(Err(e)) => field("verify", format!("FAILED: {e}")),
    }
}

/// `--verify`: every file's size and CRC-32 against the manifest (opening
/// checks that the pieces of every tensor's state cover it exactly once).
fn verify_all(path: &Path) -> Result<()> {
    let c = ck(Checkpoint::open(path))?;
    ck(c.verify())
}

// ----- merge ----------------------------------------------------------------

/// One tensor of the merged file.
struct Output {
    name: String,
    tensor: String,
    state: State,
    dtype: Dtype,
    shape: Vec<u64>,
    bytes: u64,
}

/// Opens the complete checkpoint `path` names (a checkpoint directory is
/// refused with the folder to name instead).
fn open_step(path: &Path) -> Result<Checkpoint> {
    if let Target::Dir(listed) = classify(path)? {
        let latest = listed.iter().rev().find(|l| l.status == Status::Complete);
        bail!(
            "{} is a checkpoint directory, not a checkpoint: name one of its step_N folders{}",
            path.display(),
            latest.map_or(String::new(), |l| format!(", e.g. {}", l.path.display()))
        );
    }
    step_manifest(path)?;
    ck(Checkpoint::open(path))
}

fn outputs(ck: &Checkpoint, with_optimizer: bool) -> Result<Vec<Output>> {
    let m = &ck.manifest;
    let mut states = vec![(State::Param, "")];
    if with_optimizer {
        states.extend([
            (State::ExpAvg, "optimizer/exp_avg/"),
            (State::ExpAvgSq, "optimizer/exp_avg_sq/"),
            (State::Master, "optimizer/master/"),
        ]);
    }
    let mut out = Vec::new();
    for (state, prefix) in states {
        for (tensor, info) in &m.tensors {
            if !ck.has(tensor, state) {
                if state == State::Param {
                    bail!(
                        "{}: {tensor} has no param state (it holds {})",
                        ck.path.display(),
                        states_text(&info.states)
                    );
                }
                continue;
            }
            let dtype = ck.dtype(tensor, state).unwrap_or(info.dtype);
            let numel: u64 = info.shape.iter().product();
            out.push(Output {
                name: format!("{prefix}{tensor}"),
                tensor: tensor.clone(),
                state,
                dtype,
                shape: info.shape.clone(),
                bytes: numel * dtype.size() as u64,
            });
        }
    }
    let mut seen = std::collections::HashSet::new();
    for o in &out {
        if !seen.insert(o.name.as_str()) {
            bail!(
                "{}: two tensors would be named {} in the merged file",
                ck.path.display(),
                o.name
            );
        }
    }
    Ok(out)
}

/// The safetensors header: 8-byte little-endian length, then the JSON
/// (tensors in `outs` order, data contiguous in that order), padded with
/// spaces to a multiple of 8 bytes so the data is aligned.
fn header(outs: &[Output], metadata: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    let mut json = format!("{{\"__metadata__\":{}", serde_json::to_string(metadata)?);
    let mut offset = 0u64;
    for o in outs {
        json.push_str(&format!(
            ",{}:{{\"dtype\":\"{}\",\"shape\":{},\"data_offsets\":[{offset},{}]}}",
            serde_json::to_string(&o.name)?,
            safetensors_dtype(o.dtype),
            serde_json::to_string(&o.shape)?,
            offset + o.bytes
        ));
        offset += o.bytes;
    }
    json.push('}');
    while json.len() % 8 != 0 {
        json.push(' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    Ok(out)
}

/// Progress on stderr: a line rewritten in place on a terminal; otherwise
/// a line per tenth of the bytes, for merges of 64 MiB or more.
struct Progress {
    total: u64,
    done: u64,
    tensors: usize,
    count: usize,
    tty: bool,
    tenth: u64,
}

impl Progress {
    fn new(outs: &[Output]) -> Self {
        Self {
            total: outs.iter().map(|o| o.bytes).sum(),
            done: 0,
            tensors: outs.len(),
            count: 0,
            tty: io::stderr().is_terminal(),
            tenth: 0,
        }
    }

    fn step(&mut self, bytes: u64, name: &str) {
        self.done += bytes;
        self.count += 1;
        let line = format!(
            "merged {}/{} tensors, {}/{} MiB",
            self.count,
            self.tensors,
            mib(self.done),
            mib(self.total)
        );
        if self.tty {
            eprint!("\r{line} ({name})\x1b[K");
        } else if self.total >= 64 << 20 {
            let tenth = self.done * 10 / self.total.max(1);
            if tenth > self.tenth {
                self.tenth = tenth;
                eprintln!("{line}");
            }
        }
    }

    fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

fn merge(args: &MergeArgs) -> Result<()> {
    let ck = open_step(&args.step)?;
    let outs = outputs(&ck, args.with_optimizer)?;
    let m = &ck.manifest;
    if args.with_optimizer && outs.iter().all(|o| o.state == State::Param) {
        eprintln!(
            "warning: {} holds no optimizer state; writing the parameters only",
            ck.path.display()
        );
    }
    let metadata: BTreeMap<String, String> = [
        // HF loaders (transformers) require a framework here.
        ("format", "pt".to_string()),
        ("model", m.model.clone()),
        ("step", m.step.to_string()),
        ("checkpoint_format", m.format.to_string()),
        ("with_optimizer", args.with_optimizer.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let head = header(&outs, &metadata)?;
    let mut progress = Progress::new(&outs);
    let result = write_atomic_with(&args.out, |f| {
        f.write_all(&head)?;
        for o in &outs {
            let (dtype, data) = ck
                .read_region(&o.tensor, o.state, &Region::whole(&o.shape))
                .map_err(|e| io::Error::other(e.to_string()))?;
            if dtype != o.dtype || data.len() as u64 != o.bytes {
                return Err(io::Error::other(format!(
                    "{}: the {} state of {} reads as {} bytes of {}, its index says {} bytes of {}",
                    ck.path.display(),
                    o.state.name(),
                    o.tensor,
                    data.len(),
                    dtype_name(dtype),
                    o.bytes,
                    dtype_name(o.dtype)
                )));
            }
            f.write_all(&data)?;
            progress.step(o.bytes, &o.name);
        }
        Ok(())
    });
    progress.finish();
    result.with_context(|| format!("writing {}", args.out.display()))?;
    let params = outs.iter().filter(|o| o.state == State::Param).count();
    let optim = outs.len() - params;
    println!(
        "wrote {}: {params} tensors{} of {} at step {}, {} MiB",
        args.out.display(),
        if optim > 0 {
            format!(" and {optim} optimizer states")
        } else {
            String::new()
        },
        m.model,
        m.step,
        mib(head.len() as u64 + progress.total)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_700_000_000), "2023-11-14 22:13:20 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
    }

    #[test]
    fn numbers_read_as_written() {
        assert_eq!(num(1e-3), "0.001");
        assert_eq!(num(1e-8), "1e-8");
        assert_eq!(num(0.0), "0");
        assert_eq!(num(0.999), "0.999");
    }
}
