//! The exact optimum of a segment's sharding problem by variable
//! elimination (min-sum bucket elimination), the solver the search uses
//! first; z3's MaxSAT ([`Segment::solve_z3`]) remains for problems whose
//! tables would grow too large.
//!
//! The objective [`Segment::evaluate`] is a sum of factors: each op's
//! compute under its choice, and each tensor's forward conversions and
//! backward gradient combination, which depend only on the choices of the
//! tensor's producer and consumers. A transformer layer's dataflow is
//! nearly a chain, so eliminating the ops one at a time (the one whose
//! merged table is smallest first) keeps every table small: the layer of
//! Llama at tp 64 (19 ops, 3.8e7 assignments) takes well under a
//! millisecond, where the MaxSAT solve took 0.2-0.5 s.

use crate::cost::Cluster;

use super::sharding::{Ps, Segment, Source};

/// A table of costs over the choices of the ops in `scope` (positions into
/// each op's allowed choices), row-major with the last op fastest.
struct Factor {
    scope: Vec<usize>,
    strides: Vec<usize>,
    table: Vec<Ps>,
}

impl Factor {
    /// The factor over `scope` whose entry for each assignment of it
    /// (written into `pos`, positions into the allowed choices) is `cost`.
    fn fill(
        scope: Vec<usize>,
        dims: &[usize],
        pos: &mut [usize],
        mut cost: impl FnMut(&[usize]) -> Ps,
    ) -> Factor {
        let mut strides = vec![1; scope.len()];
        for i in (0..scope.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * dims[scope[i + 1]];
        }
        let size: usize = scope.iter().map(|&v| dims[v]).product();
        for &v in &scope {
            pos[v] = 0;
        }
        let mut table = Vec::with_capacity(size);
        for _ in 0..size {
            table.push(cost(pos));
            for &v in scope.iter().rev() {
                pos[v] += 1;
                if pos[v] < dims[v] {
                    break;
                }
                pos[v] = 0;
            }
        }
        Factor {
            scope,
            strides,
            table,
        }
    }

    fn at(&self, pos: &[usize]) -> Ps {
        let i: usize = self
            .scope
            .iter()
            .zip(&self.strides)
            .map(|(&v, &s)| pos[v] * s)
            .sum();
        self.table[i]
    }
}

/// The optimum assignment (a choice index per op) and its cost, with the
/// ops of `fixed` pinned; `None` when some table would exceed
/// `max_entries` (the caller then asks z3).
pub fn solve(
    seg: &Segment,
    cluster: &Cluster,
    fixed: &[(usize, usize)],
    max_entries: usize,
) -> Option<(Vec<usize>, Ps)> {
    let n = seg.ops.len();
    // The choices each op may take.
    let allowed: Vec<Vec<usize>> = (0..n)
        .map(|o| match fixed.iter().find(|&&(f, _)| f == o) {
            Some(&(_, c)) => vec![c],
            None => (0..seg.ops[o].choices.len()).collect(),
        })
        .collect();
    let dims: Vec<usize> = allowed.iter().map(Vec::len).collect();
    if dims.contains(&0) {
        return None;
    }
    let mut pos = vec![0usize; n];
    let mut factors: Vec<Factor> = Vec::new();
    for (o, choices) in allowed.iter().enumerate() {
        factors.push(Factor::fill(vec![o], &dims, &mut pos, |pos| {
            let ch = &seg.ops[o].choices[choices[pos[o]]];
            ch.fwd_ps.saturating_add(ch.bwd_ps)
        }));
    }
    let mut constant: Ps = 0;
    for t in &seg.tensors {
        let mut scope: Vec<usize> = t.consumers.iter().map(|&(o, _)| o).collect();
        if let Source::Op(p, _) = t.source {
            scope.push(p);
        }
        scope.sort_unstable();
        scope.dedup();
        let size = scope
            .iter()
            .map(|&v| dims[v])
            .fold(1, usize::saturating_mul);
        if size > max_entries {
            return None;
        }
        let f = Factor::fill(scope, &dims, &mut pos, |pos| {
            seg.tensor_cost(cluster, t, &|o| allowed[o][pos[o]])
        });
        if f.scope.is_empty() {
            constant = constant.saturating_add(f.table[0]);
        } else {
            factors.push(f);
        }
    }

    // Eliminate every op, keeping each one's bucket for the way back.
    let mut remaining: Vec<bool> = vec![true; n];
    let mut buckets: Vec<(usize, Vec<Factor>)> = Vec::with_capacity(n);
    for _ in 0..n {
        // The op whose merged table is smallest.
        let mut best: Option<(usize, usize, Vec<usize>)> = None;
        for v in (0..n).filter(|&v| remaining[v]) {
            let mut scope: Vec<usize> = factors
                .iter()
                .filter(|f| f.scope.contains(&v))
                .flat_map(|f| f.scope.iter().copied())
                .filter(|&u| u != v)
                .collect();
            scope.sort_unstable();
            scope.dedup();
            let size = scope
                .iter()
                .map(|&u| dims[u])
                .fold(dims[v], usize::saturating_mul);
            if best.as_ref().is_none_or(|b| size < b.1) {
                best = Some((v, size, scope));
            }
        }
        let (v, size, scope) = best?;
        if size > max_entries {
            return None;
        }
        remaining[v] = false;
        let (bucket, rest): (Vec<Factor>, Vec<Factor>) =
            factors.into_iter().partition(|f| f.scope.contains(&v));
        factors = rest;
        let merged = Factor::fill(scope, &dims, &mut pos, |pos| {
            let mut here = pos.to_vec();
            (0..dims[v])
                .map(|k| {
                    here[v] = k;
                    bucket
                        .iter()
                        .fold(0 as Ps, |acc, f| acc.saturating_add(f.at(&here)))
                })
                .min()
                .unwrap_or(0)
        });
        if merged.scope.is_empty() {
            constant = constant.saturating_add(merged.table[0]);
        } else {
            factors.push(merged);
        }
        buckets.push((v, bucket));
    }

    // Back: each op takes its best choice given the ops eliminated after it
    // (already chosen); ties go to the lowest choice index.
    for (v, bucket) in buckets.iter().rev() {
        let mut best = (Ps::MAX, 0usize);
        for k in 0..dims[*v] {
            pos[*v] = k;
            let cost = bucket
                .iter()
                .fold(0 as Ps, |acc, f| acc.saturating_add(f.at(&pos)));
            if cost < best.0 {
                best = (cost, k);
            }
        }
        pos[*v] = best.1;
    }
    let assignment: Vec<usize> = (0..n).map(|o| allowed[o][pos[o]]).collect();
    let cost = seg.evaluate(cluster, &assignment);
    debug_assert_eq!(
        cost, constant,
        "the assignment costs what elimination found"
    );
    Some((assignment, cost))
}
