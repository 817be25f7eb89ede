//! Pipeline schedules: the order in which one pipeline stage runs the forward
//! and backward passes of the micro-batches of a step, and exchanges
//! activations and gradients with its neighbours.
//!
//! [`actions`] turns a [`Schedule`] into a per-stage list of [`Action`]s. The
//! lists of all stages are deadlock-free when every communication action
//! blocks until both of its halves completed (`Communicator::send`, `recv`,
//! `send_recv`): steady-state 1F1B pairs the send of one direction with the
//! receive of the other in one exchange, as Megatron does. The first stage
//! never receives activations or sends gradients; the last stage never sends
//! activations or receives gradients; their lists leave those halves out.
//!
//! Interleaved 1F1B ([`Schedule::Interleaved`]) has its own list type,
//! [`ChunkAction`], made for all stages at once by [`interleaved`]: each
//! stage holds several model chunks, runs them in Megatron's order, and
//! passes activations and gradients around the pp ring in exchange rounds.
//!
//! [`compute_orders`] is the forward/backward order alone, for any schedule:
//! the compiler's report draws its pipeline timeline from it, so the picture
//! is the schedule the runtime runs.
//!
//! This module only orders work; the runtime's program executes the actions
//! and keeps each in-flight micro-batch's activations until its backward.

use thiserror::Error;

pub use crate::Schedule;

/// One step of a stage's program. Micro-batches are numbered `0..m`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Receive micro-batch `mb`'s input activation from the previous stage.
    RecvForward(usize),
    /// Run micro-batch `mb`'s forward.
    Forward(usize),
    /// Send micro-batch `mb`'s output activation to the next stage.
    SendForward(usize),
    /// Receive the gradient of micro-batch `mb`'s output from the next stage.
    RecvBackward(usize),
    /// Run micro-batch `mb`'s backward.
    Backward(usize),
    /// Send the gradient of micro-batch `mb`'s input to the previous stage.
    SendBackward(usize),
    /// With the next stage: send `send`'s activation, receive `recv`'s gradient.
    SendForwardRecvBackward { send: usize, recv: usize },
    /// With the previous stage: send `send`'s input gradient, receive `recv`'s activation.
    SendBackwardRecvForward { send: usize, recv: usize },
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ScheduleError {
    #[error("stage {stage} is outside a pipeline of {stages} stages")]
    StageOutOfRange { stage: usize, stages: usize },
    #[error("a schedule needs at least one stage and one micro-batch")]
    Empty,
    #[error(
        "interleaved 1f1b needs two stages or more, at least one chunk, and a number of micro-batches ({micro_batches}) that is a multiple of the stages ({stages})"
    )]
    Interleaving { stages: usize, micro_batches: usize },
    #[error(
        "the interleaved schedule of stage {0} is a list of chunk actions (schedule::interleaved)"
    )]
    Chunked(usize),
    #[error("interleaved schedule made no progress in round {round}")]
    Stuck { round: usize },
}

struct Builder {
    first: bool,
    last: bool,
    out: Vec<Action>,
}

impl Builder {
    fn push(&mut self, a: Action) {
        use Action::*;
        let a = match a {
            RecvForward(_) | SendBackward(_) if self.first => return,
            SendForward(_) | RecvBackward(_) if self.last => return,
            SendForwardRecvBackward { .. } if self.last => return,
            SendBackwardRecvForward { .. } if self.first => return,
            a => a,
        };
        self.out.push(a);
    }
}

