//! The request cache (DESIGN §11 "Request cache").
//!
//! A request is keyed by blake3 of the endpoint path, the served identity
//! (model, revision, root) and the canonical JSON of its body — never the API
//! key, never the base URL. Under `<store>/requests/<stage_id>/`, each
//! (stage key, chunk, tag) has one append-only log, `<name>.log`, of records
//! `u32 LE body length | 32-byte key | body`, each written with one
//! `write_all` as soon as the response is validated and before it is used.
//! A torn tail (a `kill -9` mid-write) is ignored and truncated on reopen.
//! When the chunk's call completes the log is folded into `<name>.parquet`
//! (`key` FixedSizeBinary(32), `body` Utf8, zstd) and deleted.
//!
//! Opening the cache indexes every log and Parquet file of the stage, so a
//! later run with another `chunk_size` or stage key still finds its answers;
//! bodies are read back lazily (the last two Parquet files stay in memory).
//!
//! On an object store (DESIGN §13) the directory is in the run's local
//! mirror: opening downloads the stage's logs and Parquet files that are
//! missing (or shorter) here, a log is uploaded at most every
//! [`PUSH_EVERY`] while records arrive (and when its writer closes), and a
//! fold uploads the Parquet file and deletes the log object. A shard killed
//! on one machine and rerun on another replays all but the last second's
//! answers; rerun on the same machine, all of them.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arrow::array::{Array, FixedSizeBinaryArray, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::{ArrowWriter, ProjectionMask};
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use prefpipe_core::objstore::Remote;
use serde_json::Value;

use crate::{Error, Identity};

/// How often a growing log is uploaded to an object store.
pub const PUSH_EVERY: Duration = Duration::from_secs(1);

/// A request's cache key.
pub type Key = [u8; 32];

const DOMAIN: &[u8] = b"prefpipe/request/v1";
/// Record header: body length (u32 LE) and key.
const HEADER: u64 = 4 + 32;
/// Body bytes per Parquet batch (keeps Utf8 offsets far from 2 GiB).
const BATCH_BYTES: usize = 64 << 20;
/// Parquet files whose bodies stay in memory.
const LOADED_FILES: usize = 2;

/// JSON with object keys sorted (by bytes) at every level and no whitespace.
pub fn canonical_json(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_scalar(&Value::String(k.clone()), out);
                out.push(b':');
                write_canonical(&m[k], out);
            }
            out.push(b'}');
        }
        Value::Array(a) => {
            out.push(b'[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(x, out);
            }
            out.push(b']');
        }
        scalar => write_scalar(scalar, out),
    }
}

fn write_scalar(v: &Value, out: &mut Vec<u8>) {
    // Serialising a scalar into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, v);
}

/// blake3 of ("prefpipe/request/v1", endpoint path, model, revision, root,
/// canonical body), each field length-prefixed so no two tuples collide.
pub fn request_key(path: &str, id: &Identity, canonical_body: &[u8]) -> Key {
    fn field(h: &mut blake3::Hasher, b: &[u8]) {
        h.update(&(b.len() as u64).to_le_bytes());
        h.update(b);
    }
    fn opt(h: &mut blake3::Hasher, s: Option<&str>) {
        match s {
            None => {
                h.update(&[0]);
            }
            Some(s) => {
                h.update(&[1]);
                field(h, s.as_bytes());
            }
        }
    }
    let mut h = blake3::Hasher::new();
    field(&mut h, DOMAIN);
    field(&mut h, path.as_bytes());
    field(&mut h, id.model.as_bytes());
    opt(&mut h, id.revision.as_deref());
    opt(&mut h, id.root.as_deref());
    field(&mut h, canonical_body);
    *h.finalize().as_bytes()
}

