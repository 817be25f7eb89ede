//! Fuzz tests of what the plan binary reads from its user: its flags
//! (`autopart run OUT --steps ... --lr ...`), token files (`--data`) and the
//! metrics file a resumed run continues (`--metrics`). The property is the
//! same for each: a result or an error, never a panic, and what is accepted
//! goes through the code downstream of it without one. See docs/fuzzing.md.

use autopart_runtime::app::{Command, Options, parse_args};
use autopart_runtime::data::{EvalSet, JsonRows, MAX_BATCH_TOKENS, TokenDtype, TokenFile};
use autopart_runtime::metrics::MetricsLog;
use autopart_runtime::vocab::ZeroStage;
use proptest::prelude::*;
use std::path::PathBuf;

/// Values a user might type for a number, well-formed or not.
fn number_text() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u64..20).prop_map(|n| n.to_string()),
        (0u64..u64::MAX).prop_map(|n| n.to_string()),
        (-1e6f64..1e6).prop_map(|x| x.to_string()),
        prop::sample::select(vec![
            "0",
            "-0",
            "-1",
            "1",
            "2",
            "4294967296",
            "18446744073709551615",
            "18446744073709551616",
            "9223372036854775807",
            "-9223372036854775808",
            "1e3",
            "1e-300",
            "1e300",
            "1e19",
            "1.8446744073709552e19",
            "inf",
            "-inf",
            "NaN",
            "0x10",
            "+2",
            " 2",
            "2 ",
            "",
            "text",
            "1_000",
            "0.5",
            "3e-4",
            "-3e-4",
            "4096",
            "4097",
            "2147483647",
            "2147483648",
            "25",
            "1e-8",
        ])
        .prop_map(str::to_string),
        "[ -~]{0,12}",
    ]
}

/// The plan binary's flags that take a number.
const NUMERIC_FLAGS: &[&str] = &[
    "--steps",
    "--seed",
    "--lr",
    "--min-lr",
    "--warmup",
    "--weight-decay",
    "--clip",
    "--adam-eps",
    "--bucket-mb",
    "--threads",
    "--checkpoint-every",
    "--keep",
    "--exit-at-step",
    "--collective-timeout",
    "--max-new-tokens",
    "--temperature",
    "--top-p",
];

/// A command line of numeric flags (with `=` or as the next argument), a
/// few other flags, and now and then a flag value that is another flag.
fn command_line() -> impl Strategy<Value = Vec<String>> {
    let flag = (
        prop::sample::select(NUMERIC_FLAGS.to_vec()),
        number_text(),
        any::<bool>(),
    )
        .prop_map(|(f, v, eq)| {
            if eq {
                vec![format!("{f}={v}")]
            } else {
                vec![f.to_string(), v]
            }
        });
    let other = prop::sample::select(vec![
        vec!["--generate", "--prompt-ids", "1,2,3"],
        vec!["--generate", "--prompt-ids", "1,-2,x"],
        vec!["--generate", "--prompts", "p.json"],
        vec!["--eval-only", "--eval-data", "rows.json"],
        vec!["--json"],
        vec!["--eos-ids", "2,3"],
        vec!["--checkpoint-dir", "ck"],
        vec!["--resume", "auto"],
        vec!["--resume", "7"],
        vec!["--resume", "-1"],
        vec!["--data-dtype", "u32"],
        vec!["--data-dtype", "u8"],
        vec!["--skip-nonfinite-steps"],
        vec!["--async-checkpoint"],
        vec!["--override-optim-settings"],
        vec!["--steps"],
        vec!["--lr", "--seed"],
    ])
    .prop_map(|v| v.into_iter().map(str::to_string).collect::<Vec<_>>());
    prop::collection::vec(prop_oneof![4 => flag, 1 => other], 0..6)
        .prop_map(|parts| parts.into_iter().flatten().collect())
}

