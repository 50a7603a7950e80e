//! The one thread of each rank that calls MPI.
//!
//! MPI is initialised with `MPI_THREAD_SERIALIZED`: only this thread calls
//! it while it runs (the main thread only before it starts and after it
//! stops). Everything else hands it [`Outgoing`] messages on a channel;
//! what arrives is handed to the rank's handler, on this thread. Sends are
//! non-blocking (`MPI_Isend`), so two ranks sending each other large
//! messages at once cannot deadlock; receiving is by polling
//! (`MPI_Improbe`), with a back-off when nothing moves, since a blocking
//! MPI receive spins a core. The back-off stops at [`MIN_CAP`] at first,
//! and at a fiftieth of the time since the last message after that (up to
//! [`MAX_CAP`]): a message that comes after a long quiet waits at most 2%
//! more, and a rank with nothing to do (a rank that only waits for the
//! end, rank 0 while all its workers are local, any rank during a long
//! task) wakes a few dozen times a second rather than two thousand, which
//! on a node whose CPUs all run workers cost them about 10% (docs/scale-out.md).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::Duration;

use ::mpi::datatype::Equivalence;
use ::mpi::ffi;
use ::mpi::point_to_point::{Destination, Source};
use ::mpi::topology::{Communicator, SimpleCommunicator};

/// The longest the thread sleeps between polls shortly after a message.
const MIN_CAP: Duration = Duration::from_micros(500);
/// The longest it ever sleeps between polls.
const MAX_CAP: Duration = Duration::from_millis(20);

/// The longest sleep between polls `quiet` after the last message (or
/// send under way).
fn idle_cap(quiet: Duration) -> Duration {
    (quiet / 50).clamp(MIN_CAP, MAX_CAP)
}

/// A message to send.
#[derive(Debug)]
pub(super) struct Outgoing {
    pub(super) dest: i32,
    pub(super) tag: i32,
    pub(super) bytes: Vec<u8>,
}

/// A message received.
#[derive(Debug)]
pub(super) struct Incoming {
    pub(super) source: i32,
    pub(super) tag: i32,
    pub(super) bytes: Vec<u8>,
}

/// Bytes this rank sent to other ranks.
pub(super) static BYTES_OUT: AtomicU64 = AtomicU64::new(0);
/// Bytes this rank received from other ranks.
pub(super) static BYTES_IN: AtomicU64 = AtomicU64::new(0);

/// A send under way: the request and the buffer it reads.
struct Pending {
    request: ffi::MPI_Request,
    _bytes: Vec<u8>,
}

/// Sends `bytes` to `dest` without waiting.
fn start_send(dest: i32, tag: i32, bytes: Vec<u8>) -> Pending {
    let mut request = std::mem::MaybeUninit::<ffi::MPI_Request>::uninit();
    BYTES_OUT.fetch_add(bytes.len() as u64, Ordering::Relaxed);
    // SAFETY: the buffer lives in the returned Pending until MPI_Test says
    // the send is complete; the count is its length (messages are far
    // below 2 GiB: frames are limited well below that); RSMPI_COMM_WORLD and
    // RSMPI_UINT8_T are constants of the initialised library; MPI_Isend
    // writes the request before returning.
    unsafe {
        ffi::MPI_Isend(
            bytes.as_ptr().cast(),
            bytes.len() as std::os::raw::c_int,
            ffi::RSMPI_UINT8_T,
            dest,
            tag,
            ffi::RSMPI_COMM_WORLD,
            request.as_mut_ptr(),
        );
        Pending { request: request.assume_init(), _bytes: bytes }
    }
}

/// Whether a send is complete (its buffer may then go).
fn sent(p: &mut Pending) -> bool {
    let mut flag = 0;
    // SAFETY: the request came from MPI_Isend and has not completed yet
    // (completed ones are dropped); the status is ignored.
    unsafe {
        ffi::MPI_Test(&mut p.request, &mut flag, ffi::RSMPI_STATUS_IGNORE);
    }
    flag != 0
}

