//! `judge`: an LLM judges each prompt's samples (DESIGN §12), in one of two modes.
//!
//! **Listwise** (default; the Mitsu protocol of "Are You Sure? Rank Them
//! Again", Devine 2024): the judge ranks all samples, repeatedly and in a fresh
//! order each time. The output is a rankings table (DESIGN §6) that
//! `repeat_ranking` reads as is. Per (prompt, repeat) the shown order and the
//! request seed derive from (seed, stage id, prompt_id, repeat) alone. Replies
//! are parsed by the exact rule of [`parse_ranking`]; a reply that does not
//! parse keeps its rows with `status` = the reason and a null `rank`.
//!
//! **Pairwise** ([`pairwise`]; MT-Bench's `pair-v2` with its swap control,
//! Zheng et al. 2023): every pair of a prompt's samples (at most `max_pairs`)
//! is judged in both orders; the samples table comes back with each sample's
//! win rate over the comparisons whose two verdicts agree, and every raw
//! verdict in `judge_verdicts`.
//!
//! In both modes nothing is guessed or dropped: failures are counted by reason
//! in `run.json` and kept in the output with the raw reply.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use arrow::array::{Array, ArrayRef, StringArray, UInt32Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use prefpipe_core::stage::{from_config, Arity, ConfigError, Mode, Output, PlanCx, RunCx, Stage, StageKind, Table};
use prefpipe_core::table::{self, col, str_col, u32_col, Need};
use prefpipe_core::{Error, Result};
use prefpipe_models::ChatMessage;
use serde::{Deserialize, Serialize};

use crate::backend::{GenJob, GenParams, Prompt, Row, Uses};
use crate::generate::overlap;
use crate::model_ref::{sample_seed, ModelRef};

pub mod pairwise;

/// Field metadata on `repeat`: the judge's `repeats`, so `repeat_ranking`
/// can check `min_repeats` at plan time.
pub const REPEATS_KEY: &str = "prefpipe.judge.repeats";

