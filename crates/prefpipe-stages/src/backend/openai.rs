//! The remote backend: an OpenAI-compatible server (vLLM, SGLang,
//! llama.cpp, an API) behind [`prefpipe_remote`]'s client, which owns
//! concurrency, retries, failover and the request cache. This file owns the
//! wire formats: what each server is sent and how its answers are read
//! (WIRE.md §1; DESIGN §11).
//!
//! - generate: `/v1/chat/completions` (or `/v1/completions` without a chat
//!   template), one request per sample, `n: 1`, every sampling parameter
//!   sent, seed in 0..2³¹−1 (vLLM gives child i of an `n` request seed + i;
//!   llama.cpp truncates seeds to 32 bits).
//! - scores: vLLM `/classify` with `use_activation: false` (else a one-label
//!   RM comes back as sigmoid(reward)); SGLang's vLLM-compatible `/v1/classify`.
//! - logprobs: vLLM `/v1/completions` with the token ids, `echo: true`,
//!   `logprobs: 1`, `max_tokens: 0`; SGLang `/generate` with
//!   `logprob_start_len: 0`.

use std::sync::{Arc, OnceLock};

use prefpipe_core::remote::{RemoteModel, ServerKind};
use prefpipe_core::stage::RunCx;
use prefpipe_core::{Error, Result};
use prefpipe_models::{ChatMessage, Codec, Prompt};
use prefpipe_remote::{Client, Endpoint, Outcome, Request, Session};
use serde_json::{json, Value};

use super::{route, Backend, GenJob, GenParams, Pair, PairOpts, Row, Sample, Uses};

pub struct Remote {
    pub model: Arc<RemoteModel>,
    client: OnceLock<std::result::Result<Arc<Client>, String>>,
    session: OnceLock<std::result::Result<Arc<Session>, String>>,
    codec: OnceLock<std::result::Result<Option<Arc<Codec>>, String>>,
}

/// Why a remote model cannot serve `need` (None when it can).
pub fn refuses(m: &RemoteModel, need: Uses) -> Option<String> {
    let server = m.spec.server;
    match need {
        Uses::Generate => None,
        Uses::Hidden | Uses::Train => Some(format!(
            "model `{}` is a server (backend: openai); {} need the model in-process: name a local model directory",
            m.name,
            need.what()
        )),
        Uses::Score if !matches!(server, ServerKind::Vllm | ServerKind::Sglang) => Some(format!(
            "model `{}`: reward scores come from vLLM's or SGLang's /classify; `server: {}` serves none",
            m.name,
            server.as_str()
        )),
        Uses::Logprob if !matches!(server, ServerKind::Vllm | ServerKind::Sglang) => Some(format!(
            "model `{}`: `server: {}` cannot teacher-force a response (llama.cpp ignores `echo`); use vLLM or SGLang, or a local model",
            m.name,
            server.as_str()
        )),
        Uses::Logprob if m.tokenizer.is_none() => {
            Some(format!("model `{}`: remote log-probs need `tokenizer:` (a local Hugging Face directory) to send exact token ids", m.name))
        }
        _ => None,
    }
}

fn runtime(e: impl std::fmt::Display) -> Error {
    Error::Runtime(e.to_string())
}

impl Remote {
    pub fn new(model: Arc<RemoteModel>) -> Self {
        Remote { model, client: OnceLock::new(), session: OnceLock::new(), codec: OnceLock::new() }
    }

    fn client(&self) -> Result<Arc<Client>> {
        self.client.get_or_init(|| Client::shared(&self.model).map_err(|e| e.to_string())).clone().map_err(Error::Runtime)
    }

    /// The stage's session (request cache + counters), opened on first use
    /// after the servers answer.
    fn session(&self, cx: &RunCx) -> Result<Arc<Session>> {
        self.session
            .get_or_init(|| {
                let client = self.client().map_err(|e| e.to_string())?;
                client.connect().map_err(|e| e.to_string())?;
                client.session(cx.store_root, cx.stage_id, cx.stage_key, self.model.spec.max_failed_rows).map_err(|e| e.to_string())
            })
            .clone()
            .map_err(Error::Runtime)
    }

