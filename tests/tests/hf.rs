//! HuggingFace weights in: `autopart run OUT --init-from DIR`, checked
//! against transformers itself.
//!
//! Tiny checkpoints are made in the test by transformers (`tests/py/hf_tiny.py`,
//! the project venv's python): a Llama with GQA (4 query heads, 2 kv heads),
//! explicit `head_dim` and Llama 3.1's `llama3` rotary scaling, saved in 10
//! shards with an index and a transformers-4.x config.json; the same with
//! tied embeddings and a 5.x config.json (`rope_parameters`); and a GPT-2
//! (`Conv1D` weights, fused `c_attn`, `attn.bias` buffers). Every norm
//! weight and bias is moved away from its initial value so that a wrong
//! mapping of any tensor changes the loss.
//!
//! The plan is compiled from the folder's config.json, trained one step
//! from the folder's weights on a token file, and its step-0 loss must equal
//! transformers' loss (`labels=input_ids`) on the same rows within 1e-5
//! relative: on one process and under tp2 (with sequence parallelism), pp2
//! (1F1B), dp2 (ZeRO-3) and tp4 on its 2 kv heads (each copied twice) for Llama, one process,
//! tp2, pp2 (the tied embedding on both end stages) and dp2 (ZeRO-3) for GPT-2; and the logits
//! of `eval --logits` equal transformers' within 1e-5 of the largest.
//! Wrong folders get errors naming the file and what was expected.
//!
//! HF weights out: `autopart ckpt export DIR/step_N --hf OUT` of a run that
//! changed nothing (lr 0) gives, loaded by transformers' `from_pretrained`,
//! tensors equal to the originals (Llama sharded, GPT-2 with c_attn fused
//! back); and a Llama fine-tuned 10 steps under tp2·pp2, exported, has
//! transformers' loss on held-out rows equal to autopart's own on them (from
//! the checkpoint, one process) within 1e-5.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use autopart_tests::plans::{DP2_ZERO3, PP2_1F1B, SINGLE, TP2, TP4_KV_COPIES};
use autopart_tests::{
    autopart, autopart_bin, autopart_home, compile_model, launch, launch_binary, read_metrics,
};

const RTOL: f64 = 1e-5;
const SEQ: usize = 16;
const BATCH: usize = 8;

fn python() -> PathBuf {
    autopart_home().join(".venv/bin/python")
}

/// Runs `tests/py/hf_tiny.py args...`; returns its stdout.
fn hf_tiny(args: &[&str]) -> Result<String> {
    let script = autopart_home().join("tests/py/hf_tiny.py");
    let out = Command::new(python())
        .arg(&script)
        .args(args)
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "hf_tiny.py {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A token file of `n` pseudo-random ids below 256 (u16).
fn token_file(dir: &Path, n: usize) -> Result<PathBuf> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let bytes: Vec<u8> = (0..n)
        .flat_map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (((x >> 33) % 256) as u16).to_le_bytes()
        })
        .collect();
    let path = dir.join("tokens.bin");
    std::fs::write(&path, bytes)?;
    Ok(path)
}

/// The number `hf_tiny.py args...` prints.
fn hf_number(args: &[&str]) -> Result<f64> {
    let text = hf_tiny(args)?;
    text.trim()
        .parse()
        .with_context(|| format!("transformers printed {text:?}"))
}

/// transformers' loss on the rows step 0 trains on.
fn reference_loss(model: &Path, tokens: &Path) -> Result<f64> {
    hf_number(&[
        "loss",
        &model.display().to_string(),
        &tokens.display().to_string(),
        &SEQ.to_string(),
        &BATCH.to_string(),
    ])
}

/// Compiles `model`'s config.json under `plan` into `out`, trains one step
/// from its weights on `np` processes; returns the step-0 loss.
fn autopart_loss(model: &Path, tokens: &Path, out: &Path, plan: &[&str], np: usize) -> Result<f64> {
    compile_model(out, &model.join("config.json").display().to_string(), plan)?;
    train_from(out, np, model, tokens, 1, &[])
}

