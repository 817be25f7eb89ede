//! `autopart run --data DIR` on folders made by `autopart data prepare`:
//! a byte-level BPE of 320 ids trained in the test on license texts,
//! packed text rows and instruction rows (whose prompts are masked), and a
//! llama-mini-sized model compiled from a config.json with that vocabulary
//! (16 tokens a row, 8 rows a step).
//!
//! - Every plan (tp2, dp2 with ZeRO-1 and ZeRO-3, pp2 interleaved) trains on the same global
//!   batches: its per-step losses, gradient norms and held-out loss equal
//!   the single process's within 1e-5.
//! - The loss falls; a run interrupted at step 5 and resumed (on another
//!   plan) continues the uninterrupted run's batches and losses.
//! - `--tensorboard` files read back by TensorBoard's own reader hold the
//!   metrics file's values.
//! - Instruction data: the loss over responses falls and masked labels
//!   count in no step's token count.
//! - After instruction fine-tuning, `autopart eval --rouge` on a padded
//!   eval split reports the response loss and ROUGE-1/2/L of greedy
//!   generations, both better than before fine-tuning; its per-record and
//!   mean scores equal Google's rouge-score on the same texts.
//! - A folder of another sequence length or a larger vocabulary is refused
//!   with a message naming it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use autopart_tests::{autopart, autopart_home, compile_model, launch, plans, train};
use serde_json::Value;

const RTOL: f64 = 1e-5;
const LICENSES: &str = "/usr/share/common-licenses";

/// llama-mini (width 64, 4 layers, 4 heads, 2 kv heads) with `vocab` ids.
fn config(dir: &Path, vocab: u64) -> Result<PathBuf> {
    let path = dir.join("config.json");
    let cfg = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 176,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": vocab,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": false,
    });
    std::fs::write(&path, cfg.to_string())?;
    Ok(path)
}

fn license(name: &str) -> String {
    format!("{LICENSES}/{name}")
}

/// `autopart data train-tokenizer` on three license texts.
fn tokenizer(dir: &Path, vocab: u64) -> Result<PathBuf> {
    let out = dir.join(format!("tokenizer-{vocab}.json"));
    let (gpl, apache, mpl) = (license("GPL-3"), license("Apache-2.0"), license("MPL-2.0"));
    let vocab = vocab.to_string();
    let out_s = out.display().to_string();
    autopart(&[
        "data",
        "train-tokenizer",
        "--input",
        &gpl,
        "--input",
        &apache,
        "--input",
        &mpl,
        "--vocab-size",
        &vocab,
        "--out",
        &out_s,
    ])?;
    Ok(out)
}

/// `autopart data prepare` of `inputs` into `out` with `extra` flags.
fn prepare(tok: &Path, inputs: &[String], seq: u32, out: &Path, extra: &[&str]) -> Result<()> {
    let (tok, seq, out) = (
        tok.display().to_string(),
        seq.to_string(),
        out.display().to_string(),
    );
    let mut args = vec!["data", "prepare", "--tokenizer", &tok, "--seq-len", &seq];
    for i in inputs {
        args.extend(["--input", i.as_str()]);
    }
    args.extend(["--out", &out]);
    args.extend(extra);
    autopart(&args)?;
    Ok(())
}

/// Every line of a metrics file as JSON.
fn lines(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    text.lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("{}: {l}", path.display())))
        .collect()
}

fn field(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(f64::NAN)
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= RTOL * b.abs().max(1e-12)
}

/// The metrics of `out` after training it on `np` processes.
fn run(np: usize, out: &Path, steps: u32, args: &[&str]) -> Result<Vec<Value>> {
    train(np, out, steps, args)?;
    lines(&out.join("metrics.jsonl"))
}

/// Asserts that `got` equals `want` step by step in loss, gradient norm and
/// (where computed) held-out loss.
fn assert_same(what: &str, got: &[Value], want: &[Value]) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (g, w) in got.iter().zip(want) {
        for k in ["loss", "grad_norm", "eval_loss"] {
            let (a, b) = (field(g, k), field(w, k));
            assert!(
                (a.is_nan() && b.is_nan()) || close(a, b),
                "{what}: step {} {k} {a} vs single process {b}",
                g["step"]
            );
        }
        assert_eq!(g["loss_tokens"], w["loss_tokens"], "{what}");
    }
}

fn mean(xs: &[Value], k: &str) -> f64 {
    xs.iter().map(|v| field(v, k)).sum::<f64>() / xs.len() as f64
}

