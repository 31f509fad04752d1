//! The crate's one error type: every variant names what was being done, the
//! file or item involved, and (where it applies) what was expected and got.

use std::path::PathBuf;

/// Errors from loading, tokenizing, running or writing models.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file the model directory must contain is not there.
    #[error("{}: missing {what}", path.display())]
    MissingFile { path: PathBuf, what: String },

    /// The directory holds only a pickle checkpoint (`*.bin`, `*.pt`, `*.pth`).
    #[error(
        "{}: pickle checkpoints are not loaded (they can run arbitrary code); convert the model \
         to safetensors, e.g. in Python: `AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, \
         safe_serialization=True)`",
        path.display()
    )]
    PickleCheckpoint { path: PathBuf },

    /// `architectures` / `model_type` (or another config value) names something this crate does not run.
    #[error("{}: unsupported {what} `{got}`; supported: {supported}", path.display())]
    Unsupported { path: PathBuf, what: String, got: String, supported: String },

    /// A value in a config file is missing or out of range.
    #[error("{}: invalid `{field}`: expected {expected}, got {got}", path.display())]
    InvalidConfig { path: PathBuf, field: String, expected: String, got: String },

    /// The tokenizer produces ids the model's embedding has no row for.
    #[error(
        "{}: the tokenizer has {got} tokens but the model's vocab_size is {expected}; \
         tokenizer and weights do not belong together",
        path.display()
    )]
    VocabMismatch { path: PathBuf, expected: usize, got: usize },

    /// Reading a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A JSON file does not parse.
    #[error("{}: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// A weight file could not be read, or lacks a tensor / has a wrong shape.
    #[error("{}: {source}", path.display())]
    Weights {
        path: PathBuf,
        #[source]
        source: candle_core::Error,
    },

    /// The tokenizer failed to load, encode or decode.
    #[error("tokenizer ({what}): {msg}")]
    Tokenizer { what: String, msg: String },

    /// The model has no chat template but one was asked for.
    #[error(
        "{}: the model has no chat template (tokenizer_config.json `chat_template`, chat_template.jinja \
         or GGUF `tokenizer.chat_template`), but chat_template: true was asked for",
        path.display()
    )]
    NoChatTemplate { path: PathBuf },

    /// Rendering the chat template failed (including the template's own `raise_exception`).
    #[error("chat template: {msg}")]
    ChatTemplate { msg: String },

    /// A prompt leaves no room to generate within the model's context.
    #[error("prompt {index} has {len} tokens; the model's context is {max} tokens, so nothing can be generated")]
    PromptTooLong { index: usize, len: usize, max: usize },

    /// A prompt ⊕ response sequence is longer than the model's context.
    #[error("sequence {index} has {len} tokens, more than the model's context of {max}")]
    SequenceTooLong { index: usize, len: usize, max: usize },

    /// An argument is out of range (empty prompt, bad sampling parameter, ...).
    #[error("invalid {what}: expected {expected}, got {got}")]
    InvalidInput { what: String, expected: String, got: String },

    /// The operation needs the other kind of head (e.g. `logprobs` on a reward model).
    #[error("`{op}` needs a {needs} model, but {architecture} is a {has} model")]
    WrongHead { op: &'static str, needs: &'static str, has: &'static str, architecture: String },

    /// Training produced a non-finite loss, gradient norm or weight: the run
    /// diverged (a run-time failure, not bad input). Nothing of the step is saved.
    #[error("training step {step}: {what} is not finite ({value}); the step's result was not saved")]
    NonFinite { step: u64, what: String, value: String },

    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    /// Whether the error is the caller's input — a model directory, file,
    /// config, prompt or argument that is wrong (exit 2, DESIGN §2) — rather
    /// than a failure at run time (exit 1): a tensor operation or device that
    /// failed (out of memory, a CUDA error), an I/O error other than a missing,
    /// unreadable or truncated file, a diverged training run.
    pub fn is_input(&self) -> bool {
        use std::io::ErrorKind;
        match self {
            Error::Candle(_) | Error::NonFinite { .. } => false,
            Error::Weights { source, .. } => !device_failure(source),
            Error::Io { source, .. } => {
                matches!(
                    source.kind(),
                    ErrorKind::NotFound | ErrorKind::PermissionDenied | ErrorKind::InvalidData | ErrorKind::UnexpectedEof
                )
            }
            _ => true,
        }
    }
}

/// A candle error raised by the device rather than the data (CUDA / Metal:
/// out of memory, a failed kernel), seen through candle's context wrappers.
fn device_failure(e: &candle_core::Error) -> bool {
    match e {
        candle_core::Error::Cuda(_) | candle_core::Error::Metal(_) => true,
        candle_core::Error::WithBacktrace { inner, .. }
        | candle_core::Error::Context { inner, .. }
        | candle_core::Error::WithPath { inner, .. } => device_failure(inner),
        _ => false,
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `bail!`-style constructor for [`Error::InvalidInput`].
pub(crate) fn invalid_input(what: impl Into<String>, expected: impl Into<String>, got: impl ToString) -> Error {
    Error::InvalidInput { what: what.into(), expected: expected.into(), got: got.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DESIGN §2: bad input exits 2, a run-time failure 1 — the class decides.
    #[test]
    fn errors_keep_their_class() {
        let io = |kind| Error::Io { path: "m/model.safetensors".into(), source: std::io::Error::from(kind) };
        assert!(io(std::io::ErrorKind::NotFound).is_input());
        assert!(io(std::io::ErrorKind::UnexpectedEof).is_input());
        assert!(!io(std::io::ErrorKind::StorageFull).is_input(), "a full disk is not the user's input");
        assert!(invalid_input("top_p", "a number in (0, 1]", 2).is_input());
        assert!(Error::SequenceTooLong { index: 0, len: 9, max: 8 }.is_input());
        assert!(
            Error::Weights { path: "w".into(), source: candle_core::Error::CannotFindTensor { path: "lm_head.weight".into() } }.is_input()
        );
        let oom = || candle_core::Error::Cuda("CUDA_ERROR_OUT_OF_MEMORY".into());
        assert!(!Error::Candle(oom()).is_input());
        assert!(
            !Error::Weights { path: "w".into(), source: oom().context("loading weights") }.is_input(),
            "out of memory while loading weights"
        );
        assert!(!Error::NonFinite { step: 3, what: "the gradient norm".into(), value: "NaN".into() }.is_input());
    }
}
