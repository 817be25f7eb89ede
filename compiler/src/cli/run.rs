//! `autopart run OUT ARGS...`: checks the plan folder and the launcher's
//! world, then becomes the plan binary.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use autopart_vocab::launcher::Launcher;

use crate::driver::build::{PLAN_BINARY, PLAN_STAMP, plan_stamp};
use crate::plan::read_plan;

/// Checks the launcher's world size against the plan, then replaces this
/// process with the plan binary.
pub fn run(out: &Path, args: &[String]) -> Result<()> {
    let (mut cmd, binary) = plan_command(out, args)?;
    use std::os::unix::process::CommandExt;
    let err = cmd.exec();
    Err(err).with_context(|| format!("starting {}", binary.display()))
}

/// The plan binary of `out` with `args`, once the plan folder and the
/// launcher's world size are checked; and the binary's path.
pub fn plan_command(out: &Path, args: &[String]) -> Result<(Command, std::path::PathBuf)> {
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
    if stamp != plan_stamp(out)? {
        bail!(
            "{} was not built from the current {} (a later compile did not build it): run `autopart compile` again without --no-build",
            binary.display(),
            plan_path.display()
        );
    }
    let wanted = plan.runtime_gpus;
    let asks_help = args.iter().any(|a| a == "--help" || a == "-h");
    let launcher = Launcher::from_env();
    if let Some(hint) = launcher.missing_pmi(&format!("autopart run {}", out.display()))
        && !asks_help
    {
        bail!("{hint}");
    }
    match (launcher.size, launcher.size_var) {
        (Some(n), _) if n == wanted as usize || asks_help => {}
        (Some(n), var) => bail!(
            "this plan runs on {wanted} processes ({} GPUs per copy x {}), but the launcher started {n} ({}={n}); run `mpirun -np {wanted} autopart run {}`",
            plan.plan_gpus,
            plan.replicas(),
            var.unwrap_or("launcher"),
            out.display()
        ),
        (None, _) if wanted != 1 && !asks_help => bail!(
            "this plan runs on {wanted} processes but no launcher started this one; run `mpirun -np {wanted} autopart run {}` (or srun -n {wanted})",
            out.display()
        ),
        (None, _) => {}
    }
    let mut cmd = Command::new(&binary);
    cmd.args(args);
    Ok((cmd, binary))
}

/// Runs the plan binary with `flags` (its stderr passed through); the JSON
/// object of its last stdout line.
pub fn plan_json(out: &Path, flags: &[String]) -> Result<serde_json::Value> {
    let (mut cmd, binary) = plan_command(out, flags)?;
    let output = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("starting {}", binary.display()))?;
    if !output.status.success() {
        bail!("{} failed ({})", binary.display(), output.status);
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or("");
    serde_json::from_str(line)
        .with_context(|| format!("{} printed {line:?}, not its JSON result", binary.display()))
}
