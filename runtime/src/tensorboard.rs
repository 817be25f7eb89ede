//! TensorBoard event files (`--tensorboard DIR`): scalars per step, in the
//! format TensorBoard reads, written without protobuf code generation.
//!
//! A file `DIR/events.out.tfevents.<unix seconds>.<host>` is a sequence of
//! TFRecords, each `u64` length (little-endian), the masked CRC-32C of those
//! 8 bytes, the data, the masked CRC-32C of the data (mask: `((crc >> 15) |
//! (crc << 17)) + 0xa282ead8`). Each record's data is an `Event` protobuf:
//! `wall_time` (double, field 1), `step` (int64, field 2) and either
//! `file_version` (string, field 3: `"brain.Event:2"`, the first record) or
//! `summary` (field 5): a `Summary` of repeated `Value`s (field 1), each a
//! `tag` (string, field 1) and a `simple_value` (float, field 2). Those
//! few fields are encoded by hand below (varints and fixed-width numbers);
//! TensorBoard's own reader checks both CRCs.
//!
//! No maintained crate writes these files without `protoc` at build time
//! (`tboard` needs it; `tensorboard-rs` is unmaintained and drags in
//! `image` and protobuf 2), and the format is a few dozen lines.
//!
//! This module owns the file format only; which rank writes and what
//! (rank 0, every step) is [`crate::app`]'s.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::metrics::MetricsError;

/// The file version record TensorBoard expects first.
const FILE_VERSION: &str = "brain.Event:2";

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as TFRecord uses.
pub fn crc32c(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82f6_3b78
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for &b in bytes {
        crc = TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// TFRecord's masked CRC of `bytes`.
fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// `data` framed as one TFRecord.
pub fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

fn varint(mut x: u64, out: &mut Vec<u8>) {
    while x >= 0x80 {
        out.push((x as u8 & 0x7f) | 0x80);
        x >>= 7;
    }
    out.push(x as u8);
}

/// A length-delimited field (wire type 2).
fn bytes_field(field: u32, data: &[u8], out: &mut Vec<u8>) {
    varint(u64::from(field << 3 | 2), out);
    varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

/// What an `Event` carries besides its time and step.
enum Payload<'a> {
    FileVersion,
    Scalars(&'a [(&'a str, f64)]),
}

/// An `Event` protobuf.
fn event(wall_time: f64, step: u64, payload: Payload<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    out.push(1 << 3 | 1); // wall_time: fixed64
    out.extend_from_slice(&wall_time.to_le_bytes());
    out.push(2 << 3); // step: varint (int64, never negative here)
    varint(step, &mut out);
    match payload {
        Payload::FileVersion => bytes_field(3, FILE_VERSION.as_bytes(), &mut out),
        Payload::Scalars(values) => {
            let mut summary = Vec::new();
            for (tag, x) in values {
                let mut value = Vec::new();
                bytes_field(1, tag.as_bytes(), &mut value);
                value.push(2 << 3 | 5); // simple_value: fixed32 float
                value.extend_from_slice(&(*x as f32).to_le_bytes());
                bytes_field(1, &value, &mut summary);
            }
            bytes_field(5, &summary, &mut out);
        }
    }
    out
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The machine's host name (for the file name), `localhost` when unknown.
fn host() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String = name
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        .collect();
    if name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}

/// An event file being written; every [`EventWriter::scalars`] is flushed,
/// so a killed run keeps its steps.
#[derive(Debug)]
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// Creates `dir` (if needed) and a new event file in it, starting with
    /// the file-version record. A second run into the same folder (a
    /// resumed one) writes its own file next to the first: TensorBoard
    /// reads them as one run.
    pub fn create(dir: &Path) -> Result<Self, MetricsError> {
        let io = |path: &Path, what: &'static str| {
            let path = path.to_path_buf();
            move |source| MetricsError::Io { path, what, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir, "create it"))?;
        let wall = now();
        let stem = format!("events.out.tfevents.{}.{}", wall as u64, host());
        // A second writer in the same second (two runs) gets its own file.
        let mut path = dir.join(&stem);
        let mut n = 1;
        while path.exists() {
            path = dir.join(format!("{stem}.{n}"));
            n += 1;
        }
        let file = File::create(&path).map_err(io(&path, "create it"))?;
        let mut w = Self {
            path,
            out: BufWriter::new(file),
        };
        w.write(&event(wall, 0, Payload::FileVersion))?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes one event at `step` holding the scalars `values` (tag, value;
    /// stored as f32, as TensorBoard's `simple_value` is) and flushes.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) -> Result<(), MetricsError> {
        self.write(&event(now(), step, Payload::Scalars(values)))
    }

    fn write(&mut self, event: &[u8]) -> Result<(), MetricsError> {
        let path = self.path.clone();
        let io = |source| MetricsError::Io {
            path,
            what: "write it",
            source,
        };
        self.out
            .write_all(&record(event))
            .and_then(|()| self.out.flush())
            .map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_values() {
        // The CRC catalogue's check value and RFC 3720's 32 zero bytes.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn records_are_framed_and_events_encoded_field_by_field() {
        let r = record(b"abc");
        assert_eq!(r.len(), 8 + 4 + 3 + 4);
        assert_eq!(&r[..8], &3u64.to_le_bytes());
        assert_eq!(&r[12..15], b"abc");
        let masked = crc32c(b"abc").rotate_right(15).wrapping_add(0xa282_ead8);
        assert_eq!(&r[15..], &masked.to_le_bytes());

        let e = event(1.5, 300, Payload::Scalars(&[("loss", 2.0)]));
        let mut want = vec![0x09];
        want.extend_from_slice(&1.5f64.to_le_bytes());
        want.extend_from_slice(&[0x10, 0xac, 0x02]); // 300 as a varint
        // summary (field 5, 13 bytes) > value (field 1, 11 bytes) > tag, simple_value
        want.extend_from_slice(&[0x2a, 13, 0x0a, 11, 0x0a, 4]);
        want.extend_from_slice(b"loss");
        want.push(0x15);
        want.extend_from_slice(&2.0f32.to_le_bytes());
        assert_eq!(e, want);
    }

    #[test]
    fn a_writer_starts_with_the_file_version_and_appends_flushed_events() {
        let dir = tempfile::tempdir().expect("tmp");
        let tb = dir.path().join("tb");
        let mut w = EventWriter::create(&tb).expect("create");
        w.scalars(1, &[("loss", 3.0), ("lr", 1e-3)]).expect("write");
        let name = w.path().file_name().and_then(|n| n.to_str()).unwrap_or("");
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        let bytes = std::fs::read(w.path()).expect("read");
        let first = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
        let data = &bytes[12..12 + first];
        assert!(data.ends_with(FILE_VERSION.as_bytes()), "{data:?}");
        let rest = &bytes[16 + first..];
        let second = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes")) as usize;
        assert_eq!(rest.len(), 16 + second);
        let other = EventWriter::create(&tb).expect("a second file");
        assert_ne!(other.path(), w.path());
    }
}
