//! Entry descriptors: how a frame names the code of a task, and how a
//! worker proves that the name denotes a task entry before it calls
//! anything.
//!
//! Every [`Task`] type `T` has one [`EntryDesc`], a constant that rustc
//! promotes to a static of its own for each monomorphisation (`&<T as
//! EntryOf>::DESC`): a 16-byte magic, `T::name` and the erased entry point
//! [`entry::<T>`](crate::task::entry). A link-time table of them cannot be
//! built (there are no generic statics, so `linkme`/`inventory` cannot
//! collect them), but none is needed: a coordinator that is the worker's
//! own executable names a task by the offset of its descriptor from the
//! image's load address ([`offset_of()`]), and the worker ([`resolve`])
//! accepts the offset only if
//!
//! 1. `[address, address + size_of::<EntryDesc>())` lies inside memory the
//!    image keeps read-only for the life of the process (a `PT_LOAD`
//!    segment without write permission, or the `PT_GNU_RELRO` range, where
//!    rustc puts constants holding function pointers in a
//!    position-independent executable); this comes first, so none of the
//!    reads below can fault, and nothing a frame wrote can be there;
//! 2. the address is aligned for an `EntryDesc`;
//! 3. the bytes there are the magic;
//! 4. both function pointers after it lie in the image's executable
//!    segments;
//! 5. the descriptor's name is the batch's kind name.
//!
//! Only then is `run` called. The magic's only copies in the image are the
//! descriptors: the checker rebuilds it at run time from two halves kept
//! apart ([`std::hint::black_box`]), so no literal copy of it is emitted
//! for the comparison (a unit test scans the image to confirm). An offset
//! that fails any check is refused with [`NotAnEntry`], never called.

use std::mem::{align_of, offset_of, size_of};

use crate::image::Image;
use crate::task::{entry, ErasedEntry, Task};

/// One task type's entry, as it lies in the executable's read-only memory.
#[repr(C)]
pub struct EntryDesc {
    magic: [u8; 16],
    name: fn() -> &'static str,
    run: ErasedEntry,
}

impl std::fmt::Debug for EntryDesc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EntryDesc").field("name", &(self.name)()).finish_non_exhaustive()
    }
}

impl EntryDesc {
    /// The task's name ([`Task::name`]).
    pub fn name(&self) -> &'static str {
        (self.name)()
    }

    /// The task's erased entry point.
    pub fn run(&self) -> ErasedEntry {
        self.run
    }
}

/// The two halves of the magic; a descriptor holds their XOR.
const MAGIC_LEFT: [u8; 16] = *b"procjob entry v6";
const MAGIC_RIGHT: [u8; 16] =
    [0x3c, 0xa7, 0x51, 0xe9, 0x08, 0x6d, 0xf2, 0x94, 0xb3, 0x1e, 0xc5, 0x7a, 0x20, 0xd8, 0x4f, 0x66];

const fn xor(a: [u8; 16], b: [u8; 16]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        out[i] = a[i] ^ b[i];
        i += 1;
    }
    out
}

/// The magic, built at run time so that the comparison does not put a
/// literal copy of it in the image.
fn magic() -> [u8; 16] {
    xor(std::hint::black_box(MAGIC_LEFT), std::hint::black_box(MAGIC_RIGHT))
}

/// Gives every task type its descriptor; implemented for all of them.
trait EntryOf {
    const DESC: EntryDesc;
}

impl<T: Task> EntryOf for T {
    const DESC: EntryDesc = EntryDesc { magic: xor(MAGIC_LEFT, MAGIC_RIGHT), name: T::name, run: entry::<T> };
}

/// Task `T`'s descriptor: one static per task type.
pub fn descriptor<T: Task>() -> &'static EntryDesc {
    &<T as EntryOf>::DESC
}

/// The offset that names task `T` in this executable: its descriptor's
/// address minus the image's load address. `None` where the image is
/// unknown (see [`crate::image`]), so that tasks go by name.
pub fn offset_of<T: Task>() -> Option<i64> {
    let image = Image::current();
    if image.read_only.is_empty() {
        return None;
    }
    Some((descriptor::<T>() as *const EntryDesc as usize).wrapping_sub(image.base) as i64)
}

/// Why an offset was refused: it does not name a task entry of this
/// executable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NotAnEntry {
    /// The image's memory is unknown on this platform.
    #[error("this platform does not tell where the executable lies in memory")]
    NoImage,
    /// The descriptor would not lie inside the image's read-only memory.
    #[error("offset {offset} is outside the executable's read-only memory")]
    Outside {
        /// The offset.
        offset: i64,
    },
    /// The address is not aligned for a descriptor.
    #[error("offset {offset} is not aligned for an entry descriptor")]
    Misaligned {
        /// The offset.
        offset: i64,
    },
    /// No descriptor there.
    #[error("offset {offset} holds no entry descriptor")]
    NoDescriptor {
        /// The offset.
        offset: i64,
    },
    /// A descriptor of another task.
    #[error("the entry at offset {offset} is '{found}', not '{expected}'")]
    OtherKind {
        /// The offset.
        offset: i64,
        /// The batch's kind name.
        expected: String,
        /// The descriptor's name.
        found: &'static str,
    },
}

