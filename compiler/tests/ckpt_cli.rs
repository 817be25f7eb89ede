//! `autopart ckpt inspect|merge` on checkpoints written with the format
//! module (`autopart_vocab::ckpt`), through the real binary.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use autopart_vocab::ckpt::{
    DataPosition, Dtype, FORMAT, Manifest, OptimSettings, Piece, PlanIdentity, Region, RngState,
    State, begin, complete, copy_region, flat_range_regions, write_rank,
};
use safetensors::SafeTensors;

fn autopart(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_autopart"))
        .args(args)
        .output()
        .expect("the binary runs")
}

/// Runs a command that must succeed; returns its stdout.
fn ok(args: &[&str]) -> String {
    let out = autopart(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn json(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&ok(args)).expect("one JSON object on stdout")
}

/// Runs a command that must fail cleanly: exit 1, an `error:` line
/// containing every needle, no panic. Returns stdout.
fn fails_with(args: &[&str], needles: &[&str]) -> String {
    let out = autopart(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(stderr.contains("error:"), "{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{args:?}: {stderr} lacks {needle}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// The model: name, global shape, parameter dtype (bf16 ones have an f32
/// master copy).
const TENSORS: [(&str, &[u64], Dtype); 5] = [
    ("model.embed_tokens.weight", &[10, 3], Dtype::BF16),
    (
        "model.layers.0.self_attn.q_proj.weight",
        &[6, 4],
        Dtype::F32,
    ),
    (
        "model.layers.0.self_attn.o_proj.weight",
        &[4, 6],
        Dtype::F32,
    ),
    ("model.layers.0.mlp.experts", &[2, 3, 4], Dtype::F32),
    ("model.norm.weight", &[5], Dtype::F32),
];

const WORLD: usize = 3;

fn states(dtype: Dtype) -> Vec<State> {
    let mut out = vec![State::Param, State::ExpAvg, State::ExpAvgSq];
    if dtype != Dtype::F32 {
        out.push(State::Master);
    }
    out
}

fn state_dtype(state: State, param: Dtype) -> Dtype {
    if state == State::Param {
        param
    } else {
        Dtype::F32
    }
}

/// Element i of state `state` of tensor `t` at step `step`.
fn value(t: usize, state: State, step: u64, i: u64) -> f32 {
    let s = match state {
        State::Param => 0,
        State::Master => 1,
        State::ExpAvg => 2,
        State::ExpAvgSq => 3,
    };
    (step * 1_000_000 + s * 100_000 + (t as u64 + 1) * 1000 + i) as f32
}

/// The whole tensor's bytes. bf16 elements are small integers (exact in
/// bf16's 8-bit mantissa), all distinct: the f32's upper half.
fn full(t: usize, state: State, step: u64) -> Vec<u8> {
    let (_, shape, param) = TENSORS[t];
    let n: u64 = shape.iter().product();
    let mut out = Vec::new();
    for i in 0..n {
        match state_dtype(state, param) {
            Dtype::BF16 => {
                let v = (step * 32 + i) as f32;
                assert!(v < 256.0, "exact in bf16");
                out.extend_from_slice(&v.to_le_bytes()[2..]);
            }
            _ => out.extend_from_slice(&value(t, state, step, i).to_le_bytes()),
        }
    }
    out
}

fn rows(shape: &[u64], lo: u64, hi: u64) -> Region {
    let mut r = Region::whole(shape);
    r.offset[0] = lo;
    r.shape[0] = hi - lo;
    r
}

/// Which rank holds which regions of each tensor's state: tp shards by
/// rows and by (uneven) columns, a tensor on one rank, and ZeRO-style flat
/// ranges of the whole tensor and of a tp shard.
fn layout(t: usize, state: State) -> Vec<(usize, Region)> {
    let (name, shape, _) = TENSORS[t];
    let n: u64 = shape.iter().product();
    let thirds = || {
        let cuts = [0, n / 3, 2 * n / 3 + 1, n];
        (0..WORLD)
            .flat_map(|r| {
                flat_range_regions(shape, cuts[r], cuts[r + 1])
                    .into_iter()
                    .map(move |g| (r, g))
            })
            .collect::<Vec<_>>()
    };
    match (name, state) {
        ("model.layers.0.self_attn.q_proj.weight", State::Param) => {
            vec![(0, rows(shape, 0, 3)), (1, rows(shape, 3, 6))]
        }
        ("model.layers.0.self_attn.q_proj.weight", _) => {
            // The tp shard of rows 0..3 as two ZeRO slices on ranks 0 and 2.
            let shard = rows(shape, 0, 3);
            let mut out = Vec::new();
            for (rank, lo, hi) in [(0, 0, 5), (2, 5, 12)] {
                for g in flat_range_regions(&shard.shape, lo, hi) {
                    out.push((rank, g.shifted(&shard.offset)));
                }
            }
            out.push((1, rows(shape, 3, 6)));
            out
        }
        ("model.layers.0.self_attn.o_proj.weight", State::Param) => {
            let cols = |lo: u64, hi: u64| Region {
                offset: vec![0, lo],
                shape: vec![4, hi - lo],
            };
            vec![(0, cols(0, 2)), (1, cols(2, 6))]
        }
        ("model.norm.weight", State::Param) => vec![(2, Region::whole(shape))],
        ("model.embed_tokens.weight", State::Param) => {
            vec![(0, rows(shape, 0, 4)), (2, rows(shape, 4, 10))]
        }
        _ => thirds(),
    }
}

fn manifest(step: u64) -> Manifest {
    Manifest {
        format: FORMAT,
        autopart_version: "test".into(),
        step,
        model: "tiny-llama".into(),
        plan: PlanIdentity {
            hash: "0123abcd".into(),
            tp: 1,
            pp: 1,
            dp: 3,
            plan_gpus: 1,
            runtime_gpus: 3,
            schedule: "1f1b".into(),
            zero: 1,
            micro_batch: 2,
            micro_batches: 4,
            seq_len: 16,
            vocab: 10,
        },
        world_size: WORLD,
        optim: OptimSettings {
            peak_lr: 3e-4,
            min_lr: 3e-5,
            warmup_steps: 2,
            total_steps: 100,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            clip: Some(1.0),
        },
        optimizer_steps: step,
        data: DataPosition::Synthetic {
            seed: 7,
            next_step: step,
        },
        rng: RngState {
            seed: 7,
            note: String::new(),
        },
        created_unix: 1_700_000_000,
        tensors: BTreeMap::new(),
        files: vec![],
        model_config: None,
        loss_scale: None,
    }
}

/// The pieces rank `rank` holds at `step`.
fn pieces(rank: usize, step: u64) -> Vec<Piece> {
    let mut out = Vec::new();
    for (t, (name, shape, dtype)) in TENSORS.iter().enumerate() {
        for state in states(*dtype) {
            let dtype = state_dtype(state, *dtype);
            let whole = full(t, state, step);
            let all = Region::whole(shape);
            for (r, region) in layout(t, state) {
                if r != rank {
                    continue;
                }
                let mut data = vec![0u8; region.numel() as usize * dtype.size()];
                copy_region(&whole, &all, &mut data, &region, &region, dtype.size());
                out.push(Piece {
                    tensor: name.to_string(),
                    state,
                    global_shape: shape.to_vec(),
                    region,
                    dtype,
                    data,
                });
            }
        }
    }
    out
}

/// A complete checkpoint of `step` in `dir`.
fn save(dir: &Path, step: u64) -> PathBuf {
    let partial = begin(dir, step).expect("begin");
    for rank in 0..WORLD {
        write_rank(&partial, rank, &pieces(rank, step)).expect("write rank");
    }
    complete(dir, manifest(step), WORLD).expect("complete")
}

/// Steps 2 and 4 complete, step 6 interrupted (only rank 0 wrote), a
/// step_7 without a marker, and entries that are not checkpoints.
fn populated(dir: &Path) {
    save(dir, 2);
    save(dir, 4);
    let partial = begin(dir, 6).expect("begin");
    write_rank(&partial, 0, &pieces(0, 6)).expect("rank 0");
    fs::create_dir(dir.join("step_7")).expect("unmarked");
    fs::write(dir.join("step_7").join("rank-0.json"), b"{}").expect("write");
    fs::write(dir.join("notes.txt"), b"not a checkpoint").expect("write");
    fs::create_dir(dir.join("logs")).expect("dir");
}

fn on_disk(path: &Path) -> u64 {
    fs::read_dir(path)
        .expect("list")
        .map(|e| e.expect("entry").metadata().expect("meta").len())
        .sum()
}

#[test]
fn inspect_lists_a_checkpoint_dir_and_what_resume_latest_loads() {
    let tmp = tempfile::tempdir().expect("temp");
    let dir = tmp.path();
    populated(dir);
    let text = ok(&["ckpt", "inspect", &s(dir)]);
    let line = |step: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(&format!("{step} ")))
            .unwrap_or_else(|| panic!("no row for step {step} in\n{text}"))
            .to_string()
    };
    for step in ["2", "4"] {
        let l = line(step);
        for want in [
            "complete",
            "tiny-llama",
            "tp1 pp1 dp3 zero1 1f1b",
            "2023-11-14 22:13:20 UTC",
        ] {
            assert!(l.contains(want), "{l} lacks {want}");
        }
    }
    assert!(
        line("6").contains("incomplete (save interrupted)"),
        "{text}"
    );
    assert!(
        line("7").contains("incomplete (no COMPLETE marker)"),
        "{text}"
    );
    assert!(
        !text.contains("notes.txt") && !text.contains("logs"),
        "{text}"
    );
    let resume = text
        .lines()
        .find(|l| l.starts_with("--resume latest"))
        .expect("a resume line");
    assert!(resume.contains(&s(&dir.join("step_4"))), "{resume}");
    assert!(
        resume.contains("step 6 (save interrupted)") && resume.contains("step 7"),
        "{resume}"
    );

    let v = json(&["ckpt", "inspect", &s(dir), "--json"]);
    let cks = v["checkpoints"].as_array().expect("checkpoints");
    let steps: Vec<u64> = cks.iter().filter_map(|c| c["step"].as_u64()).collect();
    assert_eq!(steps, vec![2, 4, 6, 7], "{v}");
    let statuses: Vec<&str> = cks.iter().filter_map(|c| c["status"].as_str()).collect();
    assert_eq!(
        statuses,
        vec!["complete", "complete", "partial", "unmarked"],
        "{v}"
    );
    assert_eq!(cks[1]["path"], s(&dir.join("step_4")).as_str());
    assert_eq!(cks[1]["bytes"].as_u64(), Some(on_disk(&dir.join("step_4"))));
    assert_eq!(cks[1]["model"], "tiny-llama");
    assert_eq!(cks[1]["plan"], "tp1 pp1 dp3 zero1 1f1b");
    assert_eq!(cks[1]["world_size"].as_u64(), Some(3));
    assert_eq!(cks[1]["created_unix"].as_u64(), Some(1_700_000_000));
    assert_eq!(cks[2]["status_text"], "incomplete (save interrupted)");
    assert!(cks[2]["model"].is_null() && cks[2]["bytes"].as_u64() > Some(0));
    assert_eq!(v["latest"]["step"].as_u64(), Some(4), "{v}");
    assert_eq!(v["latest"]["path"], s(&dir.join("step_4")).as_str());
    let skipped: Vec<u64> = v["skipped"]
        .as_array()
        .expect("skipped")
        .iter()
        .filter_map(|c| c["step"].as_u64())
        .collect();
    assert_eq!(skipped, vec![6, 7]);

    // --verify over the directory checks every complete checkpoint.
    let v = json(&["ckpt", "inspect", &s(dir), "--json", "--verify"]);
    assert_eq!(v["checkpoints"][0]["verified"], true, "{v}");
    assert_eq!(v["checkpoints"][1]["verified"], true, "{v}");
    assert!(v["checkpoints"][2].get("verified").is_none(), "{v}");
    let text = ok(&["ckpt", "inspect", &s(dir), "--verify"]);
    assert!(text.contains("OK"), "{text}");

    // Nothing complete: the resume line says so.
    let tmp2 = tempfile::tempdir().expect("temp");
    let partial = begin(tmp2.path(), 3).expect("begin");
    write_rank(&partial, 0, &pieces(0, 3)).expect("rank 0");
    let text = ok(&["ckpt", "inspect", &s(tmp2.path())]);
    assert!(text.contains("no complete checkpoint"), "{text}");
    let v = json(&["ckpt", "inspect", &s(tmp2.path()), "--json"]);
    assert!(v["latest"].is_null(), "{v}");
}

#[test]
fn inspect_summarises_one_checkpoint_and_verifies_it() {
    let tmp = tempfile::tempdir().expect("temp");
    let step = save(tmp.path(), 4);
    let text = ok(&["ckpt", "inspect", &s(&step)]);
    for want in [
        "tiny-llama",
        "tp1 pp1 dp3 zero1 1f1b, world size 3",
        "plan hash 0123abcd",
        "AdamW lr 3e-4 -> 3e-5",
        "eps 1e-8",
        "clip 1",
        "synthetic tokens (seed 7), next step 4",
        "rank-2.safetensors",
        "rank-0.json",
        "2023-11-14 22:13:20 UTC",
    ] {
        assert!(text.contains(want), "{text}\nlacks {want}");
    }
    assert!(!text.contains("verify"), "{text}");
    let row = |name: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no row for {name} in\n{text}"))
            .to_string()
    };
    let embed = row("model.embed_tokens.weight");
    for want in ["[10, 3]", "bf16", "param, master, exp_avg, exp_avg_sq"] {
        assert!(embed.contains(want), "{embed} lacks {want}");
    }
    let experts = row("model.layers.0.mlp.experts");
    for want in ["[2, 3, 4]", "f32", "param, exp_avg, exp_avg_sq"] {
        assert!(experts.contains(want), "{experts} lacks {want}");
    }
    assert!(!experts.contains("master"), "{experts}");

    let text = ok(&["ckpt", "inspect", &s(&step), "--verify"]);
    assert!(text.contains("OK (6 files match their CRC-32"), "{text}");

    let v = json(&["ckpt", "inspect", &s(&step), "--json"]);
    assert!(v["verified"].is_null(), "{v}");
    assert_eq!(v["step"].as_u64(), Some(4));
    assert_eq!(v["model"], "tiny-llama");
    assert_eq!(v["world_size"].as_u64(), Some(3));
    assert_eq!(v["plan"]["dp"].as_u64(), Some(3));
    assert_eq!(v["plan"]["schedule"], "1f1b");
    assert_eq!(v["optim"]["beta2"].as_f64(), Some(0.95));
    assert_eq!(v["data"]["source"], "synthetic");
    assert_eq!(v["files"].as_array().map(Vec::len), Some(6));
    assert_eq!(v["path"], s(&step).as_str());
    let embed = &v["tensors"]["model.embed_tokens.weight"];
    assert_eq!(embed["shape"], serde_json::json!([10, 3]), "{v}");
    assert_eq!(embed["dtype"], "BF16");
    assert_eq!(
        embed["states"],
        serde_json::json!(["param", "master", "exp_avg", "exp_avg_sq"])
    );
    let v = json(&["ckpt", "inspect", &s(&step), "--json", "--verify"]);
    assert_eq!(v["verified"], true, "{v}");
}

/// Reads a merged file: its tensors' (dtype, shape, bytes) and metadata.
type Tensors = BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>;

fn read_merged(path: &Path) -> (Tensors, BTreeMap<String, String>) {
    let bytes = fs::read(path).expect("merged file");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    assert_eq!(n % 8, 0, "the header is padded to 8 bytes");
    let (_, meta) = SafeTensors::read_metadata(&bytes).expect("a valid header");
    let metadata = meta
        .metadata()
        .clone()
        .expect("__metadata__")
        .into_iter()
        .collect();
    let st = SafeTensors::deserialize(&bytes).expect("a valid safetensors file");
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            (
                name,
                (view.dtype(), view.shape().to_vec(), view.data().to_vec()),
            )
        })
        .collect();
    (tensors, metadata)
}

