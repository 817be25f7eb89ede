//! The optimizer's state in and out of checkpoints, as regions of global
//! tensors ([`autopart_vocab::ckpt`]), so that any plan reads what any
//! other plan wrote.
//!
//! **Who writes what.** Every dp rank holds (under ZeRO 0) or owns (under
//! ZeRO 1–3) the `r`-th slice of each bucket; rank `r` writes exactly that
//! slice of every state — the parameter values, AdamW's two moments and,
//! for parameters that are not f32 (bf16 / f16 training), the f32 master
//! copy — cut
//! at parameter boundaries into regions of the parameters' global tensors
//! ([`flat_range_regions`] of the tp shard, shifted to the shard's place).
//! A tp-replicated parameter is written by tp rank 0 only (the rank that
//! counts it in the gradient norm). So each element of the model's state
//! is written once, and writing is spread over every rank.
//!
//! **Reading.** A rank reads the regions its own layout needs: each
//! parameter's tp shard whole (ZeRO 0–2 hold parameters whole between
//! steps), and its moments and master slices per bucket (ZeRO 1–3: only
//! the owned flat ranges; ZeRO 0: whole shards). The master copy comes
//! from the `master` state when the checkpoint has one, else from the
//! parameter values.

use super::{Bucket, DpOptimizer, Slot, ZeroStage};
use crate::exec::Param;
use crate::optim::{NormShare, OptimError};
use autopart_vocab::ckpt::{Checkpoint, Dtype, Piece, Region, State, flat_range_regions};
use tch::{Kind, Tensor};

/// The checkpoint dtype of a tensor kind.
pub fn dtype_of(kind: Kind) -> Result<Dtype, OptimError> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Half => Dtype::F16,
        other => {
            return Err(OptimError::Restore(format!(
                "parameters of kind {other:?} cannot be checkpointed"
            )));
        }
    })
}

/// The tensor kind of a checkpoint dtype.
pub fn kind_of(dtype: Dtype) -> Kind {
    match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F16 => Kind::Half,
    }
}

/// The bytes of `t` (made contiguous), row-major.
fn bytes_of(t: &Tensor) -> Result<Vec<u8>, OptimError> {
    let t = t.f_contiguous()?;
    let numel = t.numel();
    let mut out = vec![0u8; numel * t.kind().elt_size_in_bytes()];
    t.f_copy_data_u8(&mut out, numel)?;
    Ok(out)
}

/// A tensor of `shape` from checkpoint bytes, as `kind`.
fn tensor_of(dtype: Dtype, bytes: &[u8], shape: &[i64], kind: Kind) -> Result<Tensor, OptimError> {
    Ok(Tensor::f_from_data_size(bytes, shape, kind_of(dtype))?.f_to_kind(kind)?)
}

fn to_u64(v: &[i64]) -> Vec<u64> {
    v.iter().map(|&x| x.max(0) as u64).collect()
}

impl DpOptimizer {
    /// The region of the global tensor that parameter `p`'s tp shard is.
    fn shard_region(&self, p: &Param) -> Region {
        crate::init::shard_region(p, self.tp_rank, self.tp_size)
    }

