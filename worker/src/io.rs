//! I/O helpers shared by the wire protocol, the `.npy` store and the serve
//! loop: vectored writes that finish, and the descriptor a worker writes its
//! frames to. A leaf: it imports nothing of this crate.

use std::io::{self, IoSlice, Write};
use std::sync::atomic::{AtomicI32, Ordering};

/// Writes every byte of `bufs` with as few vectored writes as the writer
/// allows (`Write::write_all_vectored` is not stable yet).
pub fn write_all_vectored<W: Write + ?Sized>(w: &mut W, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "the peer stopped reading")),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The descriptor the worker writes frames to, once it serves (-1 before).
/// Only the misbehaving test tasks use it, to write garbage into the stream.
static PROTOCOL_OUTPUT_FD: AtomicI32 = AtomicI32::new(-1);

/// Records `fd` as the descriptor the worker writes frames to (the serve
/// loop does, once it has moved the protocol off fd 1).
pub(crate) fn set_protocol_output_fd(fd: i32) {
    PROTOCOL_OUTPUT_FD.store(fd, Ordering::Relaxed);
}

/// The descriptor the worker writes frames to, once it serves (-1 before).
#[doc(hidden)]
pub fn protocol_output_fd() -> i32 {
    PROTOCOL_OUTPUT_FD.load(Ordering::Relaxed)
}
