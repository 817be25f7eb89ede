//! The compile driver as a library: passes in order, verified hand-offs,
//! stop-after, the tied-weight and custom-op stages, and `--dump-after`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use autopart::anno::Layout;
use autopart::driver::{self, Observer, Pass, Request};
use autopart::plan::{DType, read_plan};

/// Records the passes the driver reports, with their hand-off's text.
#[derive(Default)]
struct Record(Vec<(Pass, String)>);

impl Observer for Record {
    fn after(&mut self, pass: Pass, handoff: &dyn std::fmt::Display, _: Duration) {
        self.0.push((pass, handoff.to_string()));
    }
}

fn mini(model: &str, gpus: u32, out: &Path) -> Request {
    let mut req = Request::new(model, gpus);
    req.cluster = "cpu".into();
    req.dtype = DType::Fp32;
    req.seq_len = Some(16);
    req.global_batch = Some(8);
    req.out = out.to_path_buf();
    req
}

#[test]
fn passes_run_in_order_and_write_their_artifacts() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("out");
    let mut req = mini("llama-mini", 2, &out);
    req.constraints.tp = Some(2);
    req.stop_after = Some(Pass::Codegen);
    let mut rec = Record::default();
    let done = driver::compile(&req, &mut rec).expect("compiles");
    let passes: Vec<Pass> = rec.0.iter().map(|(p, _)| *p).collect();
    assert_eq!(passes, Pass::ALL[..Pass::ALL.len() - 1].to_vec());
    assert!(done.built.is_none());
    let planned = done.planned.as_ref().expect("planned");
    // The plan hand-off is plan.ron, byte for byte, and reads back.
    let on_disk = std::fs::read_to_string(out.join("plan.ron")).expect("plan.ron");
    assert_eq!(planned.ron, on_disk);
    assert_eq!(
        &read_plan(&out.join("plan.ron")).expect("reads"),
        planned.best()
    );
    assert_eq!(planned.best().mesh.tp, 2);
    assert_eq!(
        planned.hash,
        autopart_vocab::hash::plan_hash(on_disk.as_bytes())
    );
    // program.txt is the rewritten program; rewrite.txt its report.
    let rewritten = done.rewritten.as_ref().expect("rewritten");
    assert_eq!(
        std::fs::read_to_string(out.join("program.txt")).expect("program.txt"),
        rewritten.program.to_string()
    );
    assert!(out.join("rewrite.txt").is_file());
    let generated = done.generated.as_ref().expect("generated");
    for f in &generated.files {
        let text = std::fs::read_to_string(out.join("gencode").join(&f.path)).expect("file");
        assert_eq!(text, f.text, "{}", f.path);
    }
    // The lower hand-off is the program before the rewrite.
    let lowered = done.lowered.as_ref().expect("lowered");
    assert_ne!(lowered.to_string(), rewritten.program.to_string());
    let (_, lower_text) = rec
        .0
        .iter()
        .find(|(p, _)| *p == Pass::Lower)
        .expect("lower ran");
    assert_eq!(lower_text, &lowered.to_string());
}

#[test]
fn stop_after_writes_nothing_before_the_plan() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("out");
    let mut req = mini("llama-mini", 2, &out);
    req.stop_after = Some(Pass::Search);
    let done = driver::compile(&req, &mut driver::Quiet).expect("searches");
    assert!(done.searched.is_some() && done.planned.is_none());
    assert!(!out.exists(), "the search alone writes no file");

    req.stop_after = Some(Pass::Lower);
    let done = driver::compile(&req, &mut driver::Quiet).expect("lowers");
    let lowered = done.lowered.as_ref().expect("lowered");
    assert!(done.rewritten.is_none());
    assert_eq!(
        std::fs::read_to_string(out.join("program.txt")).expect("program.txt"),
        lowered.to_string()
    );
    assert!(!out.join("gencode").exists());
}

