//! Reading a frame's arrays: every inline array's bytes from the bulk
//! (into fallible allocations, or straight into a region of a file with
//! `splice(2)`), and file or inherited references placed as the caller says.

use std::fs::File;
use std::io::Read;
use std::sync::Arc;

use super::lend::Lender;
use super::storage::Storage;
use super::{Array, ArrayError};
use crate::protocol::{ArrayRef, DecodeError};

/// Where [`read_arrays`] puts one array of a frame.
#[derive(Debug)]
pub enum Placement {
    /// An inline array: read its bytes into a new owned array.
    Own,
    /// A file or inherited reference, already resolved (mapped, or found in
    /// this process's memory) by the caller.
    Mapped(Result<Array, ArrayError>),
    /// An inline array: write its bytes straight into `file` at `offset`
    /// (a region of a shared output) and stand for them with `view`, a view
    /// of that region. Used when `view`'s dtype and shape match the
    /// array's; otherwise the array is owned as usual.
    Land(Landing),
}

/// A region of a file-backed array that an incoming array is written into
/// directly, with no intermediate buffer of its size.
#[derive(Debug, Clone)]
pub struct Landing {
    /// The file, open for writing.
    pub file: Arc<File>,
    /// Byte offset of the region in the file.
    pub offset: u64,
    /// A view of the region (a read-write mapping of the same file).
    pub view: Array,
}

/// Reads the arrays of a frame: for each reference, in order, `place`
/// (given its position and the reference) says where it goes; an inline
/// array and a lent one are placed alike. Lent arrays are copied out of
/// `lender`'s memory; with no lender (a worker reading a request) each is
/// refused as that array's error. Checks the bulk length against the
/// declared arrays before allocating anything.
pub fn read_arrays<'a, R: BulkSource + ?Sized>(
    r: &mut R,
    refs: impl IntoIterator<Item = &'a ArrayRef> + Clone,
    bulk_len: u64,
    lender: Option<&Lender>,
    place: &mut dyn FnMut(usize, &ArrayRef) -> Placement,
) -> Result<Vec<Result<Array, ArrayError>>, DecodeError> {
    crate::protocol::check_bulk(refs.clone(), bulk_len)?;
    // Lent arrays are bounded as a bulk is: a few bytes of a frame must not
    // make the reader allocate without limit.
    let lent = refs.clone().into_iter().filter(|r| matches!(r, ArrayRef::Lent { .. }));
    let lent_len = lent.map(|r| r.nbytes().unwrap_or(u64::MAX)).fold(0u64, u64::saturating_add);
    if lent_len > crate::protocol::MAX_BULK {
        return Err(DecodeError::BulkTooLarge { len: lent_len, max: crate::protocol::MAX_BULK });
    }
    // The failure tests' `lent-exit` fault: its worker exits right after
    // this reply, and reading only once it has makes the copy find it gone
    // (`ESRCH`) every time, not just when the race goes that way.
    #[cfg(feature = "test-tasks")]
    if let (Some(lender), true) = (lender, lent_len > 0) {
        crate::testkinds::outlive_lent_exit(lender.pid());
    }
    let mut out = Vec::new();
    for (position, r_) in refs.into_iter().enumerate() {
        if let ArrayRef::Lent { dtype, address, .. } = r_ {
            out.push(match lender {
                Some(lender) => Ok(read_lent(lender, r_, *dtype, *address, place(position, r_))?),
                None => Err(ArrayError::Shape("an array lent by address is read only from a worker's reply".into())),
            });
            continue;
        }
        match (r_, place(position, r_)) {
            (ArrayRef::Inline { dtype, shape }, Placement::Land(land))
                if land.view.dtype() == *dtype
                    && land.view.shape().iter().map(|&d| d as u64).eq(shape.iter().copied()) =>
            {
                r.copy_to_file(&land.file, land.offset, land.view.nbytes() as u64)?;
                out.push(Ok(land.view));
            }
            (ArrayRef::Inline { dtype, .. }, _) => {
                // The sizes were checked against the bulk above; this also
                // checks what a slice can address.
                let mut array = r_.checked_shape().and_then(|shape| Array::try_zeros(*dtype, shape)).map_err(|e| {
                    DecodeError::Io(std::io::Error::new(std::io::ErrorKind::OutOfMemory, e.to_string()))
                })?;
                let storage = Arc::get_mut(&mut array.storage).expect("a fresh array is unshared");
                let Storage::Owned(owned) = storage else { unreachable!("zeros() is owned") };
                crate::protocol::read_part(r, owned.bytes_mut(), "bulk")?;
                out.push(Ok(array));
            }
            (ArrayRef::File { .. } | ArrayRef::Inherited { .. }, Placement::Mapped(result)) => out.push(result),
            (ArrayRef::File { path, .. }, _) => out
                .push(Err(ArrayError::Map { path: path.clone(), reason: "file references are not read here".into() })),
            (ArrayRef::Inherited { .. }, _) => {
                out.push(Err(ArrayError::Shape("inherited arrays are not resolved here".into())))
            }
            (ArrayRef::Lent { .. }, _) => unreachable!("lent arrays were read above"),
        }
    }
    Ok(out)
}

