use super::*;

fn layout(seq_len: u64, mask: bool) -> Layout {
    Layout {
        vocab_size: 100,
        seq_len,
        eos_id: 0,
        pad_id: 99,
        mask,
    }
}

fn tokenizer() -> TokenizerInfo {
    TokenizerInfo {
        file: "tokenizer.json".into(),
        fnv1a: "0000000000000000".into(),
        vocab_size: 100,
        eos_id: 0,
        eos_token: "</s>".into(),
        pad_id: 99,
        pad_token: "<pad>".into(),
    }
}

fn instruction(rows: RowLayout) -> Format {
    Format::Instruction {
        template: "{instruction}".into(),
        instruction_field: "instruction".into(),
        context_field: "context".into(),
        response_field: "response".into(),
        rows,
    }
}

fn rows_of(data: &PreparedData) -> Vec<Row> {
    (0..data.rows())
        .map(|i| data.row(i).expect("row"))
        .collect()
}

#[test]
fn packed_rows_share_their_boundary_token_and_index_documents() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("out");
    let mut w = begin(&dir, layout(3, false), false).expect("begin");
    w.push_document(&[1, 2, 3], &[]).expect("doc");
    w.push_document(&[4, 5], &[]).expect("doc");
    w.push_document(&[6, 7, 8], &[]).expect("doc");
    // Stream 1 2 3 0 | 4 5 0 | 6 7 8 0: rows [1 2 3 0] [0 4 5 0] [0 6 7 8],
    // the last EOS is left over (no label after it in a full row).
    let (path, m) = w
        .finish(Format::Text, tokenizer(), vec![], LastRow::Drop)
        .expect("finish");
    assert_eq!(path, dir);
    assert!(!partial_dir(&dir).exists());
    assert_eq!(m.dtype, TokenDtype::U16);
    let c = &m.counts;
    assert_eq!(
        (
            c.rows,
            c.tokens,
            c.loss_tokens,
            c.masked_tokens,
            c.documents
        ),
        (3, 10, 9, 0, 3)
    );
    assert_eq!((c.tokens_dropped, c.documents_dropped), (1, 0));
    assert!(!m.has_mask());
    let data = PreparedData::open(&dir).expect("open");
    let rows = rows_of(&data);
    assert_eq!(rows[0].tokens, vec![1, 2, 3]);
    assert_eq!(rows[0].labels, vec![2, 3, 0]);
    assert_eq!(rows[1].tokens, vec![0, 4, 5]);
    assert_eq!(rows[2].labels, vec![6, 7, 8]);
    assert!(rows.iter().all(|r| r.mask == vec![1, 1, 1]));
    // Documents start at row 0 col 0, row 1 col 1, row 2 col 1.
    assert_eq!(data.documents().expect("docs"), vec![0, 5, 9]);
    data.verify().expect("verify");
    assert_eq!(
        fs::metadata(dir.join(TOKENS)).expect("tokens").len(),
        3 * 4 * 2
    );
}

#[test]
fn a_padded_last_row_masks_the_padding() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("out");
    let mut w = begin(&dir, layout(4, true), false).expect("begin");
    w.push_document(&[1, 2, 3, 4, 5, 6], &[]).expect("doc");
    // 1..6 0: row [1 2 3 4 5], rest [5 6 0] padded to [5 6 0 99 99].
    let (_, m) = w
        .finish(Format::Text, tokenizer(), vec![], LastRow::Pad)
        .expect("finish");
    let c = &m.counts;
    assert_eq!((c.rows, c.tokens, c.pad_tokens), (2, 7, 2));
    assert_eq!((c.loss_tokens, c.masked_tokens), (6, 2));
    let data = PreparedData::open(&dir).expect("open");
    let r = data.row(1).expect("row 1");
    assert_eq!(r.tokens, vec![5, 6, 0, 99]);
    assert_eq!(r.labels, vec![6, 0, 99, 99]);
    assert_eq!(r.mask, vec![1, 1, 0, 0]);
    data.verify().expect("verify");
}

