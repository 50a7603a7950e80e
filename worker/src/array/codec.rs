//! Encoding: arrays become references while a value is serialized. Serde
//! sees an [`Array`] only through a scoped encoder or decoder installed by
//! [`encode_with`] / [`decode_with`]; serializing one anywhere else is an
//! error rather than a silent copy.

use std::cell::Cell;
use std::ptr::NonNull;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::Array;
use crate::payload::Payload;
use crate::protocol::ArrayRef;

/// Decides how each array inside a value travels.
pub trait ArrayEncoder {
    /// Returns the reference under which `array` travels. An
    /// [`ArrayRef::Inline`] means the array's bytes go into the bulk; the
    /// encoder must remember the array to send them.
    fn encode(&mut self, array: &Array) -> Result<ArrayRef, String>;
}

/// The default encoding: owned arrays inline, mapped arrays as file
/// references. It keeps the inline arrays, in order, to send as bulk.
#[derive(Debug, Default)]
pub struct InlineEncoder {
    /// The references, in encoding order.
    pub refs: Vec<ArrayRef>,
    /// The arrays whose bytes go inline, in order.
    pub inline: Vec<Array>,
}

/// The reference a mapped array travels as, or `None` for an owned one.
pub fn file_ref(array: &Array) -> Option<ArrayRef> {
    let (path, offset, access) = array.file_location()?;
    Some(ArrayRef::File {
        dtype: array.dtype(),
        shape: array.shape().iter().map(|&d| d as u64).collect(),
        path: path.to_path_buf(),
        offset,
        access,
    })
}

/// The inline reference for an array.
pub fn inline_ref(array: &Array) -> ArrayRef {
    ArrayRef::Inline { dtype: array.dtype(), shape: array.shape().iter().map(|&d| d as u64).collect() }
}

impl ArrayEncoder for InlineEncoder {
    fn encode(&mut self, array: &Array) -> Result<ArrayRef, String> {
        Ok(match file_ref(array) {
            Some(r) => r,
            None => {
                self.inline.push(array.clone());
                inline_ref(array)
            }
        })
    }
}

thread_local! {
    static ENCODER: Cell<Option<NonNull<Collect<'static>>>> = const { Cell::new(None) };
    static DECODER: Cell<Option<NonNull<[Option<Array>]>>> = const { Cell::new(None) };
}

/// Why a value could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CodecError(pub String);

/// Restores a thread-local slot when dropped, also on unwinding.
struct Restore<T: 'static + Copy> {
    key: &'static std::thread::LocalKey<Cell<T>>,
    previous: T,
}

impl<T: Copy + 'static> Drop for Restore<T> {
    fn drop(&mut self) {
        let previous = self.previous;
        self.key.with(|c| c.set(previous));
    }
}

/// The encoder installed while a value is serialized, with the references
/// handed out so far (an array's index is its position here).
struct Collect<'a> {
    inner: &'a mut dyn ArrayEncoder,
    refs: Vec<ArrayRef>,
}

/// Serializes `value` with postcard; each [`Array`] inside it is handed to
/// `encoder` and replaced by the index of its reference. Returns the bytes
/// and the references.
///
/// The bytes are written into a buffer kept per thread
/// ([`with_scratch`](crate::payload::with_scratch)) and then copied into the
/// [`Payload`], which holds short encodings in place: a task with a small
/// input or output costs no allocation here.
pub fn encode_with<T: Serialize + ?Sized>(
    value: &T,
    encoder: &mut dyn ArrayEncoder,
) -> Result<(Payload, Vec<ArrayRef>), CodecError> {
    crate::payload::with_scratch(|buf| encode_with_buffer(value, encoder, buf))
}

/// [`encode_with`] using `buf` (cleared first) as its buffer: for a caller
/// encoding many values in a row, which keeps its own.
pub fn encode_with_buffer<T: Serialize + ?Sized>(
    value: &T,
    encoder: &mut dyn ArrayEncoder,
    buf: &mut Vec<u8>,
) -> Result<(Payload, Vec<ArrayRef>), CodecError> {
    let mut collect = Collect { inner: encoder, refs: Vec::new() };
    let ptr = NonNull::from(&mut collect).cast::<Collect<'static>>();
    let previous = ENCODER.with(|c| c.replace(Some(ptr)));
    let restore = Restore { key: &ENCODER, previous };
    buf.clear();
    let written = crate::payload::encode_into(value, buf);
    // The slot must be reset before `collect` is used or dropped again.
    drop(restore);
    written.map_err(|e| CodecError(e.to_string()))?;
    Ok((Payload::from_slice(buf), collect.refs))
}

