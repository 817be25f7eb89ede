//! `autopart eval [OUT] --init-from DIR --data FILE`: the mean next-token
//! loss and perplexity of a model's weights over a data set, forward only.
//!
//! Under a compiled plan (`mpirun -np N autopart eval OUT ...`) it is the
//! plan binary's `--eval-only`. Without OUT it makes a one-process fp32
//! plan for the model first (from DIR's `config.json`, or the config a
//! checkpoint's manifest carries), sized to the data, in a cache folder
//! that later evaluations of the same model and shape reuse (the build is
//! then a no-op).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use autopart_vocab::hash::Fnv1a;
use clap::Args;

use crate::driver::{self, BuildProfile, Quiet, Request};
use crate::plan::DType;
use crate::search::Constraints;

#[derive(Debug, Args)]
pub(super) struct EvalArgs {
    /// A folder `autopart compile --out` wrote. Default: a one-process plan
    /// made for the model (see --plan-dir).
    out: Option<PathBuf>,
    /// The weights: a HuggingFace model folder (Llama or GPT-2) or an
    /// autopart checkpoint (DIR/step_N).
    #[arg(long, value_name = "DIR")]
    init_from: PathBuf,
    /// The rows to evaluate: FILE.json `{"input_ids": [[...], ...]}` (one
    /// row a sequence, 2 to seq_len + 1 ids), a token file (windows of
    /// seq_len + 1 ids) or a folder of `autopart data prepare` (its loss
    /// mask applies).
    #[arg(long, value_name = "FILE|DIR")]
    data: PathBuf,
    /// Width of the ids of a token file: u16 or u32.
    #[arg(long, value_name = "u16|u32", default_value = "u16")]
    data_dtype: String,
    /// Print one JSON object {"loss", "perplexity", "tokens", "rows",
    /// "batches", "eval_s"}.
    #[arg(long)]
    json: bool,
    /// Evaluate the first K batches only.
    #[arg(long, value_name = "K")]
    batches: Option<u64>,
    /// Also write the logits of the first batch (`--batch` rows, or the
    /// plan's batch under OUT) to FILE:
    /// safetensors holding `logits`, [rows, seq, vocab] f32, to compare with
    /// another implementation's (tests compare them with transformers').
    #[arg(long, value_name = "FILE")]
    logits: Option<PathBuf>,
    /// Tokens per sequence of the plan made. Default: the longest JSON row
    /// less one, a prepared folder's; required for a token file.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    seq_len: Option<u64>,
    /// Rows per forward pass of the plan made.
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=65536))]
    batch: u64,
    /// Where the plan made is kept. Default: $XDG_CACHE_HOME/autopart/eval/HASH
    /// (~/.cache/... without it), HASH of the config and the shape.
    #[arg(long, value_name = "DIR")]
    plan_dir: Option<PathBuf>,
    /// Cargo profile of the plan made: release or dev
    /// ($AUTOPART_BUILD_PROFILE sets the default).
    #[arg(long, env = "AUTOPART_BUILD_PROFILE", default_value = "release")]
    build_profile: BuildProfile,
    /// Torch threads per process.
    #[arg(long, value_name = "N", default_value_t = 1)]
    threads: u32,
    /// Also generate a response to each record's prompt of an instruction
    /// folder (prepared with one record a row, without --pack), greedy, and
    /// report ROUGE-1/2/L F-measures against the references (as Google's
    /// rouge-score, no stemming; the mean over records). One process.
    #[arg(long, help_heading = "ROUGE")]
    rouge: bool,
    /// The tokenizer.json that decodes generations and references. Default:
    /// the one the folder's manifest names.
    #[arg(long, value_name = "FILE", requires = "rouge", help_heading = "ROUGE")]
    tokenizer: Option<PathBuf>,
    /// The most ids a generation may have. Default: one more than the
    /// longest reference's (room for its EOS).
    #[arg(long, value_name = "N", requires = "rouge", help_heading = "ROUGE")]
    max_new_tokens: Option<u32>,
    /// Write one JSON line per record (prompt, reference, generation and
    /// its scores) to FILE.
    #[arg(long, value_name = "FILE", requires = "rouge", help_heading = "ROUGE")]
    generations: Option<PathBuf>,
}

