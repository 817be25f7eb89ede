//! Boxes of a global tensor and the byte copies between them.
//!
//! Every piece a checkpoint holds is a [`Region`] of a global tensor (an
//! offset and a shape per dim) stored contiguously in row-major order. A
//! rank's tp shard is one region; a ZeRO slice (a flat range of a shard)
//! is cut into at most `2·rank − 1` regions by [`flat_range_regions`], so
//! the file format has one kind of piece whatever the plan.

use serde::{Deserialize, Serialize};

/// A box of a tensor: `offset[d] .. offset[d] + shape[d]` on every dim.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Region {
    pub offset: Vec<u64>,
    pub shape: Vec<u64>,
}

impl Region {
    /// The whole of a tensor of `shape`.
    pub fn whole(shape: &[u64]) -> Self {
        Self {
            offset: vec![0; shape.len()],
            shape: shape.to_vec(),
        }
    }

    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }

    /// The region shifted by `by` (one offset per dim).
    pub fn shifted(&self, by: &[u64]) -> Self {
        Self {
            offset: self.offset.iter().zip(by).map(|(a, b)| a + b).collect(),
            shape: self.shape.clone(),
        }
    }

    /// The common part of two regions of the same tensor, if any.
    pub fn intersect(&self, other: &Region) -> Option<Region> {
        let n = self.offset.len();
        if other.offset.len() != n || self.shape.len() != n || other.shape.len() != n {
            return None;
        }
        let mut offset = Vec::with_capacity(self.offset.len());
        let mut shape = Vec::with_capacity(self.offset.len());
        for d in 0..self.offset.len() {
            let lo = self.offset[d].max(other.offset[d]);
            let hi = (self.offset[d].saturating_add(self.shape[d]))
                .min(other.offset[d].saturating_add(other.shape[d]));
            if hi <= lo {
                return None;
            }
            offset.push(lo);
            shape.push(hi - lo);
        }
        Some(Region { offset, shape })
    }

    /// Whether the region lies inside a tensor of `shape`.
    pub fn fits(&self, shape: &[u64]) -> bool {
        self.offset.len() == shape.len()
            && self.shape.len() == shape.len()
            && (0..shape.len()).all(|d| self.offset[d] + self.shape[d] <= shape[d])
    }
}

impl std::fmt::Display for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dims: Vec<String> = self
            .offset
            .iter()
            .zip(&self.shape)
            .map(|(o, s)| format!("{o}..{}", o + s))
            .collect();
        write!(f, "[{}]", dims.join(", "))
    }
}

/// The regions (relative to the tensor's origin) that the row-major flat
/// range `lo..hi` of a tensor of `shape` consists of, in order: each is
/// contiguous in the flat order, so a buffer holding the range splits into
/// them by their sizes. At most `2·shape.len() − 1` regions.
pub fn flat_range_regions(shape: &[u64], lo: u64, hi: u64) -> Vec<Region> {
    let mut out = Vec::new();
    cut(shape, lo, hi, &mut Vec::new(), &mut out);
    out
}

fn cut(shape: &[u64], lo: u64, hi: u64, prefix: &mut Vec<u64>, out: &mut Vec<Region>) {
    if lo >= hi {
        return;
    }
    let Some((&first, rest)) = shape.split_first() else {
        out.push(Region {
            offset: prefix.clone(),
            shape: vec![],
        });
        return;
    };
    let inner: u64 = rest.iter().product();
    let full = |prefix: &[u64], from: u64, to: u64| {
        let mut offset = prefix.to_vec();
        offset.push(from);
        offset.extend(std::iter::repeat_n(0, rest.len()));
        let mut s = vec![1; prefix.len()];
        s.push(to - from);
        s.extend_from_slice(rest);
        Region { offset, shape: s }
    };
    // Lift the prefix's unit dims into the regions' shapes.
    let (mut a, b) = (lo / inner, hi / inner);
    let (lo_in, hi_in) = (lo % inner, hi % inner);
    if a == b {
        prefix.push(a);
        cut(rest, lo_in, hi_in, prefix, out);
        prefix.pop();
        return;
    }
    if lo_in != 0 {
        prefix.push(a);
        cut(rest, lo_in, inner, prefix, out);
        prefix.pop();
        a += 1;
    }
    if b > a {
        out.push(full(prefix, a, b));
    }
    if hi_in != 0 && b < first {
        prefix.push(b);
        cut(rest, 0, hi_in, prefix, out);
        prefix.pop();
    }
}

