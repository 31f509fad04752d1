//! Store chunks this process has just written, kept decoded for the stage
//! that reads them next (a `select` reading its `source`, an `export`
//! reading its `select`), so a chunk written a moment ago is not decoded
//! again from its own Parquet bytes.
//!
//! The file is still written, synced and recorded exactly as before: resume,
//! repair and shards see nothing of this. An entry is keyed by the file's
//! identity after the atomic rename (device, inode, length, mtime), so a
//! chunk replaced, truncated or deleted since it was written is a miss and
//! is read from disk; so is a chunk read under another spelling of its path
//! than the one it was written to. An entry is handed out once ([`take`]) and then
//! dropped; a second reader of the same chunk reads the file. Entries are
//! admitted while their decoded size fits [`BUDGET`] and never evicted to
//! make room: a table larger than the budget keeps its first chunks, which
//! the next stage reads first, rather than churning through all of them.
//! Only the chunks of stages whose reader runs next and soon are kept
//! ([`keep_from`]; the executor says which): a source read by a model stage
//! would otherwise sit in memory for the whole of that stage.
//!
//! A hit returns what [`crate::io::read_parquet`] would decode from the
//! file: one batch of the planned schema (a chunk is one row group read as
//! one batch), or none for an empty chunk. A chunk written as several
//! batches or row groups is not admitted.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::{RecordBatch, RecordBatchOptions};

/// Decoded bytes the cache holds at most.
pub const BUDGET: usize = 1 << 30;

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Identity {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

fn identity(path: &Path) -> Option<Identity> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(Identity { dev: m.dev(), ino: m.ino(), len: m.len(), mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128 })
}

struct Entry {
    id: Identity,
    batch: Option<RecordBatch>,
    size: usize,
}

#[derive(Default)]
struct Cache {
    entries: HashMap<PathBuf, Entry>,
    held: usize,
    /// Directories (stages) whose chunks are admitted.
    dirs: HashSet<PathBuf>,
}

static CACHE: Mutex<Option<Cache>> = Mutex::new(None);

fn with<T>(f: impl FnOnce(&mut Cache) -> T) -> T {
    let mut guard = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    f(guard.get_or_insert_with(Cache::default))
}

/// Admits the chunk just written to `path` from `batches` under `schema`,
/// when it is one batch of at most `max_rows` rows (one row group) and fits
/// the budget.
pub(crate) fn put(path: &Path, schema: &SchemaRef, batches: &[RecordBatch], max_rows: usize) {
    if !with(|c| path.parent().is_some_and(|d| c.dirs.contains(d))) {
        return;
    }
    let Some(entry) = entry(path, schema, batches, max_rows) else { return };
    with(|c| c.admit(path, entry, BUDGET));
}

/// Chunks written into `dir` from now on are kept for their next reader.
pub(crate) fn keep_from(dir: &Path) {
    with(|c| c.dirs.insert(dir.to_path_buf()));
}

/// The decoded chunk at `path`, when this process wrote it and it has not
/// changed since; the entry is dropped.
pub(crate) fn take(path: &Path) -> Option<Vec<RecordBatch>> {
    let e = with(|c| c.remove(path))?;
    (identity(path) == Some(e.id)).then(|| e.batch.into_iter().collect())
}

/// Forgets the chunk at `path` (a leftover chunk file being removed, or a
/// chunk no later stage reads).
pub(crate) fn forget(path: &Path) {
    with(|c| c.remove(path));
}

fn entry(path: &Path, schema: &SchemaRef, batches: &[RecordBatch], max_rows: usize) -> Option<Entry> {
    let mut rows = batches.iter().filter(|b| b.num_rows() > 0);
    let batch = match (rows.next(), rows.next()) {
        (None, _) => None,
        (Some(b), None) if b.num_rows() <= max_rows => {
            let options = RecordBatchOptions::new().with_row_count(Some(b.num_rows()));
            Some(RecordBatch::try_new_with_options(schema.clone(), b.columns().to_vec(), &options).ok()?)
        }
        _ => return None,
    };
    let size = batch.as_ref().map_or(0, RecordBatch::get_array_memory_size);
    // Well under the 1 GiB row group that `read_parquet` would cut into several batches.
    if size > BUDGET / 2 {
        return None;
    }
    Some(Entry { id: identity(path)?, batch, size })
}

impl Cache {
    fn admit(&mut self, path: &Path, e: Entry, budget: usize) {
        // A rewritten chunk (a source that started over) replaces what its path held.
        self.remove(path);
        if self.held + e.size <= budget {
            self.held += e.size;
            self.entries.insert(path.to_path_buf(), e);
        }
    }

    fn remove(&mut self, path: &Path) -> Option<Entry> {
        let e = self.entries.remove(path)?;
        self.held -= e.size;
        Some(e)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, Float64Array, StringArray, UInt32Array};
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;
    use crate::io::{read_parquet, write_store_chunk};
    use crate::table;

