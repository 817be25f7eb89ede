//! What a launcher told this process before MPI starts: how many processes
//! it started, and this one's rank, from the environment.
//!
//! `mpirun` (Open MPI) sets `OMPI_COMM_WORLD_SIZE` / `_RANK` / `_LOCAL_RANK`;
//! MPICH's Hydra and Intel MPI set `PMI_SIZE` / `PMI_RANK` (and
//! `MPI_LOCALRANKID`); a PMIx launch sets `PMIX_RANK` (and, by some
//! launchers, `PMIX_SIZE`); Slurm's `srun` sets
//! `SLURM_STEP_NUM_TASKS` (the step's tasks; `SLURM_NTASKS` is the job's, and
//! an older name `SLURM_NPROCS`), `SLURM_PROCID` and `SLURM_LOCALID`. The
//! first variable of each list that parses wins; [`Launcher::size_var`] says
//! which, so that an error can quote it.

/// Variables that hold the number of processes, in the order they are read.
pub const SIZE_VARS: &[&str] = &[
    "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE",
    "PMIX_SIZE",
    "SLURM_STEP_NUM_TASKS",
    "SLURM_NTASKS",
    "SLURM_NPROCS",
];

/// Variables that hold this process's rank.
pub const RANK_VARS: &[&str] = &[
    "OMPI_COMM_WORLD_RANK",
    "PMI_RANK",
    "PMIX_RANK",
    "SLURM_PROCID",
];

/// Variables that hold this process's rank among those on its node.
pub const LOCAL_RANK_VARS: &[&str] = &[
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "MPI_LOCALRANKID",
    "SLURM_LOCALID",
];

/// Variables a process-management interface sets (Open MPI's own launch,
/// PMI-1/2 of Hydra and `srun --mpi=pmi2`, PMIx of `srun --mpi=pmix`):
/// without one of them MPI cannot connect processes a launcher started.
pub const PMI_VARS: &[&str] = &[
    "OMPI_COMM_WORLD_SIZE",
    "PMIX_RANK",
    "PMIX_NAMESPACE",
    "PMI_RANK",
    "PMI_FD",
];

/// The launcher's view of this process; `None` where nothing said.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Launcher {
    pub size: Option<usize>,
    /// Which variable gave `size`.
    pub size_var: Option<&'static str>,
    pub rank: Option<usize>,
    pub local_rank: Option<usize>,
    /// Whether a PMI variable ([`PMI_VARS`]) is set.
    pub pmi: bool,
}

impl Launcher {
    /// Reads the launcher variables through `var`.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let first = |names: &'static [&'static str]| {
            names
                .iter()
                .find_map(|&n| var(n).and_then(|v| v.trim().parse().ok()).map(|v| (n, v)))
        };
        let size = first(SIZE_VARS);
        Self {
            size: size.map(|(_, v)| v),
            size_var: size.map(|(n, _)| n),
            rank: first(RANK_VARS).map(|(_, v)| v),
            local_rank: first(LOCAL_RANK_VARS).map(|(_, v)| v),
            pmi: PMI_VARS.iter().any(|&n| var(n).is_some()),
        }
    }

    /// When Slurm started several processes without PMI (`srun` with
    /// `MpiDefault=none`, or a batch script running the command itself),
    /// MPI would start each as a world of one, or abort in `MPI_Init`: what
    /// to do instead, for an error message. `command` is how the user runs
    /// the job (`autopart run OUT`).
    pub fn missing_pmi(&self, command: &str) -> Option<String> {
        let n = self.size.filter(|&n| n > 1)?;
        let var = self.size_var.filter(|v| v.starts_with("SLURM_"))?;
        if self.pmi {
            return None;
        }
        Some(format!(
            "Slurm started {n} processes ({var}={n}) without PMI (no {}), so MPI cannot connect them: run `srun --mpi=pmix -n {n} {command}` (or set MpiDefault=pmix in slurm.conf), or `mpirun -np {n} {command}` inside the allocation",
            PMI_VARS.join(", ")
        ))
    }

    /// Reads the process environment.
    pub fn from_env() -> Self {
        Self::from_vars(|n| std::env::var(n).ok())
    }

    /// Whether any launcher variable was found.
    pub fn launched(&self) -> bool {
        self.size.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(vars: &[(&str, &str)]) -> Launcher {
        Launcher::from_vars(|n| {
            vars.iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| (*v).to_string())
        })
    }

    #[test]
    fn each_launcher_is_recognised() {
        let ompi = read(&[
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_RANK", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "0"),
        ]);
        assert_eq!(
            ompi,
            Launcher {
                size: Some(4),
                size_var: Some("OMPI_COMM_WORLD_SIZE"),
                rank: Some(2),
                local_rank: Some(0),
                pmi: true,
            }
        );
        let hydra = read(&[("PMI_SIZE", "8"), ("PMI_RANK", "7")]);
        assert_eq!((hydra.size, hydra.rank), (Some(8), Some(7)));
        // srun inside an allocation of 16 tasks running a step of 2.
        let srun = read(&[
            ("SLURM_NTASKS", "16"),
            ("SLURM_STEP_NUM_TASKS", "2"),
            ("SLURM_PROCID", "1"),
            ("SLURM_LOCALID", "1"),
            ("PMIX_RANK", "1"),
        ]);
        assert_eq!(srun.size, Some(2));
        assert_eq!(srun.size_var, Some("SLURM_STEP_NUM_TASKS"));
        assert_eq!((srun.rank, srun.local_rank), (Some(1), Some(1)));
        // mpirun inside a Slurm allocation: Open MPI's own variables win.
        let nested = read(&[("SLURM_NTASKS", "16"), ("OMPI_COMM_WORLD_SIZE", "4")]);
        assert_eq!(nested.size, Some(4));
        assert_eq!(srun.missing_pmi("autopart run out"), None);
        // srun without --mpi=pmix: Slurm's variables and no PMI.
        let bare = read(&[("SLURM_STEP_NUM_TASKS", "2"), ("SLURM_PROCID", "1")]);
        let hint = bare.missing_pmi("autopart run out").expect("a hint");
        assert!(
            hint.contains("srun --mpi=pmix -n 2 autopart run out")
                && hint.contains("SLURM_STEP_NUM_TASKS=2")
                && hint.contains("MpiDefault=pmix"),
            "{hint}"
        );
        assert_eq!(read(&[("SLURM_NTASKS", "1")]).missing_pmi("x"), None);
        assert_eq!(hydra.missing_pmi("x"), None);
        let none = read(&[("SLURM_NTASKS", "x")]);
        assert!(!none.launched());
        assert_eq!(none, Launcher::default());
    }
}
