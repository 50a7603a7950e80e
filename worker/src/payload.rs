//! [`Payload`]: the encoded bytes of one task's input or output.
//!
//! Most tasks' inputs and outputs encode to a few bytes (an index, a seed, a
//! count); arrays travel beside them as raw bulk bytes. A `Vec<u8>` for each
//! costs an allocation and a free per task on both sides of the pipe, which
//! shows at a million tasks a second. A `Payload` keeps up to
//! [`Payload::INLINE`] bytes in place and only longer encodings on the heap.
//!
//! On the wire it is exactly what a `Vec<u8>` is to postcard — a varint
//! length, then the bytes — so the protocol did not change with it; it is
//! written with `serialize_bytes` and read with `deserialize_bytes`, one
//! copy, not byte by byte.

use std::cell::Cell;
use std::fmt;
use std::ops::Deref;

use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Encoded bytes, inline when short.
#[derive(Clone, PartialEq, Eq)]
pub struct Payload(Repr);

#[derive(Clone, PartialEq, Eq)]
enum Repr {
    Inline { len: u8, bytes: [u8; Payload::INLINE] },
    Heap(Vec<u8>),
}

impl Payload {
    /// The longest payload kept without a heap allocation.
    pub const INLINE: usize = 30;

    /// A payload holding a copy of `bytes`.
    pub fn from_slice(bytes: &[u8]) -> Payload {
        if bytes.len() <= Payload::INLINE {
            let mut inline = [0; Payload::INLINE];
            inline[..bytes.len()].copy_from_slice(bytes);
            Payload(Repr::Inline { len: bytes.len() as u8, bytes: inline })
        } else {
            Payload(Repr::Heap(bytes.to_vec()))
        }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Repr::Heap(v) => v,
        }
    }

    /// Whether the bytes are on the heap (longer than [`Payload::INLINE`]).
    pub fn is_heap(&self) -> bool {
        matches!(self.0, Repr::Heap(_))
    }
}

impl From<Vec<u8>> for Payload {
    fn from(v: Vec<u8>) -> Payload {
        if v.len() <= Payload::INLINE {
            Payload::from_slice(&v)
        } else {
            Payload(Repr::Heap(v))
        }
    }
}

impl Default for Payload {
    fn default() -> Payload {
        Payload::from_slice(&[])
    }
}

impl Deref for Payload {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.as_slice().fmt(f)
    }
}

impl Serialize for Payload {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.as_slice())
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Payload, D::Error> {
        deserializer.deserialize_bytes(PayloadVisitor)
    }
}

struct PayloadVisitor;

impl<'de> Visitor<'de> for PayloadVisitor {
    type Value = Payload;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("encoded bytes")
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Payload, E> {
        Ok(Payload::from_slice(v))
    }

    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Payload, E> {
        Ok(Payload::from(v))
    }

    // Formats that write bytes as a sequence of numbers.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Payload, A::Error> {
        let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(b) = seq.next_element::<u8>()? {
            v.push(b);
        }
        Ok(Payload::from(v))
    }
}

/// Appends the postcard encoding of `value` to `buf`.
pub fn encode_into<T: Serialize + ?Sized>(value: &T, buf: &mut Vec<u8>) -> postcard::Result<()> {
    postcard::serialize_with_flavor::<T, _, _>(value, Appender(buf))
}

/// Runs `f` with this thread's encoding buffer, empty, and keeps the buffer
/// for the next call unless it grew past 4 MiB. Messages are
/// encoded into it instead of into a fresh `Vec` each (which also grows by
/// reallocating). A nested call gets a buffer of its own.
pub fn with_scratch<R>(f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    let mut buf = SCRATCH.take();
    buf.clear();
    let result = f(&mut buf);
    if buf.capacity() <= SCRATCH_KEEP {
        SCRATCH.set(buf);
    }
    result
}

thread_local! {
    /// [`with_scratch`]'s buffer.
    static SCRATCH: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// The largest encoding buffer kept between calls (a huge message gives
/// its memory back).
const SCRATCH_KEEP: usize = 4 << 20;

/// A postcard flavor appending to a borrowed `Vec`.
struct Appender<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for Appender<'_> {
    type Output = ();

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wire form is a `Vec<u8>`'s, both ways, at every length around
    /// the inline limit and at varint length boundaries.
    #[test]
    fn encodes_exactly_like_a_vec_of_bytes() {
        for len in [0, 1, 29, 30, 31, 127, 128, 300] {
            let v: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let p = Payload::from_slice(&v);
            assert_eq!(p.as_slice(), &v[..]);
            assert_eq!(p.is_heap(), len > Payload::INLINE, "{len}");
            let as_vec = postcard::to_stdvec(&v).unwrap();
            assert_eq!(postcard::to_stdvec(&p).unwrap(), as_vec, "{len}");
            let back: Payload = postcard::from_bytes(&as_vec).unwrap();
            assert_eq!(back, p);
            let vec_back: Vec<u8> = postcard::from_bytes(&postcard::to_stdvec(&p).unwrap()).unwrap();
            assert_eq!(vec_back, v);
            assert_eq!(Payload::from(v.clone()), p);
        }
    }

    #[test]
    fn encode_into_appends_the_postcard_bytes() {
        let value = (7u64, String::from("matmul"), vec![1.5f64; 3]);
        let mut buf = vec![9];
        encode_into(&value, &mut buf).unwrap();
        assert_eq!(buf[0], 9);
        assert_eq!(&buf[1..], postcard::to_stdvec(&value).unwrap());
        let nested = with_scratch(|outer| {
            encode_into(&1u8, outer).unwrap();
            let inner = with_scratch(|inner| {
                assert!(inner.is_empty());
                encode_into(&2u8, inner).unwrap();
                inner.clone()
            });
            (outer.clone(), inner)
        });
        assert_eq!(nested, (vec![1], vec![2]));
        assert!(with_scratch(|b| b.is_empty()));
    }

    #[test]
    fn truncated_bytes_are_an_error() {
        let wire = postcard::to_stdvec(&Payload::from_slice(&[1, 2, 3, 4])).unwrap();
        assert!(postcard::from_bytes::<Payload>(&wire[..3]).is_err());
    }
}
