//! `autopart generate [OUT] --init-from DIR (--prompt TEXT | --prompt-ids
//! 1,2,3) --max-new-tokens N`: the ids (and text) a model's weights
//! continue a prompt with, greedy by default, on one process with a KV
//! cache (the plan binary's `--generate`).
//!
//! The prompt is tokenized and the new ids decoded here, with the HF
//! `tokenizers` crate (`--tokenizer`, default DIR/tokenizer.json); the
//! end-of-sequence ids come from DIR's generation_config.json or
//! config.json, as transformers' `generate` takes them.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::driver::BuildProfile;

#[derive(Debug, Args)]
pub(super) struct GenerateArgs {
    /// A folder `autopart compile --out` wrote, of a one-process plan.
    /// Default: one made for the model (see --plan-dir).
    out: Option<PathBuf>,
    /// The weights: a HuggingFace model folder (Llama or GPT-2) or an
    /// autopart checkpoint (DIR/step_N).
    #[arg(long, value_name = "DIR")]
    init_from: PathBuf,
    /// The prompt as text (tokenized with --tokenizer, special tokens such
    /// as BOS added as the tokenizer says).
    #[arg(
        long,
        value_name = "TEXT",
        conflicts_with = "prompt_ids",
        required_unless_present = "prompt_ids"
    )]
    prompt: Option<String>,
    /// The prompt as token ids, comma-separated.
    #[arg(long, value_name = "ID,ID,...", value_delimiter = ',')]
    prompt_ids: Vec<i64>,
    /// A HuggingFace tokenizer.json. Default: DIR/tokenizer.json if there is
    /// one (needed for --prompt; without one, no text is printed).
    #[arg(long, value_name = "FILE")]
    tokenizer: Option<PathBuf>,
    /// The most ids to generate.
    #[arg(long, value_name = "N", default_value_t = 32)]
    max_new_tokens: u32,
    /// Sample from softmax(logits / T) instead of taking the most likely id.
    #[arg(long, value_name = "T")]
    temperature: Option<f64>,
    /// With --temperature: draw only from the most likely ids whose
    /// probabilities sum to P.
    #[arg(long, value_name = "P", default_value = "1")]
    top_p: f64,
    /// Seed of the sampling.
    #[arg(long, value_name = "S", default_value_t = 0)]
    seed: u64,
    /// Stop after any of these ids. Default: eos_token_id of DIR's
    /// generation_config.json or config.json.
    #[arg(long, value_name = "ID,ID,...", value_delimiter = ',')]
    eos_ids: Vec<i64>,
    /// Generate --max-new-tokens ids whatever they are.
    #[arg(long, conflicts_with = "eos_ids")]
    ignore_eos: bool,
    /// Print one JSON object {"prompt_ids": [...], "new_ids": [...],
    /// "text": ...} (text null without a tokenizer).
    #[arg(long)]
    json: bool,
    /// Where the plan made is kept. Default: $XDG_CACHE_HOME/autopart/generate/HASH.
    #[arg(long, value_name = "DIR")]
    plan_dir: Option<PathBuf>,
    /// Cargo profile of the plan made: release or dev
    /// ($AUTOPART_BUILD_PROFILE sets the default).
    #[arg(long, env = "AUTOPART_BUILD_PROFILE", default_value = "release")]
    build_profile: BuildProfile,
}

/// The ids of `eos_token_id` (a number or a list) in `file`, if it has any.
fn eos_in(file: &Path) -> Result<Option<Vec<i64>>> {
    let Ok(text) = std::fs::read(file) else {
        return Ok(None);
    };
    eos_of(&text).with_context(|| format!("{}: not JSON", file.display()))
}

/// The ids of `eos_token_id` in a config's JSON text.
fn eos_of(text: &[u8]) -> Result<Option<Vec<i64>>> {
    let v: Value = serde_json::from_slice(text)?;
    Ok(match &v["eos_token_id"] {
        Value::Number(n) => n.as_i64().map(|x| vec![x]),
        Value::Array(a) => Some(a.iter().filter_map(Value::as_i64).collect()),
        _ => None,
    })
}

fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    Tokenizer::from_file(path)
        .map_err(|e| anyhow::anyhow!("{}: not a tokenizer.json: {e}", path.display()))
}

pub(super) fn generate(args: &GenerateArgs) -> Result<()> {
    let tokenizer_path = args.tokenizer.clone().or_else(|| {
        let own = args.init_from.join("tokenizer.json");
        own.is_file().then_some(own)
    });
    let tokenizer = tokenizer_path.as_deref().map(load_tokenizer).transpose()?;
    let prompt_ids: Vec<i64> = match (&args.prompt, &tokenizer) {
        (Some(text), Some(t)) => t
            .encode(text.as_str(), true)
            .map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?
            .get_ids()
            .iter()
            .map(|&x| i64::from(x))
            .collect(),
        (Some(_), None) => bail!(
            "--prompt needs a tokenizer: pass --tokenizer tokenizer.json (there is none in {}), or give --prompt-ids",
            args.init_from.display()
        ),
        (None, _) => args.prompt_ids.clone(),
    };
    if prompt_ids.is_empty() {
        bail!("the prompt holds no token");
    }
    let eos = if args.ignore_eos {
        vec![]
    } else if !args.eos_ids.is_empty() {
        args.eos_ids.clone()
    } else {
        match eos_in(&args.init_from.join("generation_config.json"))? {
            Some(ids) => ids,
            // DIR's config.json, or the one a checkpoint's manifest carries.
            None => match super::eval::model_config(&args.init_from) {
                Ok(config) => eos_of(&config)?.unwrap_or_default(),
                Err(_) => vec![],
            },
        }
    };
    let out = match &args.out {
        Some(out) => out.clone(),
        // The training shape of the plan does not matter to decoding: small.
        None => super::eval::one_process_plan(
            &args.init_from,
            8,
            1,
            args.plan_dir.as_deref(),
            args.build_profile,
            "generate",
        )?,
    };
    let list = |ids: &[i64]| {
        ids.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut flags = vec![
        "--generate".to_string(),
        "--json".into(),
        "--init-from".into(),
        args.init_from.display().to_string(),
        "--prompt-ids".into(),
        list(&prompt_ids),
        "--max-new-tokens".into(),
        args.max_new_tokens.to_string(),
        "--top-p".into(),
        args.top_p.to_string(),
        "--seed".into(),
        args.seed.to_string(),
    ];
    if let Some(t) = args.temperature {
        flags.extend(["--temperature".into(), t.to_string()]);
    }
    if !eos.is_empty() {
        flags.extend(["--eos-ids".into(), list(&eos)]);
    }
    let v = super::run::plan_json(&out, &flags)?;
    let new_ids: Vec<i64> = v["new_ids"]
        .as_array()
        .with_context(|| format!("the plan binary printed no new_ids: {v}"))?
        .iter()
        .filter_map(Value::as_i64)
        .collect();
    let text = match &tokenizer {
        Some(t) => {
            let ids: Vec<u32> = new_ids
                .iter()
                .filter_map(|&x| u32::try_from(x).ok())
                .collect();
            Some(
                t.decode(&ids, true)
                    .map_err(|e| anyhow::anyhow!("decoding the new ids: {e}"))?,
            )
        }
        None => None,
    };
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "prompt_ids": prompt_ids, "new_ids": new_ids, "text": text })
        );
    } else {
        match text {
            Some(t) => println!("{}{t}", args.prompt.as_deref().unwrap_or("")),
            None => println!("{}", list(&new_ids)),
        }
    }
    Ok(())
}
