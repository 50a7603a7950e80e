//! A batch's life outside the scheduler: its tasks encoded and queued
//! ([`Encoded`]), then in flight on a worker ([`InFlight`]) until answered,
//! with a deadline ([`batch_deadline`]); and where the outputs of a
//! `run_unordered_into` call land ([`LandingPlan`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use procjob_worker::array::Landing;
use procjob_worker::protocol::{ArrayRef, Payload, Request};
use procjob_worker::Array;

use crate::error::TaskId;

/// One task, encoded and waiting to be sent.
pub(in crate::parallel) struct Encoded {
    /// The task's index in its call.
    pub(in crate::parallel) index: u64,
    /// The encoded input.
    pub(in crate::parallel) input: Payload,
    /// How each of the input's arrays travels.
    pub(in crate::parallel) refs: Vec<ArrayRef>,
    /// The arrays that travel inline, in order: the frame's bulk.
    pub(in crate::parallel) inline: Vec<Array>,
    /// What the task does, for messages.
    pub(in crate::parallel) description: Option<String>,
}

/// The value every task of a call shares, encoded once for the call.
pub(in crate::parallel) struct SharedEncoded {
    /// The encoded value.
    pub(in crate::parallel) value: Payload,
    /// How each of its arrays travels.
    pub(in crate::parallel) refs: Vec<ArrayRef>,
    /// Its arrays that travel inline, in order.
    pub(in crate::parallel) inline: Vec<Array>,
}

/// When a batch of `tasks` tasks sent at `sent` is late: `tasks` × `limit`
/// later, or never when that is past what `Instant` can hold (a limit of
/// `Duration::MAX` is no limit).
pub(super) fn batch_deadline(sent: Instant, limit: Duration, tasks: usize) -> Option<Instant> {
    let tasks = u32::try_from(tasks.max(1)).unwrap_or(u32::MAX);
    sent.checked_add(limit.checked_mul(tasks)?)
}

/// A batch a worker is running, kept until it is answered so it can be
/// sent again if the worker dies.
pub(super) struct InFlight {
    /// The batch's tasks, in order.
    pub(super) tasks: Vec<TaskId>,
    /// The batch as sent (`Request::Run`), its inputs moved in, not copied.
    pub(super) request: Request,
    /// Each task's inline arrays, in order.
    pub(super) inline: Vec<Vec<Array>>,
    /// The inline arrays of the call's shared value, when the batch brings
    /// it: first in the bulk.
    pub(super) shared_inline: Vec<Array>,
    /// When it was staged to be sent.
    pub(super) sent: Instant,
    /// When its worker is late (`None`: never).
    pub(super) deadline: Option<Instant>,
}

impl InFlight {
    /// The files the batch has its worker map, each once.
    pub(super) fn mapped_files(&self) -> Vec<PathBuf> {
        let Request::Run(batch) = &self.request else { return Vec::new() };
        let mut files: Vec<PathBuf> = Vec::new();
        for r in batch.tasks.iter().flat_map(|t| &t.arrays) {
            if let ArrayRef::File { path, .. } = r {
                if !files.contains(path) {
                    files.push(path.clone());
                }
            }
        }
        files
    }

    /// The bytes of the batch's inline arrays, in order: the frame's bulk.
    pub(super) fn bulk(&self) -> Vec<&[u8]> {
        self.shared_inline.iter().chain(self.inline.iter().flatten()).map(Array::as_bytes).collect()
    }

    /// The batch's tasks as they were before sending, to queue them again.
    pub(super) fn into_encoded(self) -> Vec<Encoded> {
        let Request::Run(batch) = self.request else { unreachable!("a batch in flight is a Run request") };
        batch
            .tasks
            .into_iter()
            .zip(self.inline)
            .zip(self.tasks)
            .map(|((r, inline), id)| Encoded {
                index: r.index,
                input: r.input,
                refs: r.arrays,
                inline,
                description: id.description,
            })
            .collect()
    }
}

/// The shared output of a `run_unordered_into` call.
pub(in crate::parallel) struct LandingPlan {
    /// The output's file, opened for writing.
    pub(in crate::parallel) file: Arc<std::fs::File>,
    /// The output array.
    pub(in crate::parallel) out: Array,
    /// The rows of `out` each task's output fills, by task index.
    pub(in crate::parallel) rows_of: Box<dyn FnMut(u64) -> std::ops::Range<usize>>,
}

impl LandingPlan {
    /// The region task `index` lands in.
    pub(in crate::parallel) fn landing(&mut self, index: u64) -> Result<Landing, String> {
        let rows = (self.rows_of)(index);
        let view = self.out.rows(rows).map_err(|e| format!("output rows for task {index}: {e}"))?;
        let (_, offset, _) = view.file_location().ok_or("the output is not file-backed")?;
        Ok(Landing { file: Arc::clone(&self.file), offset, view })
    }
}
