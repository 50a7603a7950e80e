//! Fault injection for procjob's failure tests (feature `test-tasks`): the
//! serve loop calls [`before_task`] before it runs each task, so that no
//! production task kind carries a test hook.
//!
//! [`FAULT_ENV`] (`KIND@ROW` or `KIND@ROW@once=MARKER`) names a row of the
//! matrix product: the [`MatmulBlock`] task whose rows contain it misbehaves
//! as KIND instead of running, through the test kind [`Misbehave`], so a
//! panic, a hang or a killed worker happens where the tests expect it —
//! inside the task, under the serve loop's panic capture. KIND `lent`
//! answers with a result lent at an address nothing maps. KIND `lent-exit`
//! writes this worker's pid into the `once` marker, runs the block, and
//! makes the serve loop exit (code 7) as soon as the reply is sent
//! ([`exit_after_reply`]): a worker gone before its lent result was read
//! (the coordinator's reader, under the same feature, waits for that
//! pid's exit before reading what it lent: `testkinds::outlive_lent_exit`).

use std::sync::atomic::{AtomicBool, Ordering};

use crate::task::{ErasedOutcome, Task};
use crate::tasks::matmul::MatmulBlock;
use crate::tasks::testkinds::{fault_spec, FaultSpec, Misbehave, Misbehavior, FAULT_ENV};

/// What a task of kind `kind` with the encoded input `input` does instead of
/// running, when [`FAULT_ENV`] names one of its rows: `None` to run it.
/// Must be called where the task would run (under panic capture).
pub(crate) fn before_task(kind: &str, input: &[u8]) -> Option<ErasedOutcome> {
    if kind != MatmulBlock::name() {
        return None;
    }
    fault_point(rows_of(input)?)
}

/// Set by a `lent-exit` fault: the serve loop exits once its reply is out.
static EXIT_AFTER_REPLY: AtomicBool = AtomicBool::new(false);

/// Called by the serve loop after each reply: exits the process (code 7)
/// if a `lent-exit` fault fired in the batch just answered.
pub(crate) fn exit_after_reply() {
    if EXIT_AFTER_REPLY.load(Ordering::SeqCst) {
        std::process::exit(7);
    }
}

/// The block's output as a result lent at address 8, which no process maps:
/// what a worker that lies about its memory would answer.
fn lent_at_a_bad_address(rows: (u64, u64)) -> ErasedOutcome {
    let shape = vec![rows.1 - rows.0, 1];
    ErasedOutcome {
        // `MatmulOutput::Block(array 0)`.
        outcome: crate::protocol::Outcome::Ok {
            output: crate::payload::Payload::from(vec![0, 0]),
            arrays: vec![crate::protocol::ArrayRef::Lent { dtype: crate::DType::I64, shape, address: 8 }],
        },
        inline: Vec::new(),
    }
}

/// The rows of C that a [`MatmulBlock`] input names, read from the front of
/// its encoding ([`MatmulInput::rows`](crate::tasks::matmul::MatmulInput::rows) is
/// its first field; a unit test below holds it to that) without decoding
/// its arrays; `None` if the bytes are not such an input.
fn rows_of(input: &[u8]) -> Option<(u64, u64)> {
    postcard::take_from_bytes::<(u64, u64)>(input).ok().map(|(rows, _)| rows)
}

/// Misbehaves as [`FAULT_ENV`] says, if it names a row in `rows`: the
/// outcome that takes the task's place, or `None` to run it.
fn fault_point(rows: (u64, u64)) -> Option<ErasedOutcome> {
    let FaultSpec { kind, row, marker } = match fault_spec()? {
        Ok(spec) => spec,
        Err(spec) => return Some(ErasedOutcome::error(&format!("bad {FAULT_ENV}={spec:?}"))),
    };
    if !(rows.0..rows.1).contains(&row) {
        return None;
    }
    let kind = kind.as_str();
    if let Some(marker) = &marker {
        let Ok(mut file) = std::fs::OpenOptions::new().write(true).create_new(true).open(marker) else {
            return None;
        };
        if kind == "lent-exit" {
            use std::io::Write;
            // Before the block runs, so before the reply the coordinator
            // reads it after.
            if let Err(e) = write!(file, "{}", std::process::id()) {
                return Some(ErasedOutcome::error(&format!("cannot write the marker {marker}: {e}")));
            }
        }
    }
    let how = match kind {
        "lent" => return Some(lent_at_a_bad_address(rows)),
        "lent-exit" if marker.is_some() => {
            EXIT_AFTER_REPLY.store(true, Ordering::SeqCst);
            return None;
        }
        "lent-exit" => return Some(ErasedOutcome::error(&format!("{FAULT_ENV}: lent-exit needs @once=MARKER"))),
        "kill" => Misbehavior::Kill,
        "abort" => Misbehavior::Abort,
        "exit" => Misbehavior::Exit,
        "panic" => Misbehavior::Panic,
        "error" => Misbehavior::Error,
        "hang" => Misbehavior::Hang,
        "garbage" => Misbehavior::Garbage,
        "mute" => Misbehavior::Mute,
        other => return Some(ErasedOutcome::error(&format!("unknown fault {other:?} in {FAULT_ENV}"))),
    };
    Misbehave::run((row, how)).err().map(|message| ErasedOutcome::error(&message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::array::{self, Array};
    use crate::tasks::matmul::MatmulInput;

    #[test]
    fn the_rows_are_read_from_the_front_of_a_matmul_input() {
        let input = MatmulInput {
            rows: (25, 50),
            a: Array::from_vec(vec![1, 2], vec![1.0f64, 2.0]),
            b: Array::from_vec(vec![2, 1], vec![3.0f64, 4.0]),
            out: None,
            b_panels: None,
        };
        let (bytes, _) = array::encode_with(&input, &mut array::InlineEncoder::default()).unwrap();
        assert_eq!(rows_of(&bytes), Some((25, 50)));
        assert!(before_task("dot", &bytes).is_none(), "only matmul tasks take faults");
    }
}
