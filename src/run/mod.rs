//! One collection run for one source: lease, load, walk KnowBe4, forward, checkpoint,
//! then record the outcome (lifecycle, retry streak, health event).
//!
//! Order of effects, which is what makes the run safe to kill at any point:
//! 1. the lease is taken (another run of the same source exits here);
//! 2. every KnowBe4 request is reserved in the quota ledger, then paced, then sent;
//! 3. events are forwarded, and only after the destination accepted them is the
//!    checkpoint that covers them saved — conditioned on the lease and state version.
//!
//! A kill between 2 and 3 repeats the unsaved batch on the next run; nothing is lost.
//!
//! Layout: this module is the run loop (lease, state, lifecycle, outcome, health) and
//! drives one stream per data type ([`DataType`]):
//! - `events`: the user-event stream (the User Event API walk, pipelined).
//! - `budget`: the account's limits per request (run share, daily ledger, send slot).
//! - `forward`: forward a batch, then save the checkpoint that covers it.
//! - [`progress`]: signs of life during long runs.

mod budget;
mod events;
mod forward;
mod phishing;
pub mod progress;

pub use crate::domain::report::{NotStarted, Outcome, RunReport};
pub use budget::{Admission, admit_reporting_request};

use std::sync::Arc;

use std::time::Duration;
use time::OffsetDateTime;
use tokio::time::Instant;

use crate::domain::event::EventTime;
use crate::domain::quota::utc_day;
use crate::domain::secrets::SourceSecrets;
use crate::domain::state::{
    HealthEvent, Lease, Lifecycle, RetryStreak, SourceRecord, SourceState, Versioned,
};
use crate::error::{Error, Result};
use crate::settings::Settings;
use crate::sink::{Destination, DestinationConfig};
use crate::store::StateStore;
use crate::store::vault::Secrets;

/// Events buffered before they are forwarded and checkpointed together.
pub const FLUSH_EVENTS: usize = 1000;
/// Attempts per KnowBe4 page within one run for retriable failures.
const PAGE_ATTEMPTS: u32 = 4;
/// Times a page inconsistent with its list is asked for again within a run (each ask is
/// a quota call; a malformed page is not asked again).
const MALFORMED_RETRIES: u32 = 1;
/// Health events are kept this long (DynamoDB TTL).
const HEALTH_TTL_SECS: i64 = 30 * 86_400;

/// What a run needs from the process: clients, stores and tunables built once by the
/// composition root (`app`) and lent to each run. The run never reaches back
/// into the app.
#[derive(Clone, Copy)]
pub struct RunContext<'a> {
    /// The state store: state, leases, the account's ledger and send slot, health.
    pub store: &'a Arc<dyn StateStore>,
    /// The HTTP client for KnowBe4 (no redirects, no `Referer`).
    pub knowbe4_http: &'a reqwest::Client,
    /// Tunables.
    pub settings: &'a Settings,
    /// The source secrets, read once per process.
    pub secrets: &'a Secrets,
    /// The deployment's destination, for sources without their own.
    pub default_destination: &'a DestinationConfig,
    /// The HTTP client for destinations (no redirects, no decompression).
    pub destination_http: &'a reqwest::Client,
}

impl RunContext<'_> {
    /// A source's secrets, from this process's cache unless `force`.
    pub async fn source_secrets(
        &self,
        record: &SourceRecord,
        force: bool,
    ) -> Result<SourceSecrets> {
        self.secrets.source_secrets(record, force).await
    }

    /// The destination of a source (see [`crate::sink::resolve`]).
    pub fn destination_for(
        &self,
        record: &SourceRecord,
        secrets: &SourceSecrets,
    ) -> Result<Destination> {
        crate::sink::resolve(
            record.spec.destination.as_ref().map(|own| own.format),
            secrets,
            self.default_destination,
            self.destination_http,
            self.settings.validation.allow_custom_base_url,
        )
    }

    /// Stores and logs a health event (one JSON line) and emits its metric. Failing to
    /// store it is logged, not raised: the run's own outcome matters more.
    pub async fn record_health(&self, event: &HealthEvent, ttl_secs: i64) {
        tracing::warn!(
            health_event = %serde_json::to_string(event).unwrap_or_default(),
            source_id = %event.source_id,
            kind = event.kind.as_str(),
            count = event.count,
            "Health event recorded."
        );
        self.settings.metrics.emit(&crate::metrics::health_line(
            &event.source_id,
            event.kind,
            event.last_seen,
        ));
        let expires = event.last_seen / 1000 + ttl_secs;
        if let Err(err) = self.store.put_health(event, expires).await {
            tracing::error!(source_id = %event.source_id, error = %err, "Could not store a health event.");
        }
    }
}

