//! Preference training on candle (DESIGN §8): DPO and its variants, ORPO, SimPO and LiPO-λ losses
//! ([`loss`]), AdamW with clipping and accumulation ([`optim`]), warmup +
//! constant/cosine schedules ([`schedule`]), LoRA ([`lora`]) and the
//! resumable training loop ([`trainer`]).

pub mod lora;
pub mod loss;
pub mod optim;
pub mod schedule;
pub mod trainer;

pub use lora::{LoraConfig, LORA_TARGETS};
pub use loss::DpoLoss;
pub use optim::AdamWConfig;
pub use schedule::{LrSchedule, Schedule};
pub use trainer::{cached_reference_logps, reference_logps, Example, Method, MetricsRow, TrainOptions, Trainer};
