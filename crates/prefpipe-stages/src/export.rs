//! `export`: writes a table to a file outside the store, atomically.
//!
//! Formats: `parquet` (the table as is), `trl` (prompt/chosen/rejected
//! strings, TRL's standard preference format), `trl_chat` (TRL's
//! conversational format: lists of {role, content} messages), `lists`
//! (prompt/responses/rewards for LiPO), `jsonl` (the table as JSON lines).
//! `trl`, `trl_chat` and `lists` write Parquet, or JSON lines when the path
//! ends in `.jsonl`/`.json`.

use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{ArrayRef, ListArray, StringArray, StructArray};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use prefpipe_core::io;
use prefpipe_core::stage::{empty_schema, from_config, Arity, ConfigError, Mode, Output, PlanCx, RunCx, Stage, StageKind, Table};
use prefpipe_core::table::{self, str_col, Need};
use prefpipe_core::{Error, Result};
use serde::{Deserialize, Serialize};

pub const KIND: StageKind = StageKind {
    name: "export",
    about: "write a table to a file (parquet, trl, trl_chat, lists, jsonl)",
    arity: Arity::One,
    build: |v| Ok(Box::new(Export { c: from_config(v)? })),
    schema: || schemars::schema_for!(ExportConfig),
};

/// `kind: export`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    /// Output file, relative to the pipeline file. Its directory must exist.
    pub path: String,
    /// What to write.
    #[serde(default)]
    pub format: ExportFormat,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExportFormat {
    /// The input table as is (Parquet).
    #[default]
    Parquet,
    /// `prompt`, `chosen`, `rejected` strings.
    Trl,
    /// `prompt`, `chosen`, `rejected` as lists of {role, content} messages.
    TrlChat,
    /// `prompt`, `responses`, `rewards` (LiPO lists).
    Lists,
    /// The input table as JSON lines.
    Jsonl,
}

struct Export {
    c: ExportConfig,
}

impl Export {
    fn as_json(&self, path: &std::path::Path) -> bool {
        self.c.format == ExportFormat::Jsonl
            || (self.c.format != ExportFormat::Parquet && matches!(path.extension().and_then(|e| e.to_str()), Some("jsonl" | "json")))
    }
}

impl Stage for Export {
    fn mode(&self) -> Mode {
        Mode::Sink
    }

    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.c).expect("serializes")
    }

    fn external_output(&self, cx: &PlanCx) -> Option<PathBuf> {
        Some(cx.resolve(&self.c.path))
    }

    fn plan(&self, cx: &PlanCx, inputs: &[SchemaRef]) -> Result<SchemaRef, Vec<ConfigError>> {
        let path = cx.resolve(&self.c.path);
        let mut errs = Vec::new();
        match path.parent() {
            Some(d) if d.as_os_str().is_empty() || d.is_dir() => {}
            Some(d) => errs.push(ConfigError::at("path", format!("the directory {} does not exist", d.display()))),
            None => errs.push(ConfigError::at("path", "not a file path")),
        }
        if path.is_dir() {
            errs.push(ConfigError::at("path", format!("{} is a directory", path.display())));
        }
        let needs: &[(&str, Need)] = match self.c.format {
            ExportFormat::Trl | ExportFormat::TrlChat => &[("prompt", Need::Text), ("chosen", Need::Text), ("rejected", Need::Text)],
            ExportFormat::Lists => &[("prompt", Need::Text)],
            _ => &[],
        };
        for (c, need) in needs {
            if let Err(e) = table::require(&inputs[0], &cx.input_ids[0], c, *need) {
                errs.push(ConfigError::at("format", e.message));
            }
        }
        if self.c.format == ExportFormat::Lists {
            for c in ["responses", "rewards"] {
                if inputs[0].field_with_name(c).map(|f| !matches!(f.data_type(), DataType::List(_))).unwrap_or(true) {
                    errs.push(ConfigError::at(
                        "format",
                        format!("`lists` needs a list column `{c}` (a lists table from `select` with `strategy: listwise`)"),
                    ));
                }
            }
        }
        if errs.is_empty() {
            Ok(empty_schema())
        } else {
            Err(errs)
        }
    }

    fn run(&self, cx: &RunCx, inputs: &[Table]) -> Result<Output> {
        let path = cx.resolve(&self.c.path);
        let input = inputs[0].read_one()?;
        let out = match self.c.format {
            ExportFormat::Parquet | ExportFormat::Jsonl => input.clone(),
            ExportFormat::Trl => project(&input, &["prompt", "chosen", "rejected"])?,
            ExportFormat::Lists => project(&input, &["prompt", "responses", "rewards"])?,
            ExportFormat::TrlChat => chat(&input)?,
        };
        if self.as_json(&path) {
            io::write_atomic(&path, |f| {
                let mut w = arrow::json::LineDelimitedWriter::new(std::io::BufWriter::new(f));
                w.write(&out)?;
                w.finish()?;
                Ok(())
            })?;
        } else {
            io::write_parquet(&path, &out.schema(), std::slice::from_ref(&out))?;
        }
        Ok(Output { rows_in: input.num_rows() as u64, ..Default::default() })
    }
}

fn project(b: &RecordBatch, cols: &[&str]) -> Result<RecordBatch> {
    let idx = cols
        .iter()
        .map(|c| b.schema().index_of(c).map_err(|_| Error::Input(format!("missing column `{c}`"))))
        .collect::<Result<Vec<_>>>()?;
    Ok(b.project(&idx)?)
}

/// TRL's conversational preference format: each of prompt/chosen/rejected is
/// a one-message list of {role, content}.
fn chat(b: &RecordBatch) -> Result<RecordBatch> {
    let msg_fields = Fields::from(vec![Field::new("role", DataType::Utf8, false), Field::new("content", DataType::Utf8, false)]);
    let list_type = DataType::List(Arc::new(Field::new("item", DataType::Struct(msg_fields.clone()), false)));
    let n = b.num_rows();
    let messages = |role: &str, col: &str| -> Result<ArrayRef> {
        let content = str_col(b, col)?;
        let roles = StringArray::from(vec![role; n]);
        let s = StructArray::try_new(msg_fields.clone(), vec![Arc::new(roles), Arc::new(content)], None)?;
        let item = Arc::new(Field::new("item", DataType::Struct(msg_fields.clone()), false));
        Ok(Arc::new(ListArray::try_new(item, OffsetBuffer::from_lengths(std::iter::repeat_n(1, n)), Arc::new(s), None)?))
    };
    let schema = Arc::new(Schema::new(vec![
        Field::new("prompt", list_type.clone(), false),
        Field::new("chosen", list_type.clone(), false),
        Field::new("rejected", list_type, false),
    ]));
    Ok(RecordBatch::try_new(
        schema,
        vec![messages("user", "prompt")?, messages("assistant", "chosen")?, messages("assistant", "rejected")?],
    )?)
}
