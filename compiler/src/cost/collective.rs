//! Time of collective communication over a group of ranks.
//!
//! This module owns where a group of ranks sits on the cluster ([`Group`],
//! [`link_level`], [`mesh_groups`]) and what a collective over it costs
//! ([`collective_time`]). It knows nothing of which tensors are communicated
//! or why; the caller passes sizes in bytes.
//!
//! # Placement
//!
//! Ranks are numbered node-major: node `k` holds ranks `k·d .. (k+1)·d` for
//! `d = devices_per_node`. A mesh axis of size `n` whose inner axes multiply to
//! `s` forms groups `{b + i·s : i < n}` (tp innermost has stride 1, dp stride
//! tp, pp stride tp·dp). All groups of an axis run at once and the slowest
//! decides, so a placement is priced by its worst group:
//!
//! - `d` is a multiple of `n·s`: every group lies inside one node (intra-node);
//! - `d` divides `s`: every member is on its own node (a flat inter-node ring);
//! - `s` divides `d` and `d` divides `n·s`: each group has `k = d/s` members
//!   on each of `m = n/k` nodes (hierarchical, below);
//! - anything else is irregular (some groups straddle a node boundary) and is
//!   priced as a flat inter-node ring, an upper bound.
//!
//! # Times
//!
//! `S` is the `bytes` argument, `B` a link's bandwidth times the collective
//! efficiency and `L` its latency per step. Within one node (ring of `n`):
//!
//! | collective | `bytes` is | time |
//! |---|---|---|
//! | all-reduce | the tensor on each rank | `2(n−1)/n·S/B + 2(n−1)·L` |
//! | all-gather | the gathered tensor (all `n` shards) | `(n−1)/n·S/B + (n−1)·L` |
//! | reduce-scatter | the tensor before scattering (all `n` shards) | `(n−1)/n·S/B + (n−1)·L` |
//! | all-to-all | the buffer each rank sends and receives | `(n−1)/n·S/B + (n−1)·L` |
//! | broadcast | the tensor | `S/B + (n−1)·L` (pipelined chain) |
//! | send/recv | the tensor | `S/B + L` (one hop between neighbours) |
//!
//! Note that for all-to-all `S` is the per-rank buffer: resharding a tensor of
//! `T` bytes from `D(i)` to `D(j)` over `n` ranks passes `S = T/n`.
//!
//! Across nodes, with `k` members per node on `m` nodes (`n = k·m`), the
//! estimate is hierarchical. The inter-node bandwidth is a device's share of
//! its node's NICs, and all `k` local members use their shares at once, so a
//! node moves `k·B_inter` in aggregate:
//!
//! - all-reduce = intra reduce-scatter, inter all-reduce of the `S/k` shard,
//!   intra all-gather: `2(k−1)/k·S/B_intra + 2(m−1)/m·S/(k·B_inter)`, latency
//!   `2(k−1)·L_intra + 2(m−1)·L_inter`;
//! - all-gather, reduce-scatter = an inter phase on `S/k` and an intra phase
//!   on `S`: `(k−1)/k·S/B_intra + (m−1)/m·S/(k·B_inter)`, latency
//!   `(k−1)·L_intra + (m−1)·L_inter`;
//! - all-to-all: of its buffer a rank sends `(k−1)/n·S` over the intra link and
//!   `(n−k)/n·S` over its NIC share, concurrently: the larger of the two
//!   times, latency `(k−1)·L_intra + (n−k)·L_inter`;
//! - broadcast: each local member carries `S/k` across nodes, then the node
//!   all-gathers: `S/(k·B_inter) + (k−1)/k·S/B_intra`, latency
//!   `(k−1)·L_intra + (m−1)·L_inter`;
//! - send/recv: one inter-node hop, `S/B_inter + L_inter`.
//!
//! With `k = 1` each formula is the flat ring at inter-node bandwidth. A group
//! of one rank costs nothing.

use super::cluster::{Cluster, LinkLevel};

/// A collective operation, named as in the runtime's `Communicator`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Collective {
    AllReduce,
    AllGather,
    ReduceScatter,
    AllToAll,
    Broadcast,
    SendRecv,
}

impl Collective {
    /// Its key in `Cluster::intra_node_curves`.
    pub fn key(self) -> &'static str {
        match self {
            Collective::AllReduce => "all_reduce",
            Collective::AllGather => "all_gather",
            Collective::ReduceScatter => "reduce_scatter",
            Collective::AllToAll => "all_to_all",
            Collective::Broadcast => "broadcast",
            Collective::SendRecv => "send_recv",
        }
    }
}

