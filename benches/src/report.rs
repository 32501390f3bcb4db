//! The report of a run: `target/bench/report.json` in the shape of issue 4,
//! and the table printed at the end.

use serde::Serialize;
use serde_json::Value;

/// `{"machine": {...}, "scenarios": [...]}`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    pub(crate) machine: Value,
    pub(crate) scenarios: Vec<Scenario>,
}

/// One scenario with its same-run baseline.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Scenario {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) engine: String,
    pub(crate) value: f64,
    pub(crate) unit: String,
    /// `null` for an absolute bound (S5).
    pub(crate) baseline: Option<Baseline>,
    /// `null` when there is no baseline.
    pub(crate) ratio: Option<f64>,
    pub(crate) details: Value,
}

/// What a scenario is compared with.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Baseline {
    pub(crate) name: String,
    pub(crate) value: f64,
    pub(crate) unit: String,
}

/// Rounds to `digits` decimals (for a readable report).
pub(crate) fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

fn cell(x: f64) -> String {
    if x.abs() >= 1000.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.3}")
    }
}

/// Prints the results as a markdown table (pasted into docs/performance.md).
pub(crate) fn print_table(report: &Report) {
    println!();
    println!("| id | scenario | value | baseline | ratio | target | met |");
    println!("|---|---|---|---|---|---|---|");
    for s in &report.scenarios {
        let baseline = s.baseline.as_ref().map_or("—".to_owned(), |b| {
            format!("{} {} ({})", cell(b.value), b.unit, b.name)
        });
        let ratio = s.ratio.map_or("—".to_owned(), |r| format!("{r:.3}"));
        let target = s.details["target"].as_str().unwrap_or("");
        let met = match s.details["target_met"].as_bool() {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "",
        };
        println!(
            "| {} | {} | {} {} | {} | {} | {} | {} |",
            s.id,
            s.name,
            cell(s.value),
            s.unit,
            baseline,
            ratio,
            target,
            met
        );
    }
    println!();
}
