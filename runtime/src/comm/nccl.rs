//! [`NcclComm`]: the [`Communicator`] for CUDA tensors over NCCL (cargo
//! feature `nccl`), bootstrapped by broadcasting NCCL's unique id over an
//! [`MpiComm`] of the same ranks.
//!
//! cudarc loads libcuda and libnccl at run time, so this compiles without
//! CUDA; [`NcclComm::new`] returns [`CommError::Unavailable`] on every rank
//! when any rank lacks a GPU or the libraries. Not exercised by the tests on
//! CPU-only machines.
//!
//! Every call is enqueued on the CUDA legacy default stream, which libtorch
//! also uses unless told otherwise, so collectives are ordered with the ops
//! that produce and consume their tensors; calls return once enqueued. Unlike
//! `MpiComm`, `recv` cannot check the size of the incoming message (NCCL does
//! not report it): both ends must agree on shape and kind.
//!
//! Unsafe code: the raw NCCL calls take device pointers. Each call passes
//! `data_ptr` of a contiguous tensor on this communicator's device whose kind
//! matches the NCCL datatype and whose element count is the `count` passed;
//! output tensors are freshly allocated here; the communicator handle is
//! valid from `comm_init_rank` until `Drop`.
#![allow(unsafe_code)]

use super::layout::{concat_rows, normalize_dim, split_rows};
use super::{CommError, Communicator, MpiComm, check_peer};
use cudarc::nccl::{result, sys};
use mpi::traits::{Communicator as _, *};
use std::ffi::c_void;
use tch::{Device, Kind, Tensor};

/// A NCCL communicator over the ranks of an MPI communicator, one GPU each.
pub struct NcclComm {
    comm: sys::ncclComm_t,
    rank: usize,
    size: usize,
    device: usize,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclComm")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

fn nccl_err(what: &str, e: result::NcclError) -> CommError {
    CommError::Nccl(format!("{what}: {e:?}"))
}

/// Why this process cannot use CUDA device `device` with NCCL, if it cannot.
fn unavailable(device: usize) -> Option<String> {
    if !tch::Cuda::is_available() {
        return Some("libtorch sees no CUDA device (CPU build or no driver)".into());
    }
    let count = tch::Cuda::device_count();
    if device as i64 >= count {
        return Some(format!("cuda device {device} requested, {count} present"));
    }
    // SAFETY: only tries to dlopen the library; no symbol is called.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Some("libcuda not found".into());
    }
    // SAFETY: as above.
    if !unsafe { sys::is_culib_present() } {
        return Some(
            "libnccl.so not found (pip's nvidia-nccl ships libnccl.so.2: add a libnccl.so link on the library path)"
                .into(),
        );
    }
    None
}

fn datatype(op: &'static str, kind: Kind, sum: bool) -> Result<sys::ncclDataType_t, CommError> {
    use sys::ncclDataType_t as T;
    Ok(match kind {
        Kind::Float => T::ncclFloat32,
        Kind::Double => T::ncclFloat64,
        Kind::Half => T::ncclFloat16,
        Kind::BFloat16 => T::ncclBfloat16,
        Kind::Int64 => T::ncclInt64,
        Kind::Int => T::ncclInt32,
        Kind::Int8 => T::ncclInt8,
        Kind::Uint8 => T::ncclUint8,
        Kind::Bool if !sum => T::ncclUint8,
        kind => return Err(CommError::UnsupportedKind { op, kind }),
    })
}

impl NcclComm {
    /// Collective over `mpi`: each rank drives CUDA device `device` (usually
    /// its local rank on the node). Fails on every rank if any rank cannot.
    pub fn new(mpi: &MpiComm, device: usize) -> Result<Self, CommError> {
        let problem = unavailable(device);
        let failing = mpi.all_reduce(&Tensor::from_slice(&[i64::from(problem.is_some())]))?;
        let failing = failing.f_int64_value(&[0])?;
        if let Some(p) = problem {
            return Err(CommError::Unavailable(p));
        }
        if failing > 0 {
            return Err(CommError::Unavailable(format!(
                "{failing} of {} ranks cannot use cuda/nccl",
                mpi.size()
            )));
        }
        let ctx = cudarc::driver::CudaContext::new(device)
            .map_err(|e| CommError::Unavailable(format!("cuda context: {e:?}")))?;
        ctx.bind_to_thread()
            .map_err(|e| CommError::Unavailable(format!("cuda context: {e:?}")))?;
        let mut id = [0u8; 128];
        if mpi.rank() == 0 {
            let unique = result::get_uniqueid().map_err(|e| nccl_err("unique id", e))?;
            for (b, c) in id.iter_mut().zip(unique.internal.iter()) {
                *b = *c as u8;
            }
        }
        mpi.raw().process_at_rank(0).broadcast_into(&mut id[..]);
        let mut unique = sys::ncclUniqueId { internal: [0; 128] };
        for (c, b) in unique.internal.iter_mut().zip(id.iter()) {
            *c = *b as std::ffi::c_char;
        }
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out-pointer; the id came from rank 0 of
        // this group; rank and size are this MPI communicator's.
        unsafe { result::comm_init_rank(&mut comm, mpi.size() as i32, unique, mpi.rank() as i32) }
            .map_err(|e| nccl_err("comm init", e))?;
        tracing::debug!(
            rank = mpi.rank(),
            size = mpi.size(),
            device,
            "nccl communicator"
        );
        Ok(Self {
            comm,
            rank: mpi.rank(),
            size: mpi.size(),
            device,
        })
    }

