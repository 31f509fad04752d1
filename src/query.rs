//! `prefpipe query`: DataFusion SQL over finished stages or Parquet files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use clap::ValueEnum;
use prefpipe_core::objstore::ObjectStore;
use prefpipe_core::plan::Plan;
use prefpipe_core::stage::{Mode, Table};
use prefpipe_core::store::Store;
use prefpipe_core::{io, Error};

#[derive(Clone, Copy, ValueEnum)]
pub enum OutFormat {
    Table,
    Csv,
    Json,
    Parquet,
}

/// `NAME=FILE` → a table.
pub fn file_table(arg: &str) -> anyhow::Result<Table> {
    let (name, file) = arg.split_once('=').ok_or_else(|| Error::Input(format!("--table {arg}: expected NAME=FILE")))?;
    let file = PathBuf::from(file);
    let schema = io::parquet_schema(&file)?;
    Ok(Table { id: name.to_string(), schema, files: vec![file] })
}

/// Every finished stage of `plan` in `store`, by stage id. On an object
/// store the tables' files are the chunks' URLs: DataFusion reads them in
/// place through the registered store, nothing is downloaded.
pub fn finished_tables(plan: &Plan, store: &Store) -> anyhow::Result<Vec<Table>> {
    let Some(remote) = store.remote() else { return Ok(prefpipe_core::exec::finished_tables(plan, store)?) };
    let mut out = Vec::new();
    for s in plan.stages.iter().filter(|s| s.mode != Mode::Sink) {
        if let Some(m) = store.manifest(&s.id, &s.key)?.filter(|m| m.complete) {
            let dir = store.stage_dir(&m.id, &m.key);
            let files = m
                .chunks
                .values()
                .map(|c| Ok(PathBuf::from(remote.url_of(&remote.rel_of(&dir.join(&c.file))?))))
                .collect::<anyhow::Result<_>>()?;
            out.push(Table { id: s.id.clone(), schema: s.schema.clone(), files });
        }
    }
    Ok(out)
}

/// Runs `sql`; `remote` is the object store the tables' URLs name, if any.
pub fn run(
    sql: &str,
    tables: &[Table],
    remote: Option<(String, Arc<dyn ObjectStore>)>,
    format: OutFormat,
    out: Option<&Path>,
) -> anyhow::Result<()> {
    let (schema, batches) = prefpipe_stages::sql::query_with(sql, tables, remote.as_slice())?;
    let mut buf: Vec<u8> = Vec::new();
    match format {
        OutFormat::Parquet => {
            let Some(out) = out else {
                return Err(Error::Input("--format parquet needs --out FILE".into()).into());
            };
            io::write_parquet(out, &schema, &batches)?;
            return Ok(());
        }
        OutFormat::Table => {
            let s = arrow::util::pretty::pretty_format_batches(&nonempty(&schema, batches))?;
            buf.extend(s.to_string().as_bytes());
            buf.push(b'\n');
        }
        OutFormat::Csv => {
            let mut w = arrow::csv::Writer::new(&mut buf);
            for b in &nonempty(&schema, batches) {
                w.write(b)?;
            }
        }
        OutFormat::Json => {
            let mut w = arrow::json::LineDelimitedWriter::new(&mut buf);
            for b in &batches {
                w.write(b)?;
            }
            w.finish()?;
        }
    }
    match out {
        Some(p) => io::write_atomic(p, |f| {
            use std::io::Write;
            f.write_all(&buf).map_err(|e| Error::io(p, e))
        })?,
        None => {
            use std::io::Write;
            std::io::stdout().write_all(&buf)?;
        }
    }
    Ok(())
}

/// An empty result still prints its header.
fn nonempty(schema: &arrow::datatypes::SchemaRef, batches: Vec<RecordBatch>) -> Vec<RecordBatch> {
    if batches.is_empty() {
        vec![RecordBatch::new_empty(schema.clone())]
    } else {
        batches
    }
}
