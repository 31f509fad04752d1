//! The content-addressed run store (default `./.prefpipe/`).
//!
//! Layout:
//!
//! ```text
//! <store>/LOCK                                one writer at a time (shards share it)
//! <store>/locks/shard-I-of-N                  one writer per shard (DESIGN §13)
//! <store>/run.json                            the last run's manifest
//! <store>/run-shard-I-of-N.json               the last run of that shard
//! <store>/requests/<stage_id>/                the request cache (DESIGN §11)
//! <store>/stages/<id>-<key16>/manifest.json   chunks finished so far
//! <store>/stages/<id>-<key16>/chunk-000000.parquet
//! <store>/stages/<id>-<key16>/scratch/        stage-private caches/checkpoints
//! ```
//!
//! A chunk file is written to a temp file and renamed; only then is it
//! recorded in the manifest (itself written atomically). A crash between the
//! two leaves a chunk the next run rewrites with the same bytes.
//!
//! Each chunk record holds the blake3 of its file; [`Store::verify_chunk`]
//! checks it, and the executor treats a chunk that is missing, unreadable or
//! altered (truncated, flipped bytes) as not done and computes it again.
//!
//! The store may also live on an object store ([`crate::objstore`]): the same
//! layout under the URL's prefix, with `leases/` instead of `LOCK`/`locks/`.
//! `root` is then this run's local mirror; files are written there, uploaded
//! before they are recorded, and input chunks are downloaded on demand. Chunk
//! records name the stage key, so a changed pipeline never takes another
//! key's chunks for its own.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::lease::Guard;
use crate::location::StoreLocation;
use crate::objstore::Remote;
use crate::shard::Shard;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ChunkRecord {
    pub file: String,
    pub rows_in: u64,
    pub rows_out: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub drops: BTreeMap<String, u64>,
    /// blake3 (hex) of the chunk file's bytes; absent in records written
    /// before prefpipe recorded it (those chunks are only checked to exist).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blake3: Option<String>,
    /// blake3 of the input chunk this chunk was computed from, for a chunk
    /// computed beside a source that was still being read (its input was
    /// not recorded yet): a chunk whose input no longer has that blake3 is
    /// computed again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExternalRecord {
    pub path: PathBuf,
    pub blake3: String,
}

/// What the store knows about one stage key.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub id: String,
    pub kind: String,
    pub key: String,
    pub complete: bool,
    /// Chunks the stage will produce, when known (per-chunk stages).
    pub n_chunks: Option<usize>,
    pub chunks: BTreeMap<usize, ChunkRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalRecord>,
    /// Whether every prompt's rows sit in one chunk.
    pub aligned: bool,
}

impl Manifest {
    pub fn rows_in(&self) -> u64 {
        self.chunks.values().map(|c| c.rows_in).sum()
    }
    pub fn rows_out(&self) -> u64 {
        self.chunks.values().map(|c| c.rows_out).sum()
    }
    pub fn drops(&self) -> BTreeMap<String, u64> {
        let mut d = BTreeMap::new();
        for c in self.chunks.values() {
            for (k, v) in &c.drops {
                *d.entry(k.clone()).or_default() += v;
            }
        }
        d
    }
}

/// A chunk record as stored: the record and the stage key it belongs to.
#[derive(Serialize)]
struct MarkerOut<'a> {
    key: &'a str,
    #[serde(flatten)]
    rec: &'a ChunkRecord,
}

#[derive(Deserialize)]
struct MarkerIn {
    /// Absent in records written before markers named their key.
    #[serde(default)]
    key: Option<String>,
    #[serde(flatten)]
    rec: ChunkRecord,
}

pub struct Store {
    /// The store's directory; for an object store, this run's local mirror.
    pub root: PathBuf,
    remote: Option<Arc<Remote>>,
    shard: Option<Shard>,
    guard: Option<Guard>,
    /// Delete the mirror when dropped (read-only opens; a finished run).
    tidy: bool,
}

impl Store {
    /// Opens a local store for writing and takes its lock; a second run on
    /// the same store gets [`Error::Locked`].
    pub fn open_locked(root: &Path) -> Result<Store> {
        Store::open(&StoreLocation::Local(root.to_path_buf()), None)
    }

