//! The phishing stream: security tests and their recipients from the KnowBe4 Reporting
//! API, polled every `phishingPollInterval` hours.
//!
//! One poll reads the list of security tests page by page; for each page it
//! 1. updates the tests' tracks ([`TestTrack`]: whether a test changed — its digest differs
//!    from the stored one — and which tests' recipients the poll rule
//!    ([`crate::domain::phishing_poll`]) says to read) and saves the changed tracks,
//! 2. forwards the new and changed tests, then saves their digests;
//!
//! then, for each test to read, every page of its recipients likewise (forward the new and
//! changed ones, then save their digests). Digests and tracks live in the change store as
//! logs of shards ([`crate::domain::changes`]): keyed by record id, never by page, so
//! nothing depends on the order of a list, its page size, or pages lining up between
//! requests. A digest is saved only after the destination accepted the record, so a crash
//! between the two repeats at most that page's batch (the failpoint
//! `phishing_after_forward_before_digests` kills the process there). A test's track is
//! saved as changed before the test is forwarded, so a crash cannot lose the "changed"
//! signal that makes its recipients read.
//!
//! Assumptions kept few, each reading of the API's unconfirmed details handled (the
//! README lists them; `tests/it/phishing_readings.rs` runs the stream under each):
//! - the page size: 500 is asked for; a short first page sets the page size for the rest
//!   of the walk ([`Cursor::take`]), right whether the server counts pages by what it
//!   serves or by what was asked; a page too large to read starts the list over at 100,
//!   then 20, 5, 1 a page ([`PAGE_SIZES`]), remembered for later polls.
//! - the end of a list: an empty page (recorded); a page with no record new to the walk (a
//!   server ignoring `page`, or repeating its last page); a 404 past the first page.
//! - bounds: a walk ends after [`MAX_TEST_RECORDS`] / [`MAX_RECIPIENT_RECORDS`] records or
//!   that many pages plus one, with at most [`MAX_RESTARTS`] starts over and
//!   [`PAGE_TRIES`] tries a page.
//! - 429: never taken as the daily limit from its wording (documented for the events API
//!   only); a `Retry-After` is honoured (up to [`MAX_RETRY_AFTER`]) — waited within the
//!   run when short, otherwise saved, and no Reporting request is sent before it passes;
//!   without one, a run that ends rate-limited holds the stream a minute, doubling.
//! - a record without a numeric id is forwarded (keyed by its digest), not dropped and
//!   not a reason to stop.
//!
//! Deterministic answers are not retried: a malformed page, a page too large even at one
//! record, a 4xx or a first-page 404 on one test's recipients, or a list that does not end
//! stop the walk of *that* test (its track remembers the test object it failed on; it is
//! asked for again when the test changes or after [`STUCK_RECHECK_MS`]), with a health
//! event naming the test, and the poll goes on with the other tests. Transport failures,
//! 408 and 5xx are retried within [`PAGE_TRIES`]; then the poll fails and the next run
//! goes on at the page that failed.
//!
//! Every request is admitted through the Reporting account's ledger and send slot
//! ([`super::admit_reporting_request`]): the daily limit reserved first, then at most one
//! request per 1.25 s across every process (≤ 4 a second, ≤ 50 a minute). A poll stopped
//! early (deadline, daily limit, 429s) stays due and is continued by the next run where it
//! stopped: the tests list at its page ([`PhishingState::tests_resume`]), the tests it
//! queued (their tracks' `queued_for`), the test in progress at its page ([`Resume`]).
//! Each run reads at least one page, so a poll longer than one invocation completes over
//! several.
//!
//! Failures are the stream's own: a failing phishing poll keeps its own retry streak in
//! [`PhishingState`] and its health events name the data type `phishing`; it never stops
//! the user-event stream of the same source. A source that collects only phishing tests
//! moves through the lifecycle on its polls, as an events source does on its runs.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::value::RawValue;
use time::OffsetDateTime;
use tokio::time::Instant;

use super::{DataType, HEALTH_TTL_SECS, Outcome, Run, now_ms};
use crate::domain::changes::{
    Entry, KnownDigests, Latest, Shard, compaction, digest, key_without_id, page_changes,
};
use crate::domain::event::{EventTime, RawEvent};
use crate::domain::phishing_poll::{
    ListAt, PhishingState, Resume, STUCK_RECHECK_MS, TEST_FAILURES, TRACKS_LIST, TestTrack,
};
use crate::domain::quota::utc_day;
use crate::domain::secrets::SourceSecrets;
use crate::domain::state::{HealthEvent, Lifecycle, RetryStreak};
use crate::error::{Error, HealthKind, Result};
use crate::knowbe4::ApiError;
use crate::knowbe4::reporting::{
    REPORTING_FALLBACK_PER_PAGE, REPORTING_PER_PAGE, ReportingClient, ReportingPage,
};
use crate::sink::{Destination, SOURCETYPE_PHISHING_RECIPIENT, SOURCETYPE_PHISHING_TEST};

/// Most security tests one poll lists (pages: this over the page size, plus the end).
pub const MAX_TEST_RECORDS: u32 = 100_000;
/// Most recipients of one test a poll reads.
pub const MAX_RECIPIENT_RECORDS: u32 = 250_000;
/// Tries of one page within a run (429s and retryable failures).
pub const PAGE_TRIES: u32 = 4;
/// Longest wait for a 429 within a run; a longer `Retry-After` ends the run's poll and is
/// saved.
const MAX_WAIT_IN_RUN: Duration = Duration::from_secs(30);
/// Longest `Retry-After` honoured; a longer one (a server's mistake, or a hostile one)
/// holds the stream for a day, not for ever.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(86_400);
/// The digest list of the security tests (a test's recipients use its `pst_id`).
const TESTS_LIST: &str = "tests";
/// Changed tracks kept in memory before they are saved (a crash loses at most the
/// "recipients read" marks of these: those tests are read again, nothing is re-sent).
const TRACKS_BATCH: usize = 50;

