//! `autopart profile [--out FILE.ron]`: measures this machine and writes a
//! cluster file that `compile --cluster FILE.ron` prices with.
//!
//! Started under the launcher like a run (`mpirun -np N autopart profile`,
//! `srun ...`): every process builds (once, in the shared target folder;
//! cargo's lock serialises them) and starts the runtime's profiler,
//! `autopart-profile`, which times ops and collectives with the runtime's
//! own code and writes the raw samples; rank 0 then fits the cluster's
//! figures to them (`cost::profile`), writes the file atomically, the raw
//! samples next to it, and prints each sample measured against the fitted
//! figure. `--from-raw FILE.json` refits kept samples without measuring.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use autopart_vocab::fs::write_atomic;
use autopart_vocab::launcher::Launcher;
use autopart_vocab::profile::Raw;
use clap::Args;

use crate::cost::{load_cluster, profile};
use crate::driver::build::{BuildProfile, autopart_home, binary_path};

#[derive(Debug, Args)]
pub struct ProfileArgs {
    /// The cluster file to write.
    #[arg(long, value_name = "FILE.ron", default_value = "profile.ron")]
    pub out: PathBuf,
    /// The preset the figures a profile cannot measure come from (the memory
    /// reserve, the allocator's slack; the inter-node link on one node).
    #[arg(long, value_name = "PRESET|FILE", default_value = "cpu")]
    pub base: String,
    /// Fewer shapes and message sizes (about a quarter of the time).
    #[arg(long)]
    pub quick: bool,
    /// Seconds each sample is repeated for at least.
    #[arg(long, value_name = "S", default_value_t = 0.25)]
    pub budget_s: f64,
    /// Torch threads per process (the --threads `autopart run` will use).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub threads: u32,
    /// Largest collective message in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 64)]
    pub max_mib: u64,
    /// Fit the samples of an earlier profile (its FILE.json) instead of
    /// measuring.
    #[arg(long, value_name = "FILE.json")]
    pub from_raw: Option<PathBuf>,
    /// Cargo profile of the profiler binary: release or dev
    /// ($AUTOPART_BUILD_PROFILE sets the default).
    #[arg(long, env = "AUTOPART_BUILD_PROFILE", default_value = "release")]
    pub build_profile: BuildProfile,
}

/// The raw samples' path next to the cluster file: `FILE.json`.
fn raw_path(out: &Path) -> PathBuf {
    out.with_extension("json")
}

pub fn profile(args: &ProfileArgs) -> Result<()> {
    let base = load_cluster(&args.base).with_context(|| format!("--base {}", args.base))?;
    if args.out.extension().is_some_and(|e| e == "json") {
        bail!(
            "--out {} would be overwritten by the raw samples (FILE.json): name the cluster file FILE.ron",
            args.out.display()
        );
    }
    let (raw_file, command) = match &args.from_raw {
        Some(path) => (
            path.clone(),
            format!("autopart profile --from-raw {}", path.display()),
        ),
        None => {
            let Some(command) = measure(args)? else {
                // Not rank 0: the profiler ran; rank 0 writes the file.
                return Ok(());
            };
            (raw_path(&args.out), command)
        }
    };
    let text = std::fs::read_to_string(&raw_file)
        .with_context(|| format!("reading the profile samples {}", raw_file.display()))?;
    let raw = Raw::from_json(&text, &raw_file.display().to_string()).map_err(anyhow::Error::msg)?;
    let fitted = profile::fit(&raw, &base, &args.base, &command).map_err(anyhow::Error::msg)?;
    let ron = fitted
        .cluster
        .to_ron_string()
        .context("writing the cluster as RON")?;
    let header = format!(
        "// Written by `{command}` ({} processes, {:.0} s of profiling).\n// Every figure's provenance is under `measured.figures`; `autopart compile --cluster {}` prices with it.\n",
        raw.ranks,
        raw.seconds,
        args.out.display()
    );
    write_atomic(&args.out, format!("{header}{ron}\n").as_bytes())
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!("{}", report(&fitted));
    print!("{}", fitted.cluster);
    println!(
        "wrote {} (samples in {})",
        args.out.display(),
        raw_file.display()
    );
    Ok(())
}

