//! Where this executable's image lies in memory: the load address and the
//! address ranges of its loaded segments, read once from the program
//! headers the dynamic loader reports (`dl_iterate_phdr`).
//!
//! [`crate::entry`] uses it to prove, before it reads a byte, that an
//! address a frame names lies inside memory the image maps read-only for
//! the whole life of the process. Platform code: on systems without
//! `dl_iterate_phdr` (and, for now, on 32-bit
//! Linux) the image is unknown and no address is ever accepted.

use std::ops::Range;
use std::sync::OnceLock;

/// The image (executable or shared object) that holds this crate's code.
#[derive(Debug, Clone, Default)]
pub struct Image {
    /// The load address (`dlpi_addr`): virtual addresses in the file's
    /// program headers plus this are addresses in memory.
    pub base: usize,
    /// Readable ranges that stay read-only for the life of the process: the
    /// `PT_LOAD` segments without write permission, and the `PT_GNU_RELRO`
    /// range (made read-only by the loader once relocations are applied;
    /// constants that hold pointers, such as entry descriptors, live there
    /// in a position-independent executable).
    pub read_only: Vec<Range<usize>>,
    /// Ranges of executable `PT_LOAD` segments.
    pub executable: Vec<Range<usize>>,
}

impl Image {
    /// The image holding this crate, found once per process.
    pub fn current() -> &'static Image {
        static IMAGE: OnceLock<Image> = OnceLock::new();
        IMAGE.get_or_init(find)
    }

    /// Whether `[addr, addr + len)` lies entirely inside one read-only range.
    pub fn is_read_only(&self, addr: usize, len: usize) -> bool {
        contains(&self.read_only, addr, len)
    }

    /// Whether `addr` lies inside an executable segment.
    pub fn is_executable(&self, addr: usize) -> bool {
        contains(&self.executable, addr, 1)
    }
}

fn contains(ranges: &[Range<usize>], addr: usize, len: usize) -> bool {
    addr.checked_add(len).is_some_and(|end| ranges.iter().any(|r| r.start <= addr && end <= r.end))
}

#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
fn find() -> Image {
    /// What the callback looks for and what it found.
    struct Search {
        /// An address inside the wanted image: a function of this module.
        probe: usize,
        found: Option<Image>,
    }

    unsafe extern "C" fn visit(info: *mut libc::dl_phdr_info, _size: libc::size_t, data: *mut libc::c_void) -> i32 {
        // SAFETY: `data` is the `&mut Search` passed to dl_iterate_phdr below,
        // alive for the whole iteration; `info` points to a valid record for
        // the duration of this call, whose `dlpi_phdr` array holds
        // `dlpi_phnum` program headers (dl_iterate_phdr's contract).
        let (search, info) = unsafe { (&mut *data.cast::<Search>(), &*info) };
        let phdrs: &[libc::Elf64_Phdr] = if info.dlpi_phdr.is_null() {
            &[]
        } else {
            // SAFETY: as above: `dlpi_phnum` headers at `dlpi_phdr`.
            unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) }
        };
        let base = info.dlpi_addr as usize;
        let range = |p: &libc::Elf64_Phdr| {
            let start = base.wrapping_add(p.p_vaddr as usize);
            start..start.saturating_add(p.p_memsz as usize)
        };
        let mut image = Image { base, ..Image::default() };
        let mut holds_probe = false;
        for p in phdrs {
            let r = range(p);
            match p.p_type {
                libc::PT_LOAD => {
                    holds_probe |= r.contains(&search.probe);
                    if p.p_flags & libc::PF_R != 0 && p.p_flags & libc::PF_W == 0 {
                        image.read_only.push(r.clone());
                    }
                    if p.p_flags & libc::PF_X != 0 {
                        image.executable.push(r);
                    }
                }
                libc::PT_GNU_RELRO => image.read_only.push(r),
                _ => {}
            }
        }
        if holds_probe {
            search.found = Some(image);
            return 1; // stop iterating
        }
        0
    }

    let mut search = Search { probe: find as fn() -> Image as usize, found: None };
    // SAFETY: `visit` matches the callback type, and `search` outlives the
    // call, which invokes `visit` synchronously only.
    unsafe { libc::dl_iterate_phdr(Some(visit), (&mut search as *mut Search).cast()) };
    search.found.unwrap_or_default()
}

#[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
fn find() -> Image {
    Image::default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_holds_this_code_and_its_constants() {
        let image = Image::current();
        assert!(image.is_executable(find as fn() -> Image as usize));
        static CONSTANT: [u8; 4] = *b"abcd";
        assert!(image.is_read_only(CONSTANT.as_ptr() as usize, 4));
        let heap = Box::new(0u64);
        assert!(!image.is_read_only(&*heap as *const u64 as usize, 8));
        assert!(!image.is_read_only(usize::MAX - 2, 8), "an overflowing range is outside");
    }
}