fn now_ms() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// Collects one source until done, out of budget, or `deadline` (minus the app's margin).
/// What started a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// The schedule: the run follows the freshness plan (with a scarce quota it may read
    /// new events only, or save its budget when nothing is due).
    Schedule,
    /// Someone asked (`collect`): the run re-reads the whole window and spends what its
    /// share of the quota allows now.
    OnDemand,
}

/// Runs one source on demand (see [`collect_source_with`]).
pub async fn collect_source(ctx: RunContext<'_>, id: &str, deadline: Instant) -> RunReport {
    collect_source_with(ctx, id, deadline, Trigger::OnDemand).await
}

/// Runs one source: lease, walk, forward, checkpoint, for every data type that is due.
pub async fn collect_source_with(
    ctx: RunContext<'_>,
    id: &str,
    deadline: Instant,
    trigger: Trigger,
) -> RunReport {
    collect_run(ctx, id, deadline, trigger, None, None).await
}

/// Runs one source under one lease: the user-event stream, then the phishing stream when
/// it is due, or only the data type `only` names (the phishing poll then ignores its
/// interval). A failure of one stream does not stop the other.
pub async fn collect_source_types(
    ctx: RunContext<'_>,
    id: &str,
    deadline: Instant,
    trigger: Trigger,
    only: Option<DataType>,
) -> RunReport {
    collect_run(ctx, id, deadline, trigger, only, None).await
}

/// [`collect_source_with`] for a queued request made at `requested_at` (epoch ms): when a
/// run of the source succeeded after that, the request is stale and the run stops after
/// reading the state ([`NotStarted::Stale`]), sending nothing.
pub async fn collect_queued(
    ctx: RunContext<'_>,
    id: &str,
    deadline: Instant,
    trigger: Trigger,
    requested_at: Option<i64>,
) -> RunReport {
    collect_run(ctx, id, deadline, trigger, None, requested_at).await
}

async fn collect_run(
    ctx: RunContext<'_>,
    id: &str,
    deadline: Instant,
    trigger: Trigger,
    only: Option<DataType>,
    requested_at: Option<i64>,
) -> RunReport {
    let started = Instant::now();
    let mut report = RunReport::new(id);
    let run_id = uuid::Uuid::new_v4().to_string();
    let record = match ctx.store.get_source(id).await {
        Ok(Some(record)) => record,
        Ok(None) => {
            report.detail = "source not found".into();
            report.not_started = Some(NotStarted::NoSource);
            return report;
        }
        Err(err) => return failed_without_state(report, err),
    };
    let lease_ttl = lease_ttl_ms(ctx, deadline);
    let lease = match ctx
        .store
        .acquire_lease(id, &run_id, now_ms(), lease_ttl)
        .await
    {
        Ok(Some(lease)) => lease,
        Ok(None) => {
            report.detail = "another run holds the lease".into();
            report.not_started = Some(NotStarted::Leased);
            describe_untouched(ctx, &record, &mut report).await;
            return report;
        }
        Err(err) => return failed_without_state(report, err),
    };
    let mut run = Run {
        ctx,
        record,
        lease,
        report,
        run_id,
        state: None,
        pacing_chain: None,
        account: None,
        quota_seen: None,
        checkpoint_unsaved: false,
        prereserved: false,
        requested_at,
        trigger,
        only,
    };
    run.execute(deadline).await;
    // Every request of the run was sent before now (in-flight ones were awaited or
    // aborted), so the next holder is safe one rate window from now.
    let quiet_until = now_ms() + 1_050;
    if let Err(err) = ctx.store.release_lease(&run.lease, quiet_until).await {
        tracing::warn!(source_id = id, error = %err, "Could not release the lease; it will expire.");
    }
    run.report.duration_ms = started.elapsed().as_millis() as u64;
    run.report.state = run.state.as_ref().map(|s| s.value.lifecycle);
    // The checkpoint as it is now, whether the run moved it, failed or was skipped.
    if let Some(state) = &run.state {
        run.report.checkpoint = state.value.checkpoint.high.map(EventTime::to_rfc3339);
        run.report.backlog = !state.value.checkpoint.gaps.is_empty();
    }
    run.report.lag_seconds = run
        .state
        .as_ref()
        .and_then(|s| s.value.counters.newest_forwarded)
        .map(|newest| {
            EventTime(newest).secs_until(EventTime::from_datetime(OffsetDateTime::now_utc()))
        });
    run.report
}

