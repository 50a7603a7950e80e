//! `procjob bench --plot DIR`: SVG charts of a sweep.
//!
//! For each size, `speedup-<size>.svg` shows the speedup over seq against
//! the number of processes, one line per mode that ran, with this
//! machine's measured ideal (the same kernel on N threads, blocks already
//! in memory, no communication) and the linear N× for reference; and
//! `memory-<size>.svg` shows the workers' peak USS and PSS, summed over
//! the workers, for each mode that starts worker processes.
//!
//! The charts are drawn with `plotters`' SVG backend alone: text becomes
//! `<text>` elements that the viewer renders with its own fonts, so no font
//! files or font-rendering libraries are needed.

use std::fmt::Display;
use std::io;
use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::cli::bench::CaseReport;
use crate::matmul::Mode;

/// Chart size in pixels.
const SIZE: (u32, u32) = (900, 560);
const MIB: f64 = 1024.0 * 1024.0;

/// `(processes, y)` pairs of one line.
type Points = Vec<(i32, f64)>;

/// Writes the charts of `reports` into `dir` and returns their paths, in
/// order: for each size (in the order they ran), `speedup-<size>.svg`, then
/// `memory-<size>.svg` when a mode with worker processes ran at that size.
pub fn write_charts(reports: &[CaseReport], dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for size in sizes(reports) {
        let charts = [("speedup", speedup_chart(reports, size)?), ("memory", memory_chart(reports, size)?)];
        for (name, svg) in charts {
            if let Some(svg) = svg {
                let path = dir.join(format!("{name}-{size}.svg"));
                std::fs::write(&path, svg).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
                written.push(path);
            }
        }
    }
    Ok(written)
}

/// The speedup chart of one size as an SVG document: x = processes, y =
/// seq's mean / the case's mean, one line per mode other than seq, plus the
/// measured ideal and the linear N×. `None` when no mode but seq ran at
/// that size.
pub fn speedup_chart(reports: &[CaseReport], size: usize) -> io::Result<Option<String>> {
    let cases: Vec<&CaseReport> = reports.iter().filter(|r| r.size == size).collect();
    let modes = modes(&cases, |_| true);
    if modes.is_empty() {
        return Ok(None);
    }
    let seq_mean = seq_mean(&cases);
    let lines: Vec<(&str, Points)> =
        modes.iter().map(|&mode| (mode, points(&cases, mode, |r| r.speedup_vs_seq))).collect();
    // The ideal for P processes: the median over the modes of their paired
    // ideal runs' medians (each mode measured its own, interleaved).
    let ideal: Points = process_counts(&cases)
        .into_iter()
        .filter_map(|p| {
            let times: Vec<f64> = cases
                .iter()
                .filter(|r| r.processes == p && r.mode != "seq")
                .filter_map(|r| r.ideal_median_s)
                .filter(|&t| t > 0.0)
                .collect();
            let speedup = seq_mean? / crate::cli::bench::median(&times);
            (!times.is_empty() && speedup.is_finite()).then_some((p as i32, speedup))
        })
        .collect();
    let max_p = process_counts(&cases).last().copied().unwrap_or(1) as i32;
    let linear: Points = (1..=max_p).map(|p| (p, f64::from(p))).collect();
    let y_max = lines.iter().flat_map(|(_, l)| l).chain(&ideal).chain(&linear).map(|&(_, y)| y).fold(1.0, f64::max);

    let title = format!("{} {}", title_prefix(&cases, size), "— speedup over seq");
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        let mut chart = frame(&root, &title, max_p, y_max * 1.1, "speedup over seq (×)")?;
        let grey = RGBColor(140, 140, 140);
        draw(chart.draw_series(DashedLineSeries::new(linear, 6, 5, grey.stroke_width(1))))?
            .label("linear (N×)")
            .legend(move |(x, y)| dashed_key(x, y, grey.stroke_width(1)));
        if !ideal.is_empty() {
            let ideal_label = "ideal: N threads, blocks in memory, no IPC (measured)";
            draw(chart.draw_series(LineSeries::new(ideal, BLACK.stroke_width(2)).point_size(3)))?
                .label(ideal_label)
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(2)));
        }
        for (i, (mode, line)) in lines.into_iter().enumerate() {
            let color = mode_color(mode, i);
            draw(chart.draw_series(LineSeries::new(line, color.stroke_width(2)).point_size(4)))?
                .label(mode)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        }
        legend(&mut chart)?;
        draw(root.present())?;
    }
    Ok(Some(svg))
}

