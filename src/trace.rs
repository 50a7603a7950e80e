//! A timeline of a run: every phase and task on every process, written as
//! Chrome trace-event JSON that Perfetto (ui.perfetto.dev) and
//! chrome://tracing open.
//!
//! Every timestamp comes from `CLOCK_MONOTONIC`, which is system-wide on
//! Linux, so the coordinator's spans and the workers' (reported in their
//! replies) share one time axis. Each process is a lane: the coordinator,
//! then one per worker process, named after the mode it served when the
//! caller says ([`Trace::name_worker_lanes`]). A message between two lanes
//! is a flow, an arrow from the send in one to the receive in the other,
//! carrying its byte count.

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
    /// A thread of the coordinator computing blocks (mode threads).
    Thread {
        /// Its number among the mode's threads.
        index: usize,
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

/// A message from one lane to another: an arrow in the trace viewer.
#[derive(Debug, Clone, PartialEq)]
pub struct Flow {
    /// Unique in this process, so traces can be merged.
    pub id: u64,
    /// What the message was, e.g. "task 3 (rows 500..750)".
    pub name: String,
    /// Bytes it carried, framing included.
    pub bytes: u64,
    /// Of those, the bytes the receiver copied out of the sender's memory
    /// (results lent by address) rather than read from the pipe.
    pub lent: u64,
    /// The sending lane, and when (where its send span starts or inside it).
    pub from: (Lane, u64),
    /// The receiving lane, and when (inside its receive span).
    pub to: (Lane, u64),
}

/// A send to a worker whose receive is not known yet.
#[derive(Debug, Clone, PartialEq)]
struct Outgoing {
    at_ns: u64,
    bytes: u64,
    name: String,
}

/// Spans collected during a run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Trace {
    /// Every span, in the order recorded.
    pub spans: Vec<Span>,
    /// Every message between lanes whose both ends are known.
    pub flows: Vec<Flow>,
    /// Sends to each worker slot awaiting their receive.
    outgoing: std::collections::BTreeMap<usize, Outgoing>,
    /// A prefix for the names of worker lanes, e.g. "memmap".
    lane_prefix: std::collections::BTreeMap<Lane, String>,
}