#[test]
fn padded_records_carry_their_mask_and_overlong_ones_are_dropped() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("out");
    let mut w = begin(&dir, layout(4, true), false).expect("begin");
    // prompt 10 11, response 12, EOS.
    assert!(
        w.push_padded(&[10, 11, 12, 0], &[false, false, true, true])
            .expect("fits")
    );
    assert!(!w.push_padded(&[1; 6], &[true; 6]).expect("too long"));
    assert!(
        w.push_padded(&[20, 21, 22, 23, 0], &[false, true, true, true, true])
            .expect("exactly a row")
    );
    let (_, m) = w
        .finish(
            instruction(RowLayout::Padded),
            tokenizer(),
            vec![],
            LastRow::Drop,
        )
        .expect("finish");
    let c = &m.counts;
    assert_eq!((c.rows, c.documents, c.documents_dropped), (2, 2, 1));
    assert_eq!((c.tokens, c.tokens_dropped, c.pad_tokens), (9, 6, 1));
    assert_eq!((c.loss_tokens, c.masked_tokens), (6, 2));
    let data = PreparedData::open(&dir).expect("open");
    let r = data.row(0).expect("row 0");
    assert_eq!(r.labels, vec![11, 12, 0, 99]);
    assert_eq!(r.mask, vec![0, 1, 1, 0]);
    let r = data.row(1).expect("row 1");
    assert_eq!(r.mask, vec![1, 1, 1, 1]);
    assert_eq!(data.documents().expect("docs"), vec![0, 5]);
    data.verify().expect("verify");
}

#[test]
fn packed_instruction_flags_follow_the_labels() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("out");
    let mut w = begin(&dir, layout(3, true), false).expect("begin");
    w.push_document(&[10, 11, 12], &[false, false, true])
        .expect("record");
    w.push_document(&[20, 21], &[false, true]).expect("record");
    // Stream 10 11 12 0 20 21 0 with flags 0 0 1 1 0 1 1:
    // rows [10 11 12 0] [0 20 21 0].
    w.finish(
        instruction(RowLayout::Packed),
        tokenizer(),
        vec![],
        LastRow::Drop,
    )
    .expect("finish");
    let data = PreparedData::open(&dir).expect("open");
    assert_eq!(data.row(0).expect("row").mask, vec![0, 1, 1]);
    assert_eq!(data.row(1).expect("row").mask, vec![0, 1, 1]);
}

#[test]
fn an_existing_folder_needs_force_and_is_replaced_whole() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("out");
    let write = |ids: &[u32], force| -> Result<Manifest, DataError> {
        let mut w = begin(&dir, layout(2, false), force)?;
        w.push_document(ids, &[])?;
        Ok(w.finish(Format::Text, tokenizer(), vec![], LastRow::Drop)?
            .1)
    };
    write(&[1, 2, 3], false).expect("first");
    let err = write(&[4, 5, 6], false).expect_err("exists");
    assert!(matches!(err, DataError::Exists { .. }), "{err}");
    assert!(err.to_string().contains("--force"), "{err}");
    assert_eq!(
        PreparedData::open(&dir)
            .expect("old")
            .row(0)
            .expect("row")
            .tokens,
        vec![1, 2]
    );
    write(&[4, 5, 6], true).expect("forced");
    assert_eq!(
        PreparedData::open(&dir)
            .expect("new")
            .row(0)
            .expect("row")
            .tokens,
        vec![4, 5]
    );
    let names: Vec<_> = fs::read_dir(tmp.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("out")]);
}

#[test]
fn an_unfinished_writer_leaves_nothing_and_a_stale_partial_is_replaced() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("out");
    {
        let mut w = begin(&dir, layout(2, false), false).expect("begin");
        w.push_document(&[1, 2, 3], &[]).expect("doc");
        assert!(partial_dir(&dir).join(TOKENS).exists());
    }
    assert!(!partial_dir(&dir).exists() && !dir.exists());
    // A crash leaves a .partial folder with junk; the next run starts over.
    fs::create_dir_all(partial_dir(&dir)).expect("mkdir");
    fs::write(partial_dir(&dir).join("junk"), b"x").expect("junk");
    let err = PreparedData::open(&partial_dir(&dir)).expect_err("partial");
    assert!(err.to_string().contains("interrupted"), "{err}");
    let mut w = begin(&dir, layout(2, false), false).expect("begin");
    w.push_document(&[1, 2, 3], &[]).expect("doc");
    w.finish(Format::Text, tokenizer(), vec![], LastRow::Drop)
        .expect("finish");
    assert!(!dir.join("junk").exists());
    // Too little for one row: an error, and no folder.
    let small = tmp.path().join("small");
    let mut w = begin(&small, layout(8, false), false).expect("begin");
    w.push_document(&[1, 2], &[]).expect("doc");
    let err = w
        .finish(Format::Text, tokenizer(), vec![], LastRow::Drop)
        .expect_err("no row");
    assert!(err.to_string().contains("make no row"), "{err}");
    assert!(!small.exists() && !partial_dir(&small).exists());
}