#[test]
fn tied_weights_are_a_stage_resolved_per_tp() {
    let dir = tempfile::tempdir().expect("temp dir");
    // gpt-mini's vocab (256) divides tp 2: vocab-parallel on both ends.
    let mut req = mini("gpt-mini", 2, &dir.path().join("a"));
    req.constraints.tp = Some(2);
    req.stop_after = Some(Pass::Plan);
    let mut rec = Record::default();
    let done = driver::compile(&req, &mut rec).expect("compiles");
    let ties = done.ties.as_ref().expect("ties");
    assert_eq!(ties.tied.len(), 1);
    assert_eq!(ties.tied[0].param, "transformer.wte.weight");
    // pp stays free: the runtime sums the copies' gradients across stages.
    assert_eq!(ties.constraints.pp, None);
    let text = &rec
        .0
        .iter()
        .find(|(p, _)| *p == Pass::Ties)
        .expect("ties")
        .1;
    assert!(text.contains("tied transformer.wte.weight"), "{text}");
    let plan = done.planned.as_ref().expect("plan").best();
    let split = |op: &str| {
        plan.sharding
            .iter()
            .find(|s| s.op == op)
            .unwrap_or_else(|| panic!("{op} in the plan"))
            .split
            .clone()
    };
    assert!(split("wte").is_some(), "{:?}", plan.sharding);
    assert!(split("lm_head").is_some());

    // A vocab that tp 2 does not divide: both ends replicated, in the same
    // search (no retry on an error).
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string("tests/data/gpt2.config.json").expect("gpt2 config"),
    )
    .expect("json");
    config["vocab_size"] = 257.into();
    config["n_layer"] = 2.into();
    config["n_embd"] = 64.into();
    config["n_head"] = 4.into();
    config["n_positions"] = 64.into();
    let path = dir.path().join("odd-vocab.json");
    std::fs::write(&path, config.to_string()).expect("write config");
    let mut req = mini(&path.to_string_lossy(), 2, &dir.path().join("b"));
    req.constraints.tp = Some(2);
    req.stop_after = Some(Pass::Plan);
    let done = driver::compile(&req, &mut driver::Quiet).expect("compiles");
    let plan = done.planned.as_ref().expect("plan").best();
    for op in ["wte", "lm_head"] {
        let s = plan.sharding.iter().find(|s| s.op == op).expect("op");
        assert_eq!(s.split, None, "{op}");
    }

    // A user's pin on one reader decides for both.
    let mut req = mini("gpt-mini", 2, &dir.path().join("d"));
    req.constraints.tp = Some(2);
    req.constraints.splits.insert("lm_head".into(), None);
    req.stop_after = Some(Pass::Plan);
    let done = driver::compile(&req, &mut driver::Quiet).expect("compiles");
    let plan = done.planned.as_ref().expect("plan").best();
    for op in ["wte", "lm_head"] {
        let s = plan.sharding.iter().find(|s| s.op == op).expect("op");
        assert_eq!(s.split, None, "{op}");
    }
    let mut req = mini("gpt-mini", 2, &dir.path().join("e"));
    req.constraints.tp = Some(2);
    req.constraints
        .splits
        .insert("lm_head".into(), Some("k".into()));
    let err = driver::compile(&req, &mut driver::Quiet).expect_err("not the tied dim");
    assert!(
        format!("{err:#}").contains("must be its first dim"),
        "{err:#}"
    );

    // pp > 1: the first stage's embedding and the last stage's head each
    // hold the tied weight; the generated stages say so to the runtime.
    let out = dir.path().join("c");
    let mut req = mini("gpt-mini", 2, &out);
    req.constraints.pp = Some(2);
    req.stop_after = Some(Pass::Codegen);
    let done = driver::compile(&req, &mut driver::Quiet).expect("tied across stages");
    assert_eq!(done.planned.as_ref().expect("plan").best().mesh.pp, 2);
    let stage = |k: u32| {
        std::fs::read_to_string(out.join(format!("gencode/src/stage_{k}.rs"))).expect("stage file")
    };
    let (first, last) = (stage(0), stage(1));
    assert!(
        last.contains("specs.extend(blocks::head_tied_params());"),
        "{last}"
    );
    assert!(!first.contains("head_tied_params"), "{first}");
    for s in [&first, &last] {
        assert!(
            s.contains("fn pp_tied(&self) -> Vec<String>")
                && s.contains("\"transformer.wte.weight\""),
            "{s}"
        );
    }
}

#[test]
fn custom_ops_resolve_before_the_search() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut req = mini("llama-mini", 1, &dir.path().join("out"));
    req.annotations = vec!["../annotations/examples/chunked_ce.ron".into()];
    req.loss = Some("chunked_ce".into());
    req.stop_after = Some(Pass::CustomOps);
    let done = driver::compile(&req, &mut driver::Quiet).expect("resolves");
    let custom = done.custom_ops.as_ref().expect("custom ops");
    let imp = custom.0.get("chunked_ce").expect("chunked_ce resolved");
    assert!(
        imp.crate_dir
            .as_ref()
            .is_some_and(|d| d.ends_with("examples/chunked_ce")),
        "{imp:?}"
    );
    assert!(custom.to_string().contains("chunked_ce: "), "{custom}");
}

#[test]
fn bad_sizes_are_errors_not_panics() {
    let dir = tempfile::tempdir().expect("temp dir");
    for (what, edit) in [
        (
            "--seq-len",
            (|r: &mut Request| r.seq_len = Some(0)) as fn(&mut Request),
        ),
        ("--global-batch", |r| r.global_batch = Some(0)),
        ("--plan-ngpus", |r| r.plan_gpus = 0),
    ] {
        let mut req = mini("llama-mini", 2, &dir.path().join("out"));
        edit(&mut req);
        let err = driver::compile(&req, &mut driver::Quiet).expect_err(what);
        assert!(err.to_string().contains(what), "{what}: {err:#}");
    }
}