    fn stream() -> sys::cudaStream_t {
        // The legacy default stream (see the module doc).
        std::ptr::null_mut()
    }

    fn on_device(&self, op: &'static str, t: &Tensor) -> Result<Tensor, CommError> {
        if t.device() != Device::Cuda(self.device) {
            return Err(CommError::WrongDevice {
                op,
                found: t.device(),
                expected: "tensors on its cuda device",
            });
        }
        Ok(t.f_contiguous()?)
    }

    fn empty(&self, shape: &[i64], kind: Kind) -> Result<Tensor, CommError> {
        Ok(Tensor::f_empty(shape, (kind, Device::Cuda(self.device)))?)
    }
}

fn ptr(t: &Tensor) -> *mut c_void {
    t.data_ptr()
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // SAFETY: the handle came from comm_init_rank and is destroyed once.
        if let Err(e) = unsafe { result::comm_destroy(self.comm) } {
            tracing::warn!(error = ?e, "destroying nccl communicator");
        }
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce(&self, t: &Tensor) -> Result<Tensor, CommError> {
        const OP: &str = "all_reduce";
        let t = self.on_device(OP, t)?;
        let dt = datatype(OP, t.kind(), true)?;
        let out = self.empty(&t.size(), t.kind())?;
        // SAFETY: module invariants; both buffers hold numel elements of dt.
        unsafe {
            result::all_reduce(
                ptr(&t),
                ptr(&out),
                t.numel(),
                dt,
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                Self::stream(),
            )
        }
        .map_err(|e| nccl_err(OP, e))?;
        Ok(out)
    }

    fn all_gather(&self, t: &Tensor, dim: i64) -> Result<Tensor, CommError> {
        const OP: &str = "all_gather";
        let t = self.on_device(OP, t)?;
        normalize_dim(OP, dim, t.dim())?;
        let dt = datatype(OP, t.kind(), false)?;
        let mut rows = vec![self.size as i64];
        rows.extend(t.size());
        let out = self.empty(&rows, t.kind())?;
        // SAFETY: module invariants; out holds size * numel elements.
        unsafe { result::all_gather(ptr(&t), ptr(&out), t.numel(), dt, self.comm, Self::stream()) }
            .map_err(|e| nccl_err(OP, e))?;
        concat_rows(OP, out, dim)
    }

    fn reduce_scatter(&self, t: &Tensor, dim: i64) -> Result<Tensor, CommError> {
        const OP: &str = "reduce_scatter";
        let t = self.on_device(OP, t)?;
        let dt = datatype(OP, t.kind(), true)?;
        let (rows, chunk) = split_rows(OP, &t, dim, self.size)?;
        let out = self.empty(&chunk, t.kind())?;
        // SAFETY: module invariants; rows holds size * numel(out) elements.
        unsafe {
            result::reduce_scatter(
                ptr(&rows),
                ptr(&out),
                out.numel(),
                dt,
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                Self::stream(),
            )
        }
        .map_err(|e| nccl_err(OP, e))?;
        Ok(out)
    }

    fn all_to_all(&self, t: &Tensor, split_dim: i64, concat_dim: i64) -> Result<Tensor, CommError> {
        const OP: &str = "all_to_all";
        let t = self.on_device(OP, t)?;
        normalize_dim(OP, concat_dim, t.dim())?;
        let dt = datatype(OP, t.kind(), false)?;
        let (rows, _) = split_rows(OP, &t, split_dim, self.size)?;
        let out = self.empty(&rows.size(), t.kind())?;
        let n = rows.numel() / self.size.max(1);
        let width = t.kind().elt_size_in_bytes();
        result::group_start().map_err(|e| nccl_err(OP, e))?;
        for peer in 0..self.size {
            let offset = (peer * n * width) as isize;
            // SAFETY: module invariants; row `peer` of rows/out starts
            // `peer * n` elements in and holds n elements.
            let sent = unsafe {
                result::send(
                    ptr(&rows).byte_offset(offset),
                    n,
                    dt,
                    peer as i32,
                    self.comm,
                    Self::stream(),
                )
            };
            // SAFETY: as above.
            let received = unsafe {
                result::recv(
                    ptr(&out).byte_offset(offset),
                    n,
                    dt,
                    peer as i32,
                    self.comm,
                    Self::stream(),
                )
            };
            if let Err(e) = sent.and(received) {
                // Close the group before reporting, so NCCL stays usable.
                let _ = result::group_end();
                return Err(nccl_err(OP, e));
            }
        }
        result::group_end().map_err(|e| nccl_err(OP, e))?;
        concat_rows(OP, out, concat_dim)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor, CommError> {
        const OP: &str = "broadcast";
        if root >= self.size {
            return Err(CommError::RankOutOfRange {
                rank: root,
                size: self.size,
            });
        }
        let t = self.on_device(OP, t)?;
        let dt = datatype(OP, t.kind(), false)?;
        let out = self.empty(&t.size(), t.kind())?;
        // SAFETY: module invariants.
        unsafe {
            result::broadcast(
                ptr(&t),
                ptr(&out),
                t.numel(),
                dt,
                root as i32,
                self.comm,
                Self::stream(),
            )
        }
        .map_err(|e| nccl_err(OP, e))?;
        Ok(out)
    }

    fn send(&self, t: &Tensor, dst: usize) -> Result<(), CommError> {
        const OP: &str = "send";
        check_peer(OP, dst, self.rank, self.size)?;
        let t = self.on_device(OP, t)?;
        let dt = datatype(OP, t.kind(), false)?;
        // SAFETY: module invariants.
        unsafe {
            result::send(
                ptr(&t),
                t.numel(),
                dt,
                dst as i32,
                self.comm,
                Self::stream(),
            )
        }
        .map_err(|e| nccl_err(OP, e))?;
        Ok(())
    }

    fn recv(&self, shape: &[i64], kind: Kind, src: usize) -> Result<Tensor, CommError> {
        const OP: &str = "recv";
        check_peer(OP, src, self.rank, self.size)?;
        let dt = datatype(OP, kind, false)?;
        let out = self.empty(shape, kind)?;
        // SAFETY: module invariants.
        unsafe {
            result::recv(
                ptr(&out),
                out.numel(),
                dt,
                src as i32,
                self.comm,
                Self::stream(),
            )
        }
        .map_err(|e| nccl_err(OP, e))?;
        Ok(out)
    }

    fn send_recv(
        &self,
        t: &Tensor,
        dst: usize,
        shape: &[i64],
        kind: Kind,
        src: usize,
    ) -> Result<Tensor, CommError> {
        const OP: &str = "send_recv";
        check_peer(OP, dst, self.rank, self.size)?;
        check_peer(OP, src, self.rank, self.size)?;
        let t = self.on_device(OP, t)?;
        let send_dt = datatype(OP, t.kind(), false)?;
        let recv_dt = datatype(OP, kind, false)?;
        let out = self.empty(shape, kind)?;
        result::group_start().map_err(|e| nccl_err(OP, e))?;
        // SAFETY: module invariants.
        let sent = unsafe {
            result::send(
                ptr(&t),
                t.numel(),
                send_dt,
                dst as i32,
                self.comm,
                Self::stream(),
            )
        };
        // SAFETY: module invariants.
        let received = unsafe {
            result::recv(
                ptr(&out),
                out.numel(),
                recv_dt,
                src as i32,
                self.comm,
                Self::stream(),
            )
        };
        let closed = result::group_end();
        sent.and(received)
            .and(closed)
            .map_err(|e| nccl_err(OP, e))?;
        Ok(out)
    }

    fn barrier(&self) -> Result<(), CommError> {
        let one = Tensor::f_ones([1], (Kind::Float, Device::Cuda(self.device)))?;
        let _summed = self.all_reduce(&one)?;
        tch::Cuda::synchronize(self.device as i64);
        Ok(())
    }
}