/// Runs the MPI loop until `stop` is set and every message handed to it
/// has been sent: sends what arrives on `outgoing`, and hands what other
/// ranks send to `handle`.
pub(super) fn run(outgoing: Receiver<Outgoing>, stop: &AtomicBool, mut handle: impl FnMut(Incoming)) {
    let world = SimpleCommunicator::world();
    let me = world.rank();
    let mut pending: Vec<Pending> = Vec::new();
    let mut idle = Duration::from_micros(5);
    let mut last_traffic = std::time::Instant::now();
    loop {
        let mut busy = false;
        while let Ok(m) = outgoing.try_recv() {
            pending.push(start_send(m.dest, m.tag, m.bytes));
            busy = true;
        }
        pending.retain_mut(|p| !sent(p));
        while let Some((message, status)) = world.any_process().immediate_matched_probe() {
            let len = status.count(u8::equivalent_datatype()).max(0) as usize;
            let mut bytes = vec![0u8; len];
            message.matched_receive_into(&mut bytes[..]);
            BYTES_IN.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            if status.tag() == super::wire::TAG_DATA && me != 0 {
                super::world::test_panic(me as usize, "on the first bytes it receives for a worker");
            }
            handle(Incoming { source: status.source_rank(), tag: status.tag(), bytes });
            busy = true;
        }
        if stop.load(Ordering::SeqCst) && pending.is_empty() {
            // One last look: anything handed over before the stop was set.
            match outgoing.try_recv() {
                Ok(m) => pending.push(start_send(m.dest, m.tag, m.bytes)),
                Err(_) => return,
            }
            continue;
        }
        if busy {
            idle = Duration::from_micros(5);
            last_traffic = std::time::Instant::now();
            continue;
        }
        if !pending.is_empty() {
            // A large send progresses only while MPI is called.
            last_traffic = std::time::Instant::now();
        }
        // Nothing moved: wait for something to send, or a while.
        match outgoing.recv_timeout(idle) {
            Ok(m) => pending.push(start_send(m.dest, m.tag, m.bytes)),
            Err(RecvTimeoutError::Timeout) => idle = (idle * 2).min(idle_cap(last_traffic.elapsed())),
            Err(RecvTimeoutError::Disconnected) => std::thread::sleep(idle),
        }
    }
}

/// Sends one message and waits until it is sent, before the loop runs
/// (start-up exchange).
pub(super) fn send_now(dest: i32, tag: i32, bytes: &[u8]) {
    SimpleCommunicator::world().process_at_rank(dest).send_with_tag(bytes, tag);
    BYTES_OUT.fetch_add(bytes.len() as u64, Ordering::Relaxed);
}

/// Receives one message with `tag` from any rank, before the loop runs.
pub(super) fn receive_now(tag: i32) -> Incoming {
    let (bytes, status) = SimpleCommunicator::world().any_process().receive_vec_with_tag::<u8>(tag);
    BYTES_IN.fetch_add(bytes.len() as u64, Ordering::Relaxed);
    Incoming { source: status.source_rank(), tag, bytes }
}

/// A channel to the loop (cheap to clone).
pub(super) type Link = Sender<Outgoing>;

#[cfg(test)]
mod tests {
    use super::{idle_cap, MAX_CAP, MIN_CAP};
    use std::time::Duration;

    #[test]
    fn the_idle_cap_is_a_fiftieth_of_the_quiet_within_its_bounds() {
        assert_eq!(idle_cap(Duration::ZERO), MIN_CAP);
        assert_eq!(idle_cap(Duration::from_millis(10)), MIN_CAP);
        assert_eq!(idle_cap(Duration::from_millis(100)), Duration::from_millis(2));
        assert_eq!(idle_cap(Duration::from_secs(60)), MAX_CAP);
    }
}
