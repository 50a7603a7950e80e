//! The reader thread of one worker: its handshake answer (past a test
//! harness's banner), then its frames, each with its arrays read (or
//! landed in place; results the worker lent by address copied out of its
//! memory), forwarded as events until the stream ends; the memory
//! snapshots that follow answers go to the pool's board instead.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, Weak};

use procjob_worker::array::{self, Array, ArrayError, Lender};
use procjob_worker::protocol::{self, ArrayRef, DecodeError, FrameKind, Outcome, Reply, Request, MAGIC};

use crate::pool::{PoolEvent, ReaderShared, WorkerEvent};

/// Bytes a worker may print before its handshake (a test harness's banner)
/// that the reader skips.
const MAX_PREAMBLE: usize = 64 * 1024;

/// Set to `0`, the coordinator never lets workers lend results by address:
/// every result's bytes come through the pipe (to compare the two, or where
/// reading a child's memory is unwelcome).
pub(crate) const LEND_ENV: &str = "PROCJOB_LEND";

/// What a reader needs to let its worker lend results by address: the
/// worker's pid (this process's child, whose memory it may read) and its
/// input, to tell it what has been read.
pub(crate) struct Lending {
    pub(crate) pid: u32,
    /// Weak: the transport's reference alone keeps the pipe open.
    pub(crate) input: Weak<Mutex<BufWriter<File>>>,
}

/// Sends the worker `Request::Lending { read }`; false when its input is
/// closed or broken (it is being stopped, or died: its stream says which).
fn tell(input: &Weak<Mutex<BufWriter<File>>>, read: u64) -> bool {
    let Some(input) = input.upgrade() else { return false };
    let mut w = super::lock(&input);
    protocol::send(&mut *w, FrameKind::Request, &Request::Lending { read }, &[]).is_ok()
}

