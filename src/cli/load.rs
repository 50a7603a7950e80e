//! How busy the machine is while procjob times something: the load
//! average from `/proc/loadavg`, and the CPU time every other process took
//! over a stretch of time, from `/proc/stat` (all CPUs' busy time) less
//! this process's own and its reaped children's (`/proc/self/stat`).
//!
//! A timing taken while other programs keep the CPUs busy is slower and
//! more spread than on an idle machine, and a speedup lower; the demo says
//! so in one line. For tests, [`OTHERS_ENV`] replaces the measured figure,
//! so that both sides of that line can be shown without making a machine
//! busy or idle.

use std::time::Instant;

/// Overrides the measured CPUs used by other processes (a decimal number,
/// e.g. `1.5`): for tests of what is printed on a busy or an idle machine.
pub(crate) const OTHERS_ENV: &str = "PROCJOB_OTHER_CPUS";

/// Other processes using this many CPUs or more make the machine "busy".
const BUSY_CPUS: f64 = 0.25;

/// Busy CPU time, in clock ticks, of the whole machine and of this process
/// (with its reaped children) at one moment.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuClock {
    at: Instant,
    machine_busy: u64,
    ours: u64,
}

impl CpuClock {
    /// Reads the clocks now (`None` where /proc is not there to read).
    pub(crate) fn now() -> Option<CpuClock> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let ours = std::fs::read_to_string("/proc/self/stat").ok()?;
        Some(CpuClock { at: Instant::now(), machine_busy: machine_busy_ticks(&stat)?, ours: own_ticks(&ours)? })
    }

    /// CPUs other processes kept busy, on average, from `self` to `later`.
    pub(crate) fn others_until(&self, later: &CpuClock) -> f64 {
        let seconds = later.at.duration_since(self.at).as_secs_f64();
        let busy = later.machine_busy.saturating_sub(self.machine_busy);
        let ours = later.ours.saturating_sub(self.ours);
        others_cpus(busy, ours, seconds, ticks_per_second())
    }
}

/// The load of the machine over a stretch of time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Load {
    /// CPUs other processes kept busy, on average.
    pub(crate) others_cpus: f64,
    /// The 1-minute load average (runnable processes), when readable.
    pub(crate) loadavg_1m: Option<f64>,
}

impl Load {
    /// The load from `start` until now, or the figure of [`OTHERS_ENV`]
    /// when it is set.
    pub(crate) fn since(start: Option<CpuClock>) -> Option<Load> {
        let loadavg_1m = std::fs::read_to_string("/proc/loadavg").ok().and_then(|t| loadavg(&t));
        if let Some(injected) = std::env::var(OTHERS_ENV).ok().and_then(|v| v.trim().parse::<f64>().ok()) {
            return Some(Load { others_cpus: injected.max(0.0), loadavg_1m });
        }
        let (start, end) = (start?, CpuClock::now()?);
        Some(Load { others_cpus: start.others_until(&end), loadavg_1m })
    }

    /// Whether other programs took enough CPU to change the timings.
    pub(crate) fn busy(&self) -> bool {
        self.others_cpus >= BUSY_CPUS
    }

    /// One line on a busy machine, saying what it does to the figures;
    /// `None` on an idle one.
    pub(crate) fn busy_line(&self, cpus: usize) -> Option<String> {
        self.busy().then(|| {
            format!(
                "busy machine: other programs used {:.1} of {cpus} CPU{} meanwhile, so times \
                 are slower and more spread, and speedups lower, than on an idle one",
                self.others_cpus.min(cpus as f64),
                if cpus == 1 { "" } else { "s" }
            )
        })
    }
}

/// CPUs other processes used: the machine's busy ticks less ours, per
/// second, per tick rate.
fn others_cpus(machine_busy: u64, ours: u64, seconds: f64, ticks_per_second: f64) -> f64 {
    if seconds <= 0.0 || ticks_per_second <= 0.0 {
        return 0.0;
    }
    machine_busy.saturating_sub(ours) as f64 / ticks_per_second / seconds
}

/// The busy ticks of all CPUs, from the first ("cpu ") line of
/// /proc/stat: user, nice, system, irq, softirq and steal (a virtual
/// machine's CPU taken by other machines); not idle nor iowait.
fn machine_busy_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line.split_whitespace().skip(1).map(|f| f.parse().ok()).collect::<Option<_>>()?;
    let at = |i: usize| fields.get(i).copied().unwrap_or(0);
    Some(at(0) + at(1) + at(2) + at(5) + at(6) + at(7))
}

/// utime + stime + cutime + cstime from /proc/self/stat (fields 14–17,
/// counted after the command name, which may hold spaces).
fn own_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Field 3 (state) is fields[0]; utime is field 14.
    (11..15).map(|i| fields.get(i)?.parse::<u64>().ok()).sum()
}

/// The 1-minute figure of /proc/loadavg.
fn loadavg(text: &str) -> Option<f64> {
    text.split_whitespace().next()?.parse().ok()
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn others_are_the_machine_less_this_process() {
        let stat = "cpu  100 5 20 9000 7 1 2 3 0 0\ncpu0 1 2 3 4\n";
        assert_eq!(machine_busy_ticks(stat), Some(100 + 5 + 20 + 1 + 2 + 3));
        let own = "42 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17";
        // utime..cstime are 11, 12, 13, 14 after the state.
        assert_eq!(own_ticks(own), Some(11 + 12 + 13 + 14));
        // 300 busy ticks in 1 s at 100 ticks/s, 100 of them ours: 2 CPUs.
        assert_eq!(others_cpus(300, 100, 1.0, 100.0), 2.0);
        assert_eq!(others_cpus(100, 300, 1.0, 100.0), 0.0);
        assert_eq!(loadavg("0.51 1.13 0.90 3/113 16188\n"), Some(0.51));
    }

    #[test]
    fn the_busy_line_is_there_only_when_others_take_cpu() {
        let busy = Load { others_cpus: 1.6, loadavg_1m: Some(3.0) };
        let line = busy.busy_line(2).expect("a line on a busy machine");
        assert!(line.contains("1.6 of 2 CPUs"), "{line}");
        let idle = Load { others_cpus: 0.05, loadavg_1m: Some(0.1) };
        assert_eq!(idle.busy_line(2), None);
    }
}
