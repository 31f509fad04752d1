//! prefpipe-models: Hugging Face model directories, tokenizers, chat templates
//! and decoder-only LMs on candle.

pub mod config;
pub mod decoder;
pub mod error;

pub use config::{Family, HeadKind, ModelConfig};
pub use error::{Error, Result};