/// The memory chart of one size as an SVG document: x = processes, y = the
/// workers' peak USS (solid) and PSS (dashed) in MiB, summed over the
/// workers, for each mode that starts worker processes. `None` when no such
/// mode ran at that size.
pub fn memory_chart(reports: &[CaseReport], size: usize) -> io::Result<Option<String>> {
    let cases: Vec<&CaseReport> = reports.iter().filter(|r| r.size == size).collect();
    // A mode this code does not know is charted rather than dropped.
    let modes = modes(&cases, |mode| Mode::from_name(mode).is_none_or(Mode::uses_workers));
    if modes.is_empty() {
        return Ok(None);
    }
    let mib = |bytes: u64| bytes as f64 / MIB;
    let lines: Vec<(&str, Points, Points)> = modes
        .iter()
        .map(|&mode| {
            let uss = points(&cases, mode, |r| mib(r.workers_peak_uss_bytes));
            let pss = points(&cases, mode, |r| mib(r.workers_peak_pss_bytes));
            (mode, uss, pss)
        })
        .collect();
    let y_max = lines.iter().flat_map(|(_, u, p)| u.iter().chain(p)).map(|&(_, y)| y).fold(1.0, f64::max);
    let max_p = process_counts(&cases).last().copied().unwrap_or(1) as i32;

    let title = format!("{} {}", title_prefix(&cases, size), "— workers' peak memory, summed over workers");
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        let mut chart = frame(&root, &title, max_p, y_max * 1.15, "MiB (USS solid, PSS dashed)")?;
        for (i, (mode, uss, pss)) in lines.into_iter().enumerate() {
            let color = mode_color(mode, i);
            draw(chart.draw_series(LineSeries::new(uss.clone(), color.stroke_width(2))))?
                .label(format!("{mode}: USS"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            draw(chart.draw_series(uss.into_iter().map(|p| Circle::new(p, 4, color.filled()))))?;
            draw(chart.draw_series(DashedLineSeries::new(pss.clone(), 8, 5, color.stroke_width(2))))?
                .label(format!("{mode}: PSS"))
                .legend(move |(x, y)| dashed_key(x, y, color.stroke_width(2)));
            draw(chart.draw_series(pss.into_iter().map(|p| Circle::new(p, 4, color.stroke_width(2)))))?;
        }
        legend(&mut chart)?;
        draw(root.present())?;
    }
    Ok(Some(svg))
}

type Chart<'a, 'b> = ChartContext<
    'a,
    SVGBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordi32, plotters::coord::types::RangedCoordf64>,
>;

/// A white chart with a title and labelled axes: x from 0 to one past the
/// largest process count (integer ticks), y from 0 to `y_max`.
fn frame<'a, 'b: 'a>(
    root: &'a DrawingArea<SVGBackend<'b>, Shift>,
    title: &str,
    max_p: i32,
    y_max: f64,
    y_desc: &str,
) -> io::Result<Chart<'a, 'b>> {
    draw(root.fill(&WHITE))?;
    let mut chart = draw(
        ChartBuilder::on(root)
            .caption(title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(72)
            .build_cartesian_2d(0..max_p + 1, 0.0..y_max),
    )?;
    draw(
        chart
            .configure_mesh()
            .x_desc("processes")
            .y_desc(y_desc)
            .x_labels((max_p as usize + 2).min(17))
            .y_labels(10)
            .axis_desc_style(("sans-serif", 16))
            .label_style(("sans-serif", 13))
            .light_line_style(TRANSPARENT)
            .draw(),
    )?;
    Ok(chart)
}

fn legend<'a, 'b: 'a>(chart: &mut Chart<'a, 'b>) -> io::Result<()> {
    draw(
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(160, 160, 160))
            .label_font(("sans-serif", 14))
            .draw(),
    )
}

/// A dashed legend key: two short strokes.
fn dashed_key<DB: DrawingBackend>(x: i32, y: i32, style: ShapeStyle) -> DashedKey<DB> {
    EmptyElement::at((x, y))
        + PathElement::new(vec![(0, 0), (8, 0)], style)
        + PathElement::new(vec![(13, 0), (21, 0)], style)
}

type DashedKey<DB> =
    plotters::element::ComposedElement<(i32, i32), DB, PathElement<(i32, i32)>, PathElement<(i32, i32)>>;

/// Turns a plotters error into an I/O error.
fn draw<T, E: Display>(result: Result<T, E>) -> io::Result<T> {
    result.map_err(|e| io::Error::other(format!("drawing a chart: {e}")))
}