#[test]
fn prepared_text_trains_alike_on_every_plan_and_resumes_in_sequence() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let tok = tokenizer(dir, 320)?;
    let (train_dir, eval_dir) = (dir.join("train"), dir.join("eval"));
    prepare(
        &tok,
        &[license("GPL-3"), license("Apache-2.0")],
        16,
        &train_dir,
        &[],
    )?;
    prepare(&tok, &[license("MPL-2.0")], 16, &eval_dir, &[])?;
    let cfg = config(dir, 320)?;
    let model = cfg.display().to_string();
    let (data, eval) = (
        train_dir.display().to_string(),
        eval_dir.display().to_string(),
    );
    let common = [
        "--data",
        &data,
        "--lr",
        "3e-3",
        "--eval-data",
        &eval,
        "--eval-batches",
        "4",
    ];

    let single = dir.join("single");
    compile_model(&single, &model, plans::SINGLE)?;
    // 20 steps with TensorBoard and MFU: the loss and the held-out loss fall.
    let tb = dir.join("tb");
    let tb_s = tb.display().to_string();
    let mut args = common.to_vec();
    args.extend([
        "--eval-every",
        "10",
        "--tensorboard",
        &tb_s,
        "--peak-tflops",
        "1",
    ]);
    let long = run(1, &single, 20, &args)?;
    let (first, last) = (mean(&long[..5], "loss"), mean(&long[15..], "loss"));
    assert!(
        last < first - 0.5,
        "the loss does not fall: {first} -> {last}"
    );
    let evals: Vec<(u64, f64)> = long
        .iter()
        .filter(|v| !v["eval_loss"].is_null())
        .map(|v| (v["step"].as_u64().unwrap_or(0), field(v, "eval_loss")))
        .collect();
    assert_eq!(evals.iter().map(|e| e.0).collect::<Vec<_>>(), [10, 20]);
    assert!(evals[1].1 < evals[0].1, "held-out loss {evals:?}");
    for v in &long {
        // Packed text: every label counts.
        assert_eq!(v["loss_tokens"].as_u64(), Some(8 * 16), "{v}");
        let mfu = field(v, "mfu");
        assert!(mfu > 0.0 && mfu < 1.0, "{v}");
        assert!(close(
            field(v, "tokens_per_s_per_device"),
            field(v, "tokens_per_s")
        ));
    }
    tensorboard_holds_the_metrics(&tb, &long)?;

    // Every plan sees the single process's batches (5 steps, then the held-out loss).
    let want = run(1, &single, 5, &common)?;
    for (name, np, plan) in [
        ("tp2", 2, plans::TP2),
        ("dp2", 2, plans::DP2_ZERO1),
        ("dp2-zero3", 2, plans::DP2_ZERO3),
        ("pp2", 2, plans::PP2_INTERLEAVED),
    ] {
        let out = dir.join(name);
        compile_model(&out, &model, plan)?;
        let got = run(np, &out, 5, &common)?;
        assert_same(name, &got, &want);
        for v in &got {
            let (all, per_device) = (
                field(v, "tokens_per_s"),
                field(v, "tokens_per_s_per_device"),
            );
            assert!(close(per_device, all / np as f64), "{name}: {v}");
        }
        if name == "dp2" {
            resumed_runs_continue_the_sequence(dir, &single, &out, &data)?;
        }
    }
    Ok(())
}

/// dp2 interrupted after step 5 (checkpoint) and resumed to step 10 sees
/// the batches and losses of the uninterrupted single-process run.
fn resumed_runs_continue_the_sequence(
    dir: &Path,
    single: &Path,
    dp2: &Path,
    data: &str,
) -> Result<()> {
    let want = run(1, single, 10, &["--data", data, "--lr", "3e-3"])?;
    let ck = dir.join("ck").display().to_string();
    let metrics = dp2.join("metrics.jsonl").display().to_string();
    let base = [
        "--steps",
        "10",
        "--metrics",
        &metrics,
        "--seed",
        "7",
        "--data",
        data,
        "--lr",
        "3e-3",
        "--checkpoint-dir",
        &ck,
    ];
    for then in [["--exit-at-step", "5"], ["--resume", "latest"]] {
        let args: Vec<&str> = base.iter().chain(&then).copied().collect();
        let out = launch(2, dp2, &args, Duration::from_secs(300))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "{args:?}: {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // The same folder and seed: nothing to note about the data.
        assert!(!stdout.contains("the checkpoint's data was"), "{stdout}");
    }
    let got = lines(&dp2.join("metrics.jsonl"))?;
    assert_same("dp2 resumed at step 5", &got, &want);
    let marker = dir.join("ck/step_10/COMPLETE");
    let manifest: Value = serde_json::from_str(&std::fs::read_to_string(&marker)?)?;
    let position = &manifest["data"];
    assert_eq!(position["source"], "prepared", "{position}");
    assert_eq!(position["next_step"], 10, "{position}");
    assert_eq!(position["seed"], 7, "{position}");
    Ok(())
}

