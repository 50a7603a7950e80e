//! What `procjob matmul` shows a student: the timeline (`--trace`), and
//! where the memory goes in each mode.

mod util;

use serde_json::Value;
use util::TestDir;

#[test]
fn trace_is_chrome_json_with_a_lane_per_worker_and_an_event_per_task() {
    let dir = TestDir::new("trace");
    let trace = dir.file("trace.json");
    let mut cmd = dir.matmul();
    cmd.args(["--size", "60", "--processes", "2", "--blocks", "5", "--mode", "memmap", "--trace"]).arg(&trace);
    cmd.args(["--json"]);
    let run = cmd.run().assert_ok();
    let report = &run.json_lines()[0];
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).expect("the trace is JSON");
    let events = v["traceEvents"].as_array().expect("a traceEvents list");
    let lanes: Vec<&str> =
        events.iter().filter(|e| e["ph"] == "M").map(|e| e["args"]["name"].as_str().unwrap()).collect();
    // One lane for the coordinator and one per worker process.
    let workers = report["workers"].as_array().unwrap();
    assert_eq!(lanes.len(), 1 + workers.len(), "{lanes:?}");
    for w in workers {
        let name = format!("memmap: worker {} (pid {})", w["index"], w["pid"]);
        assert!(lanes.contains(&name.as_str()), "no lane {name} in {lanes:?}");
    }
    // An event for every task, on the lane of the worker that ran it.
    let computes: Vec<&Value> = events.iter().filter(|e| e["cat"] == "compute").collect();
    for (task, rows) in [(0, "0..12"), (1, "12..24"), (2, "24..36"), (3, "36..48"), (4, "48..60")] {
        let name = format!("compute task {task} (rows {rows})");
        let e = computes.iter().find(|e| e["name"] == name.as_str()).unwrap_or_else(|| panic!("no event {name}"));
        assert!(workers.iter().any(|w| w["pid"] == e["pid"]), "{name} is not on a worker lane");
        assert!(e["dur"].as_f64().unwrap() >= 0.0 && e["ts"].as_f64().unwrap() >= 0.0);
    }
    for category in ["dump", "spawn", "handshake", "send", "map", "compute", "reply", "stack"] {
        assert!(events.iter().any(|e| e["cat"] == category), "no {category} event");
    }
}

#[test]
fn copy_mode_workers_each_hold_b_and_memmap_workers_share_it() {
    // B is 2048² f64 = 32 MiB.
    let dir = TestDir::new("memory");
    let size_b = 2048u64 * 2048 * 8;
    let processes = 2u64;
    let uss = |mode: &str| -> (u64, u64) {
        let mut cmd = dir.matmul();
        cmd.args(["--size", "2048", "--dtype", "f64", "--processes", "2", "--no-check", "--json", "--mode", mode]);
        let run = cmd.run().assert_ok();
        let report = &run.json_lines()[0];
        let workers = report["workers"].as_array().unwrap();
        assert_eq!(workers.len() as u64, processes);
        let sum = |field: &str| workers.iter().map(|w| w[field].as_u64().unwrap()).sum::<u64>();
        assert!(sum("peak_rss_bytes") > 0 && sum("peak_pss_bytes") > 0, "{report}");
        (sum("peak_uss_bytes"), sum("peak_pss_bytes"))
    };
    let (copy_uss, _) = uss("copy");
    let (memmap_uss, _) = uss("memmap");
    assert!(
        copy_uss >= memmap_uss + (processes - 1) * size_b,
        "copy USS {copy_uss} should exceed memmap USS {memmap_uss} by at least {} (N-1 copies of B)",
        (processes - 1) * size_b
    );
}

/// The events of `category` on process `pid`, as (start, end) in µs.
fn spans_of(events: &[Value], category: &str, pid: &Value) -> Vec<(f64, f64)> {
    events
        .iter()
        .filter(|e| e["cat"] == category && e["pid"] == *pid && e["ph"] == "X")
        .map(|e| {
            let ts = e["ts"].as_f64().unwrap();
            (ts, ts + e["dur"].as_f64().unwrap())
        })
        .collect()
}

