//! Writing a batch's reply: the encoded results, then their arrays' bytes,
//! lent to the pipe with `vmsplice` when large — or, once the coordinator
//! has said it can read this worker's memory, lent by address; the pages of
//! the last reply's large results go back into service once the pipe, or
//! the coordinator, has let go of them.

use std::collections::VecDeque;
use std::io::{BufWriter, Write};
use std::os::fd::AsFd;

use super::budget::ReplyBudget;
use crate::array::Array;
use crate::protocol::{self, ArrayRef, FailureCause, FrameKind, Outcome, Reply, Results, TaskReply};

/// Sends `results` with `inline`'s bytes as the frame's bulk; true when
/// they went as they were. When the results encode to more than a frame may
/// carry, every task fails instead, `inline` is emptied, and false.
pub(super) fn send_results<W: Write + AsFd>(
    output: &mut BufWriter<W>,
    results: Results,
    inline: &mut Vec<Array>,
) -> std::io::Result<bool> {
    let reply = Reply::Results(results);
    crate::payload::with_scratch(|payload| {
        crate::payload::encode_into(&reply, payload).map_err(std::io::Error::other)?;
        if let (true, Reply::Results(mut results)) = (payload.len() > protocol::MAX_PAYLOAD, reply) {
            // Too large for one frame (the budget's estimate fell
            // short): report it as the tasks' failure rather than die,
            // so the coordinator can say which tasks — the explanation
            // once, a short pointer to it for the others.
            let message = format!(
                "the batch's results encode to {} bytes, over the frame limit of {} bytes; \
                 return large data as procjob::Array (raw bytes, no limit) instead of serde values",
                payload.len(),
                protocol::MAX_PAYLOAD
            );
            let first = results.tasks.first().map_or(0, |t| t.index);
            for (i, t) in results.tasks.iter_mut().enumerate() {
                let message = if i == 0 { message.clone() } else { ReplyBudget::dropped_message(first) };
                t.outcome = Outcome::Failed(protocol::TaskFailure {
                    cause: FailureCause::Setup,
                    message,
                    location: None,
                    error: None,
                    sources: Vec::new(),
                });
            }
            inline.clear();
            protocol::send(output, FrameKind::Reply, &Reply::Results(results), &[]).map(|_| false)
        } else {
            write_reply(output, payload, inline).map(|_| true)
        }
    })
}

/// The results a worker lends by address ([`ArrayRef::Lent`]) instead of
/// sending their bytes, once its coordinator has said it reads them out of
/// its memory ([`Request::Lending`](protocol::Request::Lending)); each is
/// kept, unwritten, until the coordinator says it has read its reply.
#[derive(Default)]
pub(super) struct Lending {
    /// The coordinator has said it can read this worker's memory.
    allowed: bool,
    /// Replies that lent arrays, sent so far.
    replies: u64,
    /// The arrays each such reply lent (by its number, from 1), not yet
    /// read.
    out: VecDeque<(u64, Vec<Array>)>,
}

impl Lending {
    /// The coordinator may be lent results, and has read the first `read`
    /// replies that lent any: their arrays' pages serve the next results
    /// (`Array::try_for_overwrite`).
    pub(super) fn read(&mut self, read: u64) {
        self.allowed = true;
        while self.out.front().is_some_and(|(reply, _)| *reply <= read) {
            let (_, arrays) = self.out.pop_front().expect("just seen");
            arrays.into_iter().for_each(Array::put_back_pages);
        }
    }

    /// Takes the results of `tasks` that own pages of their own (the ones
    /// that would go into the pipe by reference) out of `inline`, and names
    /// them by address in their outcomes instead; returns them, for
    /// [`Lending::sent`]. Nothing when lending is not allowed.
    pub(super) fn lend(&self, tasks: &mut [TaskReply], inline: &mut Vec<Array>) -> Vec<Array> {
        if !self.allowed || !inline.iter().any(Array::is_sole_owner_of_pages) {
            return Vec::new();
        }
        let mut arrays = std::mem::take(inline).into_iter();
        let mut lent = Vec::new();
        for t in tasks {
            let Outcome::Ok { arrays: refs, .. } = &mut t.outcome else { continue };
            for r in refs.iter_mut().filter(|r| matches!(r, ArrayRef::Inline { .. })) {
                let array = arrays.next().expect("one inline array per inline reference");
                if array.is_sole_owner_of_pages() {
                    let (dtype, shape) = r.dtype_and_shape();
                    let address = array.as_bytes().as_ptr() as u64;
                    *r = ArrayRef::Lent { dtype, shape: shape.to_vec(), address };
                    lent.push(array);
                } else {
                    inline.push(array);
                }
            }
        }
        lent
    }

    /// Whether arrays lent are still unread.
    pub(super) fn holds_any(&self) -> bool {
        !self.out.is_empty()
    }

    /// `lent` went out in a reply as it was (`sent`): kept until the
    /// coordinator has read it. Otherwise (the results were replaced by
    /// failures) nothing refers to them, and they are dropped.
    pub(super) fn sent(&mut self, lent: Vec<Array>, sent: bool) {
        if sent && !lent.is_empty() {
            self.replies += 1;
            self.out.push_back((self.replies, lent));
        }
    }
}