    /// The `tokenizer:` directory's codec, when there is one.
    fn codec(&self) -> Result<Option<Arc<Codec>>> {
        self.codec
            .get_or_init(|| match &self.model.tokenizer {
                None => Ok(None),
                Some(dir) => Codec::load(dir).map(|c| Some(Arc::new(c))).map_err(|e| e.to_string()),
            })
            .clone()
            .map_err(Error::Input)
    }

    fn send(
        &self,
        cx: &RunCx,
        tag: &str,
        reqs: Vec<Request>,
        validate: &(dyn Fn(&Value) -> std::result::Result<(), String> + Sync),
    ) -> Result<Vec<Outcome>> {
        let session = self.session(cx)?;
        session.send(cx.chunk, tag, reqs, validate, cx.progress).map_err(runtime)
    }

    fn tok_err(&self, e: prefpipe_models::Error) -> Error {
        Error::Input(format!("model `{}` tokenizer: {e}", self.model.name))
    }

    /// Token ids of prompt ⊕ response (DESIGN §4/§15) and the prompt's length.
    fn pair_ids(&self, codec: &Codec, p: &Pair, chat: bool) -> Result<(Vec<u32>, usize)> {
        let (mut ids, r) = codec.pair(p.prompt, p.response, chat).map_err(|e| self.tok_err(e))?;
        let n = ids.len();
        ids.extend(r);
        Ok((ids, n))
    }

    /// The sampling parameters as the server spells them.
    fn sampling(&self, params: &GenParams, seed: u64) -> serde_json::Map<String, Value> {
        let server = self.model.spec.server;
        let mut b = serde_json::Map::new();
        b.insert("model".into(), json!(self.model.spec.model));
        b.insert("n".into(), json!(1));
        // 31 bits: vLLM takes int64, llama.cpp truncates to 32 bits and reads 0xFFFFFFFF as "random".
        b.insert("seed".into(), json!(seed & 0x7fff_ffff));
        b.insert("temperature".into(), json!(params.temperature));
        b.insert("top_p".into(), json!(params.top_p));
        b.insert("max_tokens".into(), json!(params.max_new_tokens));
        b.insert("stop".into(), json!(params.stop));
        if let Some(f) = &params.response_format {
            b.insert("response_format".into(), f.clone());
        }
        // An OpenAI API rejects parameters it does not know: send them only when set.
        let off_k = match server {
            ServerKind::Llamacpp => 0i64,
            _ => -1,
        };
        if server != ServerKind::Openai || params.top_k > 0 {
            b.insert("top_k".into(), json!(if params.top_k == 0 { off_k } else { params.top_k as i64 }));
        }
        if server != ServerKind::Openai || params.min_p > 0.0 {
            b.insert("min_p".into(), json!(params.min_p));
        }
        b
    }
}

/// `choices[0]` of a completion answer, checked.
fn choice(v: &Value) -> std::result::Result<&Value, String> {
    v.get("choices").and_then(Value::as_array).and_then(|c| c.first()).ok_or_else(|| "no `choices[0]` in the answer".to_string())
}

pub(crate) fn sample_of(v: &Value, chat: bool) -> std::result::Result<Sample, String> {
    let c = choice(v)?;
    let text = if chat { c.get("message").and_then(|m| m.get("content")) } else { c.get("text") };
    let text = text
        .and_then(Value::as_str)
        .ok_or_else(|| if chat { "no string `choices[0].message.content`" } else { "no string `choices[0].text`" }.to_string())?;
    let finish = c.get("finish_reason").and_then(Value::as_str).ok_or("no `choices[0].finish_reason`")?;
    let n_tokens = v.get("usage").and_then(|u| u.get("completion_tokens")).and_then(Value::as_u64).ok_or("no `usage.completion_tokens`")?;
    Ok(Sample {
        text: text.to_string(),
        n_tokens: n_tokens as u32,
        finish_reason: if finish == "length" { "length" } else { "stop" }.to_string(),
    })
}