/// Flow ids, unique in this process.
static FLOW_IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

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

    /// Appends another trace's spans, flows and lane names.
    pub fn extend(&mut self, other: Trace) {
        self.spans.extend(other.spans);
        self.flows.extend(other.flows);
        self.lane_prefix.extend(other.lane_prefix);
    }

    /// Records that `bytes` were sent to worker slot `worker` at `at_ns`;
    /// the flow is complete once [`received`](Trace::received) is told.
    pub fn sent(&mut self, worker: usize, at_ns: u64, bytes: u64, name: impl Into<String>) {
        self.outgoing.insert(worker, Outgoing { at_ns, bytes, name: name.into() });
    }

    /// Records that the worker on `lane` received what was last sent to its
    /// slot, at `at_ns`.
    pub fn received(&mut self, lane: Lane, at_ns: u64) {
        let Lane::Worker { index, .. } = lane else { return };
        if let Some(out) = self.outgoing.remove(&index) {
            self.flow(out.name, out.bytes, (Lane::Coordinator, out.at_ns), (lane, at_ns));
        }
    }

    /// Records a message of `bytes` from one lane to another.
    pub fn flow(&mut self, name: impl Into<String>, bytes: u64, from: (Lane, u64), to: (Lane, u64)) {
        self.flow_lent(name, bytes, 0, from, to);
    }

    /// Records a message of `bytes` from one lane to another, `lent` of
    /// which the receiver copied out of the sender's memory.
    pub fn flow_lent(&mut self, name: impl Into<String>, bytes: u64, lent: u64, from: (Lane, u64), to: (Lane, u64)) {
        let id = FLOW_IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.flows.push(Flow { id, name: name.into(), bytes, lent, from, to });
    }

    /// Names every worker lane in this trace after `mode` ("copy: worker 0
    /// (pid N)").
    pub fn name_worker_lanes(&mut self, mode: &str) {
        let lanes: Vec<Lane> = self.spans.iter().map(|s| s.lane).filter(|l| matches!(l, Lane::Worker { .. })).collect();
        for lane in lanes {
            self.lane_prefix.entry(lane).or_insert_with(|| mode.to_string());
        }
    }

    /// The trace as Chrome trace-event JSON: one complete event ("ph":"X")
    /// per span, times in microseconds from the first span, and a name for
    /// each lane ("coordinator (pid N)", "worker i (pid N)").
    pub fn to_chrome_json(&self) -> String {
        let origin = self.spans.iter().map(|s| s.start_ns).min().unwrap_or(0);
        let me = std::process::id();
        let pid_of = |lane: Lane| match lane {
            Lane::Coordinator | Lane::Thread { .. } => me,
            Lane::Worker { pid, .. } => pid,
        };
        // A thread lane is a thread of the coordinator's process.
        let tid_of = |lane: Lane| match lane {
            Lane::Thread { index } => u32::try_from(index).unwrap_or(u32::MAX - 1).saturating_add(1),
            lane => pid_of(lane),
        };
        let mut lanes: Vec<Lane> = self.spans.iter().map(|s| s.lane).collect();
        lanes.sort();
        lanes.dedup();
        let mut events: Vec<serde_json::Value> = lanes
            .iter()
            .map(|&lane| {
                let name = match lane {
                    Lane::Coordinator => format!("coordinator (pid {me})"),
                    Lane::Thread { index } => format!("threads: thread {index}"),
                    Lane::Worker { index, pid } => match self.lane_prefix.get(&lane) {
                        Some(mode) => format!("{mode}: worker {index} (pid {pid})"),
                        None => format!("worker {index} (pid {pid})"),
                    },
                };
                let pid = pid_of(lane);
                serde_json::to_value(ChromeMeta {
                    name: if matches!(lane, Lane::Thread { .. }) { "thread_name" } else { "process_name" },
                    ph: "M",
                    pid,
                    tid: tid_of(lane),
                    args: MetaArgs { name },
                })
                .expect("trace metadata serializes")
            })
            .collect();
        events.extend(self.spans.iter().map(|s| {
            serde_json::to_value(ChromeEvent {
                name: &s.name,
                cat: s.category,
                ph: "X",
                ts: (s.start_ns - origin) as f64 / 1e3,
                dur: (s.end_ns - s.start_ns) as f64 / 1e3,
                pid: pid_of(s.lane),
                tid: tid_of(s.lane),
            })
            .expect("trace events serialize")
        }));
        // Each flow: a start ("s") inside the send span, a finish ("f",
        // bound to the enclosing span) inside the receive span.
        for f in &self.flows {
            let name = format!("{}: {} bytes", f.name, f.bytes);
            for (ph, (lane, at)) in [("s", f.from), ("f", f.to)] {
                let mut e = serde_json::json!({
                    "name": name, "cat": "flow", "ph": ph, "id": f.id,
                    "ts": at.saturating_sub(origin) as f64 / 1e3, "pid": pid_of(lane), "tid": tid_of(lane),
                    "args": { "bytes": f.bytes, "lent_bytes": f.lent },
                });
                if ph == "f" {
                    e["bp"] = serde_json::json!("e");
                }
                events.push(e);
            }
        }
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

    #[test]
    fn a_send_and_its_receive_make_one_flow_with_its_bytes_and_lanes_take_the_mode() {
        let worker = Lane::Worker { index: 1, pid: 42 };
        let mut t = Trace::default();
        t.span(Lane::Coordinator, "send", "send task 0", 1_000, 2_000);
        t.sent(1, 1_500, 300, "task 0");
        t.span(worker, "map", "receive and map", 3_000, 4_000);
        // A receive on another slot does not complete it.
        t.received(Lane::Worker { index: 0, pid: 41 }, 3_500);
        assert!(t.flows.is_empty());
        t.received(worker, 3_500);
        t.name_worker_lanes("memmap");
        let v: serde_json::Value = serde_json::from_str(&t.to_chrome_json()).unwrap();
        let events = v["traceEvents"].as_array().unwrap();
        let start = events.iter().find(|e| e["ph"] == "s").expect("a flow start");
        let end = events.iter().find(|e| e["ph"] == "f").expect("a flow end");
        assert_eq!(start["id"], end["id"]);
        assert_eq!((start["pid"].as_u64(), end["pid"].as_u64()), (Some(u64::from(std::process::id())), Some(42)));
        assert_eq!((start["ts"].as_f64(), end["ts"].as_f64()), (Some(0.5), Some(2.5)));
        assert_eq!((start["args"]["bytes"].as_u64(), end["bp"].as_str()), (Some(300), Some("e")));
        let names: Vec<&str> =
            events.iter().filter(|e| e["ph"] == "M").map(|e| e["args"]["name"].as_str().unwrap()).collect();
        assert!(names.contains(&"memmap: worker 1 (pid 42)"), "{names:?}");
    }
}