/// The actions of `stage` (of `stages`) for `micro_batches` micro-batches.
pub fn actions(
    schedule: Schedule,
    stages: usize,
    stage: usize,
    micro_batches: usize,
) -> Result<Vec<Action>, ScheduleError> {
    use Action::*;
    if stages == 0 || micro_batches == 0 {
        return Err(ScheduleError::Empty);
    }
    if stage >= stages {
        return Err(ScheduleError::StageOutOfRange { stage, stages });
    }
    let m = micro_batches;
    let mut b = Builder {
        first: stage == 0,
        last: stage + 1 == stages,
        out: Vec::new(),
    };
    match schedule {
        Schedule::Interleaved { .. } => return Err(ScheduleError::Chunked(stage)),
        Schedule::GPipe => {
            for mb in 0..m {
                b.push(RecvForward(mb));
                b.push(Forward(mb));
                b.push(SendForward(mb));
            }
            for mb in 0..m {
                b.push(RecvBackward(mb));
                b.push(Backward(mb));
                b.push(SendBackward(mb));
            }
        }
        Schedule::OneFOneB => {
            let warmup = (stages - stage - 1).min(m);
            let steady = m - warmup;
            for mb in 0..warmup {
                b.push(RecvForward(mb));
                b.push(Forward(mb));
                b.push(SendForward(mb));
            }
            if steady > 0 {
                b.push(RecvForward(warmup));
            }
            for i in 0..steady {
                let fwd = warmup + i;
                b.push(Forward(fwd));
                b.push(SendForwardRecvBackward { send: fwd, recv: i });
                b.push(Backward(i));
                if i + 1 == steady {
                    b.push(SendBackward(i));
                } else {
                    b.push(SendBackwardRecvForward {
                        send: i,
                        recv: fwd + 1,
                    });
                }
            }
            for mb in steady..m {
                b.push(RecvBackward(mb));
                b.push(Backward(mb));
                b.push(SendBackward(mb));
            }
        }
    }
    Ok(b.out)
}

/// Micro-batch `mb` of model chunk `chunk` (the chunk's index on its stage,
/// `0..chunks`; stage `s`'s chunk `c` is virtual stage `c * stages + s`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Work {
    pub chunk: usize,
    pub mb: usize,
}

/// One step of a stage's interleaved program. The pp group is a ring: the
/// next stage of the last is the first (virtual stage `c * stages + stages -
/// 1` feeds `(c + 1) * stages`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChunkAction {
    Forward(Work),
    Backward(Work),
    /// With the ring's next stage and previous stage at once: send `send`'s
    /// output activation to the next stage, receive `recv`'s input
    /// activation from the previous one (either half may be absent).
    ShiftForward {
        send: Option<Work>,
        recv: Option<Work>,
    },
    /// Send `send`'s input gradient to the previous stage, receive `recv`'s
    /// output gradient from the next one (either half may be absent).
    ShiftBackward {
        send: Option<Work>,
        recv: Option<Work>,
    },
}

/// Megatron's interleaved 1F1B compute order of `stage`: `warmup` forwards,
/// then one forward and one backward at a time, then the remaining
/// backwards. The `k`-th forward runs chunk `(k mod (stages * chunks)) /
/// stages` of micro-batch `(k / (stages * chunks)) * stages + k mod stages`;
/// backwards run the chunks in reverse.
fn megatron_order(stages: usize, chunks: usize, m: usize, stage: usize) -> Vec<(bool, Work)> {
    let total = m * chunks;
    let group = stages * chunks;
    let warmup = if m == stages {
        total
    } else {
        ((stages - stage - 1) * 2 + (chunks - 1) * stages).min(total)
    };
    let work = |k: usize, forward: bool| {
        let c = (k % group) / stages;
        Work {
            chunk: if forward { c } else { chunks - 1 - c },
            mb: (k / group) * stages + k % stages,
        }
    };
    let mut out: Vec<(bool, Work)> = (0..warmup).map(|k| (true, work(k, true))).collect();
    for i in 0..total - warmup {
        out.push((true, work(i + warmup, true)));
        out.push((false, work(i, false)));
    }
    out.extend((total - warmup..total).map(|k| (false, work(k, false))));
    out
}

