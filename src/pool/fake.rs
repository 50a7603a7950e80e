//! A transport that starts no process, for the pool's unit tests: its
//! workers answer a handshake at once, and answer, die or hang on a batch
//! as the test scripts them; the test can also make a worker's answer come
//! late (after the worker was replaced).

use std::collections::HashMap;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use procjob_worker::protocol::{
    Hello, MemorySnapshot, Outcome, Payload, Ready, Request, Results, TaskReply, PROTOCOL_VERSION,
};

use super::transport::{Capabilities, Started, Transport};
use super::{PoolEvent, SendError, WorkerEvent};
use crate::error::{Error, WorkerExit, WorkerId};

/// What a fake worker does with the next batch it is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Act {
    /// Answers every task with its input bytes as output.
    Answer,
    /// Dies (killed by this signal) without answering.
    Die(nix::sys::signal::Signal),
    /// Never answers (until killed).
    Hang,
}

/// What the test sees and steers, shared with the transport.
#[derive(Debug, Default)]
pub(crate) struct Script {
    /// What each slot's worker does with its next batch (default: answer).
    pub(crate) next: HashMap<usize, Act>,
    /// Every frame sent: slot, generation, and the request's kind.
    pub(crate) sent: Vec<(usize, u64, &'static str)>,
    /// Workers killed, by pid.
    pub(crate) killed: Vec<u32>,
    /// Workers stopped, by pid, with how they ended.
    pub(crate) stopped: Vec<(u32, WorkerExit)>,
    /// The last batch each slot's worker is holding (hanging), to answer
    /// late: slot → (generation, tasks' indices).
    pub(crate) held: HashMap<usize, (u64, Vec<u64>)>,
    /// The channel the transport reports on, for a test to post an event
    /// as a worker would.
    pub(crate) events: Option<Sender<PoolEvent>>,
}

/// The fake transport.
pub(crate) struct Fake {
    events: Sender<PoolEvent>,
    script: Arc<Mutex<Script>>,
    /// Per slot: the worker's pid and generation, and whether it has ended
    /// (and how).
    workers: Vec<Option<(u32, u64, Option<WorkerExit>)>>,
    next_pid: u32,
}

impl Fake {
    pub(crate) fn new(slots: usize, events: Sender<PoolEvent>, script: Arc<Mutex<Script>>) -> Fake {
        script.lock().unwrap().events = Some(events.clone());
        Fake { events, script, workers: vec![None; slots], next_pid: 1000 }
    }
}

/// The results a worker of generation `generation` in slot `index` sends
/// for tasks `tasks`: each task's input bytes back.
pub(crate) fn answer(index: usize, generation: u64, tasks: Vec<(u64, Payload)>) -> PoolEvent {
    let tasks = tasks
        .into_iter()
        .map(|(i, input)| TaskReply {
            index: i,
            outcome: Outcome::Ok { output: input, arrays: Vec::new() },
            started_ns: 0,
            finished_ns: 0,
        })
        .collect();
    let results = Results { tasks, memory_follows: false, received_ns: 0, mapped_ns: 0, replying_ns: 0 };
    PoolEvent {
        index,
        generation,
        event: WorkerEvent::Results { results, arrays: Vec::new(), bytes: 100, arrived_ns: 0, read_ns: 0 },
    }
}

impl Transport for Fake {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            fork: false,
            kill_one: true,
            restart_one: true,
            shared_filesystem: false,
            reads_own_replies: true,
            reexecutes_program: false,
        }
    }

    fn start(&mut self, slots: &[(usize, u64)], hello: &dyn Fn(usize) -> Hello) -> (Vec<Started>, Option<Error>) {
        let mut started = Vec::new();
        for &(index, generation) in slots {
            let hello = hello(index);
            assert_eq!(hello.worker_index as usize, index);
            self.next_pid += 1;
            let pid = self.next_pid;
            self.workers[index] = Some((pid, generation, None));
            let ready = Ready {
                protocol: PROTOCOL_VERSION,
                pid,
                same_binary: true,
                memory: MemorySnapshot::default(),
                lend_probe: 0,
            };
            let _ = self.events.send(PoolEvent { index, generation, event: WorkerEvent::Ready(ready) });
            started.push(Started { index, pid, requested_ns: 0, spawned_ns: 0, hello_bytes: Some(50) });
        }
        (started, None)
    }

    fn send(&mut self, index: usize, worker: WorkerId, request: &Request, _bulk: &[&[u8]]) -> Result<u64, SendError> {
        let Some((pid, generation, exited)) = self.workers[index] else {
            return Err(SendError::Broken(Error::Transport { worker, reason: "not running".into() }));
        };
        assert_eq!(pid, worker.pid, "frames go to the worker named");
        if exited.is_some() {
            return Err(SendError::Broken(Error::Transport { worker, reason: "Broken pipe".into() }));
        }
        let mut script = self.script.lock().unwrap();
        let kind = match request {
            Request::Hello(_) => "hello",
            Request::Allow { .. } => "allow",
            Request::Lending { .. } => "lending",
            Request::Run(_) => "run",
        };
        script.sent.push((index, generation, kind));
        let Request::Run(batch) = request else { return Ok(10) };
        match script.next.remove(&index).unwrap_or(Act::Answer) {
            Act::Answer => {
                let tasks = batch.tasks.iter().map(|t| (t.index, t.input.clone())).collect();
                let _ = self.events.send(answer(index, generation, tasks));
            }
            Act::Die(signal) => {
                self.workers[index] = Some((pid, generation, Some(WorkerExit::Signaled { signal })));
                let _ = self.events.send(PoolEvent { index, generation, event: WorkerEvent::Lost { error: None } });
            }
            Act::Hang => {
                script.held.insert(index, (generation, batch.tasks.iter().map(|t| t.index).collect()));
            }
        }
        Ok(10)
    }

    fn send_many(&mut self, frames: &[(usize, WorkerId, &Request, &[&[u8]])]) -> Vec<Result<u64, SendError>> {
        frames.iter().map(|&(index, worker, request, bulk)| self.send(index, worker, request, bulk)).collect()
    }

    fn input_closed(&self, index: usize) -> bool {
        !matches!(self.workers[index], Some((_, _, None)))
    }

    fn reply_arriving(&self, _index: usize) -> bool {
        false
    }

    fn poll_exit(&mut self, index: usize) -> Option<WorkerExit> {
        self.workers[index].and_then(|(_, _, exited)| exited)
    }

    fn close_input(&mut self, index: usize) {
        // A worker that is not busy exits when its input closes.
        let busy = self.script.lock().unwrap().held.contains_key(&index);
        if let Some((_, _, exited @ None)) = self.workers[index].as_mut() {
            if !busy {
                *exited = Some(WorkerExit::Exited { code: 0 });
            }
        }
    }

    fn kill(&mut self, index: usize) {
        if let Some((pid, _, exited @ None)) = self.workers[index].as_mut() {
            *exited = Some(WorkerExit::Signaled { signal: nix::sys::signal::Signal::SIGKILL });
            self.script.lock().unwrap().killed.push(*pid);
        }
    }

    fn stop(&mut self, index: usize, _grace: Duration) -> WorkerExit {
        let Some((pid, _, exited)) = self.workers[index].take() else { return WorkerExit::Unknown };
        let mut script = self.script.lock().unwrap();
        // Past the grace period a busy worker is killed.
        let exit = exited.unwrap_or_else(|| {
            script.killed.push(pid);
            WorkerExit::Signaled { signal: nix::sys::signal::Signal::SIGKILL }
        });
        script.held.remove(&index);
        script.stopped.push((pid, exit));
        exit
    }
}
