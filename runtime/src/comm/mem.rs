//! Lends the memory of contiguous CPU tensors to MPI without copying.
//!
//! This is the crate's only `unsafe` code on the CPU path. Copying through a
//! `Vec` would be safe but costs two extra passes over every message (see
//! `examples/collective_bw.rs`, which measures both).
//!
//! Invariants, checked at run time before a slice is made:
//! - the tensor is defined, on the CPU and contiguous, so its `numel`
//!   elements lie back to back from `data_ptr` (storage offset included);
//! - its element size equals `size_of::<T>()` and the pointer is aligned for
//!   `T`; callers pick `T` from the tensor's kind (half kinds as `u16`, bool
//!   as `u8`), and every bit pattern is a valid `T` for those plain types;
//! - the slice borrows the `Tensor` handle, so the storage outlives it.
//!
//! Invariants the callers keep (not checkable here): nothing writes a tensor
//! lent as `&[T]` while the slice lives, i.e. no other thread runs a libtorch
//! op on it during a communication call; and a `&mut [T]` is only made from a
//! [`Fresh`] tensor, which this module allocates and which no other handle
//! shares until [`Fresh::into_tensor`] gives it away.
#![allow(unsafe_code)]

use super::CommError;
use std::mem::{align_of, size_of};
use tch::{Device, Kind, Tensor};

fn check<T>(t: &Tensor) -> Result<(), CommError> {
    if !t.defined() {
        return Err(CommError::Memory("undefined tensor".into()));
    }
    if t.device() != Device::Cpu {
        return Err(CommError::Memory(format!("tensor is on {:?}", t.device())));
    }
    if !t.is_contiguous() {
        return Err(CommError::Memory("tensor is not contiguous".into()));
    }
    let width = t.kind().elt_size_in_bytes();
    if width != size_of::<T>() {
        return Err(CommError::Memory(format!(
            "element of {:?} has {width} bytes, the transfer type {}",
            t.kind(),
            size_of::<T>()
        )));
    }
    let addr = t.data_ptr() as usize;
    if t.numel() > 0 && addr % align_of::<T>() != 0 {
        return Err(CommError::Memory(format!(
            "data pointer {addr:#x} is misaligned"
        )));
    }
    Ok(())
}

/// The elements of `t` as a slice, without copying.
pub(super) fn as_slice<T: Copy>(t: &Tensor) -> Result<&[T], CommError> {
    check::<T>(t)?;
    let n = t.numel();
    if n == 0 {
        return Ok(&[]);
    }
    let ptr = t.data_ptr() as *const T;
    // SAFETY: `check` proved the tensor is a contiguous CPU tensor of `n`
    // elements of T's size starting at an aligned, non-null `ptr`; the
    // returned slice borrows `t`, which keeps the storage alive; callers do not
    // write the tensor while the slice lives (module invariants).
    Ok(unsafe { std::slice::from_raw_parts(ptr, n) })
}

/// A newly allocated contiguous CPU tensor that no other handle shares yet,
/// so it may be written through a `&mut [T]`.
pub(super) struct Fresh(Tensor);

impl Fresh {
    /// Uninitialised storage of the given shape and kind.
    pub(super) fn empty(shape: &[i64], kind: Kind) -> Result<Self, CommError> {
        Ok(Self(Tensor::f_empty(shape, (kind, Device::Cpu))?))
    }

    /// A private contiguous copy of `t` (on the CPU).
    pub(super) fn copy_of(t: &Tensor) -> Result<Self, CommError> {
        let mut out = Self::empty(&t.size(), t.kind())?;
        out.0.f_copy_(t)?;
        Ok(out)
    }

    pub(super) fn as_mut_slice<T: Copy>(&mut self) -> Result<&mut [T], CommError> {
        check::<T>(&self.0)?;
        let n = self.0.numel();
        if n == 0 {
            return Ok(&mut []);
        }
        let ptr = self.0.data_ptr() as *mut T;
        // SAFETY: as in `as_slice`, plus exclusivity: `Fresh` is only built by
        // `empty`/`copy_of`, which allocate new storage, and it never hands out
        // another handle before `into_tensor` consumes it; `&mut self` keeps
        // this the only slice.
        Ok(unsafe { std::slice::from_raw_parts_mut(ptr, n) })
    }

    pub(super) fn into_tensor(self) -> Tensor {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_see_the_tensor_and_checks_refuse_bad_layouts() {
        let t = Tensor::arange(6, (Kind::Float, Device::Cpu)).view([2, 3]);
        assert_eq!(
            as_slice::<f32>(&t).expect("contiguous"),
            &[0., 1., 2., 3., 4., 5.]
        );
        // A view with a storage offset starts at its own first element.
        let row = t.get(1);
        assert_eq!(as_slice::<f32>(&row).expect("contiguous"), &[3., 4., 5.]);
        assert!(
            as_slice::<f32>(&t.tr()).is_err(),
            "transposed is not contiguous"
        );
        assert!(as_slice::<f64>(&t).is_err(), "width mismatch");
        let mut f = Fresh::empty(&[2, 2], Kind::BFloat16).expect("alloc");
        f.as_mut_slice::<u16>()
            .expect("fresh")
            .copy_from_slice(&[0x3f80; 4]);
        let ones = f.into_tensor().to_kind(Kind::Float);
        assert!(ones.equal(&Tensor::ones([2, 2], (Kind::Float, Device::Cpu))));
        let empty = Tensor::zeros([0, 3], (Kind::Float, Device::Cpu));
        assert!(as_slice::<f32>(&empty).expect("empty").is_empty());
    }
}
