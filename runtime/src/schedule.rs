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
//! This module only orders work; the program executes the actions and keeps
//! each in-flight micro-batch's activations until its backward.

use thiserror::Error;

/// Which pipeline schedule to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Schedule {
    /// Every forward, then every backward (activations of all micro-batches live at once).
    GPipe,
    /// One forward, one backward: at most `stages - stage` micro-batches in flight.
    OneFOneB,
}

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
}