/// What an accepted command line drives before any tensor exists: the
/// optimizer's settings under every ZeRO stage, the learning rate at the
/// schedule's edges, the watchdog's timeout and the bucket size.
fn exercise(o: &Options) {
    for zero in [
        ZeroStage::Off,
        ZeroStage::One,
        ZeroStage::Two,
        ZeroStage::Three,
    ] {
        let c = o.optim_config(zero);
        c.validate()
            .expect("parse_args validated these optimizer settings");
        let s = c.lr;
        for step in [
            0,
            1,
            s.warmup_steps.saturating_sub(1),
            s.warmup_steps,
            s.total_steps.saturating_sub(1),
            s.total_steps,
            u64::MAX,
        ] {
            let lr = s.lr(step);
            assert!(
                lr.is_finite() && lr >= 0.0 && lr <= s.peak_lr * (1.0 + 1e-12),
                "lr({step}) = {lr} outside [0, {}]",
                s.peak_lr
            );
        }
        assert!(c.bucket_bytes >= 1);
    }
    if let Some(t) = o.collective_timeout() {
        assert!(!t.is_zero() && t.as_secs_f64().is_finite());
    }
    assert!((1..=4096).contains(&o.threads), "threads {}", o.threads);
    assert!(o.steps >= 1);
}

fn token_dtype() -> impl Strategy<Value = TokenDtype> {
    prop_oneof![Just(TokenDtype::U16), Just(TokenDtype::U32)]
}

/// Sizes as a plan or a user could set them: small, edge and absurd.
fn size_i64() -> impl Strategy<Value = i64> {
    prop_oneof![
        4 => 0i64..12,
        1 => prop::sample::select(vec![
            -1, i64::MIN, i64::MAX, 255, 256, 65535, 65536, 1 << 31, 1 << 32, MAX_BATCH_TOKENS + 1,
        ]),
        1 => any::<i64>(),
    ]
}

fn step_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..10,
        Just(u64::MAX),
        Just(u64::MAX / 2 + 1),
        any::<u64>()
    ]
}

/// A token file's bytes: ids of a small vocabulary (so that some files pass
/// the vocabulary check), arbitrary bytes, or those cut at an odd length.
fn token_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(0u16..16, 0..64)
            .prop_map(|ids| ids.into_iter().flat_map(u16::to_le_bytes).collect()),
        prop::collection::vec(0u32..16, 0..32)
            .prop_map(|ids| ids.into_iter().flat_map(u32::to_le_bytes).collect()),
        prop::collection::vec(any::<u8>(), 0..160),
        (
            prop::collection::vec(0u16..16, 1..64),
            any::<prop::sample::Index>()
        )
            .prop_map(|(ids, cut)| {
                let b: Vec<u8> = ids.into_iter().flat_map(u16::to_le_bytes).collect();
                let n = cut.index(b.len());
                b[..n].to_vec()
            }),
    ]
}

