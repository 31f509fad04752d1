//! A cache of file digests keyed by the files' stat (DESIGN §2, run store
//! "model digests"): every `plan`, `run` and `query` needs each model's and
//! each source file's digest for the stage keys, and re-hashing 16 GB of
//! weights (or a 100 MB source) each time made a second plan take as long as
//! the first. Each caller names a `domain` (what its digest covers, e.g. a
//! model directory or a single file's bytes), so two digest functions over
//! the same files never share an entry.
//!
//! The key is, per digested file: its canonical path, size, inode, device,
//! mtime and ctime in nanoseconds. ctime cannot be set from user space, so a
//! rewritten file (even one `touch`ed back to its old mtime) gets a new key.
//! As in git's "racy index" rule, a file changed in the last
//! [`RACY_WINDOW_S`] seconds is never cached: a write in the same clock tick
//! as the hash could leave the stat unchanged. Entries live one per file
//! under `$PREFPIPE_CACHE_DIR` (default `$XDG_CACHE_HOME/prefpipe` or
//! `~/.cache/prefpipe`) in `digests/`, written by rename; the cache is best
//! effort — any failure to read or write it falls back to hashing.

use std::path::PathBuf;
use std::time::SystemTime;

/// Files modified this recently are hashed, not cached.
pub const RACY_WINDOW_S: u64 = 2;

fn cache_dir() -> Option<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    let base = env("PREFPIPE_CACHE_DIR")
        .or_else(|| env("XDG_CACHE_HOME").map(|p| p.join("prefpipe")))
        .or_else(|| env("HOME").map(|p| p.join(".cache").join("prefpipe")))?;
    Some(base.join("digests"))
}

/// The stat key of `files` for digests of kind `domain`, or `None` when one
/// is unreadable or too recent.
pub fn key(domain: &str, files: &[PathBuf]) -> Option<String> {
    let now = SystemTime::now();
    let mut h = blake3::Hasher::new();
    h.update(domain.as_bytes());
    h.update(&[0]);
    for p in files {
        let m = std::fs::metadata(p).ok()?;
        let canonical = std::fs::canonicalize(p).ok()?;
        let modified = m.modified().ok()?;
        if now.duration_since(modified).map_or(true, |d| d.as_secs() < RACY_WINDOW_S) {
            return None;
        }
        h.update(canonical.as_os_str().as_encoded_bytes());
        h.update(&[0]);
        h.update(&m.len().to_le_bytes());
        stat_bits(&m, &mut h, now)?;
    }
    Some(h.finalize().to_hex().to_string())
}

#[cfg(unix)]
fn stat_bits(m: &std::fs::Metadata, h: &mut blake3::Hasher, now: SystemTime) -> Option<()> {
    use std::os::unix::fs::MetadataExt;
    let ctime = SystemTime::UNIX_EPOCH + std::time::Duration::new(m.ctime().max(0) as u64, m.ctime_nsec().clamp(0, 999_999_999) as u32);
    if now.duration_since(ctime).map_or(true, |d| d.as_secs() < RACY_WINDOW_S) {
        return None;
    }
    for x in [m.ino() as i64, m.dev() as i64, m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()] {
        h.update(&x.to_le_bytes());
    }
    Some(())
}

#[cfg(not(unix))]
fn stat_bits(m: &std::fs::Metadata, h: &mut blake3::Hasher, _now: SystemTime) -> Option<()> {
    let t = m.modified().ok()?.duration_since(SystemTime::UNIX_EPOCH).ok()?;
    h.update(&t.as_nanos().to_le_bytes());
    Some(())
}

/// The cached digest under `key`, if there is a well-formed one.
pub fn get(key: &str) -> Option<String> {
    let s = std::fs::read_to_string(cache_dir()?.join(key)).ok()?;
    let s = s.trim();
    (s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())).then(|| s.to_string())
}

/// Records `digest` under `key` (atomically; errors ignored).
pub fn put(key: &str, digest: &str) {
    let Some(dir) = cache_dir() else { return };
    if std::fs::create_dir_all(&dir).is_err() {
        return;
    }
    let tmp = dir.join(format!(".{key}.{}.tmp", std::process::id()));
    if std::fs::write(&tmp, digest).is_ok() && std::fs::rename(&tmp, dir.join(key)).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// The digest of `files` of kind `domain`: the cached one when their stat is
/// unchanged, else `compute()`'s, which is then cached (unless a file is in
/// the racy window).
pub fn cached<E>(domain: &str, files: &[PathBuf], compute: impl FnOnce() -> Result<String, E>) -> Result<String, E> {
    let key = key(domain, files);
    if let Some(d) = key.as_deref().and_then(get) {
        return Ok(d);
    }
    let digest = compute()?;
    if let Some(k) = key {
        put(&k, &digest);
    }
    Ok(digest)
}

/// The directory entries are written to (for tests and `--help` texts).
pub fn location() -> Option<PathBuf> {
    cache_dir()
}
