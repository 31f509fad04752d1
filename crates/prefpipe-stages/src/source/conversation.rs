//! Conversations in a source (DESIGN §15): which column holds them, and each
//! row checked and normalised — `system_prompt` added, a trailing assistant
//! turn stripped, TRL's implicit prompt extracted from `chosen`/`rejected`.

use arrow::array::{Array, ArrayRef, StringArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Schema};
use arrow::record_batch::RecordBatch;
use prefpipe_core::stage::ConfigError;
use prefpipe_core::table::{self, col, Conversations, Message, Need, ROLES};
use prefpipe_core::{Error, Result};

use super::files::Rows;
use super::SourceConfig;

/// How a source's rows hold their prompts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Shape {
    /// One user string per row (`prompt_column`); with `system_prompt` it
    /// becomes the conversation [system, user].
    Plain,
    /// A conversation column (`messages`, `messages_column`, or a list-valued `prompt_column`).
    Conversation(String),
    /// TRL's implicit-prompt format: `chosen` and `rejected` full
    /// conversations, no prompt column; prompt = their common prefix.
    Implicit,
}

impl Shape {
    /// Finds the shape of a file's schema, or says what is wrong with it.
    pub fn of(schema: &Schema, file: &str, c: &SourceConfig) -> Result<Shape, Vec<ConfigError>> {
        let typed = |name: &str, key: &str| -> Result<(), ConfigError> {
            let f = schema.field_with_name(name).map_err(|_| {
                ConfigError::at(key, table::require(schema, file, name, Need::Text).err().map(|e| e.message).unwrap_or_default())
            })?;
            table::check_messages_type(f.data_type()).map_err(|e| ConfigError::at(key, format!("column `{name}` of `{file}` {e}")))
        };
        let list = |name: &str| schema.field_with_name(name).is_ok_and(|f| table::is_list(f.data_type()));
        let shape = if let Some(m) = &c.messages_column {
            typed(m, "messages_column").map_err(|e| vec![e])?;
            Shape::Conversation(m.clone())
        } else if schema.field_with_name(col::MESSAGES).is_ok() {
            typed(col::MESSAGES, "path").map_err(|e| vec![e])?;
            Shape::Conversation(col::MESSAGES.into())
        } else if list(&c.prompt_column) {
            typed(&c.prompt_column, "prompt_column").map_err(|e| vec![e])?;
            Shape::Conversation(c.prompt_column.clone())
        } else if schema.field_with_name(&c.prompt_column).is_err() && list("chosen") && list("rejected") {
            let errs: Vec<ConfigError> = ["chosen", "rejected"].iter().filter_map(|n| typed(n, "path").err()).collect();
            if !errs.is_empty() {
                return Err(errs);
            }
            Shape::Implicit
        } else {
            table::require(schema, file, &c.prompt_column, Need::Text).map_err(|e| vec![ConfigError::at("prompt_column", e.message)])?;
            Shape::Plain
        };
        if c.strip_trailing_assistant && !matches!(shape, Shape::Conversation(_)) {
            let why = match shape {
                Shape::Implicit => {
                    "the prompt of `chosen`/`rejected` conversations is their common prefix; there is no trailing turn to strip"
                }
                _ => "it applies to conversations (a `messages` column, or a list-valued `prompt`), and the prompts here are strings",
            };
            return Err(vec![ConfigError::at(
                "strip_trailing_assistant",
                format!("`strip_trailing_assistant: true` does not apply: {why}"),
            )]);
        }
        Ok(shape)
    }

    /// Whether the output has a `messages` column.
    pub fn has_messages(&self, c: &SourceConfig) -> bool {
        !matches!(self, Shape::Plain) || c.system_prompt.is_some()
    }

    /// Input columns this shape replaces (not carried through as they are).
    pub fn consumed(&self) -> Vec<&str> {
        match self {
            Shape::Plain => vec![],
            Shape::Conversation(m) => vec![m.as_str()],
            Shape::Implicit => vec!["chosen", "rejected"],
        }
    }
}

/// The derived columns of a conversational source, one value per input row.
pub(super) struct Derived {
    /// The last user turn's text.
    pub prompt: ArrayRef,
    pub messages: ArrayRef,
    /// The conversations' canonical JSON (for `prompt_id` when there is no id column).
    pub canonical: Vec<String>,
    /// Implicit format: the chosen and rejected responses' text.
    pub responses: Option<(ArrayRef, ArrayRef)>,
}