pub const KIND: StageKind = StageKind {
    name: "judge",
    about: "an LLM judges each prompt's samples (DESIGN §12): listwise, repeatedly and shuffled → a rankings table; pairwise, every pair in both orders → per-sample win rates",
    arity: Arity::One,
    build: |v| {
        let c: JudgeConfig = from_config(v)?;
        let mut errs = Vec::new();
        if c.repeats == 0 {
            errs.push(ConfigError::at("repeats", "`repeats` must be at least 1 (the paper uses 5)"));
        }
        if !(c.temperature.is_finite() && c.temperature >= 0.0) {
            errs.push(ConfigError::at("temperature", "`temperature` must be ≥ 0 (0 = greedy)"));
        }
        if c.max_tokens == 0 {
            errs.push(ConfigError::at("max_tokens", "`max_tokens` must be at least 1"));
        }
        if !(2..=26).contains(&c.max_candidates) {
            errs.push(ConfigError::at("max_candidates", "`max_candidates` must be in 2..=26 (responses are labelled A–Z)"));
        }
        if c.max_pairs == 0 {
            errs.push(ConfigError::at("max_pairs", "`max_pairs` must be at least 1 (the default 28 judges every pair of 8 samples)"));
        }
        // Each mode's own keys are refused in the other: written, they would silently do nothing.
        let written = |k: &str| v.get(k).is_some();
        match c.mode {
            JudgeMode::Pairwise => {
                for (k, why) in [
                    ("repeats", "every pair is judged once in each order instead"),
                    ("shuffle", "both orders of every pair are the position control"),
                    ("max_candidates", "cap the pairs per prompt with `max_pairs`"),
                ] {
                    if written(k) {
                        errs.push(ConfigError::at(k, format!("`{k}` is a `mode: listwise` key; with `mode: pairwise` {why} (DESIGN §12)")));
                    }
                }
            }
            JudgeMode::Listwise => {
                for (k, why) in [
                    ("max_pairs", "listwise shows at most `max_candidates` samples per ranking"),
                    ("as_reward", "listwise writes a rankings table, which `repeat_ranking` turns into pairs"),
                ] {
                    if written(k) {
                        errs.push(ConfigError::at(k, format!("`{k}` is a `mode: pairwise` key; {why} (DESIGN §12)")));
                    }
                }
            }
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        let model = ModelRef::new("model", &c.model);
        Ok(Box::new(Judge { c, model, stats: Mutex::new(Stats::default()), pair_stats: Mutex::new(pairwise::Stats::default()) }))
    },
    schema: || schemars::schema_for!(JudgeConfig),
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum JudgeMode {
    Listwise,
    Pairwise,
}

/// `kind: judge`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JudgeConfig {
    /// A name from `models:` or a model directory (local or a server).
    pub model: String,
    /// `listwise` (default): the judge ranks all samples, `repeats` times in
    /// shuffled orders → a rankings table. `pairwise`: every pair judged in both
    /// orders (MT-Bench) → the samples table with `judge_winrate`,
    /// `judge_comparisons`, `judge_inconsistent` and `judge_verdicts`.
    #[serde(default = "listwise")]
    pub mode: JudgeMode,
    /// Listwise: independent rankings per prompt.
    #[serde(default = "default_repeats")]
    pub repeats: u32,
    /// Listwise: a fresh order per (prompt, repeat), derived from the seed.
    #[serde(default = "yes")]
    pub shuffle: bool,
    #[serde(default)]
    pub temperature: f64,
    #[serde(default = "default_max_tokens")]
    pub max_tokens: usize,
    /// `default` (listwise: the Mitsu-style prompt; pairwise: MT-Bench's
    /// `pair-v2`) or a path to a minijinja template of the user message; it
    /// sees `prompt`, `messages`, `responses` (a list of `{label, text}` in the
    /// shown order; two in pairwise) and `labels`.
    #[serde(default = "default_template")]
    pub template: String,
    /// Ask for JSON via `response_format: json_schema` (vLLM, SGLang,
    /// llama-server): listwise `{"ranking": "..."}`, its pattern built from the
    /// labels shown; pairwise `{"verdict": "A"|"B"|"C"}`.
    #[serde(default)]
    pub structured: bool,
    /// Listwise: only the first `max_candidates` samples by sample_idx are
    /// shown; the rest are dropped as `over_max_candidates`.
    #[serde(default = "default_max_candidates")]
    pub max_candidates: usize,
    /// Pairwise: at most this many pairs per prompt (each judged in both
    /// orders); beyond it, a balanced set drawn from the seed (DESIGN §12).
    #[serde(default = "default_max_pairs")]
    pub max_pairs: usize,
    /// Pairwise: also write `reward` = `judge_winrate` (replacing an input
    /// `reward`), so pair strategies select by the judge.
    #[serde(default)]
    pub as_reward: bool,
    /// Overrides the pipeline seed for this stage.
    #[serde(default)]
    pub seed: Option<u64>,
}

fn listwise() -> JudgeMode {
    JudgeMode::Listwise
}
fn default_repeats() -> u32 {
    5
}
fn yes() -> bool {
    true
}
fn default_max_tokens() -> usize {
    1024
}
fn default_template() -> String {
    "default".into()
}
fn default_max_candidates() -> usize {
    8
}
fn default_max_pairs() -> usize {
    28
}

/// The Mitsu-style system prompt (WIRE §2).
pub const SYSTEM: &str = "You are an evaluator AI. Your task is to rank multiple responses to a given prompt from best to worst. \
Judge each response on its relevance, truthfulness, accuracy, creativity or factuality as the prompt needs, natural and fluent language, and detail. \
You should first write a very brief (<40 words per response) explanation of the merits of each response, then rank them. \
The ranking should be a list of the responses' letters, with '>' denoting the left item is ranked higher than the right item \
and '=' denoting that the items are of equal ranking (e.g. 'Z>Y>X=W>V>U=T'). Every response must appear exactly once.\n\
Reply in this format:\n<<<EXPLANATION>>>\n(your explanation)\n\n<<<RANKING>>>\n(your ranking)";

/// The system prompt with `structured: true`.
pub const SYSTEM_JSON: &str = "You are an evaluator AI. Your task is to rank multiple responses to a given prompt from best to worst, \
judging relevance, truthfulness, accuracy, fluency and detail. Reply with a JSON object {\"ranking\": \"...\"} where the ranking is \
the responses' letters with '>' meaning the left item is better and '=' meaning equal (e.g. \"B>A=C\"). Every response must appear exactly once.";

/// The label of position i: A, B, C, …
pub fn label(i: usize) -> String {
    ((b'A' + i as u8) as char).to_string()
}

/// The default user message: `<<<PROMPT>>>\n{prompt}\n\n<<<RESPONSE A>>>\n{..}\n\n…`.
pub fn default_user(prompt: &str, responses: &[&str]) -> String {
    let mut s = format!("<<<PROMPT>>>\n{prompt}");
    for (i, r) in responses.iter().enumerate() {
        s.push_str(&format!("\n\n<<<RESPONSE {}>>>\n{r}", label(i)));
    }
    s
}

/// Why a reply gave no ranking (DESIGN §12), in order of precedence after `no_ranking`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ParseError {
    NoRanking,
    UnknownLabel,
    RepeatedLabel,
    MissingLabel,
}

