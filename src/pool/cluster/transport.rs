//! Rank 0's transport: a pool's slots spread over the nodes of the job.
//!
//! Slots placed on rank 0's node are local worker processes ([`Pipes`]).
//! A slot placed on another node is a worker its agent starts; frames for
//! it go to the agent as data messages, and what it writes comes back into
//! a local pipe that an ordinary reader thread reads, so replies are
//! decoded, checked and landed in place exactly as a local worker's are.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use procjob_worker::protocol::{self, FrameKind, Hello, Request};

use super::link::Outgoing;
use super::wire::{Down, Key, KEY_LEN, TAG_DATA};
use super::world::{hub, world, Hub, Node, World};
use crate::error::{Error, WorkerExit, WorkerId};
use crate::pool::pipes::{read_replies, Pipes};
use crate::pool::transport::{Capabilities, Started, Transport};
use crate::pool::{PoolConfig, PoolEvent, ReaderShared, SendError, StartMethod, WorkerPool, HANDSHAKE_TIMEOUT};

/// Pools made so far (each pool's keys carry its number).
static POOLS: AtomicU32 = AtomicU32::new(0);

/// The node (index in [`World::nodes`]) of each of `workers` slots: each
/// node gets at most its CPUs, nodes taken in turn (rank 0's first), until
/// every slot has one; beyond the CPUs of all nodes, in turn again.
pub(super) fn placement(world: &World, workers: usize) -> Vec<usize> {
    let mut count = vec![0usize; world.nodes.len()];
    let mut out = Vec::with_capacity(workers);
    let total: usize = world.nodes.iter().map(|n| n.cpus).sum();
    let mut node = 0;
    while out.len() < workers {
        let over = out.len() >= total;
        if over || count[node] < world.nodes[node].cpus {
            count[node] += 1;
            out.push(node);
        }
        node = (node + 1) % world.nodes.len();
    }
    out
}

/// Where each of `workers` slots of a pool made now would run: its
/// agent's rank and host (`None` when not under MPI).
pub fn worker_places(workers: usize) -> Option<Vec<(usize, String)>> {
    let world = world()?;
    Some(placement(world, workers).into_iter().map(|n| (world.nodes[n].agent, world.nodes[n].host.clone())).collect())
}

/// A pool across the ranks of the job, when this is rank 0 of one and the
/// pool re-executes this program (a forked pool, or one of another worker
/// program, stays on this machine).
pub(crate) fn pool_on_ranks(config: &PoolConfig) -> Option<WorkerPool> {
    let world = world()?;
    let hub = hub()?;
    if config.program.is_some() || !matches!(config.start, StartMethod::Spawn) {
        return None;
    }
    let workers = config.workers;
    let nodes = placement(world, workers);
    let pool = POOLS.fetch_add(1, Ordering::Relaxed);
    Some(WorkerPool::with_transport(workers, config.idle_timeout, move |events, readers| {
        let local = Pipes::new(workers, None, StartMethod::Spawn, events.clone(), readers.clone());
        Box::new(Ranks {
            hub,
            pool,
            nodes: world.nodes.clone(),
            place: nodes,
            local,
            remote: (0..workers).map(|_| None).collect(),
            events,
            readers,
            unresponsive: Default::default(),
            kill_causes: Default::default(),
        })
    }))
}

/// A worker on another node.
struct Remote {
    key: Key,
    rank: usize,
    input: Option<LinkWriter>,
    /// A second handle on the pipe its output arrives in (see
    /// [`Transport::reply_arriving`]).
    output: File,
    arriving: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
    /// Batches written to it so far (the number of the next).
    runs: u64,
}

/// A worker's input stream as seen from rank 0: bytes gather until a
/// flush (the end of each frame), then go to its agent as one message.
struct LinkWriter {
    hub: &'static Hub,
    rank: i32,
    key: Key,
    buf: Vec<u8>,
}

impl LinkWriter {
    fn new(hub: &'static Hub, rank: usize, key: Key) -> LinkWriter {
        LinkWriter { hub, rank: rank as i32, key, buf: key.to_bytes().to_vec() }
    }
}

