//! The typed shell of a call: the only part compiled once per task type.
//! It draws inputs from the caller's iterator and encodes them for the
//! [`CallCore`] (or for a run in this process, [`InProcess`]), and decodes
//! the outputs handed back, by task index, into `T::Output`s to be
//! yielded. It also chooses how the call runs: an empty input starts
//! nothing, and a call that runs in this process starts no worker.

use std::collections::VecDeque;

use procjob_worker::array::{self, Array, ArrayEncoder};
use procjob_worker::protocol::TaskKind;
use procjob_worker::registry::entry_offset;
use procjob_worker::Task;

use super::builder::{CallProgress, CallStats, Parallel};
use super::call::{CallCore, Drawn, Encoded, Engine, LandingPlan, TaskCodec};
use super::encoder::CallEncoder;
use super::here::{DrawnHere, InProcess};
use crate::error::{Error, TaskId};

/// A call of task `T` on the inputs `I`. Yields outputs in completion
/// order.
pub(super) struct Call<'p, T: Task, I: Iterator<Item = T::Input>> {
    /// The untyped state of the call.
    core: Engine<'p>,
    /// The inputs, and the outputs decoded but not yet yielded.
    codec: Typed<T, I>,
}

/// The typed side of a call, which the core reaches through [`TaskCodec`].
struct Typed<T: Task, I> {
    /// The caller's first input, drawn to learn whether there is one.
    first: Option<T::Input>,
    /// The caller's inputs, drawn as the scheduler asks.
    inputs: I,
    /// The buffer inputs are encoded into before each becomes a `Payload`.
    scratch: Vec<u8>,
    /// Outputs decoded, in completion order, by task index.
    ready: VecDeque<(u64, T::Output)>,
}

impl<'p, T: Task, I: Iterator<Item = T::Input>> Call<'p, T, I> {
    /// Starts a call of `T` on `parallel`'s pool, drawing from `inputs`,
    /// reporting to `progress` when given (else to `parallel`'s callback).
    /// The core knows `T` only by its kind: its name, and the offset of its
    /// entry descriptor in this executable. The settings are checked
    /// first; then an empty input starts nothing, and a call that runs in
    /// this process ([`Parallel::runs_in_process`]) runs `T`'s erased entry
    /// here.
    pub(super) fn start(parallel: &'p mut Parallel, mut inputs: I, progress: CallProgress<'p>) -> Result<Self, Error> {
        // A call refused below leaves no stats of the call before it.
        parallel.last = CallStats::default();
        let name = T::name();
        if name.len() > procjob_worker::protocol::MAX_KIND_NAME {
            return Err(Error::Config(format!(
                "the task kind's name is {} bytes long, over the limit of {} that workers accept; \
                 give the Task a shorter name() ({:?}…)",
                name.len(),
                procjob_worker::protocol::MAX_KIND_NAME,
                name.chars().take(40).collect::<String>()
            )));
        }
        let here = parallel.runs_in_process()?;
        let first = inputs.next();
        let core = if first.is_none() {
            parallel.calls += 1;
            parallel.last = CallStats { in_process: here, ..CallStats::default() };
            Engine::Empty
        } else if here {
            Engine::Here(Box::new(InProcess::start(parallel, procjob_worker::task::entry::<T>, progress)))
        } else {
            parallel.check_temp_folder()?;
            let kind = TaskKind { name: name.to_string(), entry: entry_offset::<T>() };
            Engine::Pool(Box::new(CallCore::start(parallel, kind, progress)?))
        };
        Ok(Call { core, codec: Typed { first, inputs, scratch: Vec::new(), ready: VecDeque::new() } })
    }

    /// Sets the value every task of the call shares (`map_with`).
    pub(super) fn share<S: serde::Serialize + ?Sized>(&mut self, value: &S) -> Result<(), Error> {
        let scratch = &mut self.codec.scratch;
        self.core.share(|encoder| array::encode_with_buffer(value, encoder, scratch).map_err(|e| e.to_string()))
    }

    /// Lands the outputs' first arrays in place (`run_unordered_into`).
    pub(super) fn land_outputs(&mut self, plan: LandingPlan) {
        self.core.land_outputs(plan);
    }

    /// The next completed output, the call's failure, or `None` when done.
    pub(super) fn next_completed(&mut self) -> Option<Result<(u64, T::Output), Error>> {
        loop {
            if let Some(out) = self.codec.ready.pop_front() {
                return Some(Ok(out));
            }
            if let Err(e) = self.core.step(&mut self.codec)? {
                return Some(Err(e));
            }
        }
    }
}

impl<T: Task, I: Iterator<Item = T::Input>> Typed<T, I> {
    /// The next input: the first one, kept since the start, then the rest.
    fn next_input(&mut self) -> Option<T::Input> {
        self.first.take().or_else(|| self.inputs.next())
    }

    /// How many inputs are left, when the iterator says exactly.
    fn left(&self) -> Option<usize> {
        let (lo, hi) = self.inputs.size_hint();
        (Some(lo) == hi).then_some(lo + usize::from(self.first.is_some()))
    }
}

impl<T: Task, I: Iterator<Item = T::Input>> TaskCodec for Typed<T, I> {
    fn draw(&mut self, n: usize, first: u64, encoder: &mut CallEncoder, queue: &mut VecDeque<Encoded>) -> Drawn {
        let mut drawn = Drawn { count: 0, done: false, left: None, failed: None };
        while drawn.count < n {
            let Some(input) = self.next_input() else {
                drawn.done = true;
                break;
            };
            let index = first + drawn.count as u64;
            drawn.count += 1;
            let description = T::describe(&input);
            let encoded = array::encode_with_buffer(&input, encoder, &mut self.scratch).map_err(|e| e.to_string());
            match encoded.and_then(|(bytes, refs)| encoder.place_input(bytes, refs)) {
                Ok((bytes, refs)) => {
                    queue.push_back(Encoded { index, input: bytes, refs, inline: encoder.take_inline(), description })
                }
                Err(e) => {
                    let task = TaskId { index, description };
                    drawn.failed = Some(Error::Codec { task, reason: format!("cannot encode the input: {e}") });
                    break;
                }
            }
        }
        drawn.left = self.left();
        drawn
    }

    fn draw_here(&mut self, index: u64, encoder: &mut dyn ArrayEncoder) -> Option<Result<DrawnHere, Error>> {
        let input = self.next_input()?;
        let description = T::describe(&input);
        let encoded = array::encode_with_buffer(&input, encoder, &mut self.scratch);
        drop(input);
        Some(match encoded {
            Ok((input, _)) => Ok(DrawnHere { input, description, left: self.left() }),
            Err(e) => Err(Error::Codec {
                task: TaskId { index, description },
                reason: format!("cannot encode the input: {e}"),
            }),
        })
    }

    fn decode(&mut self, index: u64, output: &[u8], arrays: Vec<Array>) -> Result<(), String> {
        let out = array::decode_with::<T::Output>(output, arrays).map_err(|e| e.to_string())?;
        self.ready.push_back((index, out));
        Ok(())
    }
}
