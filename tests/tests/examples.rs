//! The four examples (`examples/*/`), so that none can rot:
//!
//! - each one's CPU part (`run.sh`) runs end to end and passes its own
//!   checks (losses against a reference run, the loss falling, a restarted
//!   job equal to an uninterrupted one, an HF export equal to the trained
//!   model in transformers, ROUGE rising after fine-tuning, ...);
//! - each one's cluster part (`plans.sh --check`) regenerates the compile
//!   outputs and summary and finds them equal to the checked-in `outputs/`;
//! - every command its README shows (a `$ ` line of a ```sh block) is one of
//!   the commands those scripts printed as they ran it.
//!
//! The plan binaries are built with the dev profile
//! (`AUTOPART_BUILD_PROFILE=dev`, shared with the other end-to-end tests).
//! `llama3-70b-trn1` runs its job on the test Slurm (root; with
//! `AUTOPART_TEST_NO_SLURM=1` where Slurm cannot start, that example is
//! skipped, saying so).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use autopart_tests::{autopart_bin, autopart_home, launch_binary_env, test_slurm};

fn example_dir(name: &str) -> PathBuf {
    autopart_home().join("examples").join(name)
}

/// Runs `examples/NAME/SCRIPT ARGS` and returns the commands it printed
/// (its `$ ` lines), failing with its output when it fails.
fn run_script(name: &str, script: &str, args: &[&str], limit: Duration) -> Result<Vec<String>> {
    let path = example_dir(name).join(script);
    let mut all = vec!["bash".to_string(), path.display().to_string()];
    all.extend(args.iter().map(ToString::to_string));
    let bin = autopart_bin()?.display().to_string();
    let env = [
        ("AUTOPART", bin.as_str()),
        ("AUTOPART_BUILD_PROFILE", "dev"),
    ];
    let o = launch_binary_env(1, Path::new("/usr/bin/env"), &all, &env, limit)
        .with_context(|| format!("running {}", path.display()))?;
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    if !o.status.success() {
        bail!(
            "{} {} failed ({}):\n{stdout}\n{stderr}",
            path.display(),
            args.join(" "),
            o.status
        );
    }
    eprintln!("{}", tail(&stderr, 30));
    Ok(stderr
        .lines()
        .filter_map(|l| l.strip_prefix("$ "))
        .map(normalise)
        .collect())
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn normalise(cmd: &str) -> String {
    cmd.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The `$ ` commands of the README's ```sh blocks, continuation lines
/// (ending in `\`) joined.
fn readme_commands(name: &str) -> Result<Vec<String>> {
    let path = example_dir(name).join("README.md");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    let mut out = Vec::new();
    let mut in_sh = false;
    let mut current: Option<String> = None;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_sh = !in_sh && line.trim() == "```sh";
            continue;
        }
        if !in_sh {
            continue;
        }
        let piece = match (&mut current, line.strip_prefix("$ ")) {
            (None, Some(cmd)) => cmd,
            (Some(_), _) => line,
            (None, None) => continue,
        };
        let (piece, more) = match piece.trim_end().strip_suffix('\\') {
            Some(p) => (p, true),
            None => (piece, false),
        };
        let cmd = current.get_or_insert_with(String::new);
        cmd.push(' ');
        cmd.push_str(piece);
        if !more {
            out.push(normalise(&current.take().unwrap_or_default()));
        }
    }
    if out.is_empty() {
        bail!("{} shows no `$ ` commands in a ```sh block", path.display());
    }
    Ok(out)
}

/// Runs an example's two scripts and checks its README against what they
/// printed.
fn example(name: &str, limit: Duration) -> Result<()> {
    let mut printed: BTreeSet<String> = run_script(name, "run.sh", &[], limit)?
        .into_iter()
        .collect();
    printed.extend(run_script(name, "plans.sh", &["--check"], limit)?);
    for script in ["run.sh", "plans.sh"] {
        printed.insert(format!("examples/{name}/{script}"));
        printed.insert(format!("examples/{name}/{script} --check"));
    }
    let missing: Vec<String> = readme_commands(name)?
        .into_iter()
        .filter(|c| !printed.contains(c))
        .collect();
    assert!(
        missing.is_empty(),
        "examples/{name}/README.md shows commands its scripts do not run:\n{}\n\nthe scripts ran:\n{}",
        missing.join("\n"),
        printed.iter().cloned().collect::<Vec<_>>().join("\n")
    );
    Ok(())
}

#[test]
fn llama3_8b_128k() -> Result<()> {
    example("llama3-8b-128k", Duration::from_secs(900))
}

#[test]
fn llama3_70b_trn1() -> Result<()> {
    if test_slurm()?.is_none() {
        return Ok(());
    }
    example("llama3-70b-trn1", Duration::from_secs(900))
}

#[test]
fn llama2_7b_finetune() -> Result<()> {
    example("llama2-7b-finetune", Duration::from_secs(900))
}

#[test]
fn llama2_7b_atorch() -> Result<()> {
    example("llama2-7b-atorch", Duration::from_secs(900))
}
