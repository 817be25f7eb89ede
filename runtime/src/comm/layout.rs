//! Tensor layouts around a collective: the transports move flat buffers whose
//! leading axis is the rank; these functions turn "split or concatenate along
//! dim d" into that form and back. Pure tch, shared by every transport.

use super::CommError;
use tch::Tensor;

/// Resolves a possibly negative `dim` against a tensor of `ndim` dims.
pub(crate) fn normalize_dim(op: &'static str, dim: i64, ndim: usize) -> Result<usize, CommError> {
    let n = ndim as i64;
    let d = if dim < 0 { dim + n } else { dim };
    if d < 0 || d >= n {
        return Err(CommError::DimOutOfRange { op, dim, ndim });
    }
    Ok(d as usize)
}

/// Reorders `t` into `[parts, ..chunk]` (chunk i along `dim` becomes row i),
/// contiguous, ready to be scattered. Returns it with the chunk's shape.
pub(crate) fn split_rows(
    op: &'static str,
    t: &Tensor,
    dim: i64,
    parts: usize,
) -> Result<(Tensor, Vec<i64>), CommError> {
    let shape = t.size();
    let d = normalize_dim(op, dim, shape.len())?;
    let len = shape[d];
    if len % parts as i64 != 0 {
        return Err(CommError::NotDivisible {
            op,
            dim: d,
            len,
            parts,
        });
    }
    let mut chunk = shape.clone();
    chunk[d] = len / parts as i64;
    let mut split = shape[..d].to_vec();
    split.push(parts as i64);
    split.extend_from_slice(&chunk[d..]);
    let rows = t
        .f_reshape(&split)?
        .f_movedim([d as i64], [0])?
        .f_contiguous()?;
    Ok((rows, chunk))
}

/// The inverse: from `[parts, ..chunk]` to the concatenation of the rows along `dim`.
pub(crate) fn concat_rows(op: &'static str, rows: Tensor, dim: i64) -> Result<Tensor, CommError> {
    let shape = rows.size();
    let chunk = &shape[1..];
    let d = normalize_dim(op, dim, chunk.len())?;
    if d == 0 {
        let mut out = chunk.to_vec();
        out[0] *= shape[0];
        return Ok(rows.f_reshape(&out)?);
    }
    let mut out = chunk.to_vec();
    out[d] *= shape[0];
    Ok(rows.f_movedim([0], [d as i64])?.f_reshape(&out)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn split_then_concat_is_identity_for_every_dim() {
        let t = Tensor::arange(4 * 6 * 2, (Kind::Float, Device::Cpu)).view([4, 6, 2]);
        for dim in [0i64, 1, 2, -1, -3] {
            let (rows, chunk) = split_rows("test", &t, dim, 2).expect("divisible");
            assert_eq!(rows.size()[0], 2);
            let d = normalize_dim("test", dim, 3).expect("in range");
            let pieces = t.chunk(2, d as i64);
            for (i, p) in pieces.iter().enumerate() {
                assert_eq!(p.size(), chunk);
                assert!(rows.get(i as i64).equal(p));
            }
            let back = concat_rows("test", rows, dim).expect("in range");
            assert!(back.equal(&t));
        }
    }

    #[test]
    fn bad_dims_and_sizes_are_errors() {
        let t = Tensor::zeros([3, 4], (Kind::Float, Device::Cpu));
        assert!(matches!(
            split_rows("test", &t, 2, 2),
            Err(CommError::DimOutOfRange { dim: 2, .. })
        ));
        assert!(matches!(
            split_rows("test", &t, 0, 2),
            Err(CommError::NotDivisible { len: 3, .. })
        ));
        assert!(matches!(
            normalize_dim("test", -3, 2),
            Err(CommError::DimOutOfRange { .. })
        ));
    }
}
