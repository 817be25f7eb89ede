//! The human-readable forms of a plan: `report.md` and the console summary.
//!
//! The report says what a Megatron user looks for — the model and cluster,
//! the chosen tp/pp/dp and its knobs, the predicted step time, throughput,
//! MFU and bubble, per-stage time and memory with its breakdown, every op's
//! split, and a drawing of the pipeline schedule. It reads only the plan
//! (no graph, no cost model) and is deterministic: the same plan gives the
//! same text. Units: GiB (2^30 bytes), ms, s.

use std::fmt::Write as _;

use super::{Plan, Recompute, Schedule, ZeroStage};

/// At most this many micro-batches are drawn in the pipeline timeline.
const TIMELINE_MICRO_BATCHES: u64 = 8;
/// Pipelines deeper than this are not drawn (the drawing would not fit a
/// screen).
const TIMELINE_MAX_STAGES: u32 = 16;
/// Width of the memory bars, in cells.
const BAR_CELLS: usize = 20;

const GIB: f64 = (1u64 << 30) as f64;

/// The `report.md` of a plan.
pub fn render_report(plan: &Plan) -> String {
    let mut out = String::new();
    let p = plan;
    let pred = &p.prediction;
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "# Plan: {} on {} × {}\n",
        p.model.name, p.plan_gpus, p.cluster
    );

    let model = if p.model.spec == p.model.name {
        format!("`{}` ({})", p.model.name, p.model.family)
    } else {
        format!(
            "`{}` ({}, from `{}`)",
            p.model.name, p.model.family, p.model.spec
        )
    };
    let _ = writeln!(
        out,
        "- **model**: {model}, {} parameters",
        params(p.model.params)
    );
    if !p.model.annotation_files.is_empty() {
        let files: Vec<String> = p
            .model
            .annotation_files
            .iter()
            .map(|f| format!("`{f}`"))
            .collect();
        let _ = writeln!(out, "- **annotation files**: {}", files.join(", "));
    }
    let _ = writeln!(out, "- **cluster**: `{}`", p.cluster);
    let _ = writeln!(out, "- **GPUs**: {}", gpus(p));
    let _ = writeln!(
        out,
        "- **global batch**: {} sequences × {} tokens = {} tokens per step",
        p.global_batch,
        p.trace.seq_len,
        thousands(p.tokens_per_step())
    );
    let _ = writeln!(out, "- **dtype**: {}", p.trace.dtype);

    out.push_str("\n## Configuration\n\n");
    let mut config = Table::new(&["setting", "value"], &[Align::Left, Align::Left]);
    config.row(["tensor parallel (tp)".into(), p.mesh.tp.to_string()]);
    config.row(["pipeline parallel (pp)".into(), p.mesh.pp.to_string()]);
    let dp = if p.replicas() > 1 {
        format!(
            "{} in the plan, {} at run time",
            p.mesh.dp,
            u64::from(p.mesh.dp) * u64::from(p.replicas())
        )
    } else {
        p.mesh.dp.to_string()
    };
    config.row(["data parallel (dp)".into(), dp]);
    config.row([
        "mesh order (innermost first)".into(),
        p.mesh.order.join(", "),
    ]);
    config.row([
        "micro-batching".into(),
        format!(
            "{} micro-batches of {} sequence{} per pipeline",
            p.n_micro_batches,
            p.micro_batch,
            plural(p.micro_batch)
        ),
    ]);
    config.row(["schedule".into(), schedule_name(p.schedule)]);
    config.row(["recompute".into(), recompute_summary(p)]);
    config.row(["ZeRO".into(), zero_name(p.zero)]);
    config.row([
        "sequence parallel".into(),
        if p.sequence_parallel { "on" } else { "off" }.into(),
    ]);
    if p.trace.kv_copies > 1 {
        config.row([
            "kv-head copies".into(),
            format!("{} (one kv head per tp rank)", p.trace.kv_copies),
        ]);
    }
    out.push_str(&config.markdown());

    out.push_str("\n## Predictions\n\n");
    let mut predictions = Table::new(&["metric", "value"], &[Align::Left, Align::Left]);
    predictions.row(["step time".into(), seconds(pred.step_s)]);
    predictions.row([
        "throughput".into(),
        format!(
            "{} tokens/s ({} tokens/s per GPU over {} GPUs)",
            thousands(pred.tokens_per_s.round() as u64),
            thousands(tokens_per_gpu(p).round() as u64),
            p.runtime_gpus
        ),
    ]);
    predictions.row(["MFU".into(), percent(pred.mfu)]);
    predictions.row([
        "pipeline bubble".into(),
        format!("{} of the step", percent(pred.bubble_fraction)),
    ]);
    predictions.row([
        "exposed data-parallel communication".into(),
        ms(pred.dp_comm_s),
    ]);
    predictions.row(["peak memory per GPU".into(), peak_memory(p)]);
    out.push_str(&predictions.markdown());

    out.push_str("\n## Stages\n\nMemory is per GPU, in GiB.\n\n");
    out.push_str(&stage_table(p, true).markdown());
    out.push_str("\n```text\n");
    out.push_str(&memory_bars(p));
    out.push_str("```\n");

    let _ = write!(
        out,
        "\n## Sharding\n\nThe tensor-parallel split of every op over tp={}. \
         `*` stands for every transformer layer; an op with no split runs replicated. \
         Layouts: `R` replicated, `V` partial sums, `D(d)` split along dim d.\n\n",
        p.mesh.tp
    );
    let mut sharding = Table::new(
        &["op", "kind", "split", "inputs → outputs"],
        &[Align::Left, Align::Left, Align::Left, Align::Left],
    );
    for entry in &p.sharding {
        sharding.row([
            format!("`{}`", entry.op),
            entry.kind.clone(),
            entry
                .split
                .as_ref()
                .map_or_else(|| "—".to_string(), |id| format!("`{id}`")),
            format!("{} → {}", entry.inputs.join(", "), entry.outputs.join(", ")),
        ]);
    }
    out.push_str(&sharding.markdown());

    out.push_str("\n## Pipeline timeline\n\n");
    out.push_str(&timeline_section(p));
    out
}

