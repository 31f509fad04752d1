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

/// 60 prompts × 5 samples, 6 prompts per chunk → 10 source and 10 pairs chunks.
const SMALL: &str = "name: integrity
chunk_size: 6
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
";

/// The chunk files of stage `id` (`<id>-<key16>/chunk-NNNNNN.parquet`), in order.
fn chunk_files(dir: &Path, id: &str) -> Vec<std::path::PathBuf> {
    let stages = dir.join(".prefpipe/stages");
    let d = std::fs::read_dir(&stages).unwrap().flatten().find(|e| e.file_name().to_string_lossy().starts_with(&format!("{id}-"))).unwrap();
    let mut f: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("chunk-") && p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    f.sort();
    f
}

/// DESIGN §2, issue 14 item 12: every chunk record holds its file's blake3.
/// A finished run's chunks truncated, bit-flipped (a flip that may still
/// decode) and deleted are found on the next run, said on stderr, and
/// computed again — exactly those chunks of a per-chunk stage (the others
/// keep their files untouched), the whole stage for a source — to the same
/// bytes, and the export written from them is byte-identical.
#[test]
fn corrupt_or_missing_chunks_are_recomputed() {
    let dir = tempfile::tempdir().unwrap();
    write_scored(&dir.path().join("scored.parquet"), 60, 5);
    std::fs::write(dir.path().join("pipeline.yaml"), SMALL).unwrap();
    ok(prefpipe(dir.path(), &["run", "pipeline.yaml"]));
    let export = std::fs::read(dir.path().join("pairs.parquet")).unwrap();
    let pairs = chunk_files(dir.path(), "pairs");
    let source = chunk_files(dir.path(), "scored");
    assert_eq!((pairs.len(), source.len()), (10, 10));
    let before: Vec<Vec<u8>> = pairs.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let source_before: Vec<Vec<u8>> = source.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let mtime = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
    let untouched_mtime: Vec<_> = [0, 1, 3, 4, 6, 8, 9].iter().map(|&c| mtime(&pairs[c])).collect();
    // Truncate chunk 2, flip one bit in the middle of chunk 5, delete chunk 7; flip a source chunk.
    let f = std::fs::OpenOptions::new().write(true).open(&pairs[2]).unwrap();
    f.set_len(before[2].len() as u64 / 2).unwrap();
    drop(f);
    let mut b = before[5].clone();
    let mid = b.len() / 2;
    b[mid] ^= 0x10;
    std::fs::write(&pairs[5], b).unwrap();
    std::fs::remove_file(&pairs[7]).unwrap();
    let mut b = source_before[4].clone();
    let mid = b.len() / 2;
    b[mid] ^= 0x01;
    std::fs::write(&source[4], b).unwrap();
    std::thread::sleep(Duration::from_millis(20)); // mtimes of rewritten files differ

    let o = prefpipe(dir.path(), &["run", "pipeline.yaml"]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    const ALTERED: &str = "does not match its recorded blake3 (truncated or altered)";
    let warnings: Vec<&str> = err.lines().filter(|l| l.starts_with("warning:")).collect();
    assert_eq!(warnings.len(), 4, "{err}");
    assert!(warnings[0].contains("stage `scored`: stored chunk 4 (chunk-000004.parquet) does not match its recorded blake3"), "{err}");
    assert!(warnings[0].contains("running the stage again"), "{err}");
    for (w, (c, why)) in warnings[1..].iter().zip([(2, ALTERED), (5, ALTERED), (7, "is missing")]) {
        assert!(w.contains(&format!("stage `pairs`: stored chunk {c} (chunk-{c:06}.parquet) {why}; computing that chunk again")), "{err}");
    }
    let run: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join(".prefpipe/run.json")).unwrap()).unwrap();
    let status: Vec<&str> = run["stages"].as_array().unwrap().iter().map(|s| s["status"].as_str().unwrap()).collect();
    assert_eq!(status, ["repaired", "repaired", "cached"], "{run}");
    // The same bytes again; the chunks that were fine were not rewritten.
    for (c, p) in pairs.iter().enumerate() {
        assert_eq!(std::fs::read(p).unwrap(), before[c], "pairs chunk {c}");
    }
    for (c, p) in source.iter().enumerate() {
        assert_eq!(std::fs::read(p).unwrap(), source_before[c], "source chunk {c}");
    }
    let now: Vec<_> = [0, 1, 3, 4, 6, 8, 9].iter().map(|&c| mtime(&pairs[c])).collect();
    assert_eq!(now, untouched_mtime, "only the damaged pairs chunks are recomputed");
    assert_eq!(std::fs::read(dir.path().join("pairs.parquet")).unwrap(), export);
    // An export written from the repaired store is byte-identical too.
    std::fs::remove_file(dir.path().join("pairs.parquet")).unwrap();
    ok(prefpipe(dir.path(), &["run", "pipeline.yaml"]));
    assert_eq!(std::fs::read(dir.path().join("pairs.parquet")).unwrap(), export);
    // And a clean store is cached, with nothing to say.
    let o = prefpipe(dir.path(), &["run", "pipeline.yaml"]);
    assert!(!stderr(&o).contains("warning"), "{}", stderr(&o));
}

