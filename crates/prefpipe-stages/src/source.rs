//! `source`: reads prompts, or any table, from Parquet, JSONL or CSV.
//!
//! Output: `prompt_id`, `prompt`, then the file's other columns. Rows are
//! grouped by prompt (first-appearance order) and cut into chunks of
//! `chunk_size` prompts, so every downstream per-prompt stage sees whole prompts.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, StringArray, UInt32Array};
use arrow::compute::{cast, concat_batches, take};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use prefpipe_core::io::{self, Format};
use prefpipe_core::stage::{from_config, Arity, ConfigError, Mode, Output, PlanCx, RunCx, Stage, StageKind, Table};
use prefpipe_core::table::{self, col, Need};
use prefpipe_core::{Error, Result};
use serde::{Deserialize, Serialize};

pub const KIND: StageKind = StageKind {
    name: "source",
    about: "read prompts or any table (Parquet, JSONL, CSV)",
    arity: Arity::None,
    build: |v| {
        let c: SourceConfig = from_config(v)?;
        if c.limit == Some(0) {
            return Err(vec![ConfigError::at("limit", "`limit` must be at least 1")]);
        }
        Ok(Box::new(Source { c }))
    },
    schema: || schemars::schema_for!(SourceConfig),
};

/// `kind: source`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// The file to read, relative to the pipeline file.
    pub path: String,
    /// `parquet`, `jsonl` or `csv`; by default from the file extension.
    #[serde(default)]
    pub format: Option<SourceFormat>,
    /// The column holding the prompt text (renamed to `prompt`).
    #[serde(default = "default_prompt_column")]
    pub prompt_column: String,
    /// The id column, kept as is when present (renamed to `prompt_id`); when
    /// absent, `prompt_id` = the first 16 hex chars of blake3(prompt).
    #[serde(default = "default_id_column")]
    pub id_column: String,
    /// Keep the first N prompts (after dedup).
    #[serde(default)]
    pub limit: Option<usize>,
    /// Drop rows that repeat an earlier (prompt_id, sample_idx) — for a
    /// prompts table, repeated prompts. Counted as `duplicate`.
    #[serde(default)]
    pub dedup: bool,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SourceFormat {
    Parquet,
    Jsonl,
    Csv,
}

fn default_prompt_column() -> String {
    col::PROMPT.into()
}
fn default_id_column() -> String {
    col::PROMPT_ID.into()
}

struct Source {
    c: SourceConfig,
}

impl Source {
    fn format(&self, cx_path: &std::path::Path) -> Result<Format, ConfigError> {
        match self.c.format {
            Some(SourceFormat::Parquet) => Ok(Format::Parquet),
            Some(SourceFormat::Jsonl) => Ok(Format::Jsonl),
            Some(SourceFormat::Csv) => Ok(Format::Csv),
            None => Format::from_path(cx_path).ok_or_else(|| {
                ConfigError::at("path", format!("{}: unknown file type; use .parquet, .jsonl or .csv, or set `format`", cx_path.display()))
            }),
        }
    }

    fn file_schema(&self, path: &std::path::Path) -> Result<SchemaRef, ConfigError> {
        if !path.is_file() {
            return Err(ConfigError::at("path", format!("{}: no such file", path.display())));
        }
        let format = self.format(path)?;
        io::file_schema(path, format).map_err(|e| ConfigError::at("path", e.to_string()))
    }
}

impl Stage for Source {
    fn mode(&self) -> Mode {
        Mode::Source
    }

    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.c).expect("serializes")
    }

    fn plan(&self, cx: &PlanCx, _: &[SchemaRef]) -> Result<SchemaRef, Vec<ConfigError>> {
        let path = cx.resolve(&self.c.path);
        let schema = self.file_schema(&path).map_err(|e| vec![e])?;
        let name = path.display().to_string();
        table::require(&schema, &name, &self.c.prompt_column, Need::Text).map_err(|e| vec![ConfigError::at("prompt_column", e.message)])?;
        Ok(output_schema(&schema, &self.c))
    }

    fn fingerprint(&self, cx: &PlanCx) -> Result<Vec<u8>, ConfigError> {
        let path = cx.resolve(&self.c.path);
        let d = io::file_digest(&path).map_err(|e| ConfigError::at("path", e.to_string()))?;
        Ok(d.into_bytes())
    }

    fn run(&self, cx: &RunCx, _: &[Table]) -> Result<Output> {
        let path = cx.resolve(&self.c.path);
        let format = self.format(&path).map_err(|e| Error::Input(e.message))?;
        let file_schema = match format {
            Format::Parquet => io::parquet_schema(&path)?,
            f => io::file_schema(&path, f)?,
        };
        let batches = io::read_file(&path, format, &file_schema)?;
        let all = concat_batches(&file_schema, &batches)?;
        let schema = output_schema(&file_schema, &self.c);
        let where_ = path.display().to_string();
        let (batch, mut out) = normalize(&all, &schema, &self.c, &where_)?;
        out.rows_in = all.num_rows() as u64;
        out.batches = chunk_by_prompt(&batch, cx.chunk_size)?;
        Ok(out)
    }
}

fn output_schema(file: &Schema, c: &SourceConfig) -> SchemaRef {
    let mut fields = vec![Field::new(col::PROMPT_ID, DataType::Utf8, false), Field::new(col::PROMPT, DataType::Utf8, false)];
    for f in file.fields() {
        let n = f.name();
        if n == &c.prompt_column || n == &c.id_column || n == col::PROMPT_ID || n == col::PROMPT {
            continue;
        }
        fields.push(f.as_ref().clone());
    }
    Arc::new(Schema::new(fields))
}