impl Write for LinkWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if self.hub.lock().input_closed.contains(&self.key) {
            return Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the worker's input is closed"));
        }
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.len() > KEY_LEN {
            let bytes = std::mem::replace(&mut self.buf, self.key.to_bytes().to_vec());
            self.hub
                .link
                .send(Outgoing { dest: self.rank, tag: TAG_DATA, bytes })
                .map_err(|_| std::io::Error::other("the MPI thread has stopped"))?;
        }
        Ok(())
    }
}

/// The transport (see the module docs).
struct Ranks {
    hub: &'static Hub,
    pool: u32,
    nodes: Vec<Node>,
    /// Each slot's node.
    place: Vec<usize>,
    local: Pipes,
    remote: Vec<Option<Remote>>,
    events: Sender<PoolEvent>,
    readers: ReaderShared,
    /// Ranks that did not answer a kill: not waited for again.
    unresponsive: std::collections::HashSet<usize>,
    /// Why procjob killed the worker of a slot it has just reaped, when it
    /// did ([`Transport::kill_cause`]).
    kill_causes: std::collections::HashMap<usize, String>,
}

/// How long a stop waits for an agent to report a killed worker's end.
const KILL_WAIT: Duration = Duration::from_secs(2);

impl Ranks {
    fn is_local(&self, index: usize) -> bool {
        self.place[index] == 0
    }

    fn node_of(&self, index: usize) -> &Node {
        &self.nodes[self.place[index]]
    }

    /// Starts remote workers in `slots`; see [`Transport::start`].
    fn start_remote(
        &mut self,
        slots: &[(usize, u64)],
        hello: &dyn Fn(usize) -> Hello,
    ) -> (Vec<Started>, Option<Error>) {
        let requested_ns = procjob_worker::clock::monotonic_ns();
        let mut asked = Vec::new();
        let mut failure = None;
        for &(index, generation) in slots {
            let key = Key { pool: self.pool, slot: index as u32, generation };
            let node = self.node_of(index);
            let on_node = self.place.iter().filter(|&&n| n == self.place[index]).count();
            let threads = (node.cpus / on_node.max(1)).max(1) as u32;
            let (read, write) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
                Ok(p) => p,
                Err(e) => {
                    failure = Some(Error::Start { index, reason: format!("cannot make a pipe: {e}") });
                    break;
                }
            };
            self.hub.lock().streams.insert(key, Arc::new(File::from(write)));
            self.hub.send(node.agent, &Down::Start { key, secret: hello(index).secret, threads });
            asked.push((index, key, node.agent, File::from(read)));
        }
        let keys: Vec<Key> = asked.iter().map(|a| a.1).collect();
        let state = self.hub.wait_for(HANDSHAKE_TIMEOUT, |s| keys.iter().all(|k| s.started.contains_key(k)));
        let answers: HashMap<Key, Result<u32, String>> =
            keys.iter().filter_map(|k| Some((*k, state.started.get(k)?.clone()))).collect();
        drop(state);
        let spawned_ns = procjob_worker::clock::monotonic_ns();
        let mut started = Vec::new();
        for (index, key, rank, read) in asked {
            self.hub.lock().started.remove(&key);
            let host = &self.node_of(index).host;
            let pid = match answers.get(&key) {
                Some(Ok(pid)) => *pid,
                other => {
                    self.hub.lock().streams.remove(&key);
                    let reason = match other {
                        Some(Err(reason)) => reason.clone(),
                        _ => format!("no answer within {} s", HANDSHAKE_TIMEOUT.as_secs()),
                    };
                    failure.get_or_insert(Error::Start {
                        index,
                        reason: format!("on rank {rank} (host {host}): {reason}"),
                    });
                    continue;
                }
            };
            let output = match read.try_clone() {
                Ok(o) => o,
                Err(e) => {
                    self.hub.send(rank, &Down::Kill { key });
                    failure.get_or_insert(Error::Start { index, reason: format!("cannot clone a pipe: {e}") });
                    continue;
                }
            };
            let arriving = Arc::new(AtomicBool::new(false));
            let reading = Arc::clone(&arriving);
            let (tx, readers) = (self.events.clone(), self.readers.clone());
            let generation = key.generation;
            let reader = std::thread::Builder::new()
                .name(format!("procjob-reader-{index}"))
                .spawn(move || read_replies(index, generation, read, tx, readers, Vec::new(), reading, None));
            let reader = match reader {
                Ok(r) => r,
                Err(e) => {
                    self.hub.send(rank, &Down::Kill { key });
                    failure.get_or_insert(Error::Start { index, reason: format!("cannot start a reader thread: {e}") });
                    continue;
                }
            };
            let mut input = LinkWriter::new(self.hub, rank, key);
            let sent = protocol::send(&mut input, FrameKind::Request, &Request::Hello(hello(index)), &[]);
            self.remote[index] =
                Some(Remote { key, rank, input: Some(input), output, arriving, reader: Some(reader), runs: 0 });
            started.push(Started { index, pid, requested_ns, spawned_ns, hello_bytes: sent.ok() });
        }
        (started, failure)
    }
}