    /// For each slot of bucket `b` this rank writes or reads: the slot, the
    /// range of the bucket (`start..end`) and the slot-local flat range.
    fn owned_parts<'b>(&self, b: &'b Bucket) -> Vec<(&'b Slot, i64, i64)> {
        let (lo, hi) = b.owned(self.dp_rank, self.dp_size);
        b.slots
            .iter()
            .filter_map(|s| {
                let (start, end) = (s.offset.max(lo), (s.offset + s.numel).min(hi));
                (start < end).then_some((s, start, end))
            })
            .collect()
    }

    /// This rank's share of the model's state as checkpoint pieces (copies:
    /// training may go on while they are written). Under ZeRO-3 the
    /// parameters may be released; their values come from the master slices.
    pub fn snapshot(&self, params: &[Param]) -> Result<Vec<Piece>, OptimError> {
        self.check_len(params)?;
        let sharded = self.cfg.zero != ZeroStage::Off;
        let mut pieces = Vec::new();
        tch::no_grad(|| -> Result<(), OptimError> {
            for (bi, b) in self.buckets.iter().enumerate() {
                let (lo, _) = b.owned(self.dp_rank, self.dp_size);
                for (s, start, end) in self.owned_parts(b) {
                    if s.share != NormShare::Counted {
                        continue;
                    }
                    let p = &params[s.param];
                    let shard = self.shard_region(p);
                    let (a, n) = (start - s.offset, end - start);
                    let mut states: Vec<(State, Tensor)> = Vec::with_capacity(4);
                    if sharded {
                        let m = self.master[bi].f_narrow(0, start - lo, n)?;
                        let values = if self.cfg.zero == ZeroStage::Three {
                            m.f_to_kind(s.kind)?
                        } else {
                            p.tensor.f_detach()?.f_reshape([-1])?.f_narrow(0, a, n)?
                        };
                        states.push((State::Param, values));
                        if s.kind != Kind::Float {
                            states.push((State::Master, m.shallow_clone()));
                        }
                        for (state, moments) in [
                            (State::ExpAvg, &self.state.exp_avg),
                            (State::ExpAvgSq, &self.state.exp_avg_sq),
                        ] {
                            states.push((state, moments[bi].f_narrow(0, start - lo, n)?));
                        }
                    } else {
                        let flat = |t: &Tensor| -> Result<Tensor, OptimError> {
                            Ok(t.f_detach()?.f_reshape([-1])?.f_narrow(0, a, n)?)
                        };
                        states.push((State::Param, flat(&p.tensor)?));
                        if let Some(m) = &self.replica_master[s.param] {
                            states.push((State::Master, flat(m)?));
                        }
                        states.push((State::ExpAvg, flat(&self.state.exp_avg[s.param])?));
                        states.push((State::ExpAvgSq, flat(&self.state.exp_avg_sq[s.param])?));
                    }
                    let regions = flat_range_regions(&shard.shape, a as u64, (a + n) as u64);
                    for (state, t) in states {
                        let dtype = dtype_of(t.kind())?;
                        // One copy per region, straight out of the tensor.
                        let mut at = 0i64;
                        for r in &regions {
                            let len = r.numel() as i64;
                            pieces.push(Piece {
                                tensor: p.spec.name.clone(),
                                state,
                                global_shape: to_u64(&p.spec.shape),
                                region: r.shifted(&shard.offset),
                                dtype,
                                data: bytes_of(&t.f_narrow(0, at, len)?)?,
                            });
                            at += len;
                        }
                    }
                }
            }
            Ok(())
        })?;
        Ok(pieces)
    }

    /// The f32 values of `region` of `tensor`'s master copy: the `master`
    /// state when saved, else the parameter values.
    fn read_master(
        ck: &Checkpoint,
        tensor: &str,
        region: &Region,
    ) -> Result<(Dtype, Vec<u8>), OptimError> {
        let state = if ck.has(tensor, State::Master) {
            State::Master
        } else {
            State::Param
        };
        Ok(ck.read_region(tensor, state, region)?)
    }

    /// Flat f32 values of the slot-local range `a..a+n` of `p`'s shard.
    fn read_flat(
        &self,
        ck: &Checkpoint,
        p: &Param,
        state: State,
        a: i64,
        n: i64,
    ) -> Result<Tensor, OptimError> {
        let shard = self.shard_region(p);
        let mut parts = Vec::new();
        for r in flat_range_regions(&shard.shape, a as u64, (a + n) as u64) {
            let r = r.shifted(&shard.offset);
            let (dtype, bytes) = match state {
                State::Master => Self::read_master(ck, &p.spec.name, &r)?,
                _ => ck.read_region(&p.spec.name, state, &r)?,
            };
            let len = r.numel() as i64;
            parts.push(tensor_of(dtype, &bytes, &[len], Kind::Float)?);
        }
        Ok(Tensor::f_cat(&parts, 0)?)
    }

    /// Loads the parameters and the optimizer state from `ck`, whatever
    /// plan wrote it: every parameter's global shape must match. Under
    /// ZeRO-3 the parameters stay released (the step gathers them from the
    /// restored master slices).
    pub fn restore(&mut self, params: &mut [Param], ck: &Checkpoint) -> Result<(), OptimError> {
        self.check_len(params)?;
        for p in params.iter() {
            ck.check_shape(&p.spec.name, &to_u64(&p.spec.shape))?;
        }
        tch::no_grad(|| -> Result<(), OptimError> {
            if self.cfg.zero != ZeroStage::Three {
                for p in params.iter() {
                    let shard = self.shard_region(p);
                    let (dtype, bytes) = Self::read_master(ck, &p.spec.name, &shard)?;
                    let t = tensor_of(dtype, &bytes, &p.tensor.size(), p.tensor.kind())?;
                    p.tensor.detach().f_copy_(&t)?;
                }
            }
            match self.cfg.zero {
                ZeroStage::Off => {
                    for (i, p) in params.iter().enumerate() {
                        let n = p.tensor.numel() as i64;
                        let size = p.tensor.size();
                        let master = self.replica_master[i].as_ref();
                        let targets = [
                            (State::ExpAvg, Some(&self.state.exp_avg[i])),
                            (State::ExpAvgSq, Some(&self.state.exp_avg_sq[i])),
                            (State::Master, master),
                        ];
                        for (state, target) in targets {
                            if let Some(target) = target {
                                let t = self.read_flat(ck, p, state, 0, n)?;
                                target.detach().f_copy_(&t.f_view(size.as_slice())?)?;
                            }
                        }
                    }
                }
                ZeroStage::One | ZeroStage::Two | ZeroStage::Three => {
                    for (bi, b) in self.buckets.iter().enumerate() {
                        let (lo, _) = b.owned(self.dp_rank, self.dp_size);
                        for (s, start, end) in self.owned_parts(b) {
                            let p = &params[s.param];
                            let (a, n) = (start - s.offset, end - start);
                            for (state, target) in [
                                (State::Master, &self.master[bi]),
                                (State::ExpAvg, &self.state.exp_avg[bi]),
                                (State::ExpAvgSq, &self.state.exp_avg_sq[bi]),
                            ] {
                                let t = self.read_flat(ck, p, state, a, n)?;
                                target.f_narrow(0, start - lo, n)?.f_copy_(&t)?;
                            }
                        }
                    }
                }
            }
            Ok(())
        })?;
        self.state.steps = ck.manifest.optimizer_steps;
        Ok(())
    }
}
