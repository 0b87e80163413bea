//! `/metrics` in Prometheus' text exposition format (version 0.0.4).
//!
//! Every figure is read from the database at each scrape: the database is
//! the truth, it survives restarts of the coordinator, and it is shared by
//! several coordinators on one PostgreSQL. That leaves no metric state in
//! the process for a metrics crate to keep, and the format for a few gauges
//! and one histogram is a handful of lines, so it is written here by hand.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::{AppState, WebError, api::ApiError};
use crate::model::{BuildStatus, EvaluationStatus, now};

/// Upper bounds (seconds) of the build duration histogram's buckets.
pub const DURATION_BUCKETS: [i64; 11] = [1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200];

/// Agents that asked for work this recently count as online.
const AGENT_ONLINE_SECS: i64 = 300;

pub async fn handler(State(state): State<AppState>) -> Result<Response, ApiError> {
    let text = render(&state).await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// A metric's `# HELP` and `# TYPE` lines.
fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Escapes a label value as the format requires (backslash, quote, newline).
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The whole exposition.
pub async fn render(state: &AppState) -> Result<String, WebError> {
    let db = &state.db;
    let mut out = String::new();

    let counts = db.status_counts(None).await?;
    header(&mut out, "kiln_ci_builds", "gauge", "Builds per status.");
    for status in BuildStatus::ALL {
        let n = counts.get(&status).copied().unwrap_or(0);
        let _ = writeln!(out, "kiln_ci_builds{{status=\"{status}\"}} {n}");
    }
    let count = |status| counts.get(&status).copied().unwrap_or(0);
    header(
        &mut out,
        "kiln_ci_queue_length",
        "gauge",
        "Builds waiting to run (submitted or scheduled).",
    );
    let _ = writeln!(
        out,
        "kiln_ci_queue_length {}",
        count(BuildStatus::Submitted) + count(BuildStatus::Scheduled)
    );
    header(
        &mut out,
        "kiln_ci_builds_running",
        "gauge",
        "Builds running now.",
    );
    let _ = writeln!(
        out,
        "kiln_ci_builds_running {}",
        count(BuildStatus::Started)
    );

    let evaluations = db.evaluation_counts().await?;
    header(
        &mut out,
        "kiln_ci_evaluations",
        "gauge",
        "Evaluations per status.",
    );
    for status in [
        EvaluationStatus::Started,
        EvaluationStatus::Succeeded,
        EvaluationStatus::Failed,
        EvaluationStatus::Aborted,
    ] {
        let n = evaluations.get(&status).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "kiln_ci_evaluations{{status=\"{}\"}} {n}",
            status.as_str()
        );
    }
    let specifications = db.list_specifications().await?;
    header(
        &mut out,
        "kiln_ci_specifications",
        "gauge",
        "Specifications.",
    );
    let _ = writeln!(out, "kiln_ci_specifications {}", specifications.len());

    // Builds found already built never ran and are not counted.
    let histogram = db.build_duration_histogram(&DURATION_BUCKETS).await?;
    let name = "kiln_ci_build_duration_seconds";
    header(&mut out, name, "histogram", "How long ended builds ran.");
    for (bound, n) in &histogram.cumulative {
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", histogram.count);
    let _ = writeln!(out, "{name}_sum {}", histogram.sum);
    let _ = writeln!(out, "{name}_count {}", histogram.count);

    let agents = db.agents().await?;
    let now = now();
    let mut by_state: BTreeMap<&str, usize> = [("online", 0), ("offline", 0), ("disabled", 0)]
        .into_iter()
        .collect();
    for agent in &agents {
        let state = if !agent.enabled {
            "disabled"
        } else if agent
            .last_seen
            .is_some_and(|t| now - t <= AGENT_ONLINE_SECS)
        {
            "online"
        } else {
            "offline"
        };
        *by_state.entry(state).or_default() += 1;
    }
    header(
        &mut out,
        "kiln_ci_agents",
        "gauge",
        "Build agents: online (asked for work in the last 5 minutes), offline, disabled.",
    );
    for (state, n) in by_state {
        let _ = writeln!(out, "kiln_ci_agents{{state=\"{state}\"}} {n}");
    }
    header(
        &mut out,
        "kiln_ci_agent_last_seen_seconds",
        "gauge",
        "When each agent last asked for work (unix seconds).",
    );
    for agent in &agents {
        if let Some(seen) = agent.last_seen {
            let _ = writeln!(
                out,
                "kiln_ci_agent_last_seen_seconds{{agent=\"{}\"}} {seen}",
                label(&agent.name)
            );
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::label;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(label("x\ny"), "x\\ny");
    }
}