    /// Every column kind a store chunk holds: ids and texts, sample indices,
    /// rewards with nulls, and a conversation (list of role/content structs).
    fn chunk(rows: usize) -> (SchemaRef, RecordBatch) {
        let schema = Arc::new(Schema::new(vec![
            Field::new("prompt_id", DataType::Utf8, false),
            Field::new("sample_idx", DataType::UInt32, false),
            Field::new("reward", DataType::Float64, true),
            table::messages_field(),
        ]));
        let texts: Vec<String> = (0..rows).map(|r| format!("turn {r}")).collect();
        let conv: Vec<Vec<table::Message>> =
            texts.iter().enumerate().map(|(r, t)| vec![table::Message { role: "user", content: t }; r % 3]).collect();
        let cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from((0..rows).map(|r| format!("p{}", r / 4)).collect::<Vec<_>>())),
            Arc::new(UInt32Array::from((0..rows as u32).map(|r| r % 4).collect::<Vec<_>>())),
            Arc::new(Float64Array::from((0..rows).map(|r| (r % 5 != 0).then_some(r as f64 * 0.5)).collect::<Vec<_>>())),
            table::messages_array(conv.iter().map(|c| c.as_slice())).unwrap(),
        ];
        (schema.clone(), RecordBatch::try_new(schema, cols).unwrap())
    }

    /// What the file decodes to, bypassing the cache.
    fn from_disk(path: &Path) -> Vec<RecordBatch> {
        forget(path);
        read_parquet(path).unwrap()
    }

    #[test]
    fn a_hit_is_what_the_file_decodes_to_and_is_handed_out_once() {
        let dir = tempfile::tempdir().unwrap();
        // Not kept before the executor says so.
        let (schema, b) = chunk(50);
        write_store_chunk(&dir.path().join("early.parquet"), &schema, std::slice::from_ref(&b)).unwrap();
        assert!(take(&dir.path().join("early.parquet")).is_none());
        keep_from(dir.path());
        let path = dir.path().join("chunk-000000.parquet");
        // A slice, as a source cuts them: the hit must not depend on the offset.
        write_store_chunk(&path, &schema, &[b.slice(3, 40)]).unwrap();
        let hit = take(&path).expect("just written");
        assert!(take(&path).is_none(), "handed out once");
        let disk = from_disk(&path);
        assert_eq!(hit, disk);
        assert_eq!(hit[0].schema(), disk[0].schema());
        // `read_parquet` takes it from here.
        write_store_chunk(&path, &schema, std::slice::from_ref(&b)).unwrap();
        assert_eq!(read_parquet(&path).unwrap(), vec![b.clone()]);
        assert!(take(&path).is_none(), "read_parquet took it");
        // An empty chunk decodes to no batches, both ways.
        write_store_chunk(&path, &schema, &[]).unwrap();
        assert_eq!(take(&path).unwrap(), from_disk(&path));
        assert!(from_disk(&path).is_empty());
    }

    #[test]
    fn a_changed_file_or_several_batches_are_read_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        keep_from(dir.path());
        let (p, q) = (dir.path().join("a.parquet"), dir.path().join("b.parquet"));
        let (schema, b) = chunk(20);
        write_store_chunk(&p, &schema, std::slice::from_ref(&b)).unwrap();
        // Replaced by other bytes (another inode and length): a miss, and the entry is gone.
        write_store_chunk(&q, &schema, &[b.slice(0, 5)]).unwrap();
        std::fs::rename(&q, &p).unwrap();
        assert!(take(&p).is_none());
        assert!(take(&q).is_none(), "q's entry was keyed by q's identity, now p's path");
        // Two batches are read back as one row group: not admitted.
        write_store_chunk(&p, &schema, &[b.slice(0, 5), b.slice(5, 5)]).unwrap();
        assert!(take(&p).is_none());
        assert_eq!(from_disk(&p)[0].num_rows(), 10);
        // Deleted after it was written: a miss.
        write_store_chunk(&p, &schema, std::slice::from_ref(&b)).unwrap();
        std::fs::remove_file(&p).unwrap();
        assert!(take(&p).is_none());
    }

    #[test]
    fn entries_are_admitted_while_they_fit_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let (schema, b) = chunk(10);
        let path = |i: usize| dir.path().join(format!("c{i}.parquet"));
        let mut cache = Cache::default();
        let admit = |cache: &mut Cache, i: usize, budget: usize| {
            crate::io::write_parquet(&path(i), &schema, std::slice::from_ref(&b)).unwrap();
            let e = entry(&path(i), &schema, std::slice::from_ref(&b), usize::MAX).unwrap();
            let size = e.size;
            cache.admit(&path(i), e, budget);
            size
        };
        let size = admit(&mut cache, 0, usize::MAX);
        // A second one does not fit in twice the size less a byte, and evicts nothing.
        admit(&mut cache, 1, 2 * size - 1);
        assert_eq!((cache.held, cache.entries.len()), (size, 1));
        assert!(cache.entries.contains_key(&path(0)));
        // Rewriting a path replaces its entry rather than adding to it.
        admit(&mut cache, 0, 2 * size - 1);
        assert_eq!((cache.held, cache.entries.len()), (size, 1));
        assert!(cache.remove(&path(0)).is_some());
        assert_eq!(cache.held, 0);
        // One row group's worth at most: a batch over `max_rows` is not admitted.
        assert!(entry(&path(0), &schema, std::slice::from_ref(&b), 9).is_none());
    }
}
