//! Generated code: snapshots of the crate for llama-mini under several plans,
//! byte-identical output for the same plan, rustfmt-clean, a comment per op.

use std::path::Path;
use std::process::Command;

fn compile_no_build(out: &Path, extra: &[&str]) {
    let out_s = out.to_string_lossy().to_string();
    let mut args = vec![
        "compile",
        "--model",
        "llama-mini",
        "--cluster",
        "cpu",
        "--dtype",
        "fp32",
        "--seq-len",
        "16",
        "--global-batch",
        "8",
        "--no-build",
        "--out",
        &out_s,
    ];
    args.extend_from_slice(extra);
    let output = Command::new(env!("CARGO_BIN_EXE_autopart"))
        .args(&args)
        .output()
        .expect("autopart runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The generated sources (not Cargo.toml, which holds a local path), one
/// after the other with their names.
fn sources(gencode: &Path) -> String {
    let mut names: Vec<String> = std::fs::read_dir(gencode.join("src"))
        .expect("src folder")
        .map(|e| e.expect("entry").file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    let mut all = String::new();
    for name in names {
        let text = std::fs::read_to_string(gencode.join("src").join(&name)).expect("read");
        all.push_str(&format!("// ===== src/{name} =====\n{text}"));
    }
    all
}

fn check_plan(snapshot: &str, extra: &[&str]) {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("out");
    compile_no_build(&out, extra);
    let gencode = out.join("gencode");
    let first = sources(&gencode);
    let toml = std::fs::read_to_string(gencode.join("Cargo.toml")).expect("Cargo.toml");
    assert!(toml.contains("autopart-runtime = { path ="), "{toml}");
    assert!(toml.contains("[workspace]"), "{toml}");

    // The same plan gives the same bytes.
    compile_no_build(&out, extra);
    assert_eq!(first, sources(&gencode), "{snapshot}: not deterministic");

    // rustfmt-clean.
    let files: Vec<_> = std::fs::read_dir(gencode.join("src"))
        .expect("src")
        .map(|e| e.expect("entry").path())
        .collect();
    let status = Command::new("rustfmt")
        .args(["--edition", "2024", "--check"])
        .args(&files)
        .status()
        .expect("rustfmt is on PATH (rustup component add rustfmt)");
    assert!(
        status.success(),
        "{snapshot}: generated code is not rustfmt-clean"
    );

    // Readable: a comment per traced op, no unsafe.
    let program = std::fs::read_to_string(out.join("program.txt")).expect("program.txt");
    for line in program.lines() {
        if let Some((_, traced)) = line.split_once("  # ") {
            assert!(
                first.contains(&format!("// {traced}: ")),
                "{snapshot}: no comment for {traced}"
            );
        }
    }
    assert!(!first.contains("unsafe"));
    expect_test::expect_file![format!("snapshots/gencode/{snapshot}.rs.txt")].assert_eq(&first);
}

#[test]
fn tp2_as_lowered() {
    // Megatron's f and g: copy before the column-parallel projections,
    // all-reduce after the row-parallel ones.
    check_plan(
        "tp2-lowered",
        &[
            "--plan-ngpus",
            "2",
            "--tp",
            "2",
            "--pp",
            "1",
            "--sp",
            "false",
            "--no-rewrite",
        ],
    );
}

#[test]
fn tp2_rewritten() {
    // The rewrite turns the same plan into sequence parallelism.
    check_plan(
        "tp2-rewritten",
        &[
            "--plan-ngpus",
            "2",
            "--tp",
            "2",
            "--pp",
            "1",
            "--sp",
            "false",
        ],
    );
}

#[test]
fn tp2_sequence_parallel_selective_recompute() {
    check_plan(
        "tp2-sp-selective",
        &[
            "--plan-ngpus",
            "2",
            "--tp",
            "2",
            "--pp",
            "1",
            "--sp",
            "true",
            "--recompute",
            "selective",
        ],
    );
}

#[test]
fn tp2_pp2_full_recompute() {
    check_plan(
        "tp2-pp2-full",
        &[
            "--plan-ngpus",
            "4",
            "--tp",
            "2",
            "--pp",
            "2",
            "--micro-batch",
            "2",
            "--sp",
            "false",
            "--recompute",
            "full",
        ],
    );
}

#[test]
fn pp2_interleaved() {
    check_plan(
        "pp2-interleaved",
        &[
            "--plan-ngpus",
            "2",
            "--tp",
            "1",
            "--pp",
            "2",
            "--micro-batch",
            "2",
            "--schedule",
            "interleaved-2",
        ],
    );
}