fn temp_file(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).expect("write the generated file");
    path
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10_000))]

    /// `parse_args` never panics; what it accepts drives the optimizer's
    /// set-up, the schedule and the watchdog without a panic.
    #[test]
    fn run_flags_parse_or_refuse(argv in command_line()) {
        match parse_args(argv.clone()) {
            Ok(Command::Train(o)) => exercise(&o),
            Ok(Command::Help(text)) => prop_assert!(text.contains("--steps")),
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(!msg.is_empty(), "empty error for {argv:?}");
                prop_assert_eq!(e.exit_code(), 2, "{}: {}", argv.join(" "), msg);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4_000))]

    /// `TokenFile::open` and `batch` never panic on any file, dtype,
    /// vocabulary, sequence length, batch or step; an accepted batch is
    /// `[batch, seq]`, its ids inside the vocabulary, its labels the tokens
    /// shifted by one within each window.
    #[test]
    fn token_files_never_panic(
        bytes in token_bytes(),
        dtype in token_dtype(),
        vocab in size_i64(),
        seq in size_i64(),
        batch in size_i64(),
        steps in prop::collection::vec(step_u64(), 1..4),
    ) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = temp_file(&dir, "tokens.bin", &bytes);
        let Ok(mut data) = TokenFile::open(&path, dtype, vocab, seq) else {
            return Ok(());
        };
        prop_assert!(data.windows() >= 1);
        prop_assert!(data.len() > seq as u64);
        for step in steps {
            match data.batch(step, batch) {
                Ok(b) => {
                    prop_assert_eq!(b.tokens.size(), vec![batch, seq]);
                    prop_assert_eq!(b.labels.size(), vec![batch, seq]);
                    let t = Vec::<Vec<i64>>::try_from(&b.tokens).expect("int64 rows");
                    let l = Vec::<Vec<i64>>::try_from(&b.labels).expect("int64 rows");
                    for (tr, lr) in t.iter().zip(&l) {
                        prop_assert!(tr.iter().chain(lr).all(|&id| (0..vocab).contains(&id)));
                        prop_assert_eq!(&tr[1..], &lr[..lr.len() - 1]);
                    }
                }
                Err(e) => {
                    let msg = e.to_string();
                    prop_assert!(!msg.is_empty());
                }
            }
        }
    }

    /// JSON rows (`eval --data rows.json`, `--prompts`) never panic: any
    /// bytes, other JSON, rows of any length and ids of any value are read
    /// or refused with a message naming the file; an accepted set gives
    /// batches of `[batch, seq]` whose counted labels are the rows' own
    /// next ids.
    #[test]
    fn json_rows_read_or_refuse(
        rows in prop::collection::vec(prop::collection::vec(-3i64..300, 0..24), 0..6),
        raw in prop::option::of(prop_oneof![
            "[ -~]{0,40}",
            Just("{\"input_ids\": [[1, 2], 3]}".to_string()),
            Just("{\"input_ids\": [[1e400, 2]]}".to_string()),
            Just("{\"input_ids\": [[18446744073709551616, 2]]}".to_string()),
            Just("{\"input_ids\": null}".to_string()),
        ]),
        vocab in 1i64..400,
        seq in size_i64(),
        batch in size_i64(),
        index in step_u64(),
    ) {
        let dir = tempfile::tempdir().expect("temp dir");
        let text = raw.unwrap_or_else(|| serde_json::json!({ "input_ids": rows }).to_string());
        let path = temp_file(&dir, "rows.json", text.as_bytes());
        if let Err(e) = JsonRows::read(&path, vocab, 1) {
            prop_assert!(e.to_string().contains("rows.json"), "{e}");
        }
        match EvalSet::open(&path, TokenDtype::U16, vocab, seq) {
            Err(e) => prop_assert!(e.to_string().contains("rows.json"), "{e}"),
            Ok(mut set) => {
                let n = set.batches(batch);
                prop_assert!(n >= 1);
                match set.batch(index.min(n), batch) {
                    Ok(b) => {
                        prop_assert_eq!(b.tokens.size(), vec![batch, seq]);
                        let t = Vec::<Vec<i64>>::try_from(&b.tokens).expect("rows");
                        let l = Vec::<Vec<i64>>::try_from(&b.labels).expect("rows");
                        for (tr, lr) in t.iter().zip(&l) {
                            for j in 0..lr.len() {
                                let id = lr[j];
                                prop_assert!(id == -100 || (0..vocab).contains(&id));
                                if id != -100 && j + 1 < tr.len() {
                                    prop_assert_eq!(tr[j + 1], id);
                                }
                            }
                        }
                    }
                    Err(e) => prop_assert!(!e.to_string().is_empty()),
                }
            }
        }
    }

    /// A resumed run's metrics file keeps exactly the lines of steps up to
    /// the resumed one, whatever else the file holds (any bytes, other
    /// JSON, broken lines), and never panics.
    #[test]
    fn metrics_files_resume_or_refuse(
        lines in prop::collection::vec(prop_oneof![
            (0u64..20).prop_map(|s| format!("{{\"step\":{s},\"loss\":1.0}}")),
            any::<u64>().prop_map(|s| format!("{{\"step\":{s}}}")),
            "[ -~]{0,30}",
            Just("{\"step\":".to_string()),
            Just("{\"step\":99999999999999999999999}".to_string()),
            Just("{\"step\":-1}".to_string()),
        ], 0..12),
        raw in prop::option::of(prop::collection::vec(any::<u8>(), 0..80)),
        step in step_u64(),
    ) {
        let dir = tempfile::tempdir().expect("temp dir");
        let bytes = match &raw {
            Some(b) => b.clone(),
            None => lines.join("\n").into_bytes(),
        };
        let path = temp_file(&dir, "metrics.jsonl", &bytes);
        match MetricsLog::resume(&path, step) {
            Ok(log) => {
                drop(log);
                let kept = std::fs::read_to_string(&path).expect("the rewritten file is text");
                let old = String::from_utf8(bytes).expect("only UTF-8 files resume");
                let want: Vec<&str> = old
                    .lines()
                    .filter(|l| {
                        l.strip_prefix("{\"step\":")
                            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
                            .and_then(|n| n.parse::<u64>().ok())
                            .is_some_and(|s| s <= step)
                    })
                    .collect();
                prop_assert_eq!(kept.lines().collect::<Vec<_>>(), want);
            }
            Err(e) => {
                // Only a file that is not text is refused (read_to_string).
                prop_assert!(String::from_utf8(bytes).is_err(), "{e}");
            }
        }
    }
}

