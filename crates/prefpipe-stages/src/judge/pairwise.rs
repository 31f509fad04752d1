//! `judge` with `mode: pairwise` (DESIGN §12): MT-Bench's pairwise judge
//! (`pair-v2`, Zheng et al. 2023, "Judging LLM-as-a-Judge with MT-Bench and
//! Chatbot Arena") with its swap control: every pair of a prompt's samples is
//! judged twice, once in each order, and a pair whose two verdicts disagree is
//! `inconsistent` ("Large Language Models are not Fair Evaluators", Wang et
//! al. 2023, shows why one order is not enough).
//!
//! The pairs of a prompt are all of them, or — beyond `max_pairs` — a
//! balanced set drawn from the seed ([`choose_pairs`]). Each reply is parsed
//! by [`parse_verdict`] (or [`parse_structured`] with `structured: true`);
//! replies that give no verdict are counted by reason and kept, raw, in the
//! `judge_verdicts` column — never guessed.
//!
//! Output: the input samples table, every row kept, plus per sample
//! `judge_winrate` = (wins + ½·ties) / `judge_comparisons` over its
//! consistent comparisons (null when it has none), `judge_comparisons`,
//! `judge_inconsistent`, and `judge_verdicts` (one entry per request it was
//! shown in). `as_reward: true` also writes `reward` = `judge_winrate`.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, Float64Array, ListArray, StringArray, StructArray, UInt32Array};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use prefpipe_core::stage::{Output, RunCx, Table};
use prefpipe_core::table::{self, col, str_col, u32_col};
use prefpipe_core::{Error, Result};
use prefpipe_models::ChatMessage;

use super::{group_by_prompt, permutation, render, s, Judge, JudgeMode};
use crate::backend::{GenJob, GenParams, Prompt, Row};
use crate::model_ref::sample_seed;

/// MT-Bench's `pair-v2` system prompt (FastChat `judge_prompts.jsonl`, WIRE §2).
pub const SYSTEM: &str = "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to the user question displayed below. \
You should choose the assistant that follows the user's instructions and answers the user's question better. \
Your evaluation should consider factors such as the helpfulness, relevance, accuracy, depth, creativity, and level of detail of their responses. \
Begin your evaluation by comparing the two responses and provide a short explanation. \
Avoid any position biases and ensure that the order in which the responses were presented does not influence your decision. \
Do not allow the length of the responses to influence your evaluation. Do not favor certain names of the assistants. Be as objective as possible. \
After providing your explanation, output your final verdict by strictly following this format: \"[[A]]\" if assistant A is better, \"[[B]]\" if assistant B is better, and \"[[C]]\" for a tie.";

/// The system prompt with `structured: true`.
pub const SYSTEM_JSON: &str = "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to the user question displayed below. \
Choose the assistant that follows the user's instructions and answers the user's question better, considering helpfulness, relevance, accuracy, depth, creativity and level of detail. \
Avoid any position biases, do not let the length of the responses or the names of the assistants influence you. \
Reply with a JSON object {\"verdict\": \"A\"} if assistant A is better, {\"verdict\": \"B\"} if assistant B is better, and {\"verdict\": \"C\"} for a tie.";

/// The default user message: MT-Bench's `pair-v2` prompt template.
pub fn default_user(prompt: &str, a: &str, b: &str) -> String {
    format!(
        "[User Question]\n{prompt}\n\n[The Start of Assistant A's Answer]\n{a}\n[The End of Assistant A's Answer]\n\n\
         [The Start of Assistant B's Answer]\n{b}\n[The End of Assistant B's Answer]"
    )
}

/// The built-in prompts, for the stage key: rewording them re-judges.
pub fn prompts_identity() -> String {
    format!("pairwise\0{SYSTEM}\0{SYSTEM_JSON}\0{}", default_user("\u{1}", "\u{2}", "\u{3}"))
}

/// The columns `mode: pairwise` adds (besides `reward` with `as_reward`).
pub const COLUMNS: [&str; 4] = ["judge_winrate", "judge_comparisons", "judge_inconsistent", "judge_verdicts"];

