//! What an HTTP answer means for the request: use it, retry it, drop the row
//! (context too long) or reject it (other 4xx). Error bodies come as
//! `{"error":{"message","type","code"}}` (OpenAI, llama.cpp, SGLang),
//! `{"object":"error","message","type","code"}` (vLLM) or plain text.

use std::time::Duration;

use serde_json::Value;

use crate::excerpt;

/// Characters of a server's message quoted in errors (DESIGN §11).
pub(crate) const QUOTE: usize = 300;

#[derive(Debug, PartialEq)]
pub(crate) enum Verdict {
    /// 2xx: the body is the answer.
    Success,
    /// 408, 429, 5xx: try again; `down` (5xx) counts against the endpoint.
    Retry { message: String, down: bool, retry_after: Option<Duration> },
    /// A 4xx that says the prompt does not fit the context.
    TooLong(String),
    /// Any other answer: fail the stage, or drop the row with `on_request_error: drop`.
    Rejected(String),
}

pub(crate) fn classify(status: u16, body: &[u8], retry_after: Option<Duration>) -> Verdict {
    let message = || format!("HTTP {status}: {}", server_message(body));
    match status {
        200..=299 => Verdict::Success,
        408 | 429 => Verdict::Retry { message: message(), down: false, retry_after },
        500..=599 => Verdict::Retry { message: message(), down: true, retry_after },
        400 | 413 | 422 if is_context_error(body) => Verdict::TooLong(message()),
        _ => Verdict::Rejected(message()),
    }
}

/// The server's own words: `error.message` / `message` where the body is a
/// JSON error, else the body; at most [`QUOTE`] characters.
pub(crate) fn server_message(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let msg = serde_json::from_slice::<Value>(body).ok().and_then(|v| {
        let m = v.get("error").and_then(|e| e.get("message").or(Some(e))).or_else(|| v.get("message")).or_else(|| v.get("detail"))?;
        Some(match m {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
    });
    let msg = msg.unwrap_or_else(|| text.trim().to_string());
    excerpt(&msg, QUOTE)
}

/// Context-length errors: by `code`/`type` where the server gives one, then
/// by the message as vLLM and SGLang word it.
fn is_context_error(body: &[u8]) -> bool {
    const CODES: [&str; 3] = ["context_length_exceeded", "exceed_context_size_error", "string_above_max_length"];
    const PHRASES: [&str; 7] = [
        "maximum context length",        // OpenAI, vLLM: "This model's maximum context length is …"
        "context length",                // SGLang: "… is longer than the model's context length (…)"
        "maximum model length",          // vLLM: "The decoder prompt (length …) is longer than the maximum model length of …"
        "context window",                // APIs: "exceeds the context window"
        "exceeds the available context", // llama.cpp: "the request exceeds the available context size"
        "context size",                  // llama.cpp wording of the same
        "too long",                      // vLLM/SGLang: "prompt is too long", "input is too long"
    ];
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let err = v.get("error").filter(|e| e.is_object()).unwrap_or(&v);
    for field in ["code", "type"] {
        if let Some(s) = err.get(field).and_then(Value::as_str) {
            if CODES.contains(&s) {
                return true;
            }
        }
    }
    let text = match err.get("message").and_then(Value::as_str) {
        Some(m) => m.to_lowercase(),
        None => String::from_utf8_lossy(body).to_lowercase(),
    };
    PHRASES.iter().any(|p| text.contains(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn too_long(body: &str) -> bool {
        matches!(classify(400, body.as_bytes(), None), Verdict::TooLong(_))
    }

    #[test]
    fn context_errors_of_each_server() {
        // OpenAI: code.
        assert!(too_long(
            r#"{"error":{"message":"This model's maximum context length is 8192 tokens.","type":"invalid_request_error","code":"context_length_exceeded"}}"#
        ));
        // llama.cpp: type.
        assert!(too_long(
            r#"{"error":{"code":400,"message":"request (9000 tokens) exceeds the available context size (4096 tokens), try increasing it","type":"exceed_context_size_error","n_prompt_tokens":9000,"n_ctx":4096}}"#
        ));
        // vLLM: top-level object.
        assert!(too_long(
            r#"{"object":"error","message":"This model's maximum context length is 2048 tokens. However, you requested 3000 tokens (2900 in the messages, 100 in the completion).","type":"BadRequestError","param":null,"code":400}"#
        ));
        assert!(too_long(
            r#"{"object":"error","message":"The decoder prompt (length 5000) is longer than the maximum model length of 4096.","type":"BadRequestError","code":400}"#
        ));
        // SGLang.
        assert!(too_long(
            r#"{"object":"error","message":"The input (5000 tokens) is longer than the model's context length (4096 tokens).","type":"BadRequestError","code":400}"#
        ));
        // Plain text.
        assert!(too_long("Prompt is too long"));
        assert!(!too_long(r#"{"error":{"message":"Invalid value for temperature","type":"invalid_request_error","code":null}}"#));
    }

    #[test]
    fn statuses() {
        let ra = Some(Duration::from_secs(2));
        assert_eq!(classify(429, b"slow down", ra), Verdict::Retry { message: "HTTP 429: slow down".into(), down: false, retry_after: ra });
        assert!(matches!(classify(408, b"", None), Verdict::Retry { down: false, .. }));
        assert!(matches!(classify(503, b"", None), Verdict::Retry { down: true, .. }));
        assert_eq!(classify(200, b"{}", None), Verdict::Success);
        assert_eq!(classify(401, br#"{"error":{"message":"bad key"}}"#, None), Verdict::Rejected("HTTP 401: bad key".into()));
    }

    #[test]
    fn messages_are_quoted_and_capped() {
        assert_eq!(server_message(br#"{"object":"error","message":"nope","type":"BadRequestError"}"#), "nope");
        assert_eq!(server_message(br#"{"detail":"Not Found"}"#), "Not Found");
        assert_eq!(server_message(br#"{"error":"flat"}"#), "flat");
        let long = "x".repeat(1000);
        // 300 characters and an ellipsis.
        assert_eq!(server_message(long.as_bytes()).chars().count(), QUOTE + 1);
    }
}
