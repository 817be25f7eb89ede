//! Building the generated crate, and `autopart run`.
//!
//! The plan binary is built by cargo against the `autopart-runtime` crate of
//! this autopart's source tree, with that tree's `Cargo.lock` (the same
//! dependency versions) and `.cargo/config.toml` (the same libtorch), in a
//! shared target folder, so the libtorch bindings compile once for every
//! plan. The compiler itself never links libtorch.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::plan::read_plan;

/// The file name of the built plan binary inside OUT.
pub const PLAN_BINARY: &str = "autopart-plan";

/// Next to the binary: a hash of the `plan.ron` it was built from, so that
/// `run` never starts a binary that no longer matches the plan (a later
/// `compile` that failed to build, or ran with `--no-build`).
const PLAN_STAMP: &str = "autopart-plan.stamp";

fn plan_hash(out: &Path) -> Result<String> {
    let path = out.join("plan.ron");
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    Ok(format!("{h:016x}\n"))
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

/// Builds the crate in `gencode` (package `package`) with cargo and copies
/// the binary to `out/autopart-plan` (atomically). Returns that path.
pub fn build_plan_binary(
    home: &Path,
    gencode: &Path,
    package: &str,
    out: &Path,
    profile: &str,
) -> Result<PathBuf> {
    let lock = home.join("Cargo.lock");
    if lock.is_file() {
        std::fs::copy(&lock, gencode.join("Cargo.lock"))
            .with_context(|| format!("copying {} into {}", lock.display(), gencode.display()))?;
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| home.join("target"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(gencode.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target);
    let config = home.join(".cargo").join("config.toml");
    if config.is_file() {
        cmd.arg("--config").arg(&config);
    }
    if profile == "release" {
        cmd.arg("--release");
    }
    eprintln!(
        "building the plan binary ({profile}, target folder {})...",
        target.display()
    );
    let status = cmd
        .status()
        .with_context(|| format!("running {}", Path::new(&cargo).display()))?;
    if !status.success() {
        bail!(
            "cargo could not build the generated crate in {} ({status})",
            gencode.display()
        );
    }
    let dir = if profile == "release" {
        "release"
    } else {
        "debug"
    };
    let built = target.join(dir).join(package);
    let dest = out.join(PLAN_BINARY);
    let tmp = out.join(format!(".{PLAN_BINARY}.tmp"));
    std::fs::copy(&built, &tmp)
        .with_context(|| format!("copying {} to {}", built.display(), tmp.display()))?;
    std::fs::rename(&tmp, &dest).with_context(|| format!("writing {}", dest.display()))?;
    let stamp = out.join(PLAN_STAMP);
    let tmp = out.join(format!(".{PLAN_STAMP}.tmp"));
    std::fs::write(&tmp, plan_hash(out)?)
        .and_then(|()| std::fs::rename(&tmp, &stamp))
        .with_context(|| format!("writing {}", stamp.display()))?;
    Ok(dest)
}

/// The world size the launcher started, from its environment (OpenMPI,
/// PMI/MPICH, Slurm), and which variable said so.
fn launcher_world() -> Option<(u32, &'static str)> {
    for var in [
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_SIZE",
        "SLURM_NTASKS",
        "SLURM_NPROCS",
    ] {
        if let Some(n) = std::env::var(var).ok().and_then(|v| v.trim().parse().ok()) {
            return Some((n, var));
        }
    }
    None
}

/// `autopart run OUT ARGS...`: checks the launcher's world size against the
/// plan, then replaces this process with the plan binary.
pub fn run(out: &Path, args: &[String]) -> Result<()> {
    let plan_path = out.join("plan.ron");
    let plan = read_plan(&plan_path).with_context(|| {
        format!(
            "reading {} (is {} the --out folder of autopart compile?)",
            plan_path.display(),
            out.display()
        )
    })?;
    let binary = out.join(PLAN_BINARY);
    if !binary.is_file() {
        bail!(
            "{} does not exist: build it with `autopart compile` (without --no-build)",
            binary.display()
        );
    }
    let stamp = std::fs::read_to_string(out.join(PLAN_STAMP)).unwrap_or_default();
    if stamp != plan_hash(out)? {
        bail!(
            "{} was not built from the current {} (a later compile did not build it): run `autopart compile` again without --no-build",
            binary.display(),
            plan_path.display()
        );
    }
    let wanted = plan.runtime_gpus;
    let asks_help = args.iter().any(|a| a == "--help" || a == "-h");
    match launcher_world() {
        Some((n, _)) if n == wanted || asks_help => {}
        Some((n, var)) => bail!(
            "this plan runs on {wanted} processes ({} GPUs per copy x {}), but the launcher started {n} ({var}={n}); run `mpirun -np {wanted} autopart run {}`",
            plan.plan_gpus,
            plan.replicas(),
            out.display()
        ),
        None if wanted != 1 && !asks_help => bail!(
            "this plan runs on {wanted} processes but no launcher started this one; run `mpirun -np {wanted} autopart run {}` (or srun -n {wanted})",
            out.display()
        ),
        None => {}
    }
    use std::os::unix::process::CommandExt;
    let err = Command::new(&binary).args(args).exec();
    Err(err).with_context(|| format!("starting {}", binary.display()))
}