/// One reply's verdict: the first-shown response (A), the second (B), or a tie (C).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    A,
    B,
    Tie,
}

impl Verdict {
    pub fn label(self) -> &'static str {
        match self {
            Verdict::A => "A",
            Verdict::B => "B",
            Verdict::Tie => "C",
        }
    }
}

/// Why a reply gave no verdict (DESIGN §12).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// None of `[[A]]`, `[[B]]`, `[[C]]` (structured: no `verdict` of "A", "B" or "C").
    NoVerdict,
    /// Two or three different ones: MT-Bench would take the first it tests for; we take none.
    ConflictingVerdicts,
}

impl ParseError {
    pub fn as_str(self) -> &'static str {
        match self {
            ParseError::NoVerdict => "no_verdict",
            ParseError::ConflictingVerdicts => "conflicting_verdicts",
        }
    }
}

/// DESIGN §12: the reply must contain exactly one of the strings `[[A]]`,
/// `[[B]]`, `[[C]]` (as often as it likes). MT-Bench tests them in that
/// order and takes the first found, so a reply quoting the format would win
/// for A; here two different ones are `conflicting_verdicts`.
pub fn parse_verdict(reply: &str) -> Result<Verdict, ParseError> {
    let found: Vec<Verdict> = [("[[A]]", Verdict::A), ("[[B]]", Verdict::B), ("[[C]]", Verdict::Tie)]
        .into_iter()
        .filter(|(t, _)| reply.contains(t))
        .map(|(_, v)| v)
        .collect();
    match found.as_slice() {
        [v] => Ok(*v),
        [] => Err(ParseError::NoVerdict),
        _ => Err(ParseError::ConflictingVerdicts),
    }
}

/// A `structured: true` reply: a JSON object whose `verdict` is exactly "A", "B" or "C".
pub fn parse_structured(reply: &str) -> Result<Verdict, ParseError> {
    let v: serde_json::Value = serde_json::from_str(reply.trim()).map_err(|_| ParseError::NoVerdict)?;
    match v.get("verdict").and_then(|r| r.as_str()) {
        Some("A") => Ok(Verdict::A),
        Some("B") => Ok(Verdict::B),
        Some("C") => Ok(Verdict::Tie),
        _ => Err(ParseError::NoVerdict),
    }
}

/// The `response_format` of `structured: true`: only the three verdict labels.
pub fn response_format() -> serde_json::Value {
    serde_json::json!({
        "type": "json_schema",
        "json_schema": {
            "name": "verdict",
            "strict": true,
            "schema": {
                "type": "object",
                "properties": {"verdict": {"type": "string", "enum": ["A", "B", "C"]}},
                "required": ["verdict"],
                "additionalProperties": false,
            },
        },
    })
}

/// The pairs (i < j, positions in the prompt's samples sorted by sample_idx)
/// to judge, ascending: all n(n−1)/2 when that is at most `max_pairs`, else
/// the first `max_pairs` of [`circulant`] over a seeded order of the samples.
pub fn choose_pairs(n: usize, max_pairs: usize, seed: u64) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = if n * n.saturating_sub(1) / 2 <= max_pairs {
        (0..n).flat_map(|i| (i + 1..n).map(move |j| (i, j))).collect()
    } else {
        circulant(&permutation(n, seed)).into_iter().take(max_pairs).collect()
    };
    out.sort_unstable();
    out
}

/// Every pair of the n = |π| samples exactly once, in rounds of increasing
/// circular distance d = 1, 2, …, ⌊n/2⌋ along the order π: round d is
/// {π(k), π(k+d mod n)} for k = 0..n−1 (k < n/2 when d = n/2). Each round
/// gives every sample the same number of comparisons (2, or 1 in the d = n/2
/// round), so any prefix leaves the counts at most 2 apart, and a prefix of
/// n or more pairs compares every sample at least once.
pub fn circulant(pi: &[usize]) -> Vec<(usize, usize)> {
    let n = pi.len();
    let mut out = Vec::with_capacity(n * n.saturating_sub(1) / 2);
    for d in 1..=n / 2 {
        let ks = if 2 * d == n { n / 2 } else { n };
        for k in 0..ks {
            let (a, b) = (pi[k], pi[(k + d) % n]);
            out.push((a.min(b), a.max(b)));
        }
    }
    out
}

