//! Adapters between layouts, and the cheapest chain of them between two states.
//!
//! A value's **state** on the tp axis is its forward layout together with the
//! layout its gradient has in backward. A producer fixes the state of its
//! output (`D(d)` outputs want `D(d)` gradients, `R` and `V` outputs want the
//! whole gradient, `R`); a consumer fixes the state it reads (an input it
//! reads as `D(d)` returns a `D(d)` gradient; one it reads as `R` returns `R`
//! when the op runs replicated and a partial sum `V` when it runs on shards).
//! Each [`AdapterKind`] maps one state to another with a forward collective
//! and its backward dual; [`cheapest_path`] finds the cheapest chain between a
//! producer's state and a consumer's (Dijkstra over the few states a tensor
//! of a given rank has), priced by the cost model.

use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::anno::Layout;
use crate::cost::{Cluster, Collective, Group, collective_time};

/// A value's layout in forward and its gradient's layout in backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct State {
    pub fwd: Layout,
    pub grad: Layout,
}

impl State {
    /// The state of an output an op produces in layout `fwd`.
    pub fn produced(fwd: Layout) -> State {
        let grad = match fwd {
            Layout::D(d) => Layout::D(d),
            Layout::R | Layout::V => Layout::R,
        };
        State { fwd, grad }
    }

    /// The state an op reads an input in: `fwd` is the input's layout under
    /// the op's split; `sharded` says whether the op runs on shards (a split
    /// over more than one rank).
    pub fn consumed(fwd: Layout, sharded: bool) -> State {
        let grad = match fwd {
            Layout::D(d) => Layout::D(d),
            Layout::R if sharded => Layout::V,
            Layout::R | Layout::V => Layout::R,
        };
        State { fwd, grad }
    }

    /// The fully replicated state (every rank holds the value and its gradient).
    pub const REPLICATED: State = State {
        fwd: Layout::R,
        grad: Layout::R,
    };
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.fwd == self.grad {
            write!(f, "{}", self.fwd)
        } else {
            write!(f, "{}/{}", self.fwd, self.grad)
        }
    }
}

/// A layout change on the tp axis with its backward dual; the runtime's
/// `exec::Adapter` of the same name implements each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum AdapterKind {
    /// V → R: all-reduce; backward identity.
    AllReduce,
    /// R → R for consumers on shards: identity; backward all-reduce.
    Copy,
    /// R → D(dim): local chunk; backward all-gather.
    Chunk { dim: usize },
    /// D(dim) → R for replicated consumers: all-gather; backward chunk.
    Gather { dim: usize },
    /// D(dim) → R for consumers on shards: all-gather; backward reduce-scatter.
    GatherForShards { dim: usize },
    /// V → D(dim): reduce-scatter; backward all-gather.
    ReduceScatter { dim: usize },
    /// D(from) → D(to): all-to-all both ways.
    AllToAll { from: usize, to: usize },
}

impl fmt::Display for AdapterKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdapterKind::AllReduce => f.write_str("all_reduce"),
            AdapterKind::Copy => f.write_str("copy"),
            AdapterKind::Chunk { dim } => write!(f, "chunk({dim})"),
            AdapterKind::Gather { dim } => write!(f, "all_gather({dim})"),
            AdapterKind::GatherForShards { dim } => write!(f, "all_gather_for_shards({dim})"),
            AdapterKind::ReduceScatter { dim } => write!(f, "reduce_scatter({dim})"),
            AdapterKind::AllToAll { from, to } => write!(f, "all_to_all({from}->{to})"),
        }
    }
}

impl AdapterKind {
    /// The state this adapter reads and the state it makes.
    pub fn states(self) -> (State, State) {
        let s = |fwd, grad| State { fwd, grad };
        use Layout::{D, R, V};
        match self {
            AdapterKind::AllReduce => (s(V, R), s(R, R)),
            AdapterKind::Copy => (s(R, R), s(R, V)),
            AdapterKind::Chunk { dim } => (s(R, R), s(D(dim), D(dim))),
            AdapterKind::Gather { dim } => (s(D(dim), D(dim)), s(R, R)),
            AdapterKind::GatherForShards { dim } => (s(D(dim), D(dim)), s(R, V)),
            AdapterKind::ReduceScatter { dim } => (s(V, R), s(D(dim), D(dim))),
            AdapterKind::AllToAll { from, to } => (s(D(from), D(from)), s(D(to), D(to))),
        }
    }

    /// The collectives run forward and backward (local chunks and
    /// identities are free and not listed).
    pub fn collectives(self) -> Vec<Collective> {
        match self {
            AdapterKind::AllReduce | AdapterKind::Copy => vec![Collective::AllReduce],
            AdapterKind::Chunk { .. } | AdapterKind::Gather { .. } => {
                vec![Collective::AllGather]
            }
            AdapterKind::GatherForShards { .. } | AdapterKind::ReduceScatter { .. } => {
                vec![Collective::AllGather, Collective::ReduceScatter]
            }
            AdapterKind::AllToAll { .. } => vec![Collective::AllToAll, Collective::AllToAll],
        }
    }