/// Trains the plan in `out` `steps` steps on `np` processes from `from` on
/// `tokens` with `extra` flags; returns the step-0 loss.
fn train_from(
    out: &Path,
    np: usize,
    from: &Path,
    tokens: &Path,
    steps: u32,
    extra: &[&str],
) -> Result<f64> {
    let metrics = out.join("metrics.jsonl");
    let mut args = vec![
        "--steps".to_string(),
        steps.to_string(),
        "--data".into(),
        tokens.display().to_string(),
        "--init-from".into(),
        from.display().to_string(),
        "--metrics".into(),
        metrics.display().to_string(),
    ];
    args.extend(extra.iter().map(ToString::to_string));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = launch(np, out, &refs, Duration::from_secs(300))?;
    let plan = out.display();
    if !output.status.success() {
        bail!(
            "run of {plan} failed:\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !stdout.contains("initialised from") {
        bail!("the run does not say it initialised from the folder:\n{stdout}");
    }
    Ok(read_metrics(&metrics)?[0].loss)
}

fn assert_close(what: &str, got: f64, want: f64) {
    let rel = (got - want).abs() / want.abs().max(1e-12);
    assert!(
        rel <= RTOL,
        "{what}: autopart {got} vs transformers {want} (relative {rel:.2e})"
    );
}

/// Rows of 2 to SEQ + 1 ids (below 256) of varied lengths, as
/// `autopart eval --data` and transformers read them.
fn rows_file(dir: &Path) -> Result<PathBuf> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let rows: Vec<Vec<u64>> = [17usize, 2, 9, 17, 5, 12, 3, 16, 11, 17, 7]
        .iter()
        .map(|&n| {
            (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x % 256
                })
                .collect()
        })
        .collect();
    let path = dir.join("rows.json");
    std::fs::write(&path, serde_json::json!({ "input_ids": rows }).to_string())?;
    Ok(path)
}

/// transformers' mean loss over the rows of `rows` (labels=input_ids,
/// right padding masked).
fn reference_rows_loss(model: &Path, rows: &Path) -> Result<f64> {
    hf_number(&[
        "loss-rows",
        &model.display().to_string(),
        &rows.display().to_string(),
    ])
}

/// transformers' loss over every window of SEQ + 1 ids of a token file of
/// `n` ids (what `autopart eval --data FILE` reads).
fn reference_windows_loss(model: &Path, tokens: &Path, n: usize) -> Result<f64> {
    hf_number(&[
        "loss",
        &model.display().to_string(),
        &tokens.display().to_string(),
        &SEQ.to_string(),
        &((n - 1) / SEQ).to_string(),
    ])
}

/// `autopart ARGS` on `np` processes (mpirun above one); the JSON object of
/// its last stdout line.
fn autopart_json(np: usize, args: &[String]) -> Result<serde_json::Value> {
    let output = launch_binary(np, &autopart_bin()?, args, Duration::from_secs(600))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "autopart {} failed:\n{stdout}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let line = stdout.lines().last().unwrap_or("");
    serde_json::from_str(line).with_context(|| format!("not one JSON line: {stdout:?}"))
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(ToString::to_string).collect()
}

