//! Atomic file writes: a file is either its old contents or its new ones,
//! never half-written, even if the process dies mid-write.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Writes `bytes` to `path` by way of a temporary sibling that is fsynced
/// and renamed over `path`; the directory is synced after. On failure the
/// temporary file is removed and `path` is untouched.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// As [`write_atomic`], with the contents written by `write`.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    let (dir, tmp) = temporary_sibling(path)?;
    let mut file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
    let result = write(&mut file)
        .and_then(|()| file.sync_all())
        .and_then(|()| {
            drop(file);
            fs::rename(&tmp, path)
        });
    finish(result, &tmp, dir)
}

/// As [`write_atomic`], for a writer that wants a path (a library that
/// opens the file itself): `write` fills the temporary path it is given,
/// which is then fsynced and renamed over `path`.
pub fn write_atomic_at(path: &Path, write: impl FnOnce(&Path) -> io::Result<()>) -> io::Result<()> {
    let (dir, tmp) = temporary_sibling(path)?;
    let result = write(&tmp)
        .and_then(|()| File::open(&tmp)?.sync_all())
        .and_then(|()| fs::rename(&tmp, path));
    finish(result, &tmp, dir)
}

/// Copies `from` to `to` atomically (the copy keeps `from`'s permissions,
/// so an executable stays executable).
pub fn copy_atomic(from: &Path, to: &Path) -> io::Result<()> {
    let (dir, tmp) = temporary_sibling(to)?;
    let result = fs::copy(from, &tmp)
        .and_then(|_| File::open(&tmp)?.sync_all())
        .and_then(|()| fs::rename(&tmp, to));
    finish(result, &tmp, dir)
}

/// A temporary path next to `path`, unique per process and call so that
/// concurrent writers never share one.
fn temporary_sibling(path: &Path) -> io::Result<(&Path, PathBuf)> {
    let file_name = path.file_name().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "the path does not name a file")
    })?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".{}.{}-{}.tmp",
        file_name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    Ok((dir, tmp))
}

fn finish(result: io::Result<()>, tmp: &Path, dir: &Path) -> io::Result<()> {
    if let Err(err) = result {
        // Best effort: the temporary file is ours and of no use now; the
        // write error is the one worth reporting.
        let _ = fs::remove_file(tmp);
        return Err(err);
    }
    sync_dir(dir);
    Ok(())
}

/// Makes a rename durable. Some file systems refuse to sync a directory;
/// the file's contents are already on disk, so that is not an error.
pub fn sync_dir(dir: &Path) {
    if let Ok(handle) = File::open(dir) {
        let _ = handle.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_files_and_leaves_no_temporaries() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("plan.ron");
        write_atomic(&path, b"first").expect("write");
        write_atomic(&path, b"second").expect("overwrite");
        assert_eq!(fs::read(&path).expect("read"), b"second");
        let copy = dir.path().join("copy");
        copy_atomic(&path, &copy).expect("copy");
        assert_eq!(fs::read(&copy).expect("read"), b"second");
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn a_failed_write_keeps_the_old_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("report.md");
        write_atomic(&path, b"kept").expect("write");
        let err = write_atomic_with(&path, |f| {
            f.write_all(b"half")?;
            Err(io::Error::other("disk full"))
        })
        .expect_err("fails");
        assert_eq!(err.to_string(), "disk full");
        assert_eq!(fs::read(&path).expect("read"), b"kept");
        assert_eq!(fs::read_dir(dir.path()).expect("list").count(), 1);
        let err = write_atomic_at(&path, |tmp| {
            fs::write(tmp, b"half")?;
            Err(io::Error::other("the writer failed"))
        })
        .expect_err("fails");
        assert_eq!(err.to_string(), "the writer failed");
        assert_eq!(fs::read(&path).expect("read"), b"kept");
        assert_eq!(fs::read_dir(dir.path()).expect("list").count(), 1);
        write_atomic_at(&path, |tmp| fs::write(tmp, b"new")).expect("writes");
        assert_eq!(fs::read(&path).expect("read"), b"new");
        assert!(write_atomic(&dir.path().join("missing/x"), b"").is_err());
    }
}
