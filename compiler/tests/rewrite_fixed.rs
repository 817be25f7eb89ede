//! `rewrite` from fixed lowered programs (the RON snapshots of
//! tests/lower.rs): the rewritten program's text, the report, and the
//! rewritten program's RON, which is the fixed input of the codegen snapshot
//! tests. Re-bless with UPDATE_EXPECT=1.

mod common;

use autopart::cost::load_cluster;
use autopart::driver;
use autopart::lower::verify;
use common::{check_ron, read_program};

fn check(name: &str) {
    let lowered = read_program(&format!("snapshots/lower/{name}.program.ron"));
    let plan =
        autopart::plan::read_plan(&common::tests_dir().join(format!("data/plans/{name}.plan.ron")))
            .expect("plan");
    let cluster = load_cluster(&plan.cluster).expect("cluster");
    // The driver's pass, with its limits (nodes and iterations: the result
    // does not depend on the machine's speed), and the stream free to move
    // (`compile --rewrite-stream`): these snapshots show the rewrite
    // deriving sequence parallelism from the plain tp plans.
    let rewritten = driver::rewrite(&cluster, lowered, true, true).expect("rewrite");
    let program = rewritten.program;
    let report = rewritten.report.expect("the rewrite ran");
    verify(&program).expect("rewritten program verifies");
    expect_test::expect_file![format!("snapshots/rewrite/{name}.program.txt")]
        .assert_eq(&program.to_string());
    expect_test::expect_file![format!("snapshots/rewrite/{name}.report.txt")]
        .assert_eq(&report.to_string());
    check_ron("rewrite", name, &program);
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
