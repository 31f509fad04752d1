//! `export`: writes a table to a file outside the store, atomically.
//!
//! Formats: `parquet` (the table as is), `trl` (prompt/chosen/rejected
//! strings, TRL's standard preference format), `trl_chat` (TRL's
//! conversational format: lists of {role, content} messages), `lists`
//! (prompt/responses/rewards for LiPO), `jsonl` (the table as JSON lines).
//! `trl`, `trl_chat` and `lists` write Parquet, or JSON lines when the path
//! ends in `.jsonl`/`.json`.
//!
//! Conversations (DESIGN §15): `trl_chat` writes a table's `messages` (system
//! and history included) as the prompt; `trl` refuses a table with
//! `messages`, since one prompt string would drop the history; `lists`
//! carries `messages` after `prompt`.

use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{ArrayRef, ListArray, StringArray, StructArray};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use prefpipe_core::io;
use prefpipe_core::stage::{empty_schema, from_config, Arity, ConfigError, Mode, Output, PlanCx, RunCx, Stage, StageKind, Table};
use prefpipe_core::table::{self, col, str_col, Conversations, Need};
use prefpipe_core::{Error, Result};
use serde::{Deserialize, Serialize};

pub mod card;

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
    /// Write a Hugging Face dataset card (`README.md`) in the output's
    /// directory (DESIGN §14). Refused when that directory holds a
    /// `README.md` prefpipe did not write; `false` writes none.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub card: bool,
}

