//! Conversations (DESIGN §4, §15; issue 16) against TRL 1.16 and transformers:
//! tests/golden/chat/<family>.json, written by tests/reference/chat_golden.py
//! (its command line and versions are in each file) for tiny models carrying
//! the real Llama-3.1, Qwen2.5 and Qwen3 chat templates. For every example —
//! multi-turn with a system prompt, without one, and a plain string prompt
//! (the one-turn conversation) — the rendered prompt ids, TRL's response ids,
//! the summed log-probs under policy and reference, the reward model's input
//! and reward, and the per-pair DPO loss must all equal the reference.

use std::path::{Path, PathBuf};

use prefpipe_models::codec::common_prefix;
use prefpipe_models::{ChatMessage, Device, Model, Prompt};
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Within 1e-4 relative (f32 forward passes; the reference sums in float64).
fn close(got: f64, want: f64, what: &str) {
    assert!((got - want).abs() <= 1e-4 * want.abs().max(1.0), "{what}: prefpipe {got} vs reference {want}");
}

fn check_family(family: &str) {
    let g: Value = serde_json::from_slice(&std::fs::read(repo().join(format!("tests/golden/chat/{family}.json"))).unwrap()).unwrap();
    let load = |k: &str| Model::load(&repo().join(g[k].as_str().unwrap()), &Device::Cpu).unwrap();
    let (policy, reference, rm) = (load("policy"), load("reference"), load("reward_model"));
    let beta = g["beta"].as_f64().unwrap();
    let mut losses = Vec::new();
    for ex in g["examples"].as_array().unwrap() {
        let name = format!("{family}/{}", ex["name"].as_str().unwrap());
        let messages: Vec<ChatMessage> = ex["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| ChatMessage { role: m["role"].as_str().unwrap().into(), content: m["content"].as_str().unwrap().into() })
            .collect();
        // A plain string prompt with `chat_template: true` is the one-turn conversation.
        let prompt = match ex.get("string_prompt").and_then(Value::as_str) {
            Some(s) => Prompt::Text(s),
            None => Prompt::Chat(&messages),
        };
        // transformers: apply_chat_template(messages, add_generation_prompt=True), no special tokens.
        let prompt_ids = policy.prompt_ids(prompt, true).unwrap();
        assert_eq!(prompt_ids, ids(&ex["prompt_ids"]), "{name}: prompt ids");
        let side = |s: &str| {
            let want = &ex[s];
            let text = want["text"].as_str().unwrap();
            // TRL: the full conversation's ids from the common prefix with the prompt's; no EOS appended.
            let (p, r) = policy.pair_ids(prompt, text, true).unwrap();
            assert_eq!(p.len(), want["prefix_len"].as_u64().unwrap() as usize, "{name} {s}: prefix");
            assert_eq!(r, ids(&want["response_ids"]), "{name} {s}: response ids");
            assert_eq!(r.len() as u64, want["n_tokens"].as_u64().unwrap());
            let lp = policy.logprobs(&[(p.clone(), r.clone())]).unwrap()[0];
            close(lp, want["logp_policy"].as_f64().unwrap(), &format!("{name} {s}: logp_policy"));
            let lr = reference.logprobs(&[(p, r)]).unwrap()[0];
            close(lr, want["logp_reference"].as_f64().unwrap(), &format!("{name} {s}: logp_reference"));
            // The reward model's own template over the whole conversation (the model cards' recipe).
            let rm_ids = rm.reward_ids(prompt, text, true).unwrap();
            assert_eq!(rm_ids, ids(&want["rm_ids"]), "{name} {s}: reward-model ids");
            let reward = rm.scores(&[rm_ids]).unwrap()[0][0];
            close(f64::from(reward), want["reward"].as_f64().unwrap(), &format!("{name} {s}: reward"));
        };
        side("chosen");
        side("rejected");
        // The pair as DPOTrainer._prepare_dataset builds it: k = the smaller prefix.
        let trl = &ex["trl"];
        let (pc, c) = policy.pair_ids(prompt, ex["chosen"]["text"].as_str().unwrap(), true).unwrap();
        let (pr, r) = policy.pair_ids(prompt, ex["rejected"]["text"].as_str().unwrap(), true).unwrap();
        let k = common_prefix(&pc, &pr).min(pc.len()).min(pr.len());
        assert_eq!(k as u64, trl["prefix_len"].as_u64().unwrap(), "{name}: pair prefix");
        let prompt_k = pc[..k].to_vec();
        let chosen = [&pc[k..], c.as_slice()].concat();
        let rejected = [&pr[k..], r.as_slice()].concat();
        assert_eq!(prompt_k, ids(&trl["prompt_ids"]), "{name}: TRL prompt_ids");
        assert_eq!(chosen, ids(&trl["chosen_ids"]), "{name}: TRL chosen_ids");
        assert_eq!(rejected, ids(&trl["rejected_ids"]), "{name}: TRL rejected_ids");
        let lp = |m: &Model, resp: &[u32]| m.logprobs(&[(prompt_k.clone(), resp.to_vec())]).unwrap()[0];
        // DPO (Rafailov et al. 2023, TRL loss_type sigmoid): −log σ(β·((πc − refc) − (πr − refr))).
        let h = (lp(&policy, &chosen) - lp(&reference, &chosen)) - (lp(&policy, &rejected) - lp(&reference, &rejected));
        let loss = -(1.0 / (1.0 + (-beta * h).exp())).ln();
        close(loss, ex["dpo"]["loss"].as_f64().unwrap(), &format!("{name}: DPO loss"));
        losses.push(loss);
    }
    // DPOTrainer.compute_loss on one batch of every example = the mean per-pair loss (step 1).
    let mean = losses.iter().sum::<f64>() / losses.len() as f64;
    close(mean, g["dpo_step1"]["loss"].as_f64().unwrap(), &format!("{family}: DPO step-1 loss"));
}

#[test]
fn llama31_template_equals_trl() {
    check_family("llama31");
}

#[test]
fn qwen25_template_equals_trl() {
    check_family("qwen25");
}

#[test]
fn qwen3_template_equals_trl() {
    check_family("qwen3");
}
