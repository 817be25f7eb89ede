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

/// The launcher's view of this process; `None` where nothing said.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Launcher {
    pub size: Option<usize>,
    /// Which variable gave `size`.
    pub size_var: Option<&'static str>,
    pub rank: Option<usize>,
    pub local_rank: Option<usize>,
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
        }
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
                local_rank: Some(0)
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
        let none = read(&[("SLURM_NTASKS", "x")]);
        assert!(!none.launched());
        assert_eq!(none, Launcher::default());
    }
}
