//! The model-digest cache (crate::digest_cache): a second `model_digest`
//! reads the cache, and any change to a file's bytes (same size, mtime set
//! back) misses it. One test function: it sets `PREFPIPE_CACHE_DIR`.

use std::time::{Duration, SystemTime};

use prefpipe_models::{digest_cache, model_digest};

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn second_digest_comes_from_the_cache_and_a_rewrite_misses_it() {
    let cache = tempfile::tempdir().unwrap();
    std::env::set_var("PREFPIPE_CACHE_DIR", cache.path());
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("m");
    copy_dir(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data-samples/models/tiny-llama"), &dir);
    // Files younger than the racy window are never cached: age them.
    let old = SystemTime::now() - Duration::from_secs(3600);
    for e in std::fs::read_dir(&dir).unwrap() {
        std::fs::File::options().write(true).open(e.unwrap().path()).unwrap().set_modified(old).unwrap();
    }
    std::thread::sleep(Duration::from_secs(digest_cache::RACY_WINDOW_S + 1)); // ctime moves with set_modified

    let first = model_digest(&dir).unwrap();
    let entries: Vec<_> = std::fs::read_dir(digest_cache::location().unwrap()).unwrap().collect();
    assert_eq!(entries.len(), 1, "one cache entry per model directory");

    // Plant a different digest under the same key: the next call must return
    // it, which shows the weights were not hashed again.
    let entry = entries[0].as_ref().unwrap().path();
    let planted = "0".repeat(64);
    std::fs::write(&entry, &planted).unwrap();
    assert_eq!(model_digest(&dir).unwrap(), planted);
    std::fs::write(&entry, &first).unwrap();

    // Same size, one byte flipped, mtime set back: ctime changes, so the key
    // does, and the digest is computed afresh (and differs).
    let w = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&w).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&w, &bytes).unwrap();
    std::fs::File::options().write(true).open(&w).unwrap().set_modified(old).unwrap();
    let changed = model_digest(&dir).unwrap();
    assert_ne!(changed, first);
    assert_ne!(changed, planted);
    // A just-written file is not cached (racy window): still one entry.
    assert_eq!(std::fs::read_dir(digest_cache::location().unwrap()).unwrap().count(), 1);
}
