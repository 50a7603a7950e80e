//! docs/lab.md's commands all run: every `procjob …` line of its `sh`
//! blocks is taken from the markdown itself (so the sheet and this test
//! cannot drift), its sizes made small, and run against the real binary in
//! a scratch folder, which must be left clean.

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_procjob");

/// The `procjob` command lines of the `sh` blocks of a markdown text, with
/// the heading of the section each is in.
fn commands(markdown: &str) -> Vec<(String, Vec<String>)> {
    let (mut heading, mut in_sh, mut found) = (String::new(), false, Vec::new());
    for line in markdown.lines() {
        if let Some(h) = line.strip_prefix("## ") {
            heading = h.to_string();
        } else if line.trim() == "```sh" {
            in_sh = true;
        } else if line.trim_start().starts_with("```") {
            in_sh = false;
        } else if in_sh {
            if let Some(rest) = line.trim().strip_prefix("procjob ") {
                found.push((heading.clone(), rest.split_whitespace().map(str::to_string).collect()));
            }
        }
    }
    found
}

/// The same arguments with every `--size` over 64 made 48.
fn small(args: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut after_size = false;
    for a in args {
        let big = a.parse::<usize>().is_ok_and(|n| n > 64);
        out.push(if after_size && big { "48".to_string() } else { a.clone() });
        after_size = a == "--size";
    }
    out
}

#[test]
fn every_lab_command_runs_with_small_sizes() {
    let lab = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/lab.md")).unwrap();
    let found = commands(&lab);
    // Every exercise has its commands.
    for n in 1..=5 {
        let prefix = format!("Exercise {n}:");
        assert!(found.iter().any(|(h, _)| h.starts_with(&prefix)), "no command under {prefix:?}");
    }
    assert!(found.len() >= 12, "{found:?}");
    let scratch = tempfile::tempdir().unwrap();
    let temp = scratch.path().join("temp");
    std::fs::create_dir(&temp).unwrap();
    for (heading, args) in &found {
        let args = small(args);
        let out = Command::new(BIN)
            .args(&args)
            .current_dir(scratch.path())
            .env("PROCJOB_TEMP_FOLDER", &temp)
            .output()
            .expect("cannot run procjob");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{heading}: procjob {}\n{stderr}", args.join(" "));
        assert!(!out.stdout.is_empty(), "{heading}: procjob {} printed nothing", args.join(" "));
        let left: Vec<_> = std::fs::read_dir(&temp).unwrap().flatten().map(|e| e.file_name()).collect();
        assert!(left.is_empty(), "{heading}: procjob {} left {left:?}", args.join(" "));
    }
    // The trace commands wrote their traces where the sheet says.
    for trace in ["t.json", "t8.json"] {
        assert!(scratch.path().join(trace).is_file(), "no {trace}");
    }
}

#[test]
fn the_extraction_finds_sh_commands_only_and_shrinks_only_sizes() {
    let md = "## Exercise 1: x\n```sh\nprocjob matmul --size 1000 --processes 8\n```\n```text\nprocjob no\n```\n";
    let found = commands(md);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].0, "Exercise 1: x");
    assert_eq!(small(&found[0].1), ["matmul", "--size", "48", "--processes", "8"]);
}
