//! `ddome bench zero-shot`: every method on the same split and seeds, written as JSON and as a
//! markdown table in the paper's format.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::simulate::{Method, RoundMetrics, RunResult, mean_std};

/// Everything a bench produced, as written to `results.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchReport {
    /// A one-line description of the setting (dataset, skew, S, M, K).
    pub setting: String,
    /// The command line that produced it.
    pub command: String,
    /// Class names, for the routing matrix.
    pub classes: Vec<String>,
    /// Seconds spent loading the dataset.
    pub load_secs: f64,
    /// Seconds spent embedding (0 when cached).
    pub embed_secs: f64,
    /// Every run, in method-then-seed order.
    pub runs: Vec<RunResult>,
    /// Total wall time of the bench.
    pub wall_secs: f64,
    /// The machine it ran on.
    pub machine: String,
}

/// Evaluation points averaged in [`MethodSummary::mean_last`].
pub const LAST_EVALUATIONS: usize = 3;

/// The mean zero-shot accuracy over a run's last [`LAST_EVALUATIONS`] evaluation points
/// (fewer when it has fewer; its final accuracy when it has none).
fn last_evaluations_mean(history: &[RoundMetrics], final_accuracy: f64) -> f64 {
    let last = &history[history.len().saturating_sub(LAST_EVALUATIONS)..];
    if last.is_empty() {
        return final_accuracy;
    }
    last.iter().map(|m| m.zero_shot).sum::<f64>() / last.len() as f64
}

/// Per-method summary over seeds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MethodSummary {
    /// The method.
    pub method: Method,
    /// Mean over seeds of the zero-shot accuracy (top-expert rule).
    pub mean: f64,
    /// Standard deviation of that accuracy across seeds.
    pub std_seeds: f64,
    /// Mean over seeds of each run's mean zero-shot accuracy over its last
    /// [`LAST_EVALUATIONS`] evaluation points: less at the mercy of one round's swing.
    #[serde(default)]
    pub mean_last: f64,
    /// Mean over seeds of the across-device standard deviation.
    pub std_devices: f64,
    /// Mean over seeds of the mixture-rule accuracy.
    pub mean_mixture: f64,
    /// Mean over seeds of the zero-shot accuracy on the validation devices (top-expert
    /// rule), when every run had them.
    #[serde(default)]
    pub validation: Option<f64>,
    /// Seeds run.
    pub seeds: usize,
}

impl BenchReport {
    /// Summaries in [`Method::ALL`] order, for the methods that ran.
    pub fn summaries(&self) -> Vec<MethodSummary> {
        Method::ALL
            .iter()
            .filter_map(|&method| {
                let runs: Vec<&RunResult> = self
                    .runs
                    .iter()
                    .filter(|r| r.config.method == method)
                    .collect();
                if runs.is_empty() {
                    return None;
                }
                let accs: Vec<f64> = runs.iter().map(|r| r.zero_shot.mean).collect();
                let (mean, std_seeds) = mean_std(&accs);
                let n = runs.len() as f64;
                Some(MethodSummary {
                    method,
                    mean,
                    std_seeds,
                    mean_last: runs
                        .iter()
                        .map(|r| last_evaluations_mean(&r.history, r.zero_shot.mean))
                        .sum::<f64>()
                        / n,
                    std_devices: runs.iter().map(|r| r.zero_shot.std).sum::<f64>() / n,
                    mean_mixture: runs.iter().map(|r| r.zero_shot.mean_mixture).sum::<f64>() / n,
                    validation: runs
                        .iter()
                        .map(|r| r.validation.as_ref().map(|v| v.mean))
                        .sum::<Option<f64>>()
                        .map(|sum| sum / n),
                    seeds: runs.len(),
                })
            })
            .collect()
    }

