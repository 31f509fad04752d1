//! Parquet, JSONL and CSV I/O, and atomic file writes.
//!
//! Every file prefpipe writes goes to a temp file in the same directory and
//! is renamed into place, so a crash never leaves a partial file behind.

use std::fs::File;
use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::datatypes::{Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::error::{Error, Result};

/// The file formats a `source` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Parquet,
    Jsonl,
    Csv,
}

impl Format {
    pub fn from_path(p: &Path) -> Option<Format> {
        match p.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "parquet" | "pq" => Some(Format::Parquet),
            "jsonl" | "ndjson" | "json" => Some(Format::Jsonl),
            "csv" => Some(Format::Csv),
            _ => None,
        }
    }
}

/// Writer settings for files users keep (exports, query results): zstd,
/// deterministic bytes.
pub fn writer_props() -> WriterProperties {
    props(Compression::ZSTD(ZstdLevel::try_new(1).expect("valid zstd level")))
}

fn props(codec: Compression) -> WriterProperties {
    WriterProperties::builder()
        .set_compression(codec)
        .set_created_by(format!("prefpipe {}", env!("CARGO_PKG_VERSION")))
        // Responses and ids are near-unique: dictionary interning costs more
        // than it saves, and zstd already folds repeated prompts.
        .set_dictionary_enabled(false)
        .build()
}