/// TensorBoard's reader finds every scalar of the metrics file at its step
/// (as f32, TensorBoard's `simple_value`).
fn tensorboard_holds_the_metrics(tb: &Path, metrics: &[Value]) -> Result<()> {
    let script = autopart_home().join("tests/py/tb_read.py");
    let python = autopart_home().join(".venv/bin/python");
    let out = Command::new(&python)
        .arg(&script)
        .arg(tb)
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "tb_read.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let read: Value = serde_json::from_slice(&out.stdout)?;
    let tags = [
        "loss",
        "grad_norm",
        "lr",
        "step_s",
        "forward_backward_s",
        "optimizer_s",
        "tokens_per_s",
        "tokens_per_s_per_device",
        "mfu",
        "peak_rss_bytes",
        "eval_loss",
    ];
    for tag in tags {
        let points = read[tag]
            .as_array()
            .with_context(|| format!("no scalar {tag} in {read}"))?;
        let want: Vec<(u64, f64)> = metrics
            .iter()
            .filter(|v| !v[tag].is_null())
            .map(|v| (v["step"].as_u64().unwrap_or(0), field(v, tag)))
            .collect();
        assert_eq!(points.len(), want.len(), "{tag}: {points:?} vs {want:?}");
        for (p, (step, x)) in points.iter().zip(&want) {
            assert_eq!(p[0].as_u64(), Some(*step), "{tag}");
            let got = p[1].as_f64().unwrap_or(f64::NAN);
            let f32_value = f64::from(*x as f32);
            assert!(
                (got - f32_value).abs() <= 1e-6 * f32_value.abs().max(1e-30),
                "{tag} at step {step}: {got} vs {x}"
            );
        }
    }
    Ok(())
}

/// Dolly-format records: questions whose answers repeat a word of them.
fn dolly(path: &Path, records: usize) -> Result<()> {
    let words = [
        "apple", "river", "stone", "cloud", "green", "seven", "north", "quiet", "light", "bread",
    ];
    let mut text = String::new();
    for i in 0..records {
        let (a, b) = (
            words[i % words.len()],
            words[(i / words.len()) % words.len()],
        );
        let context = if i % 3 == 0 {
            Value::Null
        } else {
            Value::String(format!("{b} {a}"))
        };
        let rec = serde_json::json!({
            "instruction": format!("repeat {a}"),
            "context": context,
            "response": format!("{a} {a}"),
            "category": "open_qa",
        });
        text.push_str(&rec.to_string());
        text.push('\n');
    }
    std::fs::write(path, text)?;
    Ok(())
}

