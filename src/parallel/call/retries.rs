//! What a batch lost with its worker may still get: one free resend when
//! its worker only idled out as the batch was sent, and up to `retries`
//! retries per task when its worker died.

use std::collections::{HashMap, HashSet};

use crate::error::TaskId;

/// The second chances the tasks of one call have used.
#[derive(Debug, Default)]
pub(super) struct Retries {
    /// Times each task was sent again after its worker died.
    attempts: HashMap<u64, u32>,
    /// Tasks sent again because their worker idled out just as they were
    /// sent (a race that costs no retry, once per task).
    resent: HashSet<u64>,
}

impl Retries {
    /// Whether `tasks` may be sent again for free after their worker idled
    /// out, which is once per task; if so, that chance is used.
    pub(super) fn resend_once(&mut self, tasks: &[TaskId]) -> bool {
        if tasks.iter().any(|t| self.resent.contains(&t.index)) {
            return false;
        }
        self.resent.extend(tasks.iter().map(|t| t.index));
        true
    }

    /// Whether every task of `tasks` has been retried fewer than `limit`
    /// times.
    pub(super) fn within(&self, tasks: &[TaskId], limit: u32) -> bool {
        tasks.iter().all(|t| self.attempts.get(&t.index).copied().unwrap_or(0) < limit)
    }

    /// Counts one more retry of each task of `tasks`.
    pub(super) fn count(&mut self, tasks: &[TaskId]) {
        for t in tasks {
            *self.attempts.entry(t.index).or_default() += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tasks(indices: &[u64]) -> Vec<TaskId> {
        indices.iter().map(|&index| TaskId { index, description: None }).collect()
    }

    #[test]
    fn a_task_is_resent_for_free_once() {
        let mut r = Retries::default();
        assert!(r.resend_once(&tasks(&[0, 1])));
        assert!(!r.resend_once(&tasks(&[1, 2])), "task 1 had its free resend");
        assert!(r.resend_once(&tasks(&[2])), "a refused batch uses no chance");
    }

    #[test]
    fn a_batch_is_retried_while_every_task_is_within_the_limit() {
        let mut r = Retries::default();
        assert!(!r.within(&tasks(&[0]), 0), "retries(0) retries nothing");
        assert!(r.within(&tasks(&[0, 1]), 1));
        r.count(&tasks(&[0]));
        assert!(!r.within(&tasks(&[0, 1]), 1), "task 0 used its retry");
        assert!(r.within(&tasks(&[1]), 1));
        assert!(r.within(&tasks(&[0]), 2));
    }
}
