//! [`SoloComm`]: the communicator of a group with one rank (a mesh axis of
//! size 1, or a single-process run without MPI). Collectives over one rank
//! are copies; there is no peer to send to.

use super::layout::normalize_dim;
use super::{CommError, Communicator};
use tch::{Kind, Tensor};

/// Every peer of the only rank is itself or out of range.
fn no_peer(op: &'static str, peer: usize) -> CommError {
    if peer == 0 {
        CommError::SelfMessage { op, rank: 0 }
    } else {
        CommError::RankOutOfRange {
            rank: peer,
            size: 1,
        }
    }
}

/// A one-rank communicator that needs no launcher.
#[derive(Clone, Copy, Debug, Default)]
pub struct SoloComm;

impl Communicator for SoloComm {
    fn rank(&self) -> usize {
        0
    }

    fn size(&self) -> usize {
        1
    }

    fn all_reduce(&self, t: &Tensor) -> Result<Tensor, CommError> {
        Ok(t.f_detach_copy()?)
    }

    fn all_gather(&self, t: &Tensor, dim: i64) -> Result<Tensor, CommError> {
        normalize_dim("all_gather", dim, t.dim())?;
        Ok(t.f_detach_copy()?)
    }

    fn reduce_scatter(&self, t: &Tensor, dim: i64) -> Result<Tensor, CommError> {
        normalize_dim("reduce_scatter", dim, t.dim())?;
        Ok(t.f_detach_copy()?)
    }

    fn all_to_all(&self, t: &Tensor, split_dim: i64, concat_dim: i64) -> Result<Tensor, CommError> {
        normalize_dim("all_to_all", split_dim, t.dim())?;
        normalize_dim("all_to_all", concat_dim, t.dim())?;
        Ok(t.f_detach_copy()?)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor, CommError> {
        if root != 0 {
            return Err(CommError::RankOutOfRange {
                rank: root,
                size: 1,
            });
        }
        Ok(t.f_detach_copy()?)
    }

    fn send(&self, _t: &Tensor, dst: usize) -> Result<(), CommError> {
        Err(no_peer("send", dst))
    }

    fn recv(&self, _shape: &[i64], _kind: Kind, src: usize) -> Result<Tensor, CommError> {
        Err(no_peer("recv", src))
    }

    fn send_recv(
        &self,
        _t: &Tensor,
        dst: usize,
        _shape: &[i64],
        _kind: Kind,
        _src: usize,
    ) -> Result<Tensor, CommError> {
        Err(no_peer("send_recv", dst))
    }

    fn barrier(&self) -> Result<(), CommError> {
        Ok(())
    }
}
