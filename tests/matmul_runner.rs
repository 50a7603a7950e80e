//! The matmul runner across repetitions: a C handed back is written over,
//! every element of it, in every mode, and the runner leaves no file behind.
//!
//! Without libtest's harness (`harness = false` in Cargo.toml): the fork
//! mode refuses to fork a process with more than one thread, and the
//! harness runs each test on a thread of its own. Workers of the other
//! modes are re-executions of this binary.

use procjob::matmul::{multiply_seq, run_mode, Inputs, Mode, ModeRunner, Recycled, RunSettings};
use procjob::run_folder::RunFolder;
use procjob::DType;

fn main() {
    if procjob::is_worker_process() {
        procjob::__serve_as_worker();
    }
    a_handed_back_c_is_written_over_in_every_mode();
    a_c_still_shared_or_of_another_runner_is_not_taken();
    repeated_runs_leave_the_run_folder_empty();
    b_packed_once_reaches_every_block();
}

fn settings() -> RunSettings {
    RunSettings { blocks: 3, ..RunSettings::with_processes(2) }
}

/// The names left in the run folder, but the folder's own lock file.
fn left_in(folder: &RunFolder) -> Vec<String> {
    std::fs::read_dir(folder.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name != procjob::run_folder::LOCK_FILE)
        .collect()
}

fn a_handed_back_c_is_written_over_in_every_mode() {
    // Shapes: ordinary, k = 0 (C is all zeros), no rows at all.
    for (m, k, n) in [(37, 23, 29), (5, 0, 4), (0, 6, 3)] {
        let inputs = Inputs::pattern(DType::I64, m, k, n).unwrap();
        let reference = multiply_seq(&inputs).unwrap();
        let folder = RunFolder::create(None, 0).unwrap();
        for mode in Mode::ALL {
            let mut runner = ModeRunner::new(mode, &inputs, &settings(), &folder);
            let (_, mut c) = runner.run_once().unwrap();
            assert_eq!(c, reference, "{mode:?} {m}×{k}×{n}, first repetition");
            // Poison every element: a repetition that skipped any row or
            // column of the C it was handed back would leave a -1 behind.
            c.as_mut_slice::<i64>().unwrap().fill(-1);
            let storage = c.storage_id();
            assert_eq!(runner.recycle(c), Recycled::Kept, "{mode:?} {m}×{k}×{n}");
            let (_, c) = runner.run_once().unwrap();
            assert_eq!(c.storage_id(), storage, "{mode:?} {m}×{k}×{n}: the handed-back C was not reused");
            assert_eq!(c, reference, "{mode:?} {m}×{k}×{n}, second repetition");
            runner.finish();
            println!("{mode:?} {m}×{k}×{n}: a handed-back C is written over ... ok");
        }
        assert_eq!(left_in(&folder), Vec::<String>::new(), "{m}×{k}×{n}: files left after the runners finished");
    }
}

fn a_c_still_shared_or_of_another_runner_is_not_taken() {
    let inputs = Inputs::pattern(DType::F64, 20, 10, 8).unwrap();
    let folder = RunFolder::create(None, 0).unwrap();
    for mode in [Mode::Threads, Mode::Memmap, Mode::MemmapOut] {
        let mut runner = ModeRunner::new(mode, &inputs, &settings(), &folder);
        let (_, mut kept) = runner.run_once().unwrap();
        kept.as_mut_slice::<f64>().unwrap().fill(f64::NAN);
        let view = kept.rows(0..1).unwrap();
        assert_eq!(runner.recycle(kept.clone()), Recycled::Shared, "{mode:?}");
        // Another runner's C of the same mode and shape is not this one's.
        let mut other = ModeRunner::new(mode, &inputs, &settings(), &folder);
        let (_, foreign) = other.run_once().unwrap();
        let expected = if mode.c_in_file() { Recycled::NotThisRunners } else { Recycled::Kept };
        assert_eq!(runner.recycle(foreign), expected, "{mode:?}");
        other.finish();
        let (_, c) = runner.run_once().unwrap();
        assert_ne!(c.storage_id(), kept.storage_id(), "{mode:?}");
        assert!(kept.as_slice::<f64>().unwrap().iter().all(|x| x.is_nan()), "{mode:?}: a shared C was written");
        drop(view);
        runner.finish();
        println!("{mode:?}: a C still shared, or another runner's, is not taken ... ok");
    }
}

fn repeated_runs_leave_the_run_folder_empty() {
    let inputs = Inputs::pattern(DType::I64, 30, 12, 17).unwrap();
    let reference = multiply_seq(&inputs).unwrap();
    let folder = RunFolder::create(None, 0).unwrap();
    for mode in Mode::ALL {
        let run = run_mode(mode, &inputs, &RunSettings { repeat: 3, ..settings() }, &folder).unwrap();
        assert_eq!(run.repetitions.len(), 3, "{mode:?}");
        assert_eq!(run.c, reference, "{mode:?}");
        assert_eq!(left_in(&folder), Vec::<String>::new(), "{mode:?}: files left after the mode");
        println!("{mode:?}: three repetitions, nothing left in the run folder ... ok");
    }
}

/// With B packed once for all blocks (f64 and f32 where the packed GEMM
/// runs), every mode gives seq's bits in every repetition, across two depth
/// parts and a width that is not whole panels; copy sends the packed B
/// (its rows padded to whole panels) with every task, and forked workers
/// inherit it instead of receiving it.
fn b_packed_once_reaches_every_block() {
    use procjob_worker::kernels::Kernel;
    let (m, k, n) = (41, 300, 37);
    for dtype in [DType::F64, DType::F32] {
        let inputs = Inputs::random(dtype, m, k, n, 7).unwrap();
        let reference = multiply_seq(&inputs).unwrap();
        let width = match dtype {
            DType::F64 => f64::b_panel_width(),
            _ => f32::b_panel_width(),
        };
        let b_bytes = (k * n.next_multiple_of(width.unwrap_or(1)) * dtype.size()) as u64;
        let folder = RunFolder::create(None, 0).unwrap();
        for mode in Mode::ALL {
            let mut runner = ModeRunner::new(mode, &inputs, &settings(), &folder);
            for rep in 0..2 {
                let (r, c) = runner.run_once().unwrap();
                assert!(c == reference, "{mode:?} {dtype}, repetition {rep}: not seq's bits");
                match mode {
                    Mode::Copy => assert!(
                        r.bytes_to_workers >= 3 * b_bytes,
                        "{mode:?} {dtype}: {} bytes sent, not B ({b_bytes}) to each of 3 tasks",
                        r.bytes_to_workers
                    ),
                    Mode::Fork => assert!(
                        r.bytes_to_workers < (k * n * dtype.size()) as u64,
                        "{mode:?} {dtype}: {} bytes sent: B went through the pipes",
                        r.bytes_to_workers
                    ),
                    _ => {}
                }
                runner.recycle(c);
            }
            runner.finish();
            println!("{mode:?} {dtype}: B packed once, seq's bits in every repetition ... ok");
        }
        assert_eq!(left_in(&folder), Vec::<String>::new(), "{dtype}: files left after the runners finished");
    }
}
