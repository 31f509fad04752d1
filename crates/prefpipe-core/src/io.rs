//! Parquet, JSONL and CSV I/O, and atomic file writes.
//!
//! Every file prefpipe writes goes to a temp file in the same directory and
//! is renamed into place, so a crash never leaves a partial file behind.

use std::fs::File;
use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::new_empty_array;
use arrow::datatypes::{Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::arrow_writer::{compute_leaves, ArrowColumnChunk, ArrowColumnWriter};
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
    props_builder(codec).build()
}

fn props_builder(codec: Compression) -> parquet::file::properties::WriterPropertiesBuilder {
    WriterProperties::builder()
        .set_compression(codec)
        .set_created_by(format!("prefpipe {}", env!("CARGO_PKG_VERSION")))
        // Responses and ids are near-unique: dictionary interning costs more
        // than it saves, and zstd already folds repeated prompts.
        .set_dictionary_enabled(false)
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
/// No min/max statistics: nothing prunes a chunk by them, and for wide text
/// columns they cost a comparison per value and a page index per column.
/// The chunk stays decoded in memory for the stage that reads it next
/// ([`crate::chunk_cache`]).
pub fn write_store_chunk(path: &Path, schema: &SchemaRef, batches: &[RecordBatch]) -> Result<String> {
    let props = props_builder(Compression::LZ4_RAW).set_statistics_enabled(parquet::file::properties::EnabledStatistics::None).build();
    let max_rows = props.max_row_group_row_count().unwrap_or(usize::MAX);
    let digest = write_parquet_with(path, schema, batches, props)?;
    crate::chunk_cache::put(path, schema, batches, max_rows);
    Ok(digest)
}

/// Writes Parquet atomically; returns the blake3 (hex) of the file's bytes,
/// hashed as they are written.
fn write_parquet_with(path: &Path, schema: &SchemaRef, batches: &[RecordBatch], props: WriterProperties) -> Result<String> {
    let mut digest = String::new();
    write_atomic(path, |file| {
        let mut hashed = Hashing { inner: file, hasher: blake3::Hasher::new() };
        write_columns_parallel(&mut hashed, schema, batches, props)?;
        digest = hashed.hasher.finalize().to_hex().to_string();
        Ok(())
    })?;
    Ok(digest)
}

/// What [`ArrowWriter`] writes for `batches`, byte for byte, with the
/// columns of each row group encoded in parallel: encoding (statistics,
/// compression) is most of a write, and an export or a chunk is mostly two
/// or three wide text columns. Each column writer gets the same write calls
/// `ArrowWriter::write` would give it (one per batch piece, row groups cut
/// at `max_row_group_row_count`), so page boundaries and bytes do not change.
fn write_columns_parallel<W: Write + Send>(out: W, schema: &SchemaRef, batches: &[RecordBatch], props: WriterProperties) -> Result<()> {
    use rayon::prelude::*;
    let max_rows = props.max_row_group_row_count().unwrap_or(usize::MAX).max(1);
    if props.max_row_group_bytes().is_some() {
        // A byte limit cuts row groups by measured sizes: leave it to ArrowWriter.
        let mut w = ArrowWriter::try_new(out, schema.clone(), Some(props))?;
        for b in batches {
            w.write(b)?;
        }
        w.close()?;
        return Ok(());
    }
    let (mut writer, factory) = ArrowWriter::try_new(out, schema.clone(), Some(props))?.into_serialized_writer()?;
    // Row groups as lists of batch pieces, cut as ArrowWriter cuts them.
    let mut groups: Vec<Vec<RecordBatch>> = Vec::new();
    let mut filled = max_rows;
    for b in batches.iter().filter(|b| b.num_rows() > 0) {
        let mut off = 0;
        while off < b.num_rows() {
            if filled == max_rows {
                groups.push(Vec::new());
                filled = 0;
            }
            let n = (max_rows - filled).min(b.num_rows() - off);
            groups.last_mut().expect("a group").push(b.slice(off, n));
            off += n;
            filled += n;
        }
    }
    for (g, pieces) in groups.iter().enumerate() {
        // Each field's column writers (a nested field has one per leaf), in schema order.
        let mut writers = factory.create_column_writers(g)?.into_iter();
        let mut per_field: Vec<(usize, Vec<ArrowColumnWriter>)> = Vec::with_capacity(schema.fields().len());
        for (i, f) in schema.fields().iter().enumerate() {
            let n = compute_leaves(f, &new_empty_array(f.data_type()))?.len();
            per_field.push((i, writers.by_ref().take(n).collect()));
        }
        let chunks: Vec<Vec<ArrowColumnChunk>> = per_field
            .into_par_iter()
            .map(|(i, mut ws)| {
                for p in pieces {
                    for (w, leaf) in ws.iter_mut().zip(compute_leaves(schema.field(i), p.column(i))?) {
                        w.write(&leaf)?;
                    }
                }
                ws.into_iter().map(|w| Ok(w.close()?)).collect::<Result<Vec<_>>>()
            })
            .collect::<Result<_>>()?;
        let mut rg = writer.next_row_group()?;
        for c in chunks.into_iter().flatten() {
            c.append_to_row_group(&mut rg)?;
        }
        rg.close()?;
    }
    writer.close()?;
    Ok(())
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
    if let Some(batches) = crate::chunk_cache::take(path) {
        return Ok(batches);
    }
    guarded(path, || read_parquet_unguarded(path))
}

fn read_parquet_unguarded(path: &Path) -> Result<Vec<RecordBatch>> {
    use rayon::prelude::*;
    let n = reader_builder(path)?.metadata().num_row_groups();
    let groups: Vec<Vec<RecordBatch>> = (0..n.max(1))
        .into_par_iter()
        .map(|g| {
            let mut builder = reader_builder(path)?;
            if n > 0 {
                let rows = batch_rows(builder.metadata().row_group(g));
                builder = builder.with_row_groups(vec![g]).with_batch_size(rows);
            }
            decode(path, builder)
        })
        .collect::<Result<_>>()?;
    Ok(groups.into_iter().flatten().collect())
}

/// The top-level columns `names` of a Parquet file (those it has, in file
/// order), every row group; nothing else is decoded.
pub fn read_parquet_columns(path: &Path, names: &[&str]) -> Result<Vec<RecordBatch>> {
    guarded(path, || {
        let builder = reader_builder(path)?;
        let roots: Vec<usize> =
            builder.schema().fields().iter().enumerate().filter(|(_, f)| names.contains(&f.name().as_str())).map(|(i, _)| i).collect();
        let mask = parquet::arrow::ProjectionMask::roots(builder.parquet_schema(), roots);
        decode(path, builder.with_projection(mask).with_batch_size(64 * 1024))
    })
}

/// A reader of `path` (its footer read).
fn reader_builder(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<File>> {
    ParquetRecordBatchReaderBuilder::try_new(open(path)?)
        .map_err(|e| Error::Input(format!("{}: not a readable Parquet file: {e}", path.display())))
}

/// Every batch `builder` reads from `path`.
fn decode(path: &Path, builder: ParquetRecordBatchReaderBuilder<File>) -> Result<Vec<RecordBatch>> {
    let reader = builder.build().map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
    reader.collect::<std::result::Result<Vec<_>, _>>().map_err(|e| Error::Input(format!("{}: corrupt Parquet data: {e}", path.display())))
}

/// A Parquet file's footer: its row groups and column statistics.
pub fn parquet_metadata(path: &Path) -> Result<Arc<parquet::file::metadata::ParquetMetaData>> {
    guarded(path, || Ok(reader_builder(path)?.metadata().clone()))
}

/// Whether the footer's statistics show no nulls in top-level column `name`
/// in any row group (false when a row group has no null count).
pub fn parquet_no_nulls(md: &parquet::file::metadata::ParquetMetaData, name: &str) -> bool {
    let Some(i) = md.file_metadata().schema_descr().columns().iter().position(|c| c.path().parts() == [name]) else { return false };
    md.row_groups().iter().all(|rg| rg.column(i).statistics().and_then(|s| s.null_count_opt()) == Some(0))
}

/// Row group `g` of a Parquet file, in batches of [`batch_rows`].
pub fn read_row_group(path: &Path, g: usize) -> Result<Vec<RecordBatch>> {
    guarded(path, || {
        let builder = reader_builder(path)?;
        let rows = batch_rows(builder.metadata().row_group(g));
        decode(path, builder.with_batch_size(rows).with_row_groups(vec![g]))
    })
}

/// Rows per decoded batch: a whole row group when it is under 1 GiB
/// decoded, so a store chunk (one group) reads as one batch that needs no
/// concatenation; 64k rows otherwise, so no text column outgrows i32 offsets.
fn batch_rows(rg: &parquet::file::metadata::RowGroupMetaData) -> usize {
    if rg.total_byte_size() < 1 << 30 {
        rg.num_rows().max(1) as usize
    } else {
        64 * 1024
    }
}

/// The schema of a Parquet file (reads the footer only).
pub fn parquet_schema(path: &Path) -> Result<SchemaRef> {
    guarded(path, || Ok(reader_builder(path)?.schema().clone()))
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

/// blake3 of a file's bytes, hex, always read from disk: what the store's
/// integrity checks (chunks, exports) compare against their records, so a
/// file altered without its stat changing is still caught.
pub fn file_digest(path: &Path) -> Result<String> {
    let mut h = blake3::Hasher::new();
    let mut f = open(path)?;
    std::io::copy(&mut f, &mut h).map_err(|e| Error::io(path, e))?;
    Ok(h.finalize().to_hex().to_string())
}

/// [`file_digest`] of a pipeline input (a source file, a tokenizer file),
/// remembered by the file's stat in [`crate::digest_cache`]: an input's
/// digest is part of its stage key, and hashing a 100 MB source on every
/// `plan`, `run` and `query` was most of a second plan's time.
pub fn input_digest(path: &Path) -> Result<String> {
    crate::digest_cache::cached("prefpipe file digest v1", &[path.to_path_buf()], || file_digest(path))
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
        // Some columns only: the ones named that the file has, in file order.
        let cols = read_parquet_columns(&p1, &["reward", "missing"]).unwrap();
        assert_eq!(cols, vec![b.project(&[1]).unwrap()]);
    }

    #[test]
    fn parallel_column_writes_are_arrow_writer_bytes() {
        use arrow::array::{ArrayRef, ListArray, StructArray};
        // Text, a float with nulls and a list<struct> (several leaves); row groups of 7 rows
        // cut across uneven batches; and no rows at all.
        let item = Arc::new(Field::new(
            "item",
            DataType::Struct(vec![Field::new("a", DataType::Utf8, false), Field::new("b", DataType::Float64, true)].into()),
            true,
        ));
        let schema = schema_ref(Schema::new(vec![
            Field::new("s", DataType::Utf8, false),
            Field::new("x", DataType::Float64, true),
            Field::new("l", DataType::List(item.clone()), true),
        ]));
        let n = 23;
        let s: ArrayRef = Arc::new(StringArray::from((0..n).map(|i| format!("text {i} ").repeat(i % 5 + 1)).collect::<Vec<_>>()));
        let x: ArrayRef = Arc::new(Float64Array::from((0..n).map(|i| (i % 3 != 0).then_some(i as f64 / 3.0)).collect::<Vec<_>>()));
        let inner = StructArray::new(
            match item.data_type() {
                DataType::Struct(f) => f.clone(),
                _ => unreachable!(),
            },
            vec![
                Arc::new(StringArray::from((0..2 * n).map(|i| format!("m{i}")).collect::<Vec<_>>())),
                Arc::new(Float64Array::from((0..2 * n).map(|i| i as f64).collect::<Vec<_>>())),
            ],
            None,
        );
        let l: ArrayRef = Arc::new(ListArray::new(
            item,
            arrow::buffer::OffsetBuffer::from_lengths((0..n).map(|i| i % 3)),
            Arc::new(inner.slice(0, (0..n).map(|i| i % 3).sum())),
            None,
        ));
        let b = RecordBatch::try_new(schema.clone(), vec![s, x, l]).unwrap();
        let props = || WriterProperties::builder().set_max_row_group_row_count(Some(7)).set_dictionary_enabled(false).build();
        for batches in [vec![b.clone()], vec![b.slice(0, 3), b.slice(3, 0), b.slice(3, 12), b.slice(15, 8)], vec![]] {
            let mut want = Vec::new();
            let mut w = ArrowWriter::try_new(&mut want, schema.clone(), Some(props())).unwrap();
            for x in &batches {
                w.write(x).unwrap();
            }
            w.close().unwrap();
            let mut got = Vec::new();
            write_columns_parallel(&mut got, &schema, &batches, props()).unwrap();
            assert_eq!(got, want, "{} batches", batches.len());
            let mut got = Vec::new();
            write_columns_parallel(&mut got, &schema, &batches, writer_props()).unwrap();
            let mut want = Vec::new();
            let mut w = ArrowWriter::try_new(&mut want, schema.clone(), Some(writer_props())).unwrap();
            for x in &batches {
                w.write(x).unwrap();
            }
            w.close().unwrap();
            assert_eq!(got, want);
        }
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