/// The console summary: configuration, predictions, per-stage memory.
pub fn render_summary(plan: &Plan) -> String {
    let p = plan;
    let pred = &p.prediction;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "plan: {} ({} parameters) on {}, {}",
        p.model.name,
        params(p.model.params),
        p.cluster,
        gpus(p)
    );
    let _ = writeln!(
        out,
        "  batch: {} sequences × {} tokens ({} micro-batches of {}), {} tokens per step",
        p.global_batch,
        p.trace.seq_len,
        p.n_micro_batches,
        p.micro_batch,
        thousands(p.tokens_per_step())
    );
    let _ = writeln!(
        out,
        "  config: tp={} pp={} dp={} (order {}), schedule {}, ZeRO {}, SP {}",
        p.mesh.tp,
        p.mesh.pp,
        p.mesh.dp,
        p.mesh.order.join(", "),
        p.schedule,
        p.zero,
        if p.sequence_parallel { "on" } else { "off" }
    );
    if p.trace.kv_copies > 1 {
        let _ = writeln!(
            out,
            "  kv heads: each copied {} times, one per tp rank (tp {} exceeds the kv heads)",
            p.trace.kv_copies, p.mesh.tp
        );
    }
    let _ = writeln!(out, "  recompute: {}", recompute_summary(p));
    let _ = writeln!(
        out,
        "  predicted: step {}, {} tokens/s ({} per GPU), MFU {}, bubble {}, exposed dp comm {}",
        seconds(pred.step_s),
        thousands(pred.tokens_per_s.round() as u64),
        thousands(tokens_per_gpu(p).round() as u64),
        percent(pred.mfu),
        percent(pred.bubble_fraction),
        ms(pred.dp_comm_s)
    );
    let _ = writeln!(out, "  peak memory: {}", peak_memory(p));
    out.push('\n');
    out.push_str(&stage_table(p, false).text());
    out
}