fn io_err(path: &Path, what: &str, e: impl std::fmt::Display) -> Error {
    Error::rt(format!("request cache {}: {what}: {e}", path.display()))
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Loc {
    Log { file: usize, offset: u64, len: u32 },
    Row { file: usize, row: usize },
}

#[derive(Default)]
struct Index {
    files: Vec<PathBuf>,
    ids: HashMap<PathBuf, usize>,
    keys: HashMap<Key, Loc>,
}

impl Index {
    fn file_id(&mut self, path: &Path) -> usize {
        if let Some(&i) = self.ids.get(path) {
            return i;
        }
        self.files.push(path.to_path_buf());
        self.ids.insert(path.to_path_buf(), self.files.len() - 1);
        self.files.len() - 1
    }
}

/// A Parquet file's rows in memory.
struct Loaded {
    batches: Vec<(FixedSizeBinaryArray, StringArray)>,
    /// First row of each batch.
    starts: Vec<usize>,
}

impl Loaded {
    fn get(&self, row: usize) -> Option<(&[u8], &str)> {
        let b = self.starts.partition_point(|&s| s <= row).checked_sub(1)?;
        let (keys, bodies) = self.batches.get(b)?;
        let i = row - self.starts[b];
        (i < keys.len()).then(|| (keys.value(i), bodies.value(i)))
    }
}

/// The cache of one stage: `<store>/requests/<stage_id>/`.
pub struct Cache {
    dir: PathBuf,
    index: Mutex<Index>,
    loaded: Mutex<VecDeque<(usize, Arc<Loaded>)>>,
    /// The object store behind the directory, when the run store is on one.
    remote: Option<Arc<Remote>>,
}

/// An open log: appends are serialised by its mutex.
pub struct LogWriter {
    path: PathBuf,
    file_id: usize,
    file: File,
    offset: u64,
    remote: Option<Arc<Remote>>,
    /// When the log was last uploaded, and whether records arrived since.
    pushed: Option<Instant>,
    dirty: bool,
}

impl LogWriter {
    fn push(&mut self) -> Result<(), Error> {
        if let Some(r) = &self.remote {
            r.upload(std::slice::from_ref(&self.path)).map_err(|e| io_err(&self.path, "cannot upload", e))?;
            self.pushed = Some(Instant::now());
            self.dirty = false;
        }
        Ok(())
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        // Best effort: what is not uploaded stays in this machine's mirror.
        if self.dirty {
            let _ = self.push();
        }
    }
}

/// Downloads the objects under `dir` that are missing here or shorter here.
fn pull(r: &Remote, dir: &Path) -> Result<(), Error> {
    let rel = r.rel_of(dir).map_err(|e| io_err(dir, "cannot mirror", e))?;
    for (name, size) in r.list(&rel).map_err(|e| io_err(dir, "cannot list", e))? {
        if name.contains('/') || name.starts_with('.') {
            continue;
        }
        let local = dir.join(&name);
        if std::fs::metadata(&local).map_or(true, |m| m.len() < size) {
            r.download(&format!("{rel}/{name}"), &local).map_err(|e| io_err(&local, "cannot download", e))?;
        }
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new("key", DataType::FixedSizeBinary(32), false), Field::new("body", DataType::Utf8, false)]))
}

