//! The content-addressed run store (default `./.prefpipe/`).
//!
//! Layout:
//!
//! ```text
//! <store>/LOCK                                one writer at a time
//! <store>/run.json                            the last run's manifest
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

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use fs4::fs_std::FileExt;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

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

pub struct Store {
    pub root: PathBuf,
    _lock: Option<File>,
}

impl Store {
    /// Opens the store for writing and takes its lock; a second run on the
    /// same store gets [`Error::Locked`].
    pub fn open_locked(root: &Path) -> Result<Store> {
        std::fs::create_dir_all(root.join("stages")).map_err(|e| Error::io(root, e))?;
        let lock_path = root.join("LOCK");
        let f = OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(|e| Error::io(&lock_path, e))?;
        match FileExt::try_lock_exclusive(&f) {
            Ok(true) => {}
            Ok(false) => return Err(Error::Locked { path: root.to_path_buf() }),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Err(Error::Locked { path: root.to_path_buf() }),
            Err(e) => return Err(Error::io(&lock_path, e)),
        }
        Ok(Store { root: root.to_path_buf(), _lock: Some(f) })
    }

    /// Opens the store to read only (plan, query); takes no lock.
    pub fn open_read(root: &Path) -> Store {
        Store { root: root.to_path_buf(), _lock: None }
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
                let Some(n) = name.strip_prefix("chunk-").and_then(|r| r.strip_suffix(".json")) else { continue };
                let Ok(c) = n.parse::<usize>() else { continue };
                let bytes = std::fs::read(entry.path()).map_err(|e| Error::io(entry.path(), e))?;
                if let Ok(rec) = serde_json::from_slice::<ChunkRecord>(&bytes) {
                    if dir.join(&rec.file).exists() {
                        m.chunks.insert(c, rec);
                    }
                }
            }
        }
        Ok(Some(m))
    }

    /// Records one finished chunk (after its Parquet file is in place).
    pub fn record_chunk(&self, id: &str, key: &str, c: usize, rec: &ChunkRecord) -> Result<()> {
        let path = self.stage_dir(id, key).join(format!("chunk-{c:06}.json"));
        let bytes = serde_json::to_vec(rec).expect("record serializes");
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

    /// The chunk files of a finished stage, in chunk order.
    pub fn chunk_files(&self, m: &Manifest) -> Vec<PathBuf> {
        let dir = self.stage_dir(&m.id, &m.key);
        m.chunks.values().map(|c| dir.join(&c.file)).collect()
    }
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