/// The top-k alternatives, best first, one line each: what a user compares
/// when the chosen plan surprises them.
pub fn render_alternatives(plans: &[Plan]) -> String {
    let mut table = Table::new(
        &[
            "#",
            "tp",
            "pp",
            "dp",
            "micro-batches",
            "schedule",
            "recompute",
            "ZeRO",
            "SP",
            "step",
            "tokens/s",
            "MFU",
            "peak GiB",
        ],
        &[
            Align::Right,
            Align::Right,
            Align::Right,
            Align::Right,
            Align::Left,
            Align::Left,
            Align::Left,
            Align::Right,
            Align::Left,
            Align::Right,
            Align::Right,
            Align::Right,
            Align::Right,
        ],
    );
    for (rank, p) in plans.iter().enumerate() {
        let modes: Vec<String> = p.stages.iter().map(|s| s.recompute.to_string()).collect();
        let mut distinct = modes.clone();
        distinct.dedup();
        let recompute = if distinct.len() <= 1 {
            distinct.pop().unwrap_or_else(|| "—".to_string())
        } else {
            modes.join("/")
        };
        table.row([
            (rank + 1).to_string(),
            p.mesh.tp.to_string(),
            p.mesh.pp.to_string(),
            p.mesh.dp.to_string(),
            format!("{} × {}", p.n_micro_batches, p.micro_batch),
            p.schedule.to_string(),
            recompute,
            p.zero.to_string(),
            if p.sequence_parallel { "on" } else { "off" }.to_string(),
            seconds(p.prediction.step_s),
            thousands(p.prediction.tokens_per_s.round() as u64),
            percent(p.prediction.mfu),
            gib(p.prediction.peak_mem_bytes),
        ]);
    }
    table.text()
}

fn gpus(p: &Plan) -> String {
    if p.runtime_gpus == p.plan_gpus {
        format!("{} GPUs", p.plan_gpus)
    } else {
        format!(
            "{} GPUs in the plan, {} at run time (the plan replicated {}× with data parallelism)",
            p.plan_gpus,
            p.runtime_gpus,
            p.replicas()
        )
    }
}

fn tokens_per_gpu(p: &Plan) -> f64 {
    p.prediction.tokens_per_s / f64::from(p.runtime_gpus.max(1))
}

fn peak_memory(p: &Plan) -> String {
    let pred = &p.prediction;
    let worst = pred
        .stages
        .iter()
        .enumerate()
        .max_by_key(|(i, s)| (s.memory.total_bytes(), std::cmp::Reverse(*i)))
        .map(|(i, _)| format!(" (stage {i})"))
        .unwrap_or_default();
    format!(
        "{} of {} GiB{worst}",
        gib(pred.peak_mem_bytes),
        gib(pred.capacity_bytes)
    )
}