    /// The suffix of the value an adapter makes (`o_proj_sum`, `x_full`).
    pub fn value_suffix(self) -> &'static str {
        match self {
            AdapterKind::AllReduce => "sum",
            AdapterKind::Copy => "bcast",
            AdapterKind::Chunk { .. } => "shard",
            AdapterKind::Gather { .. } | AdapterKind::GatherForShards { .. } => "full",
            AdapterKind::ReduceScatter { .. } => "scattered",
            AdapterKind::AllToAll { .. } => "resharded",
        }
    }

    /// Every adapter on tensors of rank `rank`.
    pub fn all(rank: usize) -> Vec<AdapterKind> {
        let mut out = vec![AdapterKind::AllReduce, AdapterKind::Copy];
        for dim in 0..rank {
            out.push(AdapterKind::Chunk { dim });
            out.push(AdapterKind::Gather { dim });
            out.push(AdapterKind::GatherForShards { dim });
            out.push(AdapterKind::ReduceScatter { dim });
            for to in 0..rank {
                if to != dim {
                    out.push(AdapterKind::AllToAll { from: dim, to });
                }
            }
        }
        out
    }
}

/// Prices adapters for one tp group of a cluster.
#[derive(Clone, Debug)]
pub struct AdapterCost<'c> {
    pub cluster: &'c Cluster,
    pub group: Group,
}

impl AdapterCost<'_> {
    /// Seconds of forward plus backward communication of `kind` on a tensor
    /// of `full_bytes` bytes (its unpartitioned size), and the bytes each
    /// rank sends (the same convention as the cost model: the full tensor's
    /// size for all-reduce, all-gather and reduce-scatter, a shard's for
    /// all-to-all).
    pub fn cost(&self, kind: AdapterKind, full_bytes: f64) -> f64 {
        let parts = f64::from(self.group.size().max(1));
        kind.collectives()
            .into_iter()
            .map(|c| {
                let bytes = if c == Collective::AllToAll {
                    full_bytes / parts
                } else {
                    full_bytes
                };
                collective_time(self.cluster, c, &self.group, bytes)
            })
            .sum::<f64>()
            // A hair per adapter so that among equally priced chains (a
            // free chunk) the shorter one wins, deterministically.
            + 1e-12
    }
}

#[derive(Clone, Copy, PartialEq)]
struct Entry {
    cost: f64,
    state: State,
}

impl Eq for Entry {}

impl Ord for Entry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Min-heap on cost, ties broken by state for determinism.
        other
            .cost
            .total_cmp(&self.cost)
            .then_with(|| other.state.cmp(&self.state))
    }
}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// The cheapest chain of adapters from `from` to `to` for a tensor of rank
/// `rank` and `full_bytes` bytes, with its cost in seconds; `None` when no
/// chain exists. An empty chain when the states are equal.
pub fn cheapest_path(
    from: State,
    to: State,
    rank: usize,
    full_bytes: f64,
    cost: &AdapterCost<'_>,
) -> Option<(Vec<AdapterKind>, f64)> {
    if from == to {
        return Some((Vec::new(), 0.0));
    }
    let edges = AdapterKind::all(rank);
    let mut best: BTreeMap<State, (f64, Option<(State, AdapterKind)>)> = BTreeMap::new();
    let mut done: BTreeSet<State> = BTreeSet::new();
    let mut heap = BinaryHeap::new();
    best.insert(from, (0.0, None));
    heap.push(Entry {
        cost: 0.0,
        state: from,
    });
    while let Some(Entry { cost: c, state }) = heap.pop() {
        if !done.insert(state) {
            continue;
        }
        if state == to {
            break;
        }
        for &edge in &edges {
            let (src, dst) = edge.states();
            if src != state || done.contains(&dst) {
                continue;
            }
            let next = c + cost.cost(edge, full_bytes);
            let better = best.get(&dst).is_none_or(|(old, _)| next < *old);
            if better {
                best.insert(dst, (next, Some((state, edge))));
                heap.push(Entry {
                    cost: next,
                    state: dst,
                });
            }
        }
    }
    let (total, _) = *best.get(&to)?;
    let mut path = Vec::new();
    let mut at = to;
    while let Some((_, Some((prev, edge)))) = best.get(&at) {
        path.push(*edge);
        at = *prev;
    }
    path.reverse();
    Some((path, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cost(cluster: &Cluster) -> AdapterCost<'_> {
        AdapterCost {
            cluster,
            group: Group::within_node(2),
        }
    }

    #[test]
    fn megatron_adapters_are_the_cheapest_paths() {
        let cluster = Cluster::preset("a100-80gb").expect("preset");
        let c = cost(&cluster);
        let path = |from, to| cheapest_path(from, to, 3, 1e6, &c).expect("path").0;
        let (r, v, d1) = (Layout::R, Layout::V, Layout::D(1));
        // Row-parallel output to a replicated norm: g.
        assert_eq!(
            path(State::produced(v), State::consumed(r, false)),
            vec![AdapterKind::AllReduce]
        );
        // Replicated norm output to a column-parallel linear: f.
        assert_eq!(
            path(State::produced(r), State::consumed(r, true)),
            vec![AdapterKind::Copy]
        );
        // Sequence parallel: sequence shards to a column-parallel linear,
        // row-parallel partial sums to sequence shards.
        assert_eq!(
            path(State::produced(d1), State::consumed(r, true)),
            vec![AdapterKind::GatherForShards { dim: 1 }]
        );
        assert_eq!(
            path(State::produced(v), State::consumed(d1, false)),
            vec![AdapterKind::ReduceScatter { dim: 1 }]
        );
        // Partial sums read by an op on shards need the sum and a dual all-reduce.
        assert_eq!(
            path(State::produced(v), State::consumed(r, true)),
            vec![AdapterKind::AllReduce, AdapterKind::Copy]
        );
        assert!(path(State::produced(r), State::produced(r)).is_empty());
    }

    #[test]
    fn every_adapter_state_pair_is_consistent() {
        for kind in AdapterKind::all(3) {
            let (from, to) = kind.states();
            assert_ne!(from, to, "{kind}");
        }
    }
}
