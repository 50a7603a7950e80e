//! The pool secret: how a worker knows that the frames it reads come from
//! the coordinator that started it.
//!
//! Each pool draws 32 random bytes ([`PoolSecret::generate`]) and hands
//! them to every worker it starts, out of band: a spawned worker inherits
//! the read end of a pipe that holds them, named by the environment
//! variable [`SECRET_FD_ENV`] (a descriptor number, not the secret), reads
//! them once at start ([`PoolSecret::take_inherited`]) and closes it; a
//! forked worker has them in memory. The coordinator's `Hello` carries the
//! secret, and the worker refuses a handshake that does not
//! (`Reply::Refused`, exit 3).
//!
//! Why a descriptor and not the environment: a variable stays readable in
//! `/proc/PID/environ` for the life of the worker and is inherited by every
//! process a task starts; a pipe read once and closed leaves nothing
//! behind. Never the command line, which every user can read.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use serde::{Deserialize, Serialize};

/// The environment variable that names the descriptor a worker reads its
/// pool secret from (exactly [`SECRET_LEN`] bytes). A launcher other than
/// procjob's own pool sets it too; a worker started without it refuses
/// every handshake.
pub const SECRET_FD_ENV: &str = "PROCJOB_SECRET_FD";
/// Bytes in a pool secret.
pub const SECRET_LEN: usize = 32;

/// A per-pool secret that a worker's handshake must carry. Its `Debug`
/// does not show the bytes.
#[derive(Clone, Serialize, Deserialize)]
pub struct PoolSecret([u8; SECRET_LEN]);

impl std::fmt::Debug for PoolSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PoolSecret(..)")
    }
}

impl PartialEq for PoolSecret {
    /// Compares every byte whatever the first difference, so the time taken
    /// tells nothing about where the secrets differ.
    fn eq(&self, other: &PoolSecret) -> bool {
        self.0.iter().zip(&other.0).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

impl Eq for PoolSecret {}

/// Why a worker has no secret to check a handshake against.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    /// The launcher set no [`SECRET_FD_ENV`].
    #[error("it was started without {SECRET_FD_ENV}")]
    NotGiven,
    /// The variable does not name a usable descriptor.
    #[error("{SECRET_FD_ENV}={value} does not name an inherited pipe or file ({reason})")]
    BadDescriptor {
        /// The variable's value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Reading the secret failed.
    #[error("cannot read {SECRET_LEN} bytes of pool secret from descriptor {fd}: {source}")]
    Read {
        /// The descriptor.
        fd: i32,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl PoolSecret {
    /// A fresh secret from the kernel's random number generator.
    pub fn generate() -> io::Result<PoolSecret> {
        let mut bytes = [0u8; SECRET_LEN];
        fill_random(&mut bytes)?;
        Ok(PoolSecret(bytes))
    }

    /// A secret with the given bytes (tests, and launchers that make their
    /// own).
    pub fn from_bytes(bytes: [u8; SECRET_LEN]) -> PoolSecret {
        PoolSecret(bytes)
    }

    /// The secret's bytes, to hand to a worker.
    pub fn as_bytes(&self) -> &[u8; SECRET_LEN] {
        &self.0
    }

    /// A pipe that holds this secret, its write end closed: a child that
    /// inherits the returned read end (and is told its number in
    /// [`SECRET_FD_ENV`]) reads the secret and then end of file. The read
    /// end is close-on-exec, so no other child inherits it; the caller
    /// clears the flag in its child between fork and exec.
    pub fn pipe_for_child(&self) -> io::Result<OwnedFd> {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        // A pipe holds at least 4 KiB: this write never blocks.
        io::Write::write_all(&mut std::fs::File::from(write), &self.0)?;
        Ok(read)
    }

    /// Hands this secret to the child `cmd` will start, as a pool does: the
    /// read end of a [`pipe_for_child`](PoolSecret::pipe_for_child), named
    /// in [`SECRET_FD_ENV`] and kept open across `exec` in the child only.
    /// Keep the returned descriptor until the child is spawned, then drop
    /// it. For launchers of `procjob-worker` and tests.
    pub fn hand_to(&self, cmd: &mut std::process::Command) -> io::Result<OwnedFd> {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let pipe = self.pipe_for_child()?;
        let fd = pipe.as_raw_fd();
        cmd.env(SECRET_FD_ENV, fd.to_string());
        // SAFETY: fcntl is async-signal-safe; between fork and exec it only
        // clears close-on-exec on the secret's pipe, in the child.
        unsafe {
            cmd.pre_exec(move || match libc::fcntl(fd, libc::F_SETFD, 0) {
                0 => Ok(()),
                _ => Err(io::Error::last_os_error()),
            });
        }
        Ok(pipe)
    }

    /// Reads the secret a launcher handed this process (see
    /// [`SECRET_FD_ENV`]) and closes its descriptor. Call once, at start,
    /// before anything else opens descriptors.
    pub fn take_inherited() -> Result<PoolSecret, SecretError> {
        let value = std::env::var(SECRET_FD_ENV).map_err(|_| SecretError::NotGiven)?;
        let bad = |reason: &str| SecretError::BadDescriptor { value: value.clone(), reason: reason.into() };
        let fd: i32 = value.trim().parse().map_err(|_| bad("not a descriptor number"))?;
        if fd <= 2 {
            return Err(bad("standard input, output and error carry other things"));
        }
        let st = nix::sys::stat::fstat(
            // SAFETY: only inspects the descriptor; nothing is taken over yet.
            unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
        )
        .map_err(|e| bad(&format!("it is not open: {e}")))?;
        let kind = st.st_mode & libc::S_IFMT;
        if kind != libc::S_IFIFO && kind != libc::S_IFREG {
            return Err(bad("it is neither a pipe nor a regular file"));
        }
        // SAFETY: the launcher handed this descriptor to this process for
        // the secret alone (that is what the variable says), it is open
        // (fstat above), and nothing else in the process owns it: it is
        // taken once, at start, and closed when `file` drops.
        let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut bytes = [0u8; SECRET_LEN];
        file.read_exact(&mut bytes).map_err(|source| SecretError::Read { fd: file.as_raw_fd(), source })?;
        Ok(PoolSecret(bytes))
    }
}

/// Fills `buf` from the kernel's random number generator.
fn fill_random(buf: &mut [u8]) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let mut filled = 0;
        while filled < buf.len() {
            let rest = &mut buf[filled..];
            // SAFETY: writes at most `rest.len()` bytes into `rest`.
            let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            filled += n as usize;
        }
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    {
        std::fs::File::open("/dev/urandom")?.read_exact(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_fresh_and_compare_by_value() {
        let (a, b) = (PoolSecret::generate().unwrap(), PoolSecret::generate().unwrap());
        assert_ne!(a, b);
        assert_eq!(a, a.clone());
        let mut flipped = *a.as_bytes();
        flipped[31] ^= 1;
        assert_ne!(a, PoolSecret::from_bytes(flipped));
        assert_eq!(format!("{a:?}"), "PoolSecret(..)");
    }

    #[test]
    fn a_secret_travels_through_its_pipe() {
        let secret = PoolSecret::generate().unwrap();
        let mut read = std::fs::File::from(secret.pipe_for_child().unwrap());
        let mut got = Vec::new();
        read.read_to_end(&mut got).unwrap();
        assert_eq!(got, secret.as_bytes());
    }
}