/// Per-stage layers, time and memory. The report's version names what
/// each stage holds and splits memory by cause in full.
fn stage_table(p: &Plan, full: bool) -> Table {
    let mut headers = vec!["stage", "layers"];
    let mut align = vec![Align::Right, Align::Left];
    if full {
        headers.push("holds");
        align.push(Align::Left);
    }
    headers.extend([
        "recompute",
        "µbatch ms",
        "tp comm ms",
        "params",
        "grads",
        "optimizer",
        "activations",
        "transient",
        "allocator",
        "peak GiB",
        "of capacity",
    ]);
    align.extend([Align::Left]);
    align.extend([Align::Right; 10]);
    let mut table = Table::new(&headers, &align);
    for (i, stage) in p.stages.iter().enumerate() {
        let mut row = vec![
            stage.index.to_string(),
            format!(
                "{}..{} ({})",
                stage.first_layer,
                stage.end_layer,
                stage.n_layers()
            ),
        ];
        if full {
            let holds: Vec<&str> = [(stage.embedding, "embedding"), (stage.head, "head")]
                .into_iter()
                .filter_map(|(held, what)| held.then_some(what))
                .collect();
            row.push(if holds.is_empty() {
                "—".to_string()
            } else {
                holds.join(", ")
            });
        }
        row.push(stage.recompute.to_string());
        match p.prediction.stages.get(i) {
            Some(s) => {
                let m = &s.memory;
                row.extend([
                    fixed(s.micro_batch_s * 1e3),
                    fixed(s.tp_comm_s * 1e3),
                    gib(m.params_bytes),
                    gib(m.grads_bytes),
                    gib(m.optimizer_bytes),
                    gib(m.activations_bytes),
                    gib(m.transient_bytes),
                    gib(m.allocator_bytes),
                    gib(m.total_bytes()),
                    percent(ratio(m.total_bytes(), p.prediction.capacity_bytes)),
                ]);
            }
            None => row.extend(std::iter::repeat_n("?".to_string(), 10)),
        }
        table.row(row);
    }
    table
}

/// One text bar per stage: `stage 0 |██████░░░░| 61.20 / 76.00 GiB`.
fn memory_bars(p: &Plan) -> String {
    let capacity = p.prediction.capacity_bytes;
    let mut out = String::new();
    for (i, s) in p.prediction.stages.iter().enumerate() {
        let used = s.memory.total_bytes();
        let fraction = ratio(used, capacity);
        let filled = ((fraction * BAR_CELLS as f64).round() as usize).min(BAR_CELLS);
        let over = if used > capacity {
            "  over capacity"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "stage {i:>width$} |{}{}| {} / {} GiB{over}",
            "█".repeat(filled),
            "░".repeat(BAR_CELLS - filled),
            gib(used),
            gib(capacity),
            width = digits(p.prediction.stages.len().saturating_sub(1)),
        );
    }
    out
}

