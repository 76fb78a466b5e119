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

pub mod progress;

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::time::Instant;

use crate::app::App;
use crate::domain::checkpoint::{DEFAULT_PAGE_SIZE, HeadWalk};
use crate::domain::checkpoint::{Step, Walker};
use crate::domain::event::{EventTime, RawEvent};
use crate::domain::planner::{self, PlanInput};
use crate::domain::quota::utc_day;
use crate::domain::state::{
    HealthEvent, Lease, Lifecycle, RetryStreak, SourceRecord, SourceState, Versioned,
};
use crate::error::{Error, HealthKind, Result};
use crate::knowbe4::{ApiError, KnowBe4Client};
use crate::store::{Reservation, SendSlot};

/// Events buffered before they are forwarded and checkpointed together.
pub const FLUSH_EVENTS: usize = 1000;
/// Attempts per KnowBe4 page within one run for retriable failures.
const PAGE_ATTEMPTS: u32 = 4;
/// Times a malformed page is asked for again within a run (each ask is a quota call).
const MALFORMED_RETRIES: u32 = 1;
/// Health events are kept this long (DynamoDB TTL).
const HEALTH_TTL_SECS: i64 = 30 * 86_400;

/// How a run for one source ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The walk ran (possibly cut short by budget or deadline) and progress was saved.
    Collected,
    /// Nothing to do or not allowed now; the reason says which.
    Skipped,
    /// The run failed; a health event was recorded.
    Failed,
}

/// The one-line summary of a run, logged and returned to the caller.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunReport {
    /// The source.
    pub source_id: String,
    /// How it ended.
    pub outcome: Outcome,
    /// Why it was skipped or failed, or how the walk ended.
    pub detail: String,
    /// The health event type, when it failed.
    pub health: Option<HealthKind>,
    /// Events received from KnowBe4 (after dedupe: those forwarded or to forward).
    pub fetched: u64,
    /// Events the destination accepted.
    pub forwarded: u64,
    /// Events on fetched pages that were already delivered (dropped as duplicates).
    pub duplicates_dropped: u64,
    /// KnowBe4 requests sent by this run.
    pub requests: u32,
    /// KnowBe4 pages the walk read (progress records come every so many of these).
    #[serde(default)]
    pub pages: u64,
    /// Requests reserved today, after this run.
    pub quota_used: u32,
    /// Requests left today for this source.
    pub quota_left: u32,
    /// The checkpoint's high-water mark after the run.
    pub checkpoint: Option<String>,
    /// Whether a backlog (gaps) remains.
    pub backlog: bool,
    /// Wall time of the run.
    pub duration_ms: u64,
    /// Lifecycle state after the run.
    pub state: Option<Lifecycle>,
    /// Seconds from the newest forwarded `occurred_date` to the end of the run.
    pub lag_seconds: Option<u64>,
    /// Events whose `occurred_date` was missing or unreadable: forwarded as KnowBe4 sent
    /// them, placed in the walk at their neighbour's time (their ids are logged).
    #[serde(default)]
    pub undated_events: u64,
    /// Whether the run re-read the whole lateness window (`false`: new events only, as
    /// the freshness planner decided); `None` when no walk started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_walk: Option<bool>,
}

