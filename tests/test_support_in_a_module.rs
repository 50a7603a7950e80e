//! `procjob::test_support!()` put inside a module, where the test harness
//! cannot find the worker entry by its exact name: starting workers fails,
//! and the error says where the macro belongs.

use procjob::{Error, Parallel, Task};

#[cfg(test)]
mod tests {
    // Wrong place on purpose: the test is named `tests::__procjob_worker_entry`.
    procjob::test_support!();
}

struct Echo;
impl Task for Echo {
    type Input = u64;
    type Output = u64;
    type Error = String;
    fn run(x: u64) -> Result<u64, String> {
        Ok(x)
    }
}

#[test]
fn test_support_inside_a_module_fails_naming_the_top_level_of_the_file() {
    let err = Parallel::new().n_jobs(1).in_process(false).run::<Echo, _>([1u64]).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Start { .. }), "{msg}");
    assert!(msg.contains("procjob::test_support!() at the top level of the file"), "{msg}");
    assert!(msg.contains("not inside a module") && msg.contains("__procjob_worker_entry"), "{msg}");
}
