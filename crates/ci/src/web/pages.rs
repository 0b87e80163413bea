//! Server-rendered HTML pages: specifications, evaluations with their diff
//! and builds, a build with its log (followed live while it runs), builds
//! by status, and agents with their machines. maud escapes every value it
//! interpolates; the only script is the log tail, which adds text nodes.

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use maud::{DOCTYPE, Markup, PreEscaped, html};

use super::api::{self, BuildQuery, BuildView, EvaluationSummary, Machine};
use super::diff::JobChange;
use super::{AppState, WebError, format};
use crate::model::{BuildStatus, Evaluation, EvaluationStatus, StatusCounts, now};

/// The pages' routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(index))
        .route("/specs/{name}", get(specification))
        .route("/evals/{id}", get(evaluation))
        .route("/builds", get(builds))
        .route("/builds/{id}", get(build))
        .route("/agents", get(agents))
}

/// [`WebError`] answered as a page.
#[derive(Debug)]
pub struct PageError(WebError);

impl<E: Into<WebError>> From<E> for PageError {
    fn from(error: E) -> PageError {
        PageError(error.into())
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let status = self.0.status();
        if status.is_server_error() {
            tracing::error!(error = %self.0, "page failed");
        }
        let title = status.canonical_reason().unwrap_or("Error");
        let body = layout(title, html! { p.error { (self.0.to_string()) } });
        (status, body).into_response()
    }
}

type PageResult = Result<Markup, PageError>;