/// Deserializes a postcard value whose arrays are indices into `arrays`.
/// Each array moves into the value (so a writable view stays the only
/// one); an index used twice is an error.
pub fn decode_with<T: DeserializeOwned>(bytes: &[u8], arrays: Vec<Array>) -> Result<T, CodecError> {
    let mut slots: Vec<Option<Array>> = arrays.into_iter().map(Some).collect();
    let ptr = NonNull::from(slots.as_mut_slice());
    let previous = DECODER.with(|c| c.replace(Some(ptr)));
    let restore = Restore { key: &DECODER, previous };
    let value = postcard::from_bytes(bytes).map_err(|e| CodecError(e.to_string()));
    // The slot must be reset before `slots` is dropped.
    drop(restore);
    value
}

impl Serialize for Array {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // Take the slot for the duration of the call so that a re-entrant
        // serialize cannot create a second `&mut` to the same `Collect`.
        let Some(mut ptr) = ENCODER.with(|c| c.take()) else {
            return Err(serde::ser::Error::custom(
                "procjob::Array can only be serialized by procjob (it travels as raw bytes or a file reference)",
            ));
        };
        let _restore = Restore { key: &ENCODER, previous: Some(ptr) };
        // SAFETY: `encode_with` keeps the `Collect` alive, and does not touch
        // it, while the slot holds this pointer; the slot is empty while we
        // hold the `&mut`, so no other reference to it exists.
        let collect = unsafe { ptr.as_mut() };
        let r = collect.inner.encode(self).map_err(serde::ser::Error::custom)?;
        collect.refs.push(r);
        let index = u32::try_from(collect.refs.len() - 1)
            .map_err(|_| serde::ser::Error::custom("more than 2^32 arrays in one value"))?;
        serializer.serialize_u32(index)
    }
}

impl<'de> Deserialize<'de> for Array {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Array, D::Error> {
        let index = u32::deserialize(deserializer)? as usize;
        // Take the slot while we hold a `&mut` to the slice, so a
        // re-entrant deserialize cannot alias it.
        let Some(mut ptr) = DECODER.with(|c| c.take()) else {
            return Err(serde::de::Error::custom("procjob::Array can only be deserialized by procjob"));
        };
        let _restore = Restore { key: &DECODER, previous: Some(ptr) };
        // SAFETY: `decode_with` keeps the slice alive, and does not touch it,
        // while the slot holds this pointer; the slot is empty while we hold
        // the `&mut`, so no other reference to it exists.
        let arrays = unsafe { ptr.as_mut() };
        let len = arrays.len();
        let slot = arrays
            .get_mut(index)
            .ok_or_else(|| serde::de::Error::custom(format!("array index {index} out of range ({len} arrays)")))?;
        slot.take().ok_or_else(|| serde::de::Error::custom(format!("array index {index} used twice")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializing_outside_procjob_is_an_error_not_a_copy() {
        let a = Array::from_vec(vec![2], vec![1.0f32, 2.0]);
        assert!(postcard::to_stdvec(&a).is_err());
    }

    #[test]
    fn values_round_trip_with_arrays_as_references() {
        let a = Array::from_vec(vec![2, 2], vec![1i64, 2, 3, 4]);
        let value = (7u32, a.clone(), vec![a.rows(1..2).unwrap()]);
        let mut enc = InlineEncoder::default();
        let (bytes, refs) = encode_with(&value, &mut enc).unwrap();
        assert_eq!(refs.len(), 2);
        assert!(bytes.len() < 16, "arrays must not be in the payload: {} bytes", bytes.len());
        let back: (u32, Array, Vec<Array>) = decode_with(&bytes, enc.inline.clone()).unwrap();
        assert_eq!(back.0, 7);
        assert_eq!(back.1, a);
        assert_eq!(back.2[0].as_slice::<i64>().unwrap(), &[3, 4]);
    }
}
