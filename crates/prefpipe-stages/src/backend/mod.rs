//! The model seam (DESIGN §11): stages ask a backend for what they need —
//! samples, reward-head scores, teacher-forced log-probs — and never know
//! whether the model runs in-process (candle, [`local`]) or on an
//! OpenAI-compatible server ([`openai`]). A new backend is one file that
//! implements [`Backend`] plus one arm in [`crate::model_ref::ModelRef`].
//!
//! Per-row problems come back as [`Row::Drop`] with a reason the stage
//! counts (`prompt_too_long`, `too_long`, `request_failed`, …); a failure of
//! the whole call is an `Err` (exit 1 at run time, 2 for bad input).

use arrow::array::Array;
use arrow::array::StringArray;
use arrow::record_batch::RecordBatch;
use prefpipe_core::stage::{ConfigError, RunCx};
use prefpipe_core::table::{self, col, str_col};
use prefpipe_core::Result;
use prefpipe_models::ChatMessage;
pub use prefpipe_models::Prompt;

pub mod local;
pub mod openai;

/// What a stage needs from a model; checked at plan time so a backend that
/// cannot do it is refused at the stage's `model:` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Uses {
    Generate,
    /// Reward-head scores (`*ForSequenceClassification`).
    Score,
    /// Teacher-forced log-probs.
    Logprob,
    /// Hidden states (CHES): in-process only.
    Hidden,
    /// Gradients (training): in-process only.
    Train,
}

impl Uses {
    pub fn what(self) -> &'static str {
        match self {
            Uses::Generate => "generation",
            Uses::Score => "reward scores",
            Uses::Logprob => "teacher-forced log-probs",
            Uses::Hidden => "hidden states",
            Uses::Train => "gradients",
        }
    }
}

/// One row's result, or why the row is dropped.
#[derive(Debug, Clone, PartialEq)]
pub enum Row<T> {
    Ok(T),
    Drop(&'static str),
}

/// One sample to draw: the prompt and the per-sample seed (DESIGN §2).
#[derive(Debug, Clone)]
pub struct GenJob<'a> {
    pub prompt_id: &'a str,
    pub sample_idx: u32,
    pub prompt: Prompt<'a>,
    pub seed: u64,
}

/// Sampling parameters, all of them sent to a server (DESIGN §11).
#[derive(Debug, Clone)]
pub struct GenParams {
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: usize,
    pub min_p: f64,
    pub max_new_tokens: usize,
    pub stop: Vec<String>,
    pub chat_template: bool,
    /// Sequences decoded together (local only).
    pub batch_size: usize,
    /// Constrained output (remote only): sent as the request's
    /// `response_format`, e.g. `{type: json_schema, json_schema: {...}}`.
    pub response_format: Option<serde_json::Value>,
}

/// A drawn response.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub text: String,
    pub n_tokens: u32,
    /// `stop` or `length`.
    pub finish_reason: String,
}

/// A (prompt, response) pair to score or teacher-force.
#[derive(Debug, Clone, Copy)]
pub struct Pair<'a> {
    pub prompt_id: &'a str,
    pub prompt: Prompt<'a>,
    pub response: &'a str,
}

/// The prompts of a batch as models read them: the `messages` conversations
/// when the table has them (DESIGN §15), else the `prompt` strings.
pub struct Prompts {
    text: StringArray,
    chats: Option<Vec<Vec<ChatMessage>>>,
    /// Rows whose prompt (or conversation) is null.
    null: Vec<bool>,
}

impl Prompts {
    pub fn of(batch: &RecordBatch) -> Result<Prompts> {
        let text = str_col(batch, col::PROMPT)?;
        let (chats, null) = if table::has_messages(&batch.schema()) {
            let conv = table::Conversations::of(batch, col::MESSAGES)?;
            let chats = (0..batch.num_rows())
                .map(|r| conv.row(r).iter().map(|m| ChatMessage { role: m.role.to_string(), content: m.content.to_string() }).collect())
                .collect();
            (Some(chats), (0..batch.num_rows()).map(|r| conv.is_null(r)).collect())
        } else {
            (None, (0..batch.num_rows()).map(|r| text.is_null(r)).collect())
        };
        Ok(Prompts { text, chats, null })
    }

    /// Whether row `r` has no prompt: a model must not read it as "" (such
    /// rows are dropped as `null_prompt`, or their scores left null).
    pub fn is_null(&self, r: usize) -> bool {
        self.null[r]
    }

    pub fn get(&self, r: usize) -> Prompt<'_> {
        match &self.chats {
            Some(c) => Prompt::Chat(&c[r]),
            None => Prompt::Text(if self.text.is_null(r) { "" } else { self.text.value(r) }),
        }
    }
}

/// Several responses to one prompt as TRL tokenises a preference example
/// (DESIGN §15): the prompt is the shortest of their prompt parts (the
/// common prefix k = the smallest), each response the rest of its sequence.
/// Without a chat template every prompt part is the same and nothing moves.
pub fn shared_prompt(encoded: Vec<(Vec<u32>, Vec<u32>)>) -> (Vec<u32>, Vec<Vec<u32>>) {
    let k = encoded.iter().map(|(p, _)| p.len()).min().unwrap_or(0);
    let prompt = encoded.first().map(|(p, _)| p[..k].to_vec()).unwrap_or_default();
    let responses = encoded.into_iter().map(|(p, r)| [&p[k..], r.as_slice()].concat()).collect();
    (prompt, responses)
}

/// A conversation needs the chat template wherever a model reads it (DESIGN §15).
pub fn check_chat(schema: &arrow::datatypes::Schema, input: &str, chat_template: bool, field: &str) -> Option<ConfigError> {
    (table::has_messages(schema) && !chat_template).then(|| {
        ConfigError::at(
            field,
            format!(
                "input `{input}` holds conversations (`messages`); a model reads them through its chat template: set `chat_template: true`"
            ),
        )
    })
}

/// How pairs are turned into tokens (DESIGN §4).
#[derive(Debug, Clone, Copy)]
pub struct PairOpts {
    pub chat_template: bool,
    pub batch_size: usize,
}

/// A model behind the seam. Calls are per chunk; `tag` tells apart several
/// calls in one chunk of one stage (e.g. policy and reference), which a
/// remote backend needs to keep its request logs apart.
pub trait Backend: Send + Sync {
    /// N samples, one per job, in job order.
    fn generate(&self, cx: &RunCx, tag: &str, jobs: &[GenJob], params: &GenParams) -> Result<Vec<Row<Sample>>>;

    /// The reward head's outputs (one per label) at the last token.
    fn scores(&self, cx: &RunCx, tag: &str, pairs: &[Pair], opts: PairOpts) -> Result<Vec<Row<Vec<f32>>>>;

    /// Summed log-prob of each response (DESIGN §4) and its token count.
    fn logprobs(&self, cx: &RunCx, tag: &str, pairs: &[Pair], opts: PairOpts) -> Result<Vec<Row<(f64, u32)>>>;

    /// For run.json: backend, server, served model, request counts (remote only).
    fn run_info(&self) -> Option<serde_json::Value> {
        None
    }
}

/// The per-request route of a prompt: every sample of one prompt goes to one
/// base URL (prefix caching).
pub fn route(prompt_id: &str) -> u64 {
    let h = blake3::hash(prompt_id.as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}