/// Where the user-event walk stops when a phishing poll is due: `deadline` less what the
/// phishing stream keeps (half of what is left, at least a request's need plus 10 s), or
/// `deadline` when what is left cannot hold both.
fn split_for_phishing(
    settings: &crate::settings::Settings,
    now: Instant,
    deadline: Instant,
) -> Instant {
    let left = deadline.saturating_duration_since(now);
    let one_request = settings.deadline_margin
        + settings.request_timeout
        + crate::knowbe4::reporting::REPORTING_SPACING
        + Duration::from_secs(10);
    let keep = (left / 2).max(one_request);
    if left < keep + settings.deadline_margin + settings.request_timeout {
        deadline
    } else {
        deadline - keep
    }
}

/// Fills a skipped run's report from the store (quota left today, checkpoint, state), so
/// it says what is true rather than zeros; fields that cannot be read stay unset.
async fn describe_untouched(ctx: RunContext<'_>, record: &SourceRecord, report: &mut RunReport) {
    let state = ctx.store.load_state(&record.id).await.ok().flatten();
    let account = state.as_ref().and_then(|s| s.value.account.clone());
    report_quota(ctx, record, account.as_deref(), report).await;
    if let Some(state) = state {
        report.checkpoint = state.value.checkpoint.high.map(EventTime::to_rfc3339);
        report.backlog = !state.value.checkpoint.gaps.is_empty();
        report.state = Some(state.value.lifecycle);
    }
}

/// Fills the report's quota figures as `status` shows them: the account's requests today
/// against the account's limit (the smallest its sources give). A source that never ran
/// has no account yet and has used nothing. Figures that cannot be read are left out.
async fn report_quota(
    ctx: RunContext<'_>,
    record: &SourceRecord,
    account: Option<&str>,
    report: &mut RunReport,
) {
    let day = utc_day(OffsetDateTime::now_utc());
    let (used, limit) = match account {
        Some(account) => (
            ctx.store.quota_used(account, &day).await.ok(),
            ctx.store
                .account_members(account, now_ms())
                .await
                .ok()
                .and_then(|m| m.limit()),
        ),
        None => (Some(0), None),
    };
    if let Some(used) = used {
        report.quota_used = used;
        report.quota_left = limit
            .unwrap_or(record.spec.daily_request_limit)
            .saturating_sub(used);
    }
}

/// The lease's length: the configured TTL, but never past the deadline plus a grace
/// period (a run cannot outlive its invocation).
fn lease_ttl_ms(ctx: RunContext<'_>, deadline: Instant) -> i64 {
    let to_deadline = deadline
        .saturating_duration_since(Instant::now())
        .as_millis() as i64;
    (ctx.settings.lease_ttl.as_millis() as i64).min(to_deadline + 30_000)
}

