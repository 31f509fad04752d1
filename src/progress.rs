//! Progress: bars on a TTY (indicatif), plain or JSON lines otherwise.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::Mutex;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use prefpipe_core::exec::{RunReport, StageReport};

use crate::LogFormat;

pub struct Reporter {
    format: LogFormat,
    tty: bool,
    multi: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
}

impl Reporter {
    pub fn new(format: LogFormat) -> Self {
        let tty = format == LogFormat::Text && std::io::stderr().is_terminal();
        Reporter { format, tty, multi: MultiProgress::new(), bars: Mutex::new(HashMap::new()) }
    }

    fn line(&self, s: &str) {
        if self.tty {
            let _ = self.multi.println(s);
        } else {
            let _ = writeln!(std::io::stderr(), "{s}");
        }
    }

    fn json(&self, v: serde_json::Value) {
        let _ = writeln!(std::io::stderr(), "{v}");
    }

    /// A dataset card written beside an export (DESIGN §14).
    pub fn card(&self, path: &Path) {
        match self.format {
            LogFormat::Json => self.json(serde_json::json!({"event": "card_written", "path": path})),
            LogFormat::Text => self.line(&format!("{:<12} card    → {}", "", path.display())),
        }
    }

    /// The closing summary (stdout stays free for data); `run_json` is a
    /// path or, on an object store, a URL.
    pub fn finish(&self, report: &RunReport, run_json: &str) {
        match self.format {
            LogFormat::Json => self.json(serde_json::json!({
                "event": "run_finished", "pipeline": report.pipeline, "elapsed_s": report.elapsed_s,
                "run_json": run_json,
            })),
            LogFormat::Text => self.line(&format!("done in {:.2}s; manifest {run_json}", report.elapsed_s)),
        }
    }

    /// A shard finished its chunks; `left` are the stages a run without `--shard` runs.
    pub fn shard_done(&self, shard: &str, left: &[&str]) {
        match self.format {
            LogFormat::Json => self.json(serde_json::json!({"event": "shard_finished", "shard": shard, "deferred": left})),
            LogFormat::Text if left.is_empty() => self.line(&format!("shard {shard}: done")),
            LogFormat::Text => {
                self.line(&format!("shard {shard}: done; a run without --shard finishes {} once every shard is done", left.join(", ")))
            }
        }
    }
}

impl prefpipe_core::exec::Reporter for Reporter {
    fn stage_started(&self, id: &str, kind: &str, status: &str, total: u64) {
        match self.format {
            LogFormat::Json => {
                self.json(serde_json::json!({"event": "stage_started", "stage": id, "kind": kind, "status": status, "chunks": total}))
            }
            LogFormat::Text if self.tty && status != "cached" && total > 1 => {
                let bar = self.multi.add(ProgressBar::new(total));
                bar.set_style(
                    ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} chunks {elapsed_precise} eta {eta}")
                        .expect("valid template")
                        .progress_chars("=> "),
                );
                bar.set_prefix(id.to_string());
                self.bars.lock().expect("lock").insert(id.to_string(), bar);
            }
            LogFormat::Text => {}
        }
    }

    fn progress(&self, id: &str, done: u64, total: u64) {
        match self.format {
            LogFormat::Json => self.json(serde_json::json!({"event": "progress", "stage": id, "done": done, "total": total})),
            LogFormat::Text => {
                if let Some(b) = self.bars.lock().expect("lock").get(id) {
                    b.set_length(total);
                    b.set_position(done);
                }
            }
        }
    }

    fn warning(&self, stage: &str, message: &str) {
        match self.format {
            LogFormat::Json => self.json(serde_json::json!({"event": "warning", "stage": stage, "message": message})),
            LogFormat::Text => self.line(&format!("warning: stage `{stage}`: {message}")),
        }
    }

    fn stage_deferred(&self, id: &str, kind: &str, why: &str) {
        match self.format {
            LogFormat::Json => self.json(serde_json::json!({"event": "stage_deferred", "stage": id, "kind": kind, "reason": why})),
            LogFormat::Text => self.line(&format!("{id:<12} {kind:<7} waiting  {why}")),
        }
    }

    fn stage_finished(&self, r: &StageReport) {
        if let Some(b) = self.bars.lock().expect("lock").remove(&r.id) {
            b.finish_and_clear();
        }
        match self.format {
            LogFormat::Json => self.json(serde_json::json!({"event": "stage_finished", "stage": r})),
            LogFormat::Text => {
                let drops = if r.drops.is_empty() {
                    String::new()
                } else {
                    let d: Vec<String> = r.drops.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    format!(", dropped {}", d.join(" "))
                };
                let out = r.output.as_ref().map(|p| format!(" → {}", p.display())).unwrap_or_default();
                self.line(&format!(
                    "{:<12} {:<7} {:<8} {} rows in, {} out{drops} ({:.2}s){out}",
                    r.id, r.kind, r.status, r.rows_in, r.rows_out, r.elapsed_s
                ));
            }
        }
    }
}