#[test]
fn dump_after_prints_a_hand_off() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("out");
    let output = Command::new(env!("CARGO_BIN_EXE_autopart"))
        .args([
            "compile",
            "--model",
            "gpt-mini",
            "--plan-ngpus",
            "2",
            "--cluster",
            "cpu",
            "--seq-len",
            "16",
            "--global-batch",
            "8",
            "--dump-after",
            "ties",
            "--dump-after",
            "search",
            "--stop-after",
            "search",
            "--out",
        ])
        .arg(&out)
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("===== after ties =====\ntied transformer.wte.weight"),
        "{stdout}"
    );
    assert!(
        stdout.contains("===== after search =====\nsearched "),
        "{stdout}"
    );
    assert!(!out.exists());

    let bad = Command::new(env!("CARGO_BIN_EXE_autopart"))
        .args(["compile", "--model", "gpt-mini", "--plan-ngpus", "1"])
        .args(["--dump-after", "optimise"])
        .output()
        .expect("runs");
    assert_eq!(bad.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("unknown pass 'optimise'"), "{stderr}");
}

/// The plan's prediction is priced for the program the binary runs
/// (`search::reprice`). With the rewrites off and a stream the lowering
/// keeps in the search's boundary layout, pricing the lowered program op by
/// op reproduces the search's own evaluation exactly, so reading the
/// layouts back onto the search's choices loses nothing; with them on, a tp
/// plan without sequence parallelism whose rewrite moves norms and residual
/// adds onto sequence shards predicts the fewer activations it keeps.
#[test]
fn the_plan_is_priced_as_its_program_runs() {
    let dir = tempfile::tempdir().expect("temp dir");
    let compile = |tp: u32, pp: u32, sp: bool, rewrite: bool| {
        let out = dir.path().join(format!("tp{tp}-pp{pp}-sp{sp}-{rewrite}"));
        let mut req = mini("llama-mini", tp * pp, &out);
        req.seq_len = Some(64);
        req.constraints.tp = Some(tp);
        req.constraints.pp = Some(pp);
        req.constraints.sequence_parallel = Some(sp);
        req.rewrite = rewrite;
        req.stop_after = Some(Pass::Lower);
        driver::compile(&req, &mut driver::Quiet).expect("compiles")
    };
    for (tp, pp, sp) in [(1, 2, false), (2, 1, true), (4, 1, false), (2, 2, true)] {
        let done = compile(tp, pp, sp, false);
        let stream = done.lowered.as_ref().map(|p| p.stream_state.fwd);
        let boundary = if sp { Layout::D(1) } else { Layout::R };
        assert_eq!(
            stream,
            Some(boundary),
            "tp{tp} pp{pp} sp {sp}: the lowered stream"
        );
        let searched = &done.searched.as_ref().expect("searched").result.plans[0].eval;
        let plan = done.planned.as_ref().expect("planned").best();
        let what = format!("tp{tp} pp{pp} sp {sp}");
        assert_eq!(plan.prediction.step_s, searched.step_s, "{what}");
        assert_eq!(
            plan.prediction.stages.len(),
            searched.stages.len(),
            "{what}"
        );
        for (p, s) in plan.prediction.stages.iter().zip(&searched.stages) {
            assert_eq!(p.memory, s.memory, "{what}");
            assert_eq!(p.micro_batch_s, s.micro_batch_s, "{what}");
        }
    }
    // The memory benchmark's tp4 row (docs/memory.txt): 1024 wide, 256 tokens.
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../benches/memory/llama-1024x8.json");
    let mut req = mini(
        model.to_str().expect("utf-8 path"),
        4,
        &dir.path().join("bench-tp4"),
    );
    req.seq_len = Some(256);
    req.global_batch = Some(4);
    req.constraints.tp = Some(4);
    req.constraints.pp = Some(1);
    req.constraints.micro_batch = Some(4);
    req.constraints.sequence_parallel = Some(false);
    req.stop_after = Some(Pass::Plan);
    let done = driver::compile(&req, &mut driver::Quiet).expect("compiles");
    let searched = &done.searched.as_ref().expect("searched").result.plans[0].eval;
    let plan = done.planned.as_ref().expect("planned").best();
    let (got, was) = (
        plan.prediction.stages[0].memory.activations_bytes,
        searched.stages[0].memory.activations_bytes,
    );
    assert!(
        got < was,
        "tp4 without sp, rewritten: {got} < {was} activation bytes"
    );
}
