//! Scheduling decisions, as a plain state machine with no I/O.
//!
//! The [`Scheduler`] decides which idle worker gets how many of the queued
//! tasks, and how many more inputs to draw from the caller's iterator; the
//! loop in [`crate::parallel`] does the I/O around it. Unit tests drive it
//! with events, no process involved.
//!
//! Dispatch is dynamic: a worker holds at most one batch at a time and gets
//! the next one when it answers, so a slow block never holds up a fast
//! worker. With automatic batching, batches start at one task and grow
//! while they finish faster than [`TARGET_BATCH`] (so a million tiny tasks
//! cost a few hundred frames, not a million), and shrink when they run
//! long; near the end of the input a batch never takes more than its share
//! of what is left, so all workers finish together. An idle worker is
//! handed a whole queued batch before any more input is drawn, so it never
//! waits while the calling thread encodes inputs for later batches.

use std::time::Duration;

/// How long an automatic batch should run: long enough that a round trip
/// (tens of microseconds) is noise, short enough to balance load.
pub(crate) const TARGET_BATCH: Duration = Duration::from_millis(20);
/// Largest factor by which an automatic batch grows from one batch to the next.
pub(crate) const MAX_GROWTH: usize = 8;

/// How many tasks go to a worker at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchSize {
    /// Grow and shrink with the measured task duration (joblib's `'auto'`).
    Auto,
    /// Exactly this many (≥ 1).
    Fixed(usize),
}

/// How many inputs are drawn ahead of the workers, in batches (joblib's
/// `pre_dispatch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreDispatch {
    /// This many batches, in flight and queued together (≥ 1).
    Batches(usize),
    /// Draw the whole input at once.
    All,
}

/// An event the scheduler hears of.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Event {
    /// Worker `worker` finished a batch of `tasks` tasks that took `seconds`
    /// from sending to answer.
    BatchDone {
        /// The worker.
        worker: usize,
        /// Tasks in the batch.
        tasks: usize,
        /// Seconds from send to answer.
        seconds: f64,
    },
    /// Worker `worker` is gone; its batch is not coming back.
    WorkerLost {
        /// The worker.
        worker: usize,
    },
    /// Worker `worker` (re)joined and is idle.
    WorkerJoined {
        /// The worker.
        worker: usize,
    },
}

/// What to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Send the next `tasks` queued tasks to `worker`.
    Send {
        /// The worker.
        worker: usize,
        /// How many tasks.
        tasks: usize,
    },
    /// Draw this many more inputs into the queue.
    Pull(usize),
    /// Wait for an event.
    Wait,
    /// Nothing queued, nothing in flight, input exhausted: the call is done.
    Done,
}

/// The scheduler's view of a call.
#[derive(Debug, Clone)]
pub(crate) struct Scheduler {
    busy: Vec<bool>,
    in_flight: Vec<usize>,
    batch: BatchSize,
    auto_size: usize,
    pre_dispatch: PreDispatch,
    /// Tasks drawn and not yet sent.
    queued: usize,
    /// Whether the input iterator is exhausted.
    input_done: bool,
    /// Known number of inputs not yet drawn, if the iterator says.
    remaining_hint: Option<usize>,
    /// No more sending (after a failure); wait for in-flight batches.
    draining: bool,
}

impl Scheduler {
    /// A scheduler for `workers` workers, all idle.
    pub(crate) fn new(workers: usize, batch: BatchSize, pre_dispatch: PreDispatch) -> Scheduler {
        Scheduler {
            busy: vec![false; workers],
            in_flight: vec![0; workers],
            batch,
            auto_size: 1,
            pre_dispatch,
            queued: 0,
            input_done: false,
            remaining_hint: None,
            draining: false,
        }
    }

    /// The current batch size.
    pub(crate) fn batch_size(&self) -> usize {
        match self.batch {
            BatchSize::Fixed(n) => n.max(1),
            BatchSize::Auto => self.auto_size,
        }
    }

