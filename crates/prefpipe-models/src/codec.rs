//! DESIGN §4's text → token-id rules without the weights: what a remote
//! model's `tokenizer:` directory gives (exact ids for `/classify` and
//! teacher-forced log-probs on a server), and what [`crate::Model`] uses itself.

use std::path::Path;

use serde_json::Value;

use crate::config::{token_ids, ModelConfig};
use crate::error::{Error, Result};
use crate::tokenizer::{read_json_opt, ChatMessage, TextTokenizer};

/// A tokenizer with its end-of-sequence id and context length.
#[derive(Debug)]
pub struct Codec {
    tokenizer: TextTokenizer,
    eos_id: Option<u32>,
    /// `max_position_embeddings` from config.json (None without one).
    max_len: Option<usize>,
    dir: std::path::PathBuf,
}

impl Codec {
    /// Reads `tokenizer.json`/`tokenizer_config.json` and, when present,
    /// `config.json` and `generation_config.json` of a Hugging Face directory
    /// (weights are not needed). EOS follows [`crate::Model`]: the tokenizer's
    /// `eos_token`, else generation_config's, else config.json's first id.
    pub fn load(dir: &Path) -> Result<Codec> {
        let tokenizer = TextTokenizer::load(dir)?;
        let cfg_path = dir.join("config.json");
        let cfg = if cfg_path.is_file() { Some(ModelConfig::from_file(&cfg_path)?) } else { None };
        let gen_path = dir.join("generation_config.json");
        let gen = read_json_opt(&gen_path)?.unwrap_or(Value::Null);
        let mut stop = token_ids(gen.get("eos_token_id"), "eos_token_id", &gen_path)?;
        if stop.is_empty() {
            stop = cfg.as_ref().map(|c| c.eos_token_ids.clone()).unwrap_or_default();
        }
        let eos_id = tokenizer.eos_id().or_else(|| stop.first().copied());
        Ok(Codec { tokenizer, eos_id, max_len: cfg.map(|c| c.max_position_embeddings), dir: dir.to_path_buf() })
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    pub fn max_len(&self) -> Option<usize> {
        self.max_len
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Prompt ids per DESIGN §4 (see [`crate::Model::encode_prompt`]).
    pub fn encode_prompt(&self, prompt: &str, chat_template: bool) -> Result<Vec<u32>> {
        if chat_template {
            let text = self.tokenizer.apply_chat_template(&[ChatMessage::user(prompt)], true)?;
            self.tokenizer.encode(&text, false)
        } else {
            self.tokenizer.encode(prompt, true)
        }
    }

    /// The prompt text a server renders itself: the chat template over one
    /// user turn (with the generation prompt), or the prompt as is.
    pub fn prompt_text(&self, prompt: &str, chat_template: bool) -> Result<String> {
        if chat_template {
            self.tokenizer.apply_chat_template(&[ChatMessage::user(prompt)], true)
        } else {
            Ok(prompt.to_string())
        }
    }

    /// Response ids per DESIGN §4: `encode(response, add_special_tokens=false) + [eos_id]`.
    pub fn encode_response(&self, response: &str) -> Result<Vec<u32>> {
        let eos = self.eos_id.ok_or_else(|| Error::InvalidConfig {
            path: self.dir.join("tokenizer_config.json"),
            field: "eos_token".into(),
            expected: "an end-of-sequence token (or eos_token_id in config.json)".into(),
            got: "none".into(),
        })?;
        let mut ids = self.tokenizer.encode(response, false)?;
        ids.push(eos);
        Ok(ids)
    }
}