/// Where a group of ranks sits: its size, and how many of its members share
/// each node it spans. Build one with [`Group::placed`] (from a mesh stride) or
/// [`Group::within_node`] / [`Group::across_nodes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Group {
    size: u32,
    ranks_per_node: u32,
}

impl Group {
    /// A group whose members all share one node.
    pub fn within_node(size: u32) -> Group {
        let size = size.max(1);
        Group {
            size,
            ranks_per_node: size,
        }
    }

    /// A group of `size` ranks with `ranks_per_node` members on each node it
    /// spans. `None` unless `ranks_per_node` is at least 1 and divides `size`.
    pub fn across_nodes(size: u32, ranks_per_node: u32) -> Option<Group> {
        (ranks_per_node >= 1 && size % ranks_per_node == 0).then_some(Group {
            size,
            ranks_per_node,
        })
    }

    /// The worst group of a mesh axis of `size` ranks with `stride` between
    /// consecutive members (see the module docs for the placement rules).
    pub fn placed(cluster: &Cluster, size: u32, stride: u32) -> Group {
        let n = u64::from(size.max(1));
        let s = u64::from(stride.max(1));
        let d = u64::from(cluster.devices_per_node.max(1));
        if n == 1 || d % (n * s) == 0 {
            return Group::within_node(size);
        }
        let ranks_per_node = if s % d != 0 && d % s == 0 && (n * s) % d == 0 {
            // d/s ≤ n here because d divides n·s; the cast cannot truncate.
            (d / s) as u32
        } else {
            1
        };
        Group {
            size: size.max(1),
            ranks_per_node,
        }
    }

    /// Number of ranks.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Members of the group on each node it spans.
    pub fn ranks_per_node(&self) -> u32 {
        self.ranks_per_node
    }

    /// Number of nodes the group spans.
    pub fn nodes(&self) -> u32 {
        self.size / self.ranks_per_node
    }

    /// The slowest link level the group communicates over.
    pub fn level(&self) -> LinkLevel {
        if self.nodes() <= 1 {
            LinkLevel::IntraNode
        } else {
            LinkLevel::InterNode
        }
    }
}

/// The link level a mesh axis of `group_size` ranks with `stride` between
/// consecutive members communicates over: intra-node iff every such group
/// stays inside one node.
pub fn link_level(cluster: &Cluster, group_size: u32, stride: u32) -> LinkLevel {
    Group::placed(cluster, group_size, stride).level()
}

/// The group of each mesh axis, given the axis sizes innermost first (e.g.
/// `[tp, dp, pp]`): axis `i` has stride `∏ sizes[..i]`.
pub fn mesh_groups(cluster: &Cluster, axis_sizes_innermost_first: &[u32]) -> Vec<Group> {
    let mut stride = 1u32;
    axis_sizes_innermost_first
        .iter()
        .map(|&size| {
            let group = Group::placed(cluster, size, stride);
            stride = stride.saturating_mul(size.max(1));
            group
        })
        .collect()
}

/// Seconds `collective` over `group` takes on `cluster`, for `bytes` as the
/// module docs define per collective.
pub fn collective_time(
    cluster: &Cluster,
    collective: Collective,
    group: &Group,
    bytes: f64,
) -> f64 {
    let n = f64::from(group.size);
    if group.size <= 1 {
        return 0.0;
    }
    let eff = cluster.efficiency.collective;
    let b_intra = cluster.intra_node.bandwidth_bytes_per_s * eff;
    let l_intra = cluster.intra_node.latency_s;
    if group.level() == LinkLevel::IntraNode {
        let factor = cluster
            .intra_node_curves
            .get(collective.key())
            .map_or(1.0, |c| crate::cost::time::curve_factor(c, bytes));
        return ring_time(collective, n, bytes, b_intra * factor, l_intra);
    }
    let b_inter = cluster.inter_node.bandwidth_bytes_per_s * eff;
    let l_inter = cluster.inter_node.latency_s;
    let k = f64::from(group.ranks_per_node);
    let m = f64::from(group.nodes());
    match collective {
        Collective::AllReduce => {
            2.0 * (k - 1.0) / k * bytes / b_intra
                + 2.0 * (m - 1.0) / m * bytes / (k * b_inter)
                + 2.0 * (k - 1.0) * l_intra
                + 2.0 * (m - 1.0) * l_inter
        }
        Collective::AllGather | Collective::ReduceScatter => {
            (k - 1.0) / k * bytes / b_intra
                + (m - 1.0) / m * bytes / (k * b_inter)
                + (k - 1.0) * l_intra
                + (m - 1.0) * l_inter
        }
        Collective::AllToAll => {
            let intra_s = (k - 1.0) / n * bytes / b_intra;
            let inter_s = (n - k) / n * bytes / b_inter;
            intra_s.max(inter_s) + (k - 1.0) * l_intra + (n - k) * l_inter
        }
        Collective::Broadcast => {
            bytes / (k * b_inter)
                + (k - 1.0) / k * bytes / b_intra
                + (k - 1.0) * l_intra
                + (m - 1.0) * l_inter
        }
        Collective::SendRecv => bytes / b_inter + l_inter,
    }
}

