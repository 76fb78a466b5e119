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
//! Assumptions kept few, each reading of the API's unconfirmed details handled:
//! - the page size: 500 is asked for; a server answering fewer per page only costs
//!   requests. A page too large to read (the client's body cap) makes the list start over
//!   at 100 per page, remembered for later polls; digests keep that from forwarding twice.
//! - the end of a list: an empty page (recorded). A page with no record new to the walk
//!   (a server ignoring `page`, or repeating its last page) also ends it; a list still going
//!   after [`MAX_TEST_RECORDS`] or [`MAX_RECIPIENT_RECORDS`] records' worth of pages is
//!   refused. Every walk therefore ends within `max / per_page + 1` requests.
//! - 429: never taken as the daily limit from its wording (documented for the events API
//!   only); a `Retry-After` is honoured in full — waited within the run when short,
//!   otherwise saved, and no Reporting request is sent before it passes.
//! - a record without a numeric id is forwarded (keyed by its digest), not dropped and
//!   not a reason to stop.
//!
//! Deterministic answers are not retried: a malformed page, a page too large even at 100,
//! or a list that does not end stop the walk of *that* test (its track remembers the test
//! object it failed on; it is read again when the test changes), with a health event
//! naming the test, and the poll goes on with the other tests. Transport failures, 408
//! and 5xx are retried within [`PAGE_TRIES`]; then the poll fails.
//!
//! Every request is admitted through the Reporting account's ledger and send slot
//! ([`super::admit_reporting_request`]): the daily limit reserved first, then at most one
//! request per 1.25 s across every process (≤ 4 a second, ≤ 50 a minute). A poll stopped
//! early (deadline, daily limit, 429s) stays due and is continued by the next run: the tests
//! list is read again (changes since are caught), the tests whose recipients were read
//! since the poll started are skipped unless they changed again, and the test in progress
//! goes on at the page it stopped at ([`Resume`]). Each run reads at least one page, so a
//! poll longer than one invocation completes over several.
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
    Digest, Entry, KnownDigests, Latest, Shard, compaction, digest, key_without_id, page_changes,
};
use crate::domain::event::{EventTime, RawEvent};
use crate::domain::phishing_poll::{PhishingState, Resume, TRACKS_LIST, TestTrack};
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
/// The digest list of the security tests (a test's recipients use its `pst_id`).
const TESTS_LIST: &str = "tests";
/// Changed tracks kept in memory before they are saved (a crash loses at most the
/// "recipients read" marks of these: those tests are read again, nothing is re-sent).
const TRACKS_BATCH: usize = 50;

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
}

#[derive(serde::Deserialize)]
struct TestHead {
    pst_id: u64,
    /// Any JSON (a status that is not a string reads as no status).
    #[serde(default)]
    status: Option<serde_json::Value>,
}

#[derive(serde::Deserialize)]
struct RecipientHead {
    recipient_id: u64,
}

/// Where a list walk is: its page size and the next page.
struct Cursor {
    page: u32,
    per_page: u32,
    max_records: u32,
}

impl Cursor {
    /// Whether the walk has passed its bound.
    fn past_bound(&self) -> bool {
        u64::from(self.page.saturating_sub(1)) * u64::from(self.per_page)
            > u64::from(self.max_records)
    }