impl ParseError {
    pub fn as_str(self) -> &'static str {
        match self {
            ParseError::NoRanking => "no_ranking",
            ParseError::UnknownLabel => "unknown_label",
            ParseError::RepeatedLabel => "repeated_label",
            ParseError::MissingLabel => "missing_label",
        }
    }
}

/// The marker the ranking follows.
pub const MARKER: &str = "<<<RANKING>>>";

/// DESIGN §12: the text after the last `<<<RANKING>>>`, its first non-blank
/// line, without spaces, tabs and backticks; split on `>` into levels and each
/// level on `=`. Every one of the `n` shown labels must appear exactly once.
/// Returns the competition rank (1 = best, ties share the lowest) of each
/// shown position.
pub fn parse_ranking(reply: &str, n: usize) -> Result<Vec<u32>, ParseError> {
    let Some(at) = reply.rfind(MARKER) else { return Err(ParseError::NoRanking) };
    let rest = &reply[at + MARKER.len()..];
    let Some(line) = rest.lines().find(|l| !l.trim().is_empty()) else { return Err(ParseError::NoRanking) };
    parse_levels(line, n)
}

/// The level rule on one line (also the `structured: true` reply's `ranking`).
pub fn parse_levels(line: &str, n: usize) -> Result<Vec<u32>, ParseError> {
    let line: String = line.chars().filter(|c| !matches!(c, ' ' | '\t' | '`')).collect();
    if line.is_empty() {
        return Err(ParseError::NoRanking);
    }
    let mut rank: Vec<Option<u32>> = vec![None; n];
    let (mut unknown, mut repeated) = (false, false);
    let mut placed = 0u32;
    for level in line.split('>') {
        let start = placed + 1;
        for l in level.split('=') {
            let mut ch = l.chars();
            let i = match (ch.next(), ch.next()) {
                (Some(c), None) if c.is_ascii_uppercase() && ((c as u8 - b'A') as usize) < n => (c as u8 - b'A') as usize,
                _ => {
                    unknown = true;
                    continue;
                }
            };
            if rank[i].is_some() {
                repeated = true;
                continue;
            }
            rank[i] = Some(start);
            placed += 1;
        }
    }
    if unknown {
        return Err(ParseError::UnknownLabel);
    }
    if repeated {
        return Err(ParseError::RepeatedLabel);
    }
    rank.into_iter().map(|r| r.ok_or(ParseError::MissingLabel)).collect()
}

/// A `structured: true` reply: JSON `{"ranking": "..."}`, then the level rule.
pub fn parse_structured(reply: &str, n: usize) -> Result<Vec<u32>, ParseError> {
    let v: serde_json::Value = serde_json::from_str(reply.trim()).map_err(|_| ParseError::NoRanking)?;
    let Some(r) = v.get("ranking").and_then(|r| r.as_str()) else { return Err(ParseError::NoRanking) };
    parse_levels(r, n)
}

/// The pattern of a ranking over `n` labels: for n ≤ 5 it admits exactly the
/// rankings where every label appears once (an alternation of the n!
/// orders, `>` or `=` between); beyond, any n labels from the shown ones
/// (repeats are then caught by the parse rule as `repeated_label`).
pub fn ranking_pattern(n: usize) -> String {
    if n <= 5 {
        fn perms(rest: &mut Vec<usize>, cur: &mut Vec<usize>, out: &mut Vec<String>) {
            if rest.is_empty() {
                out.push(cur.iter().map(|&i| label(i)).collect::<Vec<_>>().join("[>=]"));
                return;
            }
            for k in 0..rest.len() {
                let x = rest.remove(k);
                cur.push(x);
                perms(rest, cur, out);
                cur.pop();
                rest.insert(k, x);
            }
        }
        let mut out = Vec::new();
        perms(&mut (0..n).collect(), &mut Vec::new(), &mut out);
        return format!("^({})$", out.join("|"));
    }
    let class = format!("[A-{}]", label(n - 1));
    format!("^{class}([>=]{class}){{{}}}$", n - 1)
}

/// The `response_format` of `structured: true` for `n` shown labels.
pub fn response_format(n: usize) -> serde_json::Value {
    serde_json::json!({
        "type": "json_schema",
        "json_schema": {
            "name": "ranking",
            "strict": true,
            "schema": {
                "type": "object",
                "properties": {"ranking": {"type": "string", "pattern": ranking_pattern(n)}},
                "required": ["ranking"],
                "additionalProperties": false,
            },
        },
    })
}

/// A permutation of 0..n from a seed (Fisher–Yates over splitmix64).
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        p.swap(i, j);
    }
    p
}