fn st_dtype(d: Dtype) -> safetensors::Dtype {
    match d {
        Dtype::F32 => safetensors::Dtype::F32,
        Dtype::F64 => safetensors::Dtype::F64,
        Dtype::BF16 => safetensors::Dtype::BF16,
        Dtype::F16 => safetensors::Dtype::F16,
    }
}

fn no_temporaries(dir: &Path) {
    let names: Vec<String> = fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| !n.ends_with(".tmp")),
        "temporary files left: {names:?}"
    );
}

#[test]
fn merge_writes_every_tensor_whole_under_its_name() {
    let tmp = tempfile::tempdir().expect("temp");
    let step = save(&tmp.path().join("ck"), 4);
    let out = tmp.path().join("merged.safetensors");
    let text = ok(&["ckpt", "merge", &s(&step), "--out", &s(&out)]);
    assert!(
        text.contains("wrote") && text.contains("5 tensors"),
        "{text}"
    );
    let (tensors, metadata) = read_merged(&out);
    let names: BTreeSet<&str> = tensors.keys().map(String::as_str).collect();
    let want: BTreeSet<&str> = TENSORS.iter().map(|t| t.0).collect();
    assert_eq!(names, want);
    for (t, (name, shape, dtype)) in TENSORS.iter().enumerate() {
        let (got_dtype, got_shape, data) = &tensors[*name];
        assert_eq!(*got_dtype, st_dtype(*dtype), "{name}");
        let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        assert_eq!(*got_shape, shape, "{name}");
        assert_eq!(*data, full(t, State::Param, 4), "{name}");
    }
    // Element (1, 2) of q_proj (flat 6), held by rank 0, and (4, 3) (flat
    // 19), held by rank 1; the f32 values themselves.
    let q = &tensors["model.layers.0.self_attn.q_proj.weight"].2;
    let at = |i: usize| f32::from_le_bytes(q[4 * i..4 * i + 4].try_into().expect("4 bytes"));
    assert_eq!(at(6), value(1, State::Param, 4, 6));
    assert_eq!(at(19), value(1, State::Param, 4, 19));
    assert_eq!(metadata["format"], "pt");
    assert_eq!(metadata["step"], "4");
    assert_eq!(metadata["model"], "tiny-llama");
    assert_eq!(metadata["checkpoint_format"], FORMAT.to_string());
    no_temporaries(tmp.path());

    // With the optimizer: moments of every tensor, masters of bf16 ones.
    let text = ok(&[
        "ckpt",
        "merge",
        &s(&step),
        "--out",
        &s(&out),
        "--with-optimizer",
    ]);
    assert!(text.contains("11 optimizer states"), "{text}");
    let (tensors, metadata) = read_merged(&out);
    assert_eq!(tensors.len(), 5 + 5 + 5 + 1);
    assert_eq!(metadata["with_optimizer"], "true");
    for (t, (name, shape, dtype)) in TENSORS.iter().enumerate() {
        for state in states(*dtype) {
            let key = match state {
                State::Param => name.to_string(),
                _ => format!("optimizer/{}/{name}", state.name()),
            };
            let (got_dtype, got_shape, data) = tensors
                .get(&key)
                .unwrap_or_else(|| panic!("no {key} in {:?}", tensors.keys()));
            assert_eq!(*got_dtype, st_dtype(state_dtype(state, *dtype)), "{key}");
            assert_eq!(got_shape.len(), shape.len(), "{key}");
            assert_eq!(*data, full(t, state, 4), "{key}");
        }
    }
    assert!(tensors.contains_key("optimizer/master/model.embed_tokens.weight"));
    assert!(!tensors.contains_key("optimizer/master/model.norm.weight"));
    no_temporaries(tmp.path());
}

