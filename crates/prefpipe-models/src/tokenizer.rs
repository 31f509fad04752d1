//! `tokenizer.json` + `tokenizer_config.json` (special tokens, chat template)
//! and chat-template rendering with minijinja, configured like transformers'
//! `apply_chat_template` (`trim_blocks`, `lstrip_blocks`, `raise_exception`,
//! Python string methods).

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// One chat message, as chat templates read it (`message['role']`, `message['content']`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn user(content: impl Into<String>) -> Self {
        Self { role: "user".into(), content: content.into() }
    }
}

/// Special-token strings from `tokenizer_config.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
}

/// A compiled chat template.
struct ChatTemplate {
    env: minijinja::Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChatTemplate")
    }
}

impl ChatTemplate {
    fn new(source: String) -> std::result::Result<Self, minijinja::Error> {
        let mut env = minijinja::Environment::new();
        // transformers renders with trim_blocks and lstrip_blocks on.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat_template", source)?;
        Ok(Self { env })
    }

    fn render(&self, ctx: &minijinja::Value) -> std::result::Result<String, minijinja::Error> {
        self.env.get_template("chat_template")?.render(ctx)
    }
}

/// A model directory's tokenizer: `tokenizer.json`, special tokens and chat template.
#[derive(Debug)]
pub struct TextTokenizer {
    tokenizer: tokenizers::Tokenizer,
    /// The template compiled at load; a syntax error is reported when it is first used.
    chat: Option<std::result::Result<ChatTemplate, String>>,
    special: SpecialTokens,
    /// Where a chat template would come from, for the error when there is none.
    template_source: PathBuf,
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map(Some).map_err(|source| Error::Json { path: path.to_path_buf(), source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Io { path: path.to_path_buf(), source }),
    }
}

pub(crate) fn read_json_opt(path: &Path) -> Result<Option<Value>> {
    read_json(path)
}

/// A special token written as a string or as an AddedToken object `{"content": ...}`.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json` (required), `tokenizer_config.json` (optional) and
    /// the chat template (`chat_template.jinja`, then `tokenizer_config.json`'s
    /// `chat_template`, then `chat_template.json`).
    pub fn load(dir: &Path) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Err(Error::MissingFile { path: tok_path, what: "tokenizer.json (a Hugging Face fast tokenizer)".into() });
        }
        let mut tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| Error::Tokenizer { what: tok_path.display().to_string(), msg: e.to_string() })?;
        // Sequences are assembled here; the file's own truncation/padding would change ids.
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::Tokenizer { what: tok_path.display().to_string(), msg: e.to_string() })?
            .with_padding(None);

        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = read_json(&cfg_path)?.unwrap_or(Value::Null);
        let special = SpecialTokens {
            bos_token: token_string(cfg.get("bos_token")),
            eos_token: token_string(cfg.get("eos_token")),
            pad_token: token_string(cfg.get("pad_token")),
            unk_token: token_string(cfg.get("unk_token")),
        };

        let jinja_path = dir.join("chat_template.jinja");
        let source = if jinja_path.is_file() {
            Some(std::fs::read_to_string(&jinja_path).map_err(|source| Error::Io { path: jinja_path.clone(), source })?)
        } else {
            match cfg.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                // Older format: a list of named templates; the default one is used.
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .or_else(|| list.first())
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                    .map(str::to_string),
                _ => read_json(&dir.join("chat_template.json"))?
                    .and_then(|v| v.get("chat_template").and_then(Value::as_str).map(str::to_string)),
            }
        };
        let chat = source.map(|s| ChatTemplate::new(s).map_err(|e| format!("{e:#}")));
        Ok(Self { tokenizer, chat, special, template_source: dir.join("tokenizer_config.json") })
    }

    /// A tokenizer assembled elsewhere (e.g. from GGUF metadata); `source` names it in errors.
    pub(crate) fn from_parts(
        mut tokenizer: tokenizers::Tokenizer,
        chat_template: Option<String>,
        special: SpecialTokens,
        source: &Path,
    ) -> Self {
        tokenizer.with_padding(None);
        let chat = chat_template.map(|s| ChatTemplate::new(s).map_err(|e| format!("{e:#}")));
        Self { tokenizer, chat, special, template_source: source.to_path_buf() }
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.tokenizer
    }

    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// Number of token ids the tokenizer can produce (base vocabulary + added tokens).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// The id of `eos_token` from tokenizer_config.json, if any.
    pub fn eos_id(&self) -> Option<u32> {
        self.special.eos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// The id of `pad_token` from tokenizer_config.json, if any.
    pub fn pad_id(&self) -> Option<u32> {
        self.special.pad_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// Whether the model ships a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.chat.is_some()
    }

    /// `tokenizer(text, add_special_tokens=...)["input_ids"]`.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc =
            self.tokenizer.encode(text, add_special_tokens).map_err(|e| Error::Tokenizer { what: "encode".into(), msg: e.to_string() })?;
        Ok(enc.get_ids().to_vec())
    }

    /// `tokenizer.decode(ids, skip_special_tokens=...)`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.tokenizer.decode(ids, skip_special_tokens).map_err(|e| Error::Tokenizer { what: "decode".into(), msg: e.to_string() })
    }

    /// `tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`.
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let chat = match &self.chat {
            None => return Err(Error::NoChatTemplate { path: self.template_source.clone() }),
            Some(Err(msg)) => return Err(Error::ChatTemplate { msg: msg.clone() }),
            Some(Ok(chat)) => chat,
        };
        let mut ctx = serde_json::Map::new();
        ctx.insert("messages".into(), serde_json::to_value(messages).unwrap_or(Value::Null));
        ctx.insert("add_generation_prompt".into(), Value::Bool(add_generation_prompt));
        for (name, value) in [
            ("bos_token", &self.special.bos_token),
            ("eos_token", &self.special.eos_token),
            ("pad_token", &self.special.pad_token),
            ("unk_token", &self.special.unk_token),
        ] {
            if let Some(v) = value {
                ctx.insert(name.into(), Value::String(v.clone()));
            }
        }
        chat.render(&minijinja::Value::from_serialize(&ctx)).map_err(|e| Error::ChatTemplate { msg: format!("{e:#}") })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_template_behaves_like_transformers() {
        // trim_blocks/lstrip_blocks, Python's .strip(), loop variables, raise_exception.
        let t = ChatTemplate::new(
            "{% for m in messages %}\n  {% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('bad role: ' + m['role']) }}{% endif %}\n<{{ m['role'] }}>{{ m['content'].strip() }}{% if not loop.last %}|{% endif %}\n{% endfor %}\n{% if add_generation_prompt %}<assistant>{% endif %}"
                .into(),
        )
        .unwrap();
        let ctx =
            |msgs: Vec<ChatMessage>| minijinja::Value::from_serialize(serde_json::json!({"messages": msgs, "add_generation_prompt": true}));
        let out = t.render(&ctx(vec![ChatMessage::user("  hi "), ChatMessage { role: "assistant".into(), content: "yo".into() }])).unwrap();
        // Expected output from jinja2 3.1.6 ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).
        assert_eq!(out, "<user>hi|<assistant>yo<assistant>");
        let err = t.render(&ctx(vec![ChatMessage { role: "tool".into(), content: "x".into() }])).unwrap_err();
        assert!(format!("{err:#}").contains("bad role: tool"), "{err:#}");
    }

    #[test]
    fn missing_tokenizer_json_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = TextTokenizer::load(dir.path()).unwrap_err();
        assert!(matches!(err, Error::MissingFile { .. }));
        assert!(err.to_string().contains("tokenizer.json"), "{err}");
    }
}
