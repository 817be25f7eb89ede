//! [`MpiComm`]: the [`Communicator`] for CPU tensors over MPI.
//!
//! The world comes from the launcher (`mpirun`, or `srun` through the same
//! MPI init). Tensors are lent to MPI without copying (see `mem`); half kinds
//! are moved as raw 16-bit words and summed in f32, since MPI has no bf16/f16
//! sum. Each communicator is meant to be driven by one thread.

use super::layout::{concat_rows, split_rows};
use super::mem::{Fresh, as_slice};
use super::{CommError, Communicator, check_peer};
use crate::mesh::{Axis, Mesh};
use mpi::collective::SystemOperation;
use mpi::datatype::Equivalence;
use mpi::environment::Universe;
use mpi::topology::{Color, SimpleCommunicator};
use mpi::traits::{Communicator as _, *};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// Picks the element type that moves a tensor of `$kind` bit for bit.
macro_rules! with_transfer_type {
    ($op:expr, $kind:expr, |$T:ident| $body:expr) => {
        match $kind {
            Kind::Float => {
                type $T = f32;
                $body
            }
            Kind::Double => {
                type $T = f64;
                $body
            }
            Kind::Int64 => {
                type $T = i64;
                $body
            }
            Kind::Int => {
                type $T = i32;
                $body
            }
            Kind::Half | Kind::BFloat16 | Kind::Int16 => {
                type $T = u16;
                $body
            }
            Kind::Int8 => {
                type $T = i8;
                $body
            }
            Kind::Uint8 | Kind::Bool => {
                type $T = u8;
                $body
            }
            kind => Err(CommError::UnsupportedKind { op: $op, kind }),
        }
    };
}

/// Picks the element type MPI sums a tensor of `$kind` in.
macro_rules! with_sum_type {
    ($op:expr, $kind:expr, |$T:ident| $body:expr) => {
        match $kind {
            Kind::Float => {
                type $T = f32;
                $body
            }
            Kind::Double => {
                type $T = f64;
                $body
            }
            Kind::Int64 => {
                type $T = i64;
                $body
            }
            Kind::Int => {
                type $T = i32;
                $body
            }
            Kind::Int16 => {
                type $T = i16;
                $body
            }
            Kind::Int8 => {
                type $T = i8;
                $body
            }
            Kind::Uint8 => {
                type $T = u8;
                $body
            }
            kind => Err(CommError::UnsupportedKind { op: $op, kind }),
        }
    };
}

/// An MPI communicator (the world or a sub-group) for CPU tensors.
pub struct MpiComm {
    // Declared before `universe` so that it is freed before MPI is finalised.
    comm: SimpleCommunicator,
    rank: usize,
    size: usize,
    /// The group's name in watchdog messages (`world`, `tp`, `dp`, `pp`).
    label: &'static str,
    /// MPI is finalised when the last communicator is dropped.
    universe: Arc<Universe>,
}

/// Set by [`MpiComm::init_world`].
static THREAD_MULTIPLE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// An [`MpiComm`] that may move to another thread ([`MpiComm::into_sendable`]).
#[derive(Debug)]
pub struct SendableComm(MpiComm);

// SAFETY: MPI was initialised with MPI_THREAD_MULTIPLE (checked by
// `into_sendable`), so any thread may call MPI; the communicator is owned
// by one thread at a time (it is moved, never shared), and its universe's
// reference count is atomic (`Arc`).
#[allow(unsafe_code)]
unsafe impl Send for SendableComm {}

impl SendableComm {
    /// The communicator, in the thread that now owns it.
    pub fn get(&self) -> &MpiComm {
        &self.0
    }
}

impl std::fmt::Debug for MpiComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiComm")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

fn is_half(kind: Kind) -> bool {
    matches!(kind, Kind::Half | Kind::BFloat16)
}

fn check_count(op: &'static str, elements: usize) -> Result<(), CommError> {
    if elements > i32::MAX as usize {
        return Err(CommError::TooLarge { op, elements });
    }
    Ok(())
}

