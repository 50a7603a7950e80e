//! [`Parallel::verbose`](super::Parallel::verbose): joblib's progress
//! messages on stderr, `[Parallel(n_jobs=2)]: Done  40 out of 200 tasks |
//! elapsed: 1.2s`.
//!
//! Levels: 0 says nothing (the default). From 1 to 9, on a terminal, one
//! line with a bar is rewritten in place (at most ten times a second, and
//! once more at the end); when stderr is not a terminal (a pipe, a file, a
//! CI log) nothing is written. From 10 up, plain lines are written, one per
//! batch completed and one at the end, whether stderr is a terminal or not:
//! the level for logs. Written straight to the process's stderr, so a test
//! harness's output capture does not swallow it.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use super::builder::Progress;

/// The level from which plain lines are written, terminal or not.
pub(super) const LINES_LEVEL: u32 = 10;

/// How often a line updated in place is rewritten, at most.
const IN_PLACE_EVERY: Duration = Duration::from_millis(100);

/// Cells of the bar of a line updated in place.
const BAR_CELLS: usize = 20;

/// How a call reports its progress on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    /// Nothing is written.
    Off,
    /// One line, rewritten in place (stderr is a terminal).
    InPlace,
    /// A line per batch completed.
    Lines,
}

/// The progress messages of one call.
#[derive(Debug)]
pub(super) struct Verbose {
    /// How they are written.
    style: Style,
    /// The `n_jobs` the messages name.
    n_jobs: usize,
    /// When the line in place was last written (`None`: not yet).
    last: Option<Instant>,
}

impl Verbose {
    /// The messages of a call at `level` on `n_jobs` workers, written on
    /// this process's stderr.
    pub(super) fn new(level: u32, n_jobs: usize) -> Verbose {
        let style = match level {
            0 => Style::Off,
            l if l >= LINES_LEVEL => Style::Lines,
            _ if std::io::stderr().is_terminal() => Style::InPlace,
            _ => Style::Off,
        };
        Verbose { style, n_jobs, last: None }
    }

    /// Reports the progress after a batch completed.
    pub(super) fn update(&mut self, p: &Progress) {
        match self.style {
            Style::Off => {}
            Style::Lines => write_stderr(&format!("{}\n", line(self.n_jobs, p, false))),
            Style::InPlace => {
                if self.last.is_some_and(|t| t.elapsed() < IN_PLACE_EVERY) {
                    return;
                }
                self.last = Some(Instant::now());
                write_stderr(&format!("\r{}{}\x1b[K", line(self.n_jobs, p, false), bar(p)));
            }
        }
    }

    /// Ends the messages of the call: the last line says `finished` when
    /// every task completed; a line left in place is ended either way.
    pub(super) fn finish(&mut self, p: &Progress, complete: bool) {
        let last = complete.then(|| line(self.n_jobs, p, true));
        match (self.style, last) {
            (Style::Off, _) | (Style::Lines, None) => {}
            (Style::Lines, Some(l)) => write_stderr(&format!("{l}\n")),
            (Style::InPlace, Some(l)) => write_stderr(&format!("\r{l}{}\x1b[K\n", bar(p))),
            (Style::InPlace, None) if self.last.is_some() => write_stderr("\n"),
            (Style::InPlace, None) => {}
        }
        self.style = Style::Off;
    }
}

/// joblib's message: `[Parallel(n_jobs=2)]: Done  40 out of 200 tasks |
/// elapsed:    1.2s`, with ` finished` at the end.
fn line(n_jobs: usize, p: &Progress, finished: bool) -> String {
    let done = match p.total {
        Some(total) => format!("{:>w$} out of {total} tasks", p.completed, w = total.to_string().len()),
        None => format!("{:>3} tasks", p.completed),
    };
    let end = if finished { " finished" } else { "" };
    format!("[Parallel(n_jobs={n_jobs})]: Done {done} | elapsed: {:>6.1}s{end}", p.elapsed.as_secs_f64())
}

/// The bar after a line in place, when the number of tasks is known.
fn bar(p: &Progress) -> String {
    let Some(total) = p.total.filter(|&t| t > 0) else { return String::new() };
    let full = ((p.completed.min(total) as f64 / total as f64) * BAR_CELLS as f64) as usize;
    format!(" |{}{}|", "█".repeat(full), " ".repeat(BAR_CELLS - full))
}

/// Writes `s` to this process's stderr in one piece, past any capture.
fn write_stderr(s: &str) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(s.as_bytes());
    let _ = err.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_reads_as_joblibs() {
        let p = Progress { completed: 40, submitted: 48, total: Some(200), elapsed: Duration::from_millis(1234) };
        assert_eq!(line(2, &p, false), "[Parallel(n_jobs=2)]: Done  40 out of 200 tasks | elapsed:    1.2s");
        let p = Progress { total: None, ..p };
        assert_eq!(line(1, &p, true), "[Parallel(n_jobs=1)]: Done  40 tasks | elapsed:    1.2s finished");
        let half = Progress { completed: 100, total: Some(200), ..p };
        assert_eq!(bar(&half), format!(" |{}{}|", "█".repeat(10), " ".repeat(10)));
        assert_eq!(bar(&p), "");
    }
}
