//! The progress bar on stderr for long repetitions of `procjob matmul`.

use std::ops::Range;
use std::time::{Duration, Instant};

use crate::matmul::{BlockProgress, Mode, ProgressHook};

/// A progress bar on stderr for one repetition: blocks and rows done, the
/// rate, the time left. It appears only once the repetition has run for a
/// second (short runs stay quiet) and never when stderr is not a terminal.
/// It is drawn as blocks complete, with no ticker thread (a thread would
/// stop the fork mode from forking).
pub(crate) struct ProgressBar {
    bar: indicatif::ProgressBar,
    started: Instant,
    rows: usize,
    total_rows: usize,
}

/// A repetition must have run this long before its progress bar shows.
const PROGRESS_AFTER: Duration = Duration::from_secs(1);

impl ProgressBar {
    /// The hook that gives every repetition of a worker mode a bar.
    pub(crate) fn hook() -> ProgressHook {
        ProgressHook(std::sync::Arc::new(|mode, ranges| Box::new(ProgressBar::new(mode, ranges))))
    }

    pub(crate) fn new(mode: Mode, ranges: &[Range<usize>]) -> ProgressBar {
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(ranges.len() as u64),
            indicatif::ProgressDrawTarget::hidden(),
        );
        let style = indicatif::ProgressStyle::with_template(
            "{prefix:>10} [{bar:30}] {pos}/{len} blocks, {msg}, {elapsed} elapsed, ~{eta} left",
        )
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_prefix(mode.name());
        ProgressBar { bar, started: Instant::now(), rows: 0, total_rows: ranges.iter().map(Range::len).sum() }
    }
}

impl BlockProgress for ProgressBar {
    fn block_done(&mut self, rows: usize) {
        self.rows += rows;
        let elapsed = self.started.elapsed();
        if elapsed >= PROGRESS_AFTER && self.bar.is_hidden() {
            self.bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        }
        let rate = self.rows as f64 / elapsed.as_secs_f64().max(1e-9);
        self.bar.set_message(format!("{}/{} rows, {rate:.0} rows/s", self.rows, self.total_rows));
        self.bar.inc(1);
    }

    fn finish(self: Box<Self>) {
        self.bar.finish_and_clear();
    }
}