impl RunReport {
    fn new(source_id: &str) -> Self {
        RunReport {
            source_id: source_id.to_string(),
            outcome: Outcome::Skipped,
            detail: String::new(),
            health: None,
            fetched: 0,
            forwarded: 0,
            duplicates_dropped: 0,
            requests: 0,
            pages: 0,
            quota_used: 0,
            quota_left: 0,
            checkpoint: None,
            backlog: false,
            duration_ms: 0,
            state: None,
            lag_seconds: None,
            undated_events: 0,
            full_walk: None,
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
pub async fn collect_source(app: &App, id: &str, deadline: Instant) -> RunReport {
    collect_source_with(app, id, deadline, Trigger::OnDemand).await
}

/// Runs one source: lease, walk, forward, checkpoint.
pub async fn collect_source_with(
    app: &App,
    id: &str,
    deadline: Instant,
    trigger: Trigger,
) -> RunReport {
    let started = Instant::now();
    let mut report = RunReport::new(id);
    let run_id = uuid::Uuid::new_v4().to_string();
    let record = match app.store.get_source(id).await {
        Ok(Some(record)) => record,
        Ok(None) => {
            report.detail = "source not found".into();
            return report;
        }
        Err(err) => return failed_without_state(report, err),
    };
    let lease_ttl = lease_ttl_ms(app, deadline);
    let lease = match app
        .store
        .acquire_lease(id, &run_id, now_ms(), lease_ttl)
        .await
    {
        Ok(Some(lease)) => lease,
        Ok(None) => {
            report.detail = "another run holds the lease".into();
            describe_untouched(app, &record, &mut report).await;
            return report;
        }
        Err(err) => return failed_without_state(report, err),
    };
    let mut run = Run {
        app,
        record,
        lease,
        report,
        run_id,
        state: None,
        pacing_chain: None,
        account: None,
        trigger,
    };
    run.execute(deadline).await;
    // Every request of the run was sent before now (in-flight ones were awaited or
    // aborted), so the next holder is safe one rate window from now.
    let quiet_until = now_ms() + 1_050;
    if let Err(err) = app.store.release_lease(&run.lease, quiet_until).await {
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

/// Fills a skipped run's report from the store (quota left today, checkpoint, state), so
/// it says what is true rather than zeros; fields that cannot be read stay unset.
async fn describe_untouched(app: &App, record: &SourceRecord, report: &mut RunReport) {
    let state = app.store.load_state(&record.id).await.ok().flatten();
    let account = state.as_ref().and_then(|s| s.value.account.clone());
    report_quota(app, record, account.as_deref(), report).await;
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
    app: &App,
    record: &SourceRecord,
    account: Option<&str>,
    report: &mut RunReport,
) {
    let day = utc_day(OffsetDateTime::now_utc());
    let (used, limit) = match account {
        Some(account) => (
            app.store.quota_used(account, &day).await.ok(),
            app.store
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
fn lease_ttl_ms(app: &App, deadline: Instant) -> i64 {
    let to_deadline = deadline
        .saturating_duration_since(Instant::now())
        .as_millis() as i64;
    (app.settings.lease_ttl.as_millis() as i64).min(to_deadline + 30_000)
}

fn failed_without_state(mut report: RunReport, err: Error) -> RunReport {
    report.outcome = Outcome::Failed;
    report.health = Some(err.health_kind());
    report.detail = err.chain();
    report
}

struct Run<'a> {
    app: &'a App,
    record: SourceRecord,
    lease: Lease,
    report: RunReport,
    run_id: String,
    state: Option<Versioned<SourceState>>,
    /// Released when the last issued request passed the rate limiter.
    pacing_chain: Option<tokio::sync::oneshot::Receiver<()>>,
    /// What started the run (the schedule follows the freshness plan).
    trigger: Trigger,
    /// The KnowBe4 account (API host + key) whose ledger and send slots this run uses;
    /// known once the key is loaded (the stored one until then, for `fill_quota`).
    account: Option<String>,
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
        let state = match self.app.store.load_state(&id).await {
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
        self.state = Some(state);
        if let Some(reason) = self.skip_reason() {
            self.report.detail = reason;
            self.fill_quota().await;
            return;
        }
        match self.collect(deadline).await {
            Ok(stop) => self.succeed(stop).await,
            Err(err) => self.fail(err).await,
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
            .app
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
        crate::config::check_stored_base(&self.record.spec.api_base, self.app.settings.validation)?;
        if self.state.as_ref().expect("loaded").value.lifecycle == Lifecycle::Pending {
            self.transition(Lifecycle::Started, "A scheduled run picked the source up.")
                .await?;
        }
        let secrets = self.app.source_secrets(&self.record, false).await?;
        let destination = self.app.destination_for(&self.record, &secrets)?;
        let first_run =
            self.state.as_ref().expect("loaded").value.lifecycle != Lifecycle::Collecting;
        if first_run {
            self.transition(Lifecycle::Initialized, "Configuration and secrets loaded.")
                .await?;
        }
        let mut client = KnowBe4Client::new(
            self.app.http.clone(),
            &self.record.spec.api_base,
            secrets.api_key.clone(),
            &self.run_id,
            self.app.settings.request_timeout,
        );
        // The limits are the account's: every source using this key shares them.
        let account = client.account().to_string();
        let members = self
            .app
            .store
            .join_account(
                &account,
                &self.record.id,
                self.record.spec.daily_request_limit,
                now_ms(),
            )
            .await?;
        self.account = Some(account.clone());
        if self
            .state
            .as_ref()
            .expect("loaded")
            .value
            .account
            .as_deref()
            != Some(&account)
        {
            self.state_mut().account = Some(account.clone());
        }
        // The previous holder's last requests may still be in the current rate window.
        let wait = self.lease.quiet_until - now_ms();
        if wait > 0 {
            tokio::time::sleep(Duration::from_millis(wait.min(2_000) as u64)).await;
        }

        let now = OffsetDateTime::now_utc();
        let day = utc_day(now);
        let limit = members
            .limit()
            .unwrap_or(self.record.spec.daily_request_limit);
        let used = self.app.store.quota_used(&account, &day).await?;
        let state = &self.state.as_ref().expect("loaded").value;
        let checkpoint = state.checkpoint.clone();
        // Sources sharing the account take equal turns at each interval's allowance, so
        // none starves another; the ledger keeps the account's day within its limit. The
        // planner spaces full re-reads of the lateness window to what the quota pays.
        let plan = planner::plan(&PlanInput {
            daily_limit: limit,
            used_today: used,
            now,
            interval_secs: self.app.settings.schedule_interval_secs,
            sources: members.count(),
            page_size: state.counters.page_size.unwrap_or(DEFAULT_PAGE_SIZE),
            window_events: checkpoint.recent.len() as u64,
            reread_at: checkpoint.reread_at,
            head_at: checkpoint.head_at,
            gaps: checkpoint.gaps.len(),
            lateness_secs: self.record.spec.lateness_window_secs,
        });
        let (budget, head) = match self.trigger {
            Trigger::Schedule => (plan.budget, plan.head),
            Trigger::OnDemand => (plan.available, HeadWalk::Full),
        };
        if budget == 0 && plan.available > 0 {
            return Ok(Stop::NothingDue(plan.head_every_secs));
        }
        if budget == 0 {
            return Ok(Stop::Budget);
        }
        let spec = &self.record.spec;
        let mut walker = Walker::planned(
            checkpoint,
            EventTime::from_datetime(now),
            spec.first_fetch_lookback_secs,
            spec.lateness_window_secs,
            head,
        );
        self.report.full_walk = Some(walker.is_full());
        let meta = spec.sink_meta();
        let mut buffer: Vec<RawEvent> = Vec::new();
        let mut reauthenticated = false;
        let mut authenticated = !first_run;
        let mut fetched_total: u64 = 0;
        let mut fetched_pages: u64 = 0;
        let mut ahead: VecDeque<InFlight> = VecDeque::new();
        let mut shape: Option<PageShape> = None;
        let mut progress =
            crate::run::progress::Progress::new(&self.record.id, limit.saturating_sub(used));
        let stop = loop {
            let Step::Fetch(page_no) = walker.next_step() else {
                break Stop::Finished;
            };
            self.keep_lease(deadline).await?;
            if Some(page_no) != shape.as_ref().map(|s| s.next_page) {
                shape = None; // a new walk or a jump: its pages are not known yet
            }
            let depth = speculation_depth(&walker, shape.as_ref(), self.app.settings.max_in_flight);
            let fetched = self
                .next_page(
                    &client,
                    page_no,
                    depth,
                    &mut ahead,
                    (&day, limit, budget),
                    deadline,
                )
                .await;
            let page = match fetched {
                Ok(page) => page,
                Err(FetchFailure::Quota) => break Stop::QuotaExhausted,
                Err(FetchFailure::Budget) => break Stop::Budget,
                Err(FetchFailure::Deadline) => break Stop::Deadline,
                Err(FetchFailure::Api(ApiError::Unauthorized(status))) if !reauthenticated => {
                    // The key may have been rotated: read the secret again, once.
                    reauthenticated = true;
                    tracing::info!(source_id = %self.record.id, status, "KnowBe4 refused the key; re-reading the secret once.");
                    let fresh = self.app.source_secrets(&self.record, true).await?;
                    client.set_key(fresh.api_key.clone());
                    continue;
                }
                Err(FetchFailure::Api(err)) => {
                    return Err(self
                        .flush_then(err.into_error(), &destination, &meta, &mut buffer, &walker)
                        .await);
                }
                Err(FetchFailure::Other(err)) => {
                    return Err(self
                        .flush_then(err, &destination, &meta, &mut buffer, &walker)
                        .await);
                }
            };
            if !authenticated {
                authenticated = true;
                self.transition(Lifecycle::Authenticated, "KnowBe4 accepted the API key.")
                    .await?;
                self.transition(Lifecycle::Collecting, "Collecting events.")
                    .await?;
            }
            let summary = PageSummary::of(&page);
            fetched_pages += 1;
            let events = match walker.on_page(page_no, page) {
                Ok(events) => events,
                Err(err) => {
                    let err = Error::KnowBe4 {
                        message: format!("KnowBe4 sent a malformed listing: {err}"),
                        status: None,
                        source: None,
                    };
                    return Err(self
                        .flush_then(err, &destination, &meta, &mut buffer, &walker)
                        .await);
                }
            };
            shape = summary.shape(page_no, &walker);
            fetched_total += events.len() as u64;
            self.report.duplicates_dropped = walker.duplicates();
            let (undated, ids) = walker.undated();
            if undated > self.report.undated_events {
                tracing::warn!(source_id = %self.record.id, undated, first_ids = ?ids, "KnowBe4 sent events without a readable occurred_date; they are forwarded as sent.");
                self.report.undated_events = undated;
            }
            buffer.extend(events);
            if buffer.len() >= FLUSH_EVENTS {
                self.flush(&destination, &meta, &mut buffer, &walker, deadline)
                    .await?;
            }
            self.report.pages += 1;
            progress.page(crate::run::progress::Counts {
                pages: self.report.pages,
                fetched: fetched_total,
                forwarded: self.report.forwarded,
                requests: self.report.requests,
            });
        };
        self.discard(&mut ahead, &day).await;
        if fetched_pages > 0 {
            self.state_mut().counters.page_size = Some(walker.page_size());
        }
        self.flush(&destination, &meta, &mut buffer, &walker, deadline)
            .await?;
        self.report.fetched = fetched_total;
        Ok(stop)
    }

    /// On a KnowBe4 failure mid-walk, still deliver and checkpoint what was fetched.
    async fn flush_then(
        &mut self,
        err: Error,
        destination: &crate::sink::Destination,
        meta: &crate::sink::SourceMeta,
        buffer: &mut Vec<RawEvent>,
        walker: &Walker,
    ) -> Error {
        let deadline = Instant::now() + Duration::from_secs(60);
        match self
            .flush(destination, meta, buffer, walker, deadline)
            .await
        {
            Ok(()) => err,
            Err(flush_err) => flush_err,
        }
    }

    /// Forwards the buffer, then saves the checkpoint that covers it.
    async fn flush(
        &mut self,
        destination: &crate::sink::Destination,
        meta: &crate::sink::SourceMeta,
        buffer: &mut Vec<RawEvent>,
        walker: &Walker,
        deadline: Instant,
    ) -> Result<()> {
        let snapshot = walker.snapshot();
        let unchanged = snapshot == self.state.as_ref().expect("loaded").value.checkpoint;
        if buffer.is_empty() && unchanged {
            return Ok(());
        }
        if !buffer.is_empty() {
            crate::failpoint::hit("after_fetch_before_forward");
            let send_deadline = deadline
                .checked_sub(self.app.settings.deadline_margin / 2)
                .unwrap_or(deadline);
            destination.send(meta, buffer, send_deadline).await?;
            crate::failpoint::hit("after_forward_before_checkpoint");
        }
        let forwarded = buffer.len() as u64;
        let newest = buffer.iter().map(|e| e.occurred.0).max();
        buffer.clear();
        self.report.forwarded += forwarded;
        let today = utc_day(OffsetDateTime::now_utc());
        let state = self.state_mut();
        state.checkpoint = snapshot;
        let counters = &mut state.counters;
        if counters.day != today {
            counters.day = today;
            counters.forwarded_today = 0;
        }
        counters.forwarded_today += forwarded;
        counters.forwarded_total += forwarded;
        if let Some(newest) = newest {
            counters.newest_forwarded =
                Some(counters.newest_forwarded.map_or(newest, |n| n.max(newest)));
        }
        self.save().await
    }

    /// Renews the lease once half of it has run out. Losing it (another run took over
    /// after it expired) stops this run: its writes would be refused anyway.
    async fn keep_lease(&mut self, deadline: Instant) -> Result<()> {
        let now = now_ms();
        let ttl = lease_ttl_ms(self.app, deadline);
        if self.lease.expires_at - now > ttl / 2 {
            return Ok(());
        }
        self.lease = self.app.store.renew_lease(&self.lease, now, ttl).await?;
        Ok(())
    }

    /// Whether one more request may be sent: budget and deadline.
    fn may_send(&self, budget: u32, deadline: Instant) -> std::result::Result<(), FetchFailure> {
        if self.report.requests >= budget {
            return Err(FetchFailure::Budget);
        }
        let needed = self.app.settings.deadline_margin + self.app.settings.request_timeout;
        if deadline.saturating_duration_since(Instant::now()) < needed {
            return Err(FetchFailure::Deadline);
        }
        Ok(())
    }

    /// Reserves one request in the account's quota ledger for the day before it is sent.
    async fn reserve(&self, day: &str, limit: u32) -> std::result::Result<(), FetchFailure> {
        let account = self
            .account
            .as_deref()
            .expect("the account is known before requests");
        match self.app.store.reserve_request(account, day, limit).await {
            Ok(Reservation::Granted(_)) => Ok(()),
            Ok(Reservation::Exhausted) => Err(FetchFailure::Quota),
            Err(err) => Err(FetchFailure::Other(err)),
        }
    }

    /// Reserves, paces and sends a request for `page` without waiting for its answer.
    async fn issue(
        &mut self,
        client: &KnowBe4Client,
        page: u32,
        day: &str,
        limit: u32,
    ) -> std::result::Result<InFlight, FetchFailure> {
        self.reserve(day, limit).await?;
        self.report.requests += 1;
        let client = client.clone();
        // Requests of a run leave in the order they were issued: each task waits for the
        // previous one to pass the rate limiter (an aborted one releases it by dropping
        // its sender).
        let (paced, paced_rx) = tokio::sync::oneshot::channel::<()>();
        let previous = self.pacing_chain.replace(paced_rx);
        let started = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let started_in_task = started.clone();
        let slots = self.slot_claimer();
        Ok(InFlight {
            page,
            started,
            // Paced inside the task, right before sending: pacing first and sending from
            // a task scheduled later would let requests bunch up on the wire.
            handle: tokio::spawn(async move {
                if let Some(previous) = previous {
                    let _ = previous.await;
                }
                client.pace().await;
                if let Err(err) = slots.claim().await {
                    return Err(ApiError::NotSent(format!(
                        "the account's send slot could not be claimed: {err}"
                    )));
                }
                started_in_task.store(true, std::sync::atomic::Ordering::SeqCst);
                let _ = paced.send(());
                crate::failpoint::hit("before_knowbe4_request");
                client.events_page(page).await
            }),
        })
    }

    /// The answer for `page`: from a request sent ahead, or a new one; keeps up to
    /// `depth` requests in flight for the pages after it. Pages are independent, so
    /// requests go out at the rate limit instead of one round trip at a time.
    async fn next_page(
        &mut self,
        client: &KnowBe4Client,
        page: u32,
        depth: usize,
        ahead: &mut VecDeque<InFlight>,
        (day, limit, budget): (&str, u32, u32),
        deadline: Instant,
    ) -> std::result::Result<crate::domain::checkpoint::Page, FetchFailure> {
        if ahead.front().map(|r| r.page) != Some(page) {
            // The walk went elsewhere (a step back, a gap probe): those answers are moot.
            self.discard(ahead, day).await;
        }
        if ahead.is_empty() {
            self.may_send(budget, deadline)?;
            ahead.push_back(self.issue(client, page, day, limit).await?);
        }
        while ahead.len() < depth && self.may_send(budget, deadline).is_ok() {
            let next = ahead.back().map_or(page, |r| r.page) + 1;
            match self.issue(client, next, day, limit).await {
                Ok(request) => ahead.push_back(request),
                Err(_) => break, // no speculation past the quota; the walk will tell
            }
        }
        let mut request = ahead.pop_front().expect("the page was issued");
        let answer = match (&mut request.handle).await {
            Ok(answer) => answer,
            Err(join) => Err(ApiError::Transport(format!("request task failed: {join}"))),
        };
        if matches!(answer, Err(ApiError::NotSent(_))) {
            self.unreserve(day).await;
        }
        match answer {
            Ok(page) => Ok(page),
            Err(ApiError::QuotaExhausted) => Err(FetchFailure::Quota),
            Err(err) => {
                // Answers sent ahead for later pages are dropped: the walk resumes from
                // this page once it succeeds.
                self.discard(ahead, day).await;
                self.retry(client, page, (day, limit, budget), deadline, err)
                    .await
            }
        }
    }

    /// Retries `page` after `failed`, with backoff (honouring `Retry-After`), up to
    /// [`PAGE_ATTEMPTS`] requests in all. When the budget or the deadline leaves no room
    /// for another attempt, the failure itself is returned: a failing KnowBe4 is reported,
    /// never mistaken for a run that merely ran out of time.
    async fn retry(
        &mut self,
        client: &KnowBe4Client,
        page_no: u32,
        (day, limit, budget): (&str, u32, u32),
        deadline: Instant,
        failed: ApiError,
    ) -> std::result::Result<crate::domain::checkpoint::Page, FetchFailure> {
        let mut failed = failed;
        let mut attempt = 1;
        let mut malformed = 0;
        loop {
            // A malformed answer is likely deterministic: asking again spends the account's
            // shared quota, so it is asked again once, not with the full backoff series.
            if matches!(failed, ApiError::Malformed(_)) {
                malformed += 1;
            }
            if !failed.retriable() || attempt >= PAGE_ATTEMPTS || malformed > MALFORMED_RETRIES {
                return Err(FetchFailure::Api(failed));
            }
            let backoff = match &failed {
                ApiError::RateLimited {
                    retry_after: Some(after),
                } => (*after).min(Duration::from_secs(30)),
                _ => Duration::from_millis(500 * 2u64.pow(attempt - 1)),
            };
            let needed =
                backoff + self.app.settings.deadline_margin + self.app.settings.request_timeout;
            if self.report.requests >= budget
                || deadline.saturating_duration_since(Instant::now()) < needed
            {
                return Err(FetchFailure::Api(failed));
            }
            tracing::info!(source_id = %self.record.id, page = page_no, attempt, error = %failed, "KnowBe4 request failed; retrying.");
            tokio::time::sleep(backoff).await;
            attempt += 1;
            self.reserve(day, limit).await?;
            client.pace().await;
            if let Err(err) = self.slot_claimer().claim().await {
                // Reserved but never sent: give the reservation back.
                self.report.requests += 1;
                self.unreserve(day).await;
                return Err(FetchFailure::Other(err));
            }
            self.report.requests += 1;
            crate::failpoint::hit("before_knowbe4_request");
            failed = match client.events_page(page_no).await {
                Ok(page) => return Ok(page),
                Err(ApiError::QuotaExhausted) => return Err(FetchFailure::Quota),
                Err(err @ ApiError::NotSent(_)) => {
                    self.unreserve(day).await;
                    err
                }
                Err(err) => err,
            };
        }
    }

    /// What a request task needs to claim the account's send slot.
    fn slot_claimer(&self) -> SlotClaimer {
        SlotClaimer {
            store: self.app.store.clone(),
            account: self
                .account
                .clone()
                .expect("the account is known before requests"),
            spacing_ms: crate::knowbe4::spacing_for(&self.record.spec.api_base).as_millis() as i64,
        }
    }

    /// Gives back the reservation of a request that never reached KnowBe4.
    async fn unreserve(&mut self, day: &str) {
        self.report.requests = self.report.requests.saturating_sub(1);
        let account = self
            .account
            .as_deref()
            .expect("the account is known before requests");
        if let Err(err) = self.app.store.release_request(account, day).await {
            // Keeping the reservation only over-counts: the ledger stays on the safe side.
            tracing::warn!(source_id = %self.record.id, error = %err, "Could not give back an unsent request's quota reservation.");
        }
    }

    /// Cancels the requests sent ahead; those that had not started sending give their
    /// quota reservation back.
    async fn discard(&mut self, ahead: &mut VecDeque<InFlight>, day: &str) {
        for mut request in ahead.drain(..).collect::<Vec<_>>() {
            request.handle.abort();
            let _ = (&mut request.handle).await;
            if !request.started.load(std::sync::atomic::Ordering::SeqCst) {
                self.unreserve(day).await;
            }
        }
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
        if let Err(err) = self.save().await {
            self.report.outcome = Outcome::Failed;
            self.report.health = Some(err.health_kind());
            self.report.detail = format!(
                "progress was forwarded but the final state could not be saved: {}",
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
        let window_ms = (self.record.spec.retry_window_secs as i64) * 1000;
        let config_version = self.record.config_version;
        let state = self.state_mut();
        let (retry_at, retry_deadline) = if kind.retried() {
            let streak = state.streak.get_or_insert(RetryStreak {
                kind,
                first_failure: now,
                deadline: now + window_ms,
                failures: 0,
            });
            streak.kind = kind;
            streak.failures += 1;
            let deadline = streak.deadline;
            if now >= deadline {
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
                .map(|_| now + self.app.settings.schedule_interval_secs as i64 * 1000),
            retry_deadline,
        };
        self.app.record_health(&event, HEALTH_TTL_SECS).await;
        if let Err(save_err) = self.save().await {
            tracing::warn!(source_id = %self.record.id, error = %save_err, "Could not save the failure state.");
        }
    }

    async fn fill_quota(&mut self) {
        let account = self
            .account
            .clone()
            .or_else(|| self.state.as_ref()?.value.account.clone());
        report_quota(self.app, &self.record, account.as_deref(), &mut self.report).await;
    }
}

/// Claims the account's next send slot in the state store, waiting while another
/// process (or another source of this one) holds it: the 4 requests per second hold for
/// the account across every process. In-process pacing (the governor limiter) runs
/// first, so one process's own requests rarely find the slot held.
struct SlotClaimer {
    store: std::sync::Arc<dyn crate::store::StateStore>,
    account: String,
    spacing_ms: i64,
}

impl SlotClaimer {
    /// Waits for a slot and returns at its start, when the request must be sent; gives up
    /// after [`MAX_SLOT_WAITS`] tries.
    ///
    /// A slot is claimed to start [`SLOT_LEAD_MS`] after the claim is written, and the
    /// request waits for that start: the write's own latency (a DynamoDB call, a local
    /// file's fsync) then never shortens the gap to the next slot. A claim answered after
    /// its slot started (more than [`SLOT_LATE_MS`] late) is not used: the slot is left
    /// to pass and another claimed, so no two sends are ever closer than the spacing less
    /// that tolerance (20 ms, within the 80 ms margin per window of the 270 ms spacing).
    async fn claim(&self) -> Result<()> {
        for _ in 0..MAX_SLOT_WAITS {
            let start = now_ms() + SLOT_LEAD_MS;
            match self
                .store
                .claim_send_slot(&self.account, start, self.spacing_ms)
                .await?
            {
                SendSlot::Granted => {
                    let now = now_ms();
                    if now > start + SLOT_LATE_MS {
                        continue;
                    }
                    if start > now {
                        tokio::time::sleep(Duration::from_millis((start - now) as u64)).await;
                    }
                    return Ok(());
                }
                SendSlot::Busy(until) => {
                    // Claim again when a slot starting then would no longer overlap.
                    let wait = (until - SLOT_LEAD_MS - now_ms()).clamp(1, 2_000) as u64;
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
            }
        }
        Err(Error::Store {
            message: format!("the account's send slot stayed taken for {MAX_SLOT_WAITS} tries"),
            source: None,
        })
    }
}

/// Tries a request makes for its account's send slot (each busy answer waits out the
/// holder's slot, ~270 ms): 16 concurrent senders to one account clear in one round.
const MAX_SLOT_WAITS: u32 = 64;
/// How far ahead of the claim a send slot starts: room for the claim's write.
const SLOT_LEAD_MS: i64 = 60;
/// How late after its start a granted slot may still be used.
const SLOT_LATE_MS: i64 = 20;

enum FetchFailure {
    Quota,
    Budget,
    Deadline,
    Api(ApiError),
    Other(Error),
}

/// A request sent ahead of the walk. Dropping it cancels the request if it has not been
/// sent yet, so no request leaves after the run ends (and releases its lease).
struct InFlight {
    page: u32,
    /// Set once the task passed the rate limiter and began sending: until then the
    /// request provably never reached KnowBe4.
    started: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: tokio::task::JoinHandle<std::result::Result<crate::domain::checkpoint::Page, ApiError>>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// What the last page of the current walk looked like, to guess how many follow.
struct PageShape {
    next_page: u32,
    newest: EventTime,
    oldest: EventTime,
    events: usize,
    /// Events a full page holds (`limit_value`, as the walker learned it).
    page_size: u32,
    /// Pages left in the whole list, when the response told the list's size
    /// (`total_pages`, or `count` once the walk saw it counts the list): fetching past it
    /// is waste.
    pages_left: Option<u64>,
}

/// What the walk needs of a page to guess how many follow, taken before the walker
/// consumes it; completed with what the walker learned from it (its page size, what
/// `count` means).
struct PageSummary {
    newest: Option<EventTime>,
    oldest: Option<EventTime>,
    events: usize,
    more: Option<bool>,
    count: Option<u64>,
    total_pages: Option<u64>,
}

impl PageSummary {
    fn of(page: &crate::domain::checkpoint::Page) -> PageSummary {
        PageSummary {
            newest: page.events.first().map(|e| e.occurred),
            oldest: page.events.last().map(|e| e.occurred),
            events: page.events.len(),
            more: page.more,
            count: page.count,
            total_pages: page.total_pages,
        }
    }

    /// The shape of page `page_no`, once `walker` has read it; `None` when it ended the
    /// list.
    fn shape(self, page_no: u32, walker: &Walker) -> Option<PageShape> {
        let page_size = walker.page_size();
        if crate::domain::checkpoint::Page::ends_list(self.more, self.events, page_size) {
            return None;
        }
        let from_count = match (walker.count_is_total(), self.count) {
            (Some(true), Some(count)) => Some(count.div_ceil(u64::from(page_size))),
            _ => None,
        };
        let pages_left = self
            .total_pages
            .or(from_count)
            .map(|pages| pages.saturating_sub(u64::from(page_no)));
        Some(PageShape {
            next_page: page_no + 1,
            newest: self.newest?,
            oldest: self.oldest?,
            events: self.events,
            page_size,
            pages_left,
        })
    }
}

/// How many requests to keep in flight: one (no speculation) at the start of a walk and
/// while probing, else the pages the walk still seems to need (from the event density of
/// the last page and the walk's floor, capped by the pages the list has left when the
/// response told), at most `max` (`Settings::max_in_flight`: with 270 ms spacing and
/// ~1 s latency, four or five keep the rate limit saturated). Steady-state runs, whose
/// walk ends on its first page, thus never spend quota on pages they do not need; without
/// `total_pages` a drain may send up to `max - 1` requests past the list's end.
fn speculation_depth(walker: &Walker, shape: Option<&PageShape>, max: usize) -> usize {
    let (Some(floor), Some(shape)) = (walker.sequential_floor(), shape) else {
        return 1;
    };
    if shape.oldest <= floor {
        return 1;
    }
    let span = (shape.newest.0 - shape.oldest.0).max(1) as f64;
    let left = (shape.oldest.0 - floor.0) as f64 / span * shape.events as f64;
    let mut pages = (left / f64::from(shape.page_size.max(1))).ceil() as usize;
    if let Some(in_list) = shape.pages_left {
        pages = pages.min(in_list as usize);
    }
    pages.clamp(1, max.max(1))
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