const STYLE: &str = r#"
body { font: 15px/1.45 system-ui, sans-serif; margin: 0; color: #1d1d1f; background: #fbfbfa; }
header { background: #2b2b2b; color: #eee; padding: .5em 1.5em; display: flex; gap: 1.5em; align-items: baseline; }
header a { color: #eee; text-decoration: none; } header .brand { font-weight: 700; font-size: 1.1em; }
main { padding: 1em 1.5em 3em; max-width: 80em; }
h1 { font-size: 1.4em; margin: .3em 0 .6em; } h2 { font-size: 1.15em; margin: 1.4em 0 .5em; }
table { border-collapse: collapse; width: 100%; background: #fff; }
th, td { text-align: left; padding: .3em .7em; border-bottom: 1px solid #e4e4e2; vertical-align: top; }
th { background: #f1f1ef; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
code, pre { font: 13px/1.4 ui-monospace, monospace; }
pre.log { background: #111; color: #ddd; padding: 1em; overflow-x: auto; white-space: pre-wrap; word-break: break-all; max-height: 70vh; overflow-y: auto; }
dl { display: grid; grid-template-columns: max-content auto; gap: .2em 1.2em; } dt { color: #555; } dd { margin: 0; }
.status { display: inline-block; padding: 0 .5em; border-radius: .7em; font-size: .9em; white-space: nowrap; background: #e6e6e3; }
.s-succeeded { background: #d3f0d6; color: #14521d; }
.s-failed, .s-timed-out, .s-log-limit, .s-failed-other, .e-failed { background: #f8d4d2; color: #7c1610; }
.s-failed-dependency { background: #fbe5c8; color: #6b3d00; }
.s-started, .e-started { background: #d4e4fb; color: #123f7a; }
.s-canceled, .e-aborted { background: #e6e6e3; color: #555; text-decoration: line-through; }
.e-succeeded { background: #d3f0d6; color: #14521d; }
.counts > span { margin-right: .9em; white-space: nowrap; } .muted { color: #777; } .error { color: #7c1610; }
nav.filter a { margin-right: .8em; }
"#;

fn layout(title: &str, content: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · kiln-ci" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                header {
                    a.brand href="/" { "kiln-ci" }
                    a href="/" { "Specifications" }
                    a href="/builds?status=scheduled" { "Queue" }
                    a href="/builds?status=started" { "Running" }
                    a href="/agents" { "Agents" }
                    a href="/api/openapi.json" { "API" }
                }
                main { (content) }
            }
        }
    }
}

fn build_status(status: BuildStatus) -> Markup {
    html! { span class={ "status s-" (status.as_str()) } data-status=(status.as_str()) { (status.as_str()) } }
}

fn evaluation_status(status: EvaluationStatus) -> Markup {
    html! { span class={ "status e-" (status.as_str()) } { (status.as_str()) } }
}

fn time(unix: Option<i64>) -> Markup {
    match unix {
        Some(t) => html! { time datetime=(t) { (format::time(t)) } },
        None => html! { span.muted { "—" } },
    }
}

fn duration(secs: Option<i64>) -> Markup {
    match secs {
        Some(s) => html! { (format::duration(s)) },
        None => html! { span.muted { "—" } },
    }
}

/// Succeeded / failed / waiting figures of an evaluation, each a link to its builds.
fn counts(evaluation: i64, counts: &StatusCounts) -> Markup {
    html! {
        span.counts {
            @for (status, n) in counts {
                span { a href={ "/evals/" (evaluation) "?status=" (status.as_str()) } { (build_status(*status)) } " " (n) }
            }
        }
    }
}

fn commits(evaluation: &Evaluation) -> Markup {
    html! {
        @for (i, checkout) in evaluation.checkouts.iter().enumerate() {
            @if i > 0 { ", " }
            span title=(checkout.url) { (checkout.input) " " code { (checkout.commit.get(..12).unwrap_or(&checkout.commit)) } }
        }
    }
}

fn evaluations_table(evaluations: &[EvaluationSummary], with_spec: bool) -> Markup {
    html! {
        table {
            tr {
                th.num { "#" }
                @if with_spec { th { "Specification" } }
                th { "Status" } th { "Inputs" } th { "Created" } th { "Builds" }
            }
            @for summary in evaluations {
                @let e = &summary.evaluation;
                tr {
                    td.num { a href={ "/evals/" (e.id) } { (e.id) } }
                    @if with_spec { td { a href={ "/specs/" (e.specification) } { (e.specification) } } }
                    td { (evaluation_status(e.status)) }
                    td { (commits(e)) }
                    td { (time(Some(e.created_at))) }
                    td { (counts(e.id, &summary.counts)) }
                }
            }
        }
    }
}

fn builds_table(builds: &[&BuildView], with_evaluation: bool) -> Markup {
    html! {
        table.builds {
            tr {
                th.num { "Build" } th { "Job" } th { "System" } th { "Status" }
                @if with_evaluation { th.num { "Evaluation" } }
                th { "Machine" } th { "Started" } th.num { "Duration" }
            }
            @for view in builds {
                @let b = &view.build;
                tr.build data-build=(b.id) data-job=(b.job) {
                    td.num { a href={ "/builds/" (b.id) } { (b.id) } }
                    td { a href={ "/builds/" (b.id) } { (b.job) } }
                    td { (b.system) }
                    td { (build_status(b.status)) }
                    @if with_evaluation { td.num { a href={ "/evals/" (b.evaluation_id) } { (b.evaluation_id) } } }
                    td { (b.machine.as_deref().unwrap_or("")) }
                    td { (time(b.started_at)) }
                    td.num { (duration(view.duration_secs)) }
                }
            }
        }
    }
}

async fn index(State(state): State<AppState>) -> PageResult {
    let specs = state.db.list_specifications().await?;
    let recent = api::summarise(&state, state.db.recent_evaluations(20).await?).await?;
    Ok(layout(
        "Specifications",
        html! {
            h1 { "Specifications" }
            @if specs.is_empty() {
                p.muted { "No specifications yet: add one with " code { "kiln-ci spec add" } " or " code { "PUT /api/specs/{name}" } "." }
            } @else {
                table {
                    tr { th { "Name" } th { "Inputs" } th.num { "Priority" } th { "Every" } th { "Enabled" } }
                    @for spec in &specs {
                        tr {
                            td { a href={ "/specs/" (spec.name) } { (spec.name) } }
                            td {
                                @for input in &spec.inputs {
                                    div { (input.name) ": " code { (input.url) } " (" (input.reference.to_string()) ")" }
                                }
                            }
                            td.num { (spec.priority) }
                            td { @if spec.period_secs > 0 { (format::duration(spec.period_secs)) } @else { span.muted { "on demand" } } }
                            td { @if spec.enabled { "yes" } @else { "no" } }
                        }
                    }
                }
            }
            h2 { "Recent evaluations" }
            (evaluations_table(&recent, true))
        },
    ))
}

async fn specification(State(state): State<AppState>, Path(name): Path<String>) -> PageResult {
    let spec = state
        .db
        .specification(&name)
        .await?
        .ok_or_else(|| WebError::not_found("specification", &name))?;
    let evaluations = api::summarise(&state, state.db.list_evaluations(&name, 50).await?).await?;
    Ok(layout(
        &spec.name,
        html! {
            h1 { "Specification " (spec.name) }
            dl {
                dt { "Inputs" }
                dd {
                    @for input in &spec.inputs {
                        div { (input.name) ": " code { (input.url) } " (" (input.reference.to_string()) ")" }
                    }
                }
                dt { "Evaluator" } dd { code { (spec.evaluator.join(" ")) } " in " (spec.eval_input) }
                dt { "Systems" } dd { @if spec.systems.is_empty() { "all" } @else { (spec.systems.join(", ")) } }
                dt { "Builds" } dd {
                    @match &spec.build_targets {
                        crate::model::BuildTargets::All => "all jobs",
                        crate::model::BuildTargets::Jobs(jobs) => (jobs.join(", ")),
                    }
                }
                dt { "Priority" } dd { (spec.priority) }
                dt { "Evaluated" } dd { @if spec.period_secs > 0 { "every " (format::duration(spec.period_secs)) } @else { "on demand" } }
                dt { "Enabled" } dd { @if spec.enabled { "yes" } @else { "no" } }
            }
            h2 { "Evaluations" }
            (evaluations_table(&evaluations, false))
        },
    ))
}

/// Rows of one diff section shown on the page; the API has them all.
const DIFF_ROWS: usize = 200;
/// Rows of an evaluation's builds shown per page.
const BUILD_ROWS: usize = 1000;

fn diff_section(title: &str, id: &str, changes: &[JobChange]) -> Markup {
    html! {
        @if !changes.is_empty() {
            h3 id=(id) { (title) " (" (changes.len()) ")" }
            table {
                tr { th { "Job" } th { "Now" } th { "Before" } }
                @for c in changes.iter().take(DIFF_ROWS) {
                    tr {
                        td { a href={ "/builds/" (c.build) } { (c.job) } }
                        td { (build_status(c.status)) }
                        td {
                            @match (c.previous_build, c.previous_status) {
                                (Some(b), Some(s)) => a href={ "/builds/" (b) } { (build_status(s)) },
                                _ => span.muted { "new job" },
                            }
                        }
                    }
                }
            }
            @if changes.len() > DIFF_ROWS {
                p.muted { "… and " (changes.len() - DIFF_ROWS) " more." }
            }
        }
    }
}

#[derive(Debug, serde::Deserialize)]
struct EvaluationPageQuery {
    status: Option<String>,
    /// The first build row shown (pages of [`BUILD_ROWS`]).
    #[serde(default)]
    from: usize,
}

async fn evaluation(
    State(state): State<AppState>,
    Path(id): Path<i64>,
    Query(query): Query<EvaluationPageQuery>,
) -> PageResult {
    let detail = api::evaluation_detail(&state, id).await?;
    let e = &detail.summary.evaluation;
    let only: Option<BuildStatus> = match query.status.as_deref() {
        None | Some("") => None,
        Some(s) => Some(
            s.parse()
                .map_err(|e: crate::model::UnknownStatus| WebError::BadRequest(e.to_string()))?,
        ),
    };
    let shown: Vec<&BuildView> = detail
        .builds
        .iter()
        .filter(|b| only.is_none_or(|s| b.build.status == s))
        .collect();
    let from = query.from.min(shown.len());
    let to = (from + BUILD_ROWS).min(shown.len());
    let page_link = |start: usize| {
        let status = only.map_or(String::new(), |s| format!("status={s}&"));
        format!("/evals/{id}?{status}from={start}")
    };
    let diff = &detail.diff;
    let eval_log = if e.status == EvaluationStatus::Failed {
        api::evaluation_log_text(e).await?
    } else {
        Vec::new()
    };
    let eval_log_from = eval_log.len().saturating_sub(PAGE_LOG_LIMIT);
    Ok(layout(
        &format!("Evaluation {id}"),
        html! {
            h1 { "Evaluation " (id) " of " a href={ "/specs/" (e.specification) } { (e.specification) } " " (evaluation_status(e.status)) }
            dl {
                dt { "Inputs" } dd { (commits(e)) }
                dt { "Created" } dd { (time(Some(e.created_at))) }
                dt { "Evaluated" } dd { (time(e.evaluated_at)) }
                dt { "Finished" } dd { (time(e.finished_at)) }
                dt { "Builds" } dd { (counts(id, &detail.summary.counts)) }
                @if let Some(error) = &e.error { dt { "Error" } dd.error { pre { (error) } } }
                @if e.log_path.is_some() { dt { "Log" } dd { a href={ "/api/evaluations/" (id) "/log" } { "evaluation log" } } }
            }
            @if e.status == EvaluationStatus::Failed && !eval_log.is_empty() {
                h2 { "Evaluation log" }
                @if eval_log_from > 0 { p.muted { "The first " (eval_log_from) " bytes are left out; the whole log is one link above." } }
                pre.log #evaluation-log { (String::from_utf8_lossy(&eval_log[eval_log_from..])) }
            }
            h2 { "Changes" }
            @match diff.previous_evaluation {
                Some(prev) => p { "Compared with evaluation " a href={ "/evals/" (prev) } { (prev) } ": "
                    (diff.new_failures.len()) " new failures, " (diff.fixed.len()) " fixed, "
                    (diff.still_failing.len()) " still failing." },
                None => p.muted { "No earlier evaluation to compare with." },
            }
            (diff_section("New failures", "new-failures", &diff.new_failures))
            (diff_section("Fixed", "fixed", &diff.fixed))
            (diff_section("Still failing", "still-failing", &diff.still_failing))
            @if !detail.errors.is_empty() {
                h2 { "Attributes that failed to evaluate" }
                table {
                    tr { th { "Attribute" } th { "Error" } }
                    @for err in &detail.errors { tr { td { (err.attr) } td { pre { (err.error) } } } }
                }
            }
            h2 { "Builds" }
            nav.filter {
                a href={ "/evals/" (id) } { "all " (detail.builds.len()) }
                @for (status, n) in &detail.summary.counts {
                    a href={ "/evals/" (id) "?status=" (status.as_str()) } { (status.as_str()) " " (n) }
                }
            }
            @if shown.len() > BUILD_ROWS {
                p.pages {
                    "Builds " (from + 1) "–" (to) " of " (shown.len()) ". "
                    @if from > 0 { a rel="prev" href=(page_link(from.saturating_sub(BUILD_ROWS))) { "previous" } " " }
                    @if to < shown.len() { a rel="next" href=(page_link(to)) { "next" } }
                }
            }
            (builds_table(&shown[from..to], false))
        },
    ))
}

async fn builds(State(state): State<AppState>, Query(query): Query<BuildQuery>) -> PageResult {
    let filter = query.filter()?;
    let now = now();
    let list: Vec<BuildView> = state
        .db
        .list_builds(&filter)
        .await?
        .into_iter()
        .map(|b| BuildView::new(b, now))
        .collect();
    let title = match filter.status {
        Some(status) => format!("Builds {status}"),
        None => "Builds".to_owned(),
    };
    Ok(layout(
        &title,
        html! {
            h1 { (title) }
            nav.filter {
                a href="/builds" { "all" }
                @for status in BuildStatus::ALL { a href={ "/builds?status=" (status.as_str()) } { (status.as_str()) } }
            }
            @if list.is_empty() { p.muted { "None." } } @else { (builds_table(&list.iter().collect::<Vec<_>>(), true)) }
        },
    ))
}

/// Bytes of log shown on a build's page; the whole log is one link away.
const PAGE_LOG_LIMIT: usize = 512 * 1024;

/// Follows the log of a running build: long-polls the tail endpoint from the
/// offset the page was rendered at and appends text nodes (never HTML).
const TAIL_SCRIPT: &str = r#"
(function () {
  const pre = document.getElementById('log');
  const status = document.getElementById('build-status');
  const build = pre.dataset.build;
  let offset = Number(pre.dataset.offset);
  const pause = (ms) => new Promise((done) => setTimeout(done, ms));
  async function follow() {
    for (;;) {
      let chunk;
      try {
        const response = await fetch('/api/builds/' + build + '/log/tail?wait=20&offset=' + offset);
        if (!response.ok) { await pause(2000); continue; }
        chunk = await response.json();
      } catch (e) { await pause(2000); continue; }
      if (chunk.text) {
        const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
        pre.append(chunk.text);
        if (atEnd) pre.scrollTop = pre.scrollHeight;
      }
      offset = chunk.next_offset;
      status.textContent = chunk.status;
      status.className = 'status s-' + chunk.status;
      status.dataset.status = chunk.status;
      if (chunk.complete) { pre.dataset.complete = 'true'; return; }
    }
  }
  follow();
})();
"#;

async fn build(State(state): State<AppState>, Path(id): Path<i64>) -> PageResult {
    let detail = api::build_detail(&state, id).await?;
    let b = &detail.view.build;
    let log = api::current_log(&state, b).await?;
    let shown_from = log.len().saturating_sub(PAGE_LOG_LIMIT);
    let running = !b.status.is_finished();
    let link_list = |ids: &[i64]| {
        html! { @for (i, dep) in ids.iter().enumerate() { @if i > 0 { ", " } a href={ "/builds/" (dep) } { (dep) } } }
    };
    Ok(layout(
        &format!("Build {id} · {}", b.job),
        html! {
            h1 { "Build " (id) ": " (b.job) " " span #build-status class={ "status s-" (b.status.as_str()) } data-status=(b.status.as_str()) { (b.status.as_str()) } }
            dl {
                dt { "Evaluation" } dd { a href={ "/evals/" (b.evaluation_id) } { (b.evaluation_id) } " of " a href={ "/specs/" (b.specification) } { (b.specification) } }
                dt { "Derivation" } dd { code { (b.drv_path) } }
                dt { "Outputs" } dd { @for (name, path) in &b.outputs { div { (name) ": " code { (path) } } } }
                dt { "System" } dd { (b.system) @if !b.required_features.is_empty() { " (features: " (b.required_features.join(", ")) ")" } }
                dt { "Machine" } dd { (b.machine.as_deref().unwrap_or("—")) }
                dt { "Created" } dd { (time(Some(b.created_at))) }
                dt { "Started" } dd { (time(b.started_at)) }
                dt { "Stopped" } dd { (time(b.stopped_at)) }
                dt { "Duration" } dd { (duration(detail.view.duration_secs)) }
                dt { "Attempts" } dd { (b.attempts) }
                @if let Some(error) = &b.error { dt { "Error" } dd.error { (error) } }
                @if !detail.dependencies.is_empty() { dt { "Depends on" } dd { (link_list(&detail.dependencies)) } }
                @if !detail.dependents.is_empty() { dt { "Needed by" } dd { (link_list(&detail.dependents)) } }
            }
            h2 { "Log " a.muted href={ "/api/builds/" (id) "/log" } { "(raw)" } }
            @if shown_from > 0 { p.muted { "The first " (shown_from) " bytes are left out; the raw log has them." } }
            pre.log #log data-build=(id) data-offset=(log.len()) data-complete=(!running) {
                (String::from_utf8_lossy(&log[shown_from..]))
            }
            @if running { script { (PreEscaped(TAIL_SCRIPT)) } }
        },
    ))
}

async fn agents(State(state): State<AppState>) -> PageResult {
    let agents = state.db.agents().await?;
    let machines: Vec<Machine> = api::machines(&state).await?;
    Ok(layout(
        "Agents",
        html! {
            h1 { "Agents" }
            @if agents.is_empty() { p.muted { "No agents registered." } } @else {
                table {
                    tr { th { "Name" } th { "Key" } th { "Machines" } th { "Enabled" } th { "Registered" } th { "Last seen" } }
                    @for a in &agents {
                        tr {
                            td { (a.name) }
                            td { code { (a.public_key.split(':').next().unwrap_or("")) } }
                            td { (a.machines.join(", ")) }
                            td { @if a.enabled { "yes" } @else { "no" } }
                            td { (time(Some(a.registered_at))) }
                            td { (time(a.last_seen)) }
                        }
                    }
                }
            }
            h2 { "Machines" }
            @if machines.is_empty() { p.muted { "No machines offered and no builds running." } } @else {
                table {
                    tr { th { "Machine" } th { "Offered by" } th { "Last seen" } th { "Running" } }
                    @for m in &machines {
                        tr {
                            td { (m.name) }
                            td { (m.agents.join(", ")) }
                            td { (time(m.last_seen)) }
                            td { @for (i, b) in m.running.iter().enumerate() { @if i > 0 { ", " } a href={ "/builds/" (b) } { (b) } } }
                        }
                    }
                }
            }
        },
    ))
}

/// Answers 404 pages for unknown paths under the site, as HTML.
pub async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        layout("Not Found", html! { p { "There is no such page." } }),
    )
        .into_response()
}