pub(super) fn eval(args: &EvalArgs) -> Result<()> {
    let out = match &args.out {
        Some(out) => out.clone(),
        None => make_plan(args)?,
    };
    let mut flags = vec![
        "--eval-only".to_string(),
        "--init-from".into(),
        args.init_from.display().to_string(),
        "--eval-data".into(),
        args.data.display().to_string(),
        "--data-dtype".into(),
        args.data_dtype.clone(),
        "--threads".into(),
        args.threads.to_string(),
    ];
    if args.json {
        flags.push("--json".into());
    }
    if let Some(k) = args.batches {
        flags.extend(["--eval-batches".into(), k.to_string()]);
    }
    if let Some(f) = &args.logits {
        flags.extend(["--logits".into(), f.display().to_string()]);
    }
    if !args.rouge {
        return super::run::run(&out, &flags);
    }
    rouge(args, &out, &flags)
}

/// A record of an instruction folder: its prompt and reference response.
struct Record {
    prompt: Vec<u32>,
    /// The response's ids, without the EOS that ends it.
    reference: Vec<u32>,
}

/// The records of a padded instruction folder: in each row, the tokens
/// before the first label that counts are the prompt, the labels that
/// count the response.
fn records(dir: &Path) -> Result<(Vec<Record>, autopart_vocab::data::Manifest)> {
    use autopart_vocab::data::{Format, PreparedData, RowLayout};
    let data = PreparedData::open(dir)?;
    let m = data.manifest().clone();
    match &m.format {
        Format::Instruction {
            rows: RowLayout::Padded,
            ..
        } => {}
        Format::Instruction { .. } => bail!(
            "{}: --rouge needs one record a row: prepare the eval split without --pack",
            dir.display()
        ),
        Format::Text => bail!(
            "{}: --rouge needs instruction data (autopart data prepare --format instruction): this folder is text",
            dir.display()
        ),
    }
    let eos = m.tokenizer.eos_id;
    let mut out = Vec::new();
    for i in 0..data.rows() {
        let row = data.row(i)?;
        let Some(first) = row.mask.iter().position(|&x| x == 1) else {
            continue;
        };
        let mut reference: Vec<u32> = row
            .labels
            .iter()
            .zip(&row.mask)
            .skip(first)
            .take_while(|&(_, &m)| m == 1)
            .map(|(&l, _)| l)
            .collect();
        if reference.last() == Some(&eos) {
            reference.pop();
        }
        out.push(Record {
            prompt: row.tokens[..=first].to_vec(),
            reference,
        });
    }
    if out.is_empty() {
        bail!("{}: no row holds a response", dir.display());
    }
    Ok((out, m))
}

