//! The walkthroughs, run as written: every ```sh block of README.md that starts `aspen-node`
//! (the ones a new user pastes), and docs/operations.md's three-node walkthrough, run verbatim
//! under `bash -e`, in an empty directory, with the binaries this test build made first on
//! `PATH`. A block that fails, hangs or prints other results than the docs promise fails the test.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::support::NODE_BIN;

/// The `sh` blocks of `markdown` that start a node, with the heading they are under.
fn tour_blocks(markdown: &str) -> Vec<(String, String)> {
    let mut blocks = Vec::new();
    let mut heading = String::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match &mut current {
            Some(body) if line.trim_start().starts_with("```") => {
                if body.contains("aspen-node") && !body.contains("cargo ") {
                    blocks.push((heading.clone(), std::mem::take(body)));
                }
                current = None;
            }
            Some(body) => {
                body.push_str(line);
                body.push('\n');
            }
            None if line.trim_start() == "```sh" => current = Some(String::new()),
            None => {
                if let Some(h) = line.strip_prefix('#') {
                    heading = h.trim_start_matches('#').trim().to_string();
                }
            }
        }
    }
    blocks
}

/// Runs `script` with `bash -e` in `dir` (its own process group, killed afterwards with every
/// node it left running); returns (success, stdout, stderr).
fn run_block(script: &str, dir: &Path) -> (bool, String, String) {
    use std::os::unix::process::CommandExt;
    let bin_dir = Path::new(NODE_BIN).parent().expect("binary dir");
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    std::fs::write(dir.join("block.sh"), script).unwrap();
    let (out, err) = (dir.join("stdout"), dir.join("stderr"));
    let mut cmd = Command::new("bash");
    aspen_testkit::clean_env(&mut cmd);
    cmd.arg("-e")
        .arg("block.sh")
        .current_dir(dir)
        .env("PATH", path)
        // Generous for two busy cores: elections and joins take longer than on a laptop.
        .env("ASPEN_TIMEOUT", "90")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .process_group(0);
    let mut child = cmd.spawn().expect("run bash");
    let pgid = child.id();
    let deadline = Instant::now() + Duration::from_secs(600);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // The block's background nodes are in its process group.
    let _ = Command::new("kill").args(["-9", "--", &format!("-{pgid}")]).stderr(Stdio::null()).status();
    let _ = child.wait();
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    (status.is_some_and(|s| s.success()), read(&out), read(&err))
}

/// The `sh` blocks of `markdown` from the heading `from` up to the heading `to`, as one script.
fn walkthrough(markdown: &str, from: &str, to: &str) -> String {
    let start = markdown.find(from).unwrap_or_else(|| panic!("no {from:?} heading"));
    let end = start + markdown[start..].find(to).unwrap_or_else(|| panic!("no {to:?} heading"));
    let mut script = String::new();
    let mut in_sh = false;
    for line in markdown[start..end].lines() {
        if in_sh && line.trim_start().starts_with("```") {
            in_sh = false;
        } else if in_sh {
            script.push_str(line);
            script.push('\n');
        } else if line.trim_start() == "```sh" {
            in_sh = true;
        }
    }
    script
}

/// docs/operations.md's three-node walkthrough (start, join, replicate, kill the leader,
/// restart it) and its membership changes by hand, run as one script as written.
#[test]
fn operations_walkthrough_runs_as_written() {
    let docs = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/operations.md")).unwrap();
    let script = walkthrough(&docs, "## A three-node cluster on one machine", "### Across machines");
    assert!(script.contains("cluster add-learner"), "{script}");
    let dir = tempfile::tempdir().unwrap();
    let (ok, out, err) = run_block(&script, dir.path());
    let tail: Vec<&str> = err.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect();
    assert!(ok, "the walkthrough failed:\n{script}\nstdout:\n{out}\nstderr (end):\n{}", tail.join("\n"));
    let want = [
        "OK\n",
        "1\n",
        "OK\n",
        "exit 3\n",
        "2\n",
        "voters: 1,2,3  learners: 4\n",
        "voters: 1,2,3,4  learners: \n",
        "voters: 1,2,3  learners: \n",
    ];
    let mut rest = out.as_str();
    for piece in want {
        let at = rest.find(piece).unwrap_or_else(|| panic!("{piece:?} missing (in order) from stdout:\n{out}"));
        rest = &rest[at + piece.len()..];
    }
}

#[test]
fn readme_tour_blocks_run_as_written() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let blocks = tour_blocks(&readme);
    let names: Vec<&str> = blocks.iter().map(|(h, _)| h.as_str()).collect();
    assert_eq!(
        names,
        ["One node", "Three nodes", "Sharding", "Leases and watch", "etcd clients"],
        "the README's tour blocks"
    );
    // What each block must print (in this order) on stdout (the watch's lines come in between).
    let expect: [&[&str]; 5] = [
        &["OK\n", "hello\n", "OK\n", "exit 1\n", "greeting\thi\n"],
        &["OK\n", "1\n", "OK\n", "2\n"],
        &["OK\n", "user/42\talice\n"],
        &["OK\n", "30\n", "OK\n", "exit 1\n"],
        &["OK\n", "greeting\nhello\n"],
    ];
    let etcdctl = Command::new("etcdctl").arg("version").output().is_ok_and(|o| o.status.success());
    for ((heading, body), want) in blocks.iter().zip(expect) {
        if body.contains("etcdctl") && !etcdctl {
            eprintln!("skipped README block {heading:?}: etcdctl is not installed (scripts/test.sh installs it)");
            continue;
        }
        let dir = tempfile::tempdir().unwrap();
        let (ok, out, err) = run_block(body, dir.path());
        let tail: Vec<&str> = err.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect();
        assert!(ok, "README block {heading:?} failed:\n{body}\nstdout:\n{out}\nstderr (end):\n{}", tail.join("\n"));
        let mut rest = out.as_str();
        for piece in want {
            let at = rest.find(piece).unwrap_or_else(|| {
                panic!("README block {heading:?}: {piece:?} missing (in order) from stdout:\n{out}")
            });
            rest = &rest[at + piece.len()..];
        }
    }
}
