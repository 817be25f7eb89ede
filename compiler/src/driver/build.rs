//! The `build` pass: cargo builds the generated crate into the plan binary.
//!
//! The plan binary is built against the `autopart-runtime` crate of this
//! autopart's source tree, with that tree's `Cargo.lock` (the same
//! dependency versions) and `.cargo/config.toml` (the same libtorch), in a
//! shared target folder, so the libtorch bindings compile once for every
//! plan. The compiler itself never links libtorch.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;

use anyhow::{Context, Result, bail};
use autopart_vocab::fs::{copy_atomic, write_atomic};

/// The file name of the built plan binary inside OUT.
pub const PLAN_BINARY: &str = "autopart-plan";

/// Next to the binary: the plan hash (`autopart_vocab::hash::plan_hash`)
/// of the `plan.ron` it was built from, so that `run` never starts a binary
/// that no longer matches the plan (a later `compile` that failed to build,
/// or ran with `--no-build`).
pub const PLAN_STAMP: &str = "autopart-plan.stamp";

/// The cargo profile of the plan binary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BuildProfile {
    /// Optimised (`cargo build --release`).
    #[default]
    Release,
    /// Unoptimised glue over the same optimised dependencies: builds faster.
    Dev,
}

impl fmt::Display for BuildProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BuildProfile::Release => "release",
            BuildProfile::Dev => "dev",
        })
    }
}

impl FromStr for BuildProfile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "release" => Ok(BuildProfile::Release),
            "dev" | "debug" => Ok(BuildProfile::Dev),
            _ => Err(format!(
                "unknown build profile '{s}' (expected release or dev)"
            )),
        }
    }
}

/// The plan hash of `OUT/plan.ron` as the stamp file holds it.
pub fn plan_stamp(out: &Path) -> Result<String> {
    let path = out.join("plan.ron");
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(format!("{}\n", autopart_vocab::hash::plan_hash(&bytes)))
}

/// The autopart source tree the generated code builds against:
/// `$AUTOPART_HOME`, else the tree this binary was built from.
pub fn autopart_home() -> Result<PathBuf> {
    let home = match std::env::var_os("AUTOPART_HOME") {
        Some(h) => PathBuf::from(h),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(".")),
    };
    if !home.join("runtime").join("Cargo.toml").is_file() {
        bail!(
            "{} has no runtime/Cargo.toml: set AUTOPART_HOME to the autopart source tree (the generated code depends on its autopart-runtime crate)",
            home.display()
        );
    }
    Ok(home)
}

/// The cargo command that builds the crate in `crate_dir` as plan crates
/// are built: the tree's `Cargo.lock` copied in (the same dependency
/// versions), its `.cargo/config.toml` (the same libtorch), the shared
/// target folder (`$CARGO_TARGET_DIR` or the tree's `target/`, returned
/// with the command), so that every plan reuses one build of libtorch's
/// bindings.
pub fn cargo_build_command(
    home: &Path,
    crate_dir: &Path,
    profile: BuildProfile,
) -> Result<(Command, PathBuf)> {
    let lock = home.join("Cargo.lock");
    if lock.is_file() {
        copy_atomic(&lock, &crate_dir.join("Cargo.lock"))
            .with_context(|| format!("copying {} into {}", lock.display(), crate_dir.display()))?;
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| home.join("target"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(crate_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target);
    let config = home.join(".cargo").join("config.toml");
    if config.is_file() {
        cmd.arg("--config").arg(&config);
    }
    if profile == BuildProfile::Release {
        cmd.arg("--release");
    }
    Ok((cmd, target))
}

/// Where cargo puts a binary of `profile` in `target`.
pub fn binary_path(target: &Path, profile: BuildProfile, package: &str) -> PathBuf {
    let dir = match profile {
        BuildProfile::Release => "release",
        BuildProfile::Dev => "debug",
    };
    target.join(dir).join(package)
}

/// Builds the crate in `gencode` (package `package`) with cargo and copies
/// the binary to `out/autopart-plan` (atomically), then writes the stamp of
/// `out/plan.ron`. Returns the binary's path.
pub fn build_plan_binary(
    home: &Path,
    gencode: &Path,
    package: &str,
    out: &Path,
    profile: BuildProfile,
) -> Result<PathBuf> {
    let (mut cmd, target) = cargo_build_command(home, gencode, profile)?;
    eprintln!(
        "building the plan binary ({profile}, target folder {})...",
        target.display()
    );
    let status = cmd.status().context("running cargo")?;
    if !status.success() {
        bail!(
            "cargo could not build the generated crate in {} ({status})",
            gencode.display()
        );
    }
    let built = binary_path(&target, profile, package);
    let dest = out.join(PLAN_BINARY);
    copy_atomic(&built, &dest)
        .with_context(|| format!("copying {} to {}", built.display(), dest.display()))?;
    let stamp = out.join(PLAN_STAMP);
    write_atomic(&stamp, plan_stamp(out)?.as_bytes())
        .with_context(|| format!("writing {}", stamp.display()))?;
    Ok(dest)
}
