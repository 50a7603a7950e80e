//! The matmul runner across repetitions: a C handed back is written over,
//! every element of it, in every mode.
//!
//! Without libtest's harness (`harness = false` in Cargo.toml): the fork
//! mode refuses to fork a process with more than one thread, and the
//! harness runs each test on a thread of its own. Workers of the other
//! modes are re-executions of this binary.

use procjob::matmul::{multiply_seq, Inputs, Mode, ModeRunner, RunSettings};
use procjob::store::RunFolder;
use procjob::DType;

fn main() {
    if procjob::is_worker_process() {
        procjob::__serve_as_worker();
    }
    a_handed_back_c_is_written_over_in_every_mode();
    a_c_still_shared_is_not_written_over();
}

fn settings() -> RunSettings {
    RunSettings {
        processes: 2,
        blocks: 3,
        temp_folder: None,
        repeat: 1,
        retries: 0,
        timeout: None,
        trace: false,
        fork: false,
        progress: false,
    }
}

fn a_handed_back_c_is_written_over_in_every_mode() {
    let inputs = Inputs::pattern(DType::I64, 37, 23, 29);
    let reference = multiply_seq(&inputs).unwrap();
    let folder = RunFolder::create(None, 0).unwrap();
    for mode in Mode::ALL {
        let mut runner = ModeRunner::new(mode, &inputs, &settings(), &folder);
        let (_, mut c) = runner.run_once().unwrap();
        assert_eq!(c, reference, "{mode:?}, first repetition");
        // Poison every element: a repetition that skipped any row or
        // column of the C it was handed back would leave a -1 behind.
        c.as_mut_slice::<i64>().unwrap().fill(-1);
        let storage = c.storage_id();
        runner.recycle(c);
        let (_, c) = runner.run_once().unwrap();
        assert_eq!(c.storage_id(), storage, "{mode:?}: the handed-back C was not reused");
        assert_eq!(c, reference, "{mode:?}, second repetition");
        runner.finish();
        println!("{mode:?}: a handed-back C is written over ... ok");
    }
}

fn a_c_still_shared_is_not_written_over() {
    let inputs = Inputs::pattern(DType::F64, 20, 10, 8);
    let folder = RunFolder::create(None, 0).unwrap();
    for mode in [Mode::Threads, Mode::Memmap, Mode::MemmapOut] {
        let mut runner = ModeRunner::new(mode, &inputs, &settings(), &folder);
        let (_, mut kept) = runner.run_once().unwrap();
        kept.as_mut_slice::<f64>().unwrap().fill(f64::NAN);
        let view = kept.rows(0..1).unwrap();
        runner.recycle(kept.clone());
        let (_, c) = runner.run_once().unwrap();
        assert_ne!(c.storage_id(), kept.storage_id(), "{mode:?}");
        assert!(kept.as_slice::<f64>().unwrap().iter().all(|x| x.is_nan()), "{mode:?}: a shared C was written");
        drop(view);
        runner.finish();
        println!("{mode:?}: a C still shared is left alone ... ok");
    }
}