fn recompute_summary(p: &Plan) -> String {
    let modes: Vec<Recompute> = p.stages.iter().map(|s| s.recompute).collect();
    match modes.first() {
        None => "—".to_string(),
        Some(first) if modes.iter().all(|m| m == first) => {
            format!("{first} on every stage")
        }
        Some(_) => modes
            .iter()
            .enumerate()
            .map(|(i, m)| format!("stage {i}: {m}"))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

fn schedule_name(schedule: Schedule) -> String {
    match schedule {
        Schedule::GPipe => "GPipe (all forwards, then all backwards)".to_string(),
        Schedule::OneFOneB => "1F1B (one forward, one backward)".to_string(),
        Schedule::Interleaved { chunks } => {
            format!("interleaved 1F1B, {chunks} model chunks per GPU")
        }
    }
}

fn zero_name(zero: ZeroStage) -> String {
    format!("{zero} ({})", zero.description())
}

fn timeline_section(p: &Plan) -> String {
    let pp = p.mesh.pp;
    let m = p.n_micro_batches;
    if pp == 0 || m == 0 {
        return "No timeline: the plan has no stages or no micro-batches.\n".to_string();
    }
    if pp > TIMELINE_MAX_STAGES {
        return format!(
            "Not drawn: {pp} stages are more than the {TIMELINE_MAX_STAGES} a drawing can show.\n"
        );
    }
    let chunks = p.schedule.chunks();
    let drawn = match p.schedule {
        Schedule::GPipe | Schedule::OneFOneB => m.min(TIMELINE_MICRO_BATCHES),
        Schedule::Interleaved { .. } => {
            if chunks < 2 || pp < 2 || m % u64::from(pp) != 0 {
                return "Not drawn: an interleaved schedule needs at least 2 chunks, pp > 1 \
                        and a number of micro-batches that is a multiple of pp.\n"
                    .to_string();
            }
            let pp = u64::from(pp);
            if m <= TIMELINE_MICRO_BATCHES {
                m
            } else {
                (TIMELINE_MICRO_BATCHES / pp * pp).max(pp)
            }
        }
    };
    let mut out = String::new();
    let _ = write!(
        out,
        "Schedule {}, {pp} stage{}, ",
        p.schedule,
        plural(u64::from(pp))
    );
    if drawn < m {
        let _ = write!(out, "the first {drawn} of {m} micro-batches drawn. ");
    } else {
        let _ = write!(out, "{m} micro-batch{}. ", if m == 1 { "" } else { "es" });
    }
    out.push_str(
        "One column per forward (`F3`: micro-batch 3) or backward (`B3`) pass, \
         `.` an idle slot; every pass is drawn one slot long, though a backward \
         takes about twice a forward.",
    );
    if chunks > 1 {
        out.push_str(" The letter names the model chunk (`a` the first).");
    }
    out.push('\n');
    // `drawn` is at most max(8, pp) ≤ 16, so it fits a u32.
    let drawn = u32::try_from(drawn).unwrap_or(u32::MAX);
    match simulate(&device_orders(p.schedule, pp, drawn), pp, chunks, drawn) {
        Some(grid) => {
            out.push_str("\n```text\n");
            out.push_str(&draw(&grid, chunks));
            out.push_str("```\n");
        }
        None => out.push_str("\nThe schedule could not be laid out.\n"),
    }
    out
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    Forward,
    Backward,
}

/// One pass of one micro-batch through one model chunk of a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Task {
    pass: Pass,
    micro: u32,
    chunk: u32,
}

/// The order in which each device runs its passes: the runtime's own
/// schedule (`autopart_vocab::schedule`), without its communication.
fn device_orders(schedule: Schedule, pp: u32, m: u32) -> Vec<Vec<Task>> {
    use autopart_vocab::schedule::{Pass as P, compute_orders};
    let task = |pass, w: autopart_vocab::schedule::Work| Task {
        pass,
        micro: w.mb as u32,
        chunk: w.chunk as u32,
    };
    compute_orders(schedule, pp as usize, m as usize)
        .map(|orders| {
            orders
                .into_iter()
                .map(|order| {
                    order
                        .into_iter()
                        .map(|p| match p {
                            P::Forward(w) => task(Pass::Forward, w),
                            P::Backward(w) => task(Pass::Backward, w),
                        })
                        .collect()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Runs each device's passes in order, one slot each, as soon as their
/// inputs are there: a forward needs the previous virtual stage's forward,
/// a backward the next virtual stage's backward. Returns the grid
/// `[stage][slot]`, or `None` if the orders deadlock.
fn simulate(orders: &[Vec<Task>], pp: u32, chunks: u32, m: u32) -> Option<Vec<Vec<Option<Task>>>> {
    if orders.len() != pp as usize {
        return None;
    }
    let virtual_stages = (pp * chunks) as usize;
    let m = m as usize;
    // End slot (exclusive) of each pass, by [virtual stage][micro-batch].
    let mut forward_end = vec![vec![None::<usize>; m]; virtual_stages];
    let mut backward_end = vec![vec![None::<usize>; m]; virtual_stages];
    let mut next = vec![0usize; orders.len()];
    let mut grid: Vec<Vec<Option<Task>>> = vec![Vec::new(); orders.len()];
    let total: usize = orders.iter().map(Vec::len).sum();
    let mut done = 0;
    let mut slot = 0;
    while done < total {
        let mut ran = false;
        for (s, order) in orders.iter().enumerate() {
            let cell = order.get(next[s]).copied().filter(|t| {
                let vs = (t.chunk * pp) as usize + s;
                let micro = t.micro as usize;
                let ended = |end: Option<usize>| end.is_some_and(|e| e <= slot);
                match t.pass {
                    Pass::Forward => vs == 0 || ended(forward_end[vs - 1][micro]),
                    Pass::Backward => {
                        ended(forward_end[vs][micro])
                            && (vs + 1 == virtual_stages || ended(backward_end[vs + 1][micro]))
                    }
                }
            });
            if let Some(t) = cell {
                let vs = (t.chunk * pp) as usize + s;
                let ends = match t.pass {
                    Pass::Forward => &mut forward_end,
                    Pass::Backward => &mut backward_end,
                };
                ends[vs][t.micro as usize] = Some(slot + 1);
                next[s] += 1;
                done += 1;
                ran = true;
            }
            grid[s].push(cell);
        }
        if !ran {
            return None;
        }
        slot += 1;
    }
    Some(grid)
}

fn draw(grid: &[Vec<Option<Task>>], chunks: u32) -> String {
    let label = |t: &Task| {
        let pass = match t.pass {
            Pass::Forward => 'F',
            Pass::Backward => 'B',
        };
        let chunk = if chunks > 1 {
            char::from_u32(u32::from('a') + t.chunk % 26).map_or(String::new(), String::from)
        } else {
            String::new()
        };
        format!("{pass}{}{chunk}", t.micro)
    };
    let width = grid
        .iter()
        .flatten()
        .flatten()
        .map(|t| label(t).len())
        .max()
        .unwrap_or(1);
    let stage_width = digits(grid.len().saturating_sub(1));
    let mut out = String::new();
    for (s, row) in grid.iter().enumerate() {
        let cells: Vec<String> = row
            .iter()
            .map(|cell| {
                let text = cell.as_ref().map_or_else(|| ".".to_string(), label);
                format!("{text:<width$}")
            })
            .collect();
        let line = format!("stage {s:>stage_width$} | {}", cells.join(" "));
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Align {
    Left,
    Right,
}

/// A table printed as aligned Markdown or as plain text columns.
#[derive(Debug)]
struct Table {
    headers: Vec<String>,
    align: Vec<Align>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(headers: &[&str], align: &[Align]) -> Self {
        Table {
            headers: headers.iter().map(ToString::to_string).collect(),
            align: align.to_vec(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, row: impl IntoIterator<Item = String>) {
        self.rows.push(row.into_iter().collect());
    }

    fn widths(&self) -> Vec<usize> {
        (0..self.headers.len())
            .map(|c| {
                std::iter::once(&self.headers)
                    .chain(&self.rows)
                    .filter_map(|r| r.get(c))
                    .map(|s| s.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect()
    }

    fn cells(&self, row: &[String], widths: &[usize]) -> Vec<String> {
        widths
            .iter()
            .enumerate()
            .map(|(c, &w)| {
                let text = row.get(c).map_or("", String::as_str);
                let pad = " ".repeat(w.saturating_sub(text.chars().count()));
                match self.align.get(c) {
                    Some(Align::Right) => format!("{pad}{text}"),
                    _ => format!("{text}{pad}"),
                }
            })
            .collect()
    }

    fn markdown(&self) -> String {
        let widths: Vec<usize> = self.widths().into_iter().map(|w| w.max(3)).collect();
        let mut out = String::new();
        let mut line = |cells: Vec<String>| {
            out.push_str(format!("| {} |", cells.join(" | ")).trim_end());
            out.push('\n');
        };
        line(self.cells(&self.headers, &widths));
        line(
            widths
                .iter()
                .enumerate()
                .map(|(c, &w)| match self.align.get(c) {
                    Some(Align::Right) => format!("{}:", "-".repeat(w - 1)),
                    _ => "-".repeat(w),
                })
                .collect(),
        );
        for row in &self.rows {
            line(self.cells(row, &widths));
        }
        out
    }

    fn text(&self) -> String {
        let widths = self.widths();
        let mut out = String::new();
        for row in std::iter::once(&self.headers).chain(&self.rows) {
            out.push_str(self.cells(row, &widths).join("  ").trim_end());
            out.push('\n');
        }
        out
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.2}", bytes as f64 / GIB)
}

fn ms(s: f64) -> String {
    format!("{} ms", fixed(s * 1e3))
}

/// Seconds from one second up, milliseconds below.
fn seconds(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.3} s")
    } else {
        format!("{:.1} ms", s * 1e3)
    }
}

fn fixed(x: f64) -> String {
    format!("{x:.2}")
}

fn percent(fraction: f64) -> String {
    format!("{:.1}%", fraction * 100.0)
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn digits(n: usize) -> usize {
    n.to_string().len()
}

/// `1234567` → `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A parameter count the way model cards write it: `8.03 B`, `124.44 M`.
fn params(n: u64) -> String {
    let x = n as f64;
    if x >= 1e9 {
        format!("{:.2} B", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.2} M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1} K", x / 1e3)
    } else {
        n.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeline(schedule: Schedule, pp: u32, m: u32) -> String {
        let chunks = schedule.chunks();
        let grid = simulate(&device_orders(schedule, pp, m), pp, chunks, m).expect("no deadlock");
        draw(&grid, chunks)
    }

    #[test]
    fn one_f_one_b_timeline() {
        expect_test::expect![[r#"
            stage 0 | F0 F1 F2 F3 .  .  .  B0 F4 B1 F5 B2 F6 B3 F7 B4 .  B5 .  B6 .  B7
            stage 1 | .  F0 F1 F2 .  .  B0 F3 B1 F4 B2 F5 B3 F6 B4 F7 B5 .  B6 .  B7 .
            stage 2 | .  .  F0 F1 .  B0 F2 B1 F3 B2 F4 B3 F5 B4 F6 B5 F7 B6 .  B7 .  .
            stage 3 | .  .  .  F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7 .  .  .
        "#]]
        .assert_eq(&timeline(Schedule::OneFOneB, 4, 8));
    }

    #[test]
    fn gpipe_timeline() {
        expect_test::expect![[r#"
            stage 0 | F0 F1 F2 F3 .  .  .  .  .  .  B0 B1 B2 B3
            stage 1 | .  F0 F1 F2 F3 .  .  .  .  B0 B1 B2 B3 .
            stage 2 | .  .  F0 F1 F2 F3 .  .  B0 B1 B2 B3 .  .
            stage 3 | .  .  .  F0 F1 F2 F3 B0 B1 B2 B3 .  .  .
        "#]]
        .assert_eq(&timeline(Schedule::GPipe, 4, 4));
    }

    #[test]
    fn interleaved_timeline() {
        expect_test::expect![[r#"
            stage 0 | F0a F1a F0b F1b F2a B0b F3a B1b F2b B0a F3b B1a .   B2b .   B3b B2a B3a
            stage 1 | .   F0a F1a F0b B0b F1b B1b F2a B0a F3a B1a F2b B2b F3b B3b B2a B3a .
        "#]]
        .assert_eq(&timeline(Schedule::Interleaved { chunks: 2 }, 2, 4));
    }

    #[test]
    fn every_schedule_lays_out_without_deadlock() {
        for pp in 1..=8 {
            for m in 1..=12 {
                for schedule in [Schedule::GPipe, Schedule::OneFOneB] {
                    assert!(
                        simulate(&device_orders(schedule, pp, m), pp, 1, m).is_some(),
                        "{schedule} pp={pp} m={m}"
                    );
                }
                if pp >= 2 && m % pp == 0 {
                    for chunks in 2..=4 {
                        let schedule = Schedule::Interleaved { chunks };
                        assert!(
                            simulate(&device_orders(schedule, pp, m), pp, chunks, m).is_some(),
                            "{schedule} pp={pp} m={m}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn numbers_read_like_a_model_card() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(params(8_030_261_248), "8.03 B");
        assert_eq!(params(124_439_808), "124.44 M");
        assert_eq!(params(1_500), "1.5 K");
    }
}
