//! The handshake that opens a conversation: the coordinator's `Hello` must
//! speak our protocol version and carry the secret of the pool that started
//! this worker; the worker answers `Ready` (or `Refused`, and stops).

use std::io::{BufReader, BufWriter, Read, Write};

use super::session::ServeError;
use crate::protocol::{self, DecodeError, FrameKind, Hello, Ready, Reply, Request, PROTOCOL_VERSION};
use crate::secret::{PoolSecret, SecretError};

/// Reads the coordinator's `Hello` and answers it: `Ready` when it speaks
/// our version and carries `secret`, else `Refused` and an error. Returns
/// the `Hello` and whether the coordinator is this same executable, or
/// `None` when the input closed before a frame.
pub(super) fn accept<R: Read, W: Write>(
    input: &mut BufReader<R>,
    output: &mut BufWriter<W>,
    secret: &Result<PoolSecret, SecretError>,
) -> Result<Option<(Hello, bool)>, ServeError> {
    let hello = match protocol::recv::<_, Request>(input, FrameKind::Request) {
        Ok(f) => f,
        Err(DecodeError::Closed) => return Ok(None),
        Err(e @ DecodeError::VersionMismatch { .. }) => {
            // Answer in our own version: the coordinator's reader then
            // reports the mismatch itself, with both versions.
            let _ = protocol::send(output, FrameKind::Reply, &Reply::Refused { reason: e.to_string() }, &[]);
            return Err(e.into());
        }
        Err(e) => return Err(e.into()),
    };
    let Request::Hello(hello) = hello.message else { return Err(ServeError::NoHello) };
    if hello.protocol != PROTOCOL_VERSION {
        let reason =
            format!("protocol version mismatch: coordinator speaks {}, worker {PROTOCOL_VERSION}", hello.protocol);
        protocol::send(output, FrameKind::Reply, &Reply::Refused { reason: reason.clone() }, &[])?;
        return Err(ServeError::Refused(reason));
    }
    if let Err(reason) = check_secret(secret, &hello.secret) {
        protocol::send(output, FrameKind::Reply, &Reply::Refused { reason: reason.clone() }, &[])?;
        return Err(ServeError::Refused(reason));
    }
    let same_binary = hello.binary.is_current();
    let ready = Ready {
        protocol: PROTOCOL_VERSION,
        pid: std::process::id(),
        same_binary,
        memory: crate::memory::snapshot(),
        lend_probe: crate::array::lend_probe_address(),
    };
    protocol::send(output, FrameKind::Reply, &Reply::Ready(ready), &[])?;
    Ok(Some((hello, same_binary)))
}

/// Whether a handshake's secret is the one this worker was started with;
/// if not, the reason for the refusal. Only the coordinator that started
/// the worker knows it, so this is the proof that the stream is its.
fn check_secret(expected: &Result<PoolSecret, SecretError>, carried: &PoolSecret) -> Result<(), String> {
    match expected {
        Ok(secret) if secret == carried => Ok(()),
        Ok(_) => Err("the handshake does not carry the secret of the pool that started this worker; \
                      a worker accepts frames only from the coordinator that started it"
            .into()),
        Err(e) => Err(format!(
            "this worker has no pool secret to check the handshake against: {e}; a launcher hands it \
             {} bytes through an inherited descriptor named in {} (see docs/protocol.md)",
            crate::secret::SECRET_LEN,
            crate::secret::SECRET_FD_ENV
        )),
    }
}
