//! [`FnTask`]: the [`Task`] a function given to `Parallel::map` (and its
//! kin) runs as, and how a worker makes the function's value.

use std::marker::PhantomData;

use procjob_worker::protocol::{FailureCause, MAX_KIND_NAME};
use procjob_worker::task::{run_decoded, ErasedOutcome, Shared, TaskError};
use procjob_worker::{Array, Task};

use super::{IntoTaskError, Wire};

/// The task that runs the function `F` (a zero-sized function item or
/// capture-free closure) on inputs `I` with outputs `O`; `Kind` says how it
/// is called (with or without a shared `S`, returning `O` or
/// `Result<O, E>`). Never made: only its type is used.
pub(crate) struct FnTask<Kind, F, S, I, O, E>(PhantomData<Types<Kind, F, S, I, O, E>>);

/// The types an [`FnTask`] stands for, held by none of its values (a
/// function pointer type: `FnTask` is `Send`, `Sync` and `'static` when
/// they are `'static`).
type Types<Kind, F, S, I, O, E> = fn() -> (Kind, F, S, I, O, E);

/// `f(input) -> O`.
pub(crate) enum Plain {}
/// `f(input) -> Result<O, E>`.
pub(crate) enum Fallible {}
/// `f(&shared, input) -> O`.
pub(crate) enum WithShared {}
/// `f(&shared, input) -> Result<O, E>`.
pub(crate) enum WithSharedFallible {}

/// The value of the function type `F`.
fn conjure<F: Copy>() -> F {
    const {
        assert!(
            std::mem::size_of::<F>() == 0,
            "Parallel::map and its kin take a function item (`fn f(x: I) -> O`) or a closure that \
             captures nothing; a closure that captures variables, or a `fn` pointer, cannot be \
             named in a worker: pass what it captures as the inputs, or with map_with"
        )
    };
    // SAFETY: `F` has size 0 (checked at compile time above), so it has
    // exactly one value and reading it reads no memory: a dangling, aligned
    // pointer is valid for a zero-sized read. Making that value is sound
    // because the caller of `map` owned one (the `f` it passed, taken by
    // value), and `F: Copy`, so duplicating it is what copying would do;
    // on stable Rust only function items and closures implement `Fn`, and a
    // zero-sized `Copy` closure captures at most zero-sized `Copy` values,
    // which copying duplicates in the same way. A worker is the caller's
    // own executable (checked at the handshake), so `F` is the same type
    // with the same code there.
    unsafe { std::ptr::NonNull::<F>::dangling().as_ptr().read() }
}

/// The task name of function type `F`: its type's path (`my_crate::score`,
/// `my_crate::main::{{closure}}`), cut to the last [`MAX_KIND_NAME`] bytes
/// that workers accept.
fn name_of<F>() -> &'static str {
    let name = std::any::type_name::<F>();
    let mut start = name.len().saturating_sub(MAX_KIND_NAME);
    while !name.is_char_boundary(start) {
        start += 1;
    }
    &name[start..]
}

/// The chain of sources a [`TaskError`] carries.
fn sources(e: &TaskError) -> Vec<String> {
    e.sources.clone()
}

/// Reads the call's shared value as an `S`, or fails the task.
macro_rules! shared_or_fail {
    ($shared:expr, $s:ty) => {
        match $shared.get::<$s>() {
            Ok(s) => s,
            Err(e) => return ErasedOutcome::failed(FailureCause::Setup, e),
        }
    };
}

/// The error of a shared-value task run without its call's value.
fn no_shared() -> TaskError {
    TaskError { message: "a map_with task runs only with its call's shared value".into(), sources: Vec::new() }
}

impl<F, I, O> Task for FnTask<Plain, F, (), I, O, TaskError>
where
    F: Fn(I) -> O + Copy + 'static,
    I: Wire,
    O: Wire,
{
    type Input = I;
    type Output = O;
    type Error = TaskError;
    fn name() -> &'static str {
        name_of::<F>()
    }
    fn run(input: I) -> Result<O, TaskError> {
        Ok(conjure::<F>()(input))
    }
}

impl<F, I, O, E> Task for FnTask<Fallible, F, (), I, O, E>
where
    F: Fn(I) -> Result<O, E> + Copy + 'static,
    I: Wire,
    O: Wire,
    E: IntoTaskError,
{
    type Input = I;
    type Output = O;
    type Error = TaskError;
    fn name() -> &'static str {
        name_of::<F>()
    }
    fn run(input: I) -> Result<O, TaskError> {
        conjure::<F>()(input).map_err(TaskError::from)
    }
    fn __run_erased(input: &[u8], arrays: Vec<Array>, _shared: &mut Shared) -> ErasedOutcome {
        run_decoded::<Self>(input, arrays, Self::run, sources)
    }
}

impl<F, S, I, O> Task for FnTask<WithShared, F, S, I, O, TaskError>
where
    F: Fn(&S, I) -> O + Copy + 'static,
    S: Wire,
    I: Wire,
    O: Wire,
{
    type Input = I;
    type Output = O;
    type Error = TaskError;
    fn name() -> &'static str {
        name_of::<F>()
    }
    fn run(_input: I) -> Result<O, TaskError> {
        Err(no_shared())
    }
    fn __run_erased(input: &[u8], arrays: Vec<Array>, shared: &mut Shared) -> ErasedOutcome {
        let s = shared_or_fail!(shared, S);
        let f = conjure::<F>();
        run_decoded::<Self>(input, arrays, |input| Ok(f(s, input)), sources)
    }
}

impl<F, S, I, O, E> Task for FnTask<WithSharedFallible, F, S, I, O, E>
where
    F: Fn(&S, I) -> Result<O, E> + Copy + 'static,
    S: Wire,
    I: Wire,
    O: Wire,
    E: IntoTaskError,
{
    type Input = I;
    type Output = O;
    type Error = TaskError;
    fn name() -> &'static str {
        name_of::<F>()
    }
    fn run(_input: I) -> Result<O, TaskError> {
        Err(no_shared())
    }
    fn __run_erased(input: &[u8], arrays: Vec<Array>, shared: &mut Shared) -> ErasedOutcome {
        let s = shared_or_fail!(shared, S);
        let f = conjure::<F>();
        run_decoded::<Self>(input, arrays, |input| f(s, input).map_err(TaskError::from), sources)
    }
}
