//! The run's private temp folder: where arrays are dumped to be mapped by
//! workers.
//!
//! A folder `procjob-<pid>-<random>` (mode 0700, unpredictable name, made
//! without following symlinks by `tempfile`) under a parent chosen as
//! `--temp-folder`, else `PROCJOB_TEMP_FOLDER`, else `/dev/shm` when it has
//! more than 2 GB free and room for the data, else the system temp dir.
//! Only that folder is ever removed: on drop, whatever the outcome. A
//! process killed with SIGKILL cannot remove its folder, so every new run
//! first sweeps `procjob-<pid>-*` folders whose process no longer exists.

use std::path::{Path, PathBuf};

/// The environment variable that names the parent of run folders.
pub const TEMP_FOLDER_ENV: &str = "PROCJOB_TEMP_FOLDER";
const SHM: &str = "/dev/shm";
const SHM_MIN_FREE: u64 = 2_000_000_000;

/// Why a run folder could not be made.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The parent folder is unusable.
    #[error("temp folder {path}: {reason}")]
    Parent {
        /// The parent.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Not enough room in the parent.
    #[error(
        "temp folder {path} has {} free but this run needs {} ({needed} bytes); \
         free some space or pick another with --temp-folder or PROCJOB_TEMP_FOLDER",
        human_bytes(*.free),
        human_bytes(*.needed)
    )]
    NoRoom {
        /// The parent.
        path: PathBuf,
        /// Bytes needed.
        needed: u64,
        /// Bytes free.
        free: u64,
    },
    /// Creating the folder failed.
    #[error("cannot create a run folder in {path}: {source}")]
    Create {
        /// The parent.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Bytes in binary units, e.g. "1.5 GiB".
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// A run's private temp folder, removed on drop.
#[derive(Debug)]
pub struct RunFolder {
    dir: tempfile::TempDir,
}

impl RunFolder {
    /// Makes a run folder under `parent` (or the default parent) with room
    /// for `needed` bytes, after sweeping stale folders there.
    pub fn create(parent: Option<&Path>, needed: u64) -> Result<RunFolder, StoreError> {
        let parent = choose_parent(parent, needed)?;
        sweep_stale(&parent);
        let dir = tempfile::Builder::new()
            .prefix(&format!("procjob-{}-", std::process::id()))
            .rand_bytes(10)
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .tempdir_in(&parent)
            .map_err(|source| StoreError::Create { path: parent.clone(), source })?;
        crate::signals::folder_created(dir.path().to_path_buf());
        Ok(RunFolder { dir })
    }

    /// The folder's path.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A path for a new file in the folder.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for RunFolder {
    fn drop(&mut self) {
        // The TempDir field removes the folder right after this.
        crate::signals::folder_removed(self.dir.path());
    }
}

/// Bytes free for an unprivileged user on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> Option<u64> {
    let s = nix::sys::statvfs::statvfs(path).ok()?;
    Some((s.blocks_available() as u64).saturating_mul(s.fragment_size() as u64))
}

/// The parent folder a run uses: `explicit`, else `PROCJOB_TEMP_FOLDER`,
/// else `/dev/shm` when it has more than 2 GB free and room for `needed`,
/// else the system temp dir. Checks that it is a directory with
/// room for `needed` bytes.
pub fn choose_parent(explicit: Option<&Path>, needed: u64) -> Result<PathBuf, StoreError> {
    let from_env = std::env::var_os(TEMP_FOLDER_ENV).filter(|p| !p.is_empty()).map(PathBuf::from);
    choose_parent_with(explicit, from_env, needed, &free_bytes)
}

/// [`choose_parent`] with the environment and the free-space probe given,
/// so the choice can be tested without filling a disk.
fn choose_parent_with(
    explicit: Option<&Path>,
    from_env: Option<PathBuf>,
    needed: u64,
    free: &dyn Fn(&Path) -> Option<u64>,
) -> Result<PathBuf, StoreError> {
    let (chosen, named_by) = match (explicit, from_env) {
        (Some(p), _) => (p.to_path_buf(), ""),
        (None, Some(p)) => (p, " (named by PROCJOB_TEMP_FOLDER)"),
        (None, None) => match free(Path::new(SHM)) {
            Some(room) if room > SHM_MIN_FREE && room >= needed => (PathBuf::from(SHM), ""),
            _ => (std::env::temp_dir(), ""),
        },
    };
    let meta = std::fs::metadata(&chosen)
        .map_err(|e| StoreError::Parent { path: chosen.clone(), reason: format!("cannot use it{named_by}: {e}") })?;
    if !meta.is_dir() {
        return Err(StoreError::Parent { path: chosen, reason: format!("is not a directory{named_by}") });
    }
    if let Some(room) = free(&chosen) {
        if room < needed {
            return Err(StoreError::NoRoom { path: chosen, needed, free: room });
        }
    }
    Ok(chosen)
}

