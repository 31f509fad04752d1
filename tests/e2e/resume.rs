//! Nothing is lost: `kill -9` at several points, then rerun → the same bytes
//! as a clean run; and one writer per store.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{bin, ok, prefpipe, stderr, write_scored};

/// 12,000 prompts × 5 samples, 20 prompts per chunk → 600 select chunks.
const PIPELINE: &str = "name: resume
chunk_size: 20
stages:
  - id: scored
    kind: source
    path: scored.parquet
  - id: pairs
    kind: select
    input: scored
    strategy: reward_points
  - id: export
    kind: export
    input: pairs
    path: pairs.parquet
    format: trl
";

fn setup(dir: &Path) {
    write_scored(&dir.join("scored.parquet"), 12_000, 5);
    std::fs::write(dir.join("pipeline.yaml"), PIPELINE).unwrap();
}

fn spawn(dir: &Path) -> Child {
    Command::new(bin()).args(["run", "pipeline.yaml"]).current_dir(dir).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap()
}

/// Chunks of the `pairs` stage recorded so far (sidecars or manifest).
fn pairs_chunks_done(dir: &Path) -> usize {
    let stages = dir.join(".prefpipe/stages");
    let Ok(rd) = std::fs::read_dir(stages) else { return 0 };
    for e in rd.flatten() {
        if e.file_name().to_string_lossy().starts_with("pairs-") {
            return std::fs::read_dir(e.path())
                .map(|r| r.flatten().filter(|f| f.file_name().to_string_lossy().ends_with(".parquet")).count())
                .unwrap_or(0);
        }
    }
    0
}

/// Starts a run and SIGKILLs it once `pairs` has at least `chunks` chunks.
/// Returns false if the run finished first.
fn kill_after(dir: &Path, chunks: usize) -> bool {
    let mut child = spawn(dir);
    let t0 = Instant::now();
    loop {
        if let Some(_status) = child.try_wait().unwrap() {
            return false;
        }
        if pairs_chunks_done(dir) >= chunks || t0.elapsed() > Duration::from_secs(120) {
            child.kill().unwrap(); // SIGKILL on Unix
            child.wait().unwrap();
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn kill_9_then_rerun_gives_identical_bytes() {
    let clean = tempfile::tempdir().unwrap();
    setup(clean.path());
    ok(prefpipe(clean.path(), &["run", "pipeline.yaml"]));
    let expected = std::fs::read(clean.path().join("pairs.parquet")).unwrap();

    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    // Kill during the select stage at increasing depths, resuming each time.
    let mut killed = 0;
    for at in [1, 60, 200, 400] {
        if kill_after(dir.path(), at) {
            killed += 1;
            assert!(!dir.path().join("pairs.parquet").exists(), "no export before the run finishes");
            let leftover_tmp = crate::common::files_under(dir.path())
                .into_iter()
                .filter(|p| p.file_name().unwrap().to_string_lossy().contains(".tmp-") && p.extension().is_some_and(|e| e == "parquet"))
                .count();
            assert_eq!(leftover_tmp, 0, "temp files never end in .parquet");
        }
    }
    assert!(killed >= 2, "the run was killed mid-way at least twice");
    let done_before = pairs_chunks_done(dir.path());
    assert!(done_before > 0);
    let o = prefpipe(dir.path(), &["run", "pipeline.yaml", "--log-format", "json"]);
    let log = stderr(&o);
    assert!(o.status.success(), "{log}");
    // The rerun resumed the half-done stage rather than starting over.
    assert!(log.contains("\"status\":\"resumed\""), "{log}");
    assert_eq!(std::fs::read(dir.path().join("pairs.parquet")).unwrap(), expected, "identical bytes after kill -9 + rerun");

    // A third run does no work at all.
    let o = prefpipe(dir.path(), &["run", "pipeline.yaml", "--log-format", "json"]);
    let log = stderr(&o);
    assert_eq!(log.matches("\"status\":\"cached\"").count(), 6, "{log}"); // started + finished × 3 stages
}

#[test]
fn a_second_concurrent_run_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let mut first = spawn(dir.path());
    // Wait until the first run holds the lock and is working.
    let deadline = Instant::now() + Duration::from_secs(60); // not a speed check: a hung run must not hang the suite
    while pairs_chunks_done(dir.path()) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    let o = prefpipe(dir.path(), &["run", "pipeline.yaml"]);
    let still_running = first.try_wait().unwrap().is_none();
    first.kill().ok();
    first.wait().unwrap();
    if still_running {
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(stderr(&o).contains("is locked by another prefpipe run"), "{}", stderr(&o));
    } else {
        panic!("the first run finished before the second started; make the workload bigger");
    }
}
