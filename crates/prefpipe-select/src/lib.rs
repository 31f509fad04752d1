//! Selection and filtering strategies from the preference-data literature,
//! exactly as DESIGN §7 defines them.
//!
//! A strategy is one file here plus one line in [`SELECT`] or [`FILTER`].
//! Each file holds the math as pure functions over one prompt's candidates
//! (tested on hand-computed vectors) and a thin adapter from Arrow batches.
//!
//! Conventions shared by every strategy (DESIGN §7):
//! - rows with a non-finite reward are dropped first (`non_finite_reward`, counted in rows);
//! - ties between candidates break toward the lowest `sample_idx`;
//! - rows with a null `prompt` or `response` are dropped first too
//!   (`null_prompt`, `null_response`, in rows), never read as "";
//! - a prompt with two rows of one `sample_idx` is bad input (exit 2);
//! - a pair is emitted only when `chosen_reward > rejected_reward`, otherwise
//!   the prompt is dropped as `tie`; and only when its chosen and rejected
//!   texts differ, otherwise it is dropped as `identical_responses`;
//! - prompts with fewer than two usable samples are dropped as `too_few_samples`;
//! - every comparison of scores treats −0.0 and +0.0 as equal ([`corpus::cmp_f64`]);
//! - an input column the output would overwrite (`chosen`, `margin`, …) is a
//!   plan error, not silently replaced.

use arrow::datatypes::{Schema, SchemaRef};

use arrow::record_batch::RecordBatch;
use prefpipe_core::stage::{ConfigError, Mode, Output};
use prefpipe_core::Result;

pub mod ches;
pub mod corpus;
pub mod groups;
pub mod pairs;

pub mod listwise;
pub mod margin;
pub mod max_min;
pub mod repeat_ranking;
pub mod reward_points;
pub mod small_margin;
pub mod tokens;

#[cfg(test)]
mod props;
#[cfg(test)]
mod testkit;

/// Why a prompt, pair or row was dropped; the names appear in `run.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// Fewer than two samples with a finite reward (counted in prompts).
    TooFewSamples,
    /// No pair with `chosen_reward > rejected_reward` (counted in prompts, or pairs for `all_points`).
    Tie,
    /// A non-finite reward (counted in rows).
    NonFiniteReward,
    /// Below a strategy's threshold (counted in prompts or pairs).
    BelowThreshold,
    /// A non-finite or null `logp_policy`/`logp_reference` (counted in rows).
    NonFiniteLogp,
    /// Outside a `band: [lo, hi]` (counted in pairs).
    OutsideBand,
    /// Among the highest scores a strategy drops, e.g. CHES (counted in pairs).
    AboveThreshold,
    /// Fewer ok judge rankings than `min_repeats` (counted in prompts).
    TooFewRankings,
    /// A null `response` (counted in rows): never read as "".
    NullResponse,
    /// A null `prompt` (counted in rows): never read as "".
    NullPrompt,
    /// The pair's chosen and rejected texts are the same, or every response
    /// of a list is (counted in prompts, or pairs for `all_points`).
    IdenticalResponses,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::TooFewSamples => "too_few_samples",
            DropReason::Tie => "tie",
            DropReason::NonFiniteReward => "non_finite_reward",
            DropReason::BelowThreshold => "below_threshold",
            DropReason::NonFiniteLogp => "non_finite_logp",
            DropReason::OutsideBand => "outside_band",
            DropReason::AboveThreshold => "above_threshold",
            DropReason::TooFewRankings => "too_few_rankings",
            DropReason::NullResponse => "null_response",
            DropReason::NullPrompt => "null_prompt",
            DropReason::IdenticalResponses => "identical_responses",
        }
    }
}

/// A configured strategy, run by the `select` or `filter` stage.
pub trait Strategy: Send + Sync {
    /// The typed config with defaults, for the stage's content key.
    fn config(&self) -> serde_json::Value;
    /// `PerPrompt` when each prompt is decided alone; `Whole` for corpus-level rules.
    fn mode(&self) -> Mode;
    /// Checks the input columns; returns the output schema. `inputs` are the
    /// stage's inputs in `input:` order (most strategies take exactly one;
    /// use [`one_input`]).
    fn plan(&self, inputs: &[Input]) -> Result<SchemaRef, Vec<ConfigError>>;
    /// Runs over all rows of one unit (a prompt-aligned chunk, or the whole
    /// input), one batch per input. `schema` is what `plan` returned, possibly
    /// with more columns at its end (the select stage's `carry:`): a strategy
    /// takes those by name from the chosen (or best) row, like its own carried
    /// columns ([`pairs::build`] does).
    fn run(&self, inputs: &[RecordBatch], schema: &SchemaRef) -> Result<Output>;
}

/// An input's id and schema, at plan time.
pub struct Input<'a> {
    pub id: &'a str,
    pub schema: &'a Schema,
}

/// The single input of a one-input strategy, or a config error.
pub fn one_input<'a>(name: &str, inputs: &'a [Input<'a>]) -> Result<&'a Input<'a>, Vec<ConfigError>> {
    match inputs {
        [one] => Ok(one),
        _ => Err(vec![ConfigError::at("input", format!("strategy `{name}` reads exactly one input; got {}", inputs.len()))]),
    }
}

/// Builds a strategy from its config.
pub type BuildStrategy = fn(&serde_json::Value) -> Result<Box<dyn Strategy>, Vec<ConfigError>>;

/// One registry line: a strategy name, what it is, how to build it.
pub struct StrategyKind {
    pub name: &'static str,
    /// The paper it follows, for `prefpipe` docs.
    pub about: &'static str,
    /// Builds from the stage config minus `strategy` (and the stage's own keys).
    pub build: BuildStrategy,
    pub schema: fn() -> schemars::Schema,
}

/// Strategies of the `select` stage (scored samples → pairs or lists).
pub const SELECT: &[StrategyKind] = &[max_min::KIND, reward_points::KIND, small_margin::KIND, repeat_ranking::KIND, listwise::KIND];

/// Strategies of the `filter` stage (pairs → fewer pairs).
pub const FILTER: &[StrategyKind] = &[margin::KIND];

/// Builds a typed strategy config with the shared error handling.
pub fn build_config<T: serde::de::DeserializeOwned>(v: &serde_json::Value) -> Result<T, Vec<ConfigError>> {
    prefpipe_core::stage::from_config(v)
}
