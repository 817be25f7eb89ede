use super::*;

/// A 6x4 f32 tensor whose element (i, j) is 100 i + j.
fn values(shape: &[u64], region: &Region) -> Vec<u8> {
    let mut out = Vec::new();
    let cols = shape[1];
    for i in region.offset[0]..region.offset[0] + region.shape[0] {
        for j in region.offset[1]..region.offset[1] + region.shape[1] {
            out.extend_from_slice(&((100 * i + j) as f32).to_le_bytes());
        }
    }
    let _ = cols;
    out
}

fn piece(tensor: &str, state: State, shape: &[u64], region: Region) -> Piece {
    Piece {
        tensor: tensor.into(),
        state,
        global_shape: shape.to_vec(),
        data: values(shape, &region),
        region,
        dtype: Dtype::F32,
    }
}

fn manifest(step: u64, world: usize) -> Manifest {
    Manifest {
        format: FORMAT,
        autopart_version: "test".into(),
        step,
        model: "tiny".into(),
        plan: PlanIdentity {
            hash: String::new(),
            tp: 2,
            pp: 1,
            dp: 1,
            plan_gpus: 2,
            runtime_gpus: 2,
            schedule: "1f1b".into(),
            zero: 1,
            micro_batch: 1,
            micro_batches: 1,
            seq_len: 8,
            vocab: 16,
        },
        world_size: world,
        optim: OptimSettings {
            peak_lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 0,
            total_steps: 10,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            clip: Some(1.0),
        },
        optimizer_steps: step,
        data: DataPosition::Synthetic {
            seed: 0,
            next_step: step,
        },
        rng: RngState {
            seed: 0,
            note: String::new(),
        },
        created_unix: 0,
        tensors: BTreeMap::new(),
        files: vec![],
        model_config: None,
        loss_scale: None,
    }
}

const SHAPE: [u64; 2] = [6, 4];

/// Two ranks: rank 0 the tp shard rows 0..3 as two ZeRO flat slices
/// (flat ranges 0..5 and 5..12 of the shard), rank 1 rows 3..6 whole.
fn save(dir: &Path, step: u64) -> PathBuf {
    let partial = begin(dir, step).expect("begin");
    let shard0 = Region {
        offset: vec![0, 0],
        shape: vec![3, 4],
    };
    let mut rank0 = Vec::new();
    for (lo, hi) in [(0, 5), (5, 12)] {
        for r in flat_range_regions(&shard0.shape, lo, hi) {
            rank0.push(piece("w", State::Param, &SHAPE, r.shifted(&shard0.offset)));
        }
    }
    let rank1 = vec![piece(
        "w",
        State::Param,
        &SHAPE,
        Region {
            offset: vec![3, 0],
            shape: vec![3, 4],
        },
    )];
    write_rank(&partial, 0, &rank0).expect("rank 0");
    write_rank(&partial, 1, &rank1).expect("rank 1");
    complete(dir, manifest(step, 2), 2).expect("complete")
}

#[test]
fn any_region_reads_back_from_pieces_of_another_layout() {
    let tmp = tempfile::tempdir().expect("temp");
    let path = save(tmp.path(), 5);
    assert_eq!(path, step_dir(tmp.path(), 5));
    let ck = Checkpoint::open(&path).expect("open");
    assert_eq!(ck.manifest.tensors["w"].shape, SHAPE.to_vec());
    assert_eq!(ck.manifest.tensors["w"].states, vec![State::Param]);
    assert_eq!(ck.manifest.files.len(), 4);
    ck.verify().expect("checksums");
    // Column shards (another tp dim) and a ZeRO slice across the row split.
    for region in [
        Region::whole(&SHAPE),
        Region {
            offset: vec![0, 2],
            shape: vec![6, 2],
        },
        Region {
            offset: vec![2, 1],
            shape: vec![2, 1],
        },
    ] {
        let (dtype, bytes) = ck.read_region("w", State::Param, &region).expect("read");
        assert_eq!(dtype, Dtype::F32);
        assert_eq!(bytes, values(&SHAPE, &region), "{region}");
    }
    assert!(ck.has("w", State::Param) && !ck.has("w", State::ExpAvg));
    let err = ck.check_shape("w", &[4, 6]).expect_err("other shape");
    assert!(err.to_string().contains("[6, 4]"), "{err}");
    let err = ck.shape("v").expect_err("missing");
    assert!(err.to_string().contains("no tensor v"), "{err}");
    assert!(
        ck.read_region("w", State::ExpAvg, &Region::whole(&SHAPE))
            .is_err()
    );
}