/// What run.json reports (counted over the chunks this run judged).
#[derive(Debug, Default, Clone)]
struct Stats {
    rankings: u64,
    ok: u64,
    failures: BTreeMap<String, u64>,
    /// Ok rankings whose first-shown response was ranked 1 (alone or tied), and the chance of that.
    first_won: u64,
    first_chance: f64,
    /// Pairs in ok rankings with different ranks and lengths: the longer won.
    longer_pairs: u64,
    longer_won: u64,
}

struct Judge {
    c: JudgeConfig,
    model: ModelRef,
    /// Listwise figures for run.json.
    stats: Mutex<Stats>,
    /// Pairwise figures for run.json.
    pair_stats: Mutex<pairwise::Stats>,
}

/// A user-message template.
enum Template {
    Default,
    Jinja(String),
}

impl Judge {
    fn template(&self, cx_resolve: impl Fn(&str) -> std::path::PathBuf) -> Result<Template, ConfigError> {
        if self.c.template == "default" {
            return Ok(Template::Default);
        }
        let p = cx_resolve(&self.c.template);
        let src = std::fs::read_to_string(&p).map_err(|e| ConfigError::at("template", format!("{}: {e}", p.display())))?;
        let t = Template::Jinja(src);
        // Every response must reach the judge: render with sentinels (as many as a
        // pairwise request shows, or three for listwise) and look for them.
        let shown = if self.c.mode == JudgeMode::Pairwise { 2 } else { 3 };
        let sentinels: Vec<String> = (0..shown).map(|i| format!("@@response-{i}-sentinel@@")).collect();
        let refs: Vec<&str> = sentinels.iter().map(String::as_str).collect();
        let out =
            render(&t, self.c.mode, "@@prompt@@", None, &refs).map_err(|e| ConfigError::at("template", format!("{}: {e}", p.display())))?;
        if let Some(s) = sentinels.iter().find(|s| !out.contains(s.as_str())) {
            return Err(ConfigError::at(
                "template",
                format!(
                    "{}: the template does not render every response (`{s}` was missing from its output); loop over `responses` and write each `text`",
                    p.display()
                ),
            ));
        }
        if !out.contains("@@prompt@@") {
            return Err(ConfigError::at("template", format!("{}: the template does not render `prompt`", p.display())));
        }
        Ok(t)
    }

    fn params(&self, n: usize) -> GenParams {
        GenParams {
            temperature: self.c.temperature,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            max_new_tokens: self.c.max_tokens,
            stop: Vec::new(),
            chat_template: true,
            batch_size: 8,
            response_format: self.c.structured.then(|| response_format(n)),
        }
    }
}

fn render(t: &Template, mode: JudgeMode, prompt: &str, messages: Option<&[ChatMessage]>, responses: &[&str]) -> Result<String, String> {
    match t {
        Template::Default if mode == JudgeMode::Pairwise => Ok(pairwise::default_user(prompt, responses[0], responses[1])),
        Template::Default => Ok(default_user(prompt, responses)),
        Template::Jinja(src) => {
            let mut env = minijinja::Environment::new();
            env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
            env.add_template("judge", src).map_err(|e| e.to_string())?;
            let rs: Vec<serde_json::Value> =
                responses.iter().enumerate().map(|(i, r)| serde_json::json!({"label": label(i), "text": r})).collect();
            let labels: Vec<String> = (0..responses.len()).map(label).collect();
            let msgs: Vec<serde_json::Value> = match messages {
                Some(m) => m.iter().map(|m| serde_json::json!({"role": m.role, "content": m.content})).collect(),
                None => vec![serde_json::json!({"role": "user", "content": prompt})],
            };
            env.get_template("judge")
                .and_then(|t| t.render(minijinja::context! { prompt => prompt, messages => msgs, responses => rs, labels => labels }))
                .map_err(|e| e.to_string())
        }
    }
}

fn s(a: &StringArray, r: usize) -> &str {
    if a.is_null(r) {
        ""
    } else {
        a.value(r)
    }
}

