//! The phishing stream: security tests and their recipients from the KnowBe4 Reporting
//! API, polled every `phishingPollInterval` hours.
//!
//! One poll:
//! 1. every page of `GET /v1/phishing/security_tests` (per_page 500, until the empty page);
//! 2. the tests' tracks ([`TestTrack`]) are updated and saved with the state: whether a
//!    test changed (its digest differs from the stored one) and which tests' recipients
//!    the poll rule ([`crate::domain::phishing_poll`]) says to read;
//! 3. each page of tests: the new and changed tests are forwarded, then the page's digest
//!    shard is saved ([`crate::store::StateStore::save_digest_shard`]);
//! 4. for each test to read, every page of its recipients, likewise: the new and changed
//!    recipients forwarded, then the page's shard saved.
//!
//! A shard is saved only after the destination accepted its page's records, so a crash
//! between the two repeats at most that page's batch (the failpoint
//! `phishing_after_forward_before_digests` kills the process there; it is not in
//! `failpoint::POINTS`, which the events-only chaos scenarios draw from). A test's track
//! is saved as changed before its record is forwarded, so a crash cannot lose the
//! "changed" signal that makes its recipients read.
//!
//! Every request is admitted through the Reporting account's ledger and send slot
//! ([`super::admit_reporting_request`]): the daily limit reserved first, then at most one
//! request per 1.25 s across every process (≤ 4 a second, ≤ 50 a minute). A 429 backs off
//! (its `Retry-After`) and is not a failure; when it persists the poll stops early and stays
//! due. A poll stopped early (deadline, daily limit, 429s) stays due and is continued by
//! the next run: the tests list is read again, the tests whose recipients were read since
//! the poll started are skipped unless they changed again, and the digests keep it from
//! forwarding anything twice. A poll longer than one invocation therefore completes over
//! several, each advancing by at least one test (one test's recipients at most
//! [`MAX_RECIPIENT_PAGES`] requests).
//!
//! Bounds: the tests list is read for at most [`MAX_TEST_PAGES`] pages, a test's recipients
//! for at most [`MAX_RECIPIENT_PAGES`]; each page is tried at most [`PAGE_TRIES`] times.
//!
//! Failures are the stream's own: a failing phishing poll keeps its own retry streak in
//! [`PhishingState`] and its health events name the data type `phishing`; it never stops
//! the user-event stream of the same source. A source that collects only phishing tests
//! moves through the lifecycle on its polls, as an events source does on its runs.

use std::time::Duration;

use serde_json::value::RawValue;
use time::OffsetDateTime;
use tokio::time::Instant;

use super::{DataType, HEALTH_TTL_SECS, Outcome, Run, now_ms};
use crate::domain::changes::{DigestShard, KnownDigests, page_changes};
use crate::domain::event::{EventTime, RawEvent};
use crate::domain::phishing_poll::PhishingState;
use crate::domain::quota::utc_day;
use crate::domain::secrets::SourceSecrets;
use crate::domain::state::{HealthEvent, Lifecycle, RetryStreak};
use crate::error::{Error, Result};
use crate::knowbe4::ApiError;
use crate::knowbe4::reporting::{REPORTING_PER_PAGE, ReportingClient, ReportingPage};
use crate::sink::{Destination, SOURCETYPE_PHISHING_RECIPIENT, SOURCETYPE_PHISHING_TEST};

/// Most pages of security tests read in one poll (500 each: 100,000 tests).
pub const MAX_TEST_PAGES: u32 = 200;
/// Most pages of one test's recipients read in one poll (500 each: 250,000 recipients).
pub const MAX_RECIPIENT_PAGES: u32 = 500;
/// Tries of one page within a poll (429s and retryable failures).
pub const PAGE_TRIES: u32 = 4;
/// Longest wait after a 429.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The digest list of the security tests (a test's recipients use its `pst_id`).
const TESTS_LIST: &str = "tests";

/// The digest shards of one list as stored, by page.
type Stored = std::collections::BTreeMap<u32, DigestShard>;

/// Why a poll ended early without an error; it stays due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Early {
    Deadline,
    Quota,
    RateLimited,
}

/// One page, or why there is none.
enum Fetched {
    Page(ReportingPage),
    /// 404 on a test's recipients: the test is gone.
    Gone,
    Early(Early),
}