/// Writes one request frame to a remote worker (`None`: not running),
/// having shipped to its node what a batch reads there (`ship.rs`).
fn write_remote(
    hub: &Hub,
    remote: Option<&mut Remote>,
    worker: WorkerId,
    request: &Request,
    bulk: &[&[u8]],
) -> Result<u64, SendError> {
    let Some(Remote { key, rank, input: Some(input), runs, .. }) = remote else {
        return Err(SendError::Broken(Error::Transport { worker, reason: "the worker is not running".into() }));
    };
    if let Request::Run(batch) = request {
        // Nothing of the frame is written yet: the worker stays as it was.
        super::ship::before_run(hub, *rank, *key, *runs, batch)
            .map_err(|e| SendError::Unsendable(std::io::Error::other(format!("cannot ship a batch's files: {e}"))))?;
    }
    let sent = protocol::send(input, FrameKind::Request, request, bulk).map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput => SendError::Unsendable(e),
        _ => SendError::Broken(Error::Transport { worker, reason: format!("cannot send a batch: {e}") }),
    })?;
    if matches!(request, Request::Run(_)) {
        *runs += 1;
    }
    Ok(sent)
}

impl Transport for Ranks {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            fork: false,
            kill_one: true,
            restart_one: true,
            // Remote workers see rank 0's files only on a shared
            // filesystem, which the matmul job checks (probe_shared).
            shared_filesystem: false,
            // Agents copy every byte out of the workers' pipes too.
            reads_own_replies: true,
            reexecutes_program: true,
        }
    }

    fn start(&mut self, slots: &[(usize, u64)], hello: &dyn Fn(usize) -> Hello) -> (Vec<Started>, Option<Error>) {
        type Slots = Vec<(usize, u64)>;
        let (local, remote): (Slots, Slots) = slots.iter().partition(|&&(index, _)| self.is_local(index));
        // Remote starts first: their agents start them while this node's
        // start here.
        let (mut started, failure) = self.start_remote(&remote, hello);
        let (more, local_failure) = self.local.start(&local, hello);
        started.extend(more);
        (started, failure.or(local_failure))
    }

    fn send(&mut self, index: usize, worker: WorkerId, request: &Request, bulk: &[&[u8]]) -> Result<u64, SendError> {
        if self.is_local(index) {
            return self.local.send(index, worker, request, bulk);
        }
        write_remote(self.hub, self.remote[index].as_mut(), worker, request, bulk)
    }

    fn send_many(&mut self, frames: &[(usize, WorkerId, &Request, &[&[u8]])]) -> Vec<Result<u64, SendError>> {
        let local: Vec<(usize, WorkerId, &Request, &[&[u8]])> =
            frames.iter().copied().filter(|f| self.is_local(f.0)).collect();
        let mut local_results = self.local.send_many(&local).into_iter();
        let mut out = Vec::with_capacity(frames.len());
        for &(index, worker, request, bulk) in frames {
            if self.is_local(index) {
                out.push(
                    local_results.next().unwrap_or_else(|| {
                        Err(SendError::Broken(Error::Transport { worker, reason: "not sent".into() }))
                    }),
                );
            } else {
                out.push(write_remote(self.hub, self.remote[index].as_mut(), worker, request, bulk));
            }
        }
        out
    }

    fn input_closed(&self, index: usize) -> bool {
        if self.is_local(index) {
            return self.local.input_closed(index);
        }
        match &self.remote[index] {
            Some(r) => r.input.is_none() || self.hub.lock().input_closed.contains(&r.key),
            None => true,
        }
    }

    fn reply_arriving(&self, index: usize) -> bool {
        use std::os::fd::AsFd;
        if self.is_local(index) {
            return self.local.reply_arriving(index);
        }
        let Some(r) = &self.remote[index] else { return false };
        if r.arriving.load(Ordering::SeqCst) {
            return true;
        }
        crate::pool::pipes::readable_now(r.output.as_fd())
    }

    fn kill_cause(&mut self, index: usize) -> Option<String> {
        if self.is_local(index) {
            return self.local.kill_cause(index);
        }
        self.kill_causes.remove(&index)
    }

    fn poll_exit(&mut self, index: usize) -> Option<WorkerExit> {
        if self.is_local(index) {
            return self.local.poll_exit(index);
        }
        let key = self.remote[index].as_ref()?.key;
        self.hub.lock().exits.get(&key).copied()
    }

    fn close_input(&mut self, index: usize) {
        if self.is_local(index) {
            return self.local.close_input(index);
        }
        if let Some(r) = self.remote[index].as_mut() {
            if r.input.take().is_some() {
                self.hub.send(r.rank, &Down::CloseInput { key: r.key });
            }
        }
    }

    fn kill(&mut self, index: usize) {
        if self.is_local(index) {
            return self.local.kill(index);
        }
        if let Some(r) = &self.remote[index] {
            self.hub.send(r.rank, &Down::Kill { key: r.key });
        }
    }

    fn stop(&mut self, index: usize, grace: Duration) -> WorkerExit {
        if self.is_local(index) {
            return self.local.stop(index, grace);
        }
        let Some(mut r) = self.remote[index].take() else { return WorkerExit::Unknown };
        if r.input.take().is_some() {
            self.hub.send(r.rank, &Down::CloseInput { key: r.key });
        }
        let key = r.key;
        // When the program is being stopped by a signal, the launcher is
        // ending every rank too (it forwards Ctrl-C as SIGTERM): no agent
        // is waited for. Nor is one that did not answer a kill before.
        let wait = crate::signals::received().is_none() && !self.unresponsive.contains(&r.rank);
        let mut state = self.hub.wait_for(if wait { grace } else { Duration::ZERO }, |s| s.exits.contains_key(&key));
        let mut killed = None;
        if !state.exits.contains_key(&key) {
            drop(state);
            self.hub.send(r.rank, &Down::Kill { key });
            // (Not waited for, it was not given `grace`: no cause then.)
            killed = wait.then(|| crate::pool::pipes::still_running(grace, crate::pool::pipes::INPUT_CLOSED));
            // The agent reaps a killed worker at once; this bounds the wait
            // should its rank be gone (the launcher then ends the job).
            state = self.hub.wait_for(if wait { KILL_WAIT } else { Duration::ZERO }, |s| s.exits.contains_key(&key));
            if !state.exits.contains_key(&key) {
                self.unresponsive.insert(r.rank);
            }
        }
        let exit = state.exits.remove(&key).unwrap_or(WorkerExit::Unknown);
        match state.kill_causes.remove(&key).or(killed) {
            Some(why) => self.kill_causes.insert(index, why),
            None => self.kill_causes.remove(&index),
        };
        state.streams.remove(&key);
        state.input_closed.remove(&key);
        state.started.remove(&key);
        drop(state);
        if let Some(reader) = r.reader.take() {
            let _ = reader.join();
        }
        exit
    }
}