/// The output schema: rankings + `position`, `status`, `judgment`, `prompt`, `response`.
pub fn output_schema(repeats: u32) -> SchemaRef {
    let repeat =
        Field::new("repeat", DataType::UInt32, false).with_metadata(HashMap::from([(REPEATS_KEY.to_string(), repeats.to_string())]));
    Arc::new(Schema::new(vec![
        Field::new(col::PROMPT_ID, DataType::Utf8, false),
        Field::new(col::SAMPLE_IDX, DataType::UInt32, false),
        repeat,
        Field::new("rank", DataType::UInt32, true),
        Field::new("position", DataType::UInt32, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("judgment", DataType::Utf8, true),
        Field::new(col::PROMPT, DataType::Utf8, false),
        Field::new(col::RESPONSE, DataType::Utf8, false),
    ]))
}

impl Stage for Judge {
    fn mode(&self) -> Mode {
        Mode::PerPrompt
    }

    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.c).expect("serializes")
    }

    fn plan(&self, cx: &PlanCx, inputs: &[SchemaRef]) -> Result<SchemaRef, Vec<ConfigError>> {
        let s = &inputs[0];
        let mut errs = Vec::new();
        for (c, need) in
            [(col::PROMPT_ID, Need::Text), (col::PROMPT, Need::Text), (col::SAMPLE_IDX, Need::Integer), (col::RESPONSE, Need::Text)]
        {
            if let Err(e) = table::require(s, &cx.input_ids[0], c, need) {
                errs.push(ConfigError::at("input", e.message));
            }
        }
        if let Err(e) = self.model.check_for(cx, Uses::Generate) {
            errs.push(e);
        }
        if self.c.structured && cx.remote(&self.model.value).is_none() {
            errs.push(ConfigError::at(
                "structured",
                format!(
                    "model `{}` runs in-process, which cannot constrain decoding to a JSON schema; `structured: true` needs a server (vLLM, SGLang, llama-server)",
                    self.model.value
                ),
            ));
        }
        if let Err(e) = self.template(|p| cx.resolve(p)) {
            errs.push(e);
        }
        if self.c.mode == JudgeMode::Pairwise {
            for name in pairwise::COLUMNS {
                if s.field_with_name(name).is_ok() {
                    errs.push(ConfigError::at(
                        "mode",
                        format!("input `{}` already has a `{name}` column, which `mode: pairwise` writes; drop or rename it first, e.g. with an `sql` stage", cx.input_ids[0]),
                    ));
                }
            }
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(match self.c.mode {
            JudgeMode::Listwise => output_schema(self.c.repeats),
            JudgeMode::Pairwise => pairwise::output_schema(s, self.c.as_reward),
        })
    }

    fn fingerprint(&self, cx: &PlanCx) -> Result<Vec<u8>, ConfigError> {
        let mut id = self.model.check_for(cx, Uses::Generate)?;
        // The built-in prompts are part of the key: rewording them re-judges.
        id.push_str(":prompts:");
        let prompts = match self.c.mode {
            JudgeMode::Listwise => format!("{SYSTEM}\0{SYSTEM_JSON}"),
            JudgeMode::Pairwise => pairwise::prompts_identity(),
        };
        id.push_str(blake3::hash(prompts.as_bytes()).to_hex().as_str());
        if let Template::Jinja(src) = self.template(|p| cx.resolve(p))? {
            id.push_str(":template:");
            id.push_str(blake3::hash(src.as_bytes()).to_hex().as_str());
        }
        Ok(id.into_bytes())
    }

    fn chunk_concurrency(&self, chunk_size: usize) -> usize {
        let per_prompt = match self.c.mode {
            JudgeMode::Listwise => self.c.repeats as usize,
            // Two requests per pair; a typical prompt has 4 samples (6 pairs).
            JudgeMode::Pairwise => 2 * self.c.max_pairs.min(6),
        };
        self.model.slots().map_or(1, |slots| overlap(slots, chunk_size * per_prompt))
    }

    fn run_info(&self) -> Option<serde_json::Value> {
        let st = self.stats.lock().expect("stats").clone();
        let rate = |a: u64, b: u64| if b == 0 { serde_json::Value::Null } else { serde_json::json!(a as f64 / b as f64) };
        let judge = if self.c.mode == JudgeMode::Pairwise {
            self.pair_stats.lock().expect("stats").to_json()
        } else {
            serde_json::json!({
            "mode": "listwise",
            "rankings": st.rankings,
            "ok": st.ok,
            "parse_failures": st.failures,
            "first_shown_win_rate": rate(st.first_won, st.ok),
            "first_shown_win_chance": if st.ok == 0 { serde_json::Value::Null } else { serde_json::json!(st.first_chance / st.ok as f64) },
            "longer_response_win_rate": rate(st.longer_won, st.longer_pairs),
            "longer_response_pairs": st.longer_pairs,
            })
        };
        let mut v = self.model.made().and_then(|b| b.run_info()).unwrap_or_else(|| serde_json::json!({}));
        if let Some(o) = v.as_object_mut() {
            o.insert("judge".into(), judge);
        }
        Some(v)
    }

    fn run(&self, cx: &RunCx, inputs: &[Table]) -> Result<Output> {
        match self.c.mode {
            JudgeMode::Listwise => self.run_listwise(cx, inputs),
            JudgeMode::Pairwise => self.run_pairwise(cx, inputs),
        }
    }
}

