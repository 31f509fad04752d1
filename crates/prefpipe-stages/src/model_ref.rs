//! Shared by the stages that run a model: plan-time checks that read no
//! weights into memory (config, tokenizer, digest), and the model's
//! [`Backend`] — in-process or a server — made on first use and kept for
//! the run.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use prefpipe_core::stage::{ConfigError, PlanCx, RunCx};
use prefpipe_core::{Error, Result};
use prefpipe_models::{Device, Model, ModelConfig, TextTokenizer};

use crate::backend::local::Local;
use crate::backend::openai::{refuses, Remote};
use crate::backend::{Backend, Uses};

/// A `model:` value of a stage: a name from `models:` or a path.
pub struct ModelRef {
    /// The YAML field it came from (for error positions).
    pub field: &'static str,
    pub value: String,
    local: OnceLock<Arc<Local>>,
    backend: OnceLock<Arc<dyn Backend>>,
    /// A server's request slots (max_concurrency × base URLs), known once planned.
    slots: OnceLock<usize>,
    /// The plan-time check's result: `plan` and `fingerprint` both ask, and
    /// the digest hashes every weight file (a GB for a real model).
    checked: OnceLock<Result<String, ConfigError>>,
}

impl ModelRef {
    pub fn new(field: &'static str, value: &str) -> Self {
        ModelRef {
            field,
            value: value.to_string(),
            local: OnceLock::new(),
            backend: OnceLock::new(),
            slots: OnceLock::new(),
            checked: OnceLock::new(),
        }
    }

    /// Checks that the model can serve `need` and returns its digest for the
    /// stage key: a local directory's (see [`ModelRef::check`]) or a server's
    /// identity (served name, revision, tokenizer files) — never a URL or key.
    pub fn check_for(&self, cx: &PlanCx, need: Uses) -> Result<String, ConfigError> {
        let Some(m) = cx.remote(&self.value) else { return self.check(cx) };
        if m.invalid {
            return Ok(String::new()); // its errors are reported at the entry
        }
        if let Some(why) = refuses(m, need) {
            return Err(ConfigError::at(self.field, why));
        }
        self.slots.get_or_init(|| m.spec.max_concurrency * m.spec.urls().len().max(1));
        let mut id = m.spec.identity();
        if let Some(dir) = &m.tokenizer {
            let at = |e: String| ConfigError::at(self.field, format!("model `{}`: tokenizer {}: {e}", m.name, dir.display()));
            prefpipe_models::Codec::load(dir).map_err(|e| at(e.to_string()))?;
            for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"] {
                let p = dir.join(f);
                if p.is_file() {
                    id.push(':');
                    id.push_str(&prefpipe_core::io::input_digest(&p).map_err(|e| at(e.to_string()))?);
                }
            }
        }
        Ok(id)
    }

    /// The model's backend, made on first use (a local model loads on its
    /// first call); records where it runs for run.json (`cx.device`).
    pub fn backend(&self, cx: &RunCx) -> Arc<dyn Backend> {
        (cx.device)(&match cx.remote(&self.value) {
            Some(_) => "remote".to_string(),
            None => device_label(&device()),
        });
        self.backend
            .get_or_init(|| match cx.remote(&self.value) {
                Some(m) => Arc::new(Remote::new(m.clone())),
                None => self.local(cx),
            })
            .clone()
    }

    /// A planned server's request slots; `None` for a local model.
    pub fn slots(&self) -> Option<usize> {
        self.slots.get().copied()
    }

    /// The backend if one was made (for run.json after the run).
    pub fn made(&self) -> Option<&Arc<dyn Backend>> {
        self.backend.get()
    }

    fn local(&self, cx: &RunCx) -> Arc<Local> {
        self.local.get_or_init(|| Arc::new(Local::new(self.dir(cx)))).clone()
    }

    /// Checks the directory without loading weights (config, tokenizer vs
    /// vocab size) and returns its digest for the stage key. A directory that
    /// an earlier stage writes (a `train` checkpoint) is not read: its digest
    /// is that stage's content key.
    pub fn check(&self, cx: &PlanCx) -> Result<String, ConfigError> {
        self.checked.get_or_init(|| self.check_uncached(cx)).clone()
    }

    fn check_uncached(&self, cx: &PlanCx) -> Result<String, ConfigError> {
        if cx.remote(&self.value).is_some() {
            return Err(ConfigError::at(self.field, format!("model `{}` is a server; this stage needs it in-process", self.value)));
        }
        let dir = cx.resolve_model(&self.value);
        // A checkpoint a `train` stage of this pipeline writes: nothing to read yet.
        if let Some(p) = cx.producer_of(&dir) {
            return match p.key {
                Some(key) => Ok(format!("stage:{}:{key}", p.stage)),
                None => Err(ConfigError::at(
                    self.field,
                    format!(
                        "{}: is written by stage `{}`, which must run first; list `{}` before this stage",
                        dir.display(),
                        p.stage,
                        p.stage
                    ),
                )),
            };
        }
        let at = |e: prefpipe_models::Error| ConfigError::at(self.field, e.to_string());
        // A GGUF file (inference only): the file is the whole model.
        if dir.is_file() && dir.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
            return prefpipe_models::model_digest(&dir).map_err(at);
        }
        if !dir.is_dir() {
            return Err(ConfigError::at(
                self.field,
                format!("{}: no such model directory (a Hugging Face directory with config.json, model.safetensors, tokenizer.json) or .gguf file", dir.display()),
            ));
        }
        let cfg = ModelConfig::from_file(&dir.join("config.json")).map_err(at)?;
        let tok = TextTokenizer::load(&dir).map_err(at)?;
        if tok.vocab_size() > cfg.vocab_size {
            return Err(ConfigError::at(
                self.field,
                format!(
                    "{}: the tokenizer has {} tokens but config.json says vocab_size {}; tokenizer and weights do not belong together",
                    dir.display(),
                    tok.vocab_size(),
                    cfg.vocab_size
                ),
            ));
        }
        prefpipe_models::model_digest(&dir).map_err(at)
    }

    pub fn dir(&self, cx: &RunCx) -> PathBuf {
        cx.resolve_model(&self.value)
    }

    /// The in-process model (stages that need it in-process: ches, train),
    /// loaded on first use and shared by every chunk of the run.
    pub fn get(&self, cx: &RunCx) -> Result<Arc<Model>> {
        if cx.remote(&self.value).is_some() {
            return Err(Error::Input(format!("model `{}` is a server; this stage needs it in-process", self.value)));
        }
        (cx.device)(&device_label(&device()));
        self.local(cx).model()
    }
}