/// Finds the entry of the task `name` from the offset of its descriptor,
/// after the checks of the module documentation; a refused offset is never
/// called.
pub fn resolve(offset: i64, name: &str) -> Result<ErasedEntry, NotAnEntry> {
    let image = Image::current();
    if image.read_only.is_empty() {
        return Err(NotAnEntry::NoImage);
    }
    let addr = image.base.wrapping_add(offset as usize);
    if !image.is_read_only(addr, size_of::<EntryDesc>()) {
        return Err(NotAnEntry::Outside { offset });
    }
    if !addr.is_multiple_of(align_of::<EntryDesc>()) {
        return Err(NotAnEntry::Misaligned { offset });
    }
    let at = addr as *const u8;
    // SAFETY: the whole descriptor range lies in a readable segment of the
    // image, mapped for the life of the process (checked first), and any
    // bytes are a valid `[u8; 16]`.
    let found: [u8; 16] = unsafe { at.cast::<[u8; 16]>().read() };
    if found != magic() {
        return Err(NotAnEntry::NoDescriptor { offset });
    }
    // SAFETY: as above, and the address is aligned for `EntryDesc`, so its
    // fields are aligned too; an `Option` of a function pointer is valid for
    // every bit pattern (null is `None`). Nothing is called here.
    let (name_fn, run) = unsafe {
        (
            at.add(offset_of!(EntryDesc, name)).cast::<Option<fn() -> &'static str>>().read(),
            at.add(offset_of!(EntryDesc, run)).cast::<Option<ErasedEntry>>().read(),
        )
    };
    let (Some(name_fn), Some(run)) = (name_fn, run) else { return Err(NotAnEntry::NoDescriptor { offset }) };
    if !image.is_executable(name_fn as usize) || !image.is_executable(run as usize) {
        return Err(NotAnEntry::NoDescriptor { offset });
    }
    // A genuine descriptor: its name function is a `Task::name`.
    let found = name_fn();
    if found != name {
        return Err(NotAnEntry::OtherKind { offset, expected: name.to_string(), found });
    }
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::matmul::{Dot, MatmulBlock};

    #[test]
    fn a_descriptor_offset_resolves_to_its_entry() {
        let offset = offset_of::<Dot>().expect("the image is known on this platform");
        let run = resolve(offset, "dot").unwrap();
        assert_eq!(run as usize, descriptor::<Dot>().run() as usize);
        assert_ne!(offset_of::<Dot>(), offset_of::<MatmulBlock>());
    }

    #[test]
    fn anything_but_a_descriptor_of_the_named_kind_is_refused() {
        let offset = offset_of::<Dot>().unwrap();
        let code = (entry::<Dot> as ErasedEntry as usize).wrapping_sub(Image::current().base) as i64;
        let abort = (libc::abort as unsafe extern "C" fn() -> ! as usize).wrapping_sub(Image::current().base) as i64;
        for bad in [0x4141_4141, 1, i64::MIN, i64::MAX, -1, code, abort] {
            let err = resolve(bad, "dot").unwrap_err();
            assert!(
                matches!(
                    err,
                    NotAnEntry::Outside { .. } | NotAnEntry::Misaligned { .. } | NotAnEntry::NoDescriptor { .. }
                ),
                "offset {bad}: {err:?}"
            );
        }
        assert_eq!(resolve(offset + 1, "dot").unwrap_err(), NotAnEntry::Misaligned { offset: offset + 1 });
        assert_eq!(resolve(offset + 8, "dot").unwrap_err(), NotAnEntry::NoDescriptor { offset: offset + 8 });
        let err = resolve(offset, "matmul").unwrap_err();
        assert_eq!(err, NotAnEntry::OtherKind { offset, expected: "matmul".into(), found: "dot" });
    }

    /// The magic's only copies in the memory the resolver accepts are
    /// descriptors: no literal of it was emitted for the comparison, so an
    /// offset can reach nothing else that carries it.
    #[test]
    fn every_copy_of_the_magic_in_read_only_memory_is_a_descriptor() {
        // Make sure at least these two descriptors are in the image.
        let known =
            [descriptor::<Dot>() as *const EntryDesc as usize, descriptor::<MatmulBlock>() as *const _ as usize];
        let image = Image::current();
        let magic = magic();
        let mut found = Vec::new();
        for range in &image.read_only {
            // SAFETY: a read-only range of the image is mapped and readable
            // for the life of the process.
            let bytes = unsafe { std::slice::from_raw_parts(range.start as *const u8, range.end - range.start) };
            found.extend(bytes.windows(16).enumerate().filter(|(_, w)| *w == magic).map(|(i, _)| range.start + i));
        }
        found.sort_unstable();
        found.dedup();
        for k in known {
            assert!(found.contains(&k), "descriptor at {k:#x} not found by the scan");
        }
        for addr in found {
            let offset = addr.wrapping_sub(image.base) as i64;
            let name = match resolve(offset, "") {
                Err(NotAnEntry::OtherKind { found, .. }) => found,
                other => panic!("a copy of the magic at {addr:#x} is not a descriptor: {other:?}"),
            };
            assert!(resolve(offset, name).is_ok());
        }
    }
}
