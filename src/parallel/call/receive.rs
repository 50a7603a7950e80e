//! Receiving: waiting for the next event from the pool, and what each one
//! means for the call — a batch's replies (decoded through the
//! [`TaskCodec`]), a handshake, a lost worker (retried, sent again or
//! failed), a deadline passed, an interrupt.

use std::time::{Duration, Instant};

use procjob_worker::array::{Array, ArrayError};
use procjob_worker::protocol::{FailureCause, Outcome, Ready, Results};

use super::batch::{batch_deadline, Encoded, InFlight};
use super::{CallCore, TaskCodec};
use crate::error::{Error, WorkerExit};
use crate::pool::{PoolEvent, WorkerEvent};
use crate::scheduler::Event;
use crate::trace::Lane;

impl CallCore<'_> {
    /// Waits for the next event, or the nearest deadline: a batch's time
    /// limit, a replacement's handshake.
    pub(super) fn wait(&mut self, codec: &mut dyn TaskCodec) {
        let now = Instant::now();
        let deadline = self
            .in_flight
            .iter()
            .flatten()
            .filter_map(|f| f.deadline)
            .chain(self.joining.iter().flatten().copied())
            .min();
        let event = self.pool().next_event(deadline.map(|d| d.saturating_duration_since(now)));
        match event {
            Some(event) => self.on_event(event, codec),
            None => self.on_deadline(codec),
        }
    }

    /// A deadline passed: replacements that did not answer their handshake
    /// and batches past their time limit fail the call.
    fn on_deadline(&mut self, codec: &mut dyn TaskCodec) {
        let now = Instant::now();
        for w in 0..self.joining.len() {
            if self.joining[w].is_some_and(|d| d <= now) {
                self.joining[w] = None;
                self.pool().kill(w);
                self.fail(Error::Start {
                    index: w,
                    reason: format!(
                        "a replacement worker did not answer its handshake within {} s",
                        crate::pool::HANDSHAKE_TIMEOUT.as_secs()
                    ),
                });
            }
        }
        // Judge the deadlines on what has arrived: answers already read, and
        // answers waiting in a pipe. When the coordinator itself was not
        // running (stopped, or starved of CPU), the workers may have
        // answered long ago.
        while let Some(event) = self.pool().next_event(Some(Duration::ZERO)) {
            self.on_event(event, codec);
        }
        let now = Instant::now();
        let expired: Vec<usize> = (0..self.in_flight.len())
            .filter(|&w| self.in_flight[w].as_ref().and_then(|f| f.deadline).is_some_and(|d| d <= now))
            .collect();
        let limit = self.parallel.timeout.unwrap_or_default();
        for w in expired {
            if self.pool().reply_arriving(w) {
                // The worker has finished and is answering: give the answer
                // time to be read, without killing it for our own delay (at
                // least a moment, so that a tiny limit does not spin here).
                if let Some(flight) = self.in_flight[w].as_mut() {
                    flight.deadline = batch_deadline(now, limit.max(Duration::from_millis(10)), 1);
                }
                continue;
            }
            let flight = self.in_flight[w].take().expect("expired batches are in flight");
            let worker = self.pool().worker_id(w);
            self.pool().kill(w);
            self.scheduler.handle(Event::WorkerLost { worker: w });
            let task = flight.tasks.into_iter().next().expect("a batch has a task");
            self.fail(Error::Timeout { task, worker, limit });
        }
    }

    /// Handles one event from the pool.
    pub(super) fn on_event(&mut self, event: PoolEvent, codec: &mut dyn TaskCodec) {
        let w = event.index;
        match event.event {
            WorkerEvent::Results { results, arrays, arrived_ns, read_ns, bytes, .. } => {
                let Some(flight) = self.in_flight[w].take() else { return };
                self.trace_results(w, &results, &flight, (arrived_ns, read_ns), bytes);
                self.on_results(w, results, arrays, flight, codec);
            }
            WorkerEvent::Lost { error } => self.on_lost(w, error),
            WorkerEvent::Ready(ready) => self.on_ready(w, &ready),
            WorkerEvent::Interrupted { signal } => self.interrupt(signal),
        }
    }

    /// Records, when tracing, how worker `w` received, computed and
    /// answered the batch `flight`, and how its answer (`bytes` long) was
    /// read, from its arrival to the end of reading (`arrived_read`); and
    /// the flows of the request in and the answer out.
    fn trace_results(&mut self, w: usize, results: &Results, flight: &InFlight, arrived_read: (u64, u64), bytes: u64) {
        let (arrived_ns, read_ns) = arrived_read;
        let Some(trace) = self.parallel.trace.as_mut() else { return };
        let pid = self.parallel.pool.as_ref().and_then(|p| p.pid(w)).unwrap_or(0);
        let lane = Lane::Worker { index: w, pid };
        trace.span(lane, "map", "receive and map", results.received_ns, results.mapped_ns);
        let mid = |a: u64, b: u64| a + b.saturating_sub(a) / 2;
        trace.received(lane, mid(results.received_ns, results.mapped_ns));
        let answer = match (flight.tasks.first(), flight.tasks.len()) {
            (Some(t), 1) => format!("results of {t}"),
            _ => format!("results of {} tasks", flight.tasks.len()),
        };
        let (from, to) = (mid(results.replying_ns, arrived_ns), mid(arrived_ns, read_ns));
        // Results the worker lent by address were copied out of its memory,
        // not read from the pipe: the flow and the span say how many bytes.
        let lent = results.lent_bytes();
        trace.flow_lent(answer, bytes, lent, (lane, from), (Lane::Coordinator, to));
        for (reply, task) in results.tasks.iter().zip(&flight.tasks) {
            trace.span(lane, "compute", format!("compute {task}"), reply.started_ns, reply.finished_ns);
        }
        trace.span(lane, "reply", "send results", results.replying_ns, arrived_ns);
        let receive = match lent {
            0 => format!("receive from worker {w}"),
            lent => format!("receive from worker {w}, {lent} bytes read from its memory"),
        };
        trace.span(Lane::Coordinator, "stack", receive, arrived_ns, read_ns);
    }

    /// Worker `w` answered the batch `flight`: each output goes to `codec`
    /// while the call has not failed; the first failure fails the call.
    fn on_results(
        &mut self,
        w: usize,
        results: Results,
        arrays: Vec<Result<Array, ArrayError>>,
        flight: InFlight,
        codec: &mut dyn TaskCodec,
    ) {
        let seconds = flight.sent.elapsed().as_secs_f64();
        self.scheduler.handle(Event::BatchDone { worker: w, tasks: flight.tasks.len(), seconds });
        let n = results.tasks.len() as u64;
        self.pool().record_batch(w, n);
        let worker = self.pool().worker_id(w);
        let mut arrays = arrays.into_iter();
        let mut panicked = false;
        for (reply, task) in results.tasks.into_iter().zip(flight.tasks) {
            self.tally.completed += 1;
            match reply.outcome {
                Outcome::Ok { output, arrays: refs } => {
                    let mine: Result<Vec<Array>, _> = match refs.len() {
                        0 => Ok(Vec::new()),
                        n => arrays.by_ref().take(n).collect(),
                    };
                    if self.failure.is_some() {
                        continue;
                    }
                    let decoded = mine.map_err(|e| e.to_string()).and_then(|a| codec.decode(reply.index, &output, a));
                    if let Err(reason) = decoded {
                        self.fail(Error::Codec { task, reason: format!("cannot decode the output: {reason}") });
                    }
                }
                Outcome::Failed(failure) => {
                    panicked |= failure.cause == FailureCause::Panic;
                    self.fail(Error::task(task, worker, failure));
                }
            }
        }
        if panicked {
            // A panic may have left the worker's state half-updated:
            // retire it and start its replacement at once, as after a death
            // with retries, so the slot is never empty for long. The other
            // workers keep serving. (The call is failing: the replacement
            // runs nothing in it, and the next call waits for its handshake
            // if it has not come by then.)
            self.pool().reap(w); // closes its input: an idle worker exits at once
            self.scheduler.handle(Event::WorkerLost { worker: w });
            self.replace(w);
        }
        self.report_progress();
    }

    /// Worker `w` answered its handshake: it joins, unless it speaks
    /// another protocol version.
    fn on_ready(&mut self, w: usize, ready: &Ready) {
        self.joining[w] = None;
        if let Err(reason) = crate::pool::check_protocol(ready) {
            self.pool().kill(w);
            self.fail(Error::Start { index: w, reason });
            return;
        }
        self.pool().mark_ready(w, ready);
        self.scheduler.handle(Event::WorkerJoined { worker: w });
    }

    /// A worker's stream ended: it died, or broke the protocol.
    pub(super) fn on_lost(&mut self, w: usize, error: Option<String>) {
        let flight = self.in_flight[w].take();
        let worker = self.pool().worker_id(w);
        let (exit, killed_for) = self.pool().reap_lost(w);
        self.scheduler.handle(Event::WorkerLost { worker: w });
        if self.joining[w].take().is_some() {
            // A replacement died before its handshake: starting another
            // would likely fail the same way, forever.
            let reexec = self.pool().capabilities().reexecutes_program;
            self.fail(Error::Start { index: w, reason: crate::pool::start_failure(exit, error, reexec) });
            return;
        }
        let Some(flight) = flight else {
            // Died while idle (killed from outside, or its idle timeout):
            // start another, unless the call is failing anyway.
            if self.failure.is_none() {
                self.replace(w);
            }
            return;
        };
        let died = error.is_none() || matches!(exit, WorkerExit::Signaled { .. });
        // A worker exits 0 only when its input closes or its idle timeout
        // passes; with a batch in flight, that is the idle timeout racing our
        // send. Send the batch again, once per task, without using a retry.
        let idled_out = error.is_none() && exit == WorkerExit::Exited { code: 0 };
        if idled_out && self.failure.is_none() && self.retries.resend_once(&flight.tasks) {
            self.send_again(w, flight.into_encoded());
            return;
        }
        let retryable = died
            && self.failure.is_none()
            && !self.scheduler.is_draining()
            && self.retries.within(&flight.tasks, self.parallel.retries);
        if retryable {
            self.retries.count(&flight.tasks);
            self.parallel.last.retried += flight.tasks.len() as u64;
            let mapped = flight.mapped_files();
            let loss = Error::WorkerDied { worker, exit, tasks: flight.tasks.clone(), mapped, killed_for };
            self.parallel.last.lost.push(loss.to_string());
            self.send_again(w, flight.into_encoded());
            return;
        }
        match error {
            Some(reason) if !died => {
                // Keep how it ended too: a worker that wrote a bad frame
                // usually says why on stderr and exits with a code.
                let killed = killed_for.map(|why| format!("; procjob killed it: {why}")).unwrap_or_default();
                self.fail(Error::Transport { worker, reason: format!("{reason} (the worker then {exit}{killed})") })
            }
            _ => {
                let mapped = flight.mapped_files();
                self.fail(Error::WorkerDied { worker, exit, tasks: flight.tasks, mapped, killed_for })
            }
        }
    }

    /// Puts a lost batch back at the front of the queue and starts a fresh
    /// worker in its slot `w`.
    fn send_again(&mut self, w: usize, encoded: Vec<Encoded>) {
        let n = encoded.len();
        for t in encoded.into_iter().rev() {
            self.queue.push_front(t);
        }
        self.scheduler.requeued(n);
        self.replace(w);
    }

    /// Starts a fresh worker in slot `w`; it joins when its handshake arrives.
    fn replace(&mut self, w: usize) {
        self.parallel.last.replaced_workers += 1;
        match self.pool().start(w) {
            Ok(()) => self.joining[w] = Some(Instant::now() + crate::pool::HANDSHAKE_TIMEOUT),
            Err(e) => self.fail(e),
        }
    }

    /// SIGINT or SIGTERM: stop every worker now (input closed, a short
    /// grace period, then SIGKILL), and fail the call without waiting for
    /// running batches.
    pub(super) fn interrupt(&mut self, signal: nix::sys::signal::Signal) {
        if self.interrupted {
            return;
        }
        self.interrupted = true;
        self.pool().shutdown(crate::pool::INTERRUPT_GRACE);
        for w in 0..self.in_flight.len() {
            self.in_flight[w] = None;
            self.scheduler.handle(Event::WorkerLost { worker: w });
        }
        self.failure = Some(Error::Interrupted { signal });
        self.scheduler.drain();
        self.queue.clear();
    }
}