/// The head outputs of a classify answer: vLLM `data[0].probs`.
pub(crate) fn scores_of(v: &Value) -> std::result::Result<Vec<f32>, String> {
    let probs = v
        .get("data")
        .and_then(Value::as_array)
        .and_then(|d| d.first())
        .and_then(|d| d.get("probs"))
        .and_then(Value::as_array)
        .ok_or("no `data[0].probs` in the classify answer")?;
    probs.iter().map(|x| x.as_f64().map(|x| x as f32).ok_or_else(|| "a non-number in `data[0].probs`".to_string())).collect()
}

/// Per-position log-probs of the ids sent (position 0 has none).
pub(crate) fn token_logprobs(v: &Value, server: ServerKind, ids: &[u32]) -> std::result::Result<Vec<f64>, String> {
    let want = ids.len();
    if want == 0 {
        return Err("no token ids were sent".into());
    }
    let lps: Vec<Option<f64>> = match server {
        ServerKind::Sglang => {
            let meta = v
                .get("meta_info")
                .and_then(|m| m.get("input_token_logprobs"))
                .and_then(Value::as_array)
                .ok_or("no `meta_info.input_token_logprobs`")?;
            meta.iter().map(|e| e.as_array().and_then(|a| a.first()).and_then(Value::as_f64)).collect()
        }
        _ => {
            let c = choice(v)?;
            if let Some(pl) = c.get("prompt_logprobs").and_then(Value::as_array) {
                // [null, {"<token id>": {"logprob", "rank", "decoded_token"}}, …]: the sent token is always present.
                pl.iter().zip(ids).map(|(e, id)| e.get(id.to_string()).and_then(|t| t.get("logprob")).and_then(Value::as_f64)).collect()
            } else {
                let tl = c
                    .get("logprobs")
                    .and_then(|l| l.get("token_logprobs"))
                    .and_then(Value::as_array)
                    .ok_or("no `prompt_logprobs` or `logprobs.token_logprobs`")?;
                tl.iter().map(Value::as_f64).collect()
            }
        }
    };
    if lps.len() < want {
        return Err(format!("{} prompt log-probs for {want} tokens sent", lps.len()));
    }
    lps[1..want]
        .iter()
        .enumerate()
        .map(|(i, x)| x.ok_or_else(|| format!("no log-prob at position {}", i + 1)))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map(|mut v| {
            v.insert(0, 0.0);
            v
        })
}

fn row_of<T>(o: Outcome, f: impl FnOnce(&Value) -> std::result::Result<T, String>) -> Result<Row<T>> {
    match o {
        Outcome::Ok(v) => f(&v).map(Row::Ok).map_err(Error::Runtime),
        Outcome::Dropped { reason, .. } => Ok(Row::Drop(reason)),
    }
}

impl Backend for Remote {
    fn generate(&self, cx: &RunCx, tag: &str, jobs: &[GenJob], params: &GenParams) -> Result<Vec<Row<Sample>>> {
        let chat = params.chat_template;
        let reqs = jobs
            .iter()
            .map(|j| {
                let mut b = self.sampling(params, j.seed);
                match (chat, j.prompt) {
                    // Chat backends receive the messages themselves (DESIGN §15).
                    (true, p) => b.insert("messages".into(), json!(p.messages())),
                    (false, Prompt::Text(t)) => b.insert("prompt".into(), json!(t)),
                    (false, Prompt::Chat(m)) => b.insert("messages".into(), json!(m)),
                };
                Request {
                    endpoint: if chat { Endpoint::V1("chat/completions") } else { Endpoint::V1("completions") },
                    body: Value::Object(b),
                    route: route(j.prompt_id),
                }
            })
            .collect();
        let outcomes = self.send(cx, tag, reqs, &|v| sample_of(v, chat).map(|_| ()))?;
        outcomes.into_iter().map(|o| row_of(o, |v| sample_of(v, chat))).collect()
    }