/// Ring (or chain) time over one link level with `n` ranks.
fn ring_time(collective: Collective, n: f64, bytes: f64, bandwidth: f64, latency: f64) -> f64 {
    let steps = n - 1.0;
    match collective {
        Collective::AllReduce => 2.0 * steps / n * bytes / bandwidth + 2.0 * steps * latency,
        Collective::AllGather | Collective::ReduceScatter | Collective::AllToAll => {
            steps / n * bytes / bandwidth + steps * latency
        }
        Collective::Broadcast => bytes / bandwidth + steps * latency,
        Collective::SendRecv => bytes / bandwidth + latency,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::cluster::load_cluster;

    const GIB: f64 = (1u64 << 30) as f64;

    fn a100() -> Cluster {
        load_cluster("a100-80gb").expect("a100-80gb preset loads")
    }

    fn assert_close(got: f64, want: f64) {
        assert!(
            (got - want).abs() <= 1e-9 * want.abs(),
            "got {got}, want {want}"
        );
    }

    #[test]
    fn all_reduce_1gib_over_8_a100s_in_a_node() {
        // B = 300 GB/s · 0.8 = 240e9 B/s. Bandwidth term 2·7/8 · 2^30 / 240e9
        // = 1879048192 / 240e9 = 7.829367 ms; latency 2·7 · 2 us = 28 us;
        // total 7.857367 ms.
        let t = collective_time(&a100(), Collective::AllReduce, &Group::within_node(8), GIB);
        assert_close(t, 1879048192.0 / 240e9 + 28e-6);
        assert!((t - 7.857367e-3).abs() < 1e-9, "{t}");
    }

    #[test]
    fn gather_scatter_and_all_to_all_cost_half_an_all_reduce_in_bandwidth() {
        // (n−1)/n · S/B + (n−1)·L = 7/8 · 2^30 / 240e9 + 7 · 2 us = 3.914684 ms + 14 us.
        let cluster = a100();
        let group = Group::within_node(8);
        for collective in [
            Collective::AllGather,
            Collective::ReduceScatter,
            Collective::AllToAll,
        ] {
            let t = collective_time(&cluster, collective, &group, GIB);
            assert_close(t, 939524096.0 / 240e9 + 14e-6);
        }
    }

    #[test]
    fn broadcast_and_send_recv_move_the_whole_tensor_once() {
        // Broadcast: 2^30 / 240e9 = 4.473924 ms + 7 · 2 us; p2p: the same + 2 us.
        let cluster = a100();
        let t = collective_time(&cluster, Collective::Broadcast, &Group::within_node(8), GIB);
        assert_close(t, GIB / 240e9 + 14e-6);
        let t = collective_time(&cluster, Collective::SendRecv, &Group::within_node(2), GIB);
        assert_close(t, GIB / 240e9 + 2e-6);
    }

    #[test]
    fn a_group_of_one_is_free() {
        let cluster = a100();
        for collective in [
            Collective::AllReduce,
            Collective::AllGather,
            Collective::ReduceScatter,
            Collective::AllToAll,
            Collective::Broadcast,
            Collective::SendRecv,
        ] {
            for group in [Group::within_node(1), Group::placed(&cluster, 1, 64)] {
                assert_eq!(collective_time(&cluster, collective, &group, GIB), 0.0);
            }
        }
    }

    #[test]
    fn tp8_stays_in_the_node_and_dp_across_nodes_does_not() {
        let cluster = a100();
        // tp = 8 innermost: stride 1, ranks 0..8 of node 0.
        assert_eq!(link_level(&cluster, 8, 1), LinkLevel::IntraNode);
        // dp = 4 over tp = 8: stride 8, one member on each of 4 nodes.
        assert_eq!(link_level(&cluster, 4, 8), LinkLevel::InterNode);
        // dp = 4 over tp = 2: ranks {0, 2, 4, 6} share node 0.
        assert_eq!(link_level(&cluster, 4, 2), LinkLevel::IntraNode);
        // tp = 16 cannot fit 8 devices per node.
        assert_eq!(link_level(&cluster, 16, 1), LinkLevel::InterNode);
        // dp = 2 over tp = 3: the group {6, 9} straddles nodes 0 and 1.
        assert_eq!(link_level(&cluster, 2, 3), LinkLevel::InterNode);
    }

    #[test]
    fn mesh_groups_use_cumulative_strides() {
        let cluster = a100();
        // tp = 4, dp = 4, pp = 4 on 64 GPUs: tp in a node; dp stride 4 has 2
        // members on each of 2 nodes; pp stride 16 has one member per node.
        let groups = mesh_groups(&cluster, &[4, 4, 4]);
        assert_eq!(
            groups,
            [
                Group::within_node(4),
                Group::across_nodes(4, 2).expect("2 divides 4"),
                Group::across_nodes(4, 1).expect("1 divides 4"),
            ]
        );
        let levels: Vec<_> = groups.iter().map(Group::level).collect();
        assert_eq!(
            levels,
            [
                LinkLevel::IntraNode,
                LinkLevel::InterNode,
                LinkLevel::InterNode
            ]
        );
    }

    #[test]
    fn irregular_placements_fall_back_to_a_flat_ring() {
        let cluster = a100();
        // tp = 6: groups {6..12} straddle a node boundary.
        assert_eq!(Group::placed(&cluster, 6, 1).ranks_per_node(), 1);
        // stride 12 is not a multiple of 8: members land on nodes 0, 1, 3, 4.
        assert_eq!(Group::placed(&cluster, 4, 12).ranks_per_node(), 1);
        assert_eq!(Group::across_nodes(6, 4), None);
    }

    #[test]
    fn dp_all_reduce_over_8_nodes_one_gpu_each_is_a_flat_ring() {
        // dp = 8 over tp = 8: k = 1, m = 8. B_inter = 25e9 · 0.8 = 20e9 B/s.
        // 2·7/8 · 2^30 / 20e9 = 93.952 ms; latency 2·7 · 6 us = 84 us.
        let cluster = a100();
        let group = Group::placed(&cluster, 8, 8);
        assert_eq!((group.ranks_per_node(), group.nodes()), (1, 8));
        let t = collective_time(&cluster, Collective::AllReduce, &group, GIB);
        assert_close(t, 1879048192.0 / 20e9 + 84e-6);
    }

    #[test]
    fn dp64_all_reduce_over_8_full_nodes_is_hierarchical() {
        // dp = 64, tp = 1: k = 8 members on each of m = 8 nodes.
        // intra reduce-scatter + all-gather: 2·7/8 · 2^30 / 240e9 = 7.829367 ms;
        // inter all-reduce of the 2^30/8 shard at 20e9 B/s per GPU:
        // 2·7/8 · 2^27 / 20e9 = 11.744051 ms; latency 2·7·2 us + 2·7·6 us = 112 us;
        // total 19.685418 ms, about 4.8x faster than a flat ring at 20e9 B/s.
        let cluster = a100();
        let group = Group::placed(&cluster, 64, 1);
        assert_eq!((group.ranks_per_node(), group.nodes()), (8, 8));
        let t = collective_time(&cluster, Collective::AllReduce, &group, GIB);
        assert_close(t, 1879048192.0 / 240e9 + 234881024.0 / 20e9 + 112e-6);
        assert!((t - 19.685418e-3).abs() < 1e-8, "{t}");
    }

    #[test]
    fn hierarchical_gather_all_to_all_broadcast_and_p2p() {
        let cluster = a100();
        // k = 2 members on each of m = 4 nodes (dp = 8 over tp = 4).
        let group = Group::placed(&cluster, 8, 4);
        assert_eq!((group.ranks_per_node(), group.nodes()), (2, 4));
        let (bi, be, li, le) = (240e9, 20e9, 2e-6, 6e-6);
        let t = collective_time(&cluster, Collective::AllGather, &group, GIB);
        assert_close(t, 0.5 * GIB / bi + 0.75 * GIB / (2.0 * be) + li + 3.0 * le);
        // All-to-all: 1/8 of the buffer stays in the node, 6/8 crosses the NIC.
        let t = collective_time(&cluster, Collective::AllToAll, &group, GIB);
        assert_close(t, 0.75 * GIB / be + li + 6.0 * le);
        let t = collective_time(&cluster, Collective::Broadcast, &group, GIB);
        assert_close(t, GIB / (2.0 * be) + 0.5 * GIB / bi + li + 3.0 * le);
        // pp = 2 over tp·dp = 8: stages on neighbouring nodes.
        let t = collective_time(
            &cluster,
            Collective::SendRecv,
            &Group::placed(&cluster, 2, 8),
            GIB,
        );
        assert_close(t, GIB / be + le);
    }

    /// Every group of an axis of `n` ranks with stride `s` on nodes of `d`,
    /// as the node index of each member.
    fn member_nodes(n: u32, s: u32, d: u32) -> Vec<Vec<u32>> {
        let world = n * s * d;
        (0..world / (n * s))
            .flat_map(|block| (0..s).map(move |j| (block, j)))
            .map(|(block, j)| (0..n).map(|i| (block * n * s + j + i * s) / d).collect())
            .collect()
    }

    #[test]
    fn placement_agrees_with_enumerating_the_groups() {
        let mut cluster = a100();
        for d in 1..=12 {
            cluster.devices_per_node = d;
            for n in 1..=12 {
                for s in 1..=20 {
                    let group = Group::placed(&cluster, n, s);
                    let groups = member_nodes(n, s, d);
                    let all_intra = groups
                        .iter()
                        .all(|nodes| nodes.iter().all(|&x| x == nodes[0]));
                    let case = format!("n={n} s={s} d={d}: {group:?}");
                    assert_eq!(group.level() == LinkLevel::IntraNode, all_intra, "{case}");
                    assert_eq!(group.size(), n, "{case}");
                    let k = group.ranks_per_node();
                    if !all_intra && k > 1 {
                        // Hierarchical: every group has exactly k members on each node it touches.
                        for nodes in &groups {
                            for &node in nodes {
                                let here = nodes.iter().filter(|&&x| x == node).count();
                                assert_eq!(here, k as usize, "{case}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn spanning_nodes_costs_between_one_node_and_a_flat_ring() {
        // For every preset and collective: a group of n = k·m ranks costs at
        // most a flat ring with one rank per node, more bytes never cost
        // less, and for large messages it costs at least as much as n ranks
        // in one node. (For tiny messages the hierarchical algorithm takes
        // fewer latency steps than one ring of n, so it may be cheaper.)
        for name in crate::cost::cluster::preset_names() {
            let cluster = load_cluster(name).expect("preset loads");
            let d = cluster.devices_per_node;
            for collective in [
                Collective::AllReduce,
                Collective::AllGather,
                Collective::ReduceScatter,
                Collective::AllToAll,
                Collective::Broadcast,
                Collective::SendRecv,
            ] {
                for k in (1..=d).filter(|k| d % k == 0) {
                    for m in [2, 3, 8, 64] {
                        let n = k * m;
                        let hier = Group::across_nodes(n, k).expect("k divides n");
                        let flat = Group::across_nodes(n, 1).expect("1 divides n");
                        let mut previous_s = 0.0;
                        for bytes in [1.0, 1e6, 1e9, 1e10] {
                            let t = |g: &Group| collective_time(&cluster, collective, g, bytes);
                            let case = format!("{name} {collective:?} k={k} m={m} bytes={bytes}");
                            let (intra_s, hier_s, flat_s) =
                                (t(&Group::within_node(n)), t(&hier), t(&flat));
                            assert!(
                                bytes < 1e9 || intra_s <= hier_s * (1.0 + 1e-12),
                                "{case}: {intra_s} > {hier_s}"
                            );
                            assert!(
                                hier_s <= flat_s * (1.0 + 1e-12),
                                "{case}: {hier_s} > {flat_s}"
                            );
                            assert!(hier_s >= previous_s, "{case}");
                            previous_s = hier_s;
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn trn1_fits_tp32_in_a_node() {
        let cluster = load_cluster("trn1").expect("trn1 preset loads");
        assert_eq!(link_level(&cluster, 32, 1), LinkLevel::IntraNode);
        assert_eq!(link_level(&cluster, 2, 32), LinkLevel::InterNode);
    }
}