/// Copies a lent array out of `lender`'s memory into its landing, when it
/// has one of its dtype and shape, or else into a new array. A lender gone
/// (`ESRCH`: it exited before its reply was read) is `DecodeError::Closed`,
/// as a stream that ended mid-reply; any other failed copy (an address it
/// does not map, a landing that cannot be written) is the frame's error,
/// naming which side failed.
fn read_lent(
    lender: &Lender,
    r: &ArrayRef,
    dtype: crate::DType,
    address: u64,
    placement: Placement,
) -> Result<Array, DecodeError> {
    let nbytes = r.nbytes().unwrap_or(u64::MAX);
    let failed = |e: std::io::Error| {
        if e.raw_os_error() == Some(libc::ESRCH) {
            return DecodeError::Closed;
        }
        // EFAULT is either side's address: the lender's if one byte cannot
        // be read there either, else this process's landing (its file
        // system full, or the file cut short).
        let mut one = [0u8; 1];
        let theirs = e.raw_os_error() != Some(libc::EFAULT) || lender.read(address, &mut one).is_err();
        let what = if theirs {
            format!("cannot read a result of {nbytes} bytes lent at {address:#x} from the worker's memory: {e}")
        } else {
            format!(
                "cannot write a result of {nbytes} bytes into its rows of the output ({e}): \
                 is the output's file system full, or its file cut short?"
            )
        };
        DecodeError::Io(std::io::Error::new(e.kind(), what))
    };
    let (_, shape) = r.dtype_and_shape();
    match placement {
        Placement::Land(land)
            if land.view.dtype() == dtype && land.view.shape().iter().map(|&d| d as u64).eq(shape.iter().copied()) =>
        {
            if land.view.shared_write_ptr().is_some() {
                lender.read_into_view(address, &land.view).map_err(failed)?;
            } else {
                // A view this process cannot write through (an output
                // mapped read-only): into the file through a buffer of at
                // most 1 MiB, as from a pipe.
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; land.view.nbytes().min(1 << 20)];
                for at in (0..land.view.nbytes()).step_by(buf.len().max(1)) {
                    let n = buf.len().min(land.view.nbytes() - at);
                    lender.read(address + at as u64, &mut buf[..n]).map_err(failed)?;
                    land.file.write_all_at(&buf[..n], land.offset + at as u64)?;
                }
            }
            Ok(land.view)
        }
        _ => {
            let shape = r
                .checked_shape()
                .map_err(|e| DecodeError::Io(std::io::Error::new(std::io::ErrorKind::OutOfMemory, e.to_string())))?;
            lender.read_new(address, dtype, shape, nbytes as usize).map_err(failed)
        }
    }
}

/// A stream [`read_arrays`] reads frames from, which can also move an
/// array's bytes straight into a region of a file.
pub trait BulkSource: Read {
    /// Moves the next `len` bytes of the stream into `file` at `offset`.
    fn copy_to_file(&mut self, file: &File, offset: u64, len: u64) -> Result<(), DecodeError>;
}

/// A buffered pipe (what the coordinator reads each worker's replies from,
/// and a worker its requests from): the bytes already buffered are written
/// with `pwrite`, the rest moved with `splice(2)` from the pipe into the
/// file's pages — one copy, in the kernel, instead of two through a user
/// buffer. When the descriptor cannot be spliced from (not a pipe, or an
/// old kernel), the rest goes through a buffer as before.
impl<R: Read + std::os::fd::AsFd> BulkSource for std::io::BufReader<R> {
    fn copy_to_file(&mut self, file: &File, offset: u64, len: u64) -> Result<(), DecodeError> {
        use std::io::BufRead;
        use std::os::unix::fs::FileExt;
        let buffered = self.buffer();
        let take = buffered.len().min(usize::try_from(len).unwrap_or(usize::MAX));
        file.write_all_at(&buffered[..take], offset)?;
        self.consume(take);
        let (offset, left) = (offset + take as u64, len - take as u64);
        #[cfg(target_os = "linux")]
        let (offset, left) = splice_to_file(self.get_ref(), file, offset, left, len)?;
        copy_through_buffer(self, file, offset, left)
    }
}