/// Why a poll ended early without an error; it stays due.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Early {
    Deadline,
    /// The daily limit, reached on this UTC day.
    Quota(String),
    RateLimited,
}

/// One page, or why there is none.
enum Fetched {
    Page(ReportingPage),
    /// 404: on a test's first page of recipients, the test is gone; on the tests list's
    /// first page, not the Reporting API; past a first page, the list's end.
    Gone,
    Early(Early),
    /// An answer that asking again cannot change (malformed, too large).
    Refused(ApiError),
}

/// What one poll did.
#[derive(Default)]
struct Poll {
    requests: u32,
    forwarded: u64,
    tests: u64,
    tests_read: u64,
    tests_to_read: u64,
    /// Tests whose recipients could not be read (deterministic answers).
    stuck: u64,
    /// Lists that ended on a page with nothing new (a server repeating itself).
    repeats: u32,
    /// Records without a numeric id (forwarded, keyed by digest).
    without_id: u64,
    /// The poll failed on an answer that asking again cannot change: the next try is the
    /// next poll, not the next run.
    deterministic: bool,
    /// 429s answered in this run.
    rate_limited: u32,
}

/// A security test's `pst_id`: a number, or a string of digits; `None` when it has none
/// usable (then it is forwarded, keyed by its digest, and has no recipients to read).
fn test_id(text: &str) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Head {
        pst_id: serde_json::Value,
    }
    let head: Head = serde_json::from_str(text).ok()?;
    let id = match head.pst_id {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }?;
    (id < 1 << 63).then_some(id)
}

/// A security test's `status` (`""` when it has none, or not a string).
fn test_status(text: &str) -> String {
    #[derive(serde::Deserialize)]
    struct Head {
        #[serde(default)]
        status: Option<serde_json::Value>,
    }
    serde_json::from_str::<Head>(text)
        .ok()
        .and_then(|h| h.status)
        .and_then(|s| s.as_str().map(str::to_string))
        .unwrap_or_default()
}

#[derive(serde::Deserialize)]
struct RecipientHead {
    recipient_id: u64,
}

/// The page sizes a list walk falls back through when a page is too large to read.
const PAGE_SIZES: [u32; 5] = [REPORTING_PER_PAGE, REPORTING_FALLBACK_PER_PAGE, 20, 5, 1];

/// Where a list walk is: its page size, the next page, and what it has read.
struct Cursor {
    page: u32,
    per_page: u32,
    /// Records received so far (the bound counts what came, not what was asked for).
    received: u64,
    max_records: u32,
    /// A first page shorter than asked for, not yet known to be the whole list: its
    /// length.
    short: Option<u32>,
    /// Times the walk started over (smaller pages); at most [`MAX_RESTARTS`].
    restarts: u32,
}

/// Times a list walk may start over with smaller pages.
const MAX_RESTARTS: u32 = 6;

impl Cursor {
    fn at(page: u32, per_page: u32, max_records: u32) -> Cursor {
        Cursor {
            page,
            per_page,
            received: 0,
            max_records,
            short: None,
            restarts: 0,
        }
    }

    /// Whether the walk has passed its bound: more records than the list may hold, or
    /// more pages than records (each page but the last brings a record new to the walk).
    fn past_bound(&self) -> bool {
        self.received > u64::from(self.max_records)
            || u64::from(self.page) > u64::from(self.max_records) + 1
    }

    /// Starts over from page 1 with `per_page`; `false` when it started over too often.
    fn restart(&mut self, per_page: u32) -> bool {
        self.restarts += 1;
        self.per_page = per_page;
        self.page = 1;
        self.received = 0;
        self.short = None;
        self.restarts <= MAX_RESTARTS
    }

    /// Starts over with the next smaller page size after a page was too large; `false`
    /// when pages of one record are already asked for.
    fn shrink(&mut self) -> bool {
        match PAGE_SIZES.iter().find(|size| **size < self.per_page) {
            Some(smaller) => self.restart(*smaller),
            None => false,
        }
    }

    /// Whether a page of `len` records, all read before, may mean the server does not
    /// page past it (records after it unreadable) rather than that the list ended.
    fn repeat_may_hide_more(&self, len: usize) -> bool {
        // A short page repeated is a short list's end; so is a small one, whatever page
        // size it set (a cap is at least the 50 a page the events API was seen to serve).
        // A short first page repeated before a second page confirmed its size is a list
        // that short, unless its length is a whole number of 50s: a cap's size (a server
        // ignoring `page` and serving 100 of the 500 asked looks like this).
        let unconfirmed = self.short.is_some();
        (len as u64) >= u64::from(self.per_page)
            && len >= 50
            && (!unconfirmed || len.is_multiple_of(50))
    }

    /// Takes in a non-empty page of `len` records. A first page shorter than asked for
    /// is either the whole list or all the server serves a page: the walk goes on asking
    /// for `len` a page — page 2 then starts at record `len` whether the server counts
    /// pages by what it serves or by what was asked (a server serving 100 of 500 asked
    /// and counting by 500 would otherwise never serve records 100–499). `Some(n)`: a
    /// second page as long as such a first one came after it, so the server serves at
    /// most `n` a page (worth remembering for later walks).
    fn take(&mut self, len: u32) -> Option<u32> {
        self.received += u64::from(len);
        let confirmed = self.short.take().filter(|short| len == *short);
        if self.page == 1 && len < self.per_page {
            self.short = Some(len);
            self.per_page = len;
        }
        self.page += 1;
        confirmed
    }
}

