//! Plain functions as tasks: [`Parallel::map`] and its kin, joblib's
//! `Parallel(n_jobs)(delayed(f)(x) for x in xs)`.
//!
//! A function item (`fn square(x: u64) -> u64`) or a closure that captures
//! nothing is a type of its own with no bytes (a zero-sized type). The
//! function tasks are generic [`Task`] types over that type
//! (`fn_task::FnTask<Kind, F, S, I, O, E>`), so each function gets its own
//! monomorphised task, with its own entry descriptor in the executable: a
//! worker runs it after the checks every task's entry goes through
//! ([`procjob_worker::entry`]), and makes the function's (only) value
//! itself, as nothing needs to travel. Everything a [`Task`] has — batches,
//! retries, timeouts, arrays memory-mapped above `max_nbytes` — applies
//! unchanged.
//!
//! A value every task needs ([`Parallel::map_with`]) goes to each worker
//! once per call, with its first batch, and is decoded there once.

mod fn_task;

use serde::de::DeserializeOwned;
use serde::Serialize;

use fn_task::{Fallible, FnTask, Plain, WithShared, WithSharedFallible};
use procjob_worker::task::TaskError;
use procjob_worker::Task;

use super::builder::Parallel;
use super::iter::{Ordered, Unordered};
use super::shell::Call;
use crate::error::Error;

/// An error a function task may return: anything that converts into a
/// `Box<dyn std::error::Error + Send + Sync>` — every `std::error::Error`,
/// `anyhow::Error`, `String`, `&str`.
pub trait IntoTaskError: Into<Box<dyn std::error::Error + Send + Sync>> + 'static {}
impl<E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static> IntoTaskError for E {}

/// A type that travels as a task's input, output or shared value.
pub trait Wire: Serialize + DeserializeOwned + 'static {}
impl<T: Serialize + DeserializeOwned + 'static> Wire for T {}

impl Parallel {
    /// Runs `f` on every input in the workers; returns the outputs in input
    /// order, or the first failure (a panic, with its message and place).
    ///
    /// `f` is a function item or a closure that captures nothing: it is
    /// named by its type, not sent, so a closure that captures a variable
    /// (or a `fn` pointer) is refused at compile time. To give every task a
    /// value of the caller's, use [`map_with`](Parallel::map_with). Inputs
    /// and outputs are any serde types; [`Array`](crate::Array)s in them
    /// travel as memory maps above `max_nbytes`, as with [`run`](Parallel::run).
    ///
    /// ```
    /// # fn main() -> Result<(), procjob::Error> {
    /// procjob::init(); // first line of main: a worker process stops here
    /// fn square(x: u64) -> u64 {
    ///     x * x
    /// }
    /// let squares = procjob::Parallel::new().n_jobs(2).map(square, 0..10u64)?;
    /// assert_eq!(squares[9], 81);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// A closure that captures a variable is refused when the program is
    /// built ("…a closure that captures variables, or a `fn` pointer,
    /// cannot be named in a worker…"):
    ///
    /// ```compile_fail,E0080
    /// # fn main() -> Result<(), procjob::Error> {
    /// let k = 3u64;
    /// let _ = procjob::Parallel::new().map(move |x: u64| x * k, 0..10u64)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn map<F, I, O>(&mut self, f: F, inputs: impl IntoIterator<Item = I>) -> Result<Vec<O>, Error>
    where
        F: Fn(I) -> O + Copy + 'static,
        I: Wire,
        O: Wire,
    {
        let _ = f;
        self.run::<FnTask<Plain, F, (), I, O, TaskError>, _>(inputs)
    }