/// Found by `run_flags_parse_or_refuse` in CI: `--lr 1e300 --warmup
/// 179769314` made the warm-up's learning rate infinite (the peak was
/// multiplied by the step before the division).
#[test]
fn regression_warm_up_of_a_huge_peak_stays_finite() {
    let Ok(Command::Train(o)) = parse_args(
        ["--lr", "1e300", "--warmup", "179769314"]
            .iter()
            .map(ToString::to_string),
    ) else {
        panic!("accepted flags")
    };
    exercise(&o);
}

/// Found reading the flags for the fuzz test: `--collective-timeout 1e300` was
/// accepted and panicked in `Duration::from_secs_f64` when the watchdog
/// started; now a usage error.
#[test]
fn regression_collective_timeout_past_u64_seconds_is_refused() {
    for v in ["1e300", "18446744073709551616", "1e20"] {
        let err = parse_args(["--collective-timeout".to_string(), v.to_string()])
            .expect_err("a timeout past 2^64 s");
        assert!(err.to_string().contains("below 2^64"), "{v}: {err}");
    }
    let Ok(Command::Train(o)) = parse_args(["--collective-timeout=0".to_string()]) else {
        panic!("0 turns the watchdog off");
    };
    assert_eq!(o.collective_timeout(), None);
}

/// Reading the flags for the fuzz test: `--threads 2147483647` was handed to
/// libtorch's thread pools; now at most 4096.
#[test]
fn regression_threads_are_bounded() {
    let err = parse_args(["--threads".to_string(), "4097".to_string()]).expect_err("4097");
    assert!(err.to_string().contains("--threads"), "{err}");
    assert!(parse_args(["--threads=4096".to_string()]).is_ok());
}

/// Found reading `TokenFile::batch` for the fuzz test: a batch of 2^40 rows (possible only
/// from a corrupt plan) reserved 8 TiB and read windows for hours; now an
/// error at once.
#[test]
fn regression_huge_batches_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bytes: Vec<u8> = (0u16..9).flat_map(u16::to_le_bytes).collect();
    let path = temp_file(&dir, "t.bin", &bytes);
    let mut data = TokenFile::open(&path, TokenDtype::U16, 16, 4).expect("open");
    let err = data.batch(0, 1 << 40).expect_err("2^40 rows");
    assert!(err.to_string().contains("too large"), "{err}");
}