/// `autopart eval [OUT] --init-from FROM --data DATA --json EXTRA` on `np`
/// processes: its loss, checked against its perplexity and token count.
fn eval_loss(
    np: usize,
    out: Option<&Path>,
    from: &Path,
    data: &Path,
    extra: &[&str],
) -> Result<f64> {
    let mut args = vec!["eval".to_string()];
    args.extend(out.map(|o| o.display().to_string()));
    args.extend(strings(&[
        "--init-from",
        &from.display().to_string(),
        "--data",
        &data.display().to_string(),
        "--json",
    ]));
    args.extend(strings(extra));
    let v = autopart_json(np, &args)?;
    let loss = v["loss"]
        .as_f64()
        .with_context(|| format!("no loss in {v}"))?;
    let ppl = v["perplexity"]
        .as_f64()
        .with_context(|| format!("no perplexity in {v}"))?;
    assert!(
        (ppl - loss.exp()).abs() <= 1e-9 * ppl,
        "perplexity {ppl} is not exp(loss {loss})"
    );
    assert!(v["tokens"].as_u64().is_some_and(|t| t > 0), "{v}");
    Ok(loss)
}

/// The ids of the rows file (their count of predicted tokens, sum of len - 1).
fn rows_tokens(rows: &Path) -> Result<u64> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(rows)?)?;
    Ok(v["input_ids"]
        .as_array()
        .context("input_ids")?
        .iter()
        .map(|r| r.as_array().map_or(0, |r| r.len() as u64 - 1))
        .sum())
}

/// `autopart generate [OUT] --init-from FROM --json ARGS`: its JSON.
fn generate(out: Option<&Path>, from: &Path, args: &[&str]) -> Result<serde_json::Value> {
    let mut all = vec!["generate".to_string()];
    all.extend(out.map(|o| o.display().to_string()));
    all.extend(strings(&[
        "--init-from",
        &from.display().to_string(),
        "--json",
    ]));
    all.extend(strings(args));
    autopart_json(1, &all)
}

fn ids_of(v: &serde_json::Value) -> Vec<i64> {
    v.as_array()
        .map(|a| a.iter().filter_map(serde_json::Value::as_i64).collect())
        .unwrap_or_default()
}

/// transformers' greedy `generate(do_sample=False)` of `n` ids after `prompt`.
fn reference_generate(model: &Path, prompt: &str, n: usize) -> Result<Vec<i64>> {
    let text = hf_tiny(&[
        "generate",
        &model.display().to_string(),
        prompt,
        &n.to_string(),
    ])?;
    Ok(ids_of(&serde_json::from_str(text.trim())?))
}

/// The logits `eval --logits` wrote for the first batch of `tokens`'
/// windows against transformers' on the same rows: within 1e-5 of the
/// largest logit (at least 1).
fn assert_logits_close(what: &str, model: &Path, tokens: &Path, logits: &Path) -> Result<()> {
    let text = hf_tiny(&[
        "logits",
        &model.display().to_string(),
        &tokens.display().to_string(),
        &SEQ.to_string(),
        &BATCH.to_string(),
        &logits.display().to_string(),
    ])?;
    let v: serde_json::Value = serde_json::from_str(text.trim())?;
    let (diff, scale) = (v["max_abs_diff"].as_f64(), v["max_abs"].as_f64());
    let (Some(diff), Some(scale)) = (diff, scale) else {
        bail!("{what}: logits not compared: {v}");
    };
    eprintln!("{what}: logits differ by at most {diff:.2e} (largest {scale:.2})");
    assert!(
        diff <= RTOL * scale.max(1.0),
        "{what}: logits differ from transformers' by {diff:e} (largest logit {scale})"
    );
    Ok(())
}