#[test]
fn bad_ids_and_layouts_are_refused_when_writing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("out");
    let err = begin(&dir, layout(0, false), false).expect_err("seq 0");
    assert!(err.to_string().contains("seq_len"), "{err}");
    let mut bad = layout(2, false);
    bad.eos_id = 100;
    assert!(begin(&dir, bad, false).is_err());
    let mut w = begin(&dir, layout(2, false), false).expect("begin");
    let err = w.push_document(&[1, 100], &[]).expect_err("id 100");
    assert!(err.to_string().contains("id 100"), "{err}");
    assert!(w.push_document(&[1, 2], &[true]).is_err());
    assert_eq!(TokenDtype::for_vocab(65_536), TokenDtype::U16);
    assert_eq!(TokenDtype::for_vocab(65_537), TokenDtype::U32);
}

/// A valid folder to damage.
fn sample(dir: &Path) {
    let mut w = begin(dir, layout(3, true), false).expect("begin");
    w.push_document(&[1, 2, 3, 4, 5], &[false, true, true, true, true])
        .expect("doc");
    w.finish(
        instruction(RowLayout::Packed),
        tokenizer(),
        vec![],
        LastRow::Pad,
    )
    .expect("finish");
}

fn edit_manifest(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join(MANIFEST);
    let mut v: serde_json::Value =
        serde_json::from_slice(&fs::read(&path).expect("read")).expect("json");
    f(&mut v);
    fs::write(&path, serde_json::to_vec(&v).expect("json")).expect("write");
}

#[test]
fn open_names_the_file_and_what_was_expected() {
    let tmp = tempfile::tempdir().expect("tmp");
    let check = |name: &str, damage: &dyn Fn(&Path), needles: &[&str]| {
        let dir = tmp.path().join(name);
        sample(&dir);
        damage(&dir);
        let err = PreparedData::open(&dir).expect_err(name).to_string();
        for n in needles {
            assert!(err.contains(n), "{name}: {err} lacks {n}");
        }
    };
    check(
        "missing",
        &|d| fs::remove_file(d.join(MANIFEST)).expect("rm"),
        &["manifest.json", "not prepared data"],
    );
    check(
        "version",
        &|d| edit_manifest(d, |v| v["format_version"] = 9.into()),
        &["format_version 9", "version 1"],
    );
    check(
        "truncated",
        &|d| {
            let p = d.join(TOKENS);
            let b = fs::read(&p).expect("read");
            fs::write(&p, &b[..b.len() - 1]).expect("write");
        },
        &["tokens.bin", "bytes: the manifest implies"],
    );
    check(
        "rows",
        &|d| edit_manifest(d, |v| v["counts"]["rows"] = 3.into()),
        &["loss_tokens", "rows × seq_len"],
    );
    check(
        "dtype",
        &|d| edit_manifest(d, |v| v["dtype"] = "u32".into()),
        &["dtype U32", "expected U16"],
    );
    check(
        "eos",
        &|d| edit_manifest(d, |v| v["tokenizer"]["eos_id"] = 100.into()),
        &["eos_id 100"],
    );
    check(
        "json",
        &|d| fs::write(d.join(MANIFEST), b"{").expect("write"),
        &["manifest.json", "EOF"],
    );
    check(
        "no-mask",
        &|d| fs::remove_file(d.join(MASK)).expect("rm"),
        &["mask.bin"],
    );
}

#[test]
fn rows_with_bad_ids_or_mask_bytes_are_errors_and_verify_sees_any_change() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("out");
    sample(&dir);
    let data = PreparedData::open(&dir).expect("open");
    let err = data.row(2).expect_err("row 2");
    assert!(
        matches!(err, DataError::RowOutOfRange { rows: 2, .. }),
        "{err}"
    );
    // Id 200 at row 1 column 2.
    let p = dir.join(TOKENS);
    let mut b = fs::read(&p).expect("read");
    b[(4 + 2) * 2] = 200;
    fs::write(&p, &b).expect("write");
    let err = data.row(1).expect_err("id 200");
    assert!(
        matches!(
            err,
            DataError::IdOutOfRange {
                row: 1,
                column: 2,
                id: 200,
                ..
            }
        ),
        "{err}"
    );
    let err = data.verify().expect_err("hash");
    assert!(err.to_string().contains("FNV-1a"), "{err}");
    let m = dir.join(MASK);
    let mut b = fs::read(&m).expect("read");
    b[0] = 7;
    fs::write(&m, &b).expect("write");
    let err = data.row(0).expect_err("mask 7");
    assert!(err.to_string().contains("expected 0 or 1"), "{err}");
}