#[test]
fn corrupt_and_truncated_shards_are_named() {
    let tmp = tempfile::tempdir().expect("temp");
    let path = save(tmp.path(), 1);
    let file = path.join(rank_file(1));
    let mut bytes = fs::read(&file).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    fs::write(&file, &bytes).expect("corrupt");
    let ck = Checkpoint::open(&path).expect("sizes still match");
    let err = ck
        .read_region("w", State::Param, &Region::whole(&SHAPE))
        .expect_err("bad crc");
    assert!(matches!(err, CkptError::Checksum { .. }), "{err}");
    assert!(err.to_string().contains("rank-1.safetensors"), "{err}");
    assert!(ck.verify().is_err());
    // Rows of rank 0 alone still read.
    let top = Region {
        offset: vec![0, 0],
        shape: vec![3, 4],
    };
    assert!(ck.read_region("w", State::Param, &top).is_ok());
    bytes.truncate(last - 7);
    fs::write(&file, &bytes).expect("truncate");
    let err = Checkpoint::open(&path).expect_err("truncated");
    assert!(matches!(err, CkptError::Size { .. }), "{err}");
    assert!(err.to_string().contains("truncated"), "{err}");
}

#[test]
fn only_marked_folders_load_and_keep_removes_the_oldest() {
    let tmp = tempfile::tempdir().expect("temp");
    let dir = tmp.path();
    assert_eq!(
        resolve(&Resume::Auto, Some(dir)).expect("auto"),
        Resolved {
            path: None,
            skipped: vec![]
        }
    );
    assert!(matches!(
        resolve(&Resume::Latest, Some(dir)),
        Err(CkptError::NoCheckpoint { .. })
    ));
    for step in [2, 4, 6] {
        save(dir, step);
    }
    // An interrupted save of step 8 and a hand-made step_9 without a marker.
    let partial = begin(dir, 8).expect("begin");
    let top = Region {
        offset: vec![0, 0],
        shape: vec![3, 4],
    };
    write_rank(&partial, 0, &[piece("w", State::Param, &SHAPE, top)]).expect("rank 0 only");
    fs::create_dir(dir.join("step_9")).expect("unmarked");
    fs::create_dir(dir.join("unrelated")).expect("other");
    let listed: Vec<(u64, Status)> = list(dir)
        .expect("list")
        .iter()
        .map(|l| (l.step, l.status))
        .collect();
    assert_eq!(
        listed,
        vec![
            (2, Status::Complete),
            (4, Status::Complete),
            (6, Status::Complete),
            (8, Status::Partial),
            (9, Status::Unmarked)
        ]
    );
    let r = resolve(&Resume::Latest, Some(dir)).expect("latest");
    assert_eq!(r.path, Some(step_dir(dir, 6)));
    assert_eq!(
        r.skipped.iter().map(|l| l.step).collect::<Vec<_>>(),
        vec![8, 9]
    );
    assert_eq!(
        resolve(&Resume::Step(4), Some(dir)).expect("step").path,
        Some(step_dir(dir, 4))
    );
    for bad in [Resume::Step(8), Resume::Step(9), Resume::Step(3)] {
        assert!(
            matches!(resolve(&bad, Some(dir)), Err(CkptError::Incomplete { .. })),
            "{bad:?}"
        );
    }
    assert!(resolve(&Resume::Path(partial_dir(dir, 8)), None).is_err());
    assert!(resolve(&Resume::Latest, None).is_err());
    // The coverage check: rank 0 alone does not cover w.
    let err = complete(dir, manifest(8, 1), 1).expect_err("half");
    assert!(err.to_string().contains("elements"), "{err}");
    // A removal cut short after its rename leaves nothing that loads.
    fs::rename(step_dir(dir, 2), dir.join("step_2.deleting")).expect("rename");
    let err = resolve(&Resume::Path(dir.join("step_2.deleting")), None).expect_err("deleting");
    assert!(err.to_string().contains("being deleted"), "{err}");
    assert_eq!(prune(dir, 1).expect("prune"), vec![4]);
    let left: Vec<(u64, Status)> = list(dir)
        .expect("list")
        .iter()
        .map(|l| (l.step, l.status))
        .collect();
    assert_eq!(
        left,
        vec![
            (6, Status::Complete),
            (8, Status::Partial),
            (9, Status::Unmarked)
        ]
    );
    // A new save of step 6 replaces the old one; the parse of --resume.
    save(dir, 6);
    assert!(!dir.join("step_6.deleting").exists());
    // A run restarting at step 5 moves the later ones aside.
    let moved = supersede(dir, 5).expect("supersede");
    assert_eq!(moved.iter().map(|m| m.0).collect::<Vec<_>>(), vec![6, 9]);
    assert!(moved.iter().all(|(_, p)| p.is_dir()));
    assert_eq!(
        list(dir)
            .expect("list")
            .iter()
            .map(|l| l.step)
            .collect::<Vec<_>>(),
        vec![8]
    );
    save(dir, 6);
    assert!(Checkpoint::open(&step_dir(dir, 6)).is_ok());
    assert_eq!("auto".parse(), Ok(Resume::Auto));
    assert_eq!("12".parse(), Ok(Resume::Step(12)));
    assert_eq!("ck/step_3".parse(), Ok(Resume::Path("ck/step_3".into())));
}