/// Renames/derives the id and prompt columns, checks nulls, dedups and limits.
fn normalize(b: &RecordBatch, schema: &SchemaRef, c: &SourceConfig, file: &str) -> Result<(RecordBatch, Output)> {
    let mut out = Output::default();
    let prompt = cast(b.column_by_name(&c.prompt_column).expect("checked at plan"), &DataType::Utf8)?;
    let prompt = prompt.as_any().downcast_ref::<StringArray>().expect("utf8").clone();
    if let Some(r) = (0..prompt.len()).find(|&r| prompt.is_null(r)) {
        return Err(Error::Input(format!("{file}: row {}: `{}` is null", r + 1, c.prompt_column)));
    }
    let ids: StringArray = match b.column_by_name(&c.id_column) {
        Some(a) => {
            let a = cast(a, &DataType::Utf8)?;
            let a = a.as_any().downcast_ref::<StringArray>().expect("utf8").clone();
            if let Some(r) = (0..a.len()).find(|&r| a.is_null(r)) {
                return Err(Error::Input(format!("{file}: row {}: `{}` is null", r + 1, c.id_column)));
            }
            a
        }
        None => prompt.iter().map(|p| Some(prompt_id(p.unwrap_or_default()))).collect(),
    };
    let mut cols: Vec<ArrayRef> = vec![Arc::new(ids.clone()), Arc::new(prompt)];
    for f in schema.fields().iter().skip(2) {
        cols.push(b.column_by_name(f.name()).expect("from the file").clone());
    }
    let batch = RecordBatch::try_new(schema.clone(), cols)?;

    // Rows to keep: dedup on (prompt_id, sample_idx), then the first `limit` prompts.
    let sample = b.column_by_name(col::SAMPLE_IDX).map(|a| cast(a, &DataType::Utf8)).transpose()?;
    let sample = sample.as_ref().map(|a| a.as_any().downcast_ref::<StringArray>().expect("utf8").clone());
    let mut seen: HashSet<(&str, Option<&str>)> = HashSet::new();
    let mut prompts: HashSet<&str> = HashSet::new();
    let mut keep: Vec<u32> = Vec::with_capacity(batch.num_rows());
    for r in 0..batch.num_rows() {
        let id = ids.value(r);
        if c.dedup && !seen.insert((id, sample.as_ref().map(|s| if s.is_null(r) { "" } else { s.value(r) }))) {
            out.drop("duplicate", 1);
            continue;
        }
        if let Some(limit) = c.limit {
            if !prompts.contains(id) && prompts.len() >= limit {
                out.drop("over_limit", 1);
                continue;
            }
            prompts.insert(id);
        }
        keep.push(r as u32);
    }
    if keep.len() == batch.num_rows() {
        return Ok((batch, out));
    }
    let idx = UInt32Array::from(keep);
    let cols = batch.columns().iter().map(|a| take(a, &idx, None)).collect::<std::result::Result<Vec<_>, _>>()?;
    Ok((RecordBatch::try_new(schema.clone(), cols)?, out))
}

/// `prompt_id` for a table without one: the first 16 hex chars of blake3(prompt).
pub fn prompt_id(prompt: &str) -> String {
    blake3::hash(prompt.as_bytes()).to_hex()[..16].to_string()
}

/// Groups rows by prompt (first-appearance order, stable within a prompt)
/// and cuts them into batches of `chunk_size` prompts.
pub fn chunk_by_prompt(b: &RecordBatch, chunk_size: usize) -> Result<Vec<RecordBatch>> {
    let ids = b.column(0).as_any().downcast_ref::<StringArray>().expect("prompt_id is utf8");
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut groups: Vec<Vec<u32>> = Vec::new();
    for r in 0..ids.len() {
        let g = *index.entry(ids.value(r)).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[g].push(r as u32);
    }
    let contiguous = groups.iter().flatten().enumerate().all(|(i, &r)| i as u32 == r);
    let mut out = Vec::new();
    for chunk in groups.chunks(chunk_size.max(1)) {
        let rows: Vec<u32> = chunk.iter().flatten().copied().collect();
        if contiguous {
            out.push(b.slice(rows[0] as usize, rows.len()));
        } else {
            let idx = UInt32Array::from(rows);
            let cols = b.columns().iter().map(|a| take(a, &idx, None)).collect::<std::result::Result<Vec<_>, _>>()?;
            out.push(RecordBatch::try_new(b.schema(), cols)?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_ids_are_blake3_prefixes() {
        // blake3("hello") = ea8f163db38682925e4491c5e58d4bb3506ef8c14eb78a86e908c5624a67200f (BLAKE3 reference test vector).
        assert_eq!(prompt_id("hello"), "ea8f163db3868292");
    }

    #[test]
    fn chunks_keep_prompts_whole() {
        let schema = Arc::new(Schema::new(vec![Field::new("prompt_id", DataType::Utf8, false), Field::new("x", DataType::Int64, false)]));
        let b = RecordBatch::try_new(
            schema,
            vec![Arc::new(StringArray::from(vec!["a", "b", "a", "c", "b"])), Arc::new(arrow::array::Int64Array::from(vec![0, 1, 2, 3, 4]))],
        )
        .unwrap();
        let chunks = chunk_by_prompt(&b, 2).unwrap();
        assert_eq!(chunks.len(), 2);
        let ids: Vec<Vec<&str>> = chunks
            .iter()
            .map(|c| c.column(0).as_any().downcast_ref::<StringArray>().unwrap().iter().map(|x| x.unwrap()).collect())
            .collect();
        assert_eq!(ids, vec![vec!["a", "a", "b", "b"], vec!["c"]]);
    }
}