/// `eval --rouge`: the loss (the plan binary's --eval-only), then a greedy
/// generation per record (its --generate --prompts), decoded and scored.
fn rouge(args: &EvalArgs, out: &Path, eval_flags: &[String]) -> Result<()> {
    use autopart_vocab::launcher::Launcher;
    if Launcher::from_env().size.is_some_and(|n| n > 1) {
        bail!(
            "--rouge runs on one process: run `autopart eval --rouge` without mpirun (without OUT a one-process plan is made)"
        );
    }
    let (recs, manifest) = records(&args.data)?;
    let tok_path = match &args.tokenizer {
        Some(t) => t.clone(),
        None => {
            let named = PathBuf::from(&manifest.tokenizer.file);
            if !named.is_file() {
                bail!(
                    "{}: its manifest names the tokenizer {}, which is not there: pass --tokenizer FILE",
                    args.data.display(),
                    named.display()
                );
            }
            named
        }
    };
    let tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
        .map_err(|e| anyhow::anyhow!("{}: not a tokenizer.json: {e}", tok_path.display()))?;
    // The loss comes back as JSON whatever --json says (a second --json
    // would be a usage error, wherever it lands among the flags).
    let mut flags: Vec<String> = eval_flags.to_vec();
    if !flags.iter().any(|f| f == "--json") {
        flags.push("--json".into());
    }
    let loss = super::run::plan_json(out, &flags)?;

    let prompts = dir_for_prompts()?;
    let prompts_file = prompts.path().join("prompts.json");
    let rows: Vec<&[u32]> = recs.iter().map(|r| r.prompt.as_slice()).collect();
    std::fs::write(
        &prompts_file,
        serde_json::json!({ "input_ids": rows }).to_string(),
    )
    .with_context(|| format!("writing {}", prompts_file.display()))?;
    let longest = recs
        .iter()
        .map(|r| r.reference.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let max_new = args.max_new_tokens.map_or(longest + 1, |n| n as usize);
    let gen_flags = vec![
        "--generate".to_string(),
        "--json".into(),
        "--init-from".into(),
        args.init_from.display().to_string(),
        "--prompts".into(),
        prompts_file.display().to_string(),
        "--max-new-tokens".into(),
        max_new.to_string(),
        "--eos-ids".into(),
        manifest.tokenizer.eos_id.to_string(),
        "--threads".into(),
        args.threads.to_string(),
    ];
    eprintln!(
        "generating responses to {} prompts (greedy, at most {max_new} ids)",
        recs.len()
    );
    let generated = super::run::plan_json(out, &gen_flags)?;
    let lists = generated["new_ids"]
        .as_array()
        .context("the plan binary printed no new_ids")?;
    if lists.len() != recs.len() {
        bail!("{} generations for {} prompts", lists.len(), recs.len());
    }
    let decode = |ids: &[u32]| -> Result<String> {
        tokenizer
            .decode(ids, true)
            .map_err(|e| anyhow::anyhow!("decoding with {}: {e}", tok_path.display()))
    };
    let mut pairs = Vec::with_capacity(recs.len());
    let mut lines = String::new();
    for (r, g) in recs.iter().zip(lists) {
        let mut ids: Vec<u32> = g
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_u64())
                    .map(|x| x as u32)
                    .collect()
            })
            .unwrap_or_default();
        if ids.last() == Some(&manifest.tokenizer.eos_id) {
            ids.pop();
        }
        let (reference, generation) = (decode(&r.reference)?, decode(&ids)?);
        let s = crate::rouge::score(&reference, &generation);
        lines.push_str(
            &serde_json::json!({
                "prompt": decode(&r.prompt)?,
                "reference": reference,
                "generation": generation,
                "rouge1": s.rouge1.fmeasure,
                "rouge2": s.rouge2.fmeasure,
                "rougeL": s.rouge_l.fmeasure,
            })
            .to_string(),
        );
        lines.push('\n');
        pairs.push((reference, generation));
    }
    if let Some(path) = &args.generations {
        autopart_vocab::fs::write_atomic(path, lines.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let [r1, r2, rl] = crate::rouge::mean_f(&pairs);
    if args.json {
        let mut v = loss;
        v["rouge1"] = r1.into();
        v["rouge2"] = r2.into();
        v["rougeL"] = rl.into();
        v["generations"] = pairs.len().into();
        println!("{v}");
    } else {
        println!(
            "eval: loss {:.6}, perplexity {:.4} over {} tokens; ROUGE-1 {r1:.4}, ROUGE-2 {r2:.4}, ROUGE-L {rl:.4} over {} generations",
            loss["loss"].as_f64().unwrap_or(f64::NAN),
            loss["perplexity"].as_f64().unwrap_or(f64::NAN),
            loss["tokens"],
            pairs.len()
        );
    }
    Ok(())
}

/// A scratch folder for the prompts file, removed on drop.
fn dir_for_prompts() -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("autopart-rouge-")
        .tempdir()
        .context("creating a scratch folder")
}

/// The model's config.json: DIR's own, or the one a checkpoint's manifest
/// carries.
pub(super) fn model_config(from: &Path) -> Result<Vec<u8>> {
    let own = from.join("config.json");
    if own.is_file() {
        return std::fs::read(&own).with_context(|| format!("reading {}", own.display()));
    }
    if !from.is_dir() {
        bail!(
            "--init-from {}: no such folder (expected a HuggingFace model folder or a checkpoint DIR/step_N)",
            from.display()
        );
    }
    let manifest = autopart_vocab::ckpt::read_manifest(from).with_context(|| {
        format!(
            "--init-from {}: no config.json, and not a complete checkpoint",
            from.display()
        )
    })?;
    let Some(config) = manifest.model_config else {
        bail!(
            "--init-from {}: the checkpoint carries no model config (a hand-written plan binary wrote it): evaluate it under its plan, `autopart eval OUT --init-from ...`",
            from.display()
        );
    };
    Ok(serde_json::to_vec_pretty(&config)?)
}

