//! Each slot's peak memory: the figures of its workers' handshakes and the
//! snapshots they send after their answers (protocol 7,
//! [`Reply::Memory`](procjob_worker::protocol::Reply)), which reader threads
//! put here as they arrive; the pool waits for the ones still on their way
//! before it reports a slot's peak ([`WorkerPool::reports`](super::WorkerPool::reports)).
//!
//! A worker reads its memory once its answer is sent, so that the page-table
//! walk of `/proc/self/smaps_rollup` (2–3 ms for a worker that maps 2000²
//! `f64` operands) does not delay the answer; the report then waits for it
//! instead of the answer.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use procjob_worker::protocol::MemorySnapshot;

/// Per slot: the highest figures that arrived, and how many snapshots are
/// announced but not arrived.
#[derive(Debug, Default)]
pub(crate) struct MemoryBoard {
    slots: Mutex<HashMap<usize, (MemorySnapshot, u64)>>,
    arrived: Condvar,
}

impl MemoryBoard {
    /// An answer of slot `index`'s worker said a snapshot follows.
    pub(crate) fn expect(&self, index: usize) {
        if let Ok(mut slots) = self.slots.lock() {
            slots.entry(index).or_default().1 += 1;
        }
    }

    /// Figures of slot `index`'s worker that no answer announced (its
    /// handshake's).
    pub(crate) fn raise(&self, index: usize, memory: &MemorySnapshot) {
        if let Ok(mut slots) = self.slots.lock() {
            slots.entry(index).or_default().0.raise_to(memory);
        }
    }

    /// A snapshot from slot `index`'s worker arrived.
    pub(crate) fn arrived(&self, index: usize, memory: MemorySnapshot) {
        if let Ok(mut slots) = self.slots.lock() {
            let (peak, pending) = slots.entry(index).or_default();
            peak.raise_to(&memory);
            *pending = pending.saturating_sub(1);
        }
        self.arrived.notify_all();
    }

    /// The stream of slot `index`'s worker ended with `missing` announced
    /// snapshots not sent: they never will be.
    pub(crate) fn gave_up(&self, index: usize, missing: u64) {
        if missing == 0 {
            return;
        }
        if let Ok(mut slots) = self.slots.lock() {
            let pending = &mut slots.entry(index).or_default().1;
            *pending = pending.saturating_sub(missing);
        }
        self.arrived.notify_all();
    }

    /// The highest figures of slot `index` once no announced snapshot is on
    /// its way, or after `timeout` with those that arrived (a stopped worker
    /// does not hold a report up for longer).
    pub(crate) fn peak(&self, index: usize, timeout: Duration) -> MemorySnapshot {
        let deadline = Instant::now() + timeout;
        let Ok(mut slots) = self.slots.lock() else { return MemorySnapshot::default() };
        loop {
            let (peak, pending) = slots.get(&index).copied().unwrap_or_default();
            let left = deadline.saturating_duration_since(Instant::now());
            if pending == 0 || left.is_zero() {
                return peak;
            }
            slots = match self.arrived.wait_timeout(slots, left) {
                Ok((s, _)) => s,
                Err(_) => return peak,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn snapshot(uss: u64) -> MemorySnapshot {
        MemorySnapshot { peak_rss: 2 * uss, uss, pss: uss }
    }

    #[test]
    fn a_peak_waits_for_the_announced_snapshot() {
        let board = Arc::new(MemoryBoard::default());
        board.raise(0, &snapshot(5));
        board.expect(0);
        let late = {
            let board = Arc::clone(&board);
            std::thread::spawn(move || board.arrived(0, snapshot(9)))
        };
        // Waits for the announced one, however long the thread takes to run.
        assert_eq!(board.peak(0, Duration::from_secs(60)), snapshot(9));
        late.join().unwrap();
        // Peaks only rise; other slots are apart.
        board.arrived(0, snapshot(3));
        assert_eq!(board.peak(0, Duration::ZERO), snapshot(9));
        assert_eq!(board.peak(1, Duration::ZERO), MemorySnapshot::default());
    }

    #[test]
    fn a_stream_that_ended_leaves_nothing_to_wait_for() {
        let board = MemoryBoard::default();
        board.arrived(2, snapshot(4));
        board.expect(2);
        board.expect(2);
        board.gave_up(2, 2);
        assert_eq!(board.peak(2, Duration::from_secs(60)), snapshot(4));
        // A snapshot still pending past the timeout: what arrived.
        board.expect(3);
        assert_eq!(board.peak(3, Duration::from_millis(1)), MemorySnapshot::default());
    }
}