/// A temp path next to `path` (same directory, so rename is atomic).
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes a file atomically: `f` writes to a temp file, which is synced and
/// renamed into place. On error the temp file is removed.
pub fn write_atomic(path: &Path, f: impl FnOnce(&mut File) -> Result<()>) -> Result<()> {
    let tmp = temp_path(path);
    let res = (|| {
        let mut file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f(&mut file)?;
        file.flush().map_err(|e| Error::io(&tmp, e))?;
        file.sync_all().map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Writes batches as one Parquet file (zstd), atomically.
pub fn write_parquet(path: &Path, schema: &SchemaRef, batches: &[RecordBatch]) -> Result<()> {
    write_parquet_with(path, schema, batches, writer_props()).map(|_| ())
}

/// Writes a chunk of the run store: LZ4, which compresses and decompresses
/// several times faster than zstd; store chunks are read back once or twice.
/// Returns the blake3 (hex) of the bytes written, for the chunk's record.
pub fn write_store_chunk(path: &Path, schema: &SchemaRef, batches: &[RecordBatch]) -> Result<String> {
    write_parquet_with(path, schema, batches, props(Compression::LZ4_RAW))
}

/// Writes Parquet atomically; returns the blake3 (hex) of the file's bytes,
/// hashed as they are written.
fn write_parquet_with(path: &Path, schema: &SchemaRef, batches: &[RecordBatch], props: WriterProperties) -> Result<String> {
    let mut digest = String::new();
    write_atomic(path, |file| {
        let mut hashed = Hashing { inner: file, hasher: blake3::Hasher::new() };
        let mut w = ArrowWriter::try_new(&mut hashed, schema.clone(), Some(props))?;
        for b in batches {
            w.write(b)?;
        }
        w.close()?;
        digest = hashed.hasher.finalize().to_hex().to_string();
        Ok(())
    })?;
    Ok(digest)
}

/// A writer that hashes what it passes through.
struct Hashing<W> {
    inner: W,
    hasher: blake3::Hasher,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn open(path: &Path) -> Result<File> {
    File::open(path).map_err(|e| Error::Input(format!("{}: cannot open: {e}", path.display())))
}

/// Runs a Parquet decode of untrusted bytes: the parquet/arrow-ipc crates
/// panic on some malformed footers (an embedded Arrow schema without
/// fields, found by `fuzz/` source_parquet), which becomes a bad-input error.
fn guarded<T>(path: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|_| Err(Error::Input(format!("{}: not a readable Parquet file: malformed metadata", path.display()))))
}

/// Reads a whole Parquet file; row groups are decoded in parallel and
/// returned in file order.
pub fn read_parquet(path: &Path) -> Result<Vec<RecordBatch>> {
    guarded(path, || read_parquet_unguarded(path))
}

fn read_parquet_unguarded(path: &Path) -> Result<Vec<RecordBatch>> {
    use rayon::prelude::*;
    let unreadable = |e: parquet::errors::ParquetError| Error::Input(format!("{}: not a readable Parquet file: {e}", path.display()));
    let n = ParquetRecordBatchReaderBuilder::try_new(open(path)?).map_err(unreadable)?.metadata().num_row_groups();
    let groups: Vec<Vec<RecordBatch>> = (0..n.max(1))
        .into_par_iter()
        .map(|g| {
            let mut builder = ParquetRecordBatchReaderBuilder::try_new(open(path)?).map_err(unreadable)?.with_batch_size(64 * 1024);
            if n > 0 {
                builder = builder.with_row_groups(vec![g]);
            }
            let reader = builder.build().map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
            reader
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| Error::Input(format!("{}: corrupt Parquet data: {e}", path.display())))
        })
        .collect::<Result<_>>()?;
    Ok(groups.into_iter().flatten().collect())
}

/// The schema of a Parquet file (reads the footer only).
pub fn parquet_schema(path: &Path) -> Result<SchemaRef> {
    guarded(path, || {
        let builder = ParquetRecordBatchReaderBuilder::try_new(open(path)?)
            .map_err(|e| Error::Input(format!("{}: not a readable Parquet file: {e}", path.display())))?;
        Ok(builder.schema().clone())
    })
}

/// Infers the schema of a JSONL or CSV file, or reads a Parquet footer.
pub fn file_schema(path: &Path, format: Format) -> Result<SchemaRef> {
    match format {
        Format::Parquet => parquet_schema(path),
        Format::Jsonl => {
            let mut r = BufReader::new(open(path)?);
            let (schema, n) = arrow::json::reader::infer_json_schema_from_seekable(&mut r, None)
                .map_err(|e| Error::Input(format!("{}: not valid JSON lines: {}", path.display(), clean(&e))))?;
            if n == 0 {
                return Err(Error::Input(format!("{}: the file has no rows", path.display())));
            }
            Ok(Arc::new(schema))
        }
        Format::Csv => {
            let file = open(path)?;
            let fmt = arrow::csv::reader::Format::default().with_header(true);
            let (schema, n) = fmt
                .infer_schema(BufReader::new(file), None)
                .map_err(|e| Error::Input(format!("{}: not valid CSV: {}", path.display(), clean(&e))))?;
            if n == 0 {
                return Err(Error::Input(format!("{}: the file has no rows", path.display())));
            }
            Ok(Arc::new(schema))
        }
    }
}

/// Reads a whole JSONL/CSV/Parquet file with the given (inferred) schema.
pub fn read_file(path: &Path, format: Format, schema: &SchemaRef) -> Result<Vec<RecordBatch>> {
    let bad = |e: arrow::error::ArrowError| Error::Input(format!("{}: {}", path.display(), clean(&e)));
    match format {
        Format::Parquet => read_parquet(path),
        Format::Jsonl => {
            let r = arrow::json::ReaderBuilder::new(schema.clone())
                .with_batch_size(64 * 1024)
                .build(BufReader::new(open(path)?))
                .map_err(bad)?;
            r.collect::<std::result::Result<Vec<_>, _>>().map_err(bad)
        }
        Format::Csv => {
            let fmt = arrow::csv::reader::Format::default().with_header(true);
            let r = arrow::csv::ReaderBuilder::new(schema.clone())
                .with_format(fmt)
                .with_batch_size(64 * 1024)
                .build(open(path)?)
                .map_err(bad)?;
            r.collect::<std::result::Result<Vec<_>, _>>().map_err(bad)
        }
    }
}

/// Arrow errors start with a variant name; users need the message only.
fn clean(e: &arrow::error::ArrowError) -> String {
    let s = e.to_string();
    for p in ["Json error: ", "Parser error: ", "Csv error: ", "Invalid argument error: "] {
        if let Some(rest) = s.strip_prefix(p) {
            return rest.lines().next().unwrap_or(rest).to_string();
        }
    }
    s.lines().next().unwrap_or(&s).to_string()
}

/// blake3 of a file's bytes, hex.
pub fn file_digest(path: &Path) -> Result<String> {
    let mut h = blake3::Hasher::new();
    let mut f = open(path)?;
    std::io::copy(&mut f, &mut h).map_err(|e| Error::io(path, e))?;
    Ok(h.finalize().to_hex().to_string())
}

/// An empty batch for a schema.
pub fn empty_batch(schema: &SchemaRef) -> RecordBatch {
    RecordBatch::new_empty(schema.clone())
}

/// `Schema` → `SchemaRef` shorthand.
pub fn schema_ref(s: Schema) -> SchemaRef {
    Arc::new(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, StringArray};
    use arrow::datatypes::{DataType, Field};

    #[test]
    fn parquet_round_trip_is_atomic_and_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        let schema =
            schema_ref(Schema::new(vec![Field::new("prompt_id", DataType::Utf8, false), Field::new("reward", DataType::Float64, true)]));
        let b = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(StringArray::from(vec!["a", "b"])), Arc::new(Float64Array::from(vec![1.0, 2.5]))],
        )
        .unwrap();
        let p1 = dir.path().join("a.parquet");
        let p2 = dir.path().join("b.parquet");
        write_parquet(&p1, &schema, std::slice::from_ref(&b)).unwrap();
        write_parquet(&p2, &schema, std::slice::from_ref(&b)).unwrap();
        assert_eq!(std::fs::read(&p1).unwrap(), std::fs::read(&p2).unwrap());
        assert_eq!(read_parquet(&p1).unwrap(), vec![b.clone()]);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 2, "no temp file remains");
        // A store chunk's digest is the blake3 of the file as written.
        let p3 = dir.path().join("c.parquet");
        let d = write_store_chunk(&p3, &schema, std::slice::from_ref(&b)).unwrap();
        assert_eq!(d, file_digest(&p3).unwrap());
    }

    #[test]
    fn corrupt_files_are_input_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.parquet");
        std::fs::write(&p, b"PAR1 this is not parquet").unwrap();
        let e = read_parquet(&p).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("x.parquet"), "{e}");
        let e = file_schema(&dir.path().join("missing.jsonl"), Format::Jsonl).unwrap_err();
        assert!(e.to_string().contains("cannot open"), "{e}");
    }

    #[test]
    fn jsonl_is_inferred_and_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.jsonl");
        std::fs::write(&p, "{\"prompt\": \"hi\", \"n\": 1}\n{\"prompt\": \"yo\", \"n\": 2}\n").unwrap();
        let s = file_schema(&p, Format::Jsonl).unwrap();
        assert_eq!(s.field_with_name("prompt").unwrap().data_type(), &DataType::Utf8);
        let b = read_file(&p, Format::Jsonl, &s).unwrap();
        assert_eq!(b[0].num_rows(), 2);
        std::fs::write(&p, "{\"prompt\": \"hi\"\n").unwrap();
        assert!(file_schema(&p, Format::Jsonl).is_err());
    }
}