/// "f64, n = 500 (500×500 · 500×500)".
fn title_prefix(cases: &[&CaseReport], size: usize) -> String {
    let dtype = cases.first().map_or("?", |r| r.dtype);
    format!("{dtype}, n = {size} ({size}×{size} · {size}×{size})")
}

/// Sizes in the order they first appear.
fn sizes(reports: &[CaseReport]) -> Vec<usize> {
    let mut sizes: Vec<usize> = Vec::new();
    for r in reports {
        if !sizes.contains(&r.size) {
            sizes.push(r.size);
        }
    }
    sizes
}

/// Modes other than seq that pass `keep`, in the order they first appear.
fn modes<'r>(cases: &[&'r CaseReport], keep: impl Fn(&str) -> bool) -> Vec<&'r str> {
    let mut modes: Vec<&str> = Vec::new();
    for r in cases {
        if r.mode != "seq" && !modes.contains(&r.mode) && keep(r.mode) {
            modes.push(r.mode);
        }
    }
    modes
}

/// Process counts of the cases other than seq, ascending, without repeats.
fn process_counts(cases: &[&CaseReport]) -> Vec<usize> {
    let mut p: Vec<usize> = cases.iter().filter(|r| r.mode != "seq").map(|r| r.processes).collect();
    p.sort_unstable();
    p.dedup();
    p
}

/// `(processes, y)` of `mode`'s cases, by processes; non-finite values left out.
fn points(cases: &[&CaseReport], mode: &str, y: impl Fn(&CaseReport) -> f64) -> Points {
    let mut v: Vec<(i32, f64)> = cases
        .iter()
        .filter(|r| r.mode == mode)
        .map(|r| (r.processes as i32, y(r)))
        .filter(|p| p.1.is_finite())
        .collect();
    v.sort_by_key(|p| p.0);
    v
}

/// seq's mean at this size: from seq's own case, or else from any case's
/// speedup (speedup = seq mean / mean).
fn seq_mean(cases: &[&CaseReport]) -> Option<f64> {
    cases
        .iter()
        .find(|r| r.mode == "seq")
        .map(|r| r.stats.mean_s)
        .or_else(|| cases.iter().find(|r| r.speedup_vs_seq > 0.0).map(|r| r.speedup_vs_seq * r.stats.mean_s))
        .filter(|&m| m > 0.0)
}