    /// Tasks sent and not yet answered.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.iter().sum()
    }

    /// Records `n` inputs drawn into the queue; `done` when the iterator ended.
    pub(crate) fn pulled(&mut self, n: usize, done: bool, remaining_hint: Option<usize>) {
        self.queued += n;
        self.input_done |= done;
        self.remaining_hint = remaining_hint;
    }

    /// Records `n` tasks put back at the front of the queue (their worker
    /// died and they will be sent again).
    pub(crate) fn requeued(&mut self, n: usize) {
        self.queued += n;
    }

    /// Stops sending: a task failed. In-flight batches are still awaited.
    pub(crate) fn drain(&mut self) {
        self.draining = true;
        self.queued = 0;
    }

    /// Whether the scheduler is draining after a failure.
    pub(crate) fn is_draining(&self) -> bool {
        self.draining
    }

    /// Feeds an event.
    pub(crate) fn handle(&mut self, event: Event) {
        match event {
            Event::BatchDone { worker, tasks, seconds } => {
                self.busy[worker] = false;
                self.in_flight[worker] = 0;
                if self.batch == BatchSize::Auto {
                    self.auto_size = next_auto_size(tasks, seconds);
                }
            }
            Event::WorkerLost { worker } => {
                self.busy[worker] = true; // unusable until it rejoins
                self.in_flight[worker] = 0;
            }
            Event::WorkerJoined { worker } => {
                self.busy[worker] = false;
                self.in_flight[worker] = 0;
            }
        }
    }

    /// The next thing to do.
    pub(crate) fn next_action(&mut self) -> Action {
        if self.draining {
            return if self.in_flight() == 0 { Action::Done } else { Action::Wait };
        }
        let size = self.batch_size();
        // A worker waiting while a whole batch for it is queued gets it
        // before anything more is drawn: drawing (encoding) inputs takes
        // the calling thread's time, and the worker would sit idle for it.
        if let Some(worker) = self.busy.iter().position(|b| !b) {
            if self.queued > 0 && (self.queued >= size || self.input_done) {
                return self.send_to(worker, size);
            }
        }
        let window = match self.pre_dispatch {
            PreDispatch::All => usize::MAX,
            PreDispatch::Batches(b) => b.max(1).saturating_mul(size),
        };
        // Keep the queue topped up, within the pre-dispatch window.
        let buffered = self.queued + self.in_flight();
        if !self.input_done && buffered < window {
            let want = window - buffered;
            let want = if window == usize::MAX { usize::MAX } else { want.max(size) };
            return Action::Pull(want);
        }
        if let Some(worker) = self.busy.iter().position(|b| !b) {
            if self.queued > 0 {
                return self.send_to(worker, size);
            }
        }
        if self.queued == 0 && self.input_done && self.in_flight() == 0 {
            return Action::Done;
        }
        Action::Wait
    }

    /// Sends the next batch (at most `size` tasks, see [`Scheduler::share`])
    /// to the idle `worker`.
    fn send_to(&mut self, worker: usize, size: usize) -> Action {
        let tasks = self.share(size);
        self.queued -= tasks;
        self.busy[worker] = true;
        self.in_flight[worker] = tasks;
        Action::Send { worker, tasks }
    }

    /// Tasks for the next batch: the batch size, but near the end (with
    /// automatic batching) no more than an even share of what is left
    /// among the workers.
    fn share(&self, size: usize) -> usize {
        let workers = self.busy.len().max(1);
        let left = self.queued + if self.input_done { 0 } else { self.remaining_hint.unwrap_or(usize::MAX / 2) };
        let fair = match self.batch {
            BatchSize::Auto => left.div_ceil(workers).max(1),
            BatchSize::Fixed(_) => usize::MAX,
        };
        // A worker refuses a batch of more tasks than the protocol allows.
        size.min(fair).min(self.queued).clamp(1, procjob_worker::protocol::MAX_BATCH_TASKS)
    }
}