/// The sequence length the data needs: --seq-len, the longest JSON row
/// less one, or a prepared folder's.
fn data_seq_len(args: &EvalArgs) -> Result<u64> {
    if let Some(n) = args.seq_len {
        return Ok(n);
    }
    let data = &args.data;
    if data.is_dir() {
        let d = autopart_vocab::data::PreparedData::open(data)?;
        return Ok(d.seq_len());
    }
    if data
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
    {
        let text =
            std::fs::read_to_string(data).with_context(|| format!("reading {}", data.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not JSON", data.display()))?;
        let longest = v["input_ids"]
            .as_array()
            .and_then(|rows| rows.iter().filter_map(|r| r.as_array().map(Vec::len)).max())
            .with_context(|| {
                format!(
                    "{}: expected {{\"input_ids\": [[id, ...], ...]}} (one row of token ids per sequence)",
                    data.display()
                )
            })?;
        if longest < 2 {
            bail!(
                "{}: the rows hold at most {longest} id; a row needs 2 or more (its tokens and one more to predict)",
                data.display()
            );
        }
        return Ok(longest as u64 - 1);
    }
    bail!(
        "{}: a token file has no sequence length: pass --seq-len N (each window is N + 1 ids)",
        data.display()
    )
}

/// Compiles and builds a one-process fp32 plan for the model and shape
/// (unchanged files are not rewritten, so a second evaluation does not
/// rebuild); returns its folder.
fn make_plan(args: &EvalArgs) -> Result<PathBuf> {
    let seq = data_seq_len(args)?;
    one_process_plan(
        &args.init_from,
        seq,
        args.batch,
        args.plan_dir.as_deref(),
        args.build_profile,
        "eval",
    )
}

/// Compiles and builds a one-process fp32 plan of `seq` tokens and `batch`
/// rows for the model of `init_from` in `plan_dir` (default: a folder of
/// the cache named by the config and the shape, under `purpose`); returns
/// the folder.
pub(super) fn one_process_plan(
    init_from: &Path,
    seq: u64,
    batch: u64,
    plan_dir: Option<&Path>,
    profile: BuildProfile,
    purpose: &str,
) -> Result<PathBuf> {
    // Every rank of a launch would compile into the same folder at once.
    if let (Some(n), var) = {
        let l = autopart_vocab::launcher::Launcher::from_env();
        (l.size.filter(|&n| n > 1), l.size_var)
    } {
        bail!(
            "without OUT, `autopart {purpose}` makes a one-process plan, but the launcher started {n} processes ({}={n}): run it without mpirun/srun, or compile a plan for {n} and pass its folder as OUT",
            var.unwrap_or("launcher")
        );
    }
    let text = model_config(init_from)?;
    let dir = match plan_dir {
        Some(d) => d.to_path_buf(),
        None => {
            let mut h = Fnv1a::new();
            h.write(&text)
                .write(&seq.to_le_bytes())
                .write(&batch.to_le_bytes())
                .write(profile.to_string().as_bytes())
                .write(env!("CARGO_PKG_VERSION").as_bytes());
            cache_root()?
                .join(purpose)
                .join(format!("{:016x}", h.finish()))
        }
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let config = dir.join("config.json");
    if std::fs::read(&config).ok().as_deref() != Some(&text[..]) {
        autopart_vocab::fs::write_atomic(&config, &text)
            .with_context(|| format!("writing {}", config.display()))?;
    }
    let mut req = Request::new(config.display().to_string(), 1);
    req.cluster = "cpu".into();
    req.dtype = DType::Fp32;
    req.seq_len = Some(seq);
    req.global_batch = Some(batch);
    req.constraints = Constraints {
        tp: Some(1),
        pp: Some(1),
        dp: Some(1),
        micro_batch: Some(batch),
        ..Constraints::default()
    };
    req.top_k = 1;
    req.out = dir.clone();
    req.build_profile = profile;
    eprintln!(
        "making a one-process plan for {} (seq {seq}, {batch} rows a batch) in {}",
        config.display(),
        dir.display()
    );
    driver::compile(&req, &mut Quiet).with_context(|| {
        format!(
            "compiling a one-process plan for {} into {}",
            config.display(),
            dir.display()
        )
    })?;
    Ok(dir)
}

/// `$XDG_CACHE_HOME/autopart`, else `$HOME/.cache/autopart`.
pub(super) fn cache_root() -> Result<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(x).join("autopart"));
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(h) => Ok(PathBuf::from(h).join(".cache").join("autopart")),
        None => bail!("neither XDG_CACHE_HOME nor HOME is set: pass --plan-dir DIR"),
    }
}