    /// Starts over with smaller pages after one was too large; `false` when it already
    /// uses them.
    fn shrink(&mut self) -> bool {
        if self.per_page <= REPORTING_FALLBACK_PER_PAGE {
            return false;
        }
        self.per_page = REPORTING_FALLBACK_PER_PAGE;
        self.page = 1;
        true
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
                    self.phishing_mut().next_poll = Some(now + interval_ms);
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
    /// poll stays due and goes on next run.
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
        if self.phishing_mut().account.as_deref() != Some(&account) {
            self.phishing_mut().account = Some(account);
        }
        let started = now_ms();
        // A poll that stopped early is continued, not started over: the tests whose
        // recipients it read since it started are not read again.
        let cycle = *self.phishing_mut().poll_started.get_or_insert(started);
        let limit = spec.daily_request_limit;
        let mut tracks: Latest<TestTrack> = self.load_log(TRACKS_LIST).await?;
        let mut pending: Vec<(u64, TestTrack)> = Vec::new();

        // 1–2. The security tests, page by page.
        let mut tests_known: KnownDigests = self.load_log(TESTS_LIST).await?;
        let mut cursor = Cursor {
            page: 1,
            per_page: self.phishing_mut().per_page.unwrap_or(REPORTING_PER_PAGE),
            max_records: MAX_TEST_RECORDS,
        };
        let mut seen = HashSet::new();
        // (pst_id, digest of the test object) of every test whose recipients to read.
        let mut to_read: Vec<(u64, Digest)> = Vec::new();
        let mut queued = HashSet::new();
        loop {
            if cursor.past_bound() {
                poll.deterministic = true;
                return Err(not_ending("the security tests list", cursor.per_page));
            }
            let page = match self
                .fetch(&client, None, &cursor, limit, deadline, poll)
                .await?
            {
                Fetched::Page(p) if p.ends_list() => break,
                Fetched::Page(p) => p,
                Fetched::Gone => return Err(reporting_error(ApiError::NotKnowBe4)),
                Fetched::Early(early) => return Ok(Some(early)),
                Fetched::Refused(ApiError::TooLarge { .. }) if cursor.shrink() => {
                    self.phishing_mut().per_page = Some(cursor.per_page);
                    seen.clear();
                    continue;
                }
                Fetched::Refused(err) => {
                    poll.deterministic = true;
                    return Err(reporting_error(err));
                }
            };
            let heads: Vec<Option<TestHead>> = page
                .items
                .iter()
                .map(|item| serde_json::from_str::<TestHead>(item.get()).ok())
                .collect();
            let ids: Vec<u64> = heads
                .iter()
                .zip(&page.items)
                .map(|(head, item)| match head {
                    Some(head) if head.pst_id < 1 << 63 => head.pst_id,
                    _ => key_without_id(digest(item.get())),
                })
                .collect();
            let mut changes = page_changes(
                &tests_known,
                &mut seen,
                ids.iter()
                    .zip(&page.items)
                    .map(|(id, item)| (*id, item.get())),
            );
            if changes.new_in_walk == 0 {
                poll.repeats += 1;
                break;
            }
            for (index, (head, item)) in heads.iter().zip(&page.items).enumerate() {
                let Some(head) = head.as_ref().filter(|h| h.pst_id < 1 << 63) else {
                    poll.without_id += 1;
                    continue;
                };
                let changed = changes.forward.contains(&index);
                let text_digest = digest(item.get());
                let before = tracks.get(head.pst_id).unwrap_or_default();
                let mut track = before.observe(
                    head.status.as_ref().and_then(|s| s.as_str()).unwrap_or(""),
                    changed,
                    started,
                );
                if track.stuck_at != 0 && track.stuck_at != text_digest {
                    track.stuck_at = 0;
                }
                let read_this_cycle = track.recipients_read.is_some_and(|read| read >= cycle);
                if track.stuck_at == 0
                    && track.read_recipients(changed, started)
                    && (changed || !read_this_cycle)
                    && queued.insert(head.pst_id)
                {
                    to_read.push((head.pst_id, text_digest));
                }
                if track != before || tracks.get(head.pst_id).is_none() {
                    pending.push((head.pst_id, track));
                }
            }
            poll.tests += page.items.len() as u64;
            // The changed tracks first: a crash after the forward cannot lose a change.
            self.save_entries(TRACKS_LIST, &mut tracks, &mut pending)
                .await?;
            self.forward_page(
                &destination,
                SOURCETYPE_PHISHING_TEST,
                &page.items,
                &ids,
                &changes.forward,
                deadline,
                poll,
            )
            .await?;
            self.save_entries(TESTS_LIST, &mut tests_known, &mut changes.delta.entries)
                .await?;
            cursor.page += 1;
        }
        self.compact(TESTS_LIST, &mut tests_known).await?;
        drop(tests_known);
        poll.tests_to_read = to_read.len() as u64;

        // 3. Recipients of every test the poll rule names; the one an earlier run stopped
        //    in first, at the page it stopped at.
        let resume = self.phishing_mut().resume.take();
        if let Some(at) = resume.and_then(|r| to_read.iter().position(|(id, _)| *id == r.pst_id)) {
            let entry = to_read.remove(at);
            to_read.insert(0, entry);
        }
        for (pst_id, test_digest) in to_read {
            let start = match resume {
                Some(r) if r.pst_id == pst_id => Cursor {
                    page: r.page,
                    per_page: r.per_page,
                    max_records: MAX_RECIPIENT_RECORDS,
                },
                _ => Cursor {
                    page: 1,
                    per_page: self.phishing_mut().per_page.unwrap_or(REPORTING_PER_PAGE),
                    max_records: MAX_RECIPIENT_RECORDS,
                },
            };
            let walked = self
                .walk_recipients(&client, &destination, pst_id, start, limit, deadline, poll)
                .await?;
            let mut track = tracks.get(pst_id).unwrap_or_default();
            match walked {
                Walked::Complete => {
                    track.recipients_read = Some(started);
                    poll.tests_read += 1;
                }
                Walked::Gone => {
                    // Listed, but its recipients answer 404: not asked again until the
                    // test changes.
                    track.stuck_at = test_digest;
                    let pages: Vec<u32> = self
                        .ctx
                        .store
                        .load_digest_shards(&self.record.id, &pst_id.to_string())
                        .await?
                        .into_iter()
                        .map(|(seq, _)| seq)
                        .collect();
                    self.ctx
                        .store
                        .delete_digest_shards(
                            &self.record.id,
                            &pst_id.to_string(),
                            &pages,
                            &self.lease,
                        )
                        .await?;
                }
                Walked::Early(early) => {
                    pending.push((pst_id, track));
                    self.save_entries(TRACKS_LIST, &mut tracks, &mut pending)
                        .await?;
                    self.save().await?;
                    return Ok(Some(early));
                }
                Walked::Stuck(err) => {
                    track.stuck_at = test_digest;
                    poll.stuck += 1;
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
        let interval_ms = i64::from(spec.poll_interval_hours) * 3_600_000;
        let tests_tracked = tracks.len() as u64;
        let ps = self.phishing_mut();
        ps.poll_started = None;
        ps.resume = None;
        ps.last_poll = Some(cycle);
        ps.next_poll = Some(cycle + interval_ms);
        ps.tests_tracked = tests_tracked;
        ps.tests_live = poll.tests_to_read;
        Ok(None)
    }

    /// Every page of one test's recipients from `cursor` on: the new and changed ones
    /// forwarded, then their digests saved. On an early stop the place to go on from is
    /// in [`PhishingState::resume`].
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
        let walked = loop {
            if cursor.past_bound() {
                break Walked::Stuck(not_ending(
                    &format!("the recipients of test {pst_id}"),
                    cursor.per_page,
                ));
            }
            let page = match self
                .fetch(client, Some(pst_id), &cursor, limit, deadline, poll)
                .await?
            {
                Fetched::Page(p) if p.ends_list() => break Walked::Complete,
                Fetched::Page(p) => p,
                Fetched::Gone => break Walked::Gone,
                Fetched::Early(early) => {
                    self.phishing_mut().resume = Some(Resume {
                        pst_id,
                        page: cursor.page,
                        per_page: cursor.per_page,
                    });
                    break Walked::Early(early);
                }
                Fetched::Refused(ApiError::TooLarge { .. }) if cursor.shrink() => {
                    self.phishing_mut().per_page = Some(cursor.per_page);
                    seen.clear();
                    continue;
                }
                Fetched::Refused(err) => break Walked::Stuck(reporting_error(err)),
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
                break Walked::Complete;
            }
            self.forward_page(
                destination,
                SOURCETYPE_PHISHING_RECIPIENT,
                &page.items,
                &ids,
                &changes.forward,
                deadline,
                poll,
            )
            .await?;
            self.save_entries(&list, &mut known, &mut changes.delta.entries)
                .await?;
            cursor.page += 1;
        };
        if matches!(walked, Walked::Complete) {
            self.compact(&list, &mut known).await?;
        }
        Ok(walked)
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
            let seq = known.next_seq();
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
                Err(ApiError::NotKnowBe4) if pst_id.is_some() => return Ok(Fetched::Gone),
                Err(err @ (ApiError::Malformed(_) | ApiError::TooLarge { .. })) => {
                    return Ok(Fetched::Refused(err));
                }
                Err(ApiError::RateLimited { retry_after }) => {
                    let wait = retry_after.unwrap_or(Duration::from_secs(2 << attempt));
                    let left = deadline
                        .saturating_duration_since(Instant::now())
                        .saturating_sub(needed);
                    if wait > MAX_WAIT_IN_RUN || wait > left {
                        if let Some(after) = retry_after {
                            self.phishing_mut().not_before =
                                Some(now_ms() + after.as_millis() as i64);
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
            Some(ApiError::RateLimited { .. }) => Ok(Fetched::Early(Early::RateLimited)),
            Some(err) => Err(reporting_error(err)),
            None => Ok(Fetched::Early(Early::Deadline)),
        }
    }

    /// A health event for one test whose recipients could not be read; the poll goes on.
    async fn test_health(&mut self, pst_id: u64, err: &Error) {
        let now = now_ms();
        let message = format!(
            "phishing security test {pst_id}: its recipients could not be read ({}); they are read again when the test changes",
            err.chain()
        );
        self.note(&format!("phishing: {message}"));
        let event = HealthEvent {
            source_id: self.record.id.clone(),
            source_name: self.record.spec.name.clone(),
            kind: HealthKind::ThirdPartyGenericError,
            message,
            status: err.status(),
            error_kind: super::error_kind(err).into(),
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
        let today = utc_day(OffsetDateTime::now_utc());
        let phishing_only = !self.record.spec.collect_events;
        let ps = self.phishing_mut();
        ps.streak = None;
        ps.last_success = Some(now);
        ps.last_poll_requests = poll.requests;
        ps.last_poll_forwarded = poll.forwarded;
        ps.forwarded_total += poll.forwarded;
        ps.quota_exhausted_day = (early == Some(Early::Quota)).then(|| today.clone());
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

fn not_ending(what: &str, per_page: u32) -> Error {
    ApiError::Malformed(format!(
        "{what} did not end within the page bound ({per_page} a page)"
    ))
    .into_error()
}

fn rfc3339_ms(ms: i64) -> String {
    EventTime(ms.saturating_mul(1_000_000)).to_rfc3339()
}