/// A chunk's prompts in first-seen order, each with its input rows sorted by
/// sample_idx; a sample_idx twice in one prompt is bad input.
fn group_by_prompt<'a>(ids: &'a StringArray, idx: &UInt32Array) -> Result<(Vec<&'a str>, Vec<Vec<usize>>)> {
    let mut order: Vec<&str> = Vec::new();
    let mut rows: HashMap<&str, Vec<usize>> = HashMap::new();
    for r in 0..ids.len() {
        let id = s(ids, r);
        rows.entry(id).or_insert_with(|| {
            order.push(id);
            Vec::new()
        });
        rows.get_mut(id).expect("inserted").push(r);
    }
    let mut groups: Vec<Vec<usize>> = Vec::with_capacity(order.len());
    for id in &order {
        let mut g = rows.remove(id).expect("grouped");
        g.sort_by_key(|&r| idx.value(r));
        for w in g.windows(2) {
            if idx.value(w[0]) == idx.value(w[1]) {
                return Err(Error::Input(format!("input: prompt `{id}` has sample_idx {} more than once", idx.value(w[0]))));
            }
        }
        groups.push(g);
    }
    Ok((order, groups))
}

impl Judge {
    fn run_listwise(&self, cx: &RunCx, inputs: &[Table]) -> Result<Output> {
        let input = inputs[0].read_one()?;
        let template = self.template(|p| cx.resolve(p)).map_err(|e| Error::Input(e.message))?;
        let ids = str_col(&input, col::PROMPT_ID)?;
        let prompts = str_col(&input, col::PROMPT)?;
        let idx = u32_col(&input, col::SAMPLE_IDX)?;
        let texts = str_col(&input, col::RESPONSE)?;
        let chats = if table::has_messages(&input.schema()) { Some(crate::backend::Prompts::of(&input)?) } else { None };
        let seed = self.c.seed.unwrap_or(cx.seed);
        let mut out = Output::default();

        struct Shown {
            prompt: usize,
            repeat: u32,
            /// Input rows in the shown order.
            rows: Vec<usize>,
        }
        let (order, mut groups) = group_by_prompt(&ids, &idx)?;
        for g in &mut groups {
            if g.len() > self.c.max_candidates {
                out.drop("over_max_candidates", (g.len() - self.c.max_candidates) as u64);
                g.truncate(self.c.max_candidates);
            }
        }
        let mut shown: Vec<Shown> = Vec::new();
        let mut job_ids: Vec<String> = Vec::new();
        let mut users: Vec<Vec<ChatMessage>> = Vec::new();
        for (p, g) in groups.iter().enumerate() {
            for k in 0..self.c.repeats {
                let rs = sample_seed(seed, cx.stage_id, order[p], k);
                let perm = if self.c.shuffle { permutation(g.len(), rs ^ 0x5348_5546_464c_4521) } else { (0..g.len()).collect() };
                let rows: Vec<usize> = perm.iter().map(|&i| g[i]).collect();
                let resp: Vec<&str> = rows.iter().map(|&r| s(&texts, r)).collect();
                let msgs = chats.as_ref().map(|c| match c.get(g[0]) {
                    Prompt::Chat(m) => m.to_vec(),
                    Prompt::Text(_) => Vec::new(),
                });
                let user = render(&template, JudgeMode::Listwise, s(&prompts, g[0]), msgs.as_deref(), &resp)
                    .map_err(|e| Error::Input(format!("template {}: {e}", self.c.template)))?;
                let system = if self.c.structured { SYSTEM_JSON } else { SYSTEM };
                users.push(vec![
                    ChatMessage { role: "system".into(), content: system.into() },
                    ChatMessage { role: "user".into(), content: user },
                ]);
                // Unique per (prompt, repeat): a local backend shares prompt ids between consecutive jobs of one prompt_id.
                job_ids.push(format!("{}\u{1f}{k}", order[p]));
                shown.push(Shown { prompt: p, repeat: k, rows });
            }
        }
        // Jobs grouped by the number of labels shown (the JSON schema depends on it).
        let mut replies: Vec<Option<Row<String>>> = vec![None; shown.len()];
        let mut by_n: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (j, sh) in shown.iter().enumerate() {
            by_n.entry(sh.rows.len()).or_default().push(j);
        }
        let backend = self.model.backend(cx);
        for (n, js) in by_n {
            let jobs: Vec<GenJob> = js
                .iter()
                .map(|&j| GenJob {
                    prompt_id: &job_ids[j],
                    sample_idx: shown[j].repeat,
                    prompt: Prompt::Chat(&users[j]),
                    seed: sample_seed(seed, cx.stage_id, order[shown[j].prompt], shown[j].repeat),
                })
                .collect();
            let res = backend.generate(cx, &format!("judge{n}"), &jobs, &self.params(n))?;
            for (&j, r) in js.iter().zip(res) {
                replies[j] = Some(match r {
                    Row::Ok(s) => Row::Ok(s.text),
                    Row::Drop(d) => Row::Drop(d),
                });
            }
        }

        let (mut o_id, mut o_idx, mut o_rep, mut o_rank, mut o_pos, mut o_status, mut o_judg, mut o_prompt, mut o_resp) =
            (vec![], vec![], vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
        let mut st = Stats::default();
        for (sh, reply) in shown.iter().zip(replies) {
            let n = sh.rows.len();
            let (status, ranks, judgment): (String, Option<Vec<u32>>, Option<String>) = match reply.expect("every job answered") {
                Row::Ok(text) => {
                    let parsed = if self.c.structured { parse_structured(&text, n) } else { parse_ranking(&text, n) };
                    match parsed {
                        Ok(r) => ("ok".into(), Some(r), Some(text)),
                        Err(e) => (e.as_str().into(), None, Some(text)),
                    }
                }
                Row::Drop(d) => (d.to_string(), None, None),
            };
            st.rankings += 1;
            match &ranks {
                Some(r) => {
                    st.ok += 1;
                    let top = r.iter().filter(|&&x| x == 1).count();
                    st.first_won += (r[0] == 1) as u64;
                    st.first_chance += top as f64 / n as f64;
                    for a in 0..n {
                        for b in a + 1..n {
                            let (la, lb) = (s(&texts, sh.rows[a]).chars().count(), s(&texts, sh.rows[b]).chars().count());
                            if la != lb && r[a] != r[b] {
                                st.longer_pairs += 1;
                                st.longer_won += ((la > lb) == (r[a] < r[b])) as u64;
                            }
                        }
                    }
                }
                None => *st.failures.entry(status.clone()).or_default() += 1,
            }
            for (pos, &row) in sh.rows.iter().enumerate() {
                o_id.push(order[sh.prompt].to_string());
                o_idx.push(idx.value(row));
                o_rep.push(sh.repeat);
                o_rank.push(ranks.as_ref().map(|r| r[pos]));
                o_pos.push(pos as u32);
                o_status.push(status.clone());
                o_judg.push(judgment.clone());
                o_prompt.push(s(&prompts, row).to_string());
                o_resp.push(s(&texts, row).to_string());
            }
        }
        {
            let mut all = self.stats.lock().expect("stats");
            all.rankings += st.rankings;
            all.ok += st.ok;
            for (k, v) in st.failures {
                *all.failures.entry(k).or_default() += v;
            }
            all.first_won += st.first_won;
            all.first_chance += st.first_chance;
            all.longer_pairs += st.longer_pairs;
            all.longer_won += st.longer_won;
        }
        // Rows in (prompt, sample_idx, repeat) order.
        let mut perm: Vec<usize> = (0..o_id.len()).collect();
        perm.sort_by(|&a, &b| (&o_id[a], o_idx[a], o_rep[a]).cmp(&(&o_id[b], o_idx[b], o_rep[b])));
        let order_of_prompt: HashMap<&str, usize> = order.iter().enumerate().map(|(i, p)| (*p, i)).collect();
        perm.sort_by_key(|&i| order_of_prompt[o_id[i].as_str()]);
        let cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(perm.iter().map(|&i| o_id[i].clone()).collect::<Vec<_>>())),
            Arc::new(UInt32Array::from(perm.iter().map(|&i| o_idx[i]).collect::<Vec<_>>())),
            Arc::new(UInt32Array::from(perm.iter().map(|&i| o_rep[i]).collect::<Vec<_>>())),
            Arc::new(UInt32Array::from(perm.iter().map(|&i| o_rank[i]).collect::<Vec<_>>())),
            Arc::new(UInt32Array::from(perm.iter().map(|&i| o_pos[i]).collect::<Vec<_>>())),
            Arc::new(StringArray::from(perm.iter().map(|&i| o_status[i].clone()).collect::<Vec<_>>())),
            Arc::new(StringArray::from(perm.iter().map(|&i| o_judg[i].clone()).collect::<Vec<_>>())),
            Arc::new(StringArray::from(perm.iter().map(|&i| o_prompt[i].clone()).collect::<Vec<_>>())),
            Arc::new(StringArray::from(perm.iter().map(|&i| o_resp[i].clone()).collect::<Vec<_>>())),
        ];
        out.rows_in = input.num_rows() as u64;
        out.batches.push(RecordBatch::try_new(output_schema(self.c.repeats), cols)?);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_last_marker_first_nonblank_line() {
        let r = "<<<EXPLANATION>>>\nA is fine; <<<RANKING>>> is mentioned.\n\n<<<RANKING>>>\n\n  ` B > A = C `\nC>B>A\n";
        // Levels B | A=C: B rank 1, A and C share rank 2 (competition: 1, 2, 2).
        assert_eq!(parse_ranking(r, 3), Ok(vec![2, 1, 2]));
        // On the marker's own line.
        assert_eq!(parse_ranking("<<<RANKING>>> C>A>B", 3), Ok(vec![2, 3, 1]));
        // Ties share the lowest rank: A=B>C → 1, 1, 3.
        assert_eq!(parse_ranking("<<<RANKING>>>\nA=B>C", 3), Ok(vec![1, 1, 3]));
        assert_eq!(parse_ranking("<<<RANKING>>>\n\tA>B=C=D", 4), Ok(vec![1, 2, 2, 2]));
    }

