//! Collective and point-to-point communication over tch tensors.
//!
//! [`Communicator`] is the interface the generated code and the executor call;
//! [`MpiComm`] implements it for CPU tensors over MPI (rsmpi, OpenMPI), and
//! `NcclComm` (cargo feature `nccl`) for CUDA tensors, bootstrapped over MPI.
//! [`MeshComms`] builds one sub-communicator per mesh axis; [`SoloComm`]
//! serves groups of one rank without a launcher.
//!
//! This module owns moving bytes between ranks and the tensor layouts around
//! a collective (which dim is gathered, scattered or exchanged). It does not
//! differentiate: the backward dual of each collective is chosen by the
//! executor (ARCHITECTURE.md, "Layouts and adapters").
//!
//! Every call is collective over the communicator's ranks (except `send`,
//! `recv` and `send_recv`, which pair two ranks), and all ranks must pass
//! tensors of the same shape and kind. Local mistakes (a dim out of range, a
//! size that does not divide, a rank outside the group, an unsupported kind,
//! a received message of the wrong size) are errors, not panics.

mod layout;
mod mem;
mod mpi;
#[cfg(feature = "nccl")]
mod nccl;
mod solo;

pub use self::mpi::{MpiComm, SendableComm};
#[cfg(feature = "nccl")]
pub use self::nccl::NcclComm;
pub use self::solo::SoloComm;

use crate::mesh::{Axis, Coord, Mesh, MeshError};
use tch::{Device, Kind, Tensor};
use thiserror::Error;

