//! The reply's budget: a batch's answer is kept within the frame limits the
//! coordinator's reader enforces while it is built, task by task.

use crate::protocol::{self, ArrayRef, FailureCause, Outcome};
use crate::task::ErasedOutcome;

/// What a batch's reply may grow to while it is built: its payload (the
/// encoded outcomes) up to [`protocol::MAX_PAYLOAD`] and its bulk (inline
/// arrays) up to [`protocol::MAX_BULK`], the limits the reader enforces.
/// Each task's outcome is admitted with an upper bound of its encoded size;
/// from the first that would pass a limit on, outcomes are dropped as they
/// come (their arrays freed at once) and replaced by a short failure: the
/// first says why, the others point to it. So a batch of many tasks that
/// fail with long messages holds at most one frame's worth of them, not a
/// copy per task of a message that could never be sent.
#[derive(Default)]
pub(super) struct ReplyBudget {
    payload: usize,
    bulk: u64,
    first_dropped: Option<u64>,
}

impl ReplyBudget {
    /// What a task's entry costs besides its outcome, at most: index and
    /// two timestamps (varints of up to 10 bytes) and tags.
    const PER_TASK: usize = 32;
    /// The `Results` fields besides the tasks, at most.
    const PER_REPLY: usize = 96;

    /// The outcome to report for task `index`: `result` when it fits.
    pub(super) fn admit(&mut self, index: u64, result: ErasedOutcome) -> ErasedOutcome {
        if let Some(first) = self.first_dropped {
            return ErasedOutcome::failed(FailureCause::Setup, ReplyBudget::dropped_message(first));
        }
        let payload = Self::PER_TASK + encoded_len_bound(&result.outcome);
        let bulk: u64 = result.inline.iter().map(|a| a.nbytes() as u64).sum();
        let fits = self.payload + payload + Self::PER_REPLY <= protocol::MAX_PAYLOAD
            && self.bulk.checked_add(bulk).is_some_and(|b| b <= protocol::MAX_BULK);
        if fits {
            self.payload += payload;
            self.bulk += bulk;
            return result;
        }
        self.first_dropped = Some(index);
        ErasedOutcome::failed(
            FailureCause::Setup,
            format!(
                "the batch's reply would exceed the frame limit ({} bytes of encoded outcomes, {} bytes of arrays) \
                 with this task's outcome ({payload} bytes encoded, {bulk} bytes of arrays), so it and the later \
                 tasks' outcomes were dropped; return large data as procjob::Array (raw bytes) instead of serde \
                 values, or send smaller batches",
                protocol::MAX_PAYLOAD,
                protocol::MAX_BULK
            ),
        )
    }

    /// The short failure of a task dropped after task `first`.
    pub(super) fn dropped_message(first: u64) -> String {
        format!("dropped: the batch's reply was full (see task {first})")
    }
}

/// An upper bound of an outcome's postcard encoding (every varint counted
/// at its longest): what [`ReplyBudget`] charges for it.
fn encoded_len_bound(outcome: &Outcome) -> usize {
    const VARINT: usize = 10;
    let bytes = |n: usize| VARINT + n;
    match outcome {
        Outcome::Ok { output, arrays } => {
            let refs: usize = arrays
                .iter()
                .map(|r| {
                    let (_, shape) = r.dtype_and_shape();
                    let extra = match r {
                        // An inline array may go by address instead.
                        ArrayRef::Inline { .. } | ArrayRef::Lent { .. } => VARINT,
                        ArrayRef::File { path, .. } => bytes(path.as_os_str().len()) + VARINT + 1,
                        ArrayRef::Inherited { .. } => 2 * VARINT,
                    };
                    2 + VARINT * (1 + shape.len()) + extra
                })
                .sum();
            1 + bytes(output.len()) + VARINT + refs
        }
        Outcome::Failed(f) => {
            2 + bytes(f.message.len())
                + 1
                + f.location.as_ref().map_or(0, |l| bytes(l.len()))
                + 1
                + f.error.as_ref().map_or(0, |e| bytes(e.len()))
                + VARINT
                + f.sources.iter().map(|s| bytes(s.len())).sum::<usize>()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::array::Array;
    use crate::protocol::{Access, TaskReply};

    /// The budget's charge for an outcome is never less than its encoding
    /// (else a reply could pass the frame limit while the budget thinks it
    /// fits).
    #[test]
    fn the_budget_never_undercharges_an_outcome() {
        let file = ArrayRef::File {
            dtype: crate::DType::F64,
            shape: vec![u64::MAX, 3],
            path: "/tmp/some/where.npy".into(),
            offset: u64::MAX,
            access: Access::CopyOnWrite,
        };
        let inherited =
            ArrayRef::Inherited { dtype: crate::DType::I64, shape: vec![7], index: u32::MAX, offset: 1 << 40 };
        let inline = ArrayRef::Inline { dtype: crate::DType::F32, shape: vec![] };
        let outcomes = [
            Outcome::Ok { output: vec![9u8; 300].into(), arrays: vec![file, inherited, inline] },
            Outcome::Ok { output: Default::default(), arrays: Vec::new() },
            Outcome::Failed(protocol::TaskFailure {
                cause: FailureCause::Panic,
                message: "m".repeat(200),
                location: Some("src/x.rs:1:2".into()),
                error: Some(vec![1; 20]),
                sources: vec!["s".repeat(100); 3],
            }),
        ];
        for outcome in outcomes {
            let reply = TaskReply { index: u64::MAX, started_ns: u64::MAX, finished_ns: u64::MAX, outcome };
            let encoded = postcard::to_stdvec(&reply).unwrap().len();
            let charged = ReplyBudget::PER_TASK + encoded_len_bound(&reply.outcome);
            assert!(charged >= encoded, "charged {charged} for {encoded} bytes: {:?}", reply.outcome);
        }
    }

    /// Once an outcome would pass the payload limit, it and every later
    /// one are dropped: the first with the explanation, the others with a
    /// pointer to it, and their arrays are let go.
    #[test]
    fn the_budget_drops_outcomes_past_the_frame_limit() {
        let mut budget = ReplyBudget::default();
        let long = |n: usize| ErasedOutcome::failed(FailureCause::Error, "x".repeat(n));
        assert!(
            matches!(budget.admit(0, long(protocol::MAX_PAYLOAD / 2)).outcome, Outcome::Failed(f) if f.message.len() == protocol::MAX_PAYLOAD / 2)
        );
        let Outcome::Failed(f) = budget.admit(1, long(protocol::MAX_PAYLOAD / 2)).outcome else { unreachable!() };
        assert!(f.message.contains("would exceed the frame limit"), "{}", f.message);
        let with_array = ErasedOutcome {
            outcome: Outcome::Ok { output: Default::default(), arrays: Vec::new() },
            inline: vec![Array::from_vec(vec![2], vec![1.0f64; 2])],
        };
        let dropped = budget.admit(2, with_array);
        assert!(dropped.inline.is_empty(), "a dropped outcome kept its arrays");
        let Outcome::Failed(f) = dropped.outcome else { unreachable!() };
        assert_eq!(f.message, "dropped: the batch's reply was full (see task 1)");
    }
}