#[test]
fn trace_flows_pair_every_send_with_its_receive_and_every_reply_with_its_read_with_bytes() {
    let dir = TestDir::new("flows");
    let trace = dir.file("trace.json");
    let mut cmd = dir.matmul();
    cmd.args(["--size", "60", "--processes", "2", "--blocks", "5", "--mode", "copy"]);
    cmd.arg("--trace").arg(&trace).arg("--json");
    let run = cmd.run().assert_ok();
    let reports = run.json_lines();
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).expect("the trace is JSON");
    let events = v["traceEvents"].as_array().expect("a traceEvents list");
    let coordinator = &events.iter().find(|e| e["cat"] == "send").expect("a send")["pid"];
    let starts: Vec<&Value> = events.iter().filter(|e| e["ph"] == "s").collect();
    let ends: Vec<&Value> = events.iter().filter(|e| e["ph"] == "f").collect();
    assert_eq!(starts.len(), ends.len());
    let inside = |spans: &[(f64, f64)], ts: f64| spans.iter().any(|&(a, b)| a <= ts && ts <= b);
    let (mut sends, mut replies) = (0, 0);
    let (mut bytes_in, mut bytes_out) = (0u64, 0u64);
    for s in &starts {
        let matching: Vec<&&Value> = ends.iter().filter(|f| f["id"] == s["id"]).collect();
        assert_eq!(matching.len(), 1, "flow {s} has {} ends", matching.len());
        let f = matching[0];
        assert_eq!(f["bp"], "e", "{f}");
        let bytes = s["args"]["bytes"].as_u64().expect("a flow carries its bytes");
        assert_eq!(f["args"]["bytes"].as_u64(), Some(bytes));
        assert!(bytes > 0 && s["name"].as_str().unwrap().ends_with(&format!(": {bytes} bytes")), "{s}");
        let (s_ts, f_ts) = (s["ts"].as_f64().unwrap(), f["ts"].as_f64().unwrap());
        assert!(s_ts <= f_ts, "a flow goes forward in time: {s} {f}");
        if s["pid"] == *coordinator {
            // A send: inside the coordinator's send span, received inside the
            // worker's receive-and-map span.
            assert!(inside(&spans_of(events, "send", coordinator), s_ts), "{s}");
            assert!(inside(&spans_of(events, "map", &f["pid"]), f_ts), "{f}");
            sends += 1;
            bytes_in += bytes;
        } else {
            // A reply: inside the worker's reply span, read inside the
            // coordinator's stack span.
            assert_eq!(f["pid"], *coordinator, "{f}");
            assert!(inside(&spans_of(events, "reply", &s["pid"]), s_ts), "{s}");
            assert!(inside(&spans_of(events, "stack", coordinator), f_ts), "{f}");
            replies += 1;
            bytes_out += bytes;
        }
    }
    // Every send event has its flow; every task its reply: 5 tasks.
    let send_events = events.iter().filter(|e| e["cat"] == "send" && e["ph"] == "X").count();
    assert_eq!((sends, replies, send_events), (5, 5, 5));
    // copy: each task carries its rows of A and all of B, each reply its
    // rows of C: 5 × B + A, and C, plus framing.
    let (a, b, c) = (60 * 60 * 8u64, 60 * 60 * 8u64, 60 * 60 * 8u64);
    assert!((5 * b + a..5 * b + a + 5 * 200).contains(&bytes_in), "{bytes_in}");
    assert!((c..c + 5 * 200).contains(&bytes_out), "{bytes_out}");
    // And they are exactly what the report counts.
    let reported = |f: &str| reports[0][f].as_u64().unwrap();
    assert_eq!((bytes_in, bytes_out), (reported("bytes_to_workers"), reported("bytes_from_workers")));
}

/// memmap's blocks of C (4 MiB or more each) are lent by the workers and
/// copied out of their memory — the trace's receive spans say how many
/// bytes — and with `PROCJOB_LEND=0` they come through the pipes; C is
/// seq's either way, and the report counts the same bytes from workers.
#[test]
fn large_blocks_are_read_from_the_workers_memory_unless_lending_is_off() {
    if util::lending_forbidden() {
        return;
    }
    let dir = TestDir::new("lent");
    let run = |lend: &str| {
        let trace = dir.file(&format!("trace-{lend}.json"));
        let mut cmd = dir.matmul();
        cmd.args(["--size", "1100", "--dtype", "f64", "--processes", "2", "--mode", "memmap", "--json", "--trace"]);
        cmd.arg(&trace).env("PROCJOB_LEND", lend);
        let report = cmd.run().assert_ok().json_lines()[0].clone();
        assert_eq!(report["matches_seq"], true, "{report}");
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).expect("the trace is JSON");
        let receives: Vec<String> = v["traceEvents"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["name"].as_str().filter(|n| n.starts_with("receive from worker")).map(String::from))
            .collect();
        assert_eq!(receives.len(), 2, "{receives:?}");
        (receives, report["bytes_from_workers"].as_u64().unwrap())
    };
    let block = 550 * 1100 * 8;
    let (lent, lent_bytes) = run("1");
    let read = format!("{block} bytes read from its memory");
    assert!(lent.iter().all(|r| r.ends_with(&read)), "not lent: {lent:?}");
    let (piped, piped_bytes) = run("0");
    assert!(piped.iter().all(|r| !r.contains("memory")), "lent with PROCJOB_LEND=0: {piped:?}");
    for bytes in [lent_bytes, piped_bytes] {
        assert!((2 * block..2 * block + 1000).contains(&bytes), "{bytes} bytes from workers");
    }
}