/// Checks and normalises every row; an error names the file and row.
pub(super) fn derive(rows: &Rows, shape: &Shape, c: &SourceConfig) -> Result<Derived> {
    let b = &rows.batch;
    let system = c.system_prompt.as_deref();
    let bad = |r: usize, what: String| Error::Input(format!("{}: {what}", rows.at(r)));
    let mut convs: Vec<Vec<Message>> = Vec::with_capacity(b.num_rows());
    let mut responses: Option<(Vec<&str>, Vec<&str>)> = None;
    let strings;
    let conv;
    let chosen;
    let rejected;
    match shape {
        Shape::Plain => {
            strings = text(b, &c.prompt_column)?;
            for r in 0..b.num_rows() {
                if strings.is_null(r) {
                    return Err(bad(r, format!("`{}` is null", c.prompt_column)));
                }
                if strings.value(r).trim().is_empty() {
                    return Err(bad(r, format!("`{}` is empty; a conversation's turns need text", c.prompt_column)));
                }
                let m = [Message::new("user", strings.value(r))];
                convs.push(finish(&m, system, false, &c.prompt_column).map_err(|e| bad(r, e))?);
            }
        }
        Shape::Conversation(name) => {
            conv = Conversations::of(b, name)?;
            for r in 0..b.num_rows() {
                let m = messages(&conv, r, name).map_err(|e| bad(r, e))?;
                convs.push(finish(&m, system, c.strip_trailing_assistant, name).map_err(|e| bad(r, e))?);
            }
        }
        Shape::Implicit => {
            chosen = Conversations::of(b, "chosen")?;
            rejected = Conversations::of(b, "rejected")?;
            let (mut cs, mut rs) = (Vec::new(), Vec::new());
            for r in 0..b.num_rows() {
                let (prompt, c_text, r_text) = implicit(&chosen, &rejected, r).map_err(|e| bad(r, e))?;
                convs.push(finish(&prompt, system, false, "chosen").map_err(|e| bad(r, e))?);
                cs.push(c_text);
                rs.push(r_text);
            }
            responses = Some((cs, rs));
        }
    }
    let prompt: StringArray = convs.iter().map(|m| Some(m.last().expect("ends with a user turn").content)).collect();
    Ok(Derived {
        prompt: std::sync::Arc::new(prompt),
        messages: table::messages_array(&convs)?,
        canonical: convs.iter().map(|m| table::canonical_json(m)).collect(),
        responses: responses.map(|(c, r)| -> (ArrayRef, ArrayRef) {
            (std::sync::Arc::new(StringArray::from(c)), std::sync::Arc::new(StringArray::from(r)))
        }),
    })
}

fn text(b: &RecordBatch, name: &str) -> Result<StringArray> {
    let a = cast(b.column_by_name(name).expect("checked at plan"), &DataType::Utf8)?;
    Ok(a.as_any().downcast_ref::<StringArray>().expect("utf8").clone())
}

/// Row `r` of a conversation column, every message checked.
fn messages<'a>(conv: &'a Conversations, r: usize, name: &str) -> Result<Vec<Message<'a>>, String> {
    if conv.is_null(r) {
        return Err(format!("`{name}` is null"));
    }
    let mut out = Vec::with_capacity(conv.range(r).len());
    for (k, i) in conv.range(r).enumerate() {
        let n = k + 1;
        let (role, content) = conv.raw(i);
        let role = role.ok_or_else(|| format!("`{name}` message {n} has no role"))?;
        if !ROLES.contains(&role) {
            return Err(format!("`{name}` message {n} has unknown role `{role}`; roles are {}", ROLES.join(", ")));
        }
        let content = content.ok_or_else(|| format!("`{name}` message {n} (`{role}`) has no content"))?;
        if content.trim().is_empty() {
            return Err(format!("`{name}` message {n} (`{role}`) has empty content"));
        }
        out.push(Message::new(role, content));
    }
    Ok(out)
}

/// `strip_trailing_assistant`, then `system_prompt`; the result must end with a user turn.
fn finish<'a>(m: &[Message<'a>], system: Option<&'a str>, strip: bool, name: &str) -> Result<Vec<Message<'a>>, String> {
    let mut m = m.to_vec();
    if strip && m.last().is_some_and(|l| l.role == "assistant") {
        m.pop();
    }
    match m.last() {
        None => {
            return Err(format!("`{name}` has no messages{}", if strip { " left after stripping the trailing assistant turn" } else { "" }))
        }
        Some(l) if l.role != "user" => {
            let hint = if l.role == "assistant" && !strip {
                " (`strip_trailing_assistant: true` drops a final assistant answer, as in UltraFeedback's `messages`)"
            } else {
                ""
            };
            return Err(format!("`{name}` ends with a `{}` turn; a prompt must end with a user turn{hint}", l.role));
        }
        Some(_) => {}
    }
    if let Some(s) = system {
        if !m.iter().any(|x| x.role == "system") {
            m.insert(0, Message::new("system", s));
        }
    }
    Ok(m)
}

