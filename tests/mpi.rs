//! `procjob matmul` across the ranks of `mpirun`, on this machine: each
//! rank is made a node of its own (`PROCJOB_MPI_NODE=rank`), so workers run
//! under agents of other ranks and every frame crosses MPI. Needs Open MPI
//! (`.ci/run` installs it) and the `mpi` feature:
//! `cargo test --features mpi --test mpi`. Every `mpirun` runs under a hard
//! `timeout`.
#![cfg(feature = "mpi")]

mod mpi_util;
mod util;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use mpi_util::{build_example, json_lines, marked, marked_after_the_end};
use serde_json::Value;
use util::{assert_clean_parent, TestDir, BIN};

/// Longest an mpirun may take (then `timeout` ends it, and the test fails).
const LIMIT_S: u32 = 120;

/// `mpirun` with the settings this machine needs: as root, more ranks than
/// CPUs, no binding; one app context per entry of `contexts` (its rank
/// count, extra environment, and the program's arguments).
/// One app context of an mpirun: ranks, extra environment, arguments.
type Context<'a> = (usize, &'a [(&'a str, &'a str)], &'a [&'a str]);

fn mpirun(contexts: &[Context<'_>]) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "10", &LIMIT_S.to_string(), "mpirun", "--oversubscribe", "--bind-to", "none"]);
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    for (i, (ranks, env, args)) in contexts.iter().enumerate() {
        if i > 0 {
            cmd.arg(":");
        }
        cmd.args(["-n", &ranks.to_string(), "-x", "PROCJOB_MPI_NODE=rank"]);
        for (k, v) in env.iter() {
            cmd.args(["-x", &format!("{k}={v}")]);
        }
        cmd.arg(BIN).args(args.iter());
    }
    cmd.stdin(Stdio::null());
    cmd
}

fn run(cmd: &mut Command) -> (Output, String) {
    let out = cmd.output().expect("cannot run mpirun (is Open MPI installed?)");
    let text = format!(
        "{cmd:?}\nstatus {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

fn tmp_arg(dir: &TestDir) -> String {
    dir.tmp().display().to_string()
}

/// Every mode that applies, every dtype, 2 and 3 ranks, a shape whose rows
/// do not split evenly over the blocks: C equals seq's, the JSON says
/// backend mpi with the rank count, workers run on every rank, and bytes
/// crossed between ranks in each worker mode.
#[test]
fn every_mode_and_dtype_matches_seq_on_2_and_3_ranks() {
    for ranks in [2usize, 3] {
        for dtype in ["i64", "f64", "f32"] {
            let dir = TestDir::new("mpi-modes");
            let tmp = tmp_arg(&dir);
            let args = [
                "matmul",
                "--shape",
                "47x31x29",
                "--blocks",
                "7",
                "--dtype",
                dtype,
                "--json",
                "--quiet",
                "--temp-folder",
                &tmp,
            ];
            let (out, text) = run(&mut mpirun(&[(ranks, &[], &args)]));
            assert!(out.status.success(), "{text}");
            let lines = json_lines(&out);
            let modes: Vec<&str> = lines.iter().map(|l| l["mode"].as_str().unwrap()).collect();
            assert_eq!(modes, ["seq", "threads", "copy", "memmap", "memmap-out"], "{text}");
            for l in &lines {
                assert_eq!(l["matches_seq"], Value::Bool(true), "{text}");
                assert_eq!(l["backend"], "mpi", "{text}");
                assert_eq!(l["ranks"].as_u64(), Some(ranks as u64), "{text}");
                let mode = l["mode"].as_str().unwrap();
                if mode == "seq" || mode == "threads" {
                    continue;
                }
                assert!(l["bytes_between_ranks_out"].as_u64().unwrap() > 0, "{mode}: {text}");
                assert!(l["bytes_between_ranks_in"].as_u64().unwrap() > 0, "{mode}: {text}");
                let mut on: Vec<u64> =
                    l["workers"].as_array().unwrap().iter().map(|w| w["rank"].as_u64().unwrap()).collect();
                on.sort();
                on.dedup();
                assert_eq!(on, (0..ranks as u64).collect::<Vec<_>>(), "{mode}: workers not on every rank: {text}");
                let done: u64 = l["workers"].as_array().unwrap().iter().map(|w| w["tasks"].as_u64().unwrap()).sum();
                assert_eq!(done, 7, "{mode}: {text}");
                assert!(l["workers"][0]["host"].as_str().is_some_and(|h| !h.is_empty()), "{text}");
            }
            // memmap moves references, copy moves A and B: the bytes say so.
            let out_of =
                |m: &str| lines.iter().find(|l| l["mode"] == m).unwrap()["bytes_between_ranks_out"].as_u64().unwrap();
            assert!(out_of("copy") > 3 * out_of("memmap"), "{text}");
            assert_clean_parent(dir.tmp(), &text);
        }
    }
}

/// The tasks that ran on ranks other than 0, from a mode's JSON line.
fn remote_tasks(line: &Value) -> u64 {
    line["workers"].as_array().unwrap().iter().filter(|w| w["rank"] != 0).map(|w| w["tasks"].as_u64().unwrap()).sum()
}

/// A node that does not see rank 0's temp folder (simulated: the agents
/// answer the probe "not the same", and, being on the same machine, find
/// rank 0's run folder at the path they are to make): every mode runs and
/// matches seq. What crosses says how: memmap and memmap-out send B once to
/// each other node and the rows of A of each task that ran there, and C's
/// rows of those tasks come back (in the answers in memmap, written back
/// from the node's copy of C in memmap-out).
#[test]
fn a_temp_folder_not_shared_by_every_node_gets_the_rows_each_node_needs() {
    let dir = TestDir::new("mpi-private");
    let tmp = tmp_arg(&dir);
    let private: &[(&str, &str)] = &[("PROCJOB_MPI_SHARED_FS", "no")];
    let args = ["matmul", "--shape", "33x20x17", "--json", "--quiet", "--temp-folder", &tmp];
    let (out, text) = run(&mut mpirun(&[(2, private, &args)]));
    assert!(out.status.success(), "{text}");
    let modes: Vec<String> = json_lines(&out).iter().map(|l| l["mode"].as_str().unwrap().to_string()).collect();
    assert_eq!(modes, ["seq", "threads", "copy", "memmap", "memmap-out"], "{text}");
    assert!(json_lines(&out).iter().all(|l| l["matches_seq"] == Value::Bool(true)), "{text}");
    assert_clean_parent(dir.tmp(), &text);

    // 6 blocks of 25 rows.
    let (m, k, n, rows) = (150u64, 130u64, 110u64, 25u64);
    let shape = format!("{m}x{k}x{n}");
    for ranks in [2usize, 3] {
        for mode in ["memmap", "memmap-out"] {
            let args = [
                "matmul",
                "--shape",
                &shape,
                "--blocks",
                "6",
                "--mode",
                mode,
                "--json",
                "--quiet",
                "--temp-folder",
                &tmp,
            ];
            let (out, text) = run(&mut mpirun(&[(ranks, private, &args)]));
            assert!(out.status.success(), "{text}");
            let l = json_lines(&out).remove(0);
            assert_eq!(l["matches_seq"], Value::Bool(true), "{text}");
            assert_clean_parent(dir.tmp(), &text);
            let copies = ranks as u64 - 1;
            let remote = remote_tasks(&l);
            assert!(remote > 0, "{text}");
            let bytes = |way: &str| l[format!("bytes_between_ranks_{way}")].as_u64().unwrap();
            // Beyond the data: frames, message heads, the probe and the
            // folder's making, write-back notes; a few hundred bytes each.
            let slack = 2048 * copies + 1024 * remote;
            // Out: B once per other node, and the rows of A of each task
            // that ran there.
            let data_out = copies * k * n * 8 + remote * rows * k * 8;
            let sent = bytes("out");
            assert!(
                sent >= data_out && sent < data_out + slack,
                "{mode}, {ranks} ranks: {sent} bytes out for {data_out} of B and A's rows: {text}"
            );
            // In: the rows of C of those tasks (in the answers in memmap,
            // written back in memmap-out).
            let data_in = remote * rows * n * 8;
            let came = bytes("in");
            assert!(
                came >= data_in && came < data_in + slack,
                "{mode}, {ranks} ranks: {came} bytes in for {data_in} of C's rows: {text}"
            );
        }
    }
}

/// Nodes that really do not see rank 0's temp folder: ranks 1 and 2 run in
/// mount namespaces of their own with a fresh tmpfs over it (needs root;
/// skipped otherwise). Every mode matches seq, memmap-out's rows come back
/// from those nodes, and each node received B once and only the rows of A
/// its tasks read.
#[test]
fn nodes_with_their_own_temp_folder_get_what_they_read_and_send_back_what_they_write() {
    let can = Command::new("unshare").args(["-m", "true"]).output().is_ok_and(|o| o.status.success());
    if !can {
        eprintln!("skipped: `unshare -m` is refused here (needs root)");
        return;
    }
    let dir = TestDir::new("mpi-own-tmp");
    let tmp = tmp_arg(&dir);
    let log = dir.file("shipped.log");
    let log_arg = log.display().to_string();
    let (m, k, n, rows) = (150u64, 130u64, 110u64, 25u64);
    let shape = format!("{m}x{k}x{n}");
    let args = ["matmul", "--shape", &shape, "--blocks", "6", "--json", "--quiet", "--temp-folder", &tmp];
    let own = format!("mount -t tmpfs none '{tmp}' && exec \"$0\" \"$@\"");
    let env: &[(&str, &str)] = &[("PROCJOB_MPI_SHIP_LOG", &log_arg)];
    let cmd = mpirun(&[(1, env, &args), (2, env, &args)]);
    // The second context's program is procjob under `unshare -m sh -c …`.
    let mut args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
    let second = args.iter().rposition(|a| a == BIN).unwrap();
    args.splice(second..second, ["unshare", "-m", "sh", "-c", &own].map(String::from));
    let mut cmd = Command::new("timeout");
    cmd.args(&args).env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    cmd.stdin(Stdio::null());
    let (out, text) = run(&mut cmd);
    assert!(out.status.success(), "{text}");
    let lines = json_lines(&out);
    let modes: Vec<&str> = lines.iter().map(|l| l["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["seq", "threads", "copy", "memmap", "memmap-out"], "{text}");
    assert!(lines.iter().all(|l| l["matches_seq"] == Value::Bool(true)), "{text}");
    assert_clean_parent(dir.tmp(), &text);
    // What each node received, per file: "rank offset length path".
    let shipped = std::fs::read_to_string(&log).unwrap_or_default();
    for mode in ["memmap", "memmap-out"] {
        let line = lines.iter().find(|l| l["mode"] == mode).unwrap();
        for rank in [1u64, 2] {
            let got = |suffix: &str| -> u64 {
                shipped
                    .lines()
                    .map(|l| l.split(' ').collect::<Vec<_>>())
                    .filter(|f| f[0] == rank.to_string() && f[3].ends_with(suffix))
                    .filter(|f| {
                        // memmap-3-A.npy is memmap's, memmap-out-4-A.npy memmap-out's.
                        let name = f[3].rsplit('/').next().unwrap_or("");
                        name.strip_prefix(&format!("{mode}-"))
                            .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
                    })
                    .map(|f| f[2].parse::<u64>().unwrap())
                    .sum()
            };
            let tasks: u64 = line["workers"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|w| w["rank"] == rank)
                .map(|w| w["tasks"].as_u64().unwrap())
                .sum();
            assert_eq!(got("-B.npy"), k * n * 8, "{mode}, rank {rank}: B once\n{shipped}\n{text}");
            assert_eq!(got("-A.npy"), tasks * rows * k * 8, "{mode}, rank {rank}: A's rows\n{shipped}\n{text}");
        }
    }
    let back = |l: &Value| l["bytes_between_ranks_in"].as_u64().unwrap();
    let by_mode = |mode: &str| lines.iter().find(|l| l["mode"] == mode).unwrap();
    let c_rows = remote_tasks(by_mode("memmap-out")) * rows * n * 8;
    assert!(back(by_mode("memmap-out")) >= c_rows, "C's rows came back: {text}");
}

/// The shared-filesystem path proper: the probe passes, and memmap-out
/// writes C's rows in place from every node (only "done" comes back).
#[test]
fn memmap_out_writes_in_place_from_every_node() {
    let dir = TestDir::new("mpi-shared");
    let tmp = tmp_arg(&dir);
    let args = ["matmul", "--size", "200", "--mode", "memmap-out", "--json", "--quiet", "--temp-folder", &tmp];
    let (out, text) = run(&mut mpirun(&[(3, &[], &args)]));
    assert!(out.status.success(), "{text}");
    let l = &json_lines(&out)[0];
    assert_eq!(l["matches_seq"], Value::Bool(true), "{text}");
    // 200×200 i64 C is 320 KB; what came back is a few replies.
    assert!(l["bytes_between_ranks_in"].as_u64().unwrap() < 20_000, "{text}");
    assert_clean_parent(dir.tmp(), &text);
}

/// `procjob matmul` of a 100² `i64` product in 4 blocks (rows 25..50 the
/// second) on 2 workers in `mode`, quietly, in `tmp`.
fn four_blocks_on_two_workers<'a>(mode: &'a str, tmp: &'a str) -> [&'a str; 12] {
    ["matmul", "--size", "100", "--blocks", "4", "--processes", "2", "--mode", mode, "--quiet", "--temp-folder", tmp]
}

/// A worker on rank 1's node killed mid-task: the run fails naming the
/// worker, the task and the signal, and where the worker ran; with
/// `--retries 1` the task is re-run and C is right.
#[test]
fn a_worker_killed_on_another_node_is_named_and_retried() {
    let dir = TestDir::new("mpi-kill");
    let tmp = tmp_arg(&dir);
    let args = four_blocks_on_two_workers("memmap", &tmp);
    // Only rank 1's workers carry the fault; worker 1 is on rank 1.
    let fault: &[(&str, &str)] = &[("PROCJOB_TEST_FAULT", "kill@30")];
    let (out, text) = run(&mut mpirun(&[(1, &[], &args), (1, fault, &[])]));
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("killed by SIGKILL") && text.contains("rows 25..50"), "{text}");
    // Killed from outside (as the OOM killer would): no cause of procjob's.
    assert!(text.contains("the system may be out of memory") && !text.contains("procjob killed it"), "{text}");
    assert!(text.contains("worker 1 on rank 1 (host"), "{text}");
    assert_clean_parent(dir.tmp(), &text);

    let marker = dir.file("killed-once");
    let fault = format!("kill@30@once={}", marker.display());
    let fault: &[(&str, &str)] = &[("PROCJOB_TEST_FAULT", &fault)];
    let mut retry_args = args.to_vec();
    retry_args.extend(["--retries", "1", "--json"]);
    let (out, text) = run(&mut mpirun(&[(1, &[], &retry_args), (1, fault, &[])]));
    assert!(out.status.success(), "{text}");
    assert!(marker.exists(), "the fault never fired: {text}");
    assert_eq!(json_lines(&out)[0]["matches_seq"], Value::Bool(true), "{text}");
    assert!(
        text.contains("procjob: memmap: worker 1 (pid ") && text.contains("ran it again on a fresh worker"),
        "{text}"
    );
    let lost = json_lines(&out)[0]["lost"].as_array().cloned().unwrap_or_default();
    assert!(lost.len() == 1 && lost[0].as_str().is_some_and(|m| m.contains("rows 25..50")), "{text}");
    assert!(text.contains("worker 1 on rank 1 (host"), "the loss does not say where: {text}");
    assert_clean_parent(dir.tmp(), &text);
}

/// Rows a worker on a node without rank 0's folder wrote, which rank 0
/// cannot write into its C (a full disk, simulated once with
/// `PROCJOB_MPI_TEST_LAND_FAIL`), or which that node cannot send (simulated
/// once with `PROCJOB_MPI_TEST_SEND_FAIL`): procjob kills the worker, and
/// the batch fails as a worker's death does, the death saying why (not
/// that the system may be out of memory, as for a SIGKILL from elsewhere).
/// The run fails naming the cause, the task and where the worker ran; with
/// `--retries 1` the task runs again, C is right and the loss is said, with
/// its cause. It is never sent again without a word.
#[test]
fn rows_that_cannot_be_moved_fail_their_batch_as_a_death_does() {
    for (knob, cause) in [
        (
            "PROCJOB_MPI_TEST_LAND_FAIL",
            "procjob killed it: rank 0 could not take the rows it sent back (cannot write rows into",
        ),
        (
            "PROCJOB_MPI_TEST_SEND_FAIL",
            "procjob killed it: its node could not send rank 0 the rows it wrote (cannot open",
        ),
    ] {
        let dir = TestDir::new("mpi-rows");
        let tmp = tmp_arg(&dir);
        let env: &[(&str, &str)] = &[("PROCJOB_MPI_SHARED_FS", "no"), (knob, "1")];
        let args = four_blocks_on_two_workers("memmap-out", &tmp);
        let (out, text) = run(&mut mpirun(&[(2, env, &args)]));
        assert!(!out.status.success(), "{knob}: {text}");
        assert!(text.contains(cause) && text.contains(&format!("{knob}=1)")), "{knob}: {text}");
        assert!(text.contains("worker 1 (pid ") && text.contains("killed by SIGKILL"), "{knob}: {text}");
        assert!(!text.contains("out of memory"), "{knob}: {text}");
        assert!(text.contains("worker 1 on rank 1 (host"), "{knob}: {text}");
        assert_clean_parent(dir.tmp(), &text);

        let mut retry_args = args.to_vec();
        retry_args.extend(["--retries", "1", "--json"]);
        let (out, text) = run(&mut mpirun(&[(2, env, &retry_args)]));
        assert!(out.status.success(), "{knob}: {text}");
        let l = json_lines(&out).remove(0);
        assert_eq!(l["matches_seq"], Value::Bool(true), "{knob}: {text}");
        let lost = l["lost"].as_array().cloned().unwrap_or_default();
        assert!(lost.len() == 1 && lost[0].as_str().is_some_and(|m| m.contains(cause)), "{knob}: {text}");
        assert!(text.contains("ran it again on a fresh worker"), "{knob}: {text}");
        assert!(
            text.contains("under MPI: worker 0 on rank 0 (host") && text.contains("worker 1 on rank 1 (host"),
            "{knob}: {text}"
        );
        assert_clean_parent(dir.tmp(), &text);
    }
}

/// A task that hangs on rank 1's node: `--timeout` kills its worker there
/// (through its agent), the run fails at once with the task, the timeout
/// and where the worker ran, and nothing is left. (A timeout is not
/// retried, as on one machine: `--retries` re-runs tasks lost to a dead
/// worker.)
#[test]
fn a_task_hanging_on_another_node_times_out() {
    let dir = TestDir::new("mpi-timeout");
    let tmp = tmp_arg(&dir);
    let args = [
        "matmul",
        "--size",
        "100",
        "--blocks",
        "4",
        "--processes",
        "2",
        "--mode",
        "memmap",
        "--timeout",
        "1",
        "--quiet",
        "--temp-folder",
        &tmp,
    ];
    // Only rank 1's workers carry the fault; worker 1 is on rank 1.
    let mark = format!("timeout-{}", std::process::id());
    let marked_env: &[(&str, &str)] = &[("PROCJOB_MPI_TEST_RUN", &mark)];
    let fault: &[(&str, &str)] = &[("PROCJOB_TEST_FAULT", "hang@30"), ("PROCJOB_MPI_TEST_RUN", &mark)];
    let (out, text) = run(&mut mpirun(&[(1, marked_env, &args), (1, fault, &[])]));
    assert!(marked(&mark).is_empty(), "processes left: {:?}\n{text}", marked(&mark));
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("hanging in pid"), "the fault never fired: {text}");
    assert!(text.contains("rows 25..50") && text.contains("timeout of 1.000 s; the worker was killed"), "{text}");
    assert!(text.contains("worker 1 on rank 1 (host"), "{text}");
    assert_clean_parent(dir.tmp(), &text);
}

/// The ranks of the running job whose environment carries the test's
/// `mark`: pid and rank, from their environment.
fn ranks_of(mark: &str) -> Vec<(u32, usize)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else { continue };
        let vars: Vec<&[u8]> = env.split(|&b| b == 0).collect();
        let has = |k: &str| {
            vars.iter().find_map(|v| v.strip_prefix(k.as_bytes())).map(|v| String::from_utf8_lossy(v).into_owned())
        };
        if has("PROCJOB_WORKER=").is_some() || has("PROCJOB_MPI_TEST_RUN=").as_deref() != Some(mark) {
            continue;
        }
        if let Some(rank) = has("OMPI_COMM_WORLD_RANK=").and_then(|r| r.parse().ok()) {
            out.push((pid, rank));
        }
    }
    out
}

