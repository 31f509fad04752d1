//! A source file's digest goes through the stat-keyed cache
//! (prefpipe_core::digest_cache): a second plan reads the cache instead of
//! hashing the file, and a rewritten source (same size, mtime set back) is
//! hashed again, so its stage key changes. One test function: it sets
//! `PREFPIPE_CACHE_DIR`.

use std::path::Path;
use std::time::{Duration, SystemTime};

use prefpipe_core::digest_cache;

const PIPELINE: &str = "name: t\nstages:\n  - id: scored\n    kind: source\n    path: scored.jsonl\n";

fn source_key(dir: &Path) -> String {
    let spec = prefpipe_core::spec::parse("t.yaml", PIPELINE.as_bytes(), "t".into()).unwrap();
    let plan = prefpipe_core::plan::build(spec, dir, prefpipe_stages::KINDS).unwrap();
    plan.stages[0].key.clone()
}

fn entries() -> Vec<std::path::PathBuf> {
    std::fs::read_dir(digest_cache::location().unwrap()).unwrap().map(|e| e.unwrap().path()).collect()
}

#[test]
fn second_plan_reads_the_cached_source_digest_and_a_rewrite_misses_it() {
    let cache = tempfile::tempdir().unwrap();
    std::env::set_var("PREFPIPE_CACHE_DIR", cache.path());
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("scored.jsonl");
    std::fs::write(&src, "{\"prompt_id\":\"p1\",\"prompt\":\"a\",\"response\":\"b\",\"reward\":1.0}\n").unwrap();
    // Files younger than the racy window are never cached: age it.
    let old = SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::options().write(true).open(&src).unwrap().set_modified(old).unwrap();
    std::thread::sleep(Duration::from_secs(digest_cache::RACY_WINDOW_S + 1)); // ctime moves with set_modified

    let first = source_key(work.path());
    let listed = entries();
    assert_eq!(listed.len(), 1, "one cache entry for the one source file");

    // Plant a different digest under the same key: the next plan's key must
    // change, which shows the file was not hashed again.
    let digest = std::fs::read_to_string(&listed[0]).unwrap();
    std::fs::write(&listed[0], "0".repeat(64)).unwrap();
    assert_ne!(source_key(work.path()), first);
    std::fs::write(&listed[0], &digest).unwrap();
    assert_eq!(source_key(work.path()), first);

    // Same size, one byte changed, mtime set back: ctime moves, so the stat
    // key does, and the file is hashed afresh (a new stage key).
    std::fs::write(&src, "{\"prompt_id\":\"p1\",\"prompt\":\"a\",\"response\":\"c\",\"reward\":1.0}\n").unwrap();
    std::fs::File::options().write(true).open(&src).unwrap().set_modified(old).unwrap();
    assert_ne!(source_key(work.path()), first);
    // A just-changed file is not cached (racy window): still one entry.
    assert_eq!(entries().len(), 1);
}