/// The compute device: CUDA when built with `--features cuda` and a GPU is
/// there, else CPU (chosen once per process).
pub fn device() -> Device {
    static DEVICE: OnceLock<Device> = OnceLock::new();
    DEVICE
        .get_or_init(|| {
            #[cfg(feature = "cuda")]
            if let Ok(d) = Device::new_cuda(0) {
                return d;
            }
            Device::Cpu
        })
        .clone()
}

/// run.json's name for a device: `cpu`, `cuda:N`, `metal:N`.
pub fn device_label(d: &Device) -> String {
    match d.location() {
        prefpipe_models::DeviceLocation::Cpu => "cpu".to_string(),
        prefpipe_models::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        prefpipe_models::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Maps a model error to the engine's, keeping its class (DESIGN §2): bad
/// input (a model directory, config, prompt or argument that is wrong) exits
/// 2; a run-time failure (a tensor operation or device that failed, out of
/// memory, an I/O error, a diverged training run) exits 1.
pub fn model_err(e: prefpipe_models::Error) -> Error {
    if e.is_input() {
        Error::Input(e.to_string())
    } else {
        Error::Runtime(e.to_string())
    }
}

/// The per-sample seed: blake3(pipeline seed, stage id, prompt_id, sample_idx) → u64,
/// so draws do not depend on batch, chunk or thread count (DESIGN §2).
pub fn sample_seed(seed: u64, stage: &str, prompt_id: &str, sample_idx: u32) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.update(stage.as_bytes());
    h.update(&[0]);
    h.update(prompt_id.as_bytes());
    h.update(&[0]);
    h.update(&sample_idx.to_le_bytes());
    let b = h.finalize();
    u64::from_le_bytes(b.as_bytes()[..8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_errors_keep_their_class() {
        let input = prefpipe_models::Error::SequenceTooLong { index: 3, len: 600, max: 512 };
        assert_eq!(model_err(input).exit_code(), 2);
        let full =
            prefpipe_models::Error::Io { path: "out/model/model.safetensors".into(), source: std::io::ErrorKind::StorageFull.into() };
        assert_eq!(model_err(full).exit_code(), 1, "a full disk is a run-time failure");
        let diverged = prefpipe_models::Error::NonFinite { step: 2, what: "the gradient norm".into(), value: "NaN".into() };
        assert_eq!(model_err(diverged).in_stage("train").exit_code(), 1);
        let missing = prefpipe_models::Error::MissingFile { path: "m".into(), what: "config.json".into() };
        assert_eq!(model_err(missing).exit_code(), 2);
        assert_eq!(device_label(&Device::Cpu), "cpu");
    }
}
