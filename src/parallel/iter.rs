//! The iterators a call is read through: [`Ordered`] (input order) and
//! [`Unordered`] (completion order).

use std::collections::BTreeMap;

use procjob_worker::Task;

use super::shell::Call;
use crate::error::Error;

/// Outputs in input order (from [`Parallel::run_iter`](super::Parallel::run_iter)).
///
/// Dropped before its end, it stops the call without waiting: inputs not
/// yet sent are discarded and the workers running its tasks are killed;
/// the next call starts fresh workers in their slots.
pub struct Ordered<'p, T: Task, I: Iterator<Item = T::Input>> {
    /// The call, yielding in completion order.
    call: Call<'p, T, I>,
    /// The index of the next output to yield.
    next: u64,
    /// Outputs that completed before their turn.
    buffer: BTreeMap<u64, T::Output>,
}

impl<'p, T: Task, I: Iterator<Item = T::Input>> Ordered<'p, T, I> {
    /// Reads `call` in input order.
    pub(super) fn new(call: Call<'p, T, I>) -> Self {
        Ordered { call, next: 0, buffer: BTreeMap::new() }
    }
}

impl<T: Task, I: Iterator<Item = T::Input>> Iterator for Ordered<'_, T, I> {
    type Item = Result<T::Output, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(out) = self.buffer.remove(&self.next) {
                self.next += 1;
                return Some(Ok(out));
            }
            match self.call.next_completed()? {
                Ok((index, out)) => {
                    self.buffer.insert(index, out);
                }
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

impl<T: Task, I: Iterator<Item = T::Input>> std::fmt::Debug for Ordered<'_, T, I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ordered").field("task", &T::name()).finish_non_exhaustive()
    }
}

/// `(input index, output)` in completion order (from
/// [`Parallel::run_unordered`](super::Parallel::run_unordered)).
///
/// Dropped before its end, it stops the call without waiting: inputs not
/// yet sent are discarded and the workers running its tasks are killed;
/// the next call starts fresh workers in their slots.
pub struct Unordered<'p, T: Task, I: Iterator<Item = T::Input>> {
    /// The call, yielding in completion order.
    call: Call<'p, T, I>,
}

impl<'p, T: Task, I: Iterator<Item = T::Input>> Unordered<'p, T, I> {
    /// Reads `call` in completion order.
    pub(super) fn new(call: Call<'p, T, I>) -> Self {
        Unordered { call }
    }
}

impl<T: Task, I: Iterator<Item = T::Input>> Iterator for Unordered<'_, T, I> {
    type Item = Result<(u64, T::Output), Error>;

    fn next(&mut self) -> Option<Self::Item> {
        self.call.next_completed()
    }
}

impl<T: Task, I: Iterator<Item = T::Input>> std::fmt::Debug for Unordered<'_, T, I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unordered").field("task", &T::name()).finish_non_exhaustive()
    }
}