/// The interleaved 1F1B programs of every stage (index = stage).
///
/// Each stage runs its compute in Megatron's order; the communication is
/// placed by simulating all stages in rounds. In a round, every stage whose
/// next computation has its input runs it, then every stage exchanges what
/// was produced with its ring neighbours: one [`ChunkAction::ShiftForward`]
/// and one [`ChunkAction::ShiftBackward`] (when either half is present),
/// matched by the neighbours' actions of the same round. The lists are
/// deadlock-free with blocking communication: the earliest pending exchange
/// of any stage is met by its neighbours' actions of the same round, which
/// nothing earlier blocks.
pub fn interleaved(
    stages: usize,
    chunks: usize,
    micro_batches: usize,
) -> Result<Vec<Vec<ChunkAction>>, ScheduleError> {
    let m = micro_batches;
    if stages == 0 || m == 0 {
        return Err(ScheduleError::Empty);
    }
    // A single stage has no neighbour to pass chunks around the ring to.
    if chunks == 0 || m % stages != 0 || (stages == 1 && chunks > 1) {
        return Err(ScheduleError::Interleaving {
            stages,
            micro_batches: m,
        });
    }
    let orders: Vec<Vec<(bool, Work)>> = (0..stages)
        .map(|s| megatron_order(stages, chunks, m, s))
        .collect();
    let first = |s: usize, w: Work| s == 0 && w.chunk == 0;
    let last = |s: usize, w: Work| s + 1 == stages && w.chunk + 1 == chunks;
    let mut pos = vec![0usize; stages];
    let mut have_act = vec![vec![vec![false; m]; chunks]; stages];
    let mut have_grad = vec![vec![vec![false; m]; chunks]; stages];
    let mut lists: Vec<Vec<ChunkAction>> = vec![Vec::new(); stages];
    let mut round = 0;
    while (0..stages).any(|s| pos[s] < orders[s].len()) {
        // (activation sent to the next stage, gradient sent to the previous one)
        let mut sent: Vec<(Option<Work>, Option<Work>)> = vec![(None, None); stages];
        let mut progress = false;
        for s in 0..stages {
            let Some(&(forward, w)) = orders[s].get(pos[s]) else {
                continue;
            };
            let ready = if forward {
                first(s, w) || have_act[s][w.chunk][w.mb]
            } else {
                last(s, w) || have_grad[s][w.chunk][w.mb]
            };
            if !ready {
                continue;
            }
            progress = true;
            pos[s] += 1;
            if forward {
                lists[s].push(ChunkAction::Forward(w));
                if !last(s, w) {
                    sent[s].0 = Some(w);
                }
            } else {
                lists[s].push(ChunkAction::Backward(w));
                if !first(s, w) {
                    sent[s].1 = Some(w);
                }
            }
        }
        if !progress {
            return Err(ScheduleError::Stuck { round });
        }
        for s in 0..stages {
            let (prev, next) = ((s + stages - 1) % stages, (s + 1) % stages);
            // What the neighbours sent, renamed to this stage's chunks.
            let recv_act = sent[prev].0.map(|w| Work {
                chunk: if s == 0 { w.chunk + 1 } else { w.chunk },
                mb: w.mb,
            });
            let recv_grad = sent[next].1.map(|w| Work {
                chunk: if s + 1 == stages {
                    w.chunk - 1
                } else {
                    w.chunk
                },
                mb: w.mb,
            });
            if sent[s].0.is_some() || recv_act.is_some() {
                lists[s].push(ChunkAction::ShiftForward {
                    send: sent[s].0,
                    recv: recv_act,
                });
            }
            if sent[s].1.is_some() || recv_grad.is_some() {
                lists[s].push(ChunkAction::ShiftBackward {
                    send: sent[s].1,
                    recv: recv_grad,
                });
            }
            if let Some(w) = recv_act {
                have_act[s][w.chunk][w.mb] = true;
            }
            if let Some(w) = recv_grad {
                have_grad[s][w.chunk][w.mb] = true;
            }
        }
        round += 1;
    }
    Ok(lists)
}

/// One computation of a stage: the forward or backward pass of one
/// micro-batch through one of the stage's model chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pass {
    Forward(Work),
    Backward(Work),
}

