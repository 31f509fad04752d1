//! The report's page: sections, tables and inline charts in one HTML file
//! that loads nothing (its Content-Security-Policy forbids every fetch).

use serde_json::Value;

/// `default-src 'none'`: no script, font, frame or connection; only the
/// inline `<style>` and `data:` images.
pub const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; img-src data:";

const STYLE: &str = "body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1340px;padding:16px 24px;color:#222}
h1{font-size:22px;margin:8px 0}h2{font-size:17px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
nav a{margin-right:12px;color:#0072b2}code{font-size:12px;background:#f4f4f4;padding:0 3px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
td.r{text-align:right;font-variant-numeric:tabular-nums}th{background:#f7f7f7}
figure{display:inline-block;margin:6px 12px 6px 0}figcaption{font-size:12px;color:#666}
.grid{display:flex;flex-wrap:wrap}.bias{font-weight:600}.err{color:#b00}";

pub struct Page {
    title: String,
    pub summary: String,
    sections: Vec<(String, String, String)>,
}

impl Page {
    pub fn new(title: &str) -> Page {
        Page { title: title.to_string(), summary: String::new(), sections: Vec::new() }
    }

    /// Adds a section (`id` is its anchor).
    pub fn section(&mut self, id: &str, title: &str, body: String) {
        self.sections.push((id.to_string(), title.to_string(), body));
    }

    pub fn render(&self) -> String {
        let mut s = String::with_capacity(1 << 16);
        s += "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n";
        s += &format!("<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">\n");
        s += "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n";
        s += &format!("<title>prefpipe report · {}</title>\n<style>{STYLE}</style></head><body>\n", esc(&self.title));
        s += &format!("<header><h1>prefpipe report · {}</h1><p>{}</p>\n<nav>", esc(&self.title), self.summary);
        for (id, title, _) in &self.sections {
            s += &format!("<a href=\"#{}\">{}</a>", esc(id), esc(title));
        }
        s += "</nav></header>\n";
        for (id, title, body) in &self.sections {
            s += &format!("<section id=\"{}\"><h2>{}</h2>\n{body}\n</section>\n", esc(id), esc(title));
        }
        s += "</body></html>\n";
        s
    }
}

/// HTML-escapes text and attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// A key as one JSON-pointer segment (RFC 6901: `~` → `~0`, `/` → `~1`).
pub fn pointer_escape(k: &str) -> String {
    k.replace('~', "~0").replace('/', "~1")
}

/// A float for reading: 4 decimals, or the integer when it is one.
pub fn f(x: f64) -> String {
    if !x.is_finite() {
        return "–".into();
    }
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x:.4}")
    }
}

/// A float as a plain label (for chart legends).
pub fn plain(x: f64) -> String {
    f(x)
}

/// A value of `run.json`, shown and marked with its JSON pointer (and, for
/// a float shown rounded, its exact value as the title).
pub fn num(pointer: &str, v: &Value) -> String {
    let (shown, title) = match v {
        Value::Number(n) if n.is_f64() => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            (f(x), Some(n.to_string()))
        }
        Value::Number(n) => (n.to_string(), None),
        Value::String(s) => (s.clone(), None),
        Value::Null => ("null".to_string(), None),
        v => (v.to_string(), None),
    };
    let title = title.map(|t| format!(" title=\"{}\"", esc(&t))).unwrap_or_default();
    format!("<span class=\"n\" data-run-json=\"{}\"{title}>{}</span>", esc(pointer), esc(&shown))
}

/// A chart in a figure marked `data-chart`, or why it could not be drawn.
pub fn chart(name: &str, svg: Result<String, String>) -> String {
    match svg {
        Ok(svg) => format!("<figure class=\"chart\" data-chart=\"{}\">{svg}</figure>", esc(name)),
        Err(e) => format!("<p class=\"err\" data-chart-error=\"{}\">{}</p>", esc(name), esc(&e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_carry_their_pointer() {
        assert_eq!(num("/stages/0/rows_in", &serde_json::json!(238)), "<span class=\"n\" data-run-json=\"/stages/0/rows_in\">238</span>");
        // 1/3 is shown to 4 decimals; the exact value (serde_json's shortest form) is the title.
        assert_eq!(
            num("/x", &serde_json::json!(1.0 / 3.0)),
            "<span class=\"n\" data-run-json=\"/x\" title=\"0.3333333333333333\">0.3333</span>"
        );
        assert_eq!(num("/p", &serde_json::json!("a<b")), "<span class=\"n\" data-run-json=\"/p\">a&lt;b</span>");
        assert_eq!(pointer_escape("a/b~c"), "a~1b~0c");
    }

    #[test]
    fn the_page_forbids_every_fetch() {
        let mut p = Page::new("t");
        p.section("s", "S", "<p>x</p>".into());
        let h = p.render();
        assert!(h.contains("content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\""), "{h}");
        assert!(!h.contains("http://") && !h.contains("https://"), "{h}");
        assert!(h.contains("<a href=\"#s\">S</a>"));
    }
}
