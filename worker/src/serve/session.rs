//! One conversation with the coordinator, from the handshake until the
//! input closes: [`serve`] waits for each request, reads its arrays, runs
//! its tasks and answers, and keeps what lasts between batches (the map
//! cache, the pages of the last reply, the results lent by address, the
//! time of the last memory snapshot).

use std::io::{BufReader, BufWriter, Read, Write};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use super::map_cache::MapCache;
use super::wait::{wait_for_request, AsRawFdMaybe, FIRST_MAP_CHECK};
use super::{handshake, read, reply, run};
use crate::array::{self, Array};
use crate::protocol::{self, DecodeError, Reply, Request, Results};
use crate::registry::Registry;
use crate::secret::{PoolSecret, SecretError};
use crate::task::Shared;

/// A batch that computed this long is followed by a memory snapshot.
const SNAPSHOT_AFTER_BUSY: Duration = Duration::from_millis(1);
/// Otherwise snapshots are at least this far apart.
const SNAPSHOT_EVERY: Duration = Duration::from_millis(100);

/// Why serving stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A frame could not be read.
    #[error("worker cannot read its input: {0}")]
    Decode(#[from] DecodeError),
    /// A reply could not be written.
    #[error("worker cannot write its output: {0}")]
    Write(#[from] std::io::Error),
    /// The conversation did not open with a handshake.
    #[error("worker expected a Hello request first")]
    NoHello,
    /// The handshake was refused.
    #[error("handshake refused: {0}")]
    Refused(String),
}

/// Serves requests from `input` until it closes, answering on `output`;
/// `inherited` are the arrays a forked worker shares with its coordinator.
/// The handshake must carry `secret`, the secret of the pool that started
/// this worker; without one (`Err`), every handshake is refused.
pub fn serve<R: Read + AsRawFdMaybe + AsFd, W: Write + AsFd>(
    mut input: BufReader<R>,
    output: W,
    registry: &Registry,
    inherited: &[Array],
    secret: &Result<PoolSecret, SecretError>,
) -> Result<(), ServeError> {
    // First, so that it ends last: every result this loop drops, from the
    // pipe's or the lending's hold too, gives its pages back to the system;
    // they serve later results only through `put_back_sent` and `Lending`.
    let _no_recycling = array::NoRecycling::begin();
    let mut output = BufWriter::with_capacity(1 << 16, output);
    let Some((hello, same_binary)) = handshake::accept(&mut input, &mut output, secret)? else { return Ok(()) };
    let idle = (hello.idle_timeout_ms > 0).then(|| Duration::from_millis(hello.idle_timeout_ms));
    let mut maps = MapCache::default();
    hello.folders.into_iter().for_each(|f| maps.folders.allow(f));
    let mut last_snapshot = Instant::now();
    let mut snapshots = crate::memory::Snapshots::default();
    // The large results of the last reply, which went into the pipe by
    // reference: their pages serve this batch's results once the pipe has
    // let go of them — when the coordinator says its readers copy, and the
    // output is a pipe (anything else was written by copy).
    let reuse_lent_pages = hello.reuse_lent_pages && reply::is_pipe(output.get_ref());
    let mut sent: Vec<Array> = Vec::new();
    // The large results lent by address, until the coordinator has read them.
    let mut lending = reply::Lending::default();
    // The shared value of the current call, kept from the batch that
    // brought it until the call changes.
    let mut shared = Shared::default();
    loop {
        // Never idle out while results are lent: the coordinator has yet to
        // read them, and says so at once when it has.
        let idle = idle.filter(|_| !lending.holds_any());
        if input.buffer().is_empty() && !wait_for_request(input.get_ref(), idle, &mut maps, FIRST_MAP_CHECK) {
            return Ok(()); // idle timeout: exit quietly, the pool starts another when needed
        }
        let frame = match protocol::recv_request(&mut input) {
            Ok(f) => f,
            Err(DecodeError::Closed) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let received_ns = crate::clock::monotonic_ns();
        let batch = match &frame.message {
            Request::Run(batch) => batch,
            Request::Allow { folders } => {
                protocol::check_bulk(frame.message.array_refs(), frame.bulk_len)?;
                folders.iter().for_each(|f| maps.folders.allow(f.clone()));
                continue;
            }
            Request::Lending { read } => {
                protocol::check_bulk(frame.message.array_refs(), frame.bulk_len)?;
                lending.read(*read);
                continue;
            }
            Request::Hello(_) => return Err(ServeError::NoHello),
        };
        reply::put_back_sent(&mut sent, output.get_ref());
        if maps.call != batch.call {
            maps.start_call(batch.call);
            shared.clear();
        }
        maps.start_batch();
        let arrays = read::batch_arrays(&mut input, &frame, &mut maps, inherited)?;
        // The batch's received bytes stay alive until the memory snapshot
        // below, so it shows what the tasks held (a B copied into this worker
        // counts in its USS), not what was left after they returned.
        let received = read::inline_arrays(&frame.message, &arrays);
        let arrays = keep_shared(batch, arrays, &mut shared);
        let mapped_ns = crate::clock::monotonic_ns();
        let batch_started = Instant::now();
        let (mut replies, mut inline) = run::run_batch(registry, same_binary, batch, arrays, &mut shared);
        let lent = lending.lend(&mut replies, &mut inline);
        maps.forget_poisoned();
        Array::drop_spare_pages();
        let memory_follows =
            batch_started.elapsed() >= SNAPSHOT_AFTER_BUSY || last_snapshot.elapsed() >= SNAPSHOT_EVERY;
        let results = Results {
            tasks: replies,
            memory_follows,
            received_ns,
            mapped_ns,
            replying_ns: crate::clock::monotonic_ns(),
        };
        let as_they_were = reply::send_results(&mut output, results, &mut inline)?;
        lending.sent(lent, as_they_were);
        #[cfg(feature = "test-tasks")]
        super::fault::exit_after_reply();
        // The snapshot after the answer, not before it: the coordinator
        // has its results while the page tables are walked. What the batch
        // held (its received bytes, its results' pages) is still held.
        if memory_follows {
            last_snapshot = Instant::now();
            protocol::send(&mut output, protocol::FrameKind::Reply, &Reply::Memory(snapshots.take()), &[])?;
        }
        drop(received);
        if reuse_lent_pages {
            sent.extend(inline.into_iter().filter(Array::is_sole_owner_of_pages).take(array::SPARES_KEPT));
        }
    }
}

/// Keeps the shared value a batch brings (its arrays come first in bulk
/// order; a value spilled to a file is read from it as a spilled input is)
/// for the rest of its call, and returns the tasks' arrays.
fn keep_shared(
    batch: &protocol::Batch,
    mut arrays: Vec<Result<Array, array::ArrayError>>,
    shared: &mut Shared,
) -> Vec<Result<Array, array::ArrayError>> {
    let Some(value) = &batch.shared else { return arrays };
    let tasks = arrays.split_off(value.arrays.len().min(arrays.len()));
    // A value spilled to a file, as a task's input can be.
    let (spilled, mine) = match run::unspill(&value.value, arrays) {
        Ok(split) => split,
        Err(reason) => {
            shared.set_failed(reason);
            return tasks;
        }
    };
    let bytes = match &spilled {
        Some(file) => run::spilled_input(file),
        None => Ok(&value.value[..]),
    };
    match (bytes, mine.into_iter().collect::<Result<Vec<Array>, _>>()) {
        (Ok(bytes), Ok(mine)) => shared.set(bytes, mine),
        (Err(reason), _) => shared.set_failed(reason),
        (_, Err(e)) => shared.set_failed(e.to_string()),
    }
    tasks
}