/// The reader thread: handshake (skipping a harness's banner), then frames
/// until the stream ends. With `lend` (a worker this process started: its
/// child), a worker whose probe this process can read in its memory is
/// told it may lend its results by address; they are copied out of its
/// memory, and it is told as soon as each such reply has been read.
#[expect(clippy::too_many_arguments, reason = "one reader's parts, each used once")]
pub(crate) fn read_replies(
    index: usize,
    generation: u64,
    stdout: File,
    tx: Sender<PoolEvent>,
    readers: ReaderShared,
    inherited: Vec<Array>,
    arriving: Arc<AtomicBool>,
    lend: Option<Lending>,
) {
    let send = |event| tx.send(PoolEvent { index, generation, event }).is_ok();
    let mut stdout = stdout;
    // The lender and the worker's input, once the worker may lend.
    let lending: Option<(Lender, Weak<Mutex<BufWriter<File>>>)>;
    let preamble = match skip_to_magic(&mut stdout) {
        Ok(p) => p,
        Err(error) => {
            send(WorkerEvent::Lost { error });
            return;
        }
    };
    let mut r = BufReader::with_capacity(1 << 20, stdout);
    let first = protocol::recv::<_, Reply>(&mut (&MAGIC[..]).chain(&mut r), FrameKind::Reply);
    match first {
        Ok(frame) => match frame.message {
            Reply::Ready(ready) => {
                // Before the pool hears the worker is ready, so that its
                // first batch follows the permission to lend. The pid it
                // gives must be the child's: the probe is read there.
                lending = lend
                    .filter(|l| l.pid == ready.pid && Lender::new(l.pid).can_read(ready.lend_probe))
                    .filter(|l| tell(&l.input, 0))
                    .map(|l| (Lender::new(l.pid), l.input));
                if !send(WorkerEvent::Ready(ready)) {
                    return;
                }
            }
            Reply::Refused { reason } => {
                send(WorkerEvent::Lost { error: Some(format!("the worker refused the handshake: {reason}")) });
                return;
            }
            Reply::Results(_) | Reply::Memory(_) => {
                send(WorkerEvent::Lost { error: Some("the worker sent results before the handshake".into()) });
                return;
            }
        },
        Err(e) => {
            let mut msg = e.to_string();
            if !preamble.is_empty() {
                msg.push_str(&format!("; it printed before: {:?}", String::from_utf8_lossy(&preamble)));
            }
            send(WorkerEvent::Lost { error: Some(msg) });
            return;
        }
    }
    // Snapshots announced by answers and not arrived; given up on when the
    // stream ends.
    let mut snapshots_due = 0u64;
    // Replies with lent arrays read so far.
    let mut lent_read = 0u64;
    let lost = |error, due| {
        readers.memory.gave_up(index, due);
        send(WorkerEvent::Lost { error });
    };
    loop {
        // Wait for the first byte of the next frame; from then until its
        // event is sent, the worker's answer is arriving.
        let _ = r.fill_buf();
        arriving.store(true, Ordering::SeqCst);
        let frame = match protocol::recv::<_, Reply>(&mut r, FrameKind::Reply) {
            Ok(f) => f,
            Err(DecodeError::Closed) => return lost(None, snapshots_due),
            Err(e) => return lost(Some(e.to_string()), snapshots_due),
        };
        let arrived_ns = procjob_worker::clock::monotonic_ns();
        let results = match frame.message {
            Reply::Results(results) => results,
            Reply::Memory(memory) if snapshots_due > 0 => {
                snapshots_due -= 1;
                readers.memory.arrived(index, memory);
                arriving.store(false, Ordering::SeqCst);
                continue;
            }
            _ => return lost(Some("the worker sent an unexpected message".into()), snapshots_due),
        };
        // Announced before the answer's event, so a report made once the
        // answer is in waits for the snapshot.
        if results.memory_follows {
            snapshots_due += 1;
            readers.memory.expect(index);
        }
        // Per array of the frame, in bulk order: its task, and whether it is
        // that task's first inline or lent array (the one that may land in
        // place).
        let mut owners: Vec<(u64, bool)> = Vec::new();
        let mut refs: Vec<&ArrayRef> = Vec::new();
        for t in &results.tasks {
            if let Outcome::Ok { arrays, .. } = &t.outcome {
                let mut first_inline = true;
                for a in arrays {
                    let inline = matches!(a, ArrayRef::Inline { .. } | ArrayRef::Lent { .. });
                    owners.push((t.index, inline && first_inline));
                    first_inline &= !inline;
                    refs.push(a);
                }
            }
        }
        // Lent arrays only from a worker allowed to lend: from any other,
        // each is refused as that array's error, and not counted.
        let lender = lending.as_ref().map(|(l, _)| l);
        let lent_any = refs.iter().any(|a| matches!(a, ArrayRef::Lent { .. }));
        let lent_bytes = if lender.is_some() { results.lent_bytes() } else { 0 };
        let arrays =
            array::read_arrays(&mut r, refs.iter().copied(), frame.bulk_len, lender, &mut |position, a| match a {
                ArrayRef::File { dtype, shape, path, offset, access } => {
                    let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
                    array::Placement::Mapped(array::map_file_ref(path, *dtype, &shape, *offset, *access))
                }
                ArrayRef::Inherited { dtype, shape, index, offset } => {
                    // A view of an array the worker inherited from us: ours.
                    let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
                    array::Placement::Mapped(match inherited.get(*index as usize) {
                        Some(base) => base.view_of_storage(*dtype, &shape, *offset),
                        None => Err(ArrayError::Shape(format!("no inherited array {index}"))),
                    })
                }
                ArrayRef::Inline { .. } | ArrayRef::Lent { .. } => {
                    let (task, first) = owners[position];
                    let landing =
                        first.then(|| readers.landings.lock().ok().and_then(|mut l| l.remove(&task))).flatten();
                    landing.map_or(array::Placement::Own, array::Placement::Land)
                }
            });
        let arrays = match arrays {
            Ok(a) => a,
            // The worker was gone before its lent results were read: as if
            // it had died mid-reply.
            Err(DecodeError::Closed) => return lost(None, snapshots_due),
            Err(e) => return lost(Some(e.to_string()), snapshots_due),
        };
        // Read in full: the worker may have the lent arrays back, and hears
        // so before it can get another batch.
        if let (true, Some((_, input))) = (lent_any, &lending) {
            lent_read += 1;
            // A failed write is a worker gone or going: its stream ends
            // next, and says so.
            tell(input, lent_read);
        }
        // What came back from the worker: the frame, and the bytes read out
        // of its memory.
        let bytes = frame.header_bytes + frame.bulk_len + lent_bytes;
        let read_ns = procjob_worker::clock::monotonic_ns();
        let sent = send(WorkerEvent::Results { results, arrays, bytes, arrived_ns, read_ns });
        arriving.store(false, Ordering::SeqCst);
        if !sent {
            return;
        }
    }
}

/// Reads, a byte at a time, until the frame magic, returning what came
/// before it. A test harness prints a banner before it runs the worker
/// entry; anything else before the handshake is unexpected and is kept for
/// the error message. Byte-wise reads stop exactly at the magic, so nothing
/// after it is consumed; they happen once per worker, on a few bytes.
fn skip_to_magic<R: Read>(r: &mut R) -> Result<Vec<u8>, Option<String>> {
    let mut seen: Vec<u8> = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match r.read(&mut byte) {
            Ok(0) => {
                let note = (!seen.is_empty()).then(|| format!("it printed: {:?}", String::from_utf8_lossy(&seen)));
                return Err(note);
            }
            Ok(_) => seen.push(byte[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Some(e.to_string())),
        }
        if seen.ends_with(&MAGIC) {
            seen.truncate(seen.len() - MAGIC.len());
            return Ok(seen);
        }
        if seen.len() > MAX_PREAMBLE {
            return Err(Some(format!(
                "no handshake in the first {MAX_PREAMBLE} bytes it wrote: {:?}",
                String::from_utf8_lossy(&seen[..200])
            )));
        }
    }
}