/// Writes a reply frame whose bulk is `inline`'s bytes. Arrays that are
/// the sole owners of pages of their own (a large result block) go into the
/// pipe by reference with `vmsplice(2)` rather than copied by `write`: the
/// pipe holds the pages until the coordinator has read them, and the caller
/// does not write to them before that — it drops `inline`, or keeps the
/// arrays for [`put_back_sent`], which waits for the pipe to be empty.
/// When the output is not a pipe, the bytes are written.
fn write_reply<W: Write + AsFd>(output: &mut BufWriter<W>, payload: &[u8], inline: &[Array]) -> std::io::Result<u64> {
    let bulk: Vec<&[u8]> = inline.iter().map(Array::as_bytes).collect();
    #[cfg(target_os = "linux")]
    if inline.iter().any(Array::is_sole_owner_of_pages) {
        let bulk_len: u64 = bulk.iter().map(|b| b.len() as u64).sum();
        let prelude = protocol::encode_prelude(FrameKind::Reply, payload.len(), bulk_len);
        output.write_all(&prelude)?;
        output.write_all(payload)?;
        for (bytes, array) in bulk.iter().zip(inline) {
            if array.is_sole_owner_of_pages() {
                output.flush()?;
                if splice_into_pipe(output.get_ref(), bytes)? {
                    continue;
                }
            }
            output.write_all(bytes)?;
        }
        output.flush()?;
        return Ok(protocol::PRELUDE_LEN as u64 + payload.len() as u64 + bulk_len);
    }
    protocol::write_frame(output, FrameKind::Reply, payload, &bulk)
}

/// Puts the pages of `sent` (the last reply's large results) back for the
/// next results (`Array::try_for_overwrite`) when `output` is a pipe with
/// nothing left in it: the coordinator has read every byte of the reply, so
/// the pipe holds none of those pages any more. Otherwise drops them: a
/// pipe still holding pages keeps its own references, and anything but a
/// pipe was written by copy. Sound only because the coordinator's readers
/// copy out of the pipe — `read`, or `splice` into a file — and nothing
/// between passes its pages on by reference, as `tee` or a pipe-to-pipe
/// `splice` would ([`Hello::reuse_lent_pages`](protocol::Hello)).
pub(super) fn put_back_sent(sent: &mut Vec<Array>, output: &impl AsFd) {
    if !sent.is_empty() && pipe_is_empty(output) {
        sent.drain(..).for_each(Array::put_back_pages);
    } else {
        sent.clear();
    }
}

/// Whether `fd` is a pipe (or FIFO).
pub(super) fn is_pipe(fd: &impl AsFd) -> bool {
    nix::sys::stat::fstat(fd.as_fd()).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFIFO)
}

/// Whether `fd` is a pipe that holds no bytes (`FIONREAD` is 0); false
/// when that cannot be told.
fn pipe_is_empty(fd: &impl AsFd) -> bool {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        if !is_pipe(fd) {
            return false;
        }
        let mut queued: libc::c_int = 0;
        // SAFETY: FIONREAD on a pipe writes one `c_int`, through a pointer
        // to a live local of that type.
        let r = unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), libc::FIONREAD, &mut queued) };
        r == 0 && queued == 0
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = fd;
        false
    }
}

/// Hands `bytes` to the pipe `fd` by reference (`vmsplice`); false, with
/// nothing sent, when `fd` is not a pipe.
#[cfg(target_os = "linux")]
fn splice_into_pipe(fd: &impl AsFd, mut bytes: &[u8]) -> std::io::Result<bool> {
    use nix::errno::Errno;
    use nix::fcntl::{vmsplice, SpliceFFlags};
    let mut first = true;
    while !bytes.is_empty() {
        match vmsplice(fd.as_fd(), &[std::io::IoSlice::new(bytes)], SpliceFFlags::empty()) {
            Ok(0) => return Err(std::io::Error::new(std::io::ErrorKind::WriteZero, "the peer stopped reading")),
            Ok(n) => bytes = &bytes[n..],
            Err(Errno::EINTR) => continue,
            Err(Errno::EINVAL | Errno::EBADF) if first => return Ok(false),
            Err(e) => return Err(e.into()),
        }
        first = false;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::io::Read;

    use super::*;

    /// A reply's large result goes back into service for the next result
    /// only once the pipe it went into is empty: while the pipe holds
    /// bytes, or when the output is not a pipe, its pages are dropped. (Put
    /// back, the next array of its size does not start as zeros.)
    #[cfg(target_os = "linux")]
    #[test]
    fn sent_pages_come_back_only_from_an_empty_pipe() {
        // As in `serve`: what the loop drops is not recycled.
        let _serving = crate::array::NoRecycling::begin();
        let len = crate::array::HUGE_PAGE_THRESHOLD / 8 + 1000;
        let sent = || {
            let mut a = Array::zeros(crate::DType::F64, vec![len]);
            a.as_mut_slice::<f64>().unwrap().fill(7.0);
            assert!(a.is_sole_owner_of_pages());
            vec![a]
        };
        let next_is_fresh =
            || Array::try_for_overwrite(crate::DType::F64, vec![len]).unwrap().as_bytes().iter().all(|&b| b == 0);
        let (r, w) = nix::unistd::pipe().unwrap();
        let (mut r, mut w) = (File::from(r), File::from(w));
        w.write_all(b"x").unwrap();
        put_back_sent(&mut sent(), &w);
        assert!(next_is_fresh(), "pages came back while the pipe held a byte");
        r.read_exact(&mut [0u8; 1]).unwrap();
        let mut list = sent();
        put_back_sent(&mut list, &w);
        assert!(list.is_empty());
        assert!(!next_is_fresh(), "the pages did not come back from the empty pipe");
        put_back_sent(&mut sent(), &tempfile::tempfile().unwrap());
        assert!(next_is_fresh(), "pages came back from a file");
        Array::drop_spare_pages();
    }
}