/// A run that failed before it loaded its state: nothing was recorded for the source.
fn failed_without_state(mut report: RunReport, err: Error) -> RunReport {
    if matches!(err, Error::Store { .. }) {
        report.not_started = Some(NotStarted::StoreFailed);
    }
    report.outcome = Outcome::Failed;
    report.health = Some(err.health_kind());
    report.detail = err.chain();
    report
}

struct Run<'a> {
    /// The process's clients, stores and tunables.
    ctx: RunContext<'a>,
    record: SourceRecord,
    lease: Lease,
    report: RunReport,
    run_id: String,
    state: Option<Versioned<SourceState>>,
    /// Released when the last issued request passed the rate limiter.
    pacing_chain: Option<tokio::sync::oneshot::Receiver<()>>,
    /// What started the run (the schedule follows the freshness plan).
    trigger: Trigger,
    /// The only data type this run collects (`collect --data-type`), or all that are due.
    only: Option<DataType>,
    /// The KnowBe4 account (API host + key) whose ledger and send slots this run uses;
    /// known once the key is loaded (the stored one until then, for `fill_quota`).
    account: Option<String>,
    /// The account's requests today and its limit as this run last saw them (the ledger
    /// read before planning, then each reservation's answer): the report's quota figures,
    /// without reading the ledger and members again.
    quota_seen: Option<QuotaSeen>,
    /// The walk ended without error and its last batch was forwarded, but the checkpoint
    /// that covers it is saved with the run's outcome (one write instead of two).
    checkpoint_unsaved: bool,
    /// One request of the account's day is reserved (with the ledger read) and not yet
    /// used by a request.
    prereserved: bool,
    /// When the queued request for this run was made (see [`collect_queued`]).
    requested_at: Option<i64>,
}

/// The account's requests today and its daily limit, as the run last saw them.
#[derive(Clone, Copy, Debug)]
struct QuotaSeen {
    used: u32,
    limit: u32,
}

/// The data types a source collects, each a stream that the run loop drives: the loop
/// owns the lease, the lifecycle, the secrets, the destination, the outcome and the
/// health events; a stream walks its API within the account's budget and forwards and
/// checkpoints through the run (`forward`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataType {
    /// User events (`GET /events`, the `events` stream).
    Events,
    /// Phishing security tests and their recipients (the Reporting API, the `phishing`
    /// stream).
    Phishing,
}

impl DataType {
    /// The name used in `--data-type`, payloads and health events.
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Events => "events",
            DataType::Phishing => "phishing",
        }
    }
}

impl std::str::FromStr for DataType {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        match text {
            "events" => Ok(DataType::Events),
            "phishing" => Ok(DataType::Phishing),
            _ => Err(Error::config("dataType", "must be events or phishing")),
        }
    }
}

/// Why the walk stopped early without an error.
enum Stop {
    Finished,
    Budget,
    /// A scheduled run with nothing due saved its budget (seconds between head reads).
    NothingDue(u64),
    Deadline,
    QuotaExhausted,
}