#[test]
fn damaged_shards_fail_naming_the_file_and_leave_no_half_output() {
    let tmp = tempfile::tempdir().expect("temp");
    let step = save(&tmp.path().join("ck"), 4);
    let out = tmp.path().join("merged.safetensors");
    fs::write(&out, b"old").expect("an older output");
    let file = step.join("rank-1.safetensors");
    let mut bytes = fs::read(&file).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    fs::write(&file, &bytes).expect("corrupt");

    // Without --verify only the sizes are looked at: it still reads.
    ok(&["ckpt", "inspect", &s(&step)]);
    let stdout = fails_with(
        &["ckpt", "inspect", &s(&step), "--verify"],
        &["checksum mismatch", "rank-1.safetensors"],
    );
    assert!(stdout.contains("FAILED"), "{stdout}");
    let stdout = fails_with(
        &["ckpt", "inspect", &s(&step), "--verify", "--json"],
        &["rank-1.safetensors"],
    );
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("JSON even so");
    assert_eq!(v["verified"], false, "{v}");
    assert!(
        v["verify_error"]
            .as_str()
            .is_some_and(|e| e.contains("rank-1.safetensors")),
        "{v}"
    );
    fails_with(
        &[
            "ckpt",
            "inspect",
            &s(step.parent().expect("dir")),
            "--verify",
        ],
        &["failed verification", "rank-1.safetensors"],
    );
    fails_with(
        &[
            "ckpt",
            "merge",
            &s(&step),
            "--out",
            &s(&out),
            "--with-optimizer",
        ],
        &[
            "checksum mismatch",
            "rank-1.safetensors",
            "merged.safetensors",
        ],
    );
    assert_eq!(fs::read(&out).expect("kept"), b"old");
    no_temporaries(tmp.path());

    bytes.truncate(last - 7);
    fs::write(&file, &bytes).expect("truncate");
    let text = ok(&["ckpt", "inspect", &s(&step)]);
    assert!(text.contains("truncated or replaced"), "{text}");
    fails_with(
        &["ckpt", "inspect", &s(&step), "--verify"],
        &["rank-1.safetensors", "truncated"],
    );
    fails_with(
        &["ckpt", "merge", &s(&step), "--out", &s(&out)],
        &["rank-1.safetensors", "truncated"],
    );
    assert_eq!(fs::read(&out).expect("kept"), b"old");
    no_temporaries(tmp.path());
}

