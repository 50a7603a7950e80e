//! Integration tests of `procjob bench --plot DIR`, running the real binary:
//! the SVG charts exist, are well-formed XML and name the modes that ran;
//! a `--plot` folder that does not exist is a usage error (exit 2) caught
//! before anything runs.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_procjob");

fn bench(sizes: &str, plot: &Path, temp: &Path, extra: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(["bench", "--sizes", sizes, "--processes", "1,2", "--repeat", "1", "--warmup", "0"])
        .arg("--plot")
        .arg(plot)
        .arg("--temp-folder")
        .arg(temp)
        .args(extra)
        .env_remove("PROCJOB_TEMP_FOLDER");
    cmd.output().expect("cannot run procjob")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Parses `path` as XML (panicking with the parser's message if it is not
/// well-formed) and returns the text of its `<text>` elements.
fn svg_texts(path: &Path) -> Vec<String> {
    let svg = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let doc =
        roxmltree::Document::parse(&svg).unwrap_or_else(|e| panic!("{} is not well-formed XML: {e}", path.display()));
    assert_eq!(doc.root_element().tag_name().name(), "svg", "{}", path.display());
    doc.descendants()
        .filter(|n| n.has_tag_name("text"))
        .filter_map(|n| n.text())
        .map(|t| t.trim().to_string())
        .collect()
}

fn assert_empty(dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(left.is_empty(), "{} should be empty, holds {left:?}", dir.display());
}

#[test]
fn plot_writes_well_formed_svg_charts_for_each_size() {
    let (plot, temp) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let out = bench("64,96", plot.path(), temp.path(), &[]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    for size in [64, 96] {
        let speedup = plot.path().join(format!("speedup-{size}.svg"));
        let memory = plot.path().join(format!("memory-{size}.svg"));
        for path in [&speedup, &memory] {
            assert!(
                stdout.contains(&format!("wrote {}", path.display())),
                "{} not reported:\n{stdout}",
                path.display()
            );
        }
        let texts = svg_texts(&speedup);
        // The default modes, the ideal, the axes and the title.
        for name in ["copy", "memmap", "memmap-out", "processes"] {
            assert!(texts.iter().any(|t| t == name), "speedup-{size}.svg lacks {name:?}: {texts:?}");
        }
        assert!(texts.iter().any(|t| t.starts_with("ideal")), "speedup-{size}.svg lacks the ideal: {texts:?}");
        assert!(texts.iter().any(|t| t.contains("f64") && t.contains(&format!("n = {size}"))), "{texts:?}");
        let texts = svg_texts(&memory);
        for name in ["copy: USS", "copy: PSS", "memmap: USS", "memmap: PSS", "memmap-out: USS", "memmap-out: PSS"] {
            assert!(texts.iter().any(|t| t == name), "memory-{size}.svg lacks {name:?}: {texts:?}");
        }
    }
    let mut names: Vec<String> = std::fs::read_dir(plot.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["memory-64.svg", "memory-96.svg", "speedup-64.svg", "speedup-96.svg"], "no stray files");
    assert_empty(temp.path());
}

#[test]
fn plot_with_json_keeps_stdout_to_json_lines() {
    let (plot, temp) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let out = bench("64", plot.path(), temp.path(), &["--json", "--modes", "threads,copy"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let cases: Vec<Value> =
        stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect();
    assert_eq!(cases.len(), 1 + 2 * 2, "seq, then threads and copy at 1 and 2 processes:\n{stdout}");
    for case in &cases {
        let memory = ["workers_peak_rss_bytes", "workers_peak_uss_bytes", "workers_peak_pss_bytes"]
            .map(|f| case[f].as_u64().unwrap_or_else(|| panic!("{f} is not a count in {case}")));
        match case["mode"].as_str().unwrap() {
            "seq" | "threads" => assert_eq!(memory, [0, 0, 0], "no workers, no worker memory: {case}"),
            _ if Path::new("/proc/self/smaps_rollup").exists() => assert!(memory.iter().all(|&b| b > 0), "{case}"),
            _ => {}
        }
    }
    for name in ["speedup-64.svg", "memory-64.svg"] {
        let path = plot.path().join(name);
        assert!(stderr.contains(&format!("wrote {}", path.display())), "{name} not reported on stderr:\n{stderr}");
        svg_texts(&path);
    }
    let memory = svg_texts(&plot.path().join("memory-64.svg"));
    assert!(!memory.iter().any(|t| t.starts_with("threads")), "threads starts no workers: {memory:?}");
    assert_empty(temp.path());
}

#[test]
fn plot_into_a_path_that_cannot_be_a_folder_exits_2_before_running() {
    // A missing folder is created (see the bench test above for the charts);
    // a file, or a folder that would have to be made inside a file, is not.
    let (root, temp) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let file = root.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    for dir in [file.join("missing"), file] {
        let out = bench("64,96", &dir, temp.path(), &[]);
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert_eq!(out.status.code(), Some(2), "--plot {}:\nstdout:\n{stdout}\nstderr:\n{stderr}", dir.display());
        assert!(stderr.contains("--plot") && stderr.contains(&dir.display().to_string()), "unclear message: {stderr}");
        assert!(stdout.is_empty(), "nothing should have run:\n{stdout}");
        assert!(root.path().join("a-file").is_file(), "--plot changed the file");
    }
    assert_empty(temp.path());
}
