//! The errors of the pool and the `Parallel` API.
//!
//! Each variant names the worker (index, pid), the task (index and, when
//! the task kind can describe it, what it was doing) and the cause.

use std::time::Duration;

use procjob_worker::protocol::{FailureCause, TaskFailure};

/// How a worker process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerExit {
    /// It exited with this code.
    Exited {
        /// The exit code.
        code: i32,
    },
    /// A signal killed it.
    Signaled {
        /// The signal.
        signal: nix::sys::signal::Signal,
    },
    /// Its status could not be learnt.
    Unknown,
}

impl std::fmt::Display for WorkerExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WorkerExit::Exited { code } => write!(f, "exited with code {code}"),
            WorkerExit::Signaled { signal } => write!(f, "was killed by {}", signal.as_str()),
            WorkerExit::Unknown => write!(f, "ended"),
        }
    }
}

/// Names a worker in messages: "worker 1 (pid 4711)".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerId {
    /// Index in the pool, from 0.
    pub index: usize,
    /// Process id.
    pub pid: u32,
}

impl std::fmt::Display for WorkerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "worker {} (pid {})", self.index, self.pid)
    }
}

/// Names a task in messages: "task 3 (rows 500..750)".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskId {
    /// Index in its call (submission order), from 0.
    pub index: u64,
    /// What the task was doing, if its kind says.
    pub description: Option<String>,
}

impl std::fmt::Display for TaskId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.description {
            Some(d) => write!(f, "task {} ({d})", self.index),
            None => write!(f, "task {}", self.index),
        }
    }
}

/// Why a call failed.
///
/// [`Config`](Error::Config) is a bad request of the caller's; every other
/// variant is a failure of the run (a task, a worker, the system).
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A task returned an error or panicked.
    ///
    /// Its [`source`](std::error::Error::source) is the chain of sources of
    /// the error the task returned (each a [`TaskCause`] holding its
    /// message), so `{:?}` and error reporters show it as they would in the
    /// task's own process.
    #[error("{task} failed on {worker}: {}", describe_failure(.failure))]
    Task {
        /// The task.
        task: TaskId,
        /// Where it ran.
        worker: WorkerId,
        /// What the worker reported.
        failure: Box<TaskFailure>,
        /// The first source of the error the task returned, if it had one.
        #[source]
        cause: Option<Box<TaskCause>>,
    },
    /// A worker died while running tasks.
    #[non_exhaustive]
    #[error("{worker} {exit} while running {}{}", list_tasks(.tasks), death_hint(.exit, .mapped, .killed_for.as_deref()))]
    WorkerDied {
        /// The worker.
        worker: WorkerId,
        /// How it ended.
        exit: WorkerExit,
        /// The tasks it was running.
        tasks: Vec<TaskId>,
        /// The files those tasks had the worker map (a SIGBUS is a read
        /// of one of them that failed).
        mapped: Vec<std::path::PathBuf>,
        /// Why procjob itself killed it, when it did (the message then says
        /// so instead of guessing from the signal): a worker still running
        /// two seconds after its input was closed, or, on a cluster, one
        /// whose rows could not be moved between nodes, killed so that its
        /// batch fails (or is retried) as a death does.
        killed_for: Option<String>,
    },
    /// A task ran past the call's timeout; its worker was killed.
    #[error("{task} on {worker} ran longer than the timeout of {:.3} s; the worker was killed", .limit.as_secs_f64())]
    Timeout {
        /// The task.
        task: TaskId,
        /// Where it ran.
        worker: WorkerId,
        /// The limit.
        limit: Duration,
    },
    /// A worker could not be started or did not complete the handshake.
    #[error("cannot start worker {index}: {reason}")]
    Start {
        /// Index in the pool.
        index: usize,
        /// Why.
        reason: String,
    },
    /// Talking to a worker failed.
    #[error("lost contact with {worker}: {reason}")]
    Transport {
        /// The worker.
        worker: WorkerId,
        /// Why.
        reason: String,
    },
    /// A task's input could not be encoded or its output decoded.
    #[error("{task}: {reason}")]
    Codec {
        /// The task.
        task: TaskId,
        /// Why.
        reason: String,
    },
    /// The run folder for dumped arrays could not be made or written.
    #[error(transparent)]
    Store(#[from] crate::run_folder::StoreError),
    /// A bad request: a parameter, a shape or a setting that cannot work.
    #[error("{0}")]
    Config(String),
    /// An array could not be made, written, mapped or viewed.
    #[error("{what}: {source}")]
    Array {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: procjob_worker::array::ArrayError,
    },
    /// Something that cannot happen did: a bug of procjob's.
    #[error("internal error: {0}")]
    Internal(String),
    /// Memory for a large buffer could not be had: the machine's memory,
    /// or a limit such as `ulimit -v`, is too small for it.
    #[error(
        "cannot allocate {} for {what}: out of memory (the machine's memory or a limit such as ulimit -v is too small)",
        crate::run_folder::human_bytes(*.bytes)
    )]
    OutOfMemory {
        /// What the memory was for.
        what: String,
        /// How much was asked for.
        bytes: u64,
    },
    /// The system refused a resource the call needs, such as a thread.
    #[error("cannot {what}: {source}")]
    System {
        /// What could not be done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The process received SIGINT or SIGTERM; the workers were stopped.
    #[error("interrupted by {}", .signal.as_str())]
    Interrupted {
        /// The signal.
        signal: nix::sys::signal::Signal,
    },
}