    #[test]
    fn failures_by_reason_and_precedence() {
        assert_eq!(parse_ranking("B>A>C", 3), Err(ParseError::NoRanking));
        assert_eq!(parse_ranking("x <<<RANKING>>>\n \n\t\n", 3), Err(ParseError::NoRanking));
        assert_eq!(parse_ranking("<<<RANKING>>>\n` `", 3), Err(ParseError::NoRanking));
        assert_eq!(parse_ranking("<<<RANKING>>>\nA>B>D", 3), Err(ParseError::UnknownLabel));
        assert_eq!(parse_ranking("<<<RANKING>>>\nA>B>>C", 3), Err(ParseError::UnknownLabel)); // empty label
        assert_eq!(parse_ranking("<<<RANKING>>>\nA>b>C", 3), Err(ParseError::UnknownLabel));
        assert_eq!(parse_ranking("<<<RANKING>>>\nAB>C", 3), Err(ParseError::UnknownLabel));
        assert_eq!(parse_ranking("<<<RANKING>>>\nA>B>A>C", 3), Err(ParseError::RepeatedLabel));
        assert_eq!(parse_ranking("<<<RANKING>>>\nA>B", 3), Err(ParseError::MissingLabel));
        // Precedence: unknown before repeated before missing.
        assert_eq!(parse_ranking("<<<RANKING>>>\nA>A>Z", 3), Err(ParseError::UnknownLabel));
        assert_eq!(parse_ranking("<<<RANKING>>>\nA>A", 3), Err(ParseError::RepeatedLabel));
        assert_eq!(ParseError::MissingLabel.as_str(), "missing_label");
    }

