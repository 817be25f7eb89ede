//! What a rewrite changed: collectives per block before and after, and how
//! each e-graph run stopped.

use std::collections::BTreeMap;
use std::fmt;

use crate::cost::Collective;
use crate::lower::{Block, BlockKind, State};

use super::convert::adapter_bytes;

/// Collectives of one kind: how many, and the bytes one rank sends for
/// them under ring algorithms over `tp` ranks (`2(n-1)/n` of the tensor for
/// all-reduce, `(n-1)/n` for all-gather and reduce-scatter, `(n-1)/n` of a
/// shard for all-to-all), forward and backward, for one micro-batch.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Tally {
    pub count: u64,
    pub bytes: f64,
}

/// Collectives by kind.
pub type Tallies = BTreeMap<Collective, Tally>;

/// Counts the collectives of a block's adapters over `tp` ranks.
pub fn tally(block: &Block, tp: u64) -> Tallies {
    let n = tp.max(1) as f64;
    let mut out = Tallies::new();
    for (kind, bytes) in adapter_bytes(block, tp) {
        for c in kind.collectives() {
            let t = out.entry(c).or_default();
            t.count += 1;
            t.bytes += match c {
                Collective::AllReduce => 2.0 * (n - 1.0) / n * bytes,
                Collective::AllToAll => (n - 1.0) / n * bytes / n,
                _ => (n - 1.0) / n * bytes,
            };
        }
    }
    out
}

fn scaled(t: &Tallies, n: u64) -> Tallies {
    t.iter()
        .map(|(c, v)| {
            (
                *c,
                Tally {
                    count: v.count * n,
                    bytes: v.bytes * n as f64,
                },
            )
        })
        .collect()
}

/// One block before and after.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockReport {
    pub kind: BlockKind,
    /// How many times the block runs per micro-batch (the layer block once
    /// per transformer layer).
    pub instances: u64,
    pub before: Tallies,
    pub after: Tallies,
    /// Modelled seconds (collectives plus memory-bound local ops) of one
    /// instance, forward and backward.
    pub seconds_before: f64,
    pub seconds_after: f64,
}

/// One e-graph run: a block under one stream state.
#[derive(Clone, Debug, PartialEq)]
pub struct RunStats {
    pub block: BlockKind,
    /// The stream state the run assumed.
    pub stream: State,
    /// Why egg stopped (`saturated`, a limit).
    pub stop_reason: String,
    pub iterations: usize,
    pub enodes: usize,
    pub eclasses: usize,
}

/// What [`super::rewrite`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct RewriteReport {
    pub tp: u32,
    pub stream_before: State,
    pub stream_after: State,
    /// Whether the rewritten program replaced the input (it is kept when
    /// no rewrite is cheaper under the cost model).
    pub applied: bool,
    pub blocks: Vec<BlockReport>,
    pub runs: Vec<RunStats>,
}

impl RewriteReport {
    fn total(&self, pick: impl Fn(&BlockReport) -> &Tallies) -> Tallies {
        let mut out = Tallies::new();
        for b in &self.blocks {
            for (c, t) in scaled(pick(b), b.instances) {
                let e = out.entry(c).or_default();
                e.count += t.count;
                e.bytes += t.bytes;
            }
        }
        out
    }

    /// Collectives of the whole model (every layer) before the rewrite.
    pub fn total_before(&self) -> Tallies {
        self.total(|b| &b.before)
    }

    pub fn total_after(&self) -> Tallies {
        self.total(|b| &b.after)
    }

    /// Bytes one rank sends for collectives, whole model, per micro-batch.
    pub fn bytes_before(&self) -> f64 {
        self.total_before().values().map(|t| t.bytes).sum()
    }

    pub fn bytes_after(&self) -> f64 {
        self.total_after().values().map(|t| t.bytes).sum()
    }

    pub fn seconds_before(&self) -> f64 {
        self.blocks
            .iter()
            .map(|b| b.seconds_before * b.instances as f64)
            .sum()
    }

    pub fn seconds_after(&self) -> f64 {
        self.blocks
            .iter()
            .map(|b| b.seconds_after * b.instances as f64)
            .sum()
    }
}

fn collective_name(c: Collective) -> &'static str {
    match c {
        Collective::AllReduce => "all-reduce",
        Collective::AllGather => "all-gather",
        Collective::ReduceScatter => "reduce-scatter",
        Collective::AllToAll => "all-to-all",
        Collective::Broadcast => "broadcast",
        Collective::SendRecv => "send-recv",
    }
}

fn mib(bytes: f64) -> f64 {
    // `+ 0.0`: an empty float sum is -0.0, printed "-0.00".
    bytes / f64::from(1u32 << 20) + 0.0
}

fn cell(t: Option<&Tally>) -> String {
    match t {
        Some(t) if t.count > 0 => format!("{} ({:.2} MiB)", t.count, mib(t.bytes)),
        _ => "-".into(),
    }
}

fn rows(f: &mut fmt::Formatter<'_>, name: &str, before: &Tallies, after: &Tallies) -> fmt::Result {
    let mut kinds: Vec<Collective> = before.keys().chain(after.keys()).copied().collect();
    kinds.sort();
    kinds.dedup();
    if kinds.is_empty() {
        return writeln!(f, "{name:<14} {:<15} {:>22} {:>22}", "none", "-", "-");
    }
    for c in kinds {
        writeln!(
            f,
            "{name:<14} {:<15} {:>22} {:>22}",
            collective_name(c),
            cell(before.get(&c)),
            cell(after.get(&c))
        )?;
    }
    Ok(())
}

impl fmt::Display for RewriteReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "rewrite (tp {}): stream {} -> {}, {}",
            self.tp,
            self.stream_before,
            self.stream_after,
            if self.applied {
                "applied"
            } else {
                "kept the input (nothing cheaper)"
            }
        )?;
        writeln!(
            f,
            "collectives per micro-batch, forward + backward: count (MiB one rank sends)"
        )?;
        writeln!(
            f,
            "{:<14} {:<15} {:>22} {:>22}",
            "block", "collective", "before", "after"
        )?;
        for b in &self.blocks {
            let name = match (b.kind, b.instances) {
                (BlockKind::Layer, n) => format!("layer (×{n})"),
                (k, _) => format!("{k:?}").to_lowercase(),
            };
            rows(f, &name, &b.before, &b.after)?;
        }
        rows(f, "total", &self.total_before(), &self.total_after())?;
        writeln!(
            f,
            "bytes sent per rank: {:.2} MiB -> {:.2} MiB",
            mib(self.bytes_before()),
            mib(self.bytes_after())
        )?;
        writeln!(
            f,
            "modelled seconds per micro-batch: {:.3} ms -> {:.3} ms",
            self.seconds_before() * 1e3,
            self.seconds_after() * 1e3
        )?;
        writeln!(f, "e-graph runs:")?;
        for r in &self.runs {
            writeln!(
                f,
                "  {:<6} stream {:<5} {:<22} {:>3} iterations {:>6} e-nodes {:>6} e-classes",
                format!("{:?}", r.block).to_lowercase(),
                r.stream.to_string(),
                r.stop_reason,
                r.iterations,
                r.enodes,
                r.eclasses
            )?;
        }
        Ok(())
    }
}
