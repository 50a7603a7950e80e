//! Sending: the tasks the scheduler gives a worker are staged as a batch in
//! flight, then written to its pipe — on this thread, or, for batches with
//! megabytes of inputs, all at once, one thread each.

use std::time::Instant;

use procjob_worker::protocol::{Batch, Request, SharedValue, TaskRequest};
use procjob_worker::Array;

use super::batch::{batch_deadline, InFlight};
use super::CallCore;
use crate::error::{Error, TaskId};
use crate::pool::SendError;
use crate::scheduler::{Action, Event};
use crate::trace::Lane;

impl CallCore<'_> {
    /// Sends `tasks` queued tasks to `worker`, and with a large batch every
    /// other send the scheduler has right after it.
    pub(super) fn send(&mut self, worker: usize, tasks: usize) {
        self.stage(worker, tasks);
        if self.staged_bulk(worker) < crate::pool::CONCURRENT_SEND_BYTES {
            self.write_one(worker);
            return;
        }
        // A batch with megabytes of inputs: stage every send the
        // scheduler has right after it (each to a different
        // worker, which has one batch at a time), then write
        // them at once, one thread each, so no worker waits for
        // another's inputs to be written.
        let mut staged = vec![worker];
        let next = loop {
            match self.scheduler.next_action() {
                Action::Send { worker, tasks } => {
                    self.stage(worker, tasks);
                    staged.push(worker);
                }
                other => break other,
            }
        };
        if staged.len() == 1 {
            self.write_one(worker);
        } else {
            self.write_together(&staged);
        }
        // Only Send changes the scheduler; a drawn Pull, Wait or
        // Done stays valid, unless the call failed meanwhile.
        self.next_action = self.failure.is_none().then_some(next);
    }

    /// Makes the batch of the next `n` queued tasks for `worker` and puts it
    /// in flight, to be written by [`write_one`](Self::write_one) or
    /// [`write_together`](Self::write_together). A batch whose output
    /// landings cannot be placed fails the call but is still sent, so the
    /// scheduler's count of what is in flight stays true and the call ends.
    fn stage(&mut self, worker: usize, n: usize) {
        let kind = self.kind.clone();
        // The encoded inputs move into the request and stay in flight with
        // it: a batch lost to a dead worker may be sent again.
        let (mut ids, mut requests, mut inline) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        for t in self.queue.drain(..n) {
            ids.push(TaskId { index: t.index, description: t.description });
            requests.push(TaskRequest { index: t.index, input: t.input, arrays: t.refs });
            inline.push(t.inline);
        }
        if let Err(e) = self.place_landings(&ids) {
            self.fail(e);
        }
        let sent = Instant::now();
        let deadline = self.parallel.timeout.and_then(|t| batch_deadline(sent, t, ids.len()));
        self.parallel.last.batches += 1;
        let timestamps = self.parallel.trace.is_some();
        let (shared, shared_inline) = self.shared_for(worker);
        let request = Request::Run(Batch { call: self.call, kind, tasks: requests, timestamps, shared });
        self.in_flight[worker] = Some(InFlight { tasks: ids, request, inline, shared_inline, sent, deadline });
    }

    /// The call's shared value, when `worker`'s process has not been sent
    /// it yet in this call (its first batch, or the first of a replacement
    /// started in its slot), with its inline arrays; else nothing.
    fn shared_for(&mut self, worker: usize) -> (Option<SharedValue>, Vec<Array>) {
        let Some(shared) = self.shared.as_ref() else { return (None, Vec::new()) };
        let pid = self.parallel.pool.as_ref().and_then(|p| p.pid(worker));
        if pid.is_some() && self.shared_sent[worker] == pid {
            return (None, Vec::new());
        }
        self.shared_sent[worker] = pid;
        let value = SharedValue { value: shared.value.clone(), arrays: shared.refs.clone() };
        (Some(value), shared.inline.clone())
    }

    /// Tells the pool where the outputs of `tasks` land, for a
    /// `run_unordered_into` call.
    fn place_landings(&mut self, tasks: &[TaskId]) -> Result<(), Error> {
        let Some(plan) = self.landing.as_mut() else { return Ok(()) };
        let pool = self.parallel.pool.as_ref().expect("the pool exists during a call");
        let mut landings =
            pool.landings().lock().map_err(|_| Error::Internal("the landing table is poisoned".into()))?;
        tasks.iter().try_for_each(|t| {
            landings.insert(t.index, plan.landing(t.index).map_err(Error::Config)?);
            Ok(())
        })
    }

    /// The bulk bytes of the batch staged for `worker`.
    fn staged_bulk(&self, worker: usize) -> usize {
        self.in_flight[worker].as_ref().map_or(0, |f| f.inline.iter().flatten().map(Array::nbytes).sum())
    }

    /// Writes the batch staged for `worker` on this thread.
    fn write_one(&mut self, worker: usize) {
        let Some(flight) = self.in_flight[worker].as_ref() else { return };
        let bulk = flight.bulk();
        let start = procjob_worker::clock::monotonic_ns();
        let pool = self.parallel.pool.as_mut().expect("the pool exists during a call");
        let result = pool.send(worker, &flight.request, &bulk);
        self.trace_send(worker, start, result.as_ref().ok().copied());
        if let Err(e) = result {
            self.on_send_failed(worker, e);
        }
    }

    /// Writes the batches staged for `workers` (all different) at once, one
    /// thread each. Every one is written even if another fails.
    fn write_together(&mut self, workers: &[usize]) {
        let start = procjob_worker::clock::monotonic_ns();
        let results: Vec<(usize, Result<u64, SendError>)> = {
            let flights: Vec<(usize, &InFlight)> =
                workers.iter().filter_map(|&w| self.in_flight[w].as_ref().map(|f| (w, f))).collect();
            let bulks: Vec<Vec<&[u8]>> = flights.iter().map(|(_, f)| f.bulk()).collect();
            let frames: Vec<(usize, &Request, &[&[u8]])> =
                flights.iter().zip(&bulks).map(|((w, f), bulk)| (*w, &f.request, bulk.as_slice())).collect();
            let pool = self.parallel.pool.as_mut().expect("the pool exists during a call");
            frames.iter().map(|(w, _, _)| *w).zip(pool.send_many(&frames)).collect()
        };
        for &w in workers {
            let bytes = results.iter().find(|(r, _)| *r == w).and_then(|(_, r)| r.as_ref().ok().copied());
            self.trace_send(w, start, bytes);
        }
        for (w, result) in results {
            if let Err(e) = result {
                self.on_send_failed(w, e);
            }
        }
    }

    /// A batch could not be written to `worker`; whatever happened, it is
    /// no longer in flight, so the call cannot wait for it.
    ///
    /// - The frame could not be made (an input too large for a frame, a
    ///   message that does not encode): nothing reached the worker, which
    ///   stays; the call fails naming the batch's first task.
    /// - The worker has closed its input — its idle timeout passed just
    ///   before the batch went out, or it died: handled as lost
    ///   ([`on_lost`](Self::on_lost)), so a worker that idled out gets the
    ///   batch, which it never read, sent again on a fresh worker, and one
    ///   that died counts against the retries.
    /// - Any other write error may have left part of a frame in the pipe:
    ///   the worker is killed and the call fails.
    fn on_send_failed(&mut self, worker: usize, error: SendError) {
        match error {
            SendError::Unsendable(e) => {
                let Some(flight) = self.in_flight[worker].take() else { return };
                let tasks = flight.tasks.len();
                self.scheduler.handle(Event::BatchDone { worker, tasks, seconds: 0.0 });
                let task = flight.tasks.into_iter().next().expect("a batch has a task");
                let hint = if e.kind() == std::io::ErrorKind::InvalidInput {
                    "; large data travels as procjob::Array, which is memory-mapped above max_nbytes"
                } else {
                    ""
                };
                self.fail(Error::Codec { task, reason: format!("cannot send it to a worker: {e}{hint}") });
            }
            SendError::Broken(_) if self.pool().input_closed(worker) => self.on_lost(worker, None),
            SendError::Broken(e) => {
                self.in_flight[worker] = None;
                self.pool().kill(worker);
                self.scheduler.handle(Event::WorkerLost { worker });
                self.fail(e);
            }
        }
    }

    /// Records, when tracing, that the batch in flight on `worker` was
    /// written from `start` until now, and (when it was: `bytes`) the
    /// start of its flow to the worker.
    fn trace_send(&mut self, worker: usize, start: u64, bytes: Option<u64>) {
        let (Some(trace), Some(flight)) = (self.parallel.trace.as_mut(), self.in_flight[worker].as_ref()) else {
            return;
        };
        let ids = &flight.tasks;
        let what = match (ids.first(), ids.last()) {
            (Some(a), Some(b)) if ids.len() > 1 => format!("send tasks {}..={} to worker {worker}", a.index, b.index),
            (Some(a), _) => format!("send {a} to worker {worker}"),
            _ => format!("send to worker {worker}"),
        };
        let end = procjob_worker::clock::monotonic_ns();
        if let Some(bytes) = bytes {
            let what = what.trim_start_matches("send ").trim_end_matches(&format!(" to worker {worker}")).to_string();
            trace.sent(worker, start, bytes, what);
        }
        trace.span(Lane::Coordinator, "send", what, start, end);
    }
}
