//! The device mesh: how a flat rank maps onto (pp, dp, tp) coordinates and
//! which ranks share each axis. tp is innermost (neighbouring ranks, so a tp
//! group stays inside a node), then dp, then pp — Megatron's order.
//!
//! Pure arithmetic: no communication happens here.

use thiserror::Error;

/// Sizes of the parallel axes. `tp * dp * pp` is the world size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mesh {
    pub tp: usize,
    pub dp: usize,
    pub pp: usize,
}

/// One axis of the mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Axis {
    Tp,
    Dp,
    Pp,
}

/// A rank's position on every axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Coord {
    pub tp: usize,
    pub dp: usize,
    pub pp: usize,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum MeshError {
    #[error("mesh axes must be at least 1 (tp={tp}, dp={dp}, pp={pp})")]
    ZeroAxis { tp: usize, dp: usize, pp: usize },
    #[error("world size {world} does not match mesh tp={tp} x dp={dp} x pp={pp} = {expected}")]
    WorldMismatch {
        world: usize,
        tp: usize,
        dp: usize,
        pp: usize,
        expected: usize,
    },
    #[error("rank {rank} is outside a world of {world}")]
    RankOutOfRange { rank: usize, world: usize },
}

impl Mesh {
    pub fn new(tp: usize, dp: usize, pp: usize) -> Result<Self, MeshError> {
        if tp == 0 || dp == 0 || pp == 0 {
            return Err(MeshError::ZeroAxis { tp, dp, pp });
        }
        Ok(Self { tp, dp, pp })
    }

    pub fn world(&self) -> usize {
        self.tp * self.dp * self.pp
    }

    /// Checks that a launcher's world size matches this mesh.
    pub fn check_world(&self, world: usize) -> Result<(), MeshError> {
        if world != self.world() {
            return Err(MeshError::WorldMismatch {
                world,
                tp: self.tp,
                dp: self.dp,
                pp: self.pp,
                expected: self.world(),
            });
        }
        Ok(())
    }

    pub fn size(&self, axis: Axis) -> usize {
        match axis {
            Axis::Tp => self.tp,
            Axis::Dp => self.dp,
            Axis::Pp => self.pp,
        }
    }

    pub fn coord(&self, rank: usize) -> Result<Coord, MeshError> {
        if rank >= self.world() {
            return Err(MeshError::RankOutOfRange {
                rank,
                world: self.world(),
            });
        }
        Ok(Coord {
            tp: rank % self.tp,
            dp: (rank / self.tp) % self.dp,
            pp: rank / (self.tp * self.dp),
        })
    }

    pub fn rank(&self, coord: Coord) -> usize {
        coord.tp + self.tp * (coord.dp + self.dp * coord.pp)
    }

    /// The ranks that share every coordinate of `rank` but `axis`, in axis order.
    pub fn group(&self, rank: usize, axis: Axis) -> Result<Vec<usize>, MeshError> {
        let c = self.coord(rank)?;
        Ok((0..self.size(axis))
            .map(|i| {
                let mut m = c;
                match axis {
                    Axis::Tp => m.tp = i,
                    Axis::Dp => m.dp = i,
                    Axis::Pp => m.pp = i,
                }
                self.rank(m)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coords_round_trip_and_groups_partition_the_world() {
        let mesh = Mesh::new(2, 2, 2).expect("valid mesh");
        for r in 0..mesh.world() {
            let c = mesh.coord(r).expect("in range");
            assert_eq!(mesh.rank(c), r);
        }
        assert_eq!(mesh.group(5, Axis::Tp).expect("in range"), vec![4, 5]);
        assert_eq!(mesh.group(5, Axis::Dp).expect("in range"), vec![5, 7]);
        assert_eq!(mesh.group(5, Axis::Pp).expect("in range"), vec![1, 5]);
        for axis in [Axis::Tp, Axis::Dp, Axis::Pp] {
            let mut seen = vec![0; mesh.world()];
            for r in 0..mesh.world() {
                for m in mesh.group(r, axis).expect("in range") {
                    seen[m] += 1;
                }
            }
            // every rank appears in exactly size(axis) groups (once per member)
            assert!(seen.iter().all(|&n| n == mesh.size(axis)));
        }
    }

    #[test]
    fn bad_worlds_are_errors() {
        assert!(Mesh::new(0, 1, 1).is_err());
        let mesh = Mesh::new(2, 1, 2).expect("valid mesh");
        assert_eq!(
            mesh.check_world(8),
            Err(MeshError::WorldMismatch {
                world: 8,
                tp: 2,
                dp: 1,
                pp: 2,
                expected: 4
            })
        );
        assert!(mesh.coord(4).is_err());
    }
}