    #[test]
    fn structured_replies() {
        assert_eq!(parse_structured("{\"ranking\": \"B>A\"}", 2), Ok(vec![2, 1]));
        assert_eq!(parse_structured("{\"rank\": \"B>A\"}", 2), Err(ParseError::NoRanking));
        assert_eq!(parse_structured("B>A", 2), Err(ParseError::NoRanking));
        assert_eq!(parse_structured("{\"ranking\": \"B>A>C\"}", 2), Err(ParseError::UnknownLabel));
        let f = response_format(2);
        assert_eq!(f["json_schema"]["schema"]["properties"]["ranking"]["pattern"], "^(A[>=]B|B[>=]A)$");
        let re =
            regex::Regex::new(response_format(4)["json_schema"]["schema"]["properties"]["ranking"]["pattern"].as_str().unwrap()).unwrap();
        assert!(
            re.is_match("C>A=B>D") && re.is_match("D=C=B=A") && !re.is_match("C>A>D") && !re.is_match("B>A=C>B") && !re.is_match("E>A>B>C")
        );
        assert_eq!(ranking_pattern(6), "^[A-F]([>=][A-F]){5}$");
        let re = regex::Regex::new(&ranking_pattern(6)).unwrap();
        assert!(re.is_match("F>A=B>C>D>E") && !re.is_match("G>A=B>C>D>E") && !re.is_match("A>B"));
    }

    #[test]
    fn permutations_are_seeded_and_complete() {
        let p = permutation(8, 42);
        let mut q = p.clone();
        q.sort();
        assert_eq!(q, (0..8).collect::<Vec<_>>());
        assert_eq!(p, permutation(8, 42));
        let distinct: std::collections::HashSet<Vec<usize>> = (0..20).map(|s| permutation(5, s)).collect();
        assert!(distinct.len() > 10, "{distinct:?}");
    }

    #[test]
    fn default_prompt_format() {
        assert_eq!(default_user("Q?", &["x", "y"]), "<<<PROMPT>>>\nQ?\n\n<<<RESPONSE A>>>\nx\n\n<<<RESPONSE B>>>\ny");
        let t = Template::Jinja("{{ prompt }}{% for r in responses %}[{{ r.label }}:{{ r.text }}]{% endfor %}".into());
        assert_eq!(render(&t, JudgeMode::Listwise, "Q", None, &["x", "y"]).unwrap(), "Q[A:x][B:y]");
    }
}