    /// The markdown report: the paper-style table, details, accuracy against rounds and
    /// DDOME's routing matrix.
    pub fn markdown(&self) -> String {
        let summaries = self.summaries();
        let pct = |v: f64| format!("{:.1}", 100.0 * v);
        let mut md = String::new();
        let _ = writeln!(md, "### {}\n", self.setting);
        let _ = writeln!(md, "`{}`\n", self.command);
        // The paper's format: one row per setting, one column per method.
        let _ = writeln!(
            md,
            "| setting | {} |",
            summaries
                .iter()
                .map(|s| column_name(s.method))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        let _ = writeln!(md, "|---|{}", "---|".repeat(summaries.len()));
        let _ = writeln!(
            md,
            "| zero-shot accuracy, % (mean ± std over {} seed(s)) | {} |\n",
            summaries.first().map_or(0, |s| s.seeds),
            summaries
                .iter()
                .map(|s| format!("{} ± {}", pct(s.mean), pct(s.std_seeds)))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        let _ = writeln!(
            md,
            "| method | zero-shot (top expert) | mean of the last {LAST_EVALUATIONS} evaluations | spread across devices (std) | zero-shot (mixture) | rounds | bytes down / up per round (f32) | wall s per run |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
        for s in &summaries {
            let runs: Vec<&RunResult> = self
                .runs
                .iter()
                .filter(|r| r.config.method == s.method)
                .collect();
            let first = runs[0];
            let wall = runs.iter().map(|r| r.wall_secs).sum::<f64>() / runs.len() as f64;
            let _ = writeln!(
                md,
                "| {} | {} ± {} | {} | {} | {} | {} | {} / {} | {:.0} |",
                s.method.name(),
                pct(s.mean),
                pct(s.std_seeds),
                pct(s.mean_last),
                pct(s.std_devices),
                pct(s.mean_mixture),
                first.config.rounds,
                human_bytes(first.bytes_per_round.downlink),
                human_bytes(first.bytes_per_round.uplink),
                wall
            );
        }
        let validation: Vec<String> = summaries
            .iter()
            .filter_map(|s| Some(format!("{} {}", s.method.name(), pct(s.validation?))))
            .collect();
        if !validation.is_empty() {
            let _ = writeln!(
                md,
                "\nZero-shot accuracy on the validation devices (held-out train images, what \
                 settings are chosen by; the test devices are not): {}.",
                validation.join(", ")
            );
        }
        let oracles: Vec<String> = summaries
            .iter()
            .filter_map(|s| {
                let values: Vec<f64> = self
                    .runs
                    .iter()
                    .filter(|r| r.config.method == s.method)
                    .filter_map(|r| r.ceilings.label_set_oracle)
                    .collect();
                (!values.is_empty()).then(|| {
                    let mean = values.iter().sum::<f64>() / values.len() as f64;
                    format!("{} {}%", s.method.name(), pct(mean))
                })
            })
            .collect();
        if !oracles.is_empty() {
            let _ = writeln!(
                md,
                "\nLabel-set oracle, a ceiling for personalising one model (its predictions restricted to each test device's true labels; reads the labels, so not a method): {}.",
                oracles.join(", ")
            );
        }
        let _ = writeln!(
            md,
            "\nZero-shot accuracy (%) against rounds, first seed (the central reference counts epochs, not rounds, so it is left out):\n"
        );
        let first_seed: Vec<&RunResult> = summaries
            .iter()
            .filter(|s| s.method != Method::Central)
            .filter_map(|s| self.runs.iter().find(|r| r.config.method == s.method))
            .collect();
        if let Some(longest) = first_seed.iter().max_by_key(|r| r.history.len()) {
            let _ = writeln!(
                md,
                "| round | {} |",
                first_seed
                    .iter()
                    .map(|r| r.config.method.name())
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
            let _ = writeln!(md, "|---|{}", "---|".repeat(first_seed.len()));
            for (i, point) in longest.history.iter().enumerate() {
                let cells: Vec<String> = first_seed
                    .iter()
                    .map(|r| r.history.get(i).map_or("".into(), |m| pct(m.zero_shot)))
                    .collect();
                let _ = writeln!(md, "| {} | {} |", point.round, cells.join(" | "));
            }
        }
        for run in first_seed
            .iter()
            .filter(|r| r.config.method == Method::Ddome)
        {
            let _ = writeln!(
                md,
                "\nDDOME routing on the test devices (rows: expert chosen by the gate, columns: true label; seed {}):\n",
                run.config.seed
            );
            let _ = writeln!(md, "| expert | {} |", self.classes.join(" | "));
            let _ = writeln!(md, "|---|{}", "---|".repeat(self.classes.len()));
            for (e, row) in run.zero_shot.routing.iter().enumerate() {
                let cells: Vec<String> = row.iter().map(|c| c.to_string()).collect();
                let _ = writeln!(md, "| {e} | {} |", cells.join(" | "));
            }
            let _ = writeln!(
                md,
                "\nShare of each anchor's labels (test split) the gate routes to that anchor's expert: {}",
                run.anchor_routing
                    .iter()
                    .enumerate()
                    .map(|(q, s)| format!("expert {q}: {}%", pct(*s)))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            if let (Some(selected), Some(best)) = (
                run.ceilings.anchor_coverage_selected,
                run.ceilings.anchor_coverage_best,
            ) {
                let _ = writeln!(
                    md,
                    "\nShare of a test device's samples whose label belongs to the anchors of its K experts: {}% with the experts it selected, {}% with the best K (perfect specialists could be right on no other sample).",
                    pct(selected),
                    pct(best)
                );
            }
            let t = &run.timings;
            let _ = writeln!(
                md,
                "\nWhere DDOME's time went (s): training {:.1}, ranking {:.1}, aggregation {:.1}, evaluation {:.1}; wall {:.1}.",
                t.training, t.ranking, t.aggregation, t.evaluation, run.wall_secs
            );
        }
        let _ = writeln!(
            md,
            "\nDataset load {:.1} s; embedding {:.1} s{}; bench wall {:.0} s on {}.",
            self.load_secs,
            self.embed_secs,
            if self.embed_secs == 0.0 {
                " (cached)"
            } else {
                ""
            },
            self.wall_secs,
            self.machine
        );
        md
    }
}

fn column_name(method: Method) -> &'static str {
    match method {
        Method::Central => "common-expert reference (central)",
        Method::Fedavg => "FedAvg",
        Method::Fedprox => "FedProx",
        Method::Fedmix => "FedMix",
        Method::Ddome => "DDOME",
    }
}

fn human_bytes(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}

/// "2 cores, 23 GiB" style description of this machine.
pub fn machine_description() -> String {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    format!("{cores} cores, {cpu}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(round: usize, zero_shot: f64) -> RoundMetrics {
        RoundMetrics {
            round,
            train_loss: 1.0,
            zero_shot,
            zero_shot_std: 0.0,
            zero_shot_mixture: zero_shot,
            anchor_routing: Vec::new(),
            validation: None,
            validation_mixture: None,
            elapsed_secs: 0.0,
        }
    }

    #[test]
    fn the_last_evaluations_are_averaged_and_only_those() {
        let history: Vec<RoundMetrics> = [0.9, 0.1, 0.2, 0.3]
            .iter()
            .enumerate()
            .map(|(i, &acc)| point(5 * (i + 1), acc))
            .collect();
        assert!((last_evaluations_mean(&history, 0.3) - 0.2).abs() < 1e-12);
        assert!((last_evaluations_mean(&history[2..], 0.3) - 0.25).abs() < 1e-12);
        assert_eq!(last_evaluations_mean(&[], 0.42), 0.42);
    }
}