/// How a test's recipients walk ended.
enum Walked {
    Complete,
    Gone,
    Early(Early),
    Stuck(Error),
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
        } else if ps.waiting(now) {
            Some(format!(
                "the Reporting API asked for no request before {}",
                rfc3339_ms(ps.not_before.unwrap_or(now))
            ))
        } else if !forced && !ps.due(now) {
            Some(format!(
                "not due; next poll at {}",
                rfc3339_ms(ps.next_poll.unwrap_or(now))
            ))
        } else {
            None
        };
        if let Some(reason) = skip {
            self.note(&format!("phishing: {reason}"));
            return;
        }
        let mut poll = Poll::default();
        let result = self.poll_phishing(deadline, &mut poll).await;
        match result {
            Ok(early) => self.phishing_succeeded(poll, early, now).await,
            Err(err) => {
                if poll.deterministic {
                    // Asking again now would get the same answer and spend quota that
                    // other integrations share: the next poll asks.
                    let interval_ms = i64::from(
                        self.record
                            .spec
                            .phishing
                            .as_ref()
                            .expect("checked")
                            .poll_interval_hours,
                    ) * 3_600_000;
                    let ps = self.phishing_mut();
                    ps.next_poll = Some(now + interval_ms);
                    // The next poll starts afresh (its open tests read again).
                    ps.poll_started = None;
                    ps.tests_listed = None;
                    ps.resume = None;
                    ps.tests_resume = None;
                }
                self.phishing_failed(err).await
            }
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
        let ps = state.phishing.clone().unwrap_or_default();
        if self.only == Some(DataType::Phishing) {
            return !ps.waiting(now_ms());
        }
        let today = utc_day(OffsetDateTime::now_utc());
        ps.ready(self.record.config_version, &today, now_ms())
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

    /// One poll (or the part of it this run has time and budget for): the tests, then
    /// the recipients of the tests the poll rule names. `Ok(Some(_))`: stopped early, the
    /// poll stays due and goes on next run where it stopped.
    async fn poll_phishing(&mut self, deadline: Instant, poll: &mut Poll) -> Result<Option<Early>> {
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
        let ps = self.phishing_mut();
        if ps.account.as_deref() != Some(&account) {
            if ps.account.is_some() {
                // Another host or token: the poll in progress was another account's.
                ps.poll_started = None;
                ps.tests_listed = None;
                ps.tests_resume = None;
                ps.resume = None;
                ps.per_page = None;
                ps.rate_limited_runs = 0;
            }
            ps.account = Some(account);
        }
        let started = now_ms();
        // A poll that stopped early is continued, not started over: where the tests list
        // stopped, which tests it queued, and where the test in progress stopped.
        let cycle = *self.phishing_mut().poll_started.get_or_insert(started);
        let limit = spec.daily_request_limit;
        let mut tracks: Latest<TestTrack> = self.load_log(TRACKS_LIST).await?;
        let mut tests_known: KnownDigests = self.load_log(TESTS_LIST).await?;
        // A poll continued after its tests list completed does not walk it again.
        if self.phishing_mut().tests_listed != Some(cycle) {
            if let Some(early) = self
                .walk_tests(
                    &client,
                    &destination,
                    (&mut tracks, &mut tests_known),
                    (cycle, started),
                    limit,
                    deadline,
                    poll,
                )
                .await?
            {
                return Ok(Some(early));
            }
            self.phishing_mut().tests_listed = Some(cycle);
        }

        // The recipients of every test the poll queued and has not read yet; the one an
        // earlier run stopped in first, at the page it stopped at.
        let resume = self.phishing_mut().resume.take();
        let mut to_read: Vec<u64> = tracks
            .iter()
            .filter(|(_, t)| {
                t.queued_for == cycle
                    && t.stuck_at == 0
                    && t.recipients_read.is_none_or(|read| read < cycle)
            })
            .map(|(id, _)| id)
            .collect();
        // The test a run stopped in first; tests whose reading failed in earlier runs
        // last, so they cannot keep the others from being read.
        let first = resume.map(|r| r.pst_id);
        to_read.sort_unstable_by_key(|id| {
            let failures = tracks.get(*id).map_or(0, |t| t.failures);
            (failures > 0, Some(*id) != first, *id)
        });
        poll.tests_to_read = to_read.len() as u64;
        let mut pending: Vec<(u64, TestTrack)> = Vec::new();
        // A test's own transient failure: the poll goes on with the others, and fails
        // once they are read (the test is read again by the next run).
        let mut failed: Option<Error> = None;
        for pst_id in to_read {
            let start = match resume {
                Some(r) if r.pst_id == pst_id => Cursor {
                    received: r.received,
                    ..Cursor::at(r.page, r.per_page, MAX_RECIPIENT_RECORDS)
                },
                _ => Cursor::at(1, self.page_size(), MAX_RECIPIENT_RECORDS),
            };
            let walked = self
                .walk_recipients(&client, &destination, pst_id, start, limit, deadline, poll)
                .await;
            let mut track = tracks.get(pst_id).unwrap_or_default();
            let walked = match walked {
                Ok(walked) => walked,
                Err(err) => {
                    // KnowBe4 failed on this test after its tries: one request for the
                    // tests list's first record tells the test's failure from the
                    // account's (an outage counts nothing against the test).
                    let own = matches!(err, Error::KnowBe4 { .. })
                        && matches!(
                            self.probe_list(&client, limit, deadline, poll).await,
                            Ok(Fetched::Page(_))
                        );
                    if !own {
                        // Where it stopped is in `resume`; the tracks so far are kept.
                        self.save_entries(TRACKS_LIST, &mut tracks, &mut pending)
                            .await?;
                        return Err(err);
                    }
                    track.failures = track.failures.saturating_add(1);
                    if track.failures < TEST_FAILURES {
                        // Where it stopped is in `resume` (unless a later test's stop
                        // takes it: then it starts over, nothing lost).
                        pending.push((pst_id, track));
                        failed = Some(err);
                        continue;
                    }
                    if self
                        .phishing_mut()
                        .resume
                        .is_some_and(|r| r.pst_id == pst_id)
                    {
                        self.phishing_mut().resume = None;
                    }
                    Walked::Stuck(err)
                }
            };
            track.failures = 0;
            match walked {
                Walked::Complete => {
                    track.recipients_read = Some(started);
                    poll.tests_read += 1;
                }
                Walked::Early(early) => {
                    self.save_entries(TRACKS_LIST, &mut tracks, &mut pending)
                        .await?;
                    return Ok(Some(early));
                }
                Walked::Gone | Walked::Stuck(_) => {
                    track.stuck_at = tests_known.get(pst_id).unwrap_or(1);
                    track.stuck_since = started;
                    poll.stuck += 1;
                    let err = match walked {
                        Walked::Stuck(err) => err,
                        _ => ApiError::Status { status: 404 }.into_error(),
                    };
                    self.test_health(pst_id, &err).await;
                }
            }
            pending.push((pst_id, track));
            if pending.len() >= TRACKS_BATCH {
                self.save_entries(TRACKS_LIST, &mut tracks, &mut pending)
                    .await?;
            }
        }
        self.save_entries(TRACKS_LIST, &mut tracks, &mut pending)
            .await?;
        self.compact(TRACKS_LIST, &mut tracks).await?;
        if let Some(err) = failed {
            return Err(err);
        }
        let interval_ms = i64::from(spec.poll_interval_hours) * 3_600_000;
        let tests_tracked = tracks.len() as u64;
        let ps = self.phishing_mut();
        ps.poll_started = None;
        ps.tests_listed = None;
        ps.resume = None;
        ps.tests_resume = None;
        ps.last_poll = Some(cycle);
        ps.next_poll = Some(cycle + interval_ms);
        ps.tests_tracked = tests_tracked;
        ps.tests_live = tracks.iter().filter(|(_, t)| t.queued_for == cycle).count() as u64;
        Ok(None)
    }

    /// The page size walks ask for: 500, or smaller once a page of 500 could not be read
    /// or the server showed it serves fewer.
    fn page_size(&mut self) -> u32 {
        self.phishing_mut().per_page.unwrap_or(REPORTING_PER_PAGE)
    }

    /// Remembers a smaller page size for later walks.
    fn remember_page_size(&mut self, per_page: u32) {
        if per_page < self.page_size() {
            self.phishing_mut().per_page = Some(per_page);
        }
    }

    /// The security tests list, page by page from where the poll stopped (if it did):
    /// each page's tracks updated (and the test queued when the poll rule says its
    /// recipients are read) and saved, then its new and changed tests forwarded and their
    /// digests saved. `Ok(Some(_))`: stopped early; where is in `tests_resume`.
    #[allow(clippy::too_many_arguments)]
    async fn walk_tests(
        &mut self,
        client: &ReportingClient,
        destination: &Destination,
        (tracks, tests_known): (&mut Latest<TestTrack>, &mut KnownDigests),
        (cycle, started): (i64, i64),
        limit: u32,
        deadline: Instant,
        poll: &mut Poll,
    ) -> Result<Option<Early>> {
        let mut cursor = match self.phishing_mut().tests_resume.take() {
            Some(at) => Cursor {
                received: at.received,
                ..Cursor::at(at.page, at.per_page, MAX_TEST_RECORDS)
            },
            None => Cursor::at(1, self.page_size(), MAX_TEST_RECORDS),
        };
        let mut seen = HashSet::new();
        let mut pending: Vec<(u64, TestTrack)> = Vec::new();
        loop {
            if cursor.past_bound() {
                let err = not_ending("the security tests list", cursor.per_page);
                if cursor.page > 1 {
                    self.list_cut_short(&cursor, &err).await;
                    break;
                }
                poll.deterministic = true;
                return Err(err);
            }
            let fetched = self
                .fetch(client, None, &cursor, limit, deadline, poll)
                .await;
            let page = match fetched {
                Ok(Fetched::Page(p)) if p.ends_list() => break,
                Ok(Fetched::Page(p)) => p,
                // A 404 past the first page is a way to end a list.
                Ok(Fetched::Gone) if cursor.page > 1 => break,
                Ok(Fetched::Gone) => return Err(reporting_error(ApiError::NotKnowBe4)),
                Ok(Fetched::Early(early)) => {
                    self.phishing_mut().tests_resume = Some(ListAt {
                        page: cursor.page,
                        per_page: cursor.per_page,
                        received: cursor.received,
                    });
                    return Ok(Some(early));
                }
                Ok(Fetched::Refused(ApiError::TooLarge { .. })) if cursor.shrink() => {
                    self.remember_page_size(cursor.per_page);
                    seen.clear();
                    continue;
                }
                Ok(Fetched::Refused(err)) => {
                    let err = reporting_error(err);
                    if cursor.page > 1 {
                        // The tests before it are listed and queued: their recipients are
                        // read, rather than every poll failing on this page.
                        self.list_cut_short(&cursor, &err).await;
                        break;
                    }
                    poll.deterministic = true;
                    return Err(err);
                }
                Err(err) => {
                    // A transient failure: the next run goes on at this page.
                    self.phishing_mut().tests_resume = Some(ListAt {
                        page: cursor.page,
                        per_page: cursor.per_page,
                        received: cursor.received,
                    });
                    return Err(err);
                }
            };
            let ids: Vec<u64> = page
                .items
                .iter()
                .map(|item| {
                    test_id(item.get()).unwrap_or_else(|| key_without_id(digest(item.get())))
                })
                .collect();
            let mut changes = page_changes(
                tests_known,
                &mut seen,
                ids.iter()
                    .zip(&page.items)
                    .map(|(id, item)| (*id, item.get())),
            );
            if changes.new_in_walk == 0 {
                poll.repeats += 1;
                self.repeated_page("the security tests list", &cursor, page.items.len())
                    .await;
                break;
            }
            if let Some(served) = cursor.take(page.items.len() as u32) {
                self.remember_page_size(served);
            }
            for (index, item) in page.items.iter().enumerate() {
                let Some(pst_id) = test_id(item.get()) else {
                    poll.without_id += 1;
                    continue;
                };
                let changed = changes.forward.contains(&index);
                let text_digest = digest(item.get());
                let before = tracks.get(pst_id);
                let mut track =
                    before
                        .unwrap_or_default()
                        .observe(&test_status(item.get()), changed, started);
                if track.stuck_at != 0
                    && (track.stuck_at != text_digest
                        || started - track.stuck_since >= STUCK_RECHECK_MS)
                {
                    track.stuck_at = 0;
                    track.stuck_since = 0;
                }
                let read_this_cycle = track.recipients_read.is_some_and(|read| read >= cycle);
                if track.stuck_at == 0
                    && track.read_recipients(changed, started)
                    && (changed || !read_this_cycle)
                {
                    track.queued_for = cycle;
                }
                if before != Some(track) {
                    pending.push((pst_id, track));
                }
            }
            poll.tests += page.items.len() as u64;
            // The changed tracks first: a crash after the forward cannot lose a change.
            self.save_entries(TRACKS_LIST, tracks, &mut pending).await?;
            let forwarded = self
                .forward_page(
                    destination,
                    SOURCETYPE_PHISHING_TEST,
                    &page.items,
                    &ids,
                    &changes.forward,
                    deadline,
                    poll,
                )
                .await;
            if let Err(err) = forwarded {
                self.phishing_mut().tests_resume = Some(ListAt {
                    page: cursor.page - 1,
                    per_page: cursor.per_page,
                    received: cursor.received - page.items.len() as u64,
                });
                return Err(err);
            }
            self.save_entries(TESTS_LIST, tests_known, &mut changes.delta.entries)
                .await?;
        }
        self.compact(TESTS_LIST, tests_known).await?;
        Ok(None)
    }

    /// Every page of one test's recipients from `cursor` on: the new and changed ones
    /// forwarded, then their digests saved. On an early stop or a failure, where to go on
    /// is in [`PhishingState::resume`].
    #[allow(clippy::too_many_arguments)]
    async fn walk_recipients(
        &mut self,
        client: &ReportingClient,
        destination: &Destination,
        pst_id: u64,
        mut cursor: Cursor,
        limit: u32,
        deadline: Instant,
        poll: &mut Poll,
    ) -> Result<Walked> {
        let list = pst_id.to_string();
        let mut known: KnownDigests = self.load_log(&list).await?;
        let mut seen = HashSet::new();
        let what = || format!("the recipients of test {pst_id}");
        let walked = loop {
            if cursor.past_bound() {
                break Walked::Stuck(not_ending(&what(), cursor.per_page));
            }
            let fetched = self
                .fetch(client, Some(pst_id), &cursor, limit, deadline, poll)
                .await;
            let page = match fetched {
                Ok(Fetched::Page(p)) if p.ends_list() => break Walked::Complete,
                Ok(Fetched::Page(p)) => p,
                // A 404 past the first page is a way to end a list.
                Ok(Fetched::Gone) if cursor.page > 1 => break Walked::Complete,
                Ok(Fetched::Gone) => break Walked::Gone,
                Ok(Fetched::Early(early)) => {
                    self.resume_at(pst_id, &cursor);
                    break Walked::Early(early);
                }
                Ok(Fetched::Refused(ApiError::TooLarge { .. })) if cursor.shrink() => {
                    self.remember_page_size(cursor.per_page);
                    seen.clear();
                    continue;
                }
                Ok(Fetched::Refused(ApiError::Unauthorized(status))) => {
                    // The token just served the tests list: its first page (one record)
                    // tells a refused token (the source's) from a refused test (its own).
                    let err = ApiError::Unauthorized(status);
                    match self.probe_list(client, limit, deadline, poll).await {
                        Ok(Fetched::Page(_)) => {
                            break Walked::Stuck(ApiError::Status { status }.into_error());
                        }
                        Ok(Fetched::Early(early)) => {
                            self.resume_at(pst_id, &cursor);
                            break Walked::Early(early);
                        }
                        Ok(Fetched::Gone | Fetched::Refused(_)) => {
                            self.resume_at(pst_id, &cursor);
                            return Err(reporting_error(err));
                        }
                        Err(probe_err) => {
                            self.resume_at(pst_id, &cursor);
                            return Err(probe_err);
                        }
                    }
                }
                Ok(Fetched::Refused(err)) => break Walked::Stuck(reporting_error(err)),
                Err(err) => {
                    self.resume_at(pst_id, &cursor);
                    return Err(err);
                }
            };
            let ids: Vec<u64> = page
                .items
                .iter()
                .map(
                    |item| match serde_json::from_str::<RecipientHead>(item.get()) {
                        Ok(head) if head.recipient_id < 1 << 63 => head.recipient_id,
                        _ => {
                            poll.without_id += 1;
                            key_without_id(digest(item.get()))
                        }
                    },
                )
                .collect();
            let mut changes = page_changes(
                &known,
                &mut seen,
                ids.iter()
                    .zip(&page.items)
                    .map(|(id, item)| (*id, item.get())),
            );
            if changes.new_in_walk == 0 {
                poll.repeats += 1;
                self.repeated_page(&what(), &cursor, page.items.len()).await;
                break Walked::Complete;
            }
            let page_no = cursor.page;
            let asked = cursor.per_page;
            if let Some(served) = cursor.take(page.items.len() as u32) {
                self.remember_page_size(served);
            }
            let forwarded = self
                .forward_page(
                    destination,
                    SOURCETYPE_PHISHING_RECIPIENT,
                    &page.items,
                    &ids,
                    &changes.forward,
                    deadline,
                    poll,
                )
                .await;
            if let Err(err) = forwarded {
                let at = Cursor {
                    received: cursor.received - page.items.len() as u64,
                    ..Cursor::at(page_no, asked, MAX_RECIPIENT_RECORDS)
                };
                self.resume_at(pst_id, &at);
                return Err(err);
            }
            self.save_entries(&list, &mut known, &mut changes.delta.entries)
                .await?;
        };
        // A log is compacted whenever it is longer than it needs to be, whether or not
        // the walk completed (a test that never completes cannot grow it for ever).
        self.compact(&list, &mut known).await?;
        Ok(walked)
    }

    /// Records where the poll goes on inside test `pst_id`.
    fn resume_at(&mut self, pst_id: u64, cursor: &Cursor) {
        self.phishing_mut().resume = Some(Resume {
            pst_id,
            page: cursor.page,
            per_page: cursor.per_page,
            received: cursor.received,
        });
    }

    /// The log `list` of the change store, loaded.
    async fn load_log<V: Entry>(&self, list: &str) -> Result<Latest<V>> {
        let stored = self
            .ctx
            .store
            .load_digest_shards(&self.record.id, list)
            .await?;
        let shards = stored
            .into_iter()
            .map(|(seq, text)| {
                Shard::<V>::decode(&text)
                    .map(|shard| (seq, shard))
                    .map_err(|e| Error::Store {
                        message: format!("list {list} of source {}: {e}", self.record.id),
                        source: None,
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Latest::from_log(shards))
    }

    /// Saves `entries` (drained) to the log `list` as shards of at most 500, and records
    /// them in `known`. Nothing to save: no write.
    async fn save_entries<V: Entry>(
        &mut self,
        list: &str,
        known: &mut Latest<V>,
        entries: &mut Vec<(u64, V)>,
    ) -> Result<()> {
        entries.sort_by_key(|(id, _)| *id);
        entries.dedup_by_key(|(id, _)| *id);
        for chunk in entries.chunks(crate::domain::changes::SHARD_RECORDS) {
            let shard = Shard {
                entries: chunk.to_vec(),
            };
            let seq = known.next_seq().ok_or_else(|| Error::Store {
                message: format!(
                    "list {list} of source {} has no shard number left; delete and re-create the source",
                    self.record.id
                ),
                source: None,
            })?;
            self.ctx
                .store
                .save_digest_shard(&self.record.id, list, seq, &shard.encode(), &self.lease)
                .await?;
            known.remember(seq, &shard);
        }
        entries.clear();
        Ok(())
    }

    /// Compacts the log `list` when it holds more shards than it needs.
    async fn compact<V: Entry>(&mut self, list: &str, known: &mut Latest<V>) -> Result<()> {
        let Some((write, delete)) = compaction(known) else {
            return Ok(());
        };
        for (seq, shard) in &write {
            self.ctx
                .store
                .save_digest_shard(&self.record.id, list, *seq, &shard.encode(), &self.lease)
                .await?;
            known.remember(*seq, shard);
        }
        self.ctx
            .store
            .delete_digest_shards(&self.record.id, list, &delete, &self.lease)
            .await?;
        known.forget_shards(&delete);
        Ok(())
    }

    /// Forwards the records of `items` at `forward` (indices), keyed by `ids`.
    #[allow(clippy::too_many_arguments)]
    async fn forward_page(
        &mut self,
        destination: &Destination,
        sourcetype: &'static str,
        items: &[Box<RawValue>],
        ids: &[u64],
        forward: &[usize],
        deadline: Instant,
        poll: &mut Poll,
    ) -> Result<()> {
        if forward.is_empty() {
            return Ok(());
        }
        let occurred = EventTime::from_datetime(OffsetDateTime::now_utc());
        let events: Vec<RawEvent> = forward
            .iter()
            .map(|i| RawEvent {
                id: ids[*i].to_string(),
                occurred,
                json: items[*i].clone(),
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
        Ok(())
    }

    /// One request (one try) for the tests list's first record: whether the account
    /// answers now, to tell one test's failure from the token's or the API's.
    async fn probe_list(
        &mut self,
        client: &ReportingClient,
        limit: u32,
        deadline: Instant,
        poll: &mut Poll,
    ) -> Result<Fetched> {
        let probe = Cursor::at(1, 1, 1);
        self.fetch_tries(client, None, &probe, (limit, deadline), poll, 1)
            .await
    }

    /// Admits and sends one Reporting request (tests when `pst_id` is `None`), retrying
    /// 429s after their `Retry-After` and transient failures, within [`PAGE_TRIES`].
    async fn fetch(
        &mut self,
        client: &ReportingClient,
        pst_id: Option<u64>,
        cursor: &Cursor,
        limit: u32,
        deadline: Instant,
        poll: &mut Poll,
    ) -> Result<Fetched> {
        self.fetch_tries(client, pst_id, cursor, (limit, deadline), poll, PAGE_TRIES)
            .await
    }

    /// [`fetch`](Self::fetch) within `tries`.
    async fn fetch_tries(
        &mut self,
        client: &ReportingClient,
        pst_id: Option<u64>,
        cursor: &Cursor,
        (limit, deadline): (u32, Instant),
        poll: &mut Poll,
        tries: u32,
    ) -> Result<Fetched> {
        let mut last: Option<ApiError> = None;
        for attempt in 0..tries {
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
                super::Admission::QuotaExhausted => {
                    return Ok(Fetched::Early(Early::Quota(day)));
                }
            }
            crate::failpoint::hit("before_knowbe4_request");
            let answer = match pst_id {
                None => {
                    client
                        .security_tests_page(cursor.page, cursor.per_page)
                        .await
                }
                Some(id) => {
                    client
                        .recipients_page(id, cursor.page, cursor.per_page)
                        .await
                }
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
                Err(ApiError::NotKnowBe4) => return Ok(Fetched::Gone),
                Err(err @ (ApiError::Malformed(_) | ApiError::TooLarge { .. })) => {
                    return Ok(Fetched::Refused(err));
                }
                // One test's recipients refused (any 4xx but 408 and 429) while the list
                // was served: that test's answer (a 401 or 403 the walk tells apart from
                // a refused token).
                Err(
                    err @ (ApiError::Unauthorized(_)
                    | ApiError::Status {
                        status: 400..=407 | 409..=428 | 430..=499,
                    }),
                ) if pst_id.is_some() => return Ok(Fetched::Refused(err)),
                Err(ApiError::Status {
                    status: status @ (400..=407 | 409..=428 | 430..=499),
                }) => return Ok(Fetched::Refused(ApiError::Status { status })),
                Err(ApiError::RateLimited { retry_after }) => {
                    poll.rate_limited += 1;
                    let wait = retry_after.unwrap_or(Duration::from_secs(2 << attempt));
                    let left = deadline
                        .saturating_duration_since(Instant::now())
                        .saturating_sub(needed);
                    if wait > MAX_WAIT_IN_RUN || wait > left {
                        // Only the server's word holds later runs back: a backoff of our
                        // own that the deadline cut short starts over next run.
                        if retry_after.is_some() {
                            self.hold_reporting(retry_after);
                        }
                        tracing::info!(source_id = %self.record.id, wait_ms = wait.as_millis() as u64, "The Reporting API answered 429; the poll goes on after its Retry-After.");
                        return Ok(Fetched::Early(Early::RateLimited));
                    }
                    tracing::info!(source_id = %self.record.id, wait_ms = wait.as_millis() as u64, "The Reporting API answered 429; backing off.");
                    tokio::time::sleep(wait).await;
                    last = Some(ApiError::RateLimited { retry_after });
                }
                Err(
                    err @ (ApiError::Transport(_)
                    | ApiError::NotSent(_)
                    | ApiError::Status {
                        status: 408 | 500..=599,
                    }),
                ) => {
                    tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
                    last = Some(err);
                }
                Err(err) => return Err(reporting_error(err)),
            }
        }
        match last {
            Some(ApiError::RateLimited { retry_after }) => {
                self.hold_reporting(retry_after);
                Ok(Fetched::Early(Early::RateLimited))
            }
            Some(err) => Err(reporting_error(err)),
            None => Ok(Fetched::Early(Early::Deadline)),
        }
    }

    /// After a 429 the run cannot wait out: no Reporting request before its
    /// `Retry-After` (at most [`MAX_RETRY_AFTER`]), or without one before a wait that
    /// doubles with each run that ends so (1 minute, up to an hour).
    fn hold_reporting(&mut self, retry_after: Option<Duration>) {
        let now = now_ms();
        let ps = self.phishing_mut();
        let wait = match retry_after {
            Some(after) => after.min(MAX_RETRY_AFTER),
            None => {
                ps.rate_limited_runs = ps.rate_limited_runs.saturating_add(1);
                Duration::from_secs(60 << ps.rate_limited_runs.min(7).saturating_sub(1))
                    .min(Duration::from_secs(3_600))
            }
        };
        ps.not_before = Some(now.saturating_add(wait.as_millis() as i64));
    }

    /// A page of the tests list past the first could not be read (a deterministic answer):
    /// the list ends there for this poll, with a health event; the tests listed before it
    /// are queued as usual, the next poll asks the page again.
    async fn list_cut_short(&mut self, cursor: &Cursor, err: &Error) {
        let message = format!(
            "the security tests list: page {} could not be read ({}); the tests listed after it are not read in this poll",
            cursor.page,
            err.chain()
        );
        self.stream_health(message, err.status(), super::error_kind(err))
            .await;
    }

    /// A health event for one test whose recipients could not be read; the poll goes on.
    async fn test_health(&mut self, pst_id: u64, err: &Error) {
        let message = format!(
            "phishing security test {pst_id}: its recipients could not be read ({}); they are asked for again when the test changes, or in a day",
            err.chain()
        );
        self.stream_health(message, err.status(), super::error_kind(err))
            .await;
    }

    /// A list ended on a page with nothing new. A full page repeated means the server may
    /// not page past it (it ignores `page`; or it repeats its last page and the list is
    /// a whole number of pages): records after it, if any, cannot be read, which a
    /// health event says (the walk still ends; what it read is forwarded).
    async fn repeated_page(&mut self, what: &str, cursor: &Cursor, len: usize) {
        if !cursor.repeat_may_hide_more(len) {
            return;
        }
        let message = format!(
            "{what}: the Reporting API answered page {} with records already read on an earlier page (a full page of {}), so the walk ended there; if the list is longer, the rest cannot be read while the API pages this way",
            cursor.page, cursor.per_page
        );
        self.stream_health(message, None, "repeated_page").await;
    }

    /// A health event of the phishing stream that does not stop it.
    async fn stream_health(&mut self, message: String, status: Option<u16>, kind: &str) {
        let now = now_ms();
        self.note(&format!("phishing: {message}"));
        let event = HealthEvent {
            source_id: self.record.id.clone(),
            source_name: self.record.spec.name.clone(),
            kind: HealthKind::ThirdPartyGenericError,
            message,
            status,
            error_kind: kind.into(),
            first_seen: now,
            last_seen: now,
            count: 1,
            retry_at: None,
            retry_deadline: None,
            data_type: Some("phishing".into()),
        };
        self.ctx.record_health(&event, HEALTH_TTL_SECS).await;
    }

    async fn phishing_succeeded(&mut self, poll: Poll, early: Option<Early>, now: i64) {
        let progressed = poll.requests > 0;
        let phishing_only = !self.record.spec.collect_events;
        let ps = self.phishing_mut();
        ps.streak = None;
        ps.last_success = Some(now);
        if poll.rate_limited == 0 && poll.requests > 0 {
            // A run served without a 429: the next one without a Retry-After waits a
            // minute.
            ps.rate_limited_runs = 0;
        }
        ps.last_poll_requests = poll.requests;
        ps.last_poll_forwarded = poll.forwarded;
        ps.forwarded_total += poll.forwarded;
        ps.quota_exhausted_day = match &early {
            Some(Early::Quota(day)) => Some(day.clone()),
            _ => None,
        };
        if phishing_only {
            let state = self.state_mut();
            state.streak = None;
            state.last_success = Some(now);
            state.counters.last_run_forwarded = poll.forwarded;
            if state.lifecycle != Lifecycle::Collecting && progressed {
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
        let mut what = format!(
            "{} tests listed, recipients of {} of {} read, {} records forwarded, {} requests",
            poll.tests, poll.tests_read, poll.tests_to_read, poll.forwarded, poll.requests
        );
        if poll.stuck > 0 {
            what.push_str(&format!(
                ", {} tests unreadable (health events)",
                poll.stuck
            ));
        }
        if poll.repeats > 0 {
            what.push_str(&format!(
                ", {} lists ended on a page with nothing new (the server repeated a page)",
                poll.repeats
            ));
        }
        if poll.without_id > 0 {
            what.push_str(&format!(
                ", {} records without a numeric id (forwarded, told apart by content)",
                poll.without_id
            ));
        }
        let text = match early {
            None => format!("phishing: polled ({what})"),
            Some(Early::Deadline) => {
                format!("phishing: stopped before the invocation deadline ({what}); still due")
            }
            Some(Early::Quota(_)) => format!(
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
            let (deadline, passed) = RetryStreak::count(&mut ps.streak, kind, now, window_ms);
            if passed {
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

fn not_ending(what: &str, per_page: u32) -> Error {
    ApiError::Malformed(format!(
        "{what} did not end within the page bound ({per_page} a page)"
    ))
    .into_error()
}

fn rfc3339_ms(ms: i64) -> String {
    EventTime(ms.saturating_mul(1_000_000)).to_rfc3339()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_first_page_sets_the_page_size_and_a_second_page_confirms_it() {
        // Asked for 500, served 100, then more: the server serves 100 a page.
        let mut cursor = Cursor::at(1, 500, MAX_RECIPIENT_RECORDS);
        assert_eq!(cursor.take(100), None);
        assert_eq!((cursor.page, cursor.per_page), (2, 100));
        assert_eq!(cursor.take(100), Some(100));
        assert_eq!(cursor.take(37), None, "a short last page confirms nothing");
        // A list shorter than a page: the next request is the end either way.
        let mut whole = Cursor::at(1, 500, MAX_RECIPIENT_RECORDS);
        assert_eq!(whole.take(40), None);
        assert_eq!((whole.page, whole.per_page), (2, 40));
        // A short page after full ones is the end; the page size stays.
        let mut end = Cursor::at(1, 100, MAX_RECIPIENT_RECORDS);
        end.take(100);
        end.take(3);
        assert_eq!(end.per_page, 100);
    }

    #[test]
    fn a_repeated_page_hides_more_only_when_it_is_full_and_may_be_a_cap() {
        // A full page of 500 repeated: the server may not page past it.
        assert!(Cursor::at(2, 500, 1_000).repeat_may_hide_more(500));
        // A short page repeated is the list's end; so is a small full one.
        assert!(!Cursor::at(2, 500, 1_000).repeat_may_hide_more(120));
        assert!(!Cursor::at(2, 20, 1_000).repeat_may_hide_more(20));
        // A short first page (size unconfirmed) repeated: a list that short, unless it
        // is a whole number of 50s.
        let mut cursor = Cursor::at(1, 500, 1_000);
        assert_eq!(cursor.take(73), None);
        assert!(!cursor.repeat_may_hide_more(73));
        let mut cursor = Cursor::at(1, 500, 1_000);
        assert_eq!(cursor.take(100), None);
        assert!(cursor.repeat_may_hide_more(100));
    }

    #[test]
    fn pages_too_large_shrink_to_one_record_then_stop() {
        let mut cursor = Cursor::at(3, 500, MAX_TEST_RECORDS);
        let mut sizes = Vec::new();
        while cursor.shrink() {
            assert_eq!(cursor.page, 1);
            sizes.push(cursor.per_page);
        }
        assert_eq!(sizes, [100, 20, 5, 1]);
    }

    #[test]
    fn the_bound_counts_records_received_and_pages() {
        let mut cursor = Cursor::at(1, 500, 1_000);
        for _ in 0..10 {
            assert!(!cursor.past_bound());
            cursor.take(100);
        }
        assert!(!cursor.past_bound(), "1,000 records is the bound itself");
        cursor.take(1);
        assert!(cursor.past_bound());
        // One record a page: at most max + 1 pages.
        let mut slow = Cursor::at(1, 1, 3);
        for _ in 0..3 {
            slow.take(1);
        }
        assert!(!slow.past_bound());
        slow.take(1);
        assert!(slow.past_bound());
    }

    #[test]
    fn test_ids_may_be_numbers_or_digit_strings() {
        assert_eq!(test_id(r#"{"pst_id":42}"#), Some(42));
        assert_eq!(test_id(r#"{"pst_id":"42"}"#), Some(42));
        assert_eq!(test_id(r#"{"pst_id":null}"#), None);
        assert_eq!(test_id(r#"{"pst_id":-1}"#), None);
        assert_eq!(test_id(r#"{"name":"x"}"#), None);
        assert_eq!(test_status(r#"{"status":"Closed"}"#), "Closed");
        assert_eq!(test_status(r#"{"status":3}"#), "");
    }
}