#[test]
fn matmul_shows_each_modes_spread_and_calls_an_overlap_a_tie() {
    let dir = TestDir::new("spread");
    let mut cmd = dir.matmul();
    cmd.args(["--size", "60", "--repeat", "3", "--quiet"]);
    let run = cmd.run().assert_ok();
    let table: Vec<&str> = run.stdout.lines().skip_while(|l| !l.starts_with("spread ")).collect();
    assert!(!table.is_empty(), "no spread table:\n{}", run.stdout);
    for mode in ["seq ", "threads ", "memmap "] {
        let row = table.iter().find(|l| l.starts_with(mode)).unwrap_or_else(|| panic!("no {mode:?}: {table:#?}"));
        assert!(row.contains("–"), "{row}");
        if mode != "seq " {
            assert!(["a tie (spreads overlap)", "faster", "slower"].iter().any(|v| row.ends_with(v)), "{row}");
        }
    }
    // One repetition: no spread to show.
    let mut cmd = dir.matmul();
    cmd.args(["--size", "60", "--quiet", "--mode", "memmap"]);
    assert!(!cmd.run().assert_ok().stdout.contains("fastest–slowest"));
    // JSON: the spread's ends.
    let mut cmd = dir.matmul();
    cmd.args(["--size", "60", "--repeat", "3", "--json", "--mode", "seq"]);
    let report = &cmd.run().assert_ok().json_lines()[0];
    let walls: Vec<f64> = report["walls_s"].as_array().unwrap().iter().map(|w| w.as_f64().unwrap()).collect();
    let min = walls.iter().copied().fold(f64::INFINITY, f64::min);
    let max = walls.iter().copied().fold(0.0, f64::max);
    assert_eq!((report["wall_min_s"].as_f64(), report["wall_max_s"].as_f64()), (Some(min), Some(max)));
}

#[test]
fn threads_mode_has_a_lane_per_thread_with_the_blocks_it_computed() {
    let dir = TestDir::new("thread-lanes");
    let trace = dir.file("trace.json");
    let mut cmd = dir.matmul();
    cmd.args(["--size", "40", "--processes", "2", "--blocks", "4", "--mode", "threads", "--trace"]).arg(&trace);
    cmd.run().assert_ok();
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).expect("the trace is JSON");
    let events = v["traceEvents"].as_array().expect("a traceEvents list");
    let threads: Vec<&Value> = events.iter().filter(|e| e["ph"] == "M" && e["name"] == "thread_name").collect();
    let names: Vec<&str> = threads.iter().map(|e| e["args"]["name"].as_str().unwrap()).collect();
    assert!(!names.is_empty() && names.len() <= 2, "{names:?}");
    assert!(names.iter().all(|n| n.starts_with("threads: thread ")), "{names:?}");
    // Every block is computed once, on a thread lane of this process.
    let mut rows: Vec<&str> = events
        .iter()
        .filter(|e| e["cat"] == "compute" && threads.iter().any(|t| t["tid"] == e["tid"] && t["pid"] == e["pid"]))
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    rows.sort_unstable();
    assert_eq!(rows, ["compute rows 0..10", "compute rows 10..20", "compute rows 20..30", "compute rows 30..40"]);
}

#[test]
fn matmul_says_when_other_programs_kept_the_cpus_busy_and_not_when_idle() {
    let dir = TestDir::new("busy");
    let run = |others: &str| {
        let mut cmd = dir.matmul();
        cmd.args(["--size", "40", "--mode", "memmap", "--quiet"]).env("PROCJOB_OTHER_CPUS", others);
        cmd.run().assert_ok().stdout
    };
    let busy = run("1.5");
    assert_eq!(
        busy.lines().filter(|l| l.starts_with("busy machine: other programs used 1.5 of ")).count(),
        1,
        "{busy}"
    );
    let idle = run("0");
    assert!(!idle.contains("busy machine"), "{idle}");
}