/// The manifest of stage `id`.
fn manifest(dir: &Path, id: &str) -> serde_json::Value {
    let m = chunk_files(dir, id)[0].parent().unwrap().join("manifest.json");
    serde_json::from_slice(&std::fs::read(m).unwrap()).unwrap()
}

/// `scored.parquet` of [`SMALL`], with prompt `q000000`'s last sample moved to
/// the end when `ungrouped`: the source then starts over with a whole-table
/// read after streaming some chunks.
fn write_source(dir: &Path, ungrouped: bool) {
    let p = dir.join("scored.parquet");
    write_scored(&p, 60, 5);
    if ungrouped {
        let b = crate::common::read(&p).remove(0);
        let order: Vec<u32> = (0..b.num_rows() as u32).filter(|&r| r != 4).chain([4]).collect();
        let idx = arrow::array::UInt32Array::from(order);
        let cols = b.columns().iter().map(|c| arrow::compute::take(c, &idx, None).unwrap()).collect();
        let b = arrow::record_batch::RecordBatch::try_new(b.schema(), cols).unwrap();
        let mut w = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&p).unwrap(), b.schema(), None).unwrap();
        w.write(&b).unwrap();
        w.close().unwrap();
    }
}

/// A select right after a source runs chunk by chunk beside it (each chunk
/// recorded with the blake3 of the source chunk it read) and writes the
/// store a source-then-select run writes: the same chunk bytes, records and
/// export — also when the source starts over because its table is not
/// grouped by prompt, which leaves the select to its usual run.
#[test]
fn a_select_run_beside_its_source_writes_what_a_run_after_it_writes() {
    for ungrouped in [false, true] {
        let beside = tempfile::tempdir().unwrap();
        write_source(beside.path(), ungrouped);
        std::fs::write(beside.path().join("pipeline.yaml"), SMALL).unwrap();
        ok(prefpipe(beside.path(), &["run", "pipeline.yaml"]));
        let after = tempfile::tempdir().unwrap();
        write_source(after.path(), ungrouped);
        std::fs::write(after.path().join("pipeline.yaml"), SMALL).unwrap();
        ok(prefpipe(after.path(), &["run", "pipeline.yaml", "--until", "scored"]));
        ok(prefpipe(after.path(), &["run", "pipeline.yaml"]));

        let bytes = |dir: &Path, id: &str| chunk_files(dir, id).iter().map(|p| std::fs::read(p).unwrap()).collect::<Vec<_>>();
        for id in ["scored", "pairs"] {
            assert_eq!(bytes(beside.path(), id), bytes(after.path(), id), "{id} chunks, ungrouped: {ungrouped}");
        }
        assert_eq!(std::fs::read(beside.path().join("pairs.parquet")).unwrap(), std::fs::read(after.path().join("pairs.parquet")).unwrap());
        let (mb, ma) = (manifest(beside.path(), "pairs"), manifest(after.path(), "pairs"));
        let source = manifest(beside.path(), "scored");
        for (c, rec) in mb["chunks"].as_object().unwrap() {
            let want = &ma["chunks"][c];
            for k in ["file", "rows_in", "rows_out", "drops", "blake3"] {
                assert_eq!(rec.get(k), want.get(k), "chunk {c} {k}, ungrouped: {ungrouped}");
            }
            assert!(want.get("input").is_none(), "a select run after its source records no input");
            if !ungrouped {
                assert_eq!(rec["input"], source["chunks"][c]["blake3"], "chunk {c} names the source chunk it read");
            }
        }
        assert_eq!((mb["n_chunks"].clone(), mb["complete"].clone()), (ma["n_chunks"].clone(), ma["complete"].clone()));
        // Cached on the next run, with nothing to say.
        let o = prefpipe(beside.path(), &["run", "pipeline.yaml", "--log-format", "json"]);
        assert_eq!(stderr(&o).matches("\"status\":\"cached\"").count(), 6, "{}", stderr(&o));
    }
}

/// A select chunk recorded beside its source is computed again when the
/// source chunk it read comes out different on the next run (here: its
/// record names another blake3, as a source that read other bytes would).
#[test]
fn a_chunk_whose_source_chunk_changed_is_computed_again() {
    let dir = tempfile::tempdir().unwrap();
    write_source(dir.path(), false);
    std::fs::write(dir.path().join("pipeline.yaml"), SMALL).unwrap();
    ok(prefpipe(dir.path(), &["run", "pipeline.yaml"]));
    let pairs = chunk_files(dir.path(), "pairs");
    let before = std::fs::read(&pairs[3]).unwrap();
    let mpath = pairs[3].parent().unwrap().join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    m["chunks"]["3"]["input"] = "0".repeat(64).into();
    std::fs::write(&mpath, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    std::fs::remove_file(&pairs[3]).unwrap();
    std::fs::write(&pairs[3], b"not this chunk").unwrap();
    let o = prefpipe(dir.path(), &["run", "pipeline.yaml", "--log-format", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("warning"), "not a damaged chunk: {}", stderr(&o));
    assert_eq!(std::fs::read(&pairs[3]).unwrap(), before);
    let run: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join(".prefpipe/run.json")).unwrap()).unwrap();
    let status: Vec<&str> = run["stages"].as_array().unwrap().iter().map(|s| s["status"].as_str().unwrap()).collect();
    assert_eq!(status, ["cached", "resumed", "cached"], "{run}");
}