    fn scores(&self, cx: &RunCx, tag: &str, pairs: &[Pair], opts: PairOpts) -> Result<Vec<Row<Vec<f32>>>> {
        let codec = self.codec()?;
        let server = self.model.spec.server;
        let mut reqs = Vec::with_capacity(pairs.len());
        for p in pairs {
            let mut body = serde_json::Map::new();
            body.insert("model".into(), json!(self.model.spec.model));
            match (&codec, p.prompt) {
                // The reward model's own template over the whole conversation, as token ids (DESIGN §4).
                (Some(c), _) => {
                    body.insert("input".into(), json!(c.reward(p.prompt, p.response, opts.chat_template).map_err(|e| self.tok_err(e))?))
                }
                // Without a tokenizer the server renders and tokenises (vLLM's chat-style classify request).
                (None, prompt) if opts.chat_template => {
                    let mut m = prompt.messages();
                    m.push(ChatMessage { role: "assistant".into(), content: p.response.to_string() });
                    body.insert("messages".into(), json!(m))
                }
                (None, prompt) => {
                    let text = match prompt {
                        Prompt::Text(t) => t.to_string(),
                        Prompt::Chat(m) => m.last().map(|m| m.content.clone()).unwrap_or_default(),
                    };
                    body.insert("input".into(), json!(format!("{text}{}", p.response)))
                }
            };
            if server != ServerKind::Sglang {
                body.insert("use_activation".into(), json!(false));
            }
            let body = Value::Object(body);
            let endpoint = if server == ServerKind::Sglang { Endpoint::V1("classify") } else { Endpoint::Root("classify") };
            reqs.push(Request { endpoint, body, route: route(p.prompt_id) });
        }
        let outcomes = self.send(cx, tag, reqs, &|v| scores_of(v).map(|_| ()))?;
        outcomes.into_iter().map(|o| row_of(o, scores_of)).collect()
    }

    fn logprobs(&self, cx: &RunCx, tag: &str, pairs: &[Pair], opts: PairOpts) -> Result<Vec<Row<(f64, u32)>>> {
        let codec =
            self.codec()?.ok_or_else(|| Error::Input(format!("model `{}`: remote log-probs need `tokenizer:`", self.model.name)))?;
        let server = self.model.spec.server;
        let mut reqs = Vec::with_capacity(pairs.len());
        let mut seqs = Vec::with_capacity(pairs.len());
        for p in pairs {
            let (ids, n_prompt) = self.pair_ids(&codec, p, opts.chat_template)?;
            let body = match server {
                ServerKind::Sglang => json!({
                    "input_ids": ids,
                    "sampling_params": {"max_new_tokens": 0, "temperature": 0},
                    "return_logprob": true,
                    "logprob_start_len": 0,
                }),
                _ => json!({"model": self.model.spec.model, "prompt": ids, "echo": true, "logprobs": 1, "max_tokens": 0, "temperature": 0}),
            };
            let endpoint = if server == ServerKind::Sglang { Endpoint::Root("generate") } else { Endpoint::V1("completions") };
            reqs.push(Request { endpoint, body, route: route(p.prompt_id) });
            seqs.push((ids, n_prompt));
        }
        // The shape is checked before the answer is cached; its length against the ids below.
        let check = |v: &Value| token_logprobs(v, server, &[0]).map(|_| ());
        let outcomes = self.send(cx, tag, reqs, &check)?;
        outcomes
            .into_iter()
            .zip(&seqs)
            .map(|(o, (ids, n_prompt))| {
                row_of(o, |v| {
                    let lps = token_logprobs(v, server, ids)?;
                    Ok((lps[*n_prompt..].iter().sum(), (ids.len() - n_prompt) as u32))
                })
            })
            .collect()
    }

    fn run_info(&self) -> Option<Value> {
        let client = self.client.get()?.as_ref().ok()?;
        let mut info = client.info();
        if let (Some(Ok(s)), Value::Object(m)) = (self.session.get(), &mut info) {
            m.insert("requests".into(), serde_json::to_value(s.stats()).unwrap_or(Value::Null));
        }
        Some(info)
    }
}