/// Llama with GQA, head_dim, llama3 rope scaling, 10 shards, 4.x config.
#[test]
fn llama_from_hf_equals_transformers_under_every_plan() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("llama");
    hf_tiny(&[
        "make",
        "llama",
        &model.display().to_string(),
        "--shard-bytes",
        "60000",
        "--config-style",
        "4",
    ])?;
    assert!(model.join("model.safetensors.index.json").is_file());
    let tokens = token_file(dir.path(), 400)?;
    let want = reference_loss(&model, &tokens)?;
    let rows = rows_file(dir.path())?;
    let want_rows = reference_rows_loss(&model, &rows)?;
    let want_windows = reference_windows_loss(&model, &tokens, 400)?;
    for (name, plan, np) in [
        ("one process", SINGLE, 1),
        ("tp2+sp", TP2, 2),
        ("pp2 1f1b", PP2_1F1B, 2),
        ("dp2 zero3", DP2_ZERO3, 2),
        // tp beyond the 2 kv heads: each rank reads its kv head's rows.
        ("tp4 on 2 kv heads", TP4_KV_COPIES, 4),
    ] {
        let out = dir.path().join(format!("out-{}", name.replace(' ', "-")));
        let got = autopart_loss(&model, &tokens, &out, plan, np)?;
        assert_close(&format!("llama, {name}"), got, want);
        // autopart eval under the same plan: JSON rows of varied lengths
        // (padded) and every window of a token file.
        let got = eval_loss(np, Some(&out), &model, &rows, &[])?;
        assert_close(&format!("llama, eval rows, {name}"), got, want_rows);
        let logits = out.join("logits.safetensors");
        let logits_s = logits.display().to_string();
        let got = eval_loss(np, Some(&out), &model, &tokens, &["--logits", &logits_s])?;
        assert_close(&format!("llama, eval windows, {name}"), got, want_windows);
        assert_logits_close(&format!("llama, {name}"), &model, &tokens, &logits)?;
    }
    // Greedy generation with the KV cache, token for token, on the
    // one-process plan.
    let single = dir.path().join("out-one-process");
    let want = reference_generate(&model, "1,5,9", 16)?;
    let got = generate(
        Some(&single),
        &model,
        &["--prompt-ids", "1,5,9", "--max-new-tokens", "16"],
    )?;
    assert_eq!(
        ids_of(&got["new_ids"]),
        want,
        "llama greedy vs transformers"
    );
    assert_eq!(want.len(), 16, "{want:?}");
    // A text prompt through a tokenizer.json: the same ids and text as the
    // tokenizers library's.
    let tok = dir.path().join("tokenizer.json");
    hf_tiny(&["tokenizer", &tok.display().to_string()])?;
    let tok_s = tok.display().to_string();
    let text = "the cat sat on the mat and then";
    let prompt = ids_of(&serde_json::from_str(
        hf_tiny(&["encode", &tok_s, text])?.trim(),
    )?);
    let list = prompt
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let want = reference_generate(&model, &list, 8)?;
    let got = generate(
        Some(&single),
        &model,
        &[
            "--tokenizer",
            &tok_s,
            "--prompt",
            text,
            "--max-new-tokens",
            "8",
        ],
    )?;
    assert_eq!(ids_of(&got["prompt_ids"]), prompt);
    assert_eq!(ids_of(&got["new_ids"]), want, "text prompt");
    let want_list = want
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let want_text = hf_tiny(&["decode", &tok_s, &want_list])?;
    assert_eq!(
        got["text"].as_str(),
        Some(want_text.trim_end_matches('\n')),
        "{got}"
    );
    // Sampling: seeded, so repeatable; another seed may differ.
    let sampled = |seed: &str| -> Result<Vec<i64>> {
        let v = generate(
            Some(&single),
            &model,
            &[
                "--prompt-ids",
                "1,5,9",
                "--max-new-tokens",
                "16",
                "--temperature",
                "1.5",
                "--top-p",
                "0.9",
                "--seed",
                seed,
                "--ignore-eos",
            ],
        )?;
        Ok(ids_of(&v["new_ids"]))
    };
    let a = sampled("3")?;
    assert_eq!(a.len(), 16);
    assert_eq!(a, sampled("3")?, "the same seed draws the same ids");
    Ok(())
}

