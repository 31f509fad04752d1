//! prefpipe-models: Hugging Face model directories, tokenizers, chat templates
//! and decoder-only LMs on candle (DESIGN §2 "Models", §4, §7 `ches`, §8).
//!
//! **Loading** ([`Model::load`]). A model directory holds `config.json`
//! (transformers 4.x `rope_theta`/`rope_scaling`/`torch_dtype` or 5.x
//! `rope_parameters`/`dtype`), `model.safetensors` or sharded
//! `model-*.safetensors` + `model.safetensors.index.json`, `tokenizer.json`, and
//! optionally `tokenizer_config.json` (special tokens, `chat_template`),
//! `chat_template.jinja` and `generation_config.json`. Pickle checkpoints are
//! refused with a hint to convert. A `.gguf` file (llama.cpp: `llama`, `qwen2`,
//! `qwen3` architectures, byte-level BPE tokenizers) loads for inference with
//! its weights dequantized to f32. Families: Llama (incl. Llama-3 RoPE
//! scaling), Mistral (sliding window), Qwen2, Qwen3, each as `*ForCausalLM`
//! or `*ForSequenceClassification` (reward, `score` head).
//!
//! **Computing.** One differentiable decoder ([`decoder::Decoder`], f32) serves
//! inference (`VarBuilder` over safetensors) and training
//! ([`Model::load_trainable`], a `VarMap`). Teacher-forced batches are
//! right-padded, generation left-pads prompts; per-token positions and masks
//! make batched results equal unbatched ones. Each generated sequence draws
//! from its own ChaCha20 stream seeded by its own `u64`, so samples do not
//! depend on batch composition, batch size or thread count.
//!
//! **Checked against transformers.** `tests/reference/models_golden.py` computes
//! token ids, log-probs, hidden-state sums, CHES, greedy generations and
//! rewards with transformers for the tiny models in `data-samples/models/`
//! ([`write_fixture`]); `tests/golden.rs` matches them within 1e-4 relative.

pub mod codec;
pub mod config;
pub mod decoder;
/// Moved to prefpipe-core (source files use it too); re-exported for callers of the old path.
pub use prefpipe_core::digest_cache;
pub mod error;
pub mod fixture;
mod fused;
pub mod generate;
mod gguf;
pub mod model;
pub mod tokenizer;
pub mod train;

pub use candle_core::{Device, DeviceLocation};
pub use codec::{Codec, Prompt};
pub use config::{Family, HeadKind, ModelConfig};
pub use error::{Error, Result};
pub use fixture::{write_fixture, write_reward_fixture};
pub use generate::{FinishReason, Generation, SamplingParams};
pub use model::{model_digest, Model};
pub use tokenizer::{ChatMessage, TextTokenizer};