/// What can go wrong in a communication call.
#[derive(Debug, Error)]
pub enum CommError {
    #[error("rank {rank} is outside a communicator of {size} ranks")]
    RankOutOfRange { rank: usize, size: usize },
    #[error("{op} to or from its own rank {rank} is not supported")]
    SelfMessage { op: &'static str, rank: usize },
    #[error("{op}: dim {dim} is out of range for a tensor of {ndim} dims")]
    DimOutOfRange {
        op: &'static str,
        dim: i64,
        ndim: usize,
    },
    #[error("{op}: dim {dim} has size {len}, which does not split into {parts} equal parts")]
    NotDivisible {
        op: &'static str,
        dim: usize,
        len: i64,
        parts: usize,
    },
    #[error("{op}: tensor kind {kind:?} is not supported")]
    UnsupportedKind { op: &'static str, kind: Kind },
    #[error("{op}: tensor is on {found:?}, this communicator serves {expected}")]
    WrongDevice {
        op: &'static str,
        found: Device,
        expected: &'static str,
    },
    #[error("{op}: {elements} elements exceed the 2^31-1 that one MPI call can move")]
    TooLarge { op: &'static str, elements: usize },
    #[error(
        "recv from rank {src}: message holds {got} elements, expected {expected} for shape {shape:?}"
    )]
    SizeMismatch {
        src: usize,
        got: i64,
        expected: usize,
        shape: Vec<i64>,
    },
    #[error("mpi is already initialised in this process or failed to initialise")]
    MpiInit,
    #[error("communicator split with color {color} gave no communicator")]
    Split { color: u32 },
    #[error("tensor memory cannot be lent to the transport: {0}")]
    Memory(String),
    #[error("cuda or nccl unavailable: {0}")]
    Unavailable(String),
    #[error("nccl: {0}")]
    Nccl(String),
    #[error(transparent)]
    Mesh(#[from] MeshError),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// Collectives over tch tensors. All methods return new tensors and leave
/// their inputs untouched; outputs never require grad.
pub trait Communicator: std::fmt::Debug {
    /// This process's rank inside the communicator, `0..size()`.
    fn rank(&self) -> usize;
    /// Number of ranks in the communicator.
    fn size(&self) -> usize;
    /// Element-wise sum over all ranks; every rank gets the sum.
    fn all_reduce(&self, t: &Tensor) -> Result<Tensor, CommError>;
    /// Concatenation of every rank's tensor along `dim`, in rank order.
    fn all_gather(&self, t: &Tensor, dim: i64) -> Result<Tensor, CommError>;
    /// The sum over ranks, split into `size()` chunks along `dim`; rank i keeps chunk i.
    fn reduce_scatter(&self, t: &Tensor, dim: i64) -> Result<Tensor, CommError>;
    /// Splits `t` into `size()` chunks along `split_dim`, sends chunk j to rank j and
    /// concatenates the chunks received from ranks 0.. along `concat_dim`.
    fn all_to_all(&self, t: &Tensor, split_dim: i64, concat_dim: i64) -> Result<Tensor, CommError>;
    /// Root's `t` on every rank; on other ranks `t` only gives shape and kind.
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor, CommError>;
    /// Sends `t` to `dst` (which must call `recv`). May block until matched.
    fn send(&self, t: &Tensor, dst: usize) -> Result<(), CommError>;
    /// Receives a tensor of the given shape and kind from `src`.
    fn recv(&self, shape: &[i64], kind: Kind, src: usize) -> Result<Tensor, CommError>;
    /// Sends `t` to `dst` and receives a tensor from `src` at once, without
    /// deadlocking when neighbours exchange in a ring or pipeline.
    fn send_recv(
        &self,
        t: &Tensor,
        dst: usize,
        shape: &[i64],
        kind: Kind,
        src: usize,
    ) -> Result<Tensor, CommError>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<(), CommError>;
}

/// The world communicator plus one sub-communicator per mesh axis for this rank.
#[derive(Debug)]
pub struct MeshComms<C> {
    pub mesh: Mesh,
    pub coord: Coord,
    pub world: C,
    pub tp: C,
    pub dp: C,
    pub pp: C,
}

impl<C> MeshComms<C> {
    /// The communicator of one axis.
    pub fn axis(&self, axis: Axis) -> &C {
        match axis {
            Axis::Tp => &self.tp,
            Axis::Dp => &self.dp,
            Axis::Pp => &self.pp,
        }
    }
}

impl MeshComms<SoloComm> {
    /// The mesh of a single process: every axis of size 1.
    pub fn solo() -> Self {
        Self {
            mesh: Mesh {
                tp: 1,
                dp: 1,
                pp: 1,
            },
            coord: Coord {
                tp: 0,
                dp: 0,
                pp: 0,
            },
            world: SoloComm,
            tp: SoloComm,
            dp: SoloComm,
            pp: SoloComm,
        }
    }
}

impl MeshComms<MpiComm> {
    /// Splits `world` along every axis of `mesh`. Collective over `world`.
    pub fn new(world: MpiComm, mesh: Mesh) -> Result<Self, CommError> {
        mesh.check_world(world.size())?;
        let coord = mesh.coord(world.rank())?;
        let tp = world.split_axis(mesh, Axis::Tp)?;
        let dp = world.split_axis(mesh, Axis::Dp)?;
        let pp = world.split_axis(mesh, Axis::Pp)?;
        Ok(Self {
            mesh,
            coord,
            world,
            tp,
            dp,
            pp,
        })
    }
}

/// The communicators of one rank's mesh axes, as trait objects.
#[derive(Clone, Copy, Debug)]
pub struct Groups<'c> {
    pub coord: Coord,
    pub tp: &'c dyn Communicator,
    pub dp: &'c dyn Communicator,
    pub pp: &'c dyn Communicator,
}

impl<'c> Groups<'c> {
    pub fn of<C: Communicator>(comms: &'c MeshComms<C>) -> Self {
        Self {
            coord: comms.coord,
            tp: &comms.tp,
            dp: &comms.dp,
            pp: &comms.pp,
        }
    }
}

#[cfg(feature = "nccl")]
impl MeshComms<NcclComm> {
    /// NCCL communicators over the same groups as `mpi`, driving CUDA device
    /// `device`. Collective over the world.
    pub fn nccl(mpi: &MeshComms<MpiComm>, device: usize) -> Result<Self, CommError> {
        Ok(Self {
            mesh: mpi.mesh,
            coord: mpi.coord,
            world: NcclComm::new(&mpi.world, device)?,
            tp: NcclComm::new(&mpi.tp, device)?,
            dp: NcclComm::new(&mpi.dp, device)?,
            pp: NcclComm::new(&mpi.pp, device)?,
        })
    }
}

pub(crate) fn check_peer(
    op: &'static str,
    peer: usize,
    me: usize,
    size: usize,
) -> Result<(), CommError> {
    if peer >= size {
        return Err(CommError::RankOutOfRange { rank: peer, size });
    }
    if peer == me {
        return Err(CommError::SelfMessage { op, rank: peer });
    }
    Ok(())
}
