//! `rewrite` from fixed lowered programs (the RON snapshots of
//! tests/lower.rs): the rewritten program's text, the report, and the
//! rewritten program's RON, which is the fixed input of the codegen snapshot
//! tests. Re-bless with UPDATE_EXPECT=1.

use std::path::{Path, PathBuf};
use std::time::Duration;

use autopart::cost::{Group, load_cluster};
use autopart::lower::{AdapterCost, ExecProgram, verify};
use autopart::plan::read_plan;
use autopart::rewrite::{Limits, rewrite};

fn tests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests")
}

fn read_program(path: &Path) -> ExecProgram {
    let text = std::fs::read_to_string(path).expect("program RON");
    ron::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn check(name: &str) {
    let lowered = read_program(&tests_dir().join(format!("snapshots/lower/{name}.program.ron")));
    let plan = read_plan(&tests_dir().join(format!("data/plans/{name}.plan.ron"))).expect("plan");
    let cluster = load_cluster(&plan.cluster).expect("cluster");
    let cost = AdapterCost {
        cluster: &cluster,
        group: Group::placed(&cluster, plan.mesh.tp, 1),
    };
    // Node and iteration limits only: a time limit would make the result
    // depend on the machine's speed.
    let limits = Limits {
        time_limit: Duration::from_secs(3600),
        ..Limits::default()
    };
    let (program, report) = rewrite(&lowered, &cost, &limits).expect("rewrite");
    verify(&program).expect("rewritten program verifies");
    expect_test::expect_file![format!("snapshots/rewrite/{name}.program.txt")]
        .assert_eq(&program.to_string());
    expect_test::expect_file![format!("snapshots/rewrite/{name}.report.txt")]
        .assert_eq(&report.to_string());
    let mut ron_text = ron::ser::to_string_pretty(&program, ron::ser::PrettyConfig::default())
        .expect("program serialises");
    ron_text.push('\n');
    let back: ExecProgram = ron::from_str(&ron_text).expect("program RON parses");
    assert_eq!(back, program, "{name}: RON round trip differs");
    expect_test::expect_file![format!("snapshots/rewrite/{name}.program.ron")].assert_eq(&ron_text);
}

#[test]
fn tp2() {
    check("tp2");
}

#[test]
fn tp2_sequence_parallel_selective_recompute() {
    check("tp2-sp-selective");
}

#[test]
fn tp2_pp2_full_recompute() {
    check("tp2-pp2-full");
}

#[test]
fn pp2_interleaved() {
    check("pp2-interleaved");
}