/// Under MPI a signal removes rank 0's run folder at once, while its
/// program is still busy (here in a seq product of several seconds): mpirun
/// SIGKILLs every rank about a second after it forwards a Ctrl-C as
/// SIGTERM, which a busy rank 0 could not outlast. Nothing is left.
#[test]
fn a_signal_removes_rank_0s_folder_at_once_under_mpi() {
    let dir = TestDir::new("mpi-signal-folder");
    let tmp = tmp_arg(&dir);
    let mark = format!("signal-folder-{}", std::process::id());
    let env: &[(&str, &str)] = &[("PROCJOB_MPI_TEST_RUN", &mark)];
    let args =
        ["matmul", "--size", "5000", "--dtype", "f64", "--mode", "seq", "--no-check", "--quiet", "--temp-folder", &tmp];
    let mut cmd = mpirun(&[(2, env, &args)]);
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let folders = || std::fs::read_dir(dir.tmp()).map(|d| d.count()).unwrap_or(0);
    let start = Instant::now();
    let rank0 = loop {
        if let Some(&(pid, _)) = ranks_of(&mark).iter().find(|&&(_, r)| r == 0) {
            if folders() > 0 {
                break pid;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(60), "the job never started");
        std::thread::sleep(Duration::from_millis(20));
    };
    let alive = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
    };
    let signalled = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(rank0 as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    // Rank 0 cannot stop on its own before its product ends or, at the
    // latest, 2 s after the signal (when it stops at once).
    while folders() > 0 && signalled.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let (gone, running) = (folders() == 0, alive(rank0));
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(gone, "the run folder was still there 1 s after the signal:\n{stderr}");
    assert!(running, "rank 0 had stopped already, so this shows nothing:\n{stderr}");
    assert_eq!(marked_after_the_end(&mark), Vec::<u32>::new(), "processes left:\n{stderr}");
    assert_clean_parent(dir.tmp(), &stderr);
}

/// A rank SIGKILLed mid-run: the job ends within seconds, non-zero, the
/// launcher's message names the rank and host, and no procjob process or
/// run folder is left.
#[test]
fn a_rank_killed_mid_run_ends_the_job_cleanly() {
    let dir = TestDir::new("mpi-rank-kill");
    let tmp = tmp_arg(&dir);
    let mark = format!("{}", std::process::id());
    let env: &[(&str, &str)] = &[("PROCJOB_MPI_TEST_RUN", &mark)];
    let args = [
        "matmul",
        "--size",
        "600",
        "--mode",
        "copy",
        "--repeat",
        "1000",
        "--quiet",
        "--no-check",
        "--temp-folder",
        &tmp,
    ];
    let mut cmd = mpirun(&[(2, env, &args)]);
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // Wait for rank 1 to run workers (its workers carry the mark too).
    let start = Instant::now();
    let rank1 = loop {
        let ranks = ranks_of(&mark);
        if let Some(&(pid, _)) = ranks.iter().find(|&&(_, r)| r == 1) {
            if marked(&mark).len() > 2 {
                break pid;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(60), "the job never started");
        std::thread::sleep(Duration::from_millis(50));
    };
    let killed = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(rank1 as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let out = child.wait_with_output().unwrap();
    let took = killed.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(took < Duration::from_secs(15), "the job took {took:?} to end after a rank died:\n{stderr}");
    assert!(stderr.contains("rank 1") || stderr.contains("rank: 1") || stderr.contains(",1]"), "{stderr}");
    // Workers go with their agent (parent-death signal), rank 0 with mpirun.
    assert_eq!(marked_after_the_end(&mark), Vec::<u32>::new(), "processes left after a rank died:\n{stderr}");
    assert_clean_parent(dir.tmp(), &stderr);
}

/// Ctrl-C to mpirun (SIGINT; `timeout` passes it on): every rank stops,
/// rank 0 says so and removes its run folder, and no process is left.
#[test]
fn ctrl_c_to_mpirun_stops_every_rank_and_leaves_nothing() {
    let dir = TestDir::new("mpi-ctrl-c");
    let tmp = tmp_arg(&dir);
    let mark = format!("ctrl-c-{}", std::process::id());
    let env: &[(&str, &str)] = &[("PROCJOB_MPI_TEST_RUN", &mark)];
    let args = [
        "matmul",
        "--size",
        "600",
        "--mode",
        "copy",
        "--repeat",
        "1000",
        "--quiet",
        "--no-check",
        "--temp-folder",
        &tmp,
    ];
    let mut cmd = mpirun(&[(2, env, &args)]);
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let start = Instant::now();
    // Both ranks and at least one worker of each.
    while marked(&mark).len() < 4 {
        assert!(start.elapsed() < Duration::from_secs(60), "the job never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Ctrl-C to mpirun alone: the child is `timeout`, which would pass a
    // SIGINT on to its whole process group (every rank at once, a race this
    // test does not cover); its one child is mpirun.
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", child.id())).unwrap();
    let mpirun_pid: i32 = children.split_whitespace().next().expect("timeout has started mpirun").parse().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(mpirun_pid), nix::sys::signal::Signal::SIGINT).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("procjob: stopped by SIGTERM; workers stopped, temp folder removed"), "{text}");
    assert_eq!(marked_after_the_end(&mark), Vec::<u32>::new(), "processes left after Ctrl-C:\n{text}");
    assert_clean_parent(dir.tmp(), &text);
}

/// Without the feature's check: `--backend mpi` outside mpirun is a usage
/// error that says how to start it.
#[test]
fn backend_mpi_outside_mpirun_says_how_to_start_it() {
    let out = Command::new(BIN).args(["matmul", "--size", "10", "--backend", "mpi"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("mpirun -n R procjob"));
}

/// The `Parallel` API under MPI with a temp folder other nodes do not see
/// (simulated): the `parallel_dot` example's B, above `max_nbytes`, is
/// dumped and shipped to them; the product equals one process's, and the
/// run folder is gone at the end.
#[test]
fn parallel_dumps_reach_nodes_that_do_not_see_the_temp_folder() {
    let example = build_example("parallel_dot");
    for ranks in [2usize, 3] {
        let dir = TestDir::new("mpi-parallel-private");
        let tmp = tmp_arg(&dir);
        let log = dir.file("shipped.log");
        let log_arg = log.display().to_string();
        let env: &[(&str, &str)] =
            &[("PROCJOB_MPI_SHARED_FS", "no"), ("PROCJOB_TEMP_FOLDER", &tmp), ("PROCJOB_MPI_SHIP_LOG", &log_arg)];
        let workers = (ranks * 2).to_string();
        let cmd = mpirun(&[(ranks, env, &["400", &workers])]);
        // mpirun's last argument before the program's is the program: swap
        // procjob for the example.
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| if a == BIN { example.display().to_string() } else { a.to_string_lossy().into_owned() })
            .collect();
        let mut cmd = Command::new("timeout");
        cmd.args(&args).env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
        cmd.stdin(Stdio::null());
        let (out, text) = run(&mut cmd);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("same C: yes"), "{text}");
        // B (400×400 i64, above max_nbytes) reached each other rank once:
        // its bytes, and no more ("rank offset length path" per piece).
        let shipped = std::fs::read_to_string(&log).unwrap_or_default();
        for rank in 1..ranks {
            let got: u64 = shipped
                .lines()
                .map(|l| l.split(' ').collect::<Vec<_>>())
                .filter(|f| f[0] == rank.to_string())
                .map(|f| f[2].parse::<u64>().unwrap())
                .sum();
            assert_eq!(got, 400 * 400 * 8, "rank {rank}\n{shipped}\n{text}");
        }
        assert!(!shipped.lines().any(|l| l.starts_with("0 ")), "{shipped}\n{text}");
        assert_clean_parent(dir.tmp(), &text);
    }
}