    /// Runs `f`, which may fail, on every input; returns the outputs in
    /// input order, or the first failure.
    ///
    /// The error is any `std::error::Error` (`io::Error`, a `thiserror`
    /// enum, [`ArrayError`](crate::ArrayError)), an `anyhow::Error`, or a
    /// `String`. The caller's [`Error::Task`] names the task, has the
    /// error's message, and its [`source`](std::error::Error::source) chain
    /// is the task error's chain of sources; [`Error::task_error`] with
    /// [`TaskError`] gives message and sources as data.
    ///
    /// ```
    /// # fn main() -> Result<(), procjob::Error> {
    /// # procjob::init();
    /// fn size(path: String) -> std::io::Result<u64> {
    ///     Ok(std::fs::metadata(path)?.len())
    /// }
    /// let err = procjob::Parallel::new().n_jobs(2).try_map(size, ["/no/such/file".to_string()]).unwrap_err();
    /// assert_eq!(err.task_index(), Some(0));
    /// # Ok(())
    /// # }
    /// ```
    pub fn try_map<F, I, O, E>(&mut self, f: F, inputs: impl IntoIterator<Item = I>) -> Result<Vec<O>, Error>
    where
        F: Fn(I) -> Result<O, E> + Copy + 'static,
        I: Wire,
        O: Wire,
        E: IntoTaskError,
    {
        let _ = f;
        self.run::<FnTask<Fallible, F, (), I, O, E>, _>(inputs)
    }

