//! A Parquet source read row group by row group and cut into chunks as it is
//! read, for a table already grouped by prompt (each prompt's rows adjacent,
//! as samples and scored tables from prefpipe, DuckDB or pandas usually
//! are): memory stays bounded by a few row groups and chunks, not the table
//! (2M scored rows took 1.7 GB read whole).
//!
//! The chunks are the ones the whole-table read cuts ([`super::chunk_by_prompt`]
//! over [`super::normalize`]), row for row: `chunk_size` prompts each, in file
//! order, duplicates dropped (`dedup`) or refused at the same first row. When a
//! prompt turns up again after another one, the table is not grouped and
//! [`stream`] says so; the caller starts over with the whole-table read.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};

use arrow::array::{Array, ArrayRef, Int64Array, StringArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;
use prefpipe_core::stage::Output;
use prefpipe_core::table::col;
use prefpipe_core::{Error, Result};
use rayon::prelude::*;

use super::files::{Files, Rows};
use super::{columns, Shape, SourceConfig};

/// Emits chunk `c`.
pub(super) type Emit<'a> = dyn FnMut(usize, RecordBatch) -> Result<()> + 'a;

/// Whether [`stream`] may read `files`: Parquet without nulls in the prompt and
/// id columns (so that every row error is met in file order, as the whole read
/// meets it), string prompts and ids, plain prompts (no conversations), no `limit`.
pub(super) fn eligible(files: &Files, file_schema: &SchemaRef, c: &SourceConfig, shape: &Shape) -> Result<bool> {
    let text = |name: &str| {
        file_schema.field_with_name(name).is_ok_and(|f| matches!(f.data_type(), DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View))
    };
    let id_ok = file_schema.field_with_name(&c.id_column).is_err() || text(&c.id_column);
    if c.limit.is_some() || shape.has_messages(c) || !text(&c.prompt_column) || !id_ok {
        return Ok(false);
    }
    let mut checked = vec![c.prompt_column.as_str()];
    if file_schema.field_with_name(&c.id_column).is_ok() {
        checked.push(&c.id_column);
    }
    files.null_free_parquet(file_schema, &checked)
}

/// Reads `files` row group by row group (a window of one per thread decoded
/// at once) and emits each chunk as soon as its last prompt ends. `Ok(None)`:
/// the table is not grouped by prompt (chunks emitted so far are to be
/// replaced).
pub(super) fn stream(
    files: &Files,
    file_schema: &SchemaRef,
    schema: &SchemaRef,
    c: &SourceConfig,
    shape: &Shape,
    chunk_size: usize,
    emit: &mut Emit,
) -> Result<Option<Output>> {
    let window = rayon::current_num_threads().max(1);
    let mut cut = Cutter::new(schema.clone(), chunk_size, c.dedup);
    let mut rows_in = 0u64;
    for (f, path) in files.paths.iter().enumerate() {
        let groups = prefpipe_core::io::parquet_metadata(path)?.num_row_groups();
        let mut first = 0;
        for gs in (0..groups).collect::<Vec<_>>().chunks(window) {
            let decoded: Vec<Vec<RecordBatch>> = gs.par_iter().map(|&g| files.row_group(f, g, file_schema)).collect::<Result<_>>()?;
            for b in decoded.into_iter().flatten() {
                let n = b.num_rows();
                let rows = Rows::part(b, path, first);
                first += n;
                rows_in += n as u64;
                let batch = columns(&rows, schema, c, shape)?;
                if !cut.push(&rows, &batch, emit)? {
                    return Ok(None);
                }
            }
        }
    }
    cut.finish(emit)?;
    let mut out = cut.out;
    out.rows_in = rows_in;
    Ok(Some(out))
}

/// Cuts a stream of grouped rows into chunks of `chunk_size` prompts.
struct Cutter {
    schema: SchemaRef,
    chunk_size: usize,
    dedup: bool,
    /// The prompt whose rows are being read.
    current: Option<String>,
    /// Hashes of the prompts read before it: one of them again means the
    /// table is not grouped (a hash collision only sends it the slow way).
    closed: HashSet<u64>,
    /// The current prompt's `sample_idx` values so far.
    samples: HashSet<Key>,
    /// The current chunk's rows so far, and its prompts.
    pieces: Vec<RecordBatch>,
    prompts: usize,
    chunk: usize,
    out: Output,
}

impl Cutter {
    fn new(schema: SchemaRef, chunk_size: usize, dedup: bool) -> Cutter {
        Cutter {
            schema,
            chunk_size: chunk_size.max(1),
            dedup,
            current: None,
            closed: HashSet::new(),
            samples: HashSet::new(),
            pieces: Vec::new(),
            prompts: 0,
            chunk: 0,
            out: Output::default(),
        }
    }

    /// Takes one batch of [`columns`]; false when a prompt turns up again.
    fn push(&mut self, rows: &Rows, batch: &RecordBatch, emit: &mut Emit) -> Result<bool> {
        let ids = batch.column(0).as_any().downcast_ref::<StringArray>().expect("prompt_id is utf8");
        let sample = batch.column_by_name(col::SAMPLE_IDX).map(Keys::of).transpose()?;
        let keyed = self.dedup || sample.is_some();
        // Kept rows since `start` go to the current chunk as one slice.
        let mut start = 0;
        for r in 0..batch.num_rows() {
            let id = ids.value(r);
            if self.current.as_deref() != Some(id) {
                if let Some(prev) = self.current.take() {
                    self.closed.insert(hash(&prev));
                }
                if self.closed.contains(&hash(id)) {
                    return Ok(false);
                }
                if self.prompts == self.chunk_size {
                    self.pieces.push(batch.slice(start, r - start));
                    start = r;
                    self.emit(emit)?;
                }
                self.prompts += 1;
                self.samples.clear();
                self.current = Some(id.to_string());
            }
            if keyed {
                // A table without `sample_idx` keys on the prompt alone.
                let repeat = match &sample {
                    None => !self.samples.insert(Key::Prompt),
                    Some(k) => !self.samples.insert(k.key(r)),
                };
                if repeat {
                    if !self.dedup {
                        return Err(Error::Input(format!(
                            "{}: prompt `{id}` sample_idx {} repeats an earlier row; (prompt_id, sample_idx) must be unique (`dedup: true` keeps the first)",
                            rows.at(r),
                            sample.as_ref().map(|k| k.show(r)).unwrap_or_default()
                        )));
                    }
                    self.out.drop("duplicate", 1);
                    self.pieces.push(batch.slice(start, r - start));
                    start = r + 1;
                }
            }
        }
        self.pieces.push(batch.slice(start, batch.num_rows() - start));
        Ok(true)
    }

    fn emit(&mut self, emit: &mut Emit) -> Result<()> {
        let pieces: Vec<RecordBatch> = std::mem::take(&mut self.pieces).into_iter().filter(|p| p.num_rows() > 0).collect();
        let chunk = arrow::compute::concat_batches(&self.schema, &pieces)?;
        emit(self.chunk, chunk)?;
        self.chunk += 1;
        self.prompts = 0;
        Ok(())
    }

    fn finish(&mut self, emit: &mut Emit) -> Result<()> {
        if self.prompts > 0 {
            self.emit(emit)?;
        }
        Ok(())
    }
}

/// A `sample_idx` value as the whole read compares them (as text; a null reads
/// as ""): integers as themselves, which is the same and allocates nothing.
#[derive(PartialEq, Eq, Hash)]
enum Key {
    Int(Option<i64>),
    Text(String),
    Prompt,
}

/// A batch's `sample_idx` column, read as [`Key`]s.
enum Keys {
    Int(Int64Array),
    Text(StringArray),
}

impl Keys {
    fn of(a: &ArrayRef) -> Result<Keys> {
        use DataType::*;
        Ok(match a.data_type() {
            Int8 | Int16 | Int32 | Int64 | UInt8 | UInt16 | UInt32 => {
                Keys::Int(cast(a, &Int64)?.as_any().downcast_ref::<Int64Array>().expect("i64").clone())
            }
            _ => Keys::Text(cast(a, &Utf8)?.as_any().downcast_ref::<StringArray>().expect("utf8").clone()),
        })
    }

    fn key(&self, r: usize) -> Key {
        match self {
            // A null is "" to the whole read, which no integer's text is.
            Keys::Int(a) => Key::Int(a.is_valid(r).then(|| a.value(r))),
            Keys::Text(a) => Key::Text(if a.is_null(r) { String::new() } else { a.value(r).to_string() }),
        }
    }

    /// The value as the whole read prints it.
    fn show(&self, r: usize) -> String {
        match self {
            Keys::Int(a) if a.is_valid(r) => a.value(r).to_string(),
            Keys::Text(a) if a.is_valid(r) => a.value(r).to_string(),
            _ => String::new(),
        }
    }
}

fn hash(id: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    id.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use arrow::array::{Float64Array, UInt32Array};
    use arrow::datatypes::{Field, Schema};
    use parquet::arrow::ArrowWriter;
    use parquet::file::properties::WriterProperties;

    use super::*;

    /// A scored table of `(prompt_id, sample_idx)` rows, in row groups of `group` rows.
    fn write(path: &Path, rows: &[(&str, u32)], group: usize) {
        let schema = Arc::new(Schema::new(vec![
            Field::new("prompt_id", DataType::Utf8, true),
            Field::new("prompt", DataType::Utf8, true),
            Field::new("sample_idx", DataType::UInt32, false),
            Field::new("reward", DataType::Float64, false),
        ]));
        let b = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(rows.iter().map(|r| r.0).collect::<Vec<_>>())),
                Arc::new(StringArray::from(rows.iter().map(|r| format!("prompt {}", r.0)).collect::<Vec<_>>())),
                Arc::new(UInt32Array::from(rows.iter().map(|r| r.1).collect::<Vec<_>>())),
                Arc::new(Float64Array::from((0..rows.len()).map(|i| i as f64).collect::<Vec<_>>())),
            ],
        )
        .unwrap();
        let props = WriterProperties::builder().set_max_row_group_row_count(Some(group)).build();
        let mut w = ArrowWriter::try_new(std::fs::File::create(path).unwrap(), schema, Some(props)).unwrap();
        w.write(&b).unwrap();
        w.close().unwrap();
    }

    fn config(v: serde_json::Value) -> SourceConfig {
        serde_json::from_value(v).unwrap()
    }

    /// Chunks and the drops and rows read.
    type Chunks = (Vec<RecordBatch>, Output);

    /// What the stream emits, and what the whole-table read cuts.
    fn both(path: &Path, c: &SourceConfig, chunk_size: usize) -> (Result<Option<Chunks>>, Result<Chunks>) {
        let mut chunks = Vec::new();
        let streamed = super::super::read_grouped(c, path, chunk_size, &mut |k, b| {
            assert_eq!(k, chunks.len(), "chunks come in order");
            chunks.push(b);
            Ok(())
        });
        let streamed = streamed.map(|o| o.map(|o| (chunks, o)));
        let whole = super::super::read_all(c, path).and_then(|(b, o)| Ok((super::super::chunk_by_prompt(&b, chunk_size)?, o)));
        (streamed, whole)
    }

    #[test]
    fn grouped_tables_stream_to_the_chunks_of_the_whole_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.parquet");
        // Prompts span row groups of 4 rows; b repeats sample 1 (dropped with dedup).
        let rows = [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("b", 1), ("c", 0), ("c", 1), ("d", 0), ("e", 0), ("e", 1)];
        write(&p, &rows, 4);
        for chunk_size in [1, 2, 3, 10] {
            let c = config(serde_json::json!({"path": "s.parquet", "dedup": true}));
            let (streamed, whole) = both(&p, &c, chunk_size);
            let (chunks, out) = streamed.unwrap().expect("grouped");
            let (want, want_out) = whole.unwrap();
            assert_eq!(chunks, want, "chunk_size {chunk_size}");
            assert_eq!((out.drops, out.rows_in), (want_out.drops.clone(), 11));
            assert_eq!(want_out.drops.get("duplicate"), Some(&1));
        }
        // Without dedup the repeat is refused at the same row as the whole read refuses it.
        let c = config(serde_json::json!({"path": "s.parquet"}));
        let (streamed, whole) = both(&p, &c, 2);
        let (e, w) = (streamed.unwrap_err().to_string(), whole.unwrap_err().to_string());
        assert_eq!(e, w);
        assert!(e.contains("s.parquet: row 6: prompt `b` sample_idx 1 repeats an earlier row"), "{e}");
    }

    #[test]
    fn ungrouped_or_nullable_tables_are_left_to_the_whole_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.parquet");
        // `a` comes back after `b`: not grouped, found mid-stream.
        write(&p, &[("a", 0), ("a", 1), ("b", 0), ("c", 0), ("a", 2)], 2);
        let c = config(serde_json::json!({"path": "s.parquet"}));
        assert!(both(&p, &c, 1).0.unwrap().is_none());
        // A `limit` is read whole.
        write(&p, &[("a", 0), ("b", 0)], 2);
        let files = Files::find(&p, None).unwrap();
        let schema = files.schema().unwrap();
        let limited = config(serde_json::json!({"path": "s.parquet", "limit": 1}));
        assert!(!eligible(&files, &schema, &limited, &Shape::Plain).unwrap());
        assert!(eligible(&files, &schema, &c, &Shape::Plain).unwrap());
        // A null prompt (the footer counts it) is left to the whole read, which reports the first null.
        let schema = Arc::new(Schema::new(vec![Field::new("prompt", DataType::Utf8, true)]));
        let b = RecordBatch::try_new(schema.clone(), vec![Arc::new(StringArray::from(vec![Some("x"), None]))]).unwrap();
        prefpipe_core::io::write_parquet(&p, &schema, &[b]).unwrap();
        let files = Files::find(&p, None).unwrap();
        assert!(!eligible(&files, &files.schema().unwrap(), &c, &Shape::Plain).unwrap());
    }
}