/// What run.json reports for a pairwise judge (over the chunks this run judged).
#[derive(Debug, Default, Clone)]
pub struct Stats {
    comparisons: u64,
    judgments: u64,
    ok: u64,
    failures: BTreeMap<String, u64>,
    consistent: u64,
    ties: u64,
    inconsistent: u64,
    failed: u64,
    over_max_pairs: u64,
    /// Ok replies with verdict A, B, C.
    first_won: u64,
    second_won: u64,
    tied: u64,
    /// Ok replies with a winner whose two responses differ in length (chars): the longer won.
    longer_pairs: u64,
    longer_won: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.comparisons += o.comparisons;
        self.judgments += o.judgments;
        self.ok += o.ok;
        for (k, v) in &o.failures {
            *self.failures.entry(k.clone()).or_default() += v;
        }
        self.consistent += o.consistent;
        self.ties += o.ties;
        self.inconsistent += o.inconsistent;
        self.failed += o.failed;
        self.over_max_pairs += o.over_max_pairs;
        self.first_won += o.first_won;
        self.second_won += o.second_won;
        self.tied += o.tied;
        self.longer_pairs += o.longer_pairs;
        self.longer_won += o.longer_won;
    }

    pub fn to_json(&self) -> serde_json::Value {
        let rate = |a: u64, b: u64| if b == 0 { serde_json::Value::Null } else { serde_json::json!(a as f64 / b as f64) };
        let decided = self.first_won + self.second_won;
        serde_json::json!({
            "mode": "pairwise",
            "comparisons": self.comparisons,
            "judgments": self.judgments,
            "ok": self.ok,
            "parse_failures": self.failures,
            "consistent": self.consistent,
            "ties": self.ties,
            "inconsistent": self.inconsistent,
            "failed": self.failed,
            "inconsistent_rate": rate(self.inconsistent, self.consistent + self.inconsistent),
            "over_max_pairs": self.over_max_pairs,
            "first_shown_win_rate": rate(self.first_won, decided),
            "first_shown_win_chance": if decided == 0 { serde_json::Value::Null } else { serde_json::json!(0.5) },
            "tie_rate": rate(self.tied, self.ok),
            "longer_response_win_rate": rate(self.longer_won, self.longer_pairs),
            "longer_response_pairs": self.longer_pairs,
        })
    }
}