/// TRL's `extract_prompt` (trl/data_utils.py) on one row: the prompt is the
/// longest common prefix of the two conversations' turns; each remainder
/// must be exactly one assistant turn (its text is the response).
fn implicit<'a>(chosen: &'a Conversations, rejected: &'a Conversations, r: usize) -> Result<(Vec<Message<'a>>, &'a str, &'a str), String> {
    let c = messages(chosen, r, "chosen")?;
    let j = messages(rejected, r, "rejected")?;
    let n = c.len().min(j.len());
    if n == 0 {
        return Err("`chosen` and `rejected` must both hold a conversation".into());
    }
    // Python's `for idx in range(n): if differ: break` leaves idx = n - 1 when nothing differs.
    let idx = (0..n).find(|&i| c[i] != j[i]).unwrap_or(n - 1);
    let (prompt, cr, rr) = (&c[..idx], &c[idx..], &j[idx..]);
    for (name, rest) in [("chosen", cr), ("rejected", rr)] {
        if rest.len() != 1 || rest[0].role != "assistant" {
            let roles: Vec<&str> = rest.iter().map(|m| m.role).collect();
            return Err(format!(
                "`{name}` must be the shared prompt plus one assistant turn; after the {idx} turn(s) it shares with the other (TRL's extract_prompt) it has [{}]",
                roles.join(", ")
            ));
        }
    }
    Ok((prompt.to_vec(), cr[0].content, rr[0].content))
}

#[cfg(test)]
mod tests {
    use super::*;
    use prefpipe_core::table::messages_array;

    fn conv(rows: &[&[(&str, &str)]]) -> Conversations {
        let m: Vec<Vec<Message>> = rows.iter().map(|r| r.iter().map(|(a, b)| Message::new(a, b)).collect()).collect();
        Conversations::new(&messages_array(&m).unwrap()).unwrap()
    }

    #[test]
    fn implicit_prompt_is_the_common_prefix() {
        // trl.data_utils.extract_prompt on the docstring example:
        // prompt [user: What color is the sky?], chosen [assistant: It is blue.], rejected [assistant: It is green.]
        let c = conv(&[&[("user", "What color is the sky?"), ("assistant", "It is blue.")]]);
        let j = conv(&[&[("user", "What color is the sky?"), ("assistant", "It is green.")]]);
        let (p, a, b) = implicit(&c, &j, 0).unwrap();
        assert_eq!(p, vec![Message::new("user", "What color is the sky?")]);
        assert_eq!((a, b), ("It is blue.", "It is green."));
    }

    #[test]
    fn implicit_prompt_with_history_and_identical_answers() {
        let h: [(&str, &str); 3] = [("system", "S"), ("user", "u1"), ("assistant", "a1")];
        let c = conv(&[&[h[0], h[1], h[2], ("user", "u2"), ("assistant", "same")]]);
        // Identical conversations: TRL's loop ends at idx = n - 1, so the last turn is the response.
        let (p, a, b) = implicit(&c, &c, 0).unwrap();
        assert_eq!(p.len(), 4);
        assert_eq!((a, b), ("same", "same"));
        // A rejected conversation that continues past chosen's answer is not a pair.
        let j = conv(&[&[h[0], h[1], h[2], ("user", "u2"), ("assistant", "same"), ("user", "u3"), ("assistant", "x")]]);
        let e = implicit(&c, &j, 0).unwrap_err();
        assert!(e.contains("`rejected` must be the shared prompt plus one assistant turn"), "{e}");
        assert!(e.contains("[assistant, user, assistant]"), "{e}");
    }

    #[test]
    fn finishing_strips_adds_system_and_checks_the_end() {
        let m = [Message::new("user", "q"), Message::new("assistant", "old answer")];
        let e = finish(&m, None, false, "messages").unwrap_err();
        assert!(e.contains("ends with a `assistant` turn") && e.contains("strip_trailing_assistant"), "{e}");
        let got = finish(&m, Some("Be brief."), true, "messages").unwrap();
        assert_eq!(got, vec![Message::new("system", "Be brief."), Message::new("user", "q")]);
        // A conversation that has a system turn keeps it; no second one is added.
        let m = [Message::new("system", "Mine."), Message::new("user", "q")];
        assert_eq!(finish(&m, Some("Be brief."), false, "messages").unwrap(), m.to_vec());
        let e = finish(&[Message::new("assistant", "a")], None, true, "messages").unwrap_err();
        assert!(e.contains("no messages left"), "{e}");
    }

    #[test]
    fn messages_are_checked_one_by_one() {
        let c = conv(&[&[("user", "q"), ("tool", "x")], &[("user", " ")]]);
        let e = messages(&c, 0, "messages").unwrap_err();
        assert_eq!(e, "`messages` message 2 has unknown role `tool`; roles are system, user, assistant");
        let e = messages(&c, 1, "messages").unwrap_err();
        assert_eq!(e, "`messages` message 1 (`user`) has empty content");
    }
}