#[test]
fn overlapping_pieces_are_refused_even_when_the_counts_add_up() {
    let tmp = tempfile::tempdir().expect("temp");
    let dir = tmp.path();
    let partial = begin(dir, 1).expect("begin");
    let rows = |from: u64, n: u64| Region {
        offset: vec![from, 0],
        shape: vec![n, 4],
    };
    // Rows 0..3 twice (a shard-offset bug) and never rows 3..6: 24 elements.
    write_rank(&partial, 0, &[piece("w", State::Param, &SHAPE, rows(0, 3))]).expect("rank 0");
    write_rank(&partial, 1, &[piece("w", State::Param, &SHAPE, rows(0, 3))]).expect("rank 1");
    let err = complete(dir, manifest(1, 2), 2).expect_err("overlap");
    assert!(err.to_string().contains("overlap"), "{err}");
    assert!(!step_dir(dir, 1).exists());
    // Marked by hand anyway: opening refuses it too.
    let mut m = manifest(1, 2);
    m.tensors.insert(
        "w".into(),
        TensorInfo {
            shape: SHAPE.to_vec(),
            dtype: Dtype::F32,
            states: vec![State::Param],
        },
    );
    fs::write(partial.join(MARKER), serde_json::to_vec(&m).expect("json")).expect("marker");
    fs::rename(&partial, step_dir(dir, 1)).expect("rename");
    let err = Checkpoint::open(&step_dir(dir, 1)).expect_err("overlap");
    assert!(err.to_string().contains("overlap"), "{err}");
}

#[test]
fn hostile_indexes_are_errors_not_panics() {
    let tmp = tempfile::tempdir().expect("temp");
    let path = save(tmp.path(), 3);
    let index = path.join(rank_index_file(1));
    let good = fs::read_to_string(&index).expect("index");
    for (from, to) in [
        // A region with fewer dims than its offset.
        (
            "\"shape\": [\n          3,\n          4\n        ]",
            "\"shape\": [\n          3\n        ]",
        ),
        // A region past the end of the tensor, by overflow.
        (
            "\"offset\": [\n          3,",
            "\"offset\": [\n          18446744073709551615,",
        ),
        // Another rank's file.
        (
            "\"file\": \"rank-1.safetensors\"",
            "\"file\": \"../../etc/passwd\"",
        ),
        ("\"rank\": 1", "\"rank\": 0"),
    ] {
        assert!(good.contains(from), "{from} not in\n{good}");
        fs::write(&index, good.replace(from, to)).expect("write");
        // The manifest's CRC of the index catches any edit at open; the
        // index's own checks catch these without it.
        assert!(matches!(
            Checkpoint::open(&path),
            Err(CkptError::Checksum { .. })
        ));
        match read_index(&index) {
            Err(CkptError::Format { msg, .. }) => assert!(!msg.is_empty()),
            Ok(i) => assert_ne!(i.rank, 1, "{from}: accepted"),
            Err(e) => panic!("{from}: {e}"),
        }
    }
}

#[test]
fn data_positions_round_trip_under_their_source_tag() {
    let prepared = DataPosition::Prepared {
        path: "data/train".into(),
        rows: 1865,
        tokens_fnv1a: "9fc865c0365c7924".into(),
        seed: 7,
        next_step: 5,
    };
    let json = serde_json::to_value(&prepared).expect("serialise");
    assert_eq!(
        json,
        serde_json::json!({
            "source": "prepared",
            "path": "data/train",
            "rows": 1865,
            "tokens_fnv1a": "9fc865c0365c7924",
            "seed": 7,
            "next_step": 5,
        })
    );
    let back: DataPosition = serde_json::from_value(json).expect("parse");
    assert_eq!(back, prepared);
    // A manifest written before prepared folders existed still reads.
    let old = serde_json::json!({"source": "tokens", "path": "t.bin", "tokens": 9, "dtype": "u16", "next_step": 1});
    assert!(matches!(
        serde_json::from_value::<DataPosition>(old),
        Ok(DataPosition::Tokens { tokens: 9, .. })
    ));
    let incomplete =
        serde_json::json!({"source": "prepared", "path": "d", "rows": 1, "next_step": 0});
    assert!(
        serde_json::from_value::<DataPosition>(incomplete).is_err(),
        "missing fields"
    );
}