/// As [`Display`](std::fmt::Display) (a program whose `main` returns
/// `Result<(), procjob::Error>` prints this), followed by the chain of
/// causes.
impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")?;
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            write!(f, "\n  caused by: {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

/// One error in the chain of sources of a task's error, as the worker
/// reported it: its message, and the next one below it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskCause {
    /// The source's `Display`.
    pub message: String,
    /// The source below this one.
    pub source: Option<Box<TaskCause>>,
}

impl std::fmt::Display for TaskCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for TaskCause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|s| s as &(dyn std::error::Error + 'static))
    }
}

impl Error {
    /// The failure of `task` on `worker`, with the chain of sources the
    /// worker reported (at most `MAX_SOURCES` of them, bounded when decoded).
    pub(crate) fn task(task: TaskId, worker: WorkerId, failure: TaskFailure) -> Error {
        let cause = failure
            .sources
            .iter()
            .rev()
            .fold(None, |below, message| Some(Box::new(TaskCause { message: message.clone(), source: below })));
        Error::Task { task, worker, failure: Box::new(failure), cause }
    }

    /// The message of the task's own error (or panic), without the task
    /// and worker that [`Display`](std::fmt::Display) adds; `None` for
    /// errors that are not a task's.
    pub fn task_message(&self) -> Option<&str> {
        match self {
            Error::Task { failure, .. } => Some(&failure.message),
            _ => None,
        }
    }

    /// Whether the caller's request was at fault (a bad parameter, an array
    /// too large to make), rather than the run.
    pub fn is_usage(&self) -> bool {
        use procjob_worker::array::ArrayError;
        match self {
            Error::Config(_) | Error::Store(_) | Error::OutOfMemory { .. } => true,
            Error::Array { source, .. } => {
                matches!(source, ArrayError::TooLarge { .. } | ArrayError::OutOfMemory { .. })
            }
            _ => false,
        }
    }

    /// The index of the task this error is about, if one.
    pub fn task_index(&self) -> Option<u64> {
        match self {
            Error::Task { task, .. } | Error::Timeout { task, .. } | Error::Codec { task, .. } => Some(task.index),
            Error::WorkerDied { tasks, .. } => tasks.first().map(|t| t.index),
            _ => None,
        }
    }

    /// The task's typed error, when it returned one of type `E`: a
    /// [`Task`](crate::Task)'s `Error`, or [`TaskError`](crate::TaskError)
    /// (message and sources) for a function given to
    /// [`try_map`](crate::Parallel::try_map) and its kin.
    pub fn task_error<E: serde::de::DeserializeOwned>(&self) -> Option<E> {
        match self {
            Error::Task { failure, .. } => postcard::from_bytes(failure.error.as_deref()?).ok(),
            _ => None,
        }
    }
}