/// A mode's colour: fixed for the modes procjob has, so the same mode has
/// the same colour in every chart; from a palette for any other.
fn mode_color(mode: &str, index: usize) -> RGBColor {
    match mode {
        "threads" => RGBColor(127, 127, 127),
        "copy" => RGBColor(214, 39, 40),
        "memmap" => RGBColor(31, 119, 180),
        "memmap-out" => RGBColor(44, 160, 44),
        "fork" => RGBColor(148, 103, 189),
        _ => {
            let (r, g, b) = Palette99::pick(index).rgb();
            RGBColor(r, g, b)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::bench::Stats;

    /// A synthetic case: `mean_s` seconds, seq's mean 1 s, the ideal at
    /// 1/processes s, and `mib` MiB of USS per worker (PSS 3/4 of it).
    fn case(mode: &'static str, size: usize, processes: usize, mean_s: f64, mib: u64) -> CaseReport {
        let workers = if matches!(mode, "seq" | "threads") { 0 } else { processes as u64 };
        CaseReport {
            bench: "matmul",
            mode,
            dtype: "f64",
            size,
            processes,
            blocks: processes,
            stats: Stats::of(&[mean_s]),
            speedup_vs_seq: 1.0 / mean_s,
            gflops: 1.0,
            efficiency: (mode != "seq").then_some(0.9),
            ideal_median_s: (mode != "seq").then_some(1.0 / processes as f64),
            workers_peak_rss_bytes: workers * (mib + 4) * (1 << 20),
            workers_peak_uss_bytes: workers * mib * (1 << 20),
            workers_peak_pss_bytes: workers * mib * (3 << 18),
            vs_numpy: None,
            vs_numpy_faster_rounds: None,
            vs_joblib: None,
            vs_joblib_faster_rounds: None,
            matches_seq: Some(true),
            backend: "local",
            ranks: 1,
            nodes: Vec::new(),
            bytes_between_ranks_out: 0,
            bytes_between_ranks_in: 0,
        }
    }

    fn sweep(modes: &[&'static str]) -> Vec<CaseReport> {
        let mut v = Vec::new();
        for size in [64, 128] {
            v.push(case("seq", size, 1, 1.0, 0));
            for p in [1, 2, 4] {
                for (i, &mode) in modes.iter().enumerate() {
                    v.push(case(mode, size, p, 1.1 / p as f64 + 0.01 * i as f64, 10 + 5 * i as u64));
                }
            }
        }
        v
    }

    /// Parses `svg` as XML and returns the text of its `<text>` elements.
    fn texts(svg: &str) -> Vec<String> {
        let doc = roxmltree::Document::parse(svg).unwrap_or_else(|e| panic!("not well-formed XML: {e}\n{svg}"));
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        doc.descendants()
            .filter(|n| n.has_tag_name("text"))
            .filter_map(|n| n.text())
            .map(|t| t.trim().to_string())
            .collect()
    }

    #[test]
    fn speedup_chart_is_xml_with_a_line_per_mode_and_the_ideal() {
        let reports = sweep(&["threads", "copy", "memmap", "memmap-out"]);
        let svg = speedup_chart(&reports, 64).unwrap().expect("a chart");
        let texts = texts(&svg);
        for name in ["threads", "copy", "memmap", "memmap-out", "linear (N×)", "processes", "speedup over seq (×)"] {
            assert!(texts.iter().any(|t| t == name), "{name:?} missing from {texts:?}");
        }
        assert!(texts.iter().any(|t| t.starts_with("ideal") && t.contains("measured")), "{texts:?}");
        assert!(texts.iter().any(|t| t.contains("f64") && t.contains("n = 64")), "title: {texts:?}");
        assert!(!texts.iter().any(|t| t == "seq"), "seq is the baseline, not a line: {texts:?}");
    }

    #[test]
    fn memory_chart_is_xml_with_uss_and_pss_of_worker_modes_only() {
        let reports = sweep(&["threads", "copy", "memmap", "memmap-out"]);
        let svg = memory_chart(&reports, 128).unwrap().expect("a chart");
        let texts = texts(&svg);
        for mode in ["copy", "memmap", "memmap-out"] {
            for figure in ["USS", "PSS"] {
                let name = format!("{mode}: {figure}");
                assert!(texts.contains(&name), "{name:?} missing from {texts:?}");
            }
        }
        assert!(!texts.iter().any(|t| t.starts_with("threads")), "threads starts no workers: {texts:?}");
        assert!(texts.iter().any(|t| t.contains("f64") && t.contains("n = 128")), "title: {texts:?}");
    }

    #[test]
    fn charts_plot_whatever_modes_ran() {
        // A mode added later (fork) shows up without changes here.
        let reports = sweep(&["copy", "fork"]);
        let speedup = texts(&speedup_chart(&reports, 64).unwrap().unwrap());
        assert!(speedup.iter().any(|t| t == "fork") && !speedup.iter().any(|t| t == "memmap"), "{speedup:?}");
        let memory = texts(&memory_chart(&reports, 64).unwrap().unwrap());
        assert!(memory.iter().any(|t| t == "fork: USS"), "{memory:?}");
        // Only threads: a speedup chart, and no memory chart.
        let reports = sweep(&["threads"]);
        assert!(speedup_chart(&reports, 64).unwrap().is_some());
        assert!(memory_chart(&reports, 64).unwrap().is_none());
        // Only seq: nothing to chart.
        let reports = vec![case("seq", 64, 1, 1.0, 0)];
        assert!(speedup_chart(&reports, 64).unwrap().is_none());
    }

    #[test]
    fn write_charts_writes_two_files_per_size() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_charts(&sweep(&["copy", "memmap"]), dir.path()).unwrap();
        let names: Vec<String> = paths.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["speedup-64.svg", "memory-64.svg", "speedup-128.svg", "memory-128.svg"]);
        for path in &paths {
            texts(&std::fs::read_to_string(path).unwrap());
        }
    }

    #[test]
    fn one_process_count_and_zero_memory_still_draw() {
        // One process count, and memory figures of 0 (no /proc): the axes
        // must not collapse.
        let mut reports = vec![case("seq", 32, 1, 1.0, 0), case("copy", 32, 3, 0.5, 1)];
        reports[1].workers_peak_uss_bytes = 0;
        reports[1].workers_peak_pss_bytes = 0;
        texts(&speedup_chart(&reports, 32).unwrap().unwrap());
        texts(&memory_chart(&reports, 32).unwrap().unwrap());
    }
}