// Left out of the config JSON when on, so that the default keeps every export's content key.
fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
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
    /// Plan-time checks of the input's schema for the chosen format.
    fn check_input(&self, input: &Schema, input_id: &str) -> Vec<ConfigError> {
        let mut errs = Vec::new();
        let needs: &[(&str, Need)] = match self.c.format {
            ExportFormat::Trl | ExportFormat::TrlChat => &[("prompt", Need::Text), ("chosen", Need::Text), ("rejected", Need::Text)],
            ExportFormat::Lists => &[("prompt", Need::Text)],
            _ => &[],
        };
        for (c, need) in needs {
            if let Err(e) = table::require(input, input_id, c, *need) {
                errs.push(ConfigError::at("format", e.message));
            }
        }
        if let Ok(f) = input.field_with_name(col::MESSAGES) {
            if let Err(e) = table::check_messages_type(f.data_type()) {
                errs.push(ConfigError::at("format", format!("column `messages` of input `{input_id}` {e}")));
            } else if self.c.format == ExportFormat::Trl {
                let why = "`trl` writes the prompt as one string and would drop their system and earlier turns";
                let msg = format!("input `{input_id}` holds conversations (column `messages`); {why}: use `format: trl_chat`");
                errs.push(ConfigError::at("format", msg));
            }
        }
        if self.c.format == ExportFormat::Lists {
            for c in ["responses", "rewards"] {
                if input.field_with_name(c).map(|f| !matches!(f.data_type(), DataType::List(_))).unwrap_or(true) {
                    errs.push(ConfigError::at(
                        "format",
                        format!("`lists` needs a list column `{c}` (a lists table from `select` with `strategy: listwise`)"),
                    ));
                }
            }
        }
        errs
    }

    /// The table to write.
    fn table(&self, input: &RecordBatch) -> Result<RecordBatch> {
        let has_messages = input.schema().field_with_name(col::MESSAGES).is_ok();
        Ok(match self.c.format {
            ExportFormat::Parquet | ExportFormat::Jsonl => input.clone(),
            ExportFormat::Trl if has_messages => {
                return Err(Error::Input("`trl` cannot write conversations (column `messages`); use `format: trl_chat`".into()))
            }
            ExportFormat::Trl => project(input, &["prompt", "chosen", "rejected"])?,
            ExportFormat::Lists if has_messages => project(input, &["prompt", col::MESSAGES, "responses", "rewards"])?,
            ExportFormat::Lists => project(input, &["prompt", "responses", "rewards"])?,
            ExportFormat::TrlChat => chat(input)?,
        })
    }

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
        if self.c.card {
            if let Err(e) = card::check_dir(path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."))) {
                errs.push(ConfigError::at("card", e));
            }
        }
        errs.extend(self.check_input(&inputs[0], &cx.input_ids[0]));
        if errs.is_empty() {
            Ok(empty_schema())
        } else {
            Err(errs)
        }
    }

    fn run(&self, cx: &RunCx, inputs: &[Table]) -> Result<Output> {
        let path = cx.resolve(&self.c.path);
        let input = inputs[0].read_one()?;
        let out = self.table(&input)?;
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

/// TRL's conversational preference format: `prompt` is the conversation
/// (the `messages` column; a one-user-turn list for string prompts),
/// `chosen`/`rejected` one assistant message each.
fn chat(b: &RecordBatch) -> Result<RecordBatch> {
    let msg_fields = table::message_fields();
    let list_type = table::messages_type();
    let n = b.num_rows();
    let messages = |role: &str, col: &str| -> Result<ArrayRef> {
        let content = str_col(b, col)?;
        let roles = StringArray::from(vec![role; n]);
        let s = StructArray::try_new(msg_fields.clone(), vec![Arc::new(roles), Arc::new(content)], None)?;
        let item = Arc::new(Field::new("item", DataType::Struct(msg_fields.clone()), false));
        Ok(Arc::new(ListArray::try_new(item, OffsetBuffer::from_lengths(std::iter::repeat_n(1, n)), Arc::new(s), None)?))
    };
    let prompt = match b.column_by_name(col::MESSAGES) {
        // Rebuilt rather than copied, so a SQL stage's large lists or view strings come out as TRL reads them.
        Some(_) => {
            let conv = Conversations::of(b, col::MESSAGES)?;
            table::messages_array((0..n).map(|r| conv.row(r)))?
        }
        None => messages("user", "prompt")?,
    };
    let schema = Arc::new(Schema::new(vec![
        Field::new("prompt", list_type.clone(), false),
        Field::new("chosen", list_type.clone(), false),
        Field::new("rejected", list_type, false),
    ]));
    Ok(RecordBatch::try_new(schema, vec![prompt, messages("assistant", "chosen")?, messages("assistant", "rejected")?])?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prefpipe_core::table::Message;

    fn export(format: &str) -> Export {
        Export { c: serde_json::from_value(serde_json::json!({"path": "out.parquet", "format": format})).unwrap() }
    }

    /// A pairs table with conversations: one prompt with a system turn and history.
    fn pairs(with_messages: bool) -> RecordBatch {
        let conv = vec![vec![
            Message::new("system", "Be brief."),
            Message::new("user", "Hi"),
            Message::new("assistant", "Hello!"),
            Message::new("user", "What is 2+2?"),
        ]];
        let mut fields = vec![Field::new("prompt_id", DataType::Utf8, false), Field::new("prompt", DataType::Utf8, false)];
        let mut cols: Vec<ArrayRef> = vec![Arc::new(StringArray::from(vec!["p0"])), Arc::new(StringArray::from(vec!["What is 2+2?"]))];
        if with_messages {
            fields.push(table::messages_field());
            cols.push(table::messages_array(&conv).unwrap());
        }
        fields.extend([Field::new("chosen", DataType::Utf8, false), Field::new("rejected", DataType::Utf8, false)]);
        cols.extend([Arc::new(StringArray::from(vec!["4"])) as ArrayRef, Arc::new(StringArray::from(vec!["5"]))]);
        RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap()
    }

    fn rows(b: &RecordBatch, name: &str) -> Vec<Vec<(String, String)>> {
        let c = Conversations::of(b, name).unwrap();
        (0..c.len()).map(|r| c.row(r).iter().map(|m| (m.role.to_string(), m.content.to_string())).collect()).collect()
    }

    fn pair(role: &str, content: &str) -> (String, String) {
        (role.to_string(), content.to_string())
    }

    #[test]
    fn trl_chat_writes_the_whole_conversation() {
        // TRL's conversational format: prompt = every turn (system and history), chosen/rejected = one assistant turn.
        let out = export("trl_chat").table(&pairs(true)).unwrap();
        assert_eq!(out.schema().fields().iter().map(|f| f.data_type().clone()).collect::<Vec<_>>(), vec![table::messages_type(); 3]);
        assert_eq!(
            rows(&out, "prompt"),
            [vec![pair("system", "Be brief."), pair("user", "Hi"), pair("assistant", "Hello!"), pair("user", "What is 2+2?")]]
        );
        assert_eq!(rows(&out, "chosen"), [vec![pair("assistant", "4")]]);
        assert_eq!(rows(&out, "rejected"), [vec![pair("assistant", "5")]]);
        // String prompts stay the one-user-turn conversation.
        let out = export("trl_chat").table(&pairs(false)).unwrap();
        assert_eq!(rows(&out, "prompt"), [vec![pair("user", "What is 2+2?")]]);
    }

    #[test]
    fn trl_refuses_conversations_at_plan_time() {
        let e = export("trl").check_input(&pairs(true).schema(), "pairs");
        assert_eq!(e.len(), 1);
        assert!(e[0].message.contains("input `pairs` holds conversations") && e[0].message.contains("use `format: trl_chat`"), "{:?}", e);
        assert!(export("trl").table(&pairs(true)).is_err(), "and at run time");
        assert!(export("trl").check_input(&pairs(false).schema(), "pairs").is_empty());
        assert!(export("trl_chat").check_input(&pairs(true).schema(), "pairs").is_empty());
        let out = export("trl").table(&pairs(false)).unwrap();
        assert_eq!(out.num_columns(), 3);
    }

    #[test]
    fn trl_chat_jsonl_is_what_trl_reads() {
        let out = export("trl_chat").table(&pairs(true)).unwrap();
        let mut w = arrow::json::LineDelimitedWriter::new(Vec::new());
        w.write(&out).unwrap();
        w.finish().unwrap();
        let line = String::from_utf8(w.into_inner()).unwrap();
        assert_eq!(
            line.trim_end(),
            r#"{"prompt":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi"},{"role":"assistant","content":"Hello!"},{"role":"user","content":"What is 2+2?"}],"chosen":[{"role":"assistant","content":"4"}],"rejected":[{"role":"assistant","content":"5"}]}"#
        );
    }
}