    /// Opens a store for writing — a directory or an object store — as a
    /// whole or as one shard, taking its lock or lease ([`crate::lease`]).
    pub fn open(loc: &StoreLocation, shard: Option<Shard>) -> Result<Store> {
        match loc {
            StoreLocation::Local(root) => {
                std::fs::create_dir_all(root.join("stages")).map_err(|e| Error::io(root, e))?;
                let guard = crate::lease::lock_local(root, shard)?;
                Ok(Store { root: root.clone(), remote: None, shard, guard: Some(guard), tidy: false })
            }
            StoreLocation::Object(u) => {
                let tag = shard.map_or_else(|| "all".to_string(), |s| s.tag());
                let remote = Remote::connect(u.clone(), crate::objstore::mirror_dir(u, &tag))?;
                let guard = match crate::lease::lease(&remote, shard) {
                    Ok(g) => g,
                    Err(e) => {
                        // A mirror made just now for nothing goes again (one with a failed run's scratch stays).
                        let _ = std::fs::remove_dir(&remote.local);
                        let _ = remote.local.parent().map(std::fs::remove_dir);
                        return Err(e);
                    }
                };
                Ok(Store { root: remote.local.clone(), remote: Some(remote), shard, guard: Some(guard), tidy: false })
            }
        }
    }

    /// Opens a local store to read only (plan, query); takes no lock.
    pub fn open_read(root: &Path) -> Store {
        Store { root: root.to_path_buf(), remote: None, shard: None, guard: None, tidy: false }
    }

    /// Opens a store to read only (plan, query, report), local or on an
    /// object store; takes no lock.
    pub fn open_read_at(loc: &StoreLocation) -> Result<Store> {
        match loc {
            StoreLocation::Local(root) => Ok(Store::open_read(root)),
            StoreLocation::Object(u) => {
                let remote = Remote::connect(u.clone(), crate::objstore::mirror_dir(u, &format!("read-{}", std::process::id())))?;
                // The last run's manifest, for readers that open it as a file (report).
                remote.download("run.json", &remote.local.join("run.json"))?;
                Ok(Store { root: remote.local.clone(), remote: Some(remote), shard: None, guard: None, tidy: true })
            }
        }
    }

    /// A run finished cleanly: the lease goes now, and an object store's
    /// local mirror when the store is dropped.
    pub fn finish(&mut self) {
        self.guard = None;
        self.tidy = true;
    }

    /// The shard this run writes, if it is one.
    pub fn shard(&self) -> Option<Shard> {
        self.shard
    }

    /// The object store behind the mirror, if the store is on one.
    pub fn remote(&self) -> Option<&Arc<Remote>> {
        self.remote.as_ref()
    }

    /// Where a file of the store is, for messages: its path, or its URL.
    pub fn location_of(&self, path: &Path) -> String {
        match &self.remote {
            Some(r) => r.rel_of(path).map(|rel| r.url_of(&rel)).unwrap_or_else(|_| path.display().to_string()),
            None => path.display().to_string(),
        }
    }

    /// This run's `run.json` (`run-shard-I-of-N.json` for a shard, so shards
    /// never overwrite each other's).
    pub fn run_json_path(&self) -> PathBuf {
        self.root.join(self.shard.map_or_else(|| "run.json".to_string(), |s| format!("run-{}.json", s.tag())))
    }

    /// Uploads files written into the mirror (nothing to do on a local store).
    pub fn publish(&self, files: &[PathBuf]) -> Result<()> {
        match &self.remote {
            Some(r) => {
                self.check_lease()?;
                r.upload(files)
            }
            None => Ok(()),
        }
    }

    /// Fails once this run's lease was lost: it must stop writing.
    pub fn check_lease(&self) -> Result<()> {
        self.guard.as_ref().map_or(Ok(()), Guard::check)
    }

    pub fn stage_dir(&self, id: &str, key: &str) -> PathBuf {
        self.root.join("stages").join(format!("{id}-{}", &key[..16.min(key.len())]))
    }