    /// [`map`](Parallel::map), yielding the outputs in input order as they
    /// become available (joblib's `return_as="generator"`). Dropping the
    /// stream early stops the call as [`run_iter`](Parallel::run_iter) does.
    pub fn map_iter<'p, F, I, O>(
        &'p mut self,
        f: F,
        inputs: impl IntoIterator<Item = I, IntoIter: 'p>,
    ) -> Result<impl Iterator<Item = Result<O, Error>> + 'p, Error>
    where
        F: Fn(I) -> O + Copy + 'static,
        I: Wire,
        O: Wire,
    {
        let _ = f;
        self.run_iter::<FnTask<Plain, F, (), I, O, TaskError>, _>(inputs)
    }

    /// [`map`](Parallel::map), yielding `(input index, output)` in the
    /// order tasks complete (joblib's `return_as="generator_unordered"`).
    pub fn map_unordered<'p, F, I, O>(
        &'p mut self,
        f: F,
        inputs: impl IntoIterator<Item = I, IntoIter: 'p>,
    ) -> Result<impl Iterator<Item = Result<(u64, O), Error>> + 'p, Error>
    where
        F: Fn(I) -> O + Copy + 'static,
        I: Wire,
        O: Wire,
    {
        let _ = f;
        self.run_unordered::<FnTask<Plain, F, (), I, O, TaskError>, _>(inputs)
    }

    /// [`try_map`](Parallel::try_map), yielding outputs in input order as
    /// they become available.
    pub fn try_map_iter<'p, F, I, O, E>(
        &'p mut self,
        f: F,
        inputs: impl IntoIterator<Item = I, IntoIter: 'p>,
    ) -> Result<impl Iterator<Item = Result<O, Error>> + 'p, Error>
    where
        F: Fn(I) -> Result<O, E> + Copy + 'static,
        I: Wire,
        O: Wire,
        E: IntoTaskError,
    {
        let _ = f;
        self.run_iter::<FnTask<Fallible, F, (), I, O, E>, _>(inputs)
    }

    /// [`try_map`](Parallel::try_map), yielding `(input index, output)` in
    /// the order tasks complete.
    pub fn try_map_unordered<'p, F, I, O, E>(
        &'p mut self,
        f: F,
        inputs: impl IntoIterator<Item = I, IntoIter: 'p>,
    ) -> Result<impl Iterator<Item = Result<(u64, O), Error>> + 'p, Error>
    where
        F: Fn(I) -> Result<O, E> + Copy + 'static,
        I: Wire,
        O: Wire,
        E: IntoTaskError,
    {
        let _ = f;
        self.run_unordered::<FnTask<Fallible, F, (), I, O, E>, _>(inputs)
    }

    /// Runs `f(&shared, input)` on every input: `shared` (a model, a lookup
    /// table, a matrix) crosses to each worker once per call, with its
    /// first batch, and is decoded there once — never once per task, as it
    /// would inside each input. An [`Array`](crate::Array) in it above
    /// `max_nbytes` is dumped once and memory-mapped by every worker
    /// (dask's `scatter`, ray's object store).
    ///
    /// ```
    /// # fn main() -> Result<(), procjob::Error> {
    /// # procjob::init();
    /// let weights = vec![0.5f64; 1000];
    /// let dots = procjob::Parallel::new().n_jobs(2).map_with(
    ///     &weights,
    ///     |w: &Vec<f64>, k: usize| w.iter().take(k).sum::<f64>(),
    ///     [10, 100, 1000],
    /// )?;
    /// assert_eq!(dots, [5.0, 50.0, 500.0]);
    /// # Ok(())
    /// # }
    /// ```
    pub fn map_with<S, F, I, O>(
        &mut self,
        shared: &S,
        f: F,
        inputs: impl IntoIterator<Item = I>,
    ) -> Result<Vec<O>, Error>
    where
        S: Wire,
        F: Fn(&S, I) -> O + Copy + 'static,
        I: Wire,
        O: Wire,
    {
        let _ = f;
        self.run_shared::<FnTask<WithShared, F, S, I, O, TaskError>, S, _>(shared, inputs)
    }

    /// [`map_with`](Parallel::map_with) for a function that may fail, as
    /// with [`try_map`](Parallel::try_map).
    pub fn try_map_with<S, F, I, O, E>(
        &mut self,
        shared: &S,
        f: F,
        inputs: impl IntoIterator<Item = I>,
    ) -> Result<Vec<O>, Error>
    where
        S: Wire,
        F: Fn(&S, I) -> Result<O, E> + Copy + 'static,
        I: Wire,
        O: Wire,
        E: IntoTaskError,
    {
        let _ = f;
        self.run_shared::<FnTask<WithSharedFallible, F, S, I, O, E>, S, _>(shared, inputs)
    }

    /// [`map_with`](Parallel::map_with), yielding outputs in input order as
    /// they become available.
    pub fn map_with_iter<'p, S, F, I, O>(
        &'p mut self,
        shared: &S,
        f: F,
        inputs: impl IntoIterator<Item = I, IntoIter: 'p>,
    ) -> Result<impl Iterator<Item = Result<O, Error>> + 'p, Error>
    where
        S: Wire,
        F: Fn(&S, I) -> O + Copy + 'static,
        I: Wire,
        O: Wire,
    {
        let _ = f;
        let mut call = Call::<FnTask<WithShared, F, S, I, O, TaskError>, _>::start(self, inputs.into_iter(), None)?;
        call.share(shared)?;
        Ok(Ordered::new(call))
    }

    /// [`map_with`](Parallel::map_with), yielding `(input index, output)`
    /// in the order tasks complete.
    pub fn map_with_unordered<'p, S, F, I, O>(
        &'p mut self,
        shared: &S,
        f: F,
        inputs: impl IntoIterator<Item = I, IntoIter: 'p>,
    ) -> Result<impl Iterator<Item = Result<(u64, O), Error>> + 'p, Error>
    where
        S: Wire,
        F: Fn(&S, I) -> O + Copy + 'static,
        I: Wire,
        O: Wire,
    {
        let _ = f;
        let mut call = Call::<FnTask<WithShared, F, S, I, O, TaskError>, _>::start(self, inputs.into_iter(), None)?;
        call.share(shared)?;
        Ok(Unordered::new(call))
    }

    /// Runs task `T` with the shared value `shared`, collecting in input
    /// order.
    fn run_shared<T: Task, S: Serialize, I: IntoIterator<Item = T::Input>>(
        &mut self,
        shared: &S,
        inputs: I,
    ) -> Result<Vec<T::Output>, Error> {
        let mut call = Call::<T, I::IntoIter>::start(self, inputs.into_iter(), None)?;
        call.share(shared)?;
        let mut out: Vec<Option<T::Output>> = Vec::new();
        while let Some(result) = call.next_completed() {
            let (index, output) = result?;
            let index = index as usize;
            if index >= out.len() {
                out.resize_with(index + 1, || None);
            }
            out[index] = Some(output);
        }
        Ok(out.into_iter().map(|o| o.expect("every task of a successful call has an output")).collect())
    }
}