/// Builds and runs the profiler on this process; `Some(command)` on rank 0.
fn measure(args: &ProfileArgs) -> Result<Option<String>> {
    let launcher = Launcher::from_env();
    if let Some(hint) = launcher.missing_pmi("autopart profile") {
        bail!("{hint}");
    }
    let rank = launcher.rank.unwrap_or(0);
    let ranks = launcher.size.unwrap_or(1);
    let rank0 = rank == 0;
    if !(args.budget_s.is_finite() && args.budget_s > 0.0 && args.budget_s <= 60.0) {
        bail!("--budget-s must be in (0, 60], got {}", args.budget_s);
    }
    if args.threads == 0 || args.max_mib == 0 || args.max_mib > 4096 {
        bail!("--threads must be at least 1 and --max-mib in 1..=4096");
    }
    let binary = build_profiler(args.build_profile, rank0)?;
    if rank0 {
        eprintln!(
            "profiling on {ranks} process(es), {} thread(s) each{}...",
            args.threads,
            if args.quick { ", quick" } else { "" }
        );
    }
    let raw = raw_path(&args.out);
    let mut cmd = Command::new(&binary);
    cmd.arg("--raw")
        .arg(&raw)
        .arg("--budget-s")
        .arg(args.budget_s.to_string())
        .arg("--threads")
        .arg(args.threads.to_string())
        .arg("--max-mib")
        .arg(args.max_mib.to_string());
    if args.quick {
        cmd.arg("--quick");
    }
    let status = cmd
        .status()
        .with_context(|| format!("starting {}", binary.display()))?;
    if !status.success() {
        bail!("the profiler {} failed ({status})", binary.display());
    }
    let mut command = format!("autopart profile --out {}", args.out.display());
    if args.quick {
        command.push_str(" --quick");
    }
    if let Some(var) = launcher.size_var {
        command = format!("{command} under {var}={ranks}");
    }
    Ok(rank0.then_some(command))
}

/// Builds `autopart-profile` from the source tree's runtime crate into the
/// shared target folder and returns its path.
fn build_profiler(profile: BuildProfile, loud: bool) -> Result<PathBuf> {
    let home = autopart_home()?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| home.join("target"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(home.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target)
        .args(["-p", "autopart-runtime", "--bin", "autopart-profile"]);
    if profile == BuildProfile::Release {
        cmd.arg("--release");
    }
    if loud {
        eprintln!(
            "building the profiler ({profile}, target folder {})...",
            target.display()
        );
    } else {
        cmd.arg("--quiet");
    }
    let status = cmd.status().context("running cargo")?;
    if !status.success() {
        bail!(
            "cargo could not build autopart-profile in {} ({status})",
            home.display()
        );
    }
    Ok(binary_path(&target, profile, "autopart-profile"))
}

/// The fit's report: one line per sample, measured against the fitted
/// cluster's price of it.
fn report(fitted: &profile::Fitted) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<58} {:>11} {:>11} {:>7}",
        "sample", "measured", "fitted", "error"
    );
    let mut errors = Vec::new();
    for row in &fitted.rows {
        let _ = writeln!(
            out,
            "{:<58} {:>11} {:>11} {:>+6.0}%",
            row.what,
            seconds(row.measured_s),
            seconds(row.predicted_s),
            row.error() * 100.0
        );
        errors.push(row.error().abs());
    }
    errors.sort_by(f64::total_cmp);
    if let Some(worst) = errors.last() {
        let _ = write!(
            out,
            "{} samples: median |error| {:.0}%, worst {:.0}%",
            errors.len(),
            errors[errors.len() / 2] * 100.0,
            worst * 100.0
        );
    }
    out
}

fn seconds(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 1e-3 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{:.1} us", s * 1e6)
    }
}