/// Removes `procjob-<pid>-*` folders in `parent` whose process no longer
/// exists and that belong to this user. A folder whose process is alive is
/// never touched. Returns the folders removed.
pub fn sweep_stale(parent: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(parent) else { return removed };
    let uid = nix::unistd::getuid().as_raw();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(owner_pid) else { continue };
        let Ok(meta) = entry.path().symlink_metadata() else { continue };
        if !meta.is_dir() || meta.uid() != uid || process_alive(pid) {
            continue;
        }
        if std::fs::remove_dir_all(entry.path()).is_ok() {
            removed.push(entry.path());
        }
    }
    removed
}

/// The pid in a run folder's name `procjob-<pid>-<random>`.
fn owner_pid(name: &str) -> Option<i32> {
    let rest = name.strip_prefix("procjob-")?;
    let (pid, random) = rest.split_once('-')?;
    if random.is_empty() {
        return None;
    }
    pid.parse().ok().filter(|&p| p > 0)
}

fn process_alive(pid: i32) -> bool {
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(nix::errno::Errno::ESRCH) => false,
        // EPERM: it exists, owned by someone else.
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn run_folder_is_private_and_removed_on_drop() {
        let parent = tempfile::tempdir().unwrap();
        let folder = RunFolder::create(Some(parent.path()), 0).unwrap();
        let path = folder.path().to_path_buf();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        assert_eq!(owner_pid(&name), Some(std::process::id() as i32), "{name}");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        std::fs::write(folder.file("x"), b"x").unwrap();
        drop(folder);
        assert!(!path.exists());
        assert!(parent.path().exists());
    }

    #[test]
    fn shm_is_used_only_with_more_than_2_gb_and_room_for_the_run() {
        let gb = 1_000_000_000u64;
        let shm_free = |shm: u64| move |p: &Path| Some(if p == Path::new(SHM) { shm } else { 100 * gb });
        let tmp = std::env::temp_dir();
        let shm_exists = Path::new(SHM).is_dir();
        if shm_exists {
            assert_eq!(choose_parent_with(None, None, gb, &shm_free(3 * gb)).unwrap(), PathBuf::from(SHM));
        }
        // More than 2 GB free but not enough for this run: the temp dir.
        assert_eq!(choose_parent_with(None, None, 4 * gb, &shm_free(3 * gb)).unwrap(), tmp);
        // Room for the run but not more than 2 GB free: the temp dir too.
        assert_eq!(choose_parent_with(None, None, gb / 2, &shm_free(gb)).unwrap(), tmp);
        // The environment and the flag win, in that order.
        let dir = tempfile::tempdir().unwrap();
        let env = Some(dir.path().to_path_buf());
        assert_eq!(choose_parent_with(None, env.clone(), 1, &shm_free(3 * gb)).unwrap(), dir.path());
        let flag = tempfile::tempdir().unwrap();
        assert_eq!(choose_parent_with(Some(flag.path()), env, 1, &shm_free(3 * gb)).unwrap(), flag.path());
        // No room anywhere: an error saying how much is needed and free.
        let err = choose_parent_with(Some(flag.path()), None, 5 * gb, &|_: &Path| Some(gb)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("953.7 MiB free") && msg.contains("needs 4.7 GiB"), "{msg}");
    }

    #[test]
    fn sweep_removes_dead_owners_only() {
        let parent = tempfile::tempdir().unwrap();
        // A pid that cannot be alive: above the kernel's maximum.
        let dead = parent.path().join("procjob-2147483646-abc");
        std::fs::create_dir(&dead).unwrap();
        let alive = parent.path().join(format!("procjob-{}-abc", std::process::id()));
        std::fs::create_dir(&alive).unwrap();
        let unrelated = parent.path().join("procjob-notapid-abc");
        std::fs::create_dir(&unrelated).unwrap();
        let removed = sweep_stale(parent.path());
        assert_eq!(removed, vec![dead.clone()]);
        assert!(!dead.exists() && alive.exists() && unrelated.exists());
    }

    #[test]
    fn parent_must_be_a_directory_with_room() {
        let parent = tempfile::tempdir().unwrap();
        let file = parent.path().join("f");
        std::fs::write(&file, b"").unwrap();
        let err = choose_parent(Some(&file), 0).unwrap_err();
        assert!(err.to_string().contains("is not a directory"), "{err}");
        let err = choose_parent_with(None, Some(file.clone()), 0, &|_: &Path| None).unwrap_err();
        assert!(err.to_string().contains("is not a directory (named by PROCJOB_TEMP_FOLDER)"), "{err}");
        let err = choose_parent(Some(&parent.path().join("missing")), 0).unwrap_err();
        assert!(err.to_string().contains("cannot use it"), "{err}");
        let err = choose_parent(Some(parent.path()), u64::MAX).unwrap_err();
        assert!(matches!(err, StoreError::NoRoom { .. }), "{err}");
    }
}