/// `autopart eval` and `autopart generate` without a plan make a
/// one-process one (and reuse it).
#[test]
fn eval_and_generate_make_a_plan_when_given_none() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("llama-tied");
    hf_tiny(&["make", "llama-tied", &model.display().to_string()])?;
    let rows = rows_file(dir.path())?;
    let want = reference_rows_loss(&model, &rows)?;
    let plan = dir.path().join("plan");
    let plan_s = plan.display().to_string();
    let extra = ["--plan-dir", plan_s.as_str(), "--build-profile", "dev"];
    let got = eval_loss(1, None, &model, &rows, &extra)?;
    assert_close("tied llama, eval without a plan", got, want);
    assert!(plan.join("plan.ron").is_file() && plan.join("autopart-plan").is_file());
    let again = eval_loss(1, None, &model, &rows, &extra)?;
    assert_eq!(again, got, "the plan made is reused");
    // The rows' shape: seq 16 (the longest row less one).
    let plan_text = std::fs::read_to_string(plan.join("plan.ron"))?;
    assert!(plan_text.contains("seq_len: 16"), "{plan_text}");
    let v = autopart_json(
        1,
        &strings(&[
            "eval",
            "--init-from",
            &model.display().to_string(),
            "--data",
            &rows.display().to_string(),
            "--json",
            "--plan-dir",
            &plan_s,
            "--build-profile",
            "dev",
        ]),
    )?;
    assert_eq!(v["tokens"].as_u64(), Some(rows_tokens(&rows)?), "{v}");
    assert_eq!(v["rows"].as_u64(), Some(11), "{v}");

    let gplan = dir.path().join("gplan");
    let want = reference_generate(&model, "4,8,15,16,23", 16)?;
    let got = generate(
        None,
        &model,
        &[
            "--prompt-ids",
            "4,8,15,16,23",
            "--max-new-tokens",
            "16",
            "--plan-dir",
            &gplan.display().to_string(),
            "--build-profile",
            "dev",
        ],
    )?;
    assert_eq!(ids_of(&got["new_ids"]), want, "tied llama greedy");
    Ok(())
}

/// Tied embeddings and transformers 5.x's `rope_parameters`, one file.
#[test]
fn tied_llama_with_a_5x_config_equals_transformers() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("llama-tied");
    hf_tiny(&["make", "llama-tied", &model.display().to_string()])?;
    let config = std::fs::read_to_string(model.join("config.json"))?;
    assert!(config.contains("rope_parameters"), "{config}");
    let tokens = token_file(dir.path(), 400)?;
    let want = reference_loss(&model, &tokens)?;
    let got = autopart_loss(&model, &tokens, &dir.path().join("out"), SINGLE, 1)?;
    assert_close("tied llama", got, want);
    Ok(())
}

/// GPT-2: Conv1D transposed, c_attn split, attn.bias buffers ignored.
#[test]
fn gpt2_from_hf_equals_transformers() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("gpt2");
    hf_tiny(&["make", "gpt2", &model.display().to_string()])?;
    let tokens = token_file(dir.path(), 400)?;
    let want = reference_loss(&model, &tokens)?;
    let rows = rows_file(dir.path())?;
    let want_rows = reference_rows_loss(&model, &rows)?;
    for (name, plan, np) in [
        ("one process", SINGLE, 1),
        ("tp2", TP2, 2),
        // The tied wte on both end stages, each read from the file.
        ("pp2 1f1b", PP2_1F1B, 2),
        ("dp2 zero3", DP2_ZERO3, 2),
    ] {
        let out = dir.path().join(format!("out-{}", name.replace(' ', "-")));
        let got = autopart_loss(&model, &tokens, &out, plan, np)?;
        assert_close(&format!("gpt2, {name}"), got, want);
        let got = eval_loss(np, Some(&out), &model, &rows, &[])?;
        assert_close(&format!("gpt2, eval rows, {name}"), got, want_rows);
        let logits = out.join("logits.safetensors");
        let logits_s = logits.display().to_string();
        eval_loss(np, Some(&out), &model, &tokens, &["--logits", &logits_s])?;
        assert_logits_close(&format!("gpt2, {name}"), &model, &tokens, &logits)?;
    }
    let prompt = "3,100,7,42,250,18";
    let want = reference_generate(&model, prompt, 16)?;
    let got = generate(
        Some(&dir.path().join("out-one-process")),
        &model,
        &["--prompt-ids", prompt, "--max-new-tokens", "16"],
    )?;
    assert_eq!(ids_of(&got["new_ids"]), want, "gpt2 greedy vs transformers");
    Ok(())
}

