//! Waiting for the next request: until the input is readable or the idle
//! timeout passes, letting go meanwhile of the maps of files deleted or
//! replaced since they were mapped.

use std::fs::File;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use super::map_cache::MapCache;

/// How long a worker holding maps waits for its next request before it
/// first checks them for files deleted or replaced since (see
/// [`wait_for_request`]); it checks again after twice as long each time, up
/// to [`MAX_MAP_CHECK`].
pub(super) const FIRST_MAP_CHECK: Duration = Duration::from_secs(1);
/// The longest wait between two such checks.
const MAX_MAP_CHECK: Duration = Duration::from_secs(64);

/// Waits until `input` is readable (true), or until `idle` has passed
/// without a request (false; with no `idle`, waits for ever). While it
/// waits with maps held, it lets go of those whose files were deleted or
/// replaced — a run's temp files, removed after its last call — so that
/// their pages do not live on in this worker until its next call. It first
/// checks after `first_check` ([`FIRST_MAP_CHECK`]).
pub(super) fn wait_for_request(
    input: &impl AsRawFdMaybe,
    idle: Option<Duration>,
    maps: &mut MapCache,
    first_check: Duration,
) -> bool {
    let start = Instant::now();
    let mut check = first_check;
    loop {
        let left = idle.map(|d| d.saturating_sub(start.elapsed()));
        if !maps.holds_any() {
            return left.is_none_or(|left| input.wait_readable(left));
        }
        if left == Some(Duration::ZERO) {
            return false;
        }
        if input.wait_readable(left.map_or(check, |left| left.min(check))) {
            return true;
        }
        maps.forget_changed();
        check = (check * 2).min(MAX_MAP_CHECK);
    }
}

/// Readers whose readiness can be awaited (for the idle timeout).
pub trait AsRawFdMaybe {
    /// Waits until readable or `timeout` passes; true when readable (or
    /// when readiness cannot be awaited, so the caller just reads).
    fn wait_readable(&self, timeout: Duration) -> bool;
}

impl AsRawFdMaybe for File {
    fn wait_readable(&self, timeout: Duration) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        // Rounded up: a timeout rounded down to 0 ms would return at once,
        // and a caller waiting out a deadline would spin on it.
        let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        let ms = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(self.as_fd(), PollFlags::POLLIN)];
        loop {
            match poll(&mut fds, ms) {
                Ok(0) => return false,
                Ok(_) => return true,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;
    use crate::array::{self, Array};
    use crate::protocol::Access;

    /// A worker waiting for its next request lets go of the maps of files
    /// deleted since the last call (read-only ones and kept read-write
    /// ones), keeps the others, and still gives up when its idle time has
    /// passed.
    #[test]
    fn waiting_workers_let_go_of_maps_of_deleted_files() {
        let dir = tempfile::tempdir().unwrap();
        let (gone, stays, out) = (dir.path().join("gone.npy"), dir.path().join("stays.npy"), dir.path().join("c.npy"));
        for path in [&gone, &stays, &out] {
            Array::from_vec(vec![4], vec![1.0f64; 4]).save_npy(path).unwrap();
        }
        let reference =
            |path: &std::path::Path, access| array::file_ref(&Array::open_npy(path, access).unwrap()).unwrap();
        let mut maps = MapCache::default();
        maps.folders.allow(std::fs::canonicalize(dir.path()).unwrap());
        maps.start_call(1);
        drop(maps.map(&reference(&gone, Access::ReadOnly)).unwrap());
        drop(maps.map(&reference(&stays, Access::ReadOnly)).unwrap());
        drop(maps.map(&reference(&out, Access::ReadWrite)).unwrap());
        assert!(Array::has_kept_maps(), "the read-write map was not kept");
        std::fs::remove_file(&gone).unwrap();
        std::fs::remove_file(&out).unwrap();
        let (r, _w) = nix::unistd::pipe().unwrap(); // never readable
        let idle = Duration::from_millis(60);
        let started = Instant::now();
        assert!(!wait_for_request(&File::from(r), Some(idle), &mut maps, Duration::from_millis(10)));
        assert!(started.elapsed() >= idle, "gave up before its idle time");
        assert!(!maps.read_only.contains_key(&gone), "the deleted input's map is held");
        assert!(maps.read_only.contains_key(&stays), "an unchanged file's map was dropped");
        assert!(!Array::has_kept_maps(), "the deleted output's map is held");
    }

    /// An input that is never readable until its script says so, and
    /// records the timeouts it was asked to wait.
    struct Scripted {
        readable: RefCell<std::collections::VecDeque<bool>>,
        asked: RefCell<Vec<Duration>>,
    }

    impl AsRawFdMaybe for Scripted {
        fn wait_readable(&self, timeout: Duration) -> bool {
            self.asked.borrow_mut().push(timeout);
            self.readable.borrow_mut().pop_front().unwrap_or(true)
        }
    }

    /// Without an idle timeout, a worker holding maps wakes after the first
    /// check, then after twice as long, letting go of a deleted file's map
    /// at the first wake, and returns as soon as its input is readable;
    /// holding none, it does not wait at all (it blocks in `recv`).
    #[test]
    fn waiting_without_an_idle_timeout_checks_the_maps_at_doubling_intervals() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("gone.npy");
        Array::from_vec(vec![4], vec![1.0f64; 4]).save_npy(&gone).unwrap();
        let mut maps = MapCache::default();
        maps.folders.allow(std::fs::canonicalize(dir.path()).unwrap());
        maps.start_call(1);
        drop(maps.map(&array::file_ref(&Array::open_npy(&gone, Access::ReadOnly).unwrap()).unwrap()).unwrap());
        let stays = dir.path().join("stays.npy");
        Array::from_vec(vec![4], vec![1.0f64; 4]).save_npy(&stays).unwrap();
        drop(maps.map(&array::file_ref(&Array::open_npy(&stays, Access::ReadOnly).unwrap()).unwrap()).unwrap());
        std::fs::remove_file(&gone).unwrap();
        let input = Scripted { readable: RefCell::new([false, false, true].into()), asked: RefCell::default() };
        let first = Duration::from_millis(10);
        assert!(wait_for_request(&input, None, &mut maps, first));
        assert_eq!(*input.asked.borrow(), [first, first * 2, first * 4]);
        assert!(!maps.read_only.contains_key(&gone) && maps.read_only.contains_key(&stays));
        let idle_input = Scripted { readable: RefCell::default(), asked: RefCell::default() };
        assert!(wait_for_request(&idle_input, None, &mut MapCache::default(), first));
        assert!(idle_input.asked.borrow().is_empty(), "waited with nothing to check");
    }
}