fn describe_failure(f: &TaskFailure) -> String {
    match (&f.cause, &f.location) {
        (FailureCause::Panic, Some(loc)) => format!("panicked at {loc}: {}", f.message),
        (FailureCause::Panic, None) => format!("panicked: {}", f.message),
        (FailureCause::Error, _) => format!("returned an error: {}", f.message),
        (FailureCause::Setup, _) => format!("could not be run: {}", f.message),
    }
}

fn list_tasks(tasks: &[TaskId]) -> String {
    match tasks {
        [] => "no task".into(),
        [one] => one.to_string(),
        many => many.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
    }
}

fn death_hint(exit: &WorkerExit, mapped: &[std::path::PathBuf], killed_for: Option<&str>) -> String {
    use nix::sys::signal::Signal;
    if let Some(why) = killed_for {
        return format!("; procjob killed it: {why}");
    }
    match exit {
        WorkerExit::Signaled { signal: Signal::SIGKILL } => "; the system may be out of memory".into(),
        WorkerExit::Signaled { signal: Signal::SIGBUS } => {
            let files = match mapped {
                [] => "a file it had mapped".to_string(),
                [one] => one.display().to_string(),
                many => many.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
            };
            format!(
                "; it was reading {files}: a SIGBUS means a mapped file shrank while it was read, \
                 or the filesystem holding it is full"
            )
        }
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use procjob_worker::array::ArrayError;
    use procjob_worker::DType;

    #[test]
    fn debug_reads_as_display_with_its_causes() {
        let e = Error::System {
            what: "write C".into(),
            source: std::io::Error::new(std::io::ErrorKind::StorageFull, "No space left on device"),
        };
        assert_eq!(format!("{e:?}"), "cannot write C: No space left on device\n  caused by: No space left on device");
        assert_eq!(format!("{:?}", Error::Config("n_jobs = 0".into())), "n_jobs = 0");
    }

    /// A SIGKILL nobody in procjob sent may be the OOM killer's; one that
    /// procjob sent says why instead, whatever the exit came to be.
    #[test]
    fn a_death_says_why_procjob_killed_the_worker_or_guesses_from_the_signal() {
        use nix::sys::signal::Signal;
        let died = |exit: WorkerExit, killed_for: Option<&str>| {
            Error::WorkerDied {
                worker: WorkerId { index: 1, pid: 4711 },
                exit,
                tasks: vec![TaskId { index: 1, description: Some("rows 25..50".into()) }],
                mapped: Vec::new(),
                killed_for: killed_for.map(Into::into),
            }
            .to_string()
        };
        let sigkill = WorkerExit::Signaled { signal: Signal::SIGKILL };
        assert_eq!(
            died(sigkill, None),
            "worker 1 (pid 4711) was killed by SIGKILL while running task 1 (rows 25..50); \
             the system may be out of memory"
        );
        assert_eq!(
            died(sigkill, Some("it was still running 2 s after its input was closed")),
            "worker 1 (pid 4711) was killed by SIGKILL while running task 1 (rows 25..50); \
             procjob killed it: it was still running 2 s after its input was closed"
        );
        assert!(died(WorkerExit::Unknown, Some("why"))
            .ends_with("ended while running task 1 (rows 25..50); procjob killed it: why"));
        assert!(!died(WorkerExit::Exited { code: 7 }, None).contains(';'), "no guess for an exit code");
    }

    #[test]
    fn only_a_bad_request_is_the_callers_fault() {
        assert!(Error::Config("x".into()).is_usage());
        assert!(Error::OutOfMemory { what: "C".into(), bytes: 1 }.is_usage());
        let too_large = ArrayError::too_large(DType::F64, &[usize::MAX, 2]);
        assert!(Error::Array { what: "C".into(), source: too_large }.is_usage());
        let io = std::io::Error::other("disk");
        assert!(!Error::System { what: "write".into(), source: io }.is_usage());
        assert!(!Error::Internal("bug".into()).is_usage());
        let gone = Error::Array { what: "map A".into(), source: ArrayError::Shape("no".into()) };
        assert!(!gone.is_usage());
    }
}