/// Copies the elements of `part` (a region of the tensor inside both
/// `src_region` and `dst_region`) from `src` (holding `src_region`,
/// row-major) into `dst` (holding `dst_region`), `elem` bytes an element.
/// Contiguous runs are copied whole.
pub fn copy_region(
    src: &[u8],
    src_region: &Region,
    dst: &mut [u8],
    dst_region: &Region,
    part: &Region,
    elem: usize,
) {
    let n = part.shape.len();
    if part.numel() == 0 {
        return;
    }
    let strides = |shape: &[u64]| -> Vec<u64> {
        let mut s = vec![1u64; shape.len()];
        for d in (0..shape.len().saturating_sub(1)).rev() {
            s[d] = s[d + 1] * shape[d + 1];
        }
        s
    };
    let (ss, ds) = (strides(&src_region.shape), strides(&dst_region.shape));
    // Trailing dims that `part` covers whole in both buffers merge into one run.
    let mut k = n;
    let mut run = 1u64;
    while k > 0 {
        let d = k - 1;
        run *= part.shape[d];
        k -= 1;
        let whole_in_both =
            part.shape[d] == src_region.shape[d] && part.shape[d] == dst_region.shape[d];
        if !whole_in_both {
            break;
        }
    }
    let run_bytes = run as usize * elem;
    let mut idx = vec![0u64; k];
    loop {
        let (mut so, mut dofs) = (0u64, 0u64);
        for d in 0..n {
            let at = part.offset[d] + if d < k { idx[d] } else { 0 };
            so += (at - src_region.offset[d]) * ss[d];
            dofs += (at - dst_region.offset[d]) * ds[d];
        }
        let (so, dofs) = (so as usize * elem, dofs as usize * elem);
        dst[dofs..dofs + run_bytes].copy_from_slice(&src[so..so + run_bytes]);
        // The odometer over the leading dims.
        let mut d = k;
        loop {
            if d == 0 {
                return;
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < part.shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat_index(shape: &[u64], at: &[u64]) -> u64 {
        at.iter().zip(shape).fold(0, |acc, (i, s)| acc * s + i)
    }

    fn elements(r: &Region) -> Vec<Vec<u64>> {
        let mut out = vec![vec![]];
        for d in 0..r.shape.len() {
            out = out
                .into_iter()
                .flat_map(|p| {
                    (r.offset[d]..r.offset[d] + r.shape[d]).map(move |i| {
                        let mut q = p.clone();
                        q.push(i);
                        q
                    })
                })
                .collect();
        }
        out
    }

    #[test]
    fn flat_ranges_cut_into_ordered_contiguous_regions() {
        let shapes: [&[u64]; 5] = [&[7], &[3, 5], &[2, 3, 4], &[4, 1, 3], &[]];
        for shape in shapes {
            let total: u64 = shape.iter().product();
            for lo in 0..=total {
                for hi in lo..=total {
                    let regions = flat_range_regions(shape, lo, hi);
                    assert!(regions.len() <= (2 * shape.len()).max(1), "{shape:?}");
                    let flat: Vec<u64> = regions
                        .iter()
                        .flat_map(|r| {
                            assert!(r.fits(shape), "{shape:?} {lo}..{hi}: {r}");
                            elements(r).into_iter().map(|e| flat_index(shape, &e))
                        })
                        .collect();
                    assert_eq!(flat, (lo..hi).collect::<Vec<_>>(), "{shape:?} {lo}..{hi}");
                }
            }
        }
    }

    #[test]
    fn copies_move_exactly_the_common_elements() {
        // A 4x6 tensor whose element (i, j) is 10 i + j, as one byte each.
        let shape = [4u64, 6];
        let value = |at: &[u64]| (10 * at[0] + at[1]) as u8;
        let fill = |r: &Region| elements(r).iter().map(|e| value(e)).collect::<Vec<u8>>();
        let src_region = Region {
            offset: vec![1, 0],
            shape: vec![2, 6],
        };
        let dst_region = Region {
            offset: vec![0, 2],
            shape: vec![4, 3],
        };
        let src = fill(&src_region);
        let mut dst = vec![255u8; dst_region.numel() as usize];
        let part = src_region.intersect(&dst_region).expect("overlap");
        assert_eq!(part.to_string(), "[1..3, 2..5]");
        copy_region(&src, &src_region, &mut dst, &dst_region, &part, 1);
        for (e, got) in elements(&dst_region).iter().zip(&dst) {
            let inside = (1..3).contains(&e[0]);
            assert_eq!(*got, if inside { value(e) } else { 255 }, "{e:?}");
        }
        // Whole rows merge into one run; multi-byte elements.
        let whole = Region::whole(&shape);
        let src: Vec<u8> = fill(&whole).iter().flat_map(|v| [*v, 0]).collect();
        let mut dst = vec![0u8; 2 * src_region.numel() as usize];
        copy_region(&src, &whole, &mut dst, &src_region, &src_region, 2);
        let want: Vec<u8> = fill(&src_region).iter().flat_map(|v| [*v, 0]).collect();
        assert_eq!(dst, want);
        assert_eq!(
            Region {
                offset: vec![0, 0],
                shape: vec![1, 2]
            }
            .intersect(&Region {
                offset: vec![0, 2],
                shape: vec![1, 2]
            }),
            None
        );
    }
}
