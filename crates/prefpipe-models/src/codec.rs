//! DESIGN §4's text → token-id rules without the weights: what a remote
//! model's `tokenizer:` directory gives (exact ids for `/classify` and
//! teacher-forced log-probs on a server), and what [`crate::Model`] uses itself.

use std::path::Path;

use serde_json::Value;

use crate::config::{token_ids, ModelConfig};
use crate::error::{Error, Result};
use crate::tokenizer::{read_json_opt, ChatMessage, TextTokenizer};

/// A prompt as a model reads it: a plain string, or a conversation (DESIGN §15)
/// ending in a user turn. A string with `chat_template: true` is the one-turn
/// conversation `[user: prompt]`.
#[derive(Debug, Clone, Copy)]
pub enum Prompt<'a> {
    Text(&'a str),
    Chat(&'a [ChatMessage]),
}

impl<'a> Prompt<'a> {
    /// The conversation a chat template renders.
    pub fn messages(&self) -> Vec<ChatMessage> {
        match self {
            Prompt::Text(t) => vec![ChatMessage::user(*t)],
            Prompt::Chat(m) => m.to_vec(),
        }
    }
}

/// Prompt ids (DESIGN §4/§15): a plain prompt `encode(prompt, add_special_tokens=true)`;
/// with the chat template, the template over the messages with
/// `add_generation_prompt=true`, encoded without special tokens.
pub fn prompt_ids(tok: &TextTokenizer, prompt: Prompt, chat_template: bool) -> Result<Vec<u32>> {
    match (prompt, chat_template) {
        (Prompt::Text(t), false) => tok.encode(t, true),
        (p, _) => tok.encode(&tok.apply_chat_template(&p.messages(), true)?, false),
    }
}

/// (prompt ids, response ids) as TRL's DPO trainer builds them. Plain:
/// `encode(prompt, true)` and `encode(response, false) + [eos]`. With the chat
/// template (TRL 1.16 `DPOTrainer._prepare_dataset`, conversational): the
/// rendered prompt P and the rendered conversation + assistant turn F, k = their
/// common prefix length; (F[..k], F[k..]) — no EOS appended, the template's
/// end-of-turn tokens end the response.
pub fn pair_ids(
    tok: &TextTokenizer,
    eos: Option<u32>,
    prompt: Prompt,
    response: &str,
    chat_template: bool,
    dir: &Path,
) -> Result<(Vec<u32>, Vec<u32>)> {
    match (prompt, chat_template) {
        (Prompt::Text(t), false) => Ok((tok.encode(t, true)?, response_ids(tok, eos, response, dir)?)),
        (p, _) => {
            let p_ids = prompt_ids(tok, p, true)?;
            let full = full_ids(tok, p, response)?;
            let k = common_prefix(&p_ids, &full);
            Ok((full[..k].to_vec(), full[k..].to_vec()))
        }
    }
}

/// The template over messages + `[assistant: response]` (no generation
/// prompt), encoded without special tokens: TRL's full conversation and, with
/// a reward model's own template, what the RM model cards score.
pub fn full_ids(tok: &TextTokenizer, prompt: Prompt, response: &str) -> Result<Vec<u32>> {
    let mut m = prompt.messages();
    m.push(ChatMessage { role: "assistant".into(), content: response.into() });
    tok.encode(&tok.apply_chat_template(&m, false)?, false)
}

/// Number of leading ids `a` and `b` share (TRL's `common_prefix_length`).
pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// A reward model's input (DESIGN §4): with the chat template, its own
/// template over the whole conversation; else prompt ids ⊕ response ids ⊕ EOS.
pub fn reward_ids(
    tok: &TextTokenizer,
    eos: Option<u32>,
    prompt: Prompt,
    response: &str,
    chat_template: bool,
    dir: &Path,
) -> Result<Vec<u32>> {
    if chat_template {
        return full_ids(tok, prompt, response);
    }
    let (mut p, r) = pair_ids(tok, eos, prompt, response, false, dir)?;
    p.extend(r);
    Ok(p)
}

/// Plain response ids (DESIGN §4): `encode(response, add_special_tokens=false) + [eos_id]`.
pub fn response_ids(tok: &TextTokenizer, eos: Option<u32>, response: &str, dir: &Path) -> Result<Vec<u32>> {
    let mut r = tok.encode(response, false)?;
    r.push(eos.ok_or_else(|| no_eos(dir))?);
    Ok(r)
}

fn no_eos(dir: &Path) -> Error {
    Error::InvalidConfig {
        path: dir.join("tokenizer_config.json"),
        field: "eos_token".into(),
        expected: "an end-of-sequence token (or eos_token_id in config.json)".into(),
        got: "none".into(),
    }
}

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

    /// [`prompt_ids`] with this tokenizer.
    pub fn prompt(&self, prompt: Prompt, chat_template: bool) -> Result<Vec<u32>> {
        prompt_ids(&self.tokenizer, prompt, chat_template)
    }

    /// [`pair_ids`] with this tokenizer.
    pub fn pair(&self, prompt: Prompt, response: &str, chat_template: bool) -> Result<(Vec<u32>, Vec<u32>)> {
        pair_ids(&self.tokenizer, self.eos_id, prompt, response, chat_template, &self.dir)
    }

    /// [`reward_ids`] with this tokenizer.
    pub fn reward(&self, prompt: Prompt, response: &str, chat_template: bool) -> Result<Vec<u32>> {
        reward_ids(&self.tokenizer, self.eos_id, prompt, response, chat_template, &self.dir)
    }
}