impl Run<'_> {
    async fn execute(&mut self, deadline: Instant) {
        let id = self.record.id.clone();
        let state = match self.ctx.store.load_state(&id).await {
            Ok(Some(state)) => state,
            Ok(None) => {
                self.report.detail = "source has no state (being deleted?)".into();
                return;
            }
            Err(err) => {
                self.report = failed_without_state(
                    std::mem::replace(&mut self.report, RunReport::new(&id)),
                    err,
                );
                return;
            }
        };
        let done_since = match (self.requested_at, state.value.last_success) {
            (Some(requested), Some(success)) => success > requested,
            _ => false,
        };
        self.state = Some(state);
        if done_since {
            self.report.detail =
                "a run succeeded after this request was queued; nothing to do".into();
            self.report.not_started = Some(NotStarted::Stale);
            return;
        }
        let events = self.record.spec.collect_events && self.only != Some(DataType::Phishing);
        let phishing = self.record.spec.phishing.is_some() && self.only != Some(DataType::Events);
        if !events && !phishing {
            self.report.detail = match self.only {
                Some(only) => format!("the source does not collect {}", only.as_str()),
                None => "the source collects no data type this version runs".into(),
            };
        }
        // A due phishing poll keeps the second half of the invocation, and at least what
        // one Reporting request needs plus 10 s, so a user-event backlog that would fill
        // every run cannot starve it (the events go on next run). An invocation too short
        // for both (Timeout 60 s: a request needs DEADLINE_MARGIN + the request timeout,
        // 50 s) gives the events the whole of it; phishing then polls in what is left.
        let events_deadline = if phishing && self.phishing_ready() {
            split_for_phishing(self.ctx.settings, Instant::now(), deadline)
        } else {
            deadline
        };
        if events {
            if let Some(reason) = self.skip_reason() {
                self.report.detail = reason;
            } else {
                match self.collect(events_deadline).await {
                    Ok(stop) => self.succeed(stop).await,
                    Err(err) => self.fail(err).await,
                }
            }
        }
        if phishing {
            self.run_phishing(deadline).await;
        }
        self.fill_quota().await;
    }

    fn state_mut(&mut self) -> &mut SourceState {
        &mut self.state.as_mut().expect("state loaded").value
    }

    fn skip_reason(&self) -> Option<String> {
        let state = &self.state.as_ref()?.value;
        let today = utc_day(OffsetDateTime::now_utc());
        match state.lifecycle {
            Lifecycle::Error => return Some("source is in Error; restart or update it".into()),
            Lifecycle::Stopping => return Some("source is being deleted".into()),
            _ => {}
        }
        if state.blocked_config_version == Some(self.record.config_version) {
            return Some(
                "blocked by a ThirdPartyConfigError until the source is updated or restarted"
                    .into(),
            );
        }
        if state.counters.quota_exhausted_day.as_deref() == Some(today.as_str()) {
            return Some("daily quota reached; collection resumes after 00:00 UTC".into());
        }
        None
    }

    async fn save(&mut self) -> Result<()> {
        let id = self.record.id.clone();
        let versioned = self.state.as_ref().expect("state loaded");
        let version = self
            .ctx
            .store
            .save_state(&id, &versioned.value, versioned.version, Some(&self.lease))
            .await?;
        self.state.as_mut().expect("state loaded").version = version;
        Ok(())
    }

    async fn transition(&mut self, next: Lifecycle, reason: &str) -> Result<()> {
        if self.state.as_ref().expect("state loaded").value.lifecycle == next {
            return Ok(());
        }
        self.state_mut().transition(next, now_ms(), reason);
        self.save().await
    }

    async fn collect(&mut self, deadline: Instant) -> Result<Stop> {
        // Before the key goes anywhere: the stored URL may predate the rules or be edited.
        if self.record.spec.collect_events {
            crate::config::check_stored_base(
                &self.record.spec.api_base,
                self.ctx.settings.validation,
            )?;
        }
        if self.state.as_ref().expect("loaded").value.lifecycle == Lifecycle::Pending {
            self.transition(Lifecycle::Started, "A scheduled run picked the source up.")
                .await?;
        }
        let secrets = self.ctx.source_secrets(&self.record, false).await?;
        let destination = self.ctx.destination_for(&self.record, &secrets)?;
        let first_run =
            self.state.as_ref().expect("loaded").value.lifecycle != Lifecycle::Collecting;
        if first_run {
            self.transition(Lifecycle::Initialized, "Configuration and secrets loaded.")
                .await?;
        }
        self.collect_events(&secrets, &destination, first_run, deadline)
            .await
    }

    /// Renews the lease once half of it has run out. Losing it (another run took over
    /// after it expired) stops this run: its writes would be refused anyway.
    async fn keep_lease(&mut self, deadline: Instant) -> Result<()> {
        let now = now_ms();
        let ttl = lease_ttl_ms(self.ctx, deadline);
        if self.lease.expires_at - now > ttl / 2 {
            return Ok(());
        }
        self.lease = self.ctx.store.renew_lease(&self.lease, now, ttl).await?;
        Ok(())
    }

    async fn succeed(&mut self, stop: Stop) {
        let now = now_ms();
        let today = utc_day(OffsetDateTime::now_utc());
        let forwarded = self.report.forwarded;
        let requests = self.report.requests;
        let state = self.state_mut();
        state.streak = None;
        state.last_success = Some(now);
        state.counters.last_run_forwarded = forwarded;
        state.counters.quota_exhausted_day =
            matches!(stop, Stop::QuotaExhausted).then(|| today.clone());
        if state.lifecycle != Lifecycle::Collecting
            && matches!(stop, Stop::Finished | Stop::Budget)
            && requests > 0
        {
            state.transition(Lifecycle::Collecting, now, "Collecting events.");
        }
        self.report.outcome = Outcome::Collected;
        self.report.detail = match stop {
            Stop::Finished => "caught up".into(),
            Stop::Budget => "stopped at this run's share of the daily quota".into(),
            Stop::NothingDue(every) => format!(
                "nothing due: the daily quota pays for a new-events read every {} min, so this run saved its budget",
                every.div_ceil(60)
            ),
            Stop::Deadline => "stopped before the invocation deadline; the next run resumes".into(),
            Stop::QuotaExhausted => {
                "daily quota reached; collection resumes after 00:00 UTC".into()
            }
        };
        let checkpoint = &self.state.as_ref().expect("loaded").value.checkpoint;
        self.report.checkpoint = checkpoint.high.map(EventTime::to_rfc3339);
        self.report.backlog = !checkpoint.gaps.is_empty();
        // One write: the outcome and, when the walk's last batch was forwarded, the
        // checkpoint that covers it.
        let unsaved = std::mem::take(&mut self.checkpoint_unsaved);
        if let Err(err) = self.save().await {
            self.report.outcome = Outcome::Failed;
            self.report.health = Some(err.health_kind());
            self.report.detail = format!(
                "progress was forwarded but the final state could not be saved{}: {}",
                if unsaved {
                    " (the last batch is read again next run)"
                } else {
                    ""
                },
                err.chain()
            );
        }
    }

    async fn fail(&mut self, err: Error) {
        let now = now_ms();
        let kind = err.health_kind();
        let message = err.chain();
        self.report.outcome = Outcome::Failed;
        self.report.health = Some(kind);
        self.report.detail = message.clone();
        if matches!(err, Error::Conflict(_)) {
            // The lease was lost or the source deleted: another run owns the state now.
            return;
        }
        if matches!(err, Error::Store { .. }) && self.report.requests == 0 {
            // The state store failed (unavailable, throttled) before any KnowBe4 request:
            // the store, not the source, failed. Nothing is counted against the source
            // (no retry streak, no health event: the store would likely refuse them too);
            // the caller retries soon (the fan-out leaves the message for SQS).
            self.report.not_started = Some(NotStarted::StoreFailed);
            tracing::warn!(source_id = %self.record.id, error = %message, "The state store failed before any KnowBe4 request; the run is retried without counting against the source.");
            return;
        }
        let window_ms = (self.record.spec.retry_window_secs as i64) * 1000;
        let config_version = self.record.config_version;
        let state = self.state_mut();
        let (retry_at, retry_deadline) = if kind.retried() {
            let (deadline, passed) = RetryStreak::count(&mut state.streak, kind, now, window_ms);
            if passed {
                state.transition(Lifecycle::Error, now, format!("{} for longer than the retry window; collection stopped until restart or update.", kind.as_str()));
                (None, Some(deadline))
            } else {
                (Some(now), Some(deadline))
            }
        } else {
            state.blocked_config_version = Some(config_version);
            state.streak = None;
            state.transition(
                Lifecycle::Error,
                now,
                "ThirdPartyConfigError: collection stopped until the source is updated or restarted.",
            );
            (None, None)
        };
        let first_seen = state.streak.as_ref().map_or(now, |s| s.first_failure);
        let count = state.streak.as_ref().map_or(1, |s| s.failures);
        let event = HealthEvent {
            source_id: self.record.id.clone(),
            source_name: self.record.spec.name.clone(),
            kind,
            message,
            status: err.status(),
            error_kind: error_kind(&err).into(),
            first_seen,
            last_seen: now,
            count,
            retry_at: retry_at
                .map(|_| now + self.ctx.settings.schedule_interval_secs as i64 * 1000),
            retry_deadline,
            data_type: Some(DataType::Events.as_str().into()),
        };
        self.ctx.record_health(&event, HEALTH_TTL_SECS).await;
        if let Err(save_err) = self.save().await {
            tracing::warn!(source_id = %self.record.id, error = %save_err, "Could not save the failure state.");
        }
    }

    async fn fill_quota(&mut self) {
        if let Some(seen) = self.quota_seen {
            self.report.quota_used = seen.used;
            self.report.quota_left = seen.limit.saturating_sub(seen.used);
            return;
        }
        let account = self
            .account
            .clone()
            .or_else(|| self.state.as_ref()?.value.account.clone());
        report_quota(self.ctx, &self.record, account.as_deref(), &mut self.report).await;
    }
}