/// What one poll did.
#[derive(Default)]
struct Poll {
    requests: u32,
    forwarded: u64,
    tests: usize,
    tests_read: usize,
}

#[derive(serde::Deserialize)]
struct TestHead {
    pst_id: u64,
    #[serde(default)]
    status: Option<String>,
}

#[derive(serde::Deserialize)]
struct RecipientHead {
    recipient_id: u64,
}

impl Run<'_> {
    /// Runs the phishing stream if the source collects it, it is due (or asked for) and
    /// not stopped; records the outcome in the run's report and the stream's state.
    pub(super) async fn run_phishing(&mut self, deadline: Instant) {
        if self.record.spec.phishing.is_none() {
            return;
        }
        let now = now_ms();
        let today = utc_day(OffsetDateTime::now_utc());
        let forced = self.only == Some(DataType::Phishing);
        let config_version = self.record.config_version;
        let phishing_only = !self.record.spec.collect_events;
        let state = &self.state.as_ref().expect("loaded").value;
        let ps = state.phishing.clone().unwrap_or_default();
        let skip = if state.lifecycle == Lifecycle::Stopping {
            Some("source is being deleted".to_string())
        } else if phishing_only && state.lifecycle == Lifecycle::Error {
            Some("source is in Error; restart or update it".into())
        } else if ps.stopped_config_version == Some(config_version) {
            Some("stopped by an error until the source is updated or restarted".into())
        } else if ps.quota_exhausted_day.as_deref() == Some(today.as_str()) {
            Some("the Reporting API daily limit is reached; polls resume after 00:00 UTC".into())
        } else if !forced && !ps.due(now) {
            Some(format!(
                "not due; next poll at {}",
                EventTime(ps.next_poll.unwrap_or(now).saturating_mul(1_000_000)).to_rfc3339()
            ))
        } else {
            None
        };
        if let Some(reason) = skip {
            self.note(&format!("phishing: {reason}"));
            return;
        }
        match self.poll_phishing(deadline).await {
            Ok((poll, early)) => self.phishing_succeeded(poll, early, now).await,
            Err(err) => self.phishing_failed(err).await,
        }
    }

    /// Whether the phishing stream will poll in this run (asked for, or due and not
    /// stopped).
    pub(super) fn phishing_ready(&self) -> bool {
        let Some(state) = self.state.as_ref().map(|s| &s.value) else {
            return false;
        };
        if self.record.spec.phishing.is_none() || state.lifecycle == Lifecycle::Stopping {
            return false;
        }
        if self.only == Some(DataType::Phishing) {
            return true;
        }
        let today = utc_day(OffsetDateTime::now_utc());
        state.phishing.clone().unwrap_or_default().ready(
            self.record.config_version,
            &today,
            now_ms(),
        )
    }

    fn note(&mut self, text: &str) {
        if self.report.detail.is_empty() {
            self.report.detail = text.to_string();
        } else {
            self.report.detail = format!("{}; {text}", self.report.detail);
        }
    }

    fn phishing_mut(&mut self) -> &mut PhishingState {
        self.state_mut()
            .phishing
            .get_or_insert_with(Default::default)
    }

    /// One poll: the tests, then the recipients of the tests the poll rule names.
    async fn poll_phishing(&mut self, deadline: Instant) -> Result<(Poll, Option<Early>)> {
        let spec = self.record.spec.phishing.clone().expect("checked");
        crate::config::check_stored_reporting_base(
            &spec.reporting_base,
            self.ctx.settings.validation,
        )?;
        if self.state.as_ref().expect("loaded").value.lifecycle == Lifecycle::Pending {
            self.transition(Lifecycle::Started, "A run picked the source up.")
                .await?;
        }
        let secrets = self.ctx.source_secrets(&self.record, false).await?;
        let destination = self.ctx.destination_for(&self.record, &secrets)?;
        let phishing_only = !self.record.spec.collect_events;
        if phishing_only
            && self.state.as_ref().expect("loaded").value.lifecycle != Lifecycle::Collecting
        {
            self.transition(Lifecycle::Initialized, "Configuration and secrets loaded.")
                .await?;
        }
        let client = ReportingClient::new(
            self.ctx.knowbe4_http.clone(),
            &spec.reporting_base,
            reporting_token(self, &secrets)?,
            &self.run_id,
            self.ctx.settings.request_timeout,
        );
        let account = client.account().to_string();
        if self.phishing_mut().account.as_deref() != Some(&account) {
            self.phishing_mut().account = Some(account);
        }
        let started = now_ms();
        // A poll that stopped early is continued, not started over: the tests whose
        // recipients it read since it started are not read again.
        let cycle = *self.phishing_mut().poll_started.get_or_insert(started);
        let mut poll = Poll::default();
        let limit = spec.daily_request_limit;

        // 1. The security tests.
        let (known, stored) = self.known_digests(TESTS_LIST).await?;
        let mut pages: Vec<ReportingPage> = Vec::new();
        for page in 1..=MAX_TEST_PAGES + 1 {
            if page > MAX_TEST_PAGES {
                return Err(not_ending("the security tests list"));
            }
            match self
                .fetch(&client, None, page, limit, deadline, &mut poll)
                .await?
            {
                Fetched::Page(p) if p.ends_list() => break,
                Fetched::Page(p) => pages.push(p),
                Fetched::Gone => return Err(reporting_error(ApiError::NotKnowBe4)),
                Fetched::Early(early) => return Ok((poll, Some(early))),
            }
        }

        // 2. Tracks: which tests changed, whose recipients to read. Saved before anything
        //    is forwarded, so a crash cannot lose a change.
        let mut changes = Vec::with_capacity(pages.len());
        let mut to_read: Vec<u64> = Vec::new();
        for page in &pages {
            let heads = page
                .items
                .iter()
                .map(|item| {
                    serde_json::from_str::<TestHead>(item.get()).map_err(|e| {
                        ApiError::Malformed(format!(
                            "a security test without a numeric pst_id: {e}"
                        ))
                        .into_error()
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let page_changes = page_changes(
                &known,
                heads
                    .iter()
                    .zip(&page.items)
                    .map(|(h, item)| (h.pst_id, item.get())),
            );
            let ps = self.phishing_mut();
            for (index, head) in heads.iter().enumerate() {
                let changed = page_changes.forward.contains(&index);
                let status = head.status.as_deref().unwrap_or("");
                let track = ps
                    .tests
                    .get(&head.pst_id)
                    .copied()
                    .unwrap_or_default()
                    .observe(status, changed, started);
                ps.tests.insert(head.pst_id, track);
                let read_this_cycle = track.recipients_read.is_some_and(|read| read >= cycle);
                if track.read_recipients(changed, started)
                    && (changed || !read_this_cycle)
                    && !to_read.contains(&head.pst_id)
                {
                    to_read.push(head.pst_id);
                }
            }
            changes.push(page_changes);
            poll.tests += heads.len();
        }
        self.save().await?;

        // 3. Forward the new and changed tests, page by page, each page's shard after.
        for (index, (page, page_changes)) in pages.iter().zip(&changes).enumerate() {
            let batch: Vec<&RawValue> = page_changes
                .forward
                .iter()
                .map(|i| &*page.items[*i])
                .collect();
            self.forward_page(
                &destination,
                SOURCETYPE_PHISHING_TEST,
                &batch,
                TESTS_LIST,
                index as u32 + 1,
                &page_changes.shard,
                stored.get(&(index as u32 + 1)),
                deadline,
                &mut poll,
            )
            .await?;
        }

        // 4. Recipients of every test the poll rule names.
        for pst_id in to_read {
            let list = pst_id.to_string();
            let (known, stored) = self.known_digests(&list).await?;
            let mut complete = false;
            for page in 1..=MAX_RECIPIENT_PAGES + 1 {
                if page > MAX_RECIPIENT_PAGES {
                    return Err(not_ending(&format!("the recipients of test {pst_id}")));
                }
                let fetched = self
                    .fetch(&client, Some(pst_id), page, limit, deadline, &mut poll)
                    .await?;
                let page_data = match fetched {
                    Fetched::Page(p) if p.ends_list() => {
                        complete = true;
                        break;
                    }
                    Fetched::Page(p) => p,
                    Fetched::Gone => {
                        // The test was deleted since the list was read: nothing to read.
                        self.phishing_mut().tests.remove(&pst_id);
                        break;
                    }
                    Fetched::Early(early) => {
                        self.save().await?;
                        return Ok((poll, Some(early)));
                    }
                };
                let ids = page_data
                    .items
                    .iter()
                    .map(|item| {
                        serde_json::from_str::<RecipientHead>(item.get())
                            .map(|h| h.recipient_id)
                            .map_err(|e| {
                                ApiError::Malformed(format!(
                                    "a recipient of test {pst_id} without a numeric recipient_id: {e}"
                                ))
                                .into_error()
                            })
                    })
                    .collect::<Result<Vec<_>>>()?;
                let page_changes = page_changes(
                    &known,
                    ids.iter()
                        .zip(&page_data.items)
                        .map(|(id, item)| (*id, item.get())),
                );
                let batch: Vec<&RawValue> = page_changes
                    .forward
                    .iter()
                    .map(|i| &*page_data.items[*i])
                    .collect();
                self.forward_page(
                    &destination,
                    SOURCETYPE_PHISHING_RECIPIENT,
                    &batch,
                    &list,
                    page,
                    &page_changes.shard,
                    stored.get(&page),
                    deadline,
                    &mut poll,
                )
                .await?;
            }
            if complete {
                if let Some(track) = self.phishing_mut().tests.get_mut(&pst_id) {
                    track.recipients_read = Some(started);
                }
                poll.tests_read += 1;
            }
        }
        let interval_ms = i64::from(spec.poll_interval_hours) * 3_600_000;
        let ps = self.phishing_mut();
        ps.poll_started = None;
        ps.last_poll = Some(cycle);
        ps.next_poll = Some(cycle + interval_ms);
        Ok((poll, None))
    }

    /// The digests stored for `list`: all of them, and each page's shard as stored (a page
    /// whose shard is unchanged is not written again).
    async fn known_digests(&self, list: &str) -> Result<(KnownDigests, Stored)> {
        let stored = self
            .ctx
            .store
            .load_digest_shards(&self.record.id, list)
            .await?;
        let shards = stored
            .iter()
            .map(|(page, text)| {
                DigestShard::decode(text)
                    .map(|shard| (*page, shard))
                    .map_err(|e| Error::Store {
                        message: e.to_string(),
                        source: None,
                    })
            })
            .collect::<Result<Stored>>()?;
        Ok((KnownDigests::from_shards(shards.values()), shards))
    }

    /// Forwards one page's new and changed records, then saves the page's digest shard
    /// (unless it is the shard already stored for the page).
    #[allow(clippy::too_many_arguments)]
    async fn forward_page(
        &mut self,
        destination: &Destination,
        sourcetype: &'static str,
        batch: &[&RawValue],
        list: &str,
        page: u32,
        shard: &DigestShard,
        stored: Option<&DigestShard>,
        deadline: Instant,
        poll: &mut Poll,
    ) -> Result<()> {
        if !batch.is_empty() {
            let occurred = EventTime::from_datetime(OffsetDateTime::now_utc());
            let events: Vec<RawEvent> = batch
                .iter()
                .map(|raw| RawEvent {
                    id: String::new(),
                    occurred,
                    json: (*raw).to_owned(),
                })
                .collect();
            let mut meta = self.record.spec.sink_meta();
            meta.sourcetype = Some(sourcetype);
            let send_deadline = deadline
                .checked_sub(self.ctx.settings.deadline_margin / 2)
                .unwrap_or(deadline);
            destination.send(&meta, &events, send_deadline).await?;
            crate::failpoint::hit("phishing_after_forward_before_digests");
            poll.forwarded += events.len() as u64;
            self.report.forwarded += events.len() as u64;
        }
        if stored == Some(shard) {
            return Ok(());
        }
        self.ctx
            .store
            .save_digest_shard(&self.record.id, list, page, &shard.encode(), &self.lease)
            .await
    }

    /// Admits and sends one Reporting request (tests when `pst_id` is `None`), retrying
    /// 429s after their `Retry-After` and retryable failures, within [`PAGE_TRIES`].
    async fn fetch(
        &mut self,
        client: &ReportingClient,
        pst_id: Option<u64>,
        page: u32,
        limit: u32,
        deadline: Instant,
        poll: &mut Poll,
    ) -> Result<Fetched> {
        let mut last: Option<ApiError> = None;
        for attempt in 0..PAGE_TRIES {
            let needed = self.ctx.settings.deadline_margin
                + self.ctx.settings.request_timeout
                + client.spacing();
            if deadline.saturating_duration_since(Instant::now()) < needed {
                return Ok(Fetched::Early(Early::Deadline));
            }
            self.keep_lease(deadline).await?;
            let day = utc_day(OffsetDateTime::now_utc());
            match super::admit_reporting_request(self.ctx.store, client, &day, limit).await? {
                super::Admission::Granted => {}
                super::Admission::QuotaExhausted => return Ok(Fetched::Early(Early::Quota)),
            }
            crate::failpoint::hit("before_knowbe4_request");
            let answer = match pst_id {
                None => client.security_tests_page(page, REPORTING_PER_PAGE).await,
                Some(id) => client.recipients_page(id, page, REPORTING_PER_PAGE).await,
            };
            if matches!(answer, Err(ApiError::NotSent(_))) {
                if let Err(err) = self.ctx.store.release_request(client.account(), &day).await {
                    tracing::warn!(source_id = %self.record.id, error = %err, "Could not give back an unsent request's reservation.");
                }
            } else {
                poll.requests += 1;
                self.report.requests += 1;
                self.report.pages += 1;
            }
            match answer {
                Ok(page) => {
                    self.report.fetched += page.items.len() as u64;
                    return Ok(Fetched::Page(page));
                }
                Err(ApiError::NotKnowBe4) if pst_id.is_some() => return Ok(Fetched::Gone),
                Err(ApiError::QuotaExhausted) => return Ok(Fetched::Early(Early::Quota)),
                Err(ApiError::RateLimited { retry_after }) => {
                    let wait = retry_after
                        .unwrap_or(Duration::from_secs(2 << attempt))
                        .min(MAX_BACKOFF);
                    tracing::info!(source_id = %self.record.id, wait_ms = wait.as_millis() as u64, "The Reporting API answered 429; backing off.");
                    if deadline.saturating_duration_since(Instant::now()) < wait {
                        return Ok(Fetched::Early(Early::RateLimited));
                    }
                    tokio::time::sleep(wait).await;
                    last = Some(ApiError::RateLimited { retry_after });
                }
                Err(err) if err.retriable() => {
                    tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
                    last = Some(err);
                }
                Err(err) => return Err(reporting_error(err)),
            }
        }
        match last {
            Some(ApiError::RateLimited { .. }) => Ok(Fetched::Early(Early::RateLimited)),
            Some(err) => Err(reporting_error(err)),
            None => Ok(Fetched::Early(Early::Deadline)),
        }
    }

    async fn phishing_succeeded(&mut self, poll: Poll, early: Option<Early>, now: i64) {
        let today = utc_day(OffsetDateTime::now_utc());
        let phishing_only = !self.record.spec.collect_events;
        let ps = self.phishing_mut();
        ps.streak = None;
        ps.last_poll_requests = poll.requests;
        ps.last_poll_forwarded = poll.forwarded;
        ps.forwarded_total += poll.forwarded;
        ps.quota_exhausted_day = (early == Some(Early::Quota)).then(|| today.clone());
        if phishing_only {
            let state = self.state_mut();
            state.streak = None;
            state.last_success = Some(now);
            state.counters.last_run_forwarded = poll.forwarded;
            if state.lifecycle != Lifecycle::Collecting && poll.requests > 0 && early.is_none() {
                state.transition(
                    Lifecycle::Collecting,
                    now,
                    "Collecting phishing security tests.",
                );
            }
        }
        if self.report.outcome == Outcome::Skipped {
            self.report.outcome = Outcome::Collected;
        }
        let what = format!(
            "{} tests listed, recipients of {} read, {} records forwarded, {} requests",
            poll.tests, poll.tests_read, poll.forwarded, poll.requests
        );
        let text = match early {
            None => format!("phishing: polled ({what})"),
            Some(Early::Deadline) => {
                format!("phishing: stopped before the invocation deadline ({what}); still due")
            }
            Some(Early::Quota) => format!(
                "phishing: the Reporting API daily limit is reached ({what}); polls resume after 00:00 UTC"
            ),
            Some(Early::RateLimited) => {
                format!("phishing: rate-limited by the Reporting API ({what}); still due")
            }
        };
        self.note(&text);
        if let Err(err) = self.save().await {
            self.report.outcome = Outcome::Failed;
            self.report.health = Some(err.health_kind());
            self.note(&format!(
                "phishing: the poll's final state could not be saved: {}",
                err.chain()
            ));
        }
    }

    /// A failed poll: the stream's own retry streak (and, for a source collecting only
    /// phishing tests, the source's lifecycle), and a health event naming the data type.
    async fn phishing_failed(&mut self, err: Error) {
        let now = now_ms();
        let kind = err.health_kind();
        let message = format!("phishing security tests: {}", err.chain());
        self.report.outcome = Outcome::Failed;
        self.report.health = Some(kind);
        self.note(&message);
        if matches!(err, Error::Conflict(_)) {
            return;
        }
        let window_ms = (self.record.spec.retry_window_secs as i64) * 1000;
        let config_version = self.record.config_version;
        let phishing_only = !self.record.spec.collect_events;
        let ps = self.phishing_mut();
        let (retry_at, retry_deadline, stopped) = if kind.retried() {
            let streak = ps.streak.get_or_insert(RetryStreak {
                kind,
                first_failure: now,
                deadline: now + window_ms,
                failures: 0,
            });
            streak.kind = kind;
            streak.failures += 1;
            let deadline = streak.deadline;
            if now >= deadline {
                ps.stopped_config_version = Some(config_version);
                (None, Some(deadline), true)
            } else {
                (Some(now), Some(deadline), false)
            }
        } else {
            ps.stopped_config_version = Some(config_version);
            (None, None, true)
        };
        let first_seen = ps.streak.as_ref().map_or(now, |s| s.first_failure);
        let count = ps.streak.as_ref().map_or(1, |s| s.failures);
        if !kind.retried() {
            ps.streak = None;
        }
        if stopped && phishing_only {
            let state = self.state_mut();
            state.blocked_config_version = (!kind.retried()).then_some(config_version);
            state.transition(
                Lifecycle::Error,
                now,
                format!(
                    "{} in the phishing stream; collection stopped until restart or update.",
                    kind.as_str()
                ),
            );
        }
        let event = HealthEvent {
            source_id: self.record.id.clone(),
            source_name: self.record.spec.name.clone(),
            kind,
            message,
            status: err.status(),
            error_kind: super::error_kind(&err).into(),
            first_seen,
            last_seen: now,
            count,
            retry_at: retry_at
                .map(|_| now + self.ctx.settings.schedule_interval_secs as i64 * 1000),
            retry_deadline,
            data_type: Some("phishing".into()),
        };
        self.ctx.record_health(&event, HEALTH_TTL_SECS).await;
        if let Err(save_err) = self.save().await {
            tracing::warn!(source_id = %self.record.id, error = %save_err, "Could not save the phishing failure state.");
        }
    }
}

/// The source's Reporting API token; a secret without one is a configuration error that
/// names the field the source's generation uses.
fn reporting_token(run: &Run<'_>, secrets: &SourceSecrets) -> Result<secrecy::SecretString> {
    secrets
        .api_key_phishing
        .clone()
        .ok_or_else(|| Error::Secret {
            name: run.record.id.clone(),
            message: format!(
                "the source's secret holds no Reporting API token ({}); update the source with it",
                run.record.spec.generation.phishing_key_field()
            ),
            config: true,
        })
}

/// A Reporting API failure as the collector's error, worded for the Reporting API.
fn reporting_error(err: ApiError) -> Error {
    match err {
        ApiError::Unauthorized(status) => Error::ThirdPartyConfig {
            system: "KnowBe4",
            message: format!(
                "KnowBe4 refused the Reporting API token (HTTP {status}); check the token and the region"
            ),
            status: Some(status),
        },
        ApiError::NotKnowBe4 => Error::ThirdPartyConfig {
            system: "KnowBe4",
            message: "the Reporting base URL does not answer as the KnowBe4 Reporting API (HTTP 404); check reportingBaseURL or region".into(),
            status: Some(404),
        },
        other => other.into_error(),
    }
}

fn not_ending(what: &str) -> Error {
    ApiError::Malformed(format!("{what} did not end within the page bound")).into_error()
}
