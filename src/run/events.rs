//! The user-event stream: walks the User Event API (`GET /events`) with the checkpoint's
//! walker, within the account's budget, keeping up to `KNOWBE4_MAX_IN_FLIGHT` pages in
//! flight; forwards and checkpoints through the run ([`super::forward`]).

use std::collections::VecDeque;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::time::Instant;

use super::budget::FetchFailure;
use super::{FLUSH_EVENTS, MALFORMED_RETRIES, PAGE_ATTEMPTS, Run, Stop, Trigger, now_ms};
use crate::domain::checkpoint::{DEFAULT_PAGE_SIZE, HeadWalk, Step, Walker};
use crate::domain::event::{EventTime, RawEvent};
use crate::domain::planner::{self, PlanInput};
use crate::domain::quota::utc_day;
use crate::domain::secrets::SourceSecrets;
use crate::domain::state::{Lifecycle, SourceRecord};
use crate::error::{Error, Result};
use crate::knowbe4::{ApiError, KnowBe4Client};
use crate::sink::Destination;
use crate::store::Reservation;
use secrecy::SecretString;

/// The source's User Event API key: a secret without one (edited, or written for another
/// data type) is a configuration error naming the field the source's generation uses.
fn events_key(record: &SourceRecord, secrets: &SourceSecrets) -> Result<SecretString> {
    secrets.api_key.clone().ok_or_else(|| Error::Secret {
        name: record.id.clone(),
        message: format!(
            "the source's secret holds no User Event API key ({}); update the source with it",
            record.spec.generation.events_key_field()
        ),
        config: true,
    })
}

impl Run<'_> {
    /// Collects user events: joins the account (its limits are shared), plans the run's
    /// budget, then walks pages until the walk ends, the budget or the deadline stops
    /// it, or an error does (after forwarding and checkpointing what was fetched).
    pub(super) async fn collect_events(
        &mut self,
        secrets: &SourceSecrets,
        destination: &Destination,
        first_run: bool,
        deadline: Instant,
    ) -> Result<Stop> {
        let mut client = KnowBe4Client::new(
            self.ctx.knowbe4_http.clone(),
            &self.record.spec.api_base,
            events_key(&self.record, secrets)?,
            &self.run_id,
            self.ctx.settings.request_timeout,
        );
        // The limits are the account's: every source using this key shares them.
        let account = client.account().to_string();
        let members = self
            .ctx
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
        // The first request's reservation doubles as the read of the account's ledger:
        // its answer is the day's count, this reservation included (one write instead of
        // a read and a write). Unused, it is given back below; a run that fails before
        // its first request keeps it, which only over-counts (the safe side).
        let used = match self
            .ctx
            .store
            .reserve_request(&account, &day, limit)
            .await?
        {
            Reservation::Granted(count) => {
                self.prereserved = true;
                count.saturating_sub(1)
            }
            Reservation::Exhausted => limit,
        };
        self.quota_seen = Some(super::QuotaSeen {
            used: used + u32::from(self.prereserved),
            limit,
        });
        let state = &self.state.as_ref().expect("loaded").value;
        let checkpoint = state.checkpoint.clone();
        // Sources sharing the account take equal turns at each interval's allowance, so
        // none starves another; the ledger keeps the account's day within its limit. The
        // planner spaces full re-reads of the lateness window to what the quota pays.
        let plan = planner::plan(&PlanInput {
            daily_limit: limit,
            used_today: used,
            now,
            interval_secs: self.ctx.settings.schedule_interval_secs,
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
        if budget == 0 {
            self.give_back_prereserved(&day).await;
            if plan.available > 0 {
                return Ok(Stop::NothingDue(plan.head_every_secs));
            }
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
            let depth = speculation_depth(&walker, shape.as_ref(), self.ctx.settings.max_in_flight);
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
                    let fresh = self.ctx.source_secrets(&self.record, true).await?;
                    client.set_key(events_key(&self.record, &fresh)?);
                    continue;
                }
                Err(FetchFailure::Api(err)) => {
                    return Err(self
                        .flush_then(err.into_error(), destination, &meta, &mut buffer, &walker)
                        .await);
                }
                Err(FetchFailure::Other(err)) => {
                    return Err(self
                        .flush_then(err, destination, &meta, &mut buffer, &walker)
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
                        .flush_then(err, destination, &meta, &mut buffer, &walker)
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
                self.flush(destination, &meta, &mut buffer, &walker, deadline)
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
        self.give_back_prereserved(&day).await;
        if fetched_pages > 0 {
            self.state_mut().counters.page_size = Some(walker.page_size());
        }
        // Saved with the outcome (`succeed`), which follows directly.
        self.flush_last(destination, &meta, &mut buffer, &walker, deadline)
            .await?;
        self.report.fetched = fetched_total;
        Ok(stop)
    }

    /// Reserves, paces and sends a request for `page` without waiting for its answer.
    pub(super) async fn issue(
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
    pub(super) async fn next_page(
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
    pub(super) async fn retry(
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
            // A malformed answer is deterministic and is not asked again (`retriable` is
            // false). A page that parses but does not fit its list (a live list shrinking
            // under the walk) may read differently a moment later, but asking spends the
            // account's shared quota: it is asked again once, not with the full backoff.
            if matches!(failed, ApiError::Inconsistent(_)) {
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
                backoff + self.ctx.settings.deadline_margin + self.ctx.settings.request_timeout;
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

    /// Cancels the requests sent ahead; those that had not started sending give their
    /// quota reservation back.
    pub(super) async fn discard(&mut self, ahead: &mut VecDeque<InFlight>, day: &str) {
        for mut request in ahead.drain(..).collect::<Vec<_>>() {
            request.handle.abort();
            let _ = (&mut request.handle).await;
            if !request.started.load(std::sync::atomic::Ordering::SeqCst) {
                self.unreserve(day).await;
            }
        }
    }
}

/// A request sent ahead of the walk. Dropping it cancels the request if it has not been
/// sent yet, so no request leaves after the run ends (and releases its lease).
pub(super) struct InFlight {
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
pub(super) struct PageShape {
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
pub(super) struct PageSummary {
    newest: Option<EventTime>,
    oldest: Option<EventTime>,
    events: usize,
    more: Option<bool>,
    count: Option<u64>,
    total_pages: Option<u64>,
}

impl PageSummary {
    pub(super) fn of(page: &crate::domain::checkpoint::Page) -> PageSummary {
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
    pub(super) fn shape(self, page_no: u32, walker: &Walker) -> Option<PageShape> {
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
pub(super) fn speculation_depth(walker: &Walker, shape: Option<&PageShape>, max: usize) -> usize {
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