/// Runs one step of the compiled plan in `out` from `from`; returns the
/// failure text (stdout and stderr) or fails if it succeeded.
fn init_error(out: &Path, from: &Path, tokens: &Path) -> Result<String> {
    let args = [
        "--steps".to_string(),
        "1".into(),
        "--data".into(),
        tokens.display().to_string(),
        "--init-from".into(),
        from.display().to_string(),
    ];
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = launch(1, out, &refs, Duration::from_secs(120))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() {
        bail!("--init-from {} succeeded:\n{text}", from.display());
    }
    if text.contains("panicked") {
        bail!("--init-from {} panicked:\n{text}", from.display());
    }
    Ok(text)
}

#[test]
fn wrong_folders_get_errors_naming_the_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("llama");
    hf_tiny(&["make", "llama", &model.display().to_string()])?;
    let tokens = token_file(dir.path(), 400)?;
    let out = dir.path().join("out");
    compile_model(
        &out,
        &model.join("config.json").display().to_string(),
        SINGLE,
    )?;
    let copy = |name: &str| -> Result<PathBuf> {
        let to = dir.path().join(name);
        std::fs::create_dir_all(&to)?;
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(model.join(f), to.join(f))?;
        }
        Ok(to)
    };

    // A missing tensor.
    let missing = copy("missing")?;
    hf_tiny(&["drop", &missing.display().to_string(), "model.norm.weight"])?;
    let e = init_error(&out, &missing, &tokens)?;
    assert!(
        e.contains("holds no tensor model.norm.weight"),
        "missing tensor:\n{e}"
    );

    // Another model's folder.
    let other = dir.path().join("wide");
    hf_tiny(&["make", "gpt2", &other.display().to_string()])?;
    let e = init_error(&out, &other, &tokens)?;
    assert!(
        e.contains("model_type") && e.contains("config.json"),
        "another model:\n{e}"
    );

    // A numeric setting the shapes do not show.
    let eps = copy("eps")?;
    let config = std::fs::read_to_string(eps.join("config.json"))?;
    std::fs::write(
        eps.join("config.json"),
        config.replace("\"rms_norm_eps\": 1e-05", "\"rms_norm_eps\": 1e-06"),
    )?;
    let e = init_error(&out, &eps, &tokens)?;
    assert!(
        e.contains("rms_norm_eps") && e.contains("--config"),
        "rms_norm_eps:\n{e}"
    );

    // A truncated safetensors file.
    let cut = copy("cut")?;
    let bytes = std::fs::read(cut.join("model.safetensors"))?;
    std::fs::write(cut.join("model.safetensors"), &bytes[..bytes.len() / 2])?;
    let e = init_error(&out, &cut, &tokens)?;
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "truncated:\n{e}"
    );

    // No weights at all.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty)?;
    std::fs::copy(model.join("config.json"), empty.join("config.json"))?;
    let e = init_error(&out, &empty, &tokens)?;
    assert!(e.contains("model.safetensors"), "no weights:\n{e}");

    // autopart eval: a row longer than the plan's sequences (16 tokens), a
    // token file without a sequence length and no plan, a missing file.
    let fails = |args: &[String]| -> Result<String> {
        let o = launch_binary(1, &autopart_bin()?, args, Duration::from_secs(120))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            !o.status.success() && !text.contains("panicked"),
            "{args:?}:\n{text}"
        );
        Ok(text)
    };
    let long = dir.path().join("long.json");
    std::fs::write(
        &long,
        format!("{{\"input_ids\": [{:?}]}}", (0..18).collect::<Vec<u32>>()),
    )?;
    let (out_s, model_s) = (out.display().to_string(), model.display().to_string());
    let e = fails(&strings(&[
        "eval",
        &out_s,
        "--init-from",
        &model_s,
        "--data",
        &long.display().to_string(),
    ]))?;
    assert!(
        e.contains("long.json") && e.contains("--seq-len 17"),
        "long row:\n{e}"
    );
    let e = fails(&strings(&[
        "eval",
        "--init-from",
        &model_s,
        "--data",
        &tokens.display().to_string(),
        "--plan-dir",
        &dir.path().join("p").display().to_string(),
    ]))?;
    assert!(
        e.contains("tokens.bin") && e.contains("--seq-len"),
        "token file, no plan:\n{e}"
    );
    let e = fails(&strings(&[
        "eval",
        &out_s,
        "--init-from",
        &model_s,
        "--data",
        "no-such.json",
    ]))?;
    assert!(e.contains("no-such.json"), "missing data:\n{e}");
    // Without OUT under a launcher of 2: refused before any rank compiles.
    let p2 = dir.path().join("p2");
    let o = launch_binary(
        2,
        &autopart_bin()?,
        &strings(&[
            "eval",
            "--init-from",
            &model_s,
            "--data",
            &long.display().to_string(),
            "--plan-dir",
            &p2.display().to_string(),
        ]),
        Duration::from_secs(120),
    )?;
    let text = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && text.contains("one-process plan") && text.contains("started 2"),
        "{text}"
    );
    assert!(!p2.exists(), "nothing was compiled");
    let e = fails(&strings(&[
        "generate",
        &out_s,
        "--init-from",
        &model_s,
        "--prompt",
        "hi",
    ]))?;
    assert!(
        e.contains("--tokenizer"),
        "text prompt without a tokenizer:\n{e}"
    );
    let e = fails(&strings(&[
        "generate",
        &out_s,
        "--init-from",
        &model_s,
        "--prompt-ids",
        "1,300",
    ]))?;
    assert!(
        e.contains("300") && e.contains("vocabulary"),
        "id out of range:\n{e}"
    );

    // An unsupported model type is refused when compiling.
    let mistral = dir.path().join("mistral");
    std::fs::create_dir_all(&mistral)?;
    std::fs::write(
        mistral.join("config.json"),
        config.replace("\"model_type\": \"llama\"", "\"model_type\": \"mistral\""),
    )?;
    let err = compile_model(
        &dir.path().join("out-mistral"),
        &mistral.join("config.json").display().to_string(),
        SINGLE,
    )
    .expect_err("mistral is not supported");
    assert!(
        format!("{err:#}").contains("model_type 'mistral' is not supported"),
        "{err:#}"
    );
    Ok(())
}