/// The automatic batch size after a batch of `tasks` took `seconds`: aim
/// at [`TARGET_BATCH`], growing at most [`MAX_GROWTH`]× at a time and
/// shrinking to fit when a batch ran long.
pub(crate) fn next_auto_size(tasks: usize, seconds: f64) -> usize {
    let target = TARGET_BATCH.as_secs_f64();
    let tasks = tasks.max(1);
    if seconds <= 0.0 {
        return tasks.saturating_mul(MAX_GROWTH);
    }
    let ideal = (tasks as f64 * target / seconds).floor() as usize;
    ideal.clamp(1, tasks.saturating_mul(MAX_GROWTH))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_to_quiet(s: &mut Scheduler) -> Vec<Action> {
        let mut out = Vec::new();
        loop {
            let a = s.next_action();
            out.push(a);
            match a {
                Action::Pull(_) => s.pulled(0, true, None),
                Action::Send { .. } => continue,
                Action::Wait | Action::Done => return out,
            }
        }
    }

    #[test]
    fn dispatch_is_breadth_first_one_batch_per_worker() {
        let mut s = Scheduler::new(3, BatchSize::Fixed(1), PreDispatch::All);
        assert_eq!(s.next_action(), Action::Pull(usize::MAX));
        s.pulled(5, true, None);
        let sends: Vec<_> = std::iter::from_fn(|| match s.next_action() {
            Action::Send { worker, tasks } => Some((worker, tasks)),
            _ => None,
        })
        .collect();
        assert_eq!(sends, vec![(0, 1), (1, 1), (2, 1)]);
        assert_eq!(s.next_action(), Action::Wait);
        s.handle(Event::BatchDone { worker: 1, tasks: 1, seconds: 1.0 });
        assert_eq!(s.next_action(), Action::Send { worker: 1, tasks: 1 });
    }

    #[test]
    fn no_batch_is_larger_than_a_worker_accepts() {
        let max = procjob_worker::protocol::MAX_BATCH_TASKS;
        let mut s = Scheduler::new(1, BatchSize::Fixed(4 * max), PreDispatch::All);
        assert_eq!(s.next_action(), Action::Pull(usize::MAX));
        s.pulled(3 * max, true, None);
        assert_eq!(s.next_action(), Action::Send { worker: 0, tasks: max });
    }

    #[test]
    fn finishes_when_queue_and_flight_are_empty() {
        let mut s = Scheduler::new(2, BatchSize::Fixed(4), PreDispatch::Batches(2));
        assert_eq!(s.next_action(), Action::Pull(8));
        s.pulled(3, true, None);
        assert_eq!(s.next_action(), Action::Send { worker: 0, tasks: 3 });
        assert_eq!(s.next_action(), Action::Wait);
        s.handle(Event::BatchDone { worker: 0, tasks: 3, seconds: 0.1 });
        assert_eq!(s.next_action(), Action::Done);
    }

    #[test]
    fn auto_batches_near_the_end_take_a_fair_share() {
        let mut s = Scheduler::new(2, BatchSize::Auto, PreDispatch::All);
        s.handle(Event::BatchDone { worker: 0, tasks: 1, seconds: 1e-6 });
        assert_eq!(s.batch_size(), 8);
        assert_eq!(s.next_action(), Action::Pull(usize::MAX));
        s.pulled(10, true, None);
        assert_eq!(s.next_action(), Action::Send { worker: 0, tasks: 5 });
        assert_eq!(s.next_action(), Action::Send { worker: 1, tasks: 3 });
    }

    #[test]
    fn pre_dispatch_bounds_what_is_drawn() {
        let mut s = Scheduler::new(2, BatchSize::Fixed(1), PreDispatch::Batches(3));
        assert_eq!(s.next_action(), Action::Pull(3));
        s.pulled(3, false, None);
        assert_eq!(s.next_action(), Action::Send { worker: 0, tasks: 1 });
        assert_eq!(s.next_action(), Action::Send { worker: 1, tasks: 1 });
        // 1 queued + 2 in flight = the window of 3: no pull until one finishes.
        assert_eq!(s.next_action(), Action::Wait);
        s.handle(Event::BatchDone { worker: 0, tasks: 1, seconds: 0.5 });
        // The queued task goes to the idle worker first, then one more is
        // drawn to refill the window.
        assert_eq!(s.next_action(), Action::Send { worker: 0, tasks: 1 });
        assert_eq!(s.next_action(), Action::Pull(1));
    }

    #[test]
    fn an_idle_worker_gets_a_queued_batch_before_more_is_drawn() {
        let mut s = Scheduler::new(2, BatchSize::Fixed(4), PreDispatch::Batches(4));
        assert_eq!(s.next_action(), Action::Pull(16));
        s.pulled(16, false, None);
        assert_eq!(s.next_action(), Action::Send { worker: 0, tasks: 4 });
        assert_eq!(s.next_action(), Action::Send { worker: 1, tasks: 4 });
        // 8 queued, 8 in flight: the window is full.
        assert_eq!(s.next_action(), Action::Wait);
        s.handle(Event::BatchDone { worker: 1, tasks: 4, seconds: 0.1 });
        // Window room for 4 more, but worker 1 is idle and 8 are queued.
        assert_eq!(s.next_action(), Action::Send { worker: 1, tasks: 4 });
        assert_eq!(s.next_action(), Action::Pull(4));
        // Fewer queued than a batch and more to come: draw first.
        let mut s = Scheduler::new(1, BatchSize::Fixed(4), PreDispatch::Batches(2));
        assert_eq!(s.next_action(), Action::Pull(8));
        s.pulled(2, false, None);
        assert_eq!(s.next_action(), Action::Pull(6));
    }

    #[test]
    fn auto_batches_grow_for_short_tasks_and_shrink_for_long() {
        assert_eq!(next_auto_size(1, 1e-5), 8);
        assert_eq!(next_auto_size(64, 1e-4), 512);
        assert_eq!(next_auto_size(100, 0.020), 100);
        assert_eq!(next_auto_size(100, 0.200), 10);
        assert_eq!(next_auto_size(1, 5.0), 1);
    }

    #[test]
    fn draining_waits_for_in_flight_then_stops() {
        let mut s = Scheduler::new(2, BatchSize::Fixed(1), PreDispatch::All);
        s.next_action();
        s.pulled(10, true, None);
        s.next_action();
        s.next_action();
        s.drain();
        assert_eq!(s.next_action(), Action::Wait);
        s.handle(Event::BatchDone { worker: 0, tasks: 1, seconds: 0.1 });
        assert_eq!(s.next_action(), Action::Wait);
        s.handle(Event::WorkerLost { worker: 1 });
        assert_eq!(run_to_quiet(&mut s), vec![Action::Done]);
    }

    #[test]
    fn lost_worker_gets_no_work_until_it_rejoins() {
        let mut s = Scheduler::new(2, BatchSize::Fixed(1), PreDispatch::All);
        s.next_action();
        s.pulled(4, true, None);
        s.handle(Event::WorkerLost { worker: 0 });
        assert_eq!(s.next_action(), Action::Send { worker: 1, tasks: 1 });
        assert_eq!(s.next_action(), Action::Wait);
        s.handle(Event::WorkerJoined { worker: 0 });
        assert_eq!(s.next_action(), Action::Send { worker: 0, tasks: 1 });
    }
}