fn error_kind(err: &Error) -> &'static str {
    match err {
        Error::InvalidConfig { .. } => "invalid_config",
        Error::ThirdPartyConfig { .. } => "rejected_credentials",
        Error::KnowBe4 {
            status: Some(_), ..
        } => "http_status",
        Error::KnowBe4 { .. } => "knowbe4_unavailable",
        Error::Destination { .. } => "destination_unavailable",
        Error::Store { .. } => "state_store",
        Error::Secret { .. } => "secret",
        Error::NotFound(_) => "not_found",
        Error::Conflict(_) => "conflict",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review defect 8: with half the invocation, a short one (Timeout 60 s) gave the
    /// events 30 s — less than a request needs (50 s) — so neither stream sent anything.
    #[test]
    fn a_due_phishing_poll_keeps_half_or_a_request_and_never_starves_both() {
        let settings = crate::settings::Settings::from_env();
        let needs = settings.deadline_margin + settings.request_timeout;
        let now = Instant::now();
        // 900 s: half each.
        let long = now + Duration::from_secs(900);
        assert_eq!(
            split_for_phishing(&settings, now, long),
            now + Duration::from_secs(450)
        );
        // 60 s: too short for both; the events keep all of it.
        let short = now + Duration::from_secs(60);
        assert_eq!(split_for_phishing(&settings, now, short), short);
        // 150 s: phishing keeps a request's need and 10 s more; the events can still send.
        let mid = now + Duration::from_secs(150);
        let split = split_for_phishing(&settings, now, mid);
        assert!(split < mid && split.saturating_duration_since(now) >= needs);
        let spacing = crate::knowbe4::reporting::REPORTING_SPACING;
        assert!(mid.saturating_duration_since(split) >= needs + spacing);

        // The template's DEADLINE_MARGIN_SECS (30): a request needs 60 s, so the split
        // needs 142.5 s left; the README asks for a Timeout of 150 s with phishing tests.
        let mut deployed = settings.clone();
        deployed.deadline_margin = Duration::from_secs(30);
        let needs = deployed.deadline_margin + deployed.request_timeout;
        let at_150 = now + Duration::from_secs(150);
        let split = split_for_phishing(&deployed, now, at_150);
        assert!(split < at_150, "150 s is split");
        assert!(split.saturating_duration_since(now) >= needs);
        assert!(at_150.saturating_duration_since(split) >= needs + spacing);
        let at_120 = now + Duration::from_secs(120);
        assert_eq!(split_for_phishing(&deployed, now, at_120), at_120);
    }
}
