//! A timeline of a run: every phase and task on every process, written as
//! Chrome trace-event JSON that Perfetto (ui.perfetto.dev) and
//! chrome://tracing open.
//!
//! Every timestamp comes from `CLOCK_MONOTONIC`, which is system-wide on
//! Linux, so the coordinator's spans and the workers' (reported in their
//! replies) share one time axis. Each process is a lane: the coordinator,
//! then one per worker process.

use serde::Serialize;

/// Which process a span belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Lane {
    /// The coordinator (this process).
    Coordinator,
    /// A worker process.
    Worker {
        /// Its slot in the pool.
        index: usize,
        /// Its process id.
        pid: u32,
    },
}

/// One span of time on a lane.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    /// Whose.
    pub lane: Lane,
    /// What happened, e.g. "compute task 3 (rows 500..750)".
    pub name: String,
    /// A category for filtering: dump, spawn, handshake, send, map,
    /// compute, reply, stack.
    pub category: &'static str,
    /// Start, nanoseconds on the monotonic clock.
    pub start_ns: u64,
    /// End, same clock.
    pub end_ns: u64,
}

/// Spans collected during a run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Trace {
    /// Every span, in the order recorded.
    pub spans: Vec<Span>,
}

#[derive(Serialize)]
struct ChromeEvent<'a> {
    name: &'a str,
    cat: &'a str,
    ph: &'static str,
    ts: f64,
    dur: f64,
    pid: u32,
    tid: u32,
}

#[derive(Serialize)]
struct ChromeMeta {
    name: &'static str,
    ph: &'static str,
    pid: u32,
    tid: u32,
    args: MetaArgs,
}

#[derive(Serialize)]
struct MetaArgs {
    name: String,
}

impl Trace {
    /// Records a span.
    pub fn span(&mut self, lane: Lane, category: &'static str, name: impl Into<String>, start_ns: u64, end_ns: u64) {
        self.spans.push(Span { lane, name: name.into(), category, start_ns, end_ns: end_ns.max(start_ns) });
    }

    /// Appends another trace's spans.
    pub fn extend(&mut self, other: Trace) {
        self.spans.extend(other.spans);
    }

    /// The trace as Chrome trace-event JSON: one complete event ("ph":"X")
    /// per span, times in microseconds from the first span, and a name for
    /// each lane ("coordinator (pid N)", "worker i (pid N)").
    pub fn to_chrome_json(&self) -> String {
        let origin = self.spans.iter().map(|s| s.start_ns).min().unwrap_or(0);
        let me = std::process::id();
        let pid_of = |lane: Lane| match lane {
            Lane::Coordinator => me,
            Lane::Worker { pid, .. } => pid,
        };
        let mut lanes: Vec<Lane> = self.spans.iter().map(|s| s.lane).collect();
        lanes.sort();
        lanes.dedup();
        let mut events: Vec<serde_json::Value> = lanes
            .iter()
            .map(|&lane| {
                let name = match lane {
                    Lane::Coordinator => format!("coordinator (pid {me})"),
                    Lane::Worker { index, pid } => format!("worker {index} (pid {pid})"),
                };
                let pid = pid_of(lane);
                serde_json::to_value(ChromeMeta {
                    name: "process_name",
                    ph: "M",
                    pid,
                    tid: pid,
                    args: MetaArgs { name },
                })
                .expect("trace metadata serializes")
            })
            .collect();
        events.extend(self.spans.iter().map(|s| {
            let pid = pid_of(s.lane);
            serde_json::to_value(ChromeEvent {
                name: &s.name,
                cat: s.category,
                ph: "X",
                ts: (s.start_ns - origin) as f64 / 1e3,
                dur: (s.end_ns - s.start_ns) as f64 / 1e3,
                pid,
                tid: pid,
            })
            .expect("trace events serialize")
        }));
        serde_json::json!({ "traceEvents": events, "displayTimeUnit": "ms" }).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chrome_json_has_a_named_lane_per_process_and_an_event_per_span() {
        let mut t = Trace::default();
        t.span(Lane::Coordinator, "dump", "dump A and B", 1_000, 3_000);
        t.span(Lane::Worker { index: 0, pid: 42 }, "compute", "compute task 0 (rows 0..5)", 2_000, 9_000);
        let v: serde_json::Value = serde_json::from_str(&t.to_chrome_json()).unwrap();
        let events = v["traceEvents"].as_array().unwrap();
        let names: Vec<&str> =
            events.iter().filter(|e| e["ph"] == "M").map(|e| e["args"]["name"].as_str().unwrap()).collect();
        assert_eq!(names.len(), 2);
        assert!(names.contains(&"worker 0 (pid 42)"));
        let compute = events.iter().find(|e| e["cat"] == "compute").unwrap();
        assert_eq!(
            (compute["ts"].as_f64(), compute["dur"].as_f64(), compute["pid"].as_u64()),
            (Some(1.0), Some(7.0), Some(42))
        );
    }
}