/// Moves up to `left` bytes from the pipe `from` into `file` at `offset`
/// with `splice(2)`; returns where it stopped and what is left, which is
/// nothing unless `from` cannot be spliced from (then the caller copies the
/// rest). `len` is the whole array's length, for the error message.
#[cfg(target_os = "linux")]
fn splice_to_file(
    from: &impl std::os::fd::AsFd,
    file: &File,
    mut offset: u64,
    mut left: u64,
    len: u64,
) -> Result<(u64, u64), DecodeError> {
    use nix::errno::Errno;
    use nix::fcntl::{splice, SpliceFFlags};
    use std::os::fd::AsFd;
    while left > 0 {
        let mut off = offset as libc::loff_t;
        let chunk = usize::try_from(left).unwrap_or(usize::MAX).min(1 << 30);
        match splice(from.as_fd(), None, file.as_fd(), Some(&mut off), chunk, SpliceFFlags::SPLICE_F_MOVE) {
            Ok(0) => return Err(DecodeError::Truncated { part: "bulk", needed: len, got: len - left }),
            Ok(n) => {
                offset += n as u64;
                left -= n as u64;
            }
            Err(Errno::EINTR) => {}
            Err(Errno::EINVAL | Errno::ENOSYS) => break, // not spliceable: the caller copies
            Err(e) => return Err(DecodeError::Io(e.into())),
        }
    }
    Ok((offset, left))
}

/// Bytes in memory (tests, fuzzing): through the buffer.
impl BulkSource for &[u8] {
    fn copy_to_file(&mut self, file: &File, offset: u64, len: u64) -> Result<(), DecodeError> {
        copy_through_buffer(self, file, offset, len)
    }
}

/// Copies `len` bytes from the stream into `file` at `offset`, through a
/// small buffer: memory stays bounded however large the array.
fn copy_through_buffer<R: Read + ?Sized>(
    r: &mut R,
    file: &File,
    mut offset: u64,
    mut len: u64,
) -> Result<(), DecodeError> {
    use std::os::unix::fs::FileExt;
    if len == 0 {
        return Ok(());
    }
    let mut buf = vec![0u8; len.min(1 << 20) as usize];
    while len > 0 {
        let n = len.min(buf.len() as u64) as usize;
        crate::protocol::read_part(r, &mut buf[..n], "bulk")?;
        file.write_all_at(&buf[..n], offset)?;
        offset += n as u64;
        len -= n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `BulkSource` on a buffered pipe: the bytes already buffered and the
    /// ones still in the pipe (spliced) land in order at the offset, and the
    /// stream goes on after them; from a regular file (which cannot be
    /// spliced from) the same through the buffer.
    #[test]
    fn bulk_lands_in_a_file_from_a_pipe_and_from_a_file() {
        use std::io::{BufReader, Write};
        use std::os::unix::fs::FileExt;
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let check = |mut r: BufReader<File>| {
            let mut head = [0u8; 3];
            r.read_exact(&mut head).unwrap(); // fills the buffer past the head
            assert_eq!(head, data[..3]);
            let out = tempfile::tempfile().unwrap();
            let len = 250_000u64;
            r.copy_to_file(&out, 100, len).unwrap();
            let mut landed = vec![0u8; len as usize];
            out.read_exact_at(&mut landed, 100).unwrap();
            assert!(landed == data[3..3 + len as usize], "the landed bytes differ");
            let mut rest = Vec::new();
            r.read_to_end(&mut rest).unwrap();
            assert!(rest == data[3 + len as usize..], "the stream did not resume after the array");
        };
        let (rx, tx) = nix::unistd::pipe().unwrap();
        let writer = {
            let data = data.clone();
            std::thread::spawn(move || File::from(tx).write_all(&data).unwrap())
        };
        check(BufReader::with_capacity(4096, File::from(rx)));
        writer.join().unwrap();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&data).unwrap();
        std::io::Seek::rewind(&mut file).unwrap();
        check(BufReader::with_capacity(4096, file));
    }
}
