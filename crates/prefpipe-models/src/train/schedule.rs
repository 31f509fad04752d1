//! Learning-rate schedules: linear warmup, then constant or cosine decay to
//! 0 — the same numbers as transformers' `get_constant_schedule_with_warmup`
//! and `get_cosine_schedule_with_warmup` (num_cycles = 0.5), with
//! `warmup_steps = ceil(warmup_ratio · total_steps)` as `TrainingArguments`
//! computes it.

use serde::{Deserialize, Serialize};

/// What follows the warmup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    /// The peak learning rate until the end.
    #[default]
    Constant,
    /// Half a cosine from the peak down to 0 at the last step.
    Cosine,
}

/// The learning rate of every optimizer step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: LrSchedule,
    pub peak: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl Schedule {
    pub fn new(kind: LrSchedule, peak: f64, warmup_ratio: f64, total_steps: u64) -> Self {
        let warmup_steps = (warmup_ratio * total_steps as f64).ceil() as u64;
        Schedule { kind, peak, warmup_steps, total_steps }
    }

    /// The learning rate used by optimizer step `step` (1-based). transformers'
    /// `LambdaLR` evaluates its lambda at the number of steps already taken,
    /// `step − 1`, so the first warmup step has learning rate 0.
    pub fn lr(&self, step: u64) -> f64 {
        let s = step.saturating_sub(1) as f64;
        let w = self.warmup_steps as f64;
        let factor = if s < w {
            s / w.max(1.0)
        } else {
            match self.kind {
                LrSchedule::Constant => 1.0,
                LrSchedule::Cosine => {
                    let progress = (s - w) / ((self.total_steps as f64 - w).max(1.0));
                    (0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())).max(0.0)
                }
            }
        };
        self.peak * factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// transformers 5.x, `get_cosine_schedule_with_warmup(opt, 2, 10)` with lr 1.0:
    /// [0.0, 0.5, 1.0, 0.9619397662556434, 0.8535533905932737, 0.6913417161825449,
    ///  0.5, 0.30865828381745514, 0.14644660940672627, 0.03806023374435663]
    #[test]
    fn cosine_matches_transformers() {
        let s = Schedule::new(LrSchedule::Cosine, 1.0, 0.2, 10);
        assert_eq!(s.warmup_steps, 2);
        let want = [
            0.0,
            0.5,
            1.0,
            0.9619397662556434,
            0.8535533905932737,
            0.6913417161825449,
            0.5,
            0.30865828381745514,
            0.14644660940672627,
            0.03806023374435663,
        ];
        for (i, w) in want.iter().enumerate() {
            assert!((s.lr(i as u64 + 1) - w).abs() < 1e-15, "step {}: {} vs {w}", i + 1, s.lr(i as u64 + 1));
        }
    }

    #[test]
    fn constant_with_and_without_warmup() {
        let s = Schedule::new(LrSchedule::Constant, 2e-5, 0.0, 7);
        assert!((1..=7).all(|t| s.lr(t) == 2e-5));
        // ceil(0.25 · 7) = 2 warmup steps: 0, ½·peak, then peak.
        let s = Schedule::new(LrSchedule::Constant, 2e-5, 0.25, 7);
        assert_eq!([s.lr(1), s.lr(2), s.lr(3), s.lr(7)], [0.0, 1e-5, 2e-5, 2e-5]);
    }
}
