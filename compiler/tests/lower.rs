//! `lower` from fixed plans (tests/data/plans, made once by `autopart
//! compile` and frozen, so that a search or cost-model change does not
//! reach these snapshots): the program's text (`program.txt`) and its RON,
//! which reads back to the same program. The RON files are the fixed inputs
//! of the rewrite and codegen snapshot tests. Re-bless with UPDATE_EXPECT=1.

use autopart::anno::builtin_registry;
use autopart::cost::load_cluster;
use autopart::driver::lower_plan;
use autopart::lower::{ExecProgram, verify};
use autopart::plan::read_plan;
use autopart::trace::load_model;

mod common;

use common::{check_ron, tests_dir};

/// Lowers the fixed plan `name` as `autopart compile` does (the driver's
/// `lower` pass): the graph traced at the plan's micro-batch and sequence
/// length.
fn lower_fixed(name: &str) -> ExecProgram {
    let path = tests_dir().join(format!("data/plans/{name}.plan.ron"));
    let plan = read_plan(&path).expect("fixed plan reads");
    let model = load_model(&plan.model.spec).expect("model");
    let cluster = load_cluster(&plan.cluster).expect("cluster");
    lower_plan(&plan, &model, &builtin_registry(), &cluster).expect("lower")
}

fn check(name: &str) {
    let program = lower_fixed(name);
    verify(&program).expect("lowered program verifies");
    expect_test::expect_file![format!("snapshots/lower/{name}.program.txt")]
        .assert_eq(&program.to_string());
    // Read back: the RON parses to the same program.
    check_ron("lower", name, &program);
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

#[test]
fn the_fixed_plans_are_what_compile_wrote() {
    // The plans are frozen inputs: each still parses, and names llama-mini
    // on the cpu cluster as when it was made.
    for name in ["tp2", "tp2-sp-selective", "tp2-pp2-full", "pp2-interleaved"] {
        let plan = read_plan(&tests_dir().join(format!("data/plans/{name}.plan.ron")))
            .expect("fixed plan reads");
        assert_eq!(plan.model.spec, "llama-mini", "{name}");
        assert_eq!(plan.cluster, "cpu", "{name}");
    }
}
