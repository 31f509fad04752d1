//! prefpipe-models: Hugging Face model directories, tokenizers, chat templates
//! and decoder-only LMs on candle (DESIGN §2 "Models", §4, §7 `ches`).
//!
//! A model directory holds `config.json` (transformers 4.x or 5.x),
//! `model.safetensors` or sharded `model-*.safetensors` +
//! `model.safetensors.index.json`, `tokenizer.json`, and optionally
//! `tokenizer_config.json` (special tokens, `chat_template`),
//! `chat_template.jinja` and `generation_config.json`. Pickle checkpoints are
//! refused. Families: Llama (incl. Llama-3 RoPE scaling), Mistral, Qwen2,
//! Qwen3, each as `*ForCausalLM` or `*ForSequenceClassification` (reward).
//!
//! Everything runs in f32 through one differentiable decoder
//! ([`decoder::Decoder`]) that serves inference and training alike.

pub mod ches;
pub mod config;
pub mod decoder;
pub mod error;
pub mod fixture;
pub mod generate;
mod gguf;
pub mod model;
pub mod tokenizer;
pub mod train;

pub use candle_core::Device;
pub use ches::ches;
pub use config::{Family, HeadKind, ModelConfig};
pub use error::{Error, Result};
pub use fixture::{write_fixture, write_reward_fixture};
pub use generate::{FinishReason, Generation, SamplingParams};
pub use model::{model_digest, Model};
pub use tokenizer::{ChatMessage, TextTokenizer};