/// The order in which each stage (index = stage) runs its passes under
/// `schedule`: the computations of the runtime's action lists
/// ([`actions`], [`interleaved`]) without their communication.
pub fn compute_orders(
    schedule: Schedule,
    stages: usize,
    micro_batches: usize,
) -> Result<Vec<Vec<Pass>>, ScheduleError> {
    match schedule {
        Schedule::Interleaved { chunks } => {
            Ok(interleaved(stages, chunks as usize, micro_batches)?
                .into_iter()
                .map(|list| {
                    list.into_iter()
                        .filter_map(|a| match a {
                            ChunkAction::Forward(w) => Some(Pass::Forward(w)),
                            ChunkAction::Backward(w) => Some(Pass::Backward(w)),
                            ChunkAction::ShiftForward { .. }
                            | ChunkAction::ShiftBackward { .. } => None,
                        })
                        .collect()
                })
                .collect())
        }
        Schedule::GPipe | Schedule::OneFOneB => (0..stages)
            .map(|stage| {
                Ok(actions(schedule, stages, stage, micro_batches)?
                    .into_iter()
                    .filter_map(|a| match a {
                        Action::Forward(mb) => Some(Pass::Forward(Work { chunk: 0, mb })),
                        Action::Backward(mb) => Some(Pass::Backward(Work { chunk: 0, mb })),
                        _ => None,
                    })
                    .collect())
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Simulates all stages with blocking communication: an action completes
    /// once each of its send and receive halves met the matching half in the
    /// neighbour's current action. Panics (test failure) on deadlock or on a
    /// forward/backward that runs without its input.
    fn simulate(schedule: Schedule, stages: usize, m: usize) -> usize {
        use Action::*;
        let lists: Vec<Vec<Action>> = (0..stages)
            .map(|s| actions(schedule, stages, s, m).expect("valid"))
            .collect();
        // (direction: 0 activation / 1 gradient, mb, from stage, to stage)
        type Msg = (u8, usize, usize, usize);
        let halves = |s: usize, a: Action| -> (Vec<Msg>, Vec<Msg>) {
            match a {
                SendForward(mb) => (vec![(0, mb, s, s + 1)], vec![]),
                RecvForward(mb) => (vec![], vec![(0, mb, s - 1, s)]),
                SendBackward(mb) => (vec![(1, mb, s, s - 1)], vec![]),
                RecvBackward(mb) => (vec![], vec![(1, mb, s + 1, s)]),
                SendForwardRecvBackward { send, recv } => {
                    (vec![(0, send, s, s + 1)], vec![(1, recv, s + 1, s)])
                }
                SendBackwardRecvForward { send, recv } => {
                    (vec![(1, send, s, s - 1)], vec![(0, recv, s - 1, s)])
                }
                Forward(_) | Backward(_) => (vec![], vec![]),
            }
        };
        let mut pc = vec![0usize; stages];
        let mut pending: Vec<(Vec<Msg>, Vec<Msg>)> = vec![(vec![], vec![]); stages];
        let mut loaded = vec![false; stages];
        let mut have_act = vec![vec![false; m]; stages];
        let mut have_grad = vec![vec![false; m]; stages];
        let mut done_f = vec![vec![false; m]; stages];
        let mut steps = 0;
        loop {
            let mut progress = false;
            for s in 0..stages {
                if pc[s] < lists[s].len() && !loaded[s] {
                    pending[s] = halves(s, lists[s][pc[s]]);
                    loaded[s] = true;
                }
            }
            // Match sends against the receiving stage's current receives.
            for s in 0..stages {
                let sends = pending[s].0.clone();
                for msg in sends {
                    let to = msg.3;
                    if let Some(i) = pending[to].1.iter().position(|r| *r == msg) {
                        pending[to].1.remove(i);
                        pending[s].0.retain(|x| *x != msg);
                        if msg.0 == 0 {
                            have_act[to][msg.1] = true;
                        } else {
                            have_grad[to][msg.1] = true;
                        }
                        progress = true;
                    }
                }
            }
            for s in 0..stages {
                if !loaded[s] || !pending[s].0.is_empty() || !pending[s].1.is_empty() {
                    continue;
                }
                match lists[s][pc[s]] {
                    Forward(mb) => {
                        assert!(s == 0 || have_act[s][mb], "stage {s} F{mb} without input");
                        done_f[s][mb] = true;
                    }
                    Backward(mb) => {
                        assert!(done_f[s][mb], "stage {s} B{mb} before F{mb}");
                        assert!(
                            s + 1 == stages || have_grad[s][mb],
                            "stage {s} B{mb} without output gradient"
                        );
                    }
                    _ => {}
                }
                pc[s] += 1;
                loaded[s] = false;
                steps += 1;
                progress = true;
            }
            if (0..stages).all(|s| pc[s] == lists[s].len()) {
                return steps;
            }
            assert!(
                progress,
                "{schedule:?} deadlocks: {stages} stages, {m} mb, at {pc:?}"
            );
        }
    }

    #[test]
    fn schedules_run_every_micro_batch_once_without_deadlock() {
        for schedule in [Schedule::GPipe, Schedule::OneFOneB] {
            for stages in 1..=4 {
                for m in 1..=6 {
                    simulate(schedule, stages, m);
                    for s in 0..stages {
                        let a = actions(schedule, stages, s, m).expect("valid");
                        for mb in 0..m {
                            let f = a.iter().filter(|x| **x == Action::Forward(mb)).count();
                            let b = a.iter().filter(|x| **x == Action::Backward(mb)).count();
                            assert_eq!((f, b), (1, 1), "{schedule:?} stage {s} mb {mb}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn one_f_one_b_bounds_in_flight_micro_batches() {
        let (stages, m) = (4, 8);
        for s in 0..stages {
            let mut live = 0usize;
            let mut peak = 0;
            for a in actions(Schedule::OneFOneB, stages, s, m).expect("valid") {
                match a {
                    Action::Forward(_) => live += 1,
                    Action::Backward(_) => live -= 1,
                    _ => {}
                }
                peak = peak.max(live);
            }
            assert_eq!(peak, stages - s);
        }
        let gpipe = actions(Schedule::GPipe, stages, 0, m).expect("valid");
        assert_eq!(
            gpipe
                .iter()
                .filter(|a| matches!(a, Action::Forward(_)))
                .count(),
            m
        );
        assert_eq!(
            actions(Schedule::GPipe, 2, 2, 1),
            Err(ScheduleError::StageOutOfRange {
                stage: 2,
                stages: 2
            })
        );
    }

    /// Runs the interleaved lists of every stage with blocking halves (an
    /// exchange completes once each half met the matching half of the
    /// neighbour's current action) and checks data flow: every chunk's
    /// forward and backward once, a forward after its input arrived, a
    /// backward after its forward and its output gradient.
    fn simulate_interleaved(stages: usize, chunks: usize, m: usize) {
        use ChunkAction::*;
        let lists = interleaved(stages, chunks, m).expect("valid");
        let vs = |s: usize, w: Work| w.chunk * stages + s;
        // (direction, virtual stage of the receiver's work, mb, from, to)
        type Msg = (u8, usize, usize, usize, usize);
        let halves = |s: usize, a: ChunkAction| -> (Vec<Msg>, Vec<Msg>) {
            let (prev, next) = ((s + stages - 1) % stages, (s + 1) % stages);
            let (mut sends, mut recvs) = (vec![], vec![]);
            match a {
                ShiftForward { send, recv } => {
                    if let Some(w) = send {
                        sends.push((0, vs(s, w) + 1, w.mb, s, next));
                    }
                    if let Some(w) = recv {
                        recvs.push((0, vs(s, w), w.mb, prev, s));
                    }
                }
                ShiftBackward { send, recv } => {
                    if let Some(w) = send {
                        sends.push((1, vs(s, w) - 1, w.mb, s, prev));
                    }
                    if let Some(w) = recv {
                        recvs.push((1, vs(s, w), w.mb, next, s));
                    }
                }
                Forward(_) | Backward(_) => {}
            }
            (sends, recvs)
        };
        let n_vs = stages * chunks;
        let mut pc = vec![0usize; stages];
        let mut pending: Vec<Option<(Vec<Msg>, Vec<Msg>)>> = vec![None; stages];
        let mut have_act = vec![vec![false; m]; n_vs];
        let mut have_grad = vec![vec![false; m]; n_vs];
        let mut done_f = vec![vec![0usize; m]; n_vs];
        let mut done_b = vec![vec![0usize; m]; n_vs];
        loop {
            let mut progress = false;
            for s in 0..stages {
                if pending[s].is_none() && pc[s] < lists[s].len() {
                    pending[s] = Some(halves(s, lists[s][pc[s]]));
                }
            }
            for s in 0..stages {
                let sends = pending[s].as_ref().map(|p| p.0.clone()).unwrap_or_default();
                for msg in sends {
                    let to = msg.4;
                    let Some(recvs) = pending[to].as_mut().map(|p| &mut p.1) else {
                        continue;
                    };
                    if let Some(i) = recvs.iter().position(|r| *r == msg) {
                        recvs.remove(i);
                        if let Some(p) = pending[s].as_mut() {
                            p.0.retain(|x| *x != msg);
                        }
                        let table = if msg.0 == 0 {
                            &mut have_act
                        } else {
                            &mut have_grad
                        };
                        table[msg.1][msg.2] = true;
                        progress = true;
                    }
                }
            }
            for s in 0..stages {
                match &pending[s] {
                    Some((sends, recvs)) if sends.is_empty() && recvs.is_empty() => {}
                    _ => continue,
                }
                match lists[s][pc[s]] {
                    Forward(w) => {
                        let v = vs(s, w);
                        assert!(
                            v == 0 || have_act[v][w.mb],
                            "stage {s} F{w:?} without input"
                        );
                        done_f[v][w.mb] += 1;
                    }
                    Backward(w) => {
                        let v = vs(s, w);
                        assert_eq!(done_f[v][w.mb], 1, "stage {s} B{w:?} before its forward");
                        assert!(
                            v + 1 == n_vs || have_grad[v][w.mb],
                            "stage {s} B{w:?} without output gradient"
                        );
                        done_b[v][w.mb] += 1;
                    }
                    _ => {}
                }
                pc[s] += 1;
                pending[s] = None;
                progress = true;
            }
            if (0..stages).all(|s| pc[s] == lists[s].len()) {
                break;
            }
            assert!(
                progress,
                "interleaved deadlocks: {stages} stages, {chunks} chunks, {m} mb, at {pc:?}"
            );
        }
        for v in 0..n_vs {
            assert!(
                done_f[v].iter().chain(&done_b[v]).all(|n| *n == 1),
                "vs {v}"
            );
        }
    }

    #[test]
    fn interleaved_runs_every_chunk_once_without_deadlock() {
        for stages in 1..=4 {
            for chunks in 1..=3 {
                if stages == 1 && chunks > 1 {
                    continue;
                }
                for m in (stages..=12).step_by(stages) {
                    simulate_interleaved(stages, chunks, m);
                }
            }
        }
    }

    #[test]
    fn interleaved_follows_megatron_and_rejects_bad_shapes() {
        // Stage 0 of 2 with 2 chunks and 4 micro-batches: warm-up of
        // (2 - 0 - 1) * 2 + (2 - 1) * 2 = 4 forwards, chunk 0 of mbs 0 and 1
        // then chunk 1 of mbs 0 and 1; the first backward is chunk 1's mb 0.
        let lists = interleaved(2, 2, 4).expect("valid");
        let compute: Vec<(bool, usize, usize)> = lists[0]
            .iter()
            .filter_map(|a| match a {
                ChunkAction::Forward(w) => Some((true, w.chunk, w.mb)),
                ChunkAction::Backward(w) => Some((false, w.chunk, w.mb)),
                _ => None,
            })
            .collect();
        assert_eq!(
            &compute[..6],
            &[
                (true, 0, 0),
                (true, 0, 1),
                (true, 1, 0),
                (true, 1, 1),
                (true, 0, 2),
                (false, 1, 0)
            ]
        );
        assert_eq!(
            interleaved(2, 2, 3),
            Err(ScheduleError::Interleaving {
                stages: 2,
                micro_batches: 3
            })
        );
        assert!(interleaved(1, 2, 2).is_err());
        assert_eq!(
            actions(Schedule::Interleaved { chunks: 2 }, 2, 0, 4),
            Err(ScheduleError::Chunked(0))
        );
    }
}
