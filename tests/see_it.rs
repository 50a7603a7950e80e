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
        let name = format!("worker {} (pid {})", w["index"], w["pid"]);
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