    /// The stage's manifest: `manifest.json`, plus the chunk records written
    /// since (one small file per finished chunk, so recording a chunk costs
    /// O(1) however many chunks came before).
    pub fn manifest(&self, id: &str, key: &str) -> Result<Option<Manifest>> {
        let dir = self.stage_dir(id, key);
        let p = dir.join("manifest.json");
        if let Some(r) = &self.remote {
            return self.remote_manifest(r, &dir, key);
        }
        let mut m: Manifest = match std::fs::read(&p) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::Runtime(format!("{}: corrupt manifest: {e}", p.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(p, e)),
        };
        if m.key != key {
            return Ok(None);
        }
        if !m.complete {
            let rd = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
            for entry in rd.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(c) = record_index(&name) else { continue };
                let bytes = std::fs::read(entry.path()).map_err(|e| Error::io(entry.path(), e))?;
                if let Some(rec) = parse_record(&bytes, key) {
                    if dir.join(&rec.file).exists() {
                        m.chunks.insert(c, rec);
                    }
                }
            }
        }
        Ok(Some(m))
    }

    /// [`Store::manifest`] on an object store: one listing of the stage's
    /// objects (which also tells [`Store::verify_chunk`] what exists), then
    /// `manifest.json` and the chunk records.
    fn remote_manifest(&self, r: &Remote, dir: &Path, key: &str) -> Result<Option<Manifest>> {
        let rel_dir = r.rel_of(dir)?;
        let listed = r.list(&rel_dir)?;
        if !listed.iter().any(|(n, _)| n == "manifest.json") {
            return Ok(None);
        }
        let p = dir.join("manifest.json");
        let Some(bytes) = r.get(&format!("{rel_dir}/manifest.json"))? else { return Ok(None) };
        let mut m: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| Error::Runtime(format!("{}: corrupt manifest: {e}", self.location_of(&p))))?;
        if m.key != key {
            return Ok(None);
        }
        if !m.complete {
            let names: HashSet<&str> = listed.iter().map(|(n, _)| n.as_str()).collect();
            let recs: Vec<(usize, String)> =
                listed.iter().filter_map(|(n, _)| Some((record_index(n)?, format!("{rel_dir}/{n}")))).collect();
            let rels: Vec<String> = recs.iter().map(|(_, r)| r.clone()).collect();
            for ((c, _), bytes) in recs.iter().zip(r.get_many(&rels)?) {
                if let Some(rec) = bytes.as_deref().and_then(|b| parse_record(b, key)) {
                    if names.contains(rec.file.as_str()) || rec.file.is_empty() {
                        m.chunks.insert(*c, rec);
                    }
                }
            }
        }
        Ok(Some(m))
    }

    /// Records one finished chunk (after its Parquet file is in place).
    pub fn record_chunk(&self, id: &str, key: &str, c: usize, rec: &ChunkRecord) -> Result<()> {
        let dir = self.stage_dir(id, key);
        let path = dir.join(format!("chunk-{c:06}.json"));
        let bytes = serde_json::to_vec(&MarkerOut { key, rec }).expect("record serializes");
        if let Some(r) = &self.remote {
            self.check_lease()?;
            // The chunk's file first: a record never names a missing object.
            if !rec.file.is_empty() {
                r.upload(&[dir.join(&rec.file)])?;
            }
            return r.put(&r.rel_of(&path)?, bytes);
        }
        crate::io::write_atomic(&path, |f| {
            use std::io::Write;
            f.write_all(&bytes).map_err(|e| Error::io(&path, e))
        })
    }

    /// Writes `manifest.json`; once complete, the per-chunk records are folded in and removed.
    pub fn write_manifest(&self, m: &Manifest) -> Result<()> {
        let dir = self.stage_dir(&m.id, &m.key);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let bytes = serde_json::to_vec_pretty(m).expect("manifest serializes");
        if let Some(r) = &self.remote {
            self.check_lease()?;
            // Chunk files this run wrote and has not uploaded yet go first.
            let mut files = Vec::new();
            for c in m.chunks.values().filter(|c| !c.file.is_empty()) {
                let f = dir.join(&c.file);
                if !r.known(&r.rel_of(&f)?) {
                    files.push(f);
                }
            }
            r.upload(&files)?;
            r.put(&r.rel_of(&dir.join("manifest.json"))?, bytes)?;
            if m.complete {
                let mut recs = Vec::new();
                for c in m.chunks.keys() {
                    let rel = r.rel_of(&dir.join(format!("chunk-{c:06}.json")))?;
                    if r.known(&rel) {
                        recs.push(rel);
                    }
                }
                r.each(&recs, |rel| r.delete(rel))?;
            }
            return Ok(());
        }
        crate::io::write_atomic(&dir.join("manifest.json"), |f| {
            use std::io::Write;
            f.write_all(&bytes).map_err(|e| Error::io(dir.join("manifest.json"), e))
        })?;
        if m.complete {
            for c in m.chunks.keys() {
                let _ = std::fs::remove_file(dir.join(format!("chunk-{c:06}.json")));
            }
        }
        Ok(())
    }

    /// Forgets a stage's outputs (for --force).
    pub fn clear(&self, id: &str, key: &str) -> Result<()> {
        let dir = self.stage_dir(id, key);
        if let Some(r) = &self.remote {
            r.delete_dir(&r.rel_of(&dir)?)?;
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(dir, e)),
        }
    }

    /// Checks chunk `rec` of stage `m` against its record: `Err(why)` when
    /// its file is missing, unreadable, or its blake3 differs (truncated or
    /// altered bytes). A record without a file (a sink's) is fine.
    pub fn verify_chunk(&self, m: &Manifest, rec: &ChunkRecord) -> std::result::Result<(), String> {
        if rec.file.is_empty() {
            return Ok(());
        }
        let path = self.stage_dir(&m.id, &m.key).join(&rec.file);
        if let Some(r) = &self.remote {
            // Listed by `manifest`; the bytes are checked when downloaded ([`Store::fetch`]).
            return match r.rel_of(&path) {
                Ok(rel) if r.known(&rel) => Ok(()),
                _ => Err("is missing".into()),
            };
        }
        let Some(want) = &rec.blake3 else {
            return if path.is_file() { Ok(()) } else { Err("is missing".into()) };
        };
        let mut h = blake3::Hasher::new();
        match File::open(&path).and_then(|mut f| std::io::copy(&mut f, &mut h)) {
            Ok(_) if h.finalize().to_hex().as_str() == want => Ok(()),
            Ok(_) => Err("does not match its recorded blake3 (truncated or altered)".into()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err("is missing".into()),
            Err(e) => Err(format!("is unreadable ({e})")),
        }
    }

    /// The chunk files of a finished stage, in chunk order. On an object
    /// store opened for writing, their places in the mirror ([`Store::fetch`]
    /// brings them); opened to read (report), they are brought here first.
    pub fn chunk_files(&self, m: &Manifest) -> Vec<PathBuf> {
        if self.remote.is_some() && self.guard.is_none() {
            if let Ok(files) = self.fetch(m) {
                return files;
            }
        }
        self.paths(m)
    }

    /// Where the chunk files of stage `m` lie (or will, once fetched) on local disk.
    pub(crate) fn paths(&self, m: &Manifest) -> Vec<PathBuf> {
        let dir = self.stage_dir(&m.id, &m.key);
        m.chunks.values().map(|c| dir.join(&c.file)).collect()
    }

    /// Chunk `c` of stage `m`, on local disk (downloaded from an object store
    /// when needed).
    pub fn chunk_file(&self, m: &Manifest, c: usize) -> Result<PathBuf> {
        let rec = m.chunks.get(&c).ok_or_else(|| Error::Runtime(format!("internal error: stage `{}` has no chunk {c} recorded", m.id)))?;
        self.fetch_record(m, rec)
    }

    /// Every chunk file of stage `m`, on local disk, in chunk order.
    pub fn fetch(&self, m: &Manifest) -> Result<Vec<PathBuf>> {
        let Some(r) = &self.remote else { return Ok(self.paths(m)) };
        let recs: Vec<&ChunkRecord> = m.chunks.values().filter(|c| !c.file.is_empty()).collect();
        r.each(&recs, |rec| self.fetch_record(m, rec).map(|_| ()))?;
        Ok(self.paths(m))
    }

    fn fetch_record(&self, m: &Manifest, rec: &ChunkRecord) -> Result<PathBuf> {
        let path = self.stage_dir(&m.id, &m.key).join(&rec.file);
        let Some(r) = &self.remote else { return Ok(path) };
        let intact = |p: &Path| match &rec.blake3 {
            Some(want) => crate::io::file_digest(p).ok().as_deref() == Some(want.as_str()),
            None => p.is_file(),
        };
        if path.is_file() && intact(&path) {
            return Ok(path);
        }
        let rel = r.rel_of(&path)?;
        if !r.download(&rel, &path)? {
            return Err(Error::Runtime(format!("stage `{}`: {} is missing from the store; run again to compute it", m.id, r.url_of(&rel))));
        }
        if !intact(&path) {
            let _ = std::fs::remove_file(&path);
            return Err(Error::Runtime(format!(
                "stage `{}`: {} does not match its recorded blake3 (altered in the store); run again with --force {}",
                m.id,
                r.url_of(&rel),
                m.id
            )));
        }
        Ok(path)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // The lease first (it is deleted), then the mirror of a finished run.
        self.guard = None;
        if self.tidy && self.remote.is_some() {
            let _ = std::fs::remove_dir_all(&self.root);
            // The URL's directory, once no other run's mirror is in it.
            let _ = self.root.parent().map(std::fs::remove_dir);
        }
    }
}