/// `autopart ckpt export STEP --hf OUT [extra]`.
fn export(step: &Path, out: &Path, extra: &[&str]) -> Result<String> {
    let (step, out) = (step.display().to_string(), out.display().to_string());
    let mut args = vec!["ckpt", "export", step.as_str(), "--hf", out.as_str()];
    args.extend_from_slice(extra);
    let o = autopart(&args)?;
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Import, one step at lr 0 (nothing changes), checkpoint, export: transformers
/// loads tensors equal to the originals.
#[test]
fn import_then_export_gives_back_the_original_tensors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tokens = token_file(dir.path(), 400)?;
    for (kind, plan, np, shard) in [("llama", TP2, 2, "60000"), ("gpt2", SINGLE, 1, "5GB")] {
        let model = dir.path().join(kind);
        hf_tiny(&["make", kind, &model.display().to_string()])?;
        let out = dir.path().join(format!("out-{kind}"));
        compile_model(&out, &model.join("config.json").display().to_string(), plan)?;
        let ck = dir.path().join(format!("ck-{kind}"));
        train_from(
            &out,
            np,
            &model,
            &tokens,
            1,
            &[
                "--lr",
                "0",
                "--min-lr",
                "0",
                "--checkpoint-dir",
                &ck.display().to_string(),
            ],
        )?;
        let exported = dir.path().join(format!("hf-{kind}"));
        let said = export(&ck.join("step_1"), &exported, &["--max-shard-size", shard])?;
        assert!(said.contains("at step 1"), "{said}");
        if kind == "llama" {
            assert!(
                exported.join("model.safetensors.index.json").is_file(),
                "60 kB shards: an index"
            );
        }
        // The special token ids travel with the config (generation stops
        // at the exported folder's EOS as at the original's).
        let config = |d: &Path| -> Result<serde_json::Value> {
            Ok(serde_json::from_str(&std::fs::read_to_string(
                d.join("config.json"),
            )?)?)
        };
        let (a, b) = (config(&model)?, config(&exported)?);
        for k in ["bos_token_id", "eos_token_id"] {
            assert!(
                !a[k].is_null() && a[k] == b[k],
                "{kind} {k}: {} vs {}",
                a[k],
                b[k]
            );
        }
        let n = hf_tiny(&[
            "compare",
            &model.display().to_string(),
            &exported.display().to_string(),
        ])?;
        assert!(
            n.trim().parse::<usize>()? > 10,
            "{kind}: compared {n} tensors"
        );
    }
    Ok(())
}