impl MpiComm {
    /// Initialises MPI and returns the world communicator. Call once per
    /// process; MPI is finalised when this and every communicator split from it
    /// are dropped.
    /// It asks for `MPI_THREAD_MULTIPLE` ([`MpiComm::thread_multiple`]
    /// says whether the library provides it), so that ZeRO-3's prefetch
    /// thread can gather while the main thread runs its own collectives.
    pub fn init_world() -> Result<Self, CommError> {
        let (universe, provided) =
            mpi::initialize_with_threading(mpi::Threading::Multiple).ok_or(CommError::MpiInit)?;
        THREAD_MULTIPLE.store(
            provided == mpi::Threading::Multiple,
            std::sync::atomic::Ordering::Relaxed,
        );
        let comm = universe.world();
        let out = Self::wrap(comm, Arc::new(universe));
        tracing::debug!(rank = out.rank, size = out.size, "mpi world initialised");
        Ok(out)
    }

    /// Whether MPI was initialised with `MPI_THREAD_MULTIPLE`: two threads
    /// may then call collectives at once (on different communicators).
    pub fn thread_multiple() -> bool {
        THREAD_MULTIPLE.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// This communicator, movable to another thread; `None` unless MPI
    /// runs with `MPI_THREAD_MULTIPLE`.
    pub fn into_sendable(self) -> Option<SendableComm> {
        Self::thread_multiple().then_some(SendableComm(self))
    }

    fn wrap(comm: SimpleCommunicator, universe: Arc<Universe>) -> Self {
        // MPI ranks and sizes are non-negative c_ints.
        let rank = comm.rank() as usize;
        let size = comm.size() as usize;
        Self {
            comm,
            rank,
            size,
            label: "world",
            universe,
        }
    }

    /// Collective: a new communicator over the same ranks, with its own
    /// message space (so that its traffic never matches this one's).
    pub fn duplicate(&self) -> MpiComm {
        let mut d = Self::wrap(self.comm.duplicate(), Arc::clone(&self.universe));
        d.label = self.label;
        d
    }

    /// Collective: ranks passing the same `color` form a new communicator,
    /// ordered by `key` (ties by rank in `self`).
    pub fn split(&self, color: u32, key: i32) -> Result<MpiComm, CommError> {
        let c = i32::try_from(color).map_err(|_| CommError::Split { color })?;
        let comm = self
            .comm
            .split_by_color_with_key(Color::with_value(c), key)
            .ok_or(CommError::Split { color })?;
        Ok(Self::wrap(comm, Arc::clone(&self.universe)))
    }

    /// Collective: the communicator of this rank's group along `axis` of
    /// `mesh`, whose ranks are the mesh coordinates along that axis.
    pub fn split_axis(&self, mesh: Mesh, axis: Axis) -> Result<MpiComm, CommError> {
        mesh.check_world(self.size)?;
        let group = mesh.group(self.rank, axis)?;
        let coord = mesh.coord(self.rank)?;
        let pos = match axis {
            Axis::Tp => coord.tp,
            Axis::Dp => coord.dp,
            Axis::Pp => coord.pp,
        };
        // The group's first world rank names it uniquely.
        let color = group[0] as u32;
        let mut sub = self.split(color, pos as i32)?;
        sub.label = match axis {
            Axis::Tp => "tp",
            Axis::Dp => "dp",
            Axis::Pp => "pp",
        };
        tracing::debug!(
            world_rank = self.rank,
            ?axis,
            ?group,
            sub_rank = sub.rank,
            "axis communicator"
        );
        Ok(sub)
    }

    /// The raw rsmpi communicator, e.g. to bootstrap NCCL.
    pub fn raw(&self) -> &SimpleCommunicator {
        &self.comm
    }

    /// A contiguous CPU view of `t` (a copy only when `t` is not contiguous).
    fn cpu_contiguous(&self, op: &'static str, t: &Tensor) -> Result<Tensor, CommError> {
        if t.device() != Device::Cpu {
            return Err(CommError::WrongDevice {
                op,
                found: t.device(),
                expected: "cpu tensors",
            });
        }
        check_count(op, t.numel())?;
        Ok(t.f_contiguous()?)
    }

    fn check_root(&self, root: usize) -> Result<(), CommError> {
        if root >= self.size {
            return Err(CommError::RankOutOfRange {
                rank: root,
                size: self.size,
            });
        }
        Ok(())
    }

    /// Sums in f32 and rounds back, for the half kinds.
    fn via_f32(
        &self,
        t: &Tensor,
        f: impl FnOnce(&Tensor) -> Result<Tensor, CommError>,
    ) -> Result<Tensor, CommError> {
        let kind = t.kind();
        Ok(f(&t.f_to_kind(Kind::Float)?)?.f_to_kind(kind)?)
    }
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce(&self, t: &Tensor) -> Result<Tensor, CommError> {
        let _watch = crate::watchdog::enter("all_reduce", self.label, self.size);
        const OP: &str = "all_reduce";
        let t = self.cpu_contiguous(OP, t)?;
        let kind = t.kind();
        if is_half(kind) {
            return self.via_f32(&t, |x| self.all_reduce(x));
        }
        with_sum_type!(OP, kind, |T| {
            let mut out = Fresh::empty(&t.size(), kind)?;
            self.comm.all_reduce_into(
                as_slice::<T>(&t)?,
                out.as_mut_slice::<T>()?,
                SystemOperation::sum(),
            );
            Ok(out.into_tensor())
        })
    }

    fn all_gather(&self, t: &Tensor, dim: i64) -> Result<Tensor, CommError> {
        let _watch = crate::watchdog::enter("all_gather", self.label, self.size);
        const OP: &str = "all_gather";
        let t = self.cpu_contiguous(OP, t)?;
        let shape = t.size();
        super::layout::normalize_dim(OP, dim, shape.len())?;
        check_count(OP, t.numel() * self.size)?;
        let mut rows_shape = vec![self.size as i64];
        rows_shape.extend_from_slice(&shape);
        let kind = t.kind();
        let rows = with_transfer_type!(OP, kind, |T| {
            let mut rows = Fresh::empty(&rows_shape, kind)?;
            self.comm
                .all_gather_into(as_slice::<T>(&t)?, rows.as_mut_slice::<T>()?);
            Ok(rows.into_tensor())
        })?;
        concat_rows(OP, rows, dim)
    }

    fn reduce_scatter(&self, t: &Tensor, dim: i64) -> Result<Tensor, CommError> {
        let _watch = crate::watchdog::enter("reduce_scatter", self.label, self.size);
        const OP: &str = "reduce_scatter";
        let t = self.cpu_contiguous(OP, t)?;
        let kind = t.kind();
        if is_half(kind) {
            return self.via_f32(&t, |x| self.reduce_scatter(x, dim));
        }
        let (rows, chunk) = split_rows(OP, &t, dim, self.size)?;
        with_sum_type!(OP, kind, |T| {
            let mut out = Fresh::empty(&chunk, kind)?;
            self.comm.reduce_scatter_block_into(
                as_slice::<T>(&rows)?,
                out.as_mut_slice::<T>()?,
                SystemOperation::sum(),
            );
            Ok(out.into_tensor())
        })
    }

    fn all_to_all(&self, t: &Tensor, split_dim: i64, concat_dim: i64) -> Result<Tensor, CommError> {
        let _watch = crate::watchdog::enter("all_to_all", self.label, self.size);
        const OP: &str = "all_to_all";
        let t = self.cpu_contiguous(OP, t)?;
        super::layout::normalize_dim(OP, concat_dim, t.dim())?;
        let (rows, _chunk) = split_rows(OP, &t, split_dim, self.size)?;
        let kind = t.kind();
        let received = with_transfer_type!(OP, kind, |T| {
            let mut out = Fresh::empty(&rows.size(), kind)?;
            self.comm
                .all_to_all_into(as_slice::<T>(&rows)?, out.as_mut_slice::<T>()?);
            Ok(out.into_tensor())
        })?;
        concat_rows(OP, received, concat_dim)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor, CommError> {
        let _watch = crate::watchdog::enter("broadcast", self.label, self.size);
        const OP: &str = "broadcast";
        self.check_root(root)?;
        let t = self.cpu_contiguous(OP, t)?;
        let kind = t.kind();
        with_transfer_type!(OP, kind, |T| {
            let mut buf = if self.rank == root {
                Fresh::copy_of(&t)?
            } else {
                Fresh::empty(&t.size(), kind)?
            };
            self.comm
                .process_at_rank(root as i32)
                .broadcast_into(buf.as_mut_slice::<T>()?);
            Ok(buf.into_tensor())
        })
    }

    fn send(&self, t: &Tensor, dst: usize) -> Result<(), CommError> {
        let _watch = crate::watchdog::enter("send", self.label, self.size);
        const OP: &str = "send";
        check_peer(OP, dst, self.rank, self.size)?;
        let t = self.cpu_contiguous(OP, t)?;
        with_transfer_type!(OP, t.kind(), |T| {
            self.comm
                .process_at_rank(dst as i32)
                .send(as_slice::<T>(&t)?);
            Ok(())
        })
    }

    fn recv(&self, shape: &[i64], kind: Kind, src: usize) -> Result<Tensor, CommError> {
        let _watch = crate::watchdog::enter("recv", self.label, self.size);
        const OP: &str = "recv";
        check_peer(OP, src, self.rank, self.size)?;
        let mut out = Fresh::empty(shape, kind)?;
        with_transfer_type!(OP, kind, |T| {
            let buf = out.as_mut_slice::<T>()?;
            check_count(OP, buf.len())?;
            let from = self.comm.process_at_rank(src as i32);
            // Probing (not receiving) first leaves a message of the wrong size
            // queued, so a mismatch is an error instead of an MPI abort.
            let got = from.probe().count(T::equivalent_datatype());
            if got as usize != buf.len() {
                return Err(CommError::SizeMismatch {
                    src,
                    got: got as i64,
                    expected: buf.len(),
                    shape: shape.to_vec(),
                });
            }
            from.receive_into(buf);
            Ok(())
        })?;
        Ok(out.into_tensor())
    }

    fn send_recv(
        &self,
        t: &Tensor,
        dst: usize,
        shape: &[i64],
        kind: Kind,
        src: usize,
    ) -> Result<Tensor, CommError> {
        let _watch = crate::watchdog::enter("send_recv", self.label, self.size);
        const OP: &str = "send_recv";
        check_peer(OP, dst, self.rank, self.size)?;
        check_peer(OP, src, self.rank, self.size)?;
        let t = self.cpu_contiguous(OP, t)?;
        let mut out = Fresh::empty(shape, kind)?;
        let send_kind = t.kind();
        with_transfer_type!(OP, send_kind, |S| {
            let send = as_slice::<S>(&t)?;
            with_transfer_type!(OP, kind, |R| {
                let buf = out.as_mut_slice::<R>()?;
                check_count(OP, buf.len())?;
                mpi::request::scope(|scope| {
                    // The send is posted first so that a ring of ranks that all
                    // send then receive cannot deadlock.
                    let req = self
                        .comm
                        .process_at_rank(dst as i32)
                        .immediate_send(scope, send);
                    let from = self.comm.process_at_rank(src as i32);
                    let got = from.probe().count(R::equivalent_datatype());
                    let result = if got as usize == buf.len() {
                        from.receive_into(buf);
                        Ok(())
                    } else {
                        Err(CommError::SizeMismatch {
                            src,
                            got: got as i64,
                            expected: buf.len(),
                            shape: shape.to_vec(),
                        })
                    };
                    req.wait();
                    result
                })
            })
        })?;
        Ok(out.into_tensor())
    }

    fn barrier(&self) -> Result<(), CommError> {
        let _watch = crate::watchdog::enter("barrier", self.label, self.size);
        self.comm.barrier();
        Ok(())
    }
}
