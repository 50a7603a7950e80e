//! Results read straight out of a worker's memory: a worker lends a large
//! result by address ([`ArrayRef::Lent`](crate::protocol::ArrayRef::Lent))
//! and its coordinator copies the bytes out with one `process_vm_readv(2)`
//! call into their place in `C` — one copy, with no pipe between, so no
//! wake-up of either side per pipe's worth of bytes and no file lock
//! between two readers landing blocks in one file (docs/protocol.md,
//! "Lent results").

use super::storage::{Owned, Storage};
use super::{Array, ArrayError};
use crate::dtype::DType;

/// Bytes at a known place in every worker: a coordinator that can read them
/// there ([`Lender::can_read`]) may be lent results by that worker.
pub static LEND_PROBE: [u8; 16] = *b"procjob:lend-me!";

/// Where [`LEND_PROBE`] is in this process.
pub fn lend_probe_address() -> u64 {
    std::hint::black_box(LEND_PROBE.as_ptr()) as u64
}

/// Whether this system's policy forbids a process to read its own child's
/// memory: Yama's `ptrace_scope` of 2 (only a privileged tracer) or 3 (no
/// one). Workers then never lend (their coordinator's probe fails), and
/// every result comes through the pipe; tests of lending skip.
pub fn lending_forbidden_here() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .is_some_and(|scope| scope >= 2)
}

/// The process whose memory lent arrays are read from.
#[derive(Debug, Clone, Copy)]
pub struct Lender {
    pid: i32,
}

impl Lender {
    /// The process `pid` (the coordinator's own child: reading another
    /// process's memory needs the right to trace it).
    pub fn new(pid: u32) -> Lender {
        Lender { pid: pid as i32 }
    }

    /// The lender's pid.
    #[cfg(feature = "test-tasks")]
    pub(crate) fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// Whether [`LEND_PROBE`]'s bytes can be read at `address` in the
    /// lender: false when the system forbids reading its memory (another
    /// user, a Yama or seccomp policy, a kernel without the call) or when
    /// `pid` is not the process that sent the address.
    pub fn can_read(&self, address: u64) -> bool {
        let mut seen = [0u8; LEND_PROBE.len()];
        self.read(address, &mut seen).is_ok() && seen == LEND_PROBE
    }

    /// Fills `into` with the bytes at `address` in the lender.
    pub fn read(&self, address: u64, into: &mut [u8]) -> std::io::Result<()> {
        // SAFETY: `into` is borrowed mutably for the call.
        unsafe { self.read_into(address, into.as_mut_ptr(), into.len()) }
    }

    /// Copies the `len` bytes at `address` in the lender to `into`.
    ///
    /// # Safety
    /// `into` must be valid for writes of `len` bytes, and nothing may read
    /// or write them during the call.
    pub(super) unsafe fn read_into(&self, address: u64, into: *mut u8, len: usize) -> std::io::Result<()> {
        #[cfg(target_os = "linux")]
        {
            let mut done = 0usize;
            while done < len {
                let chunk = (len - done).min(1 << 30);
                // SAFETY: `done < len`: within the caller's buffer.
                let local = libc::iovec { iov_base: unsafe { into.add(done) }.cast(), iov_len: chunk };
                let remote = libc::iovec { iov_base: (address as usize + done) as *mut libc::c_void, iov_len: chunk };
                // SAFETY: `local` is within the caller's buffer, valid for
                // writes; the remote range is only read, by the kernel, which
                // checks it.
                let n = unsafe { libc::process_vm_readv(self.pid, &local, 1, &remote, 1, 0) };
                match n {
                    n if n > 0 => done += n as usize,
                    0 => return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "no bytes at the address")),
                    _ => {
                        let e = std::io::Error::last_os_error();
                        if e.kind() != std::io::ErrorKind::Interrupted {
                            return Err(e);
                        }
                    }
                }
            }
            Ok(())
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = (address, into, len);
            Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "reading another process's memory"))
        }
    }

    /// A new array of `dtype` and `shape` holding the `nbytes` bytes lent
    /// at `address` (the caller checked `nbytes` against the shape).
    pub(super) fn read_new(
        &self,
        address: u64,
        dtype: DType,
        shape: Vec<usize>,
        nbytes: usize,
    ) -> Result<Array, std::io::Error> {
        let mut array = Array::try_zeros(dtype, shape)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::OutOfMemory, e.to_string()))?;
        let storage = std::sync::Arc::get_mut(&mut array.storage).expect("a fresh array is unshared");
        let Storage::Owned(owned) = storage else { unreachable!("zeros() is owned") };
        let bytes: &mut [u8] = Owned::bytes_mut(owned);
        debug_assert_eq!(bytes.len(), nbytes);
        self.read(address, bytes)?;
        Ok(array)
    }

    /// Copies the lent bytes into `view` (a region of a read-write map:
    /// what a coordinator lands a result in), whose size the caller checked.
    pub(super) fn read_into_view(&self, address: u64, view: &Array) -> Result<(), std::io::Error> {
        let ptr = view.shared_write_ptr().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, ArrayError::Shape("not a read-write map".into()))
        })?;
        // SAFETY: the view's bytes are in a live read-write shared mapping
        // held by `view`; a landing region is written by its reader alone,
        // and no one reads it until the result has been read.
        unsafe { self.read_into(address, ptr, view.nbytes()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process can read itself: the probe is found at its address, the
    /// bytes of a buffer come back whole, and an address nothing is mapped
    /// at is an error, not a crash.
    #[cfg(target_os = "linux")]
    #[test]
    fn lent_bytes_are_read_and_a_bad_address_is_an_error() {
        let me = Lender::new(std::process::id());
        assert!(me.can_read(lend_probe_address()));
        assert!(!me.can_read(lend_probe_address() + 1), "the probe matched at the wrong address");
        let data: Vec<f64> = (0..100_000).map(|i| i as f64 * 0.5).collect();
        let got = me.read_new(data.as_ptr() as u64, DType::F64, vec![100_000], 800_000).unwrap();
        assert_eq!(got.as_slice::<f64>().unwrap(), &data[..]);
        let err = me.read_new(8, DType::F64, vec![4], 32).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EFAULT), "{err}");
    }
}