/// Fine-tune under tp2·pp2, export; transformers' held-out loss equals
/// autopart's from the checkpoint.
#[test]
fn a_model_fine_tuned_under_tp2_pp2_exports_to_transformers() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("llama");
    hf_tiny(&["make", "llama", &model.display().to_string()])?;
    let tokens = token_file(dir.path(), 400)?;
    let held_out = dir.path().join("held-out");
    std::fs::create_dir_all(&held_out)?;
    let held_out = {
        // Another stream of ids: the second half of a longer file.
        let long = token_file(&held_out, 800)?;
        let bytes = std::fs::read(&long)?;
        let path = held_out.join("held-out.bin");
        std::fs::write(&path, &bytes[bytes.len() / 2..])?;
        path
    };
    let tp2pp2 = autopart_tests::plans::TP2_PP2_1F1B;
    let out = dir.path().join("out-tp2pp2");
    compile_model(
        &out,
        &model.join("config.json").display().to_string(),
        tp2pp2,
    )?;
    let ck = dir.path().join("ck");
    let first = train_from(
        &out,
        4,
        &model,
        &tokens,
        10,
        &[
            "--lr",
            "3e-3",
            "--checkpoint-dir",
            &ck.display().to_string(),
        ],
    )?;
    let last = read_metrics(&out.join("metrics.jsonl"))?
        .last()
        .map(|m| m.loss)
        .context("metrics")?;
    assert!(
        last < first,
        "fine-tuning lowers the loss: {first} -> {last}"
    );
    let exported = dir.path().join("hf");
    export(&ck.join("step_10"), &exported, &[])?;
    // transformers' loss over every held-out window equals autopart eval's,
    // from the checkpoint and from the exported folder.
    let want = reference_windows_loss(&exported, &held_out, 400)?;
    let single = dir.path().join("out-single");
    compile_model(
        &single,
        &model.join("config.json").display().to_string(),
        SINGLE,
    )?;
    let got = eval_loss(1, Some(&single), &ck.join("step_10"), &held_out, &[])?;
    assert_close("fine-tuned, held out, from the checkpoint", got, want);
    let again = eval_loss(1, Some(&single), &exported, &held_out, &[])?;
    assert_close("fine-tuned, held out, exported", again, want);
    let before = reference_windows_loss(&model, &held_out, 400)?;
    assert!(
        (before - want).abs() > 1e-3,
        "the fine-tune changed the held-out loss: {before} vs {want}"
    );
    Ok(())
}