#[test]
fn incomplete_missing_and_foreign_paths_fail_cleanly() {
    let tmp = tempfile::tempdir().expect("temp");
    let dir = tmp.path().join("ck");
    populated(&dir);
    let out = tmp.path().join("merged.safetensors");
    let out_s = s(&out);
    let partial = s(&dir.join("step_6.partial"));
    let unmarked = s(&dir.join("step_7"));
    fails_with(
        &["ckpt", "inspect", &partial],
        &["step_6.partial", "not a complete checkpoint", "interrupted"],
    );
    fails_with(
        &["ckpt", "inspect", &unmarked, "--json"],
        &["step_7", "no COMPLETE"],
    );
    fails_with(
        &["ckpt", "merge", &partial, "--out", &out_s],
        &["step_6.partial", "interrupted"],
    );
    fails_with(
        &["ckpt", "merge", &unmarked, "--out", &out_s],
        &["step_7", "no COMPLETE"],
    );
    // A removal cut short after its rename: the marker is there, but it is
    // going away.
    fs::rename(dir.join("step_2"), dir.join("step_2.deleting")).expect("rename");
    fails_with(
        &["ckpt", "inspect", &s(&dir.join("step_2.deleting"))],
        &["step_2.deleting", "being deleted"],
    );
    let text = ok(&["ckpt", "inspect", &s(&dir)]);
    assert!(text.contains("being deleted"), "{text}");
    fails_with(
        &["ckpt", "merge", &s(&dir), "--out", &out_s],
        &["checkpoint directory", "step_4"],
    );
    let missing = s(&tmp.path().join("nowhere"));
    fails_with(&["ckpt", "inspect", &missing], &["nowhere", "No such file"]);
    fails_with(
        &["ckpt", "merge", &missing, "--out", &out_s],
        &["nowhere", "No such file"],
    );
    let foreign = tmp.path().join("foreign");
    fs::create_dir(&foreign).expect("dir");
    fs::write(foreign.join("model.bin"), b"x").expect("write");
    fails_with(
        &["ckpt", "inspect", &s(&foreign)],
        &["foreign", "holds no checkpoint"],
    );
    fails_with(
        &["ckpt", "inspect", &s(&foreign.join("model.bin"))],
        &["model.bin", "is a file"],
    );
    fails_with(
        &[
            "ckpt",
            "merge",
            &s(&dir.join("step_4")),
            "--out",
            &s(&tmp.path().join("no/such/dir/m.safetensors")),
        ],
        &["writing", "m.safetensors"],
    );
    assert!(!out.exists());
}

#[test]
fn pieces_that_overlap_are_refused_not_merged_with_a_gap() {
    // Rank 1 saved q_proj's rows 0..3 where rows 3..6 belong (a shard
    // offset bug): the element count still adds up.
    let tmp = tempfile::tempdir().expect("temp");
    let dir = tmp.path().join("ck");
    let partial = begin(&dir, 4).expect("begin");
    for rank in 0..WORLD {
        let mut pieces = pieces(rank, 4);
        for p in &mut pieces {
            if p.tensor == "model.layers.0.self_attn.q_proj.weight"
                && p.state == State::Param
                && rank == 1
            {
                p.region = rows(&p.global_shape, 0, 3);
            }
        }
        write_rank(&partial, rank, &pieces).expect("write rank");
    }
    let err = complete(&dir, manifest(4), WORLD).expect_err("the format refuses overlaps");
    assert!(err.to_string().contains("overlap"), "{err}");
    assert!(err.to_string().contains("[0..3, 0..4]"), "{err}");
    // Nothing is marked: the folder stays an interrupted save.
    fails_with(&["ckpt", "inspect", &s(&partial)], &["interrupted"]);
    // Reading refuses overlaps too (vocab's ckpt tests); merge and --verify open through it.
}