/// The fields of one `judge_verdicts` entry.
fn verdict_fields() -> Fields {
    Fields::from(vec![
        Field::new("opponent_idx", DataType::UInt32, false),
        Field::new("shown_first", DataType::Boolean, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("verdict", DataType::Utf8, true),
        Field::new("outcome", DataType::Utf8, false),
        Field::new("judgment", DataType::Utf8, true),
    ])
}

fn verdicts_item() -> Arc<Field> {
    Arc::new(Field::new("item", DataType::Struct(verdict_fields()), false))
}

/// The input schema plus the pairwise columns; with `as_reward`, `reward`
/// (float64, null when the win rate is) replaces the input's or is appended.
pub fn output_schema(input: &Schema, as_reward: bool) -> SchemaRef {
    let reward = Field::new(col::REWARD, DataType::Float64, true);
    let mut fields: Vec<Field> =
        input.fields().iter().map(|f| if as_reward && f.name() == col::REWARD { reward.clone() } else { f.as_ref().clone() }).collect();
    fields.extend([
        Field::new("judge_winrate", DataType::Float64, true),
        Field::new("judge_comparisons", DataType::UInt32, false),
        Field::new("judge_inconsistent", DataType::UInt32, false),
        Field::new("judge_verdicts", DataType::List(verdicts_item()), false),
    ]);
    if as_reward && input.field_with_name(col::REWARD).is_err() {
        fields.push(reward);
    }
    Arc::new(Schema::new(fields))
}

/// One request: pair `pair` (positions in the prompt's sorted samples) of prompt `prompt`.
struct Job {
    prompt: usize,
    pair: (usize, usize),
    /// 0: the lower sample_idx is shown as A; 1: the higher.
    order: u32,
}

/// One parsed reply.
struct Judged {
    status: String,
    verdict: Option<Verdict>,
    judgment: Option<String>,
}

/// One entry of a sample's `judge_verdicts`.
struct Entry {
    opponent_idx: u32,
    shown_first: bool,
    status: String,
    verdict: Option<&'static str>,
    outcome: &'static str,
    judgment: Option<String>,
}

impl Judge {
    pub(super) fn run_pairwise(&self, cx: &RunCx, inputs: &[Table]) -> Result<Output> {
        let input = inputs[0].read_one()?;
        let template = self.template(|p| cx.resolve(p)).map_err(|e| Error::Input(e.message))?;
        let ids = str_col(&input, col::PROMPT_ID)?;
        let prompts = str_col(&input, col::PROMPT)?;
        let idx = u32_col(&input, col::SAMPLE_IDX)?;
        let texts = str_col(&input, col::RESPONSE)?;
        let chats = if table::has_messages(&input.schema()) { Some(crate::backend::Prompts::of(&input)?) } else { None };
        let seed = self.c.seed.unwrap_or(cx.seed);
        let (order, groups) = group_by_prompt(&ids, &idx)?;
        // Every prompt of the chunk is checked before any request is sent.
        if let Some(p) = groups.iter().position(|g| g.len() < 2) {
            return Err(Error::Input(format!(
                "input `{}`: prompt `{}` has only 1 sample; `mode: pairwise` compares two or more per prompt (drop such prompts upstream, e.g. with an `sql` stage, or use `mode: listwise`)",
                inputs[0].id, order[p]
            )));
        }
        let mut st = Stats::default();
        let mut jobs: Vec<Job> = Vec::new();
        for (p, g) in groups.iter().enumerate() {
            let n = g.len();
            let pairs = choose_pairs(n, self.c.max_pairs, sample_seed(seed, cx.stage_id, order[p], 0) ^ 0x5041_4952_5349_4e47);
            st.over_max_pairs += (n * (n - 1) / 2 - pairs.len()) as u64;
            for pair in pairs {
                for o in 0..2 {
                    jobs.push(Job { prompt: p, pair, order: o });
                }
            }
        }

        // Requests: one per (prompt, pair, order).
        let system = if self.c.structured { SYSTEM_JSON } else { SYSTEM };
        let mut users: Vec<Vec<ChatMessage>> = Vec::with_capacity(jobs.len());
        let mut job_ids: Vec<String> = Vec::with_capacity(jobs.len());
        let mut seeds: Vec<u64> = Vec::with_capacity(jobs.len());
        for j in &jobs {
            let g = &groups[j.prompt];
            let (a, b) = (g[j.pair.0], g[j.pair.1]);
            let (first, second) = if j.order == 0 { (a, b) } else { (b, a) };
            let msgs = chats.as_ref().map(|c| match c.get(g[0]) {
                Prompt::Chat(m) => m.to_vec(),
                Prompt::Text(_) => Vec::new(),
            });
            let user = render(&template, JudgeMode::Pairwise, s(&prompts, g[0]), msgs.as_deref(), &[s(&texts, first), s(&texts, second)])
                .map_err(|e| Error::Input(format!("template {}: {e}", self.c.template)))?;
            users.push(vec![
                ChatMessage { role: "system".into(), content: system.into() },
                ChatMessage { role: "user".into(), content: user },
            ]);
            // Unique per request: a local backend shares prompt ids between consecutive jobs of one prompt_id.
            let pair_id = format!("{}\u{1f}{}\u{1f}{}", order[j.prompt], idx.value(a), idx.value(b));
            seeds.push(sample_seed(seed, cx.stage_id, &pair_id, j.order));
            job_ids.push(format!("{pair_id}\u{1f}{}", j.order));
        }
        let gen_jobs: Vec<GenJob> = jobs
            .iter()
            .enumerate()
            .map(|(k, j)| GenJob { prompt_id: &job_ids[k], sample_idx: j.order, prompt: Prompt::Chat(&users[k]), seed: seeds[k] })
            .collect();
        let params = GenParams { response_format: self.c.structured.then(response_format), ..self.params(2) };
        let replies = if gen_jobs.is_empty() { Vec::new() } else { self.model.backend(cx).generate(cx, "pairwise", &gen_jobs, &params)? };

        let judged: Vec<Judged> = replies
            .into_iter()
            .map(|r| match r {
                Row::Ok(sample) => {
                    let parsed = if self.c.structured { parse_structured(&sample.text) } else { parse_verdict(&sample.text) };
                    match parsed {
                        Ok(v) => Judged { status: "ok".into(), verdict: Some(v), judgment: Some(sample.text) },
                        Err(e) => Judged { status: e.as_str().into(), verdict: None, judgment: Some(sample.text) },
                    }
                }
                Row::Drop(d) => Judged { status: d.to_string(), verdict: None, judgment: None },
            })
            .collect();

        // Per reply: the run.json figures.
        st.judgments = judged.len() as u64;
        for (j, r) in jobs.iter().zip(&judged) {
            let Some(v) = r.verdict else {
                *st.failures.entry(r.status.clone()).or_default() += 1;
                continue;
            };
            st.ok += 1;
            let g = &groups[j.prompt];
            let (a, b) = (g[j.pair.0], g[j.pair.1]);
            let (first, second) = if j.order == 0 { (a, b) } else { (b, a) };
            let (lf, ls) = (s(&texts, first).chars().count(), s(&texts, second).chars().count());
            match v {
                Verdict::A => st.first_won += 1,
                Verdict::B => st.second_won += 1,
                Verdict::Tie => st.tied += 1,
            }
            if v != Verdict::Tie && lf != ls {
                st.longer_pairs += 1;
                st.longer_won += ((lf > ls) == (v == Verdict::A)) as u64;
            }
        }

        // Per comparison (jobs come in (order 0, order 1) twos): outcome and the per-sample tallies.
        let n_rows = input.num_rows();
        let (mut wins, mut ties, mut consistent, mut inconsistent) =
            (vec![0u32; n_rows], vec![0u32; n_rows], vec![0u32; n_rows], vec![0u32; n_rows]);
        let mut entries: Vec<Vec<Entry>> = (0..n_rows).map(|_| Vec::new()).collect();
        for (two, replies) in jobs.chunks(2).zip(judged.chunks(2)) {
            let (j, (r0, r1)) = (&two[0], (&replies[0], &replies[1]));
            let g = &groups[j.prompt];
            let (a, b) = (g[j.pair.0], g[j.pair.1]);
            st.comparisons += 1;
            // The winner of each order as a row (a or b), None for a tie.
            let winner = |v: Verdict, first: usize, second: usize| match v {
                Verdict::A => Some(first),
                Verdict::B => Some(second),
                Verdict::Tie => None,
            };
            // Outcome for row a: win / loss / tie / inconsistent / failed.
            let outcome_a = match (r0.verdict, r1.verdict) {
                (Some(v0), Some(v1)) => {
                    let (w0, w1) = (winner(v0, a, b), winner(v1, b, a));
                    if w0 != w1 {
                        st.inconsistent += 1;
                        inconsistent[a] += 1;
                        inconsistent[b] += 1;
                        "inconsistent"
                    } else {
                        st.consistent += 1;
                        consistent[a] += 1;
                        consistent[b] += 1;
                        match w0 {
                            None => {
                                st.ties += 1;
                                ties[a] += 1;
                                ties[b] += 1;
                                "tie"
                            }
                            Some(w) => {
                                wins[w] += 1;
                                if w == a {
                                    "win"
                                } else {
                                    "loss"
                                }
                            }
                        }
                    }
                }
                _ => {
                    st.failed += 1;
                    "failed"
                }
            };
            let outcome_b = match outcome_a {
                "win" => "loss",
                "loss" => "win",
                o => o,
            };
            for (row, other, outcome) in [(a, b, outcome_a), (b, a, outcome_b)] {
                for (o, r) in [(0u32, r0), (1, r1)] {
                    entries[row].push(Entry {
                        opponent_idx: idx.value(other),
                        shown_first: (o == 0) == (row == a),
                        status: r.status.clone(),
                        verdict: r.verdict.map(Verdict::label),
                        outcome,
                        judgment: r.judgment.clone(),
                    });
                }
            }
        }
        for e in &mut entries {
            e.sort_by_key(|e| (e.opponent_idx, !e.shown_first));
        }
        self.pair_stats.lock().expect("stats").add(&st);

        let winrate: Vec<Option<f64>> =
            (0..n_rows).map(|r| (consistent[r] > 0).then(|| (wins[r] as f64 + 0.5 * ties[r] as f64) / consistent[r] as f64)).collect();
        let schema = output_schema(&inputs[0].schema, self.c.as_reward);
        let winrate: ArrayRef = Arc::new(Float64Array::from(winrate));
        let mut cols: Vec<ArrayRef> = input
            .schema()
            .fields()
            .iter()
            .zip(input.columns())
            .map(|(f, c)| if self.c.as_reward && f.name() == col::REWARD { winrate.clone() } else { c.clone() })
            .collect();
        let flat: Vec<&Entry> = entries.iter().flatten().collect();
        let item = StructArray::try_new(
            verdict_fields(),
            vec![
                Arc::new(UInt32Array::from(flat.iter().map(|e| e.opponent_idx).collect::<Vec<_>>())),
                Arc::new(BooleanArray::from(flat.iter().map(|e| e.shown_first).collect::<Vec<_>>())),
                Arc::new(StringArray::from(flat.iter().map(|e| e.status.as_str()).collect::<Vec<_>>())),
                Arc::new(StringArray::from(flat.iter().map(|e| e.verdict).collect::<Vec<_>>())),
                Arc::new(StringArray::from(flat.iter().map(|e| e.outcome).collect::<Vec<_>>())),
                Arc::new(StringArray::from(flat.iter().map(|e| e.judgment.as_deref()).collect::<Vec<_>>())),
            ],
            None,
        )?;
        let verdicts = ListArray::try_new(verdicts_item(), OffsetBuffer::from_lengths(entries.iter().map(Vec::len)), Arc::new(item), None)?;
        cols.extend([
            winrate.clone(),
            Arc::new(UInt32Array::from(consistent)) as ArrayRef,
            Arc::new(UInt32Array::from(inconsistent)),
            Arc::new(verdicts),
        ]);
        if self.c.as_reward && input.schema().field_with_name(col::REWARD).is_err() {
            cols.push(winrate);
        }
        let mut out = Output { rows_in: n_rows as u64, ..Output::default() };
        out.batches.push(RecordBatch::try_new(schema, cols)?);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_by_the_exact_rule() {
        assert_eq!(parse_verdict("A is more detailed.\n\n[[A]]"), Ok(Verdict::A));
        assert_eq!(parse_verdict("[[B]] ... final verdict: [[B]]"), Ok(Verdict::B));
        assert_eq!(parse_verdict("Equally good: [[C]]"), Ok(Verdict::Tie));
        assert_eq!(parse_verdict("A is better. [A]"), Err(ParseError::NoVerdict));
        assert_eq!(parse_verdict("[[ A ]] [[a]] [[D]]"), Err(ParseError::NoVerdict));
        assert_eq!(parse_verdict(""), Err(ParseError::NoVerdict));
        // MT-Bench would say A here (it tests [[A]] first); echoing the format is no verdict.
        assert_eq!(parse_verdict("\"[[A]]\" if assistant A is better, \"[[B]]\" if B"), Err(ParseError::ConflictingVerdicts));
        assert_eq!(parse_verdict("[[C]] or maybe [[B]]"), Err(ParseError::ConflictingVerdicts));
        assert_eq!(ParseError::ConflictingVerdicts.as_str(), "conflicting_verdicts");
    }

    #[test]
    fn structured_verdicts() {
        assert_eq!(parse_structured("{\"verdict\": \"B\"}"), Ok(Verdict::B));
        assert_eq!(parse_structured(" {\"verdict\":\"C\"}\n"), Ok(Verdict::Tie));
        assert_eq!(parse_structured("{\"verdict\": \"[[A]]\"}"), Err(ParseError::NoVerdict));
        assert_eq!(parse_structured("{\"winner\": \"A\"}"), Err(ParseError::NoVerdict));
        assert_eq!(parse_structured("[[A]]"), Err(ParseError::NoVerdict));
        let f = response_format();
        assert_eq!(f["json_schema"]["schema"]["properties"]["verdict"]["enum"], serde_json::json!(["A", "B", "C"]));
    }

    #[test]
    fn all_pairs_up_to_the_cap() {
        assert_eq!(choose_pairs(2, 28, 7), [(0, 1)]);
        assert_eq!(choose_pairs(3, 3, 7), [(0, 1), (0, 2), (1, 2)]);
        assert_eq!(choose_pairs(8, 28, 7).len(), 28);
        assert_eq!(choose_pairs(1, 28, 7), []);
    }

    #[test]
    fn circulant_is_every_pair_once() {
        for n in 0..=12usize {
            let mut c = circulant(&permutation(n, 11));
            assert_eq!(c.len(), n * n.saturating_sub(1) / 2, "n={n}");
            c.sort_unstable();
            assert_eq!(c, choose_pairs(n, usize::MAX, 0), "n={n}");
        }
    }

    #[test]
    fn capped_pairs_are_seeded_distinct_and_balanced() {
        for n in 3..=12usize {
            for cap in 1..n * (n - 1) / 2 {
                for seed in 0..5u64 {
                    let p = choose_pairs(n, cap, seed);
                    assert_eq!(p, choose_pairs(n, cap, seed), "deterministic");
                    let mut q = p.clone();
                    q.dedup();
                    assert_eq!(q.len(), cap, "distinct: n={n} cap={cap} {p:?}");
                    assert!(p.iter().all(|&(i, j)| i < j && j < n));
                    let mut count = vec![0usize; n];
                    for &(i, j) in &p {
                        count[i] += 1;
                        count[j] += 1;
                    }
                    let (lo, hi) = (count.iter().min().unwrap(), count.iter().max().unwrap());
                    assert!(hi - lo <= 2, "n={n} cap={cap}: {count:?}");
                    assert!(cap < n || *lo >= 1, "n={n} cap={cap}: {count:?}");
                }
            }
        }
        // Different seeds draw different sets.
        let sets: std::collections::HashSet<Vec<(usize, usize)>> = (0..20).map(|s| choose_pairs(6, 6, s)).collect();
        assert!(sets.len() > 5, "{sets:?}");
    }

    #[test]
    fn default_prompt_is_pair_v2() {
        assert_eq!(
            default_user("Q?", "x", "y"),
            "[User Question]\nQ?\n\n[The Start of Assistant A's Answer]\nx\n[The End of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\ny\n[The End of Assistant B's Answer]"
        );
    }

    #[test]
    fn schema_adds_or_replaces_reward() {
        let input = Schema::new(vec![Field::new("prompt_id", DataType::Utf8, false), Field::new("reward", DataType::Float32, false)]);
        let names = |s: &Schema| s.fields().iter().map(|f| f.name().clone()).collect::<Vec<_>>();
        assert_eq!(
            names(&output_schema(&input, false)),
            ["prompt_id", "reward", "judge_winrate", "judge_comparisons", "judge_inconsistent", "judge_verdicts"]
        );
        assert_eq!(output_schema(&input, false).field(1).data_type(), &DataType::Float32);
        let replaced = output_schema(&input, true);
        assert_eq!(names(&replaced), names(&output_schema(&input, false)));
        assert_eq!(replaced.field(1), &Field::new("reward", DataType::Float64, true));
        let plain = Schema::new(vec![Field::new("prompt_id", DataType::Utf8, false)]);
        assert_eq!(names(&output_schema(&plain, true)).last().unwrap(), "reward");
    }
}