impl Cache {
    /// Opens (creating) `dir` and indexes every `.parquet` and `.log` in it,
    /// truncating torn log tails.
    pub fn open(dir: &Path) -> Result<Cache, Error> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, "cannot create", e))?;
        let remote = prefpipe_core::objstore::mirror_of(dir).map(|(r, _)| r);
        if let Some(r) = &remote {
            pull(r, dir)?;
        }
        let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| io_err(dir, "cannot list", e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
            .collect();
        names.sort();
        let mut index = Index::default();
        // Parquet first, then logs: a log not yet folded adds to its Parquet file.
        // Shards of one stage share the directory: a file another shard folds
        // (deletes) after the listing is skipped, and only a log's own writer
        // truncates its torn tail ([`Cache::open_log`]).
        for p in names.iter().filter(|p| p.extension().is_some_and(|e| e == "parquet")) {
            let keys = match read_keys(p) {
                Err(_) if !p.exists() => continue,
                r => r?,
            };
            let id = index.file_id(p);
            for (row, key) in keys.into_iter().enumerate() {
                index.keys.insert(key, Loc::Row { file: id, row });
            }
        }
        for p in names.iter().filter(|p| p.extension().is_some_and(|e| e == "log")) {
            let records = match scan_log(p, false) {
                Err(_) if !p.exists() => continue,
                r => r?,
            };
            let id = index.file_id(p);
            for (key, offset, len) in records {
                index.keys.insert(key, Loc::Log { file: id, offset, len });
            }
        }
        Ok(Cache { dir: dir.to_path_buf(), index: Mutex::new(index), loaded: Mutex::new(VecDeque::new()), remote })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Number of keys indexed.
    pub fn len(&self) -> usize {
        lock(&self.index).keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The cached body of `key`, if any. A location that went stale (a log
    /// folded meanwhile) is looked up once more.
    pub fn get(&self, key: &Key) -> Result<Option<Vec<u8>>, Error> {
        for _ in 0..2 {
            let Some((loc, path)) = ({
                let idx = lock(&self.index);
                idx.keys.get(key).map(|&l| {
                    let f = match l {
                        Loc::Log { file, .. } | Loc::Row { file, .. } => file,
                    };
                    (l, idx.files[f].clone())
                })
            }) else {
                return Ok(None);
            };
            if let Some(body) = self.read(loc, &path, key)? {
                return Ok(Some(body));
            }
        }
        Ok(None)
    }

    fn read(&self, loc: Loc, path: &Path, key: &Key) -> Result<Option<Vec<u8>>, Error> {
        match loc {
            Loc::Log { offset, len, .. } => {
                let Ok(mut f) = File::open(path) else { return Ok(None) };
                let mut buf = vec![0u8; HEADER as usize + len as usize];
                if f.seek(SeekFrom::Start(offset)).is_err() || f.read_exact(&mut buf).is_err() {
                    return Ok(None);
                }
                let ok = buf[..4] == len.to_le_bytes() && buf[4..36] == key[..];
                Ok(ok.then(|| buf.split_off(HEADER as usize)))
            }
            Loc::Row { file, row } => {
                let loaded = match self.loaded_file(file, path) {
                    Ok(l) => l,
                    Err(_) if !path.exists() => return Ok(None),
                    Err(e) => return Err(e),
                };
                Ok(loaded.get(row).filter(|(k, _)| *k == key).map(|(_, b)| b.as_bytes().to_vec()))
            }
        }
    }

    fn loaded_file(&self, file: usize, path: &Path) -> Result<Arc<Loaded>, Error> {
        if let Some((_, l)) = lock(&self.loaded).iter().find(|(f, _)| *f == file) {
            return Ok(l.clone());
        }
        let loaded = Arc::new(read_rows(path)?);
        let mut cached = lock(&self.loaded);
        cached.push_back((file, loaded.clone()));
        while cached.len() > LOADED_FILES {
            cached.pop_front();
        }
        Ok(loaded)
    }

    /// Opens `<name>.log` for appending (after any records already in it;
    /// a torn tail left by a killed writer is truncated first).
    pub fn open_log(&self, name: &str) -> Result<LogWriter, Error> {
        let path = self.dir.join(format!("{name}.log"));
        if path.exists() {
            scan_log(&path, true)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(&path).map_err(|e| io_err(&path, "cannot open", e))?;
        let offset = file.metadata().map_err(|e| io_err(&path, "cannot stat", e))?.len();
        let file_id = lock(&self.index).file_id(&path);
        Ok(LogWriter { path, file_id, file, offset, remote: self.remote.clone(), pushed: None, dirty: false })
    }

    /// Appends one record (one `write_all`, then flush) and indexes it.
    pub fn append(&self, log: &mut LogWriter, key: &Key, body: &[u8]) -> Result<(), Error> {
        let len = u32::try_from(body.len())
            .map_err(|_| io_err(&log.path, "cannot store", format!("a {}-byte response is over 4 GiB", body.len())))?;
        let mut rec = Vec::with_capacity(HEADER as usize + body.len());
        rec.extend_from_slice(&len.to_le_bytes());
        rec.extend_from_slice(key);
        rec.extend_from_slice(body);
        log.file.write_all(&rec).and_then(|_| log.file.flush()).map_err(|e| io_err(&log.path, "cannot write", e))?;
        let offset = log.offset;
        log.offset += rec.len() as u64;
        lock(&self.index).keys.insert(*key, Loc::Log { file: log.file_id, offset, len });
        log.dirty = true;
        if log.pushed.is_none_or(|t| t.elapsed() >= PUSH_EVERY) {
            log.push()?;
        }
        Ok(())
    }

    /// Folds `<name>.log` into `<name>.parquet` (rows already there keep
    /// their positions), then deletes the log. Nothing to do without a log.
    pub fn fold(&self, name: &str) -> Result<(), Error> {
        let log = self.dir.join(format!("{name}.log"));
        let pq = self.dir.join(format!("{name}.parquet"));
        if !log.exists() {
            return Ok(());
        }
        let records = scan_log(&log, false)?;
        if !records.is_empty() {
            let mut keys: Vec<Key> = Vec::new();
            let mut bodies: Vec<String> = Vec::new();
            if pq.exists() {
                let old = read_rows(&pq)?;
                for (k, b) in old.batches.iter().flat_map(|(k, b)| (0..k.len()).map(move |i| (k.value(i), b.value(i)))) {
                    keys.push(k.try_into().map_err(|_| io_err(&pq, "corrupt", "a key is not 32 bytes"))?);
                    bodies.push(b.to_string());
                }
            }
            let mut seen: std::collections::HashSet<Key> = keys.iter().copied().collect();
            let mut f = File::open(&log).map_err(|e| io_err(&log, "cannot open", e))?;
            for (key, offset, len) in records {
                if !seen.insert(key) {
                    continue;
                }
                let mut buf = vec![0u8; len as usize];
                f.seek(SeekFrom::Start(offset + HEADER))
                    .and_then(|_| f.read_exact(&mut buf))
                    .map_err(|e| io_err(&log, "cannot read", e))?;
                let body = String::from_utf8(buf).map_err(|_| io_err(&log, "corrupt", "a response is not UTF-8"))?;
                keys.push(key);
                bodies.push(body);
            }
            write_rows(&pq, &keys, &bodies)?;
            let mut idx = lock(&self.index);
            let id = idx.file_id(&pq);
            for (row, k) in keys.iter().enumerate() {
                idx.keys.insert(*k, Loc::Row { file: id, row });
            }
            lock(&self.loaded).retain(|(f, _)| *f != id);
            if let Some(r) = &self.remote {
                r.upload(std::slice::from_ref(&pq)).map_err(|e| io_err(&pq, "cannot upload", e))?;
            }
        }
        std::fs::remove_file(&log).map_err(|e| io_err(&log, "cannot delete", e))?;
        if let Some(r) = &self.remote {
            let rel = r.rel_of(&log).map_err(|e| io_err(&log, "cannot mirror", e))?;
            r.delete(&rel).map_err(|e| io_err(&log, "cannot delete", e))?;
        }
        Ok(())
    }
}

/// The records of a log: (key, offset, body length). A torn tail is
/// ignored, and with `repair` truncated away.
fn scan_log(path: &Path, repair: bool) -> Result<Vec<(Key, u64, u32)>, Error> {
    let file = File::open(path).map_err(|e| io_err(path, "cannot open", e))?;
    let size = file.metadata().map_err(|e| io_err(path, "cannot stat", e))?.len();
    let mut r = BufReader::new(file);
    let mut out = Vec::new();
    let mut offset = 0u64;
    let mut header = [0u8; HEADER as usize];
    while offset + HEADER <= size {
        r.read_exact(&mut header).map_err(|e| io_err(path, "cannot read", e))?;
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        if offset + HEADER + u64::from(len) > size {
            break;
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(&header[4..]);
        out.push((key, offset, len));
        r.seek_relative(i64::from(len)).map_err(|e| io_err(path, "cannot read", e))?;
        offset += HEADER + u64::from(len);
    }
    if offset < size && repair {
        OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|f| f.set_len(offset))
            .map_err(|e| io_err(path, "cannot truncate a torn record", e))?;
    }
    Ok(out)
}

fn reader(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<File>, Error> {
    let f = File::open(path).map_err(|e| io_err(path, "cannot open", e))?;
    ParquetRecordBatchReaderBuilder::try_new(f).map_err(|e| io_err(path, "not a readable Parquet file", e))
}

fn read_keys(path: &Path) -> Result<Vec<Key>, Error> {
    let b = reader(path)?;
    let mask = ProjectionMask::roots(b.parquet_schema(), [0]);
    let mut out = Vec::new();
    for batch in b.with_projection(mask).build().map_err(|e| io_err(path, "unreadable", e))? {
        let batch = batch.map_err(|e| io_err(path, "corrupt", e))?;
        let keys = key_column(path, &batch, 0)?;
        for i in 0..keys.len() {
            out.push(keys.value(i).try_into().map_err(|_| io_err(path, "corrupt", "a key is not 32 bytes"))?);
        }
    }
    Ok(out)
}

fn key_column(path: &Path, batch: &RecordBatch, i: usize) -> Result<FixedSizeBinaryArray, Error> {
    batch
        .column(i)
        .as_any()
        .downcast_ref::<FixedSizeBinaryArray>()
        .filter(|a| a.value_length() == 32)
        .cloned()
        .ok_or_else(|| io_err(path, "unexpected schema", "`key` is not FixedSizeBinary(32)"))
}

fn read_rows(path: &Path) -> Result<Loaded, Error> {
    let mut batches = Vec::new();
    let mut starts = Vec::new();
    let mut rows = 0;
    for batch in reader(path)?.build().map_err(|e| io_err(path, "unreadable", e))? {
        let batch = batch.map_err(|e| io_err(path, "corrupt", e))?;
        if batch.num_columns() != 2 {
            return Err(io_err(path, "unexpected schema", "want columns key, body"));
        }
        let keys = key_column(path, &batch, 0)?;
        let bodies = batch
            .column(1)
            .as_any()
            .downcast_ref::<StringArray>()
            .cloned()
            .ok_or_else(|| io_err(path, "unexpected schema", "`body` is not Utf8"))?;
        starts.push(rows);
        rows += keys.len();
        batches.push((keys, bodies));
    }
    Ok(Loaded { batches, starts })
}

/// Writes `<path>` atomically: a dot-named temp file, synced, renamed.
fn write_rows(path: &Path, keys: &[Key], bodies: &[String]) -> Result<(), Error> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let res = (|| {
        let file = File::create(&tmp).map_err(|e| io_err(&tmp, "cannot create", e))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).map_err(|e| io_err(path, "zstd", e))?))
            .set_dictionary_enabled(false)
            .build();
        let mut w = ArrowWriter::try_new(file, schema(), Some(props)).map_err(|e| io_err(&tmp, "cannot write", e))?;
        let mut start = 0;
        while start < keys.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < keys.len() && (end == start || bytes + bodies[end].len() <= BATCH_BYTES) {
                bytes += bodies[end].len();
                end += 1;
            }
            let k = FixedSizeBinaryArray::try_from_iter(keys[start..end].iter()).map_err(|e| io_err(&tmp, "cannot write", e))?;
            let b = StringArray::from_iter_values(bodies[start..end].iter());
            let batch = RecordBatch::try_new(schema(), vec![Arc::new(k), Arc::new(b)]).map_err(|e| io_err(&tmp, "cannot write", e))?;
            w.write(&batch).map_err(|e| io_err(&tmp, "cannot write", e))?;
            start = end;
        }
        let file = w.into_inner().map_err(|e| io_err(&tmp, "cannot write", e))?;
        file.sync_all().map_err(|e| io_err(&tmp, "cannot sync", e))?;
        std::fs::rename(&tmp, path).map_err(|e| io_err(path, "cannot rename into place", e))
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn id(root: Option<&str>) -> Identity {
        Identity { model: "m".into(), revision: None, root: root.map(str::to_string) }
    }

    #[test]
    fn canonical_json_sorts_keys_everywhere() {
        let v = json!({"b": [ {"z": 1, "a": 2.5} ], "a": "x y"});
        assert_eq!(String::from_utf8(canonical_json(&v)).unwrap(), r#"{"a":"x y","b":[{"a":2.5,"z":1}]}"#);
    }

    #[test]
    fn keys_depend_on_path_body_and_identity() {
        let body = canonical_json(&json!({"prompt": "hi", "temperature": 0.7}));
        let k = request_key("/v1/completions", &id(None), &body);
        assert_eq!(k, request_key("/v1/completions", &id(None), &canonical_json(&json!({"temperature": 0.7, "prompt": "hi"}))));
        assert_ne!(k, request_key("/v1/chat/completions", &id(None), &body));
        assert_ne!(k, request_key("/v1/completions", &id(Some("")), &body));
        assert_ne!(k, request_key("/v1/completions", &id(Some("r2")), &body));
        assert_ne!(k, request_key("/v1/completions", &id(None), &canonical_json(&json!({"prompt": "hi", "temperature": 0.8}))));
    }

    #[test]
    fn torn_tail_is_ignored_and_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path()).unwrap();
        let mut log = c.open_log("k-000000-t").unwrap();
        c.append(&mut log, &[1; 32], b"{\"a\":1}").unwrap();
        c.append(&mut log, &[2; 32], b"{\"b\":2}").unwrap();
        drop(log);
        let path = dir.path().join("k-000000-t.log");
        // Two records of 36 + 7 bytes; then half of a third one.
        let good = 2 * (36 + 7);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&100u32.to_le_bytes()).unwrap();
        f.write_all(&[3; 20]).unwrap();
        drop(f);
        let c = Cache::open(dir.path()).unwrap();
        assert_eq!(c.len(), 2);
        // Opening to read leaves the file alone (its writer may be another shard, still writing)…
        assert_eq!(std::fs::metadata(&path).unwrap().len(), good + 24);
        assert_eq!(c.get(&[2; 32]).unwrap().unwrap(), b"{\"b\":2}");
        assert_eq!(c.get(&[3; 32]).unwrap(), None);
        // …reopening it to append truncates the torn tail first.
        let mut log = c.open_log("k-000000-t").unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), good);
        c.append(&mut log, &[3; 32], b"{\"c\":3}").unwrap();
        drop(log);
        let c = Cache::open(dir.path()).unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(c.get(&[3; 32]).unwrap().unwrap(), b"{\"c\":3}");
    }

    #[test]
    fn fold_keeps_old_rows_and_adds_new_ones() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path()).unwrap();
        let mut log = c.open_log("n").unwrap();
        c.append(&mut log, &[1; 32], b"\"one\"").unwrap();
        drop(log);
        c.fold("n").unwrap();
        let mut log = c.open_log("n").unwrap();
        c.append(&mut log, &[2; 32], b"\"two\"").unwrap();
        c.append(&mut log, &[1; 32], b"\"dup\"").unwrap();
        drop(log);
        c.fold("n").unwrap();
        assert!(!dir.path().join("n.log").exists());
        // Row 0 is still key 1 with its first body; the duplicate is not added.
        let c = Cache::open(dir.path()).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c.get(&[1; 32]).unwrap().unwrap(), b"\"one\"");
        assert_eq!(c.get(&[2; 32]).unwrap().unwrap(), b"\"two\"");
        assert_eq!(read_keys(&dir.path().join("n.parquet")).unwrap(), vec![[1; 32], [2; 32]]);
    }
}
