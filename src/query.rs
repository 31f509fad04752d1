//! `prefpipe query`: DataFusion SQL over finished stages or Parquet files.

use std::path::{Path, PathBuf};

use arrow::record_batch::RecordBatch;
use clap::ValueEnum;
use prefpipe_core::stage::Table;
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

pub fn run(sql: &str, tables: &[Table], format: OutFormat, out: Option<&Path>) -> anyhow::Result<()> {
    let (schema, batches) = prefpipe_stages::sql::query(sql, tables)?;
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
