//! What the per-pass snapshot tests (lower, rewrite_fixed, codegen) share:
//! the fixed inputs' folder, and reading and checking programs in RON.
#![allow(dead_code)] // each test binary uses its own part

use std::path::{Path, PathBuf};

use autopart::lower::ExecProgram;

/// `compiler/tests`.
pub fn tests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests")
}

/// The program RON at `rel` (relative to `compiler/tests`).
pub fn read_program(rel: &str) -> ExecProgram {
    let path = tests_dir().join(rel);
    let text = std::fs::read_to_string(&path).expect("program RON");
    ron::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Checks that `program` reads back from its RON, and snapshots that RON
/// as `snapshots/{pass}/{name}.program.ron` (the next pass's fixed input).
pub fn check_ron(pass: &str, name: &str, program: &ExecProgram) {
    let mut text = ron::ser::to_string_pretty(program, ron::ser::PrettyConfig::default())
        .expect("program serialises");
    text.push('\n');
    let back: ExecProgram = ron::from_str(&text).expect("program RON parses");
    assert_eq!(&back, program, "{name}: RON round trip differs");
    expect_test::expect_file![tests_dir().join(format!("snapshots/{pass}/{name}.program.ron"))]
        .assert_eq(&text);
}