/// `chunk-000012.json` → 12.
fn record_index(name: &str) -> Option<usize> {
    name.strip_prefix("chunk-")?.strip_suffix(".json")?.parse().ok()
}

/// A chunk record, unless it is unreadable or names another stage key.
fn parse_record(bytes: &[u8], key: &str) -> Option<ChunkRecord> {
    let m: MarkerIn = serde_json::from_slice(bytes).ok()?;
    m.key.is_none_or(|k| k == key).then_some(m.rec)
}

pub fn chunk_file_name(i: usize) -> String {
    format!("chunk-{i:06}.parquet")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_writer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = Store::open_locked(dir.path()).unwrap();
        let e = Store::open_locked(dir.path()).err().expect("second lock must fail");
        assert!(matches!(e, Error::Locked { .. }), "{e}");
        drop(a);
        Store::open_locked(dir.path()).expect("lock is released on drop");
    }

    #[test]
    fn manifests_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open_locked(dir.path()).unwrap();
        let mut m = Manifest { id: "sel".into(), kind: "select".into(), key: "ab".repeat(32), ..Default::default() };
        s.write_manifest(&m).unwrap();
        let rec = ChunkRecord {
            file: chunk_file_name(0),
            rows_in: 5,
            rows_out: 2,
            drops: [("tie".to_string(), 1)].into(),
            blake3: Some(blake3::hash(b"x").to_hex().to_string()),
            input: Some(blake3::hash(b"y").to_hex().to_string()),
        };
        // A recorded chunk counts only once its Parquet file exists.
        s.record_chunk("sel", &m.key, 0, &rec).unwrap();
        assert!(s.manifest("sel", &m.key).unwrap().unwrap().chunks.is_empty());
        std::fs::write(s.stage_dir("sel", &m.key).join(chunk_file_name(0)), b"x").unwrap();
        m.chunks.insert(0, rec);
        assert_eq!(s.manifest("sel", &m.key).unwrap(), Some(m.clone()));
        m.complete = true;
        s.write_manifest(&m).unwrap();
        assert_eq!(s.manifest("sel", &m.key).unwrap(), Some(m.clone()));
        assert_eq!(s.manifest("sel", &"cd".repeat(32)).unwrap(), None);
        assert_eq!(m.drops()["tie"], 1);
    }

    /// A chunk is intact only with its recorded bytes: truncated, flipped,
    /// deleted or unreadable files are reported; legacy records (no digest)
    /// need only the file.
    #[test]
    fn chunks_are_verified_against_their_blake3() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open_locked(dir.path()).unwrap();
        let m = Manifest { id: "sel".into(), kind: "select".into(), key: "ab".repeat(32), ..Default::default() };
        s.write_manifest(&m).unwrap();
        let path = s.stage_dir("sel", &m.key).join(chunk_file_name(0));
        std::fs::write(&path, b"PAR1 chunk bytes PAR1").unwrap();
        let rec = ChunkRecord {
            file: chunk_file_name(0),
            blake3: Some(blake3::hash(b"PAR1 chunk bytes PAR1").to_hex().to_string()),
            ..Default::default()
        };
        assert_eq!(s.verify_chunk(&m, &rec), Ok(()));
        std::fs::write(&path, b"PAR1 chunk bytes PAR").unwrap();
        assert!(s.verify_chunk(&m, &rec).unwrap_err().contains("blake3"));
        std::fs::write(&path, b"PAR1 chunk bytez PAR1").unwrap();
        assert!(s.verify_chunk(&m, &rec).unwrap_err().contains("blake3"));
        std::fs::remove_file(&path).unwrap();
        assert_eq!(s.verify_chunk(&m, &rec), Err("is missing".into()));
        std::fs::create_dir(&path).unwrap();
        assert!(s.verify_chunk(&m, &rec).unwrap_err().starts_with("is unreadable"));
        std::fs::remove_dir(&path).unwrap();
        let legacy = ChunkRecord { blake3: None, ..rec };
        assert_eq!(s.verify_chunk(&m, &legacy), Err("is missing".into()));
        std::fs::write(&path, b"anything").unwrap();
        assert_eq!(s.verify_chunk(&m, &legacy), Ok(()));
    }
}