#[test]
fn instruction_data_learns_responses_and_mismatched_folders_are_refused() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let tok = tokenizer(dir, 320)?;
    let jsonl = dir.join("dolly.jsonl");
    dolly(&jsonl, 400)?;
    let template = dir.join("template.txt");
    std::fs::write(
        &template,
        "Q: {instruction}{?context} ({context}){/context}\nA: ",
    )?;
    let sft = dir.join("sft");
    let template_s = template.display().to_string();
    prepare(
        &tok,
        &[jsonl.display().to_string()],
        16,
        &sft,
        &[
            "--format",
            "instruction",
            "--template",
            &template_s,
            "--pack",
        ],
    )?;
    let cfg = config(dir, 320)?;
    let single = dir.join("single");
    compile_model(&single, &cfg.display().to_string(), plans::SINGLE)?;
    let sft_s = sft.display().to_string();
    // The weights before fine-tuning (a step at lr 0 changes nothing).
    let (ck0, ck) = (dir.join("ck0"), dir.join("ck"));
    let (ck0_s, ck_s) = (ck0.display().to_string(), ck.display().to_string());
    run(
        1,
        &single,
        1,
        &[
            "--data",
            &sft_s,
            "--lr",
            "0",
            "--min-lr",
            "0",
            "--checkpoint-dir",
            &ck0_s,
        ],
    )?;
    let m = run(
        1,
        &single,
        200,
        &["--data", &sft_s, "--lr", "3e-3", "--checkpoint-dir", &ck_s],
    )?;
    let (first, last) = (mean(&m[..5], "loss"), mean(&m[195..], "loss"));
    assert!(
        last < first - 0.5,
        "the response loss does not fall: {first} -> {last}"
    );
    for v in &m {
        // Prompts are masked: fewer labels count than the 8 x 16 positions.
        let n = v["loss_tokens"].as_u64().unwrap_or(0);
        assert!(n > 0 && n < 8 * 16 / 2, "{v}");
        let per_s = n as f64 / field(v, "step_s");
        assert!(close(field(v, "tokens_per_s"), per_s), "{v}");
    }

    // The eval split: other records, one a row (40 tokens: every record fits).
    let eval_jsonl = dir.join("dolly-eval.jsonl");
    dolly(&eval_jsonl, 30)?;
    let held = dir.join("sft-eval");
    prepare(
        &tok,
        &[eval_jsonl.display().to_string()],
        40,
        &held,
        &["--format", "instruction", "--template", &template_s],
    )?;
    let plan_dir = dir.join("eval-plan");
    let rouge = |from: &Path, generations: &Path| -> Result<Value> {
        let args: Vec<String> = [
            "eval",
            "--init-from",
            &from.display().to_string(),
            "--data",
            &held.display().to_string(),
            "--rouge",
            "--json",
            "--generations",
            &generations.display().to_string(),
            "--plan-dir",
            &plan_dir.display().to_string(),
            "--build-profile",
            "dev",
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = autopart(&refs)?;
        let stdout = String::from_utf8_lossy(&o.stdout);
        serde_json::from_str(stdout.lines().last().unwrap_or(""))
            .with_context(|| stdout.to_string())
    };
    let (gen0, gen1) = (dir.join("gen0.jsonl"), dir.join("gen1.jsonl"));
    let before = rouge(&ck0.join("step_1"), &gen0)?;
    let after = rouge(&ck.join("step_200"), &gen1)?;
    let records = lines(&gen1)?.len();
    assert!(records >= 20, "{records} records of 30 fit 40 tokens");
    assert_eq!(
        after["generations"].as_u64(),
        Some(records as u64),
        "{after}"
    );
    assert!(
        field(&after, "loss") < field(&before, "loss") - 0.5,
        "fine-tuning lowers the eval split's response loss: {before} -> {after}"
    );
    assert!(
        field(&after, "rougeL") > field(&before, "rougeL") + 0.4,
        "fine-tuning raises ROUGE-L: {before} -> {after}"
    );
    // Our ROUGE equals rouge-score's, record by record and on average.
    for file in [&gen0, &gen1] {
        let script = r#"
import json, sys
from rouge_score import rouge_scorer
s = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
for line in open(sys.argv[1]):
    r = json.loads(line)
    x = s.score(r["reference"], r["generation"])
    print(json.dumps({k: x[k].fmeasure for k in ["rouge1", "rouge2", "rougeL"]}))
"#;
        let o = Command::new(autopart_home().join(".venv/bin/python"))
            .args(["-c", script, &file.display().to_string()])
            .output()?;
        if !o.status.success() {
            bail!("rouge-score: {}", String::from_utf8_lossy(&o.stderr));
        }
        let want: Vec<Value> = String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
        let got = lines(file)?;
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            for k in ["rouge1", "rouge2", "rougeL"] {
                assert!(
                    (field(g, k) - field(w, k)).abs() < 1e-12,
                    "{k}: {g} vs rouge-score {w}"
                );
            }
        }
        let summary = if file == &gen0 { &before } else { &after };
        for k in ["rouge1", "rouge2", "rougeL"] {
            let m = want.iter().map(|w| field(w, k)).sum::<f64>() / want.len() as f64;
            assert!(
                (field(summary, k) - m).abs() < 1e-12,
                "mean {k}: {summary} vs {m}"
            );
        }
    }

    // A folder of 8-token rows, and one of a 400-id tokenizer, do not fit.
    let short = dir.join("short");
    prepare(&tok, &[license("GPL-3")], 8, &short, &[])?;
    let big_tok = tokenizer(dir, 400)?;
    let big = dir.join("big-vocab");
    prepare(&big_tok, &[license("GPL-3")], 16, &big, &[])?;
    for (folder, want) in [
        (
            &short,
            "the rows hold 8 tokens, but this plan was compiled for sequences of 16",
        ),
        (
            &big,
            "its tokenizer has 400 ids, more than this plan's vocabulary of 320",
        ),
    ] {
        let f = folder.display().to_string();
        let out = launch(
            1,
            &single,
            &["--steps", "1", "--data", &f],
            Duration::from_secs(60),
        )?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(&format!("error: {f}: {want}")), "{stderr}");
    }
    Ok(())
}
