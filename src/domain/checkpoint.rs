//! The checkpoint: what has been delivered, and how a run walks KnowBe4's event list so
//! that nothing is lost.
//!
//! # The problem
//! `GET /events` lists events newest `occurred_date` first, in numbered pages. Events are
//! pushed into KnowBe4 by other integrations with an `occurred_date` they choose, so a
//! new event can appear *older* than events already collected (backdated), events can be
//! deleted, and an insert or delete during a multi-page walk shifts the later pages.
//! Ids are random UUIDs: they identify, they do not order. A run may be cut short by the
//! daily quota, its request budget or the Lambda deadline.
//!
//! # The design
//! The checkpoint holds:
//! - `high`: the newest `occurred_date` a walk started from (capped at the wall clock, so
//!   an event dated in the future cannot push it ahead of real time);
//! - `recent`: the ids of delivered events with `occurred_date >= high - L`, where `L` is
//!   the lateness window (`latenessWindowMinutes`), and of delivered events inside a gap
//!   (a gap can start inside an earlier window);
//! - `gaps`: ranges of the time axis, below `high - L`, that a cut-short walk did not
//!   finish, each with the ids already delivered at its upper edge and an estimate of
//!   how many events lie above it (to find its page again without re-reading the middle).
//!
//! Each run first walks the *head*: page 1 down to `high - L`, delivering every event not
//! in `recent` (new events, and late ones that arrived within the window). Then it walks
//! the gaps, newest first, starting at an estimated page found by a bounded search (pages
//! are sorted, so a probe tells whether the gap starts earlier or later).
//!
//! Within a walk a cursor (the last processed `occurred_date` and the ids processed at
//! it) skips repeats caused by inserts above the walk position; a shrinking list size
//! between pages (deletes above) makes the walk step back so nothing is skipped.
//!
//! # What the walk assumes of KnowBe4, under each reading
//! The public record leaves several paging details open (`shared/reference/
//! knowbe4-api.md`, facts tagged UNKNOWN or DOC-only). The walk reads everything it uses
//! from each response and works under every reading:
//!
//! | detail | readings | what the walk does |
//! |---|---|---|
//! | page size | `per_page=100` honoured, or capped at 50 (both recordings say `limit_value: 50`), or anything else | asks for 100, takes `limit_value` (else the largest page seen in the run) as the page size; all page arithmetic (gap `above_hint` → page, probes, `passed`) uses it |
//! | end of list | `next_page`, `is_last_page`, `total_pages`/`current_page`, any subset present | ends where they say; fields that disagree, more events than `limit_value`, or a page shorter than `limit_value` (or empty) that claims more pages are malformed; with none present, a page shorter than the page size ends the list |
//! | `meta.count` | counts the list, counts the page, or is absent | never used to decide the end of the list. The run learns which it is (a page with more after it whose `count` exceeds its events counts the list; one whose `count` equals its events counts the page) and uses it only as a list size |
//! | `total_pages` | present or absent | a list size at page resolution, for deletes, probes and speculation |
//!
//! Deletes above the walk position between two page requests shift the later pages up
//! by the number deleted, so the first events of the next page would be skipped:
//! - `count` counts the list: the drop is exact; the walk steps back `ceil(drop / page
//!   size)` pages and the cursor skips what it already read. (A delete above and an insert
//!   below within one page interval cancel out and can still skip an event at the edge:
//!   page-number paging cannot show it.)
//! - only `total_pages`: a drop of n pages means at most (n+1)·size−1 deletes; the walk
//!   steps back n+1 pages. Fewer deletes than it takes to change `total_pages` are not
//!   visible.
//! - neither (or too few deletes for `total_pages` to move): the shift cannot be seen
//!   from the responses. Seeing it would take one more request per page boundary
//!   (re-reading the previous page), doubling the quota every multi-page walk spends on an
//!   account whose quota is shared; the collector does not pay that. What bounds the
//!   damage: only deletes that land between two page requests of one walk (~270 ms
//!   apart) and above its position matter, a skipped event inside the lateness window is
//!   found by the next head walk (it is not in `recent`), and inserts at the top (the
//!   common change) show as repeats, which prove no skip at that boundary. The property
//!   tests run deletes between pages only under the reading where `count` is the list
//!   total, and between runs under every reading.
//!
//! Step-backs are bounded: after [`MAX_STEP_BACKS`] in one run, or a shift of more than
//! [`MAX_PAGES_BACK`] pages, the walk stops for this run and the rest of its range stays
//! a gap, found by content (not page number) by the next run.
//!
//! # Termination
//! Whatever the server answers, a run's walk makes at most: one request per page of the
//! list down to its lower bound (page numbers only increase, except step-backs), plus
//! [`MAX_PROBES`] probes and one boundary page per gap, plus [`MAX_STEP_BACKS`] ×
//! [`MAX_PAGES_BACK`] re-read pages, plus one malformed page asked again. A page of only
//! repeats is refused (`Repeating`) unless a growing list size explains it (once per
//! walk when no size is sent), so a server repeating pages cannot make the walk loop;
//! a page that is not the one asked for (`current_page`) is malformed. The run's request
//! budget (its share of the daily quota) caps every walk in any case. The property tests
//! check the bound on every request under every reading.
//!
//! An event whose `occurred_date` is missing or out of range takes its nearest dated
//! neighbour's time on the page (or the walk's position) and is forwarded as sent; its
//! id is reported. It never fails a page.
//!
//! # The invariant
//! After every saved checkpoint: every event that was visible in KnowBe4 during a walk and
//! whose `occurred_date` lies in a walked range was delivered, and every range not yet
//! walked, down to the first-run floor, is either `>= high - L` (walked by the next head
//! walk) or inside a gap. The checkpoint is only saved after the destination accepted the
//! events it covers, so a crash repeats at most the unsaved batch and loses nothing.
//!
//! # Why it holds, and its edges
//! - A backdated event is delivered if, when it appears, its `occurred_date` is no more
//!   than `L` older than the newest event then visible: the next head walk reaches down
//!   to `high - L` and `high` never exceeds that newest event.
//! - `recent` is bounded ([`MAX_RECENT_IDS`]) so a state item stays far below
//!   DynamoDB's 400 KB; when more ids fall in the window, the oldest are dropped and the
//!   head walk stops above them (`recent_floor`), narrowing the window rather than
//!   re-delivering: this is reported by `status`.
//! - Deletes between two page requests of one walk: see the readings above.
//! - Gaps are bounded ([`MAX_GAPS`]); beyond it the two oldest merge, which re-delivers
//!   the range between them (duplicates, never a loss).

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::domain::event::{EventTime, RawEvent};

/// Ids kept for dedupe inside the lateness window (~24 bytes each when stored).
pub const MAX_RECENT_IDS: usize = 2000;
/// Unfinished ranges kept before the oldest are merged.
pub const MAX_GAPS: usize = 32;
/// Events per page *asked for* (a vendor doc's maximum). What KnowBe4 serves may be fewer
/// (both recorded pages say `limit_value: 50`): page arithmetic always uses the page size
/// read from the responses ([`Walker::page_size`]), never this.
pub const PER_PAGE: u32 = 100;
/// Page size assumed before any page said otherwise: the recorded `limit_value`.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// Placeholder time of an event whose `occurred_date` could not be read and that had no
/// dated neighbour on its page; the walker gives it the walk's position.
pub const UNDATED: EventTime = EventTime(i64::MAX);
/// Step-backs (re-reading pages after deletes shifted the list) allowed per walk before
/// the walk stops for this run and leaves the rest as a gap, found by content next run.
pub const MAX_STEP_BACKS: u32 = 3;
/// Pages one step-back may re-read; more deletes than that stop the walk the same way.
pub const MAX_PAGES_BACK: u32 = 4;
/// Probes allowed to find a gap's first page before walking on from the nearest one.
const MAX_PROBES: u32 = 12;

/// An id delivered inside the lateness window.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeenId {
    /// The event's `occurred_date`.
    pub t: EventTime,
    /// The event's id.
    pub id: String,
}

/// A range of `occurred_date` not yet walked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gap {
    /// Upper edge, inclusive (except the ids in `skip`).
    pub newest: EventTime,
    /// Ids at exactly `newest` that were already delivered.
    pub skip: Vec<String>,
    /// Lower edge, inclusive.
    pub oldest: EventTime,
    /// Events believed to be listed above `newest`: where to look for its page.
    pub above_hint: u64,
}

/// What has been delivered. Serialised with a format version so it can evolve.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Format version of this document.
    #[serde(default = "format_version")]
    pub format: u32,
    /// Newest `occurred_date` a walk started from; `None` before the first run.
    pub high: Option<EventTime>,
    /// Ids delivered with `occurred_date >= high - L` (dedupe for the head walk).
    #[serde(with = "compact_ids")]
    pub recent: Vec<SeenId>,
    /// When `recent` overflowed: it is complete only for `occurred_date >= recent_floor`.
    pub recent_floor: Option<EventTime>,
    /// Unfinished ranges, newest first.
    pub gaps: Vec<Gap>,
    /// The first run's floor (`now - firstFetchLookbackHours`): nothing older is walked.
    pub floor: Option<EventTime>,
    /// `high` when the lateness window was last re-read completely (a full head walk).
    /// Head-only walks (new events only) leave it; the next full walk re-reads from
    /// `reread_high - L`, so an event backdated into the window since is still found,
    /// and `recent` keeps ids down to there. `None`: as `high` (older checkpoints were
    /// always walked in full).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reread_high: Option<EventTime>,
    /// Wall-clock time of that full walk, for the freshness planner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reread_at: Option<EventTime>,
    /// Wall-clock time of the last head walk of either kind, for the freshness planner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_at: Option<EventTime>,
}

impl Checkpoint {
    /// The lower edge of the dedupe window: ids delivered at or after it are in `recent`.
    fn window_from(&self, lateness_ns: i64) -> Option<EventTime> {
        let high = self.high?;
        let from = self.reread_high.map_or(high, |r| r.min(high));
        Some(EventTime(from.0.saturating_sub(lateness_ns)))
    }
}

/// How much of the head a run walks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadWalk {
    /// From page 1 down to the dedupe window's lower edge: new events, and backdated
    /// ones that arrived since the last full walk (the default; every run before the
    /// freshness planner).
    Full,
    /// From page 1 down to `high`: new events only, one page when few arrived. Backdated
    /// events wait for the next full walk, which the planner schedules.
    NewOnly,
}

fn format_version() -> u32 {
    1
}

/// One page of `GET /events`, as the walker needs it.
#[derive(Debug, Default)]
pub struct Page {
    /// Events on the page, newest first.
    pub events: Vec<RawEvent>,
    /// `meta.count`, when sent. Whether it counts this page or the whole list is not
    /// publicly known; the walker finds out from the pages themselves.
    pub count: Option<u64>,
    /// `meta.limit_value`: the page size the server actually serves.
    pub limit: Option<u32>,
    /// `meta.total_pages`, when sent.
    pub total_pages: Option<u64>,
    /// Whether more pages follow, from `next_page` / `is_last_page` / `total_pages`;
    /// `None` when the response says nothing about it.
    pub more: Option<bool>,
    /// Ids of events whose `occurred_date` was missing or unreadable (forwarded as sent,
    /// placed at their neighbour's time).
    pub undated: Vec<String>,
}

impl Page {
    /// A page that says whether more follow, as a model server or a test builds it.
    pub fn new(events: Vec<RawEvent>, more: bool) -> Page {
        Page {
            events,
            more: Some(more),
            ..Page::default()
        }
    }

    /// Whether this page ends the list, for a walk whose pages hold `page_size` events:
    /// what the response says, else a page shorter than a full one.
    pub fn is_last(&self, page_size: u32) -> bool {
        Self::ends_list(self.more, self.events.len(), page_size)
    }

    /// Whether a page that said `more` (or nothing) and held `events` ends the list of a
    /// walk whose pages hold `page_size` events.
    pub fn ends_list(more: Option<bool>, events: usize, page_size: u32) -> bool {
        match more {
            Some(more) => !more,
            None => events == 0 || events < page_size as usize,
        }
    }
}

/// A list size a response told, in the unit it told it in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ListSize {
    /// `meta.count`, once the walk saw that it counts the whole list.
    Events(u64),
    /// `meta.total_pages` (at the served page size).
    Pages(u64),
}

/// What the walker wants next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Fetch this page number.
    Fetch(u32),
    /// Everything reachable was walked.
    Done,
}

/// A page broke an assumption the walk relies on; nothing from it was taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalkError {
    /// Events on a page are not newest first.
    #[error("page {0} is not sorted newest first")]
    Unordered(u32),
    /// A full page held only events this walk already passed while the list did not
    /// grow: the server is repeating pages (inserts above the walk position would have
    /// raised `meta.count`). Taking the next page would skip what this one hides.
    #[error("page {0} repeats events already read while the list did not grow")]
    Repeating(u32),
    /// A page that says more pages follow holds fewer events than a full page.
    #[error("page {0} is short but says more pages follow")]
    ShortPage(u32),
    /// A page arrived that was not the one asked for.
    #[error("page {got} arrived while page {expected} was expected")]
    WrongPage {
        /// The page the walker asked for.
        expected: u32,
        /// The page given.
        got: u32,
    },
}

#[derive(Clone, Debug)]
enum Phase {
    /// Walking from page 1 down to `lower`.
    Head {
        lower: EventTime,
        top: Option<EventTime>,
    },
    /// Looking for the first page of gap 0 of `gaps_todo`.
    Locate {
        page: u32,
        known_above: u32,
        known_below: Option<u32>,
        probes: u32,
    },
    /// Walking gap 0 of `gaps_todo`.
    Gap,
    Done,
}

/// Where an event lies relative to the range being walked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    Above,
    In,
    Below,
}

/// One run's walk over KnowBe4's event list: a pure state machine fed pages, which
/// returns the events to deliver and, at any point, the checkpoint to save once those
/// events were accepted.
#[derive(Debug)]
pub struct Walker {
    /// Whether the head walk re-reads the whole dedupe window ([`HeadWalk::Full`]).
    full: bool,
    /// The checkpoint the run started from, with gaps clipped below the head walk.
    base: Checkpoint,
    lateness_ns: i64,
    now: EventTime,
    phase: Phase,
    /// Gaps not finished yet (gap 0 is the one being walked).
    gaps_todo: Vec<Gap>,
    /// Ids delivered by the head walk of this run.
    head_delivered: Vec<SeenId>,
    /// Ids delivered by this run's gap walks inside the dedupe window.
    gap_delivered: Vec<SeenId>,
    head_seen: HashSet<String>,
    /// Events the head walk delivered (for gap page estimates).
    head_new: u64,
    /// `base.recent` as a set, for dedupe.
    recent_ids: HashSet<String>,
    /// Cursor of the current walk: last processed time and the ids processed at it.
    cursor: Option<(EventTime, Vec<String>)>,
    /// Events processed in the current walk since its first page (for `above_hint`).
    passed: u64,
    /// The page to fetch next within the current walk.
    page: u32,
    /// The list size the previous page of this walk told (to see deletes and inserts).
    last_size: Option<ListSize>,
    /// `meta.limit_value` as last sent: the page size KnowBe4 serves.
    limit: Option<u32>,
    /// The most events any page of this run held (the page size without `limit_value`).
    largest_page: u32,
    /// Whether `meta.count` counts the whole list (`Some(true)`), only the page
    /// (`Some(false)`), or is not known yet; learned from pages that have more after them.
    count_is_total: Option<bool>,
    /// Step-backs taken in this run (bounded by [`MAX_STEP_BACKS`]).
    step_backs: u32,
    /// Full pages of repeats seen without a list size to explain them.
    unexplained_repeats: u32,
    /// The walk stopped for this run (too many deletes to re-read); the rest stays a gap.
    halted: bool,
    /// Events without a readable `occurred_date` in this run: (count, first few ids).
    undated: (u64, Vec<String>),
    /// Events of this run, for status and metrics.
    delivered: u64,
    /// Events skipped as already delivered, for the run summary.
    duplicates: u64,
    /// The walk stepped back a page after deletes: the next page repeats on purpose.
    stepped_back: bool,
}

impl Walker {
    /// Plans a run from `checkpoint` at wall-clock `now`.
    pub fn new(
        checkpoint: Checkpoint,
        now: EventTime,
        first_lookback_secs: u64,
        lateness_secs: u64,
    ) -> Self {
        Self::planned(
            checkpoint,
            now,
            first_lookback_secs,
            lateness_secs,
            HeadWalk::Full,
        )
    }

    /// Plans a run whose head walk is `head` (see [`HeadWalk`]).
    pub fn planned(
        checkpoint: Checkpoint,
        now: EventTime,
        first_lookback_secs: u64,
        lateness_secs: u64,
        head: HeadWalk,
    ) -> Self {
        let lateness_ns = (lateness_secs as i64).saturating_mul(1_000_000_000);
        let mut base = checkpoint;
        base.format = format_version();
        let floor = *base
            .floor
            .get_or_insert(now.minus_secs(first_lookback_secs));
        let lower = match (base.high, head) {
            (None, _) => floor,
            (Some(high), HeadWalk::NewOnly) => high.max(floor),
            (Some(_), HeadWalk::Full) => base
                .window_from(lateness_ns)
                .expect("high is set")
                .max(base.recent_floor.unwrap_or(floor))
                .max(floor),
        };
        // A first walk reads everything down to the floor: it is a full one.
        let full = head == HeadWalk::Full || base.high.is_none();
        let gaps_todo = clip_gaps(std::mem::take(&mut base.gaps), lower);
        let recent_ids = base.recent.iter().map(|s| s.id.clone()).collect();
        Walker {
            full,
            base,
            lateness_ns,
            now,
            phase: Phase::Head { lower, top: None },
            gaps_todo,
            head_delivered: Vec::new(),
            gap_delivered: Vec::new(),
            head_seen: HashSet::new(),
            head_new: 0,
            recent_ids,
            cursor: None,
            passed: 0,
            page: 1,
            last_size: None,
            limit: None,
            largest_page: 0,
            count_is_total: None,
            step_backs: 0,
            unexplained_repeats: 0,
            halted: false,
            undated: (0, Vec::new()),
            delivered: 0,
            duplicates: 0,
            stepped_back: false,
        }
    }

    /// The next request of the walk.
    pub fn next_step(&self) -> Step {
        if self.halted {
            return Step::Done;
        }
        match self.phase {
            Phase::Done => Step::Done,
            Phase::Locate { page, .. } => Step::Fetch(page),
            _ => Step::Fetch(self.page),
        }
    }

    /// Events delivered so far in this run.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// Whether this run's head walk re-reads the whole dedupe window.
    pub fn is_full(&self) -> bool {
        self.full
    }

    /// Whether the walk is in its head phase (fresh events) rather than a backlog gap.
    pub fn in_head(&self) -> bool {
        matches!(self.phase, Phase::Head { .. })
    }

    /// While pages are walked one after another, the time the walk goes down to: the
    /// caller may fetch the following pages ahead. `None` while probing for a gap.
    pub fn sequential_floor(&self) -> Option<EventTime> {
        match self.phase {
            Phase::Head { lower, .. } => Some(lower),
            Phase::Gap => self.gaps_todo.first().map(|g| g.oldest),
            Phase::Locate { .. } | Phase::Done => None,
        }
    }

    /// Events skipped because they were already delivered (dedupe), in this run.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// The page size KnowBe4 serves, as far as this run has seen: `limit_value`, else the
    /// largest page, else [`DEFAULT_PAGE_SIZE`].
    pub fn page_size(&self) -> u32 {
        match (self.limit, self.largest_page) {
            (Some(limit), _) => limit.max(1),
            (None, 0) => DEFAULT_PAGE_SIZE,
            (None, largest) => largest,
        }
    }

    /// Whether this run learned that `meta.count` counts the whole list.
    pub fn count_is_total(&self) -> Option<bool> {
        self.count_is_total
    }

    /// Events of this run whose `occurred_date` could not be read, and the first ids.
    pub fn undated(&self) -> (u64, &[String]) {
        (self.undated.0, &self.undated.1)
    }

    /// Whether the walk stopped early because deletes kept shifting the list.
    pub fn halted(&self) -> bool {
        self.halted
    }

    /// Learns the page size and the meaning of `count` from `page`, and returns the list
    /// size it tells, if any.
    fn learn(&mut self, page_no: u32, page: &Page) -> Option<ListSize> {
        if let Some(limit) = page.limit {
            self.limit = Some(limit);
        }
        let len = page.events.len() as u64;
        self.largest_page = self.largest_page.max(len as u32);
        if let Some(count) = page.count {
            if count > len && (page.more == Some(true) || page_no > 1) {
                // More events than the page holds: a list total (or at least not the page).
                self.count_is_total = Some(true);
            } else if count == len && page.more == Some(true) {
                // A page with more after it counted only itself.
                self.count_is_total = Some(false);
            }
        }
        match (self.count_is_total, page.count, page.total_pages) {
            (Some(true), Some(count), _) => Some(ListSize::Events(count)),
            (_, _, Some(pages)) => Some(ListSize::Pages(pages)),
            _ => None,
        }
    }

    /// Feeds the page asked for; returns the events to deliver, in page order.
    pub fn on_page(&mut self, page_no: u32, mut page: Page) -> Result<Vec<RawEvent>, WalkError> {
        let expected = match self.next_step() {
            Step::Fetch(p) => p,
            Step::Done => return Ok(Vec::new()),
        };
        if page_no != expected {
            return Err(WalkError::WrongPage {
                expected,
                got: page_no,
            });
        }
        self.place_undated(&mut page);
        if page
            .events
            .windows(2)
            .any(|w| w[0].occurred < w[1].occurred)
        {
            return Err(WalkError::Unordered(page_no));
        }
        let size = self.learn(page_no, &page);
        let page_size = self.page_size();
        if page.more == Some(true) && page.events.len() < page_size as usize {
            return Err(WalkError::ShortPage(page_no));
        }
        let expects_repeats = std::mem::take(&mut self.stepped_back);
        let full_of_repeats = !page.events.is_empty()
            && page.events.len() >= page_size as usize
            && page.events.iter().all(|e| self.is_repeat(e));
        let grew = match (self.last_size, size) {
            (Some(ListSize::Events(before)), Some(ListSize::Events(now)))
            | (Some(ListSize::Pages(before)), Some(ListSize::Pages(now))) => now > before,
            _ => false,
        };
        if full_of_repeats && !grew && !expects_repeats {
            // A whole page of events already read: inserts above (which a list size would
            // show) or a server repeating pages. Without a size to tell, allow it once.
            let unexplained = size.is_none() && self.unexplained_repeats == 0;
            if !unexplained {
                return Err(WalkError::Repeating(page_no));
            }
            self.unexplained_repeats += 1;
        }
        let last = page.is_last(page_size);
        match self.phase.clone() {
            Phase::Done => Ok(Vec::new()),
            Phase::Head { lower, top } => Ok(self.head_page(page_no, page, last, size, lower, top)),
            Phase::Locate {
                page: p,
                known_above,
                known_below,
                probes,
            } => Ok(self.locate_page(p, page, last, size, known_above, known_below, probes)),
            Phase::Gap => Ok(self.gap_page(page, last, size)),
        }
    }

    /// Gives undated events (no dated neighbour on their page) the walk's position, so
    /// they are delivered in place; counts them for the run report.
    fn place_undated(&mut self, page: &mut Page) {
        if page.undated.is_empty() {
            return;
        }
        let at = self.cursor.as_ref().map(|(t, _)| *t).unwrap_or(self.now);
        for event in &mut page.events {
            if event.occurred == UNDATED {
                event.occurred = at;
            }
        }
        self.undated.0 += page.undated.len() as u64;
        for id in page.undated.drain(..) {
            if self.undated.1.len() < 10 {
                self.undated.1.push(id);
            }
        }
    }

    fn head_page(
        &mut self,
        page_no: u32,
        page: Page,
        last: bool,
        size: Option<ListSize>,
        lower: EventTime,
        top: Option<EventTime>,
    ) -> Vec<RawEvent> {
        if self.step_back_on_delete(size) {
            return Vec::new();
        }
        let top = top.or_else(|| page.events.first().map(|e| e.occurred));
        self.phase = Phase::Head { lower, top };
        let mut out = Vec::new();
        let mut reached_bottom = last || page.events.is_empty();
        // A new-events-only walk still looks at the rest of the page it fetched: events
        // there that are inside the dedupe window but not in it were backdated since,
        // and delivering them now costs no request.
        let free_from = if self.full {
            None
        } else {
            self.base
                .window_from(self.lateness_ns)
                .map(|from| from.max(self.base.recent_floor.unwrap_or(from)))
        };
        for event in page.events {
            if self.is_repeat(&event) {
                self.duplicates += 1;
                continue;
            }
            if event.occurred < lower {
                reached_bottom = true;
                if free_from.is_none_or(|from| event.occurred < from) {
                    break;
                }
                if self.recent_ids.contains(&event.id) || self.head_seen.contains(&event.id) {
                    continue;
                }
                self.head_seen.insert(event.id.clone());
                self.head_delivered.push(SeenId {
                    t: event.occurred,
                    id: event.id.clone(),
                });
                out.push(event);
                continue;
            }
            self.advance_cursor(&event);
            if self.recent_ids.contains(&event.id) || self.head_seen.contains(&event.id) {
                self.duplicates += 1;
                continue;
            }
            self.head_new += 1;
            // Only ids the checkpoint will keep are remembered: those inside the
            // lateness window below this walk's top (the new high-water mark is at
            // least that high). Older ones lie above every gap and would be pruned, so a
            // backlog walk holds a window's worth of ids, not the whole backlog.
            if top.is_some_and(|top| {
                let from = self
                    .base
                    .reread_high
                    .map_or(top, |r| r.min(top))
                    .min(self.now);
                event.occurred.0 >= from.0.saturating_sub(self.lateness_ns)
            }) {
                self.head_seen.insert(event.id.clone());
                self.head_delivered.push(SeenId {
                    t: event.occurred,
                    id: event.id.clone(),
                });
            }
            out.push(event);
        }
        self.delivered += out.len() as u64;
        if reached_bottom {
            self.finish_head(top);
        } else {
            self.page = page_no + 1;
        }
        out
    }

    /// Commits the head walk into `base` and moves on to the gaps.
    fn finish_head(&mut self, top: Option<EventTime>) {
        // Events listed above each gap grew by the new events this head walk delivered
        // (re-read window events were already above it).
        let head_count = std::mem::take(&mut self.head_new);
        self.base = self.head_snapshot(top, None);
        self.recent_ids = self.base.recent.iter().map(|s| s.id.clone()).collect();
        for gap in &mut self.gaps_todo {
            gap.above_hint = gap.above_hint.saturating_add(head_count);
        }
        self.head_delivered.clear();
        self.head_seen.clear();
        self.start_next_gap();
    }

    fn start_next_gap(&mut self) {
        self.cursor = None;
        self.passed = 0;
        self.last_size = None;
        let page_size = u64::from(self.page_size());
        match self.gaps_todo.first() {
            None => self.phase = Phase::Done,
            Some(gap) => {
                let page = u32::try_from(gap.above_hint / page_size)
                    .unwrap_or(u32::MAX - 1)
                    .saturating_add(1);
                self.phase = Phase::Locate {
                    page,
                    known_above: 0,
                    known_below: None,
                    probes: 0,
                };
            }
        }
    }

    fn place_in_gap(gap: &Gap, event: &RawEvent) -> Place {
        if event.occurred > gap.newest
            || (event.occurred == gap.newest && gap.skip.contains(&event.id))
        {
            Place::Above
        } else if event.occurred < gap.oldest {
            Place::Below
        } else {
            Place::In
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn locate_page(
        &mut self,
        p: u32,
        page: Page,
        last: bool,
        size: Option<ListSize>,
        known_above: u32,
        known_below: Option<u32>,
        probes: u32,
    ) -> Vec<RawEvent> {
        let gap = self.gaps_todo[0].clone();
        let page_size = u64::from(self.page_size());
        let probes = probes + 1;
        let first = page.events.first().map(|e| Self::place_in_gap(&gap, e));
        let all_above = !page.events.is_empty()
            && page
                .events
                .iter()
                .all(|e| Self::place_in_gap(&gap, e) == Place::Above);
        let give_up = probes >= MAX_PROBES;
        if all_above {
            // Whatever this run manages, the gap starts after page `p`: keep that, so a
            // run with a small budget still moves the next one's search forward.
            let hint = &mut self.gaps_todo[0].above_hint;
            *hint = (*hint).max(u64::from(p) * page_size);
            if last {
                // Nothing at or below the gap exists any more: it is done.
                self.complete_gap();
                return Vec::new();
            }
            let next = match known_below {
                Some(below) if below > p + 1 => p + (below - p) / 2,
                Some(below) => below.min(p + 1),
                None => p.saturating_add(probes.clamp(1, 8)),
            };
            let next = if give_up { p + 1 } else { next.max(p + 1) };
            if give_up || Some(next) == known_below && next == p + 1 {
                // The gap starts on the next page.
                self.phase = Phase::Gap;
                self.page = p + 1;
                self.passed = u64::from(p) * page_size;
                self.last_size = size;
                return Vec::new();
            }
            self.phase = Phase::Locate {
                page: next,
                known_above: p,
                known_below,
                probes,
            };
            return Vec::new();
        }
        // The page holds gap events, events below the gap, or nothing at all.
        let may_start_earlier = p > known_above + 1 && first != Some(Place::Above);
        if may_start_earlier && give_up {
            // Out of probes: walk forward from the last page known to be above the gap,
            // which costs requests but cannot skip anything.
            self.phase = Phase::Gap;
            self.page = known_above + 1;
            self.passed = u64::from(known_above) * page_size;
            return Vec::new();
        }
        if may_start_earlier {
            let last_page = match size {
                Some(ListSize::Events(count)) => Some(count.div_ceil(page_size)),
                Some(ListSize::Pages(pages)) => Some(pages),
                None => None,
            }
            .map(|pages| u32::try_from(pages).unwrap_or(u32::MAX));
            let prev = match last_page {
                // Past the end of the list: the gap starts on the last page or before.
                Some(last) if page.events.is_empty() && last > known_above && last < p => last,
                _ if p - known_above > 2 => known_above + (p - known_above) / 2,
                _ => p - 1,
            };
            self.phase = Phase::Locate {
                page: prev.max(known_above + 1),
                known_above,
                known_below: Some(p),
                probes,
            };
            return Vec::new();
        }
        // This page is where the gap starts (or the nearest one we will find).
        self.phase = Phase::Gap;
        self.page = p;
        self.passed = u64::from(p - 1) * page_size;
        self.last_size = None;
        self.gap_page(page, last, size)
    }

    fn gap_page(&mut self, page: Page, last: bool, size: Option<ListSize>) -> Vec<RawEvent> {
        if self.step_back_on_delete(size) {
            return Vec::new();
        }
        let gap = self.gaps_todo[0].clone();
        let mut out = Vec::new();
        let mut done = last || page.events.is_empty();
        for event in page.events {
            if self.is_repeat(&event) {
                self.duplicates += 1;
                continue;
            }
            match Self::place_in_gap(&gap, &event) {
                Place::Above => {
                    self.passed += 1;
                    continue;
                }
                Place::Below => {
                    done = true;
                    break;
                }
                Place::In => {}
            }
            self.advance_cursor(&event);
            if self.recent_ids.contains(&event.id) {
                self.duplicates += 1;
            } else {
                // Inside the dedupe window (a gap left by a cut-short walk can reach into
                // it), the id is remembered: a later full head walk reads there again.
                if self
                    .base
                    .window_from(self.lateness_ns)
                    .is_some_and(|from| event.occurred >= from)
                {
                    self.gap_delivered.push(SeenId {
                        t: event.occurred,
                        id: event.id.clone(),
                    });
                }
                out.push(event);
            }
        }
        self.delivered += out.len() as u64;
        if done {
            self.complete_gap();
        } else {
            self.page += 1;
        }
        out
    }

    fn complete_gap(&mut self) {
        self.gaps_todo.remove(0);
        self.start_next_gap();
    }

    /// True for an event at or above the cursor that was already processed in this walk
    /// (a repeat caused by inserts above the walk position).
    fn is_repeat(&self, event: &RawEvent) -> bool {
        match &self.cursor {
            None => false,
            Some((t, ids)) => {
                event.occurred > *t || (event.occurred == *t && ids.contains(&event.id))
            }
        }
    }

    fn advance_cursor(&mut self, event: &RawEvent) {
        self.passed += 1;
        match &mut self.cursor {
            Some((t, ids)) if *t == event.occurred => ids.push(event.id.clone()),
            _ => self.cursor = Some((event.occurred, vec![event.id.clone()])),
        }
    }

    /// When the list size shrank since the previous page, events above the walk position
    /// were deleted and the pages moved up: re-read the pages they moved into instead of
    /// skipping. Without a list size this cannot be seen (see the design doc). When the
    /// shift is too large or keeps happening, the walk stops for this run: the rest of
    /// the range stays a gap, found again by content (not page number) next run.
    fn step_back_on_delete(&mut self, size: Option<ListSize>) -> bool {
        let previous = self.last_size;
        self.last_size = size.or(previous);
        let page_size = u64::from(self.page_size());
        let pages_back = match (previous, size) {
            (Some(ListSize::Events(before)), Some(ListSize::Events(now))) if now < before => {
                (before - now).div_ceil(page_size)
            }
            // `total_pages` dropped by n: between (n-1)·size+1 and (n+1)·size-1 deletes.
            (Some(ListSize::Pages(before)), Some(ListSize::Pages(now))) if now < before => {
                before - now + 1
            }
            _ => return false,
        };
        if self.page <= 1 {
            return false;
        }
        self.step_backs += 1;
        if self.step_backs > MAX_STEP_BACKS || pages_back > u64::from(MAX_PAGES_BACK) {
            self.halted = true;
            return true;
        }
        self.page = self.page.saturating_sub(pages_back as u32).max(1);
        self.stepped_back = true;
        true
    }

    /// The checkpoint after a head walk that reached `cursor` (or finished, when `None`).
    fn head_snapshot(
        &self,
        top: Option<EventTime>,
        unfinished: Option<(EventTime, Vec<String>, EventTime)>,
    ) -> Checkpoint {
        let mut cp = self.base.clone();
        if let Some(top) = top {
            let capped = top.min(self.now);
            cp.high = Some(cp.high.map_or(capped, |h| h.max(capped)));
        } else if cp.high.is_none() {
            // An empty first walk: the floor is the high-water mark from now on.
            if let Phase::Head { lower, .. } = self.phase {
                cp.high = Some(EventTime(lower.0.saturating_add(self.lateness_ns)).min(self.now));
            }
        }
        if self.full {
            // The window was re-read down to here, and what a cut-short walk did not
            // reach becomes a gap that will be walked: later full walks start from here.
            cp.reread_high = cp.high;
            cp.reread_at = Some(self.now);
        }
        cp.head_at = Some(self.now);
        cp.recent.extend(self.head_delivered.iter().cloned());
        cp.gaps = self.gaps_todo.clone();
        if let Some((newest, skip, oldest)) = unfinished
            && newest >= oldest
        {
            cp.gaps.insert(
                0,
                Gap {
                    newest,
                    skip,
                    oldest,
                    above_hint: self.passed,
                },
            );
        }
        prune_recent(&mut cp, self.lateness_ns);
        bound_gaps(cp)
    }

    /// The checkpoint to save once every event returned so far was accepted.
    pub fn snapshot(&self) -> Checkpoint {
        let mut cp = match &self.phase {
            Phase::Head { lower, top } => {
                let unfinished = match &self.cursor {
                    None => Some((EventTime(i64::MAX), Vec::new(), *lower)),
                    Some((t, ids)) => Some((*t, ids.clone(), *lower)),
                };
                if self.cursor.is_none() && top.is_none() {
                    // Nothing fetched yet: keep the checkpoint as it was.
                    let mut cp = self.base.clone();
                    cp.gaps = self.gaps_todo.clone();
                    return cp;
                }
                return self.head_snapshot(*top, unfinished);
            }
            _ => {
                let mut cp = self.base.clone();
                cp.recent.extend(self.gap_delivered.iter().cloned());
                cp
            }
        };
        let mut gaps = self.gaps_todo.clone();
        if let (Phase::Gap, Some(first), Some((t, ids))) =
            (&self.phase, gaps.first_mut(), &self.cursor)
        {
            first.newest = *t;
            first.skip = ids.clone();
            first.above_hint = self.passed;
        }
        cp.gaps = gaps;
        prune_recent(&mut cp, self.lateness_ns);
        bound_gaps(cp)
    }
}

/// Keeps only the part of each gap below `lower` (the head walk covers the rest).
fn clip_gaps(gaps: Vec<Gap>, lower: EventTime) -> Vec<Gap> {
    gaps.into_iter()
        .filter_map(|mut gap| {
            if gap.newest >= lower {
                gap.newest = EventTime(lower.0.saturating_sub(1));
                gap.skip.clear();
            }
            (gap.newest >= gap.oldest).then_some(gap)
        })
        .collect()
}

fn bound_gaps(mut cp: Checkpoint) -> Checkpoint {
    while cp.gaps.len() > MAX_GAPS {
        // Merge the two oldest: the range between them is walked again (duplicates,
        // never a loss).
        let oldest = cp.gaps.pop().expect("more than MAX_GAPS gaps");
        let last = cp.gaps.last_mut().expect("more than MAX_GAPS gaps");
        last.oldest = last.oldest.min(oldest.oldest);
    }
    cp
}

fn prune_recent(cp: &mut Checkpoint, lateness_ns: i64) {
    let Some(window) = cp.window_from(lateness_ns) else {
        return;
    };
    // Ids inside an unfinished gap stay too: the gap walk must not deliver them again.
    let gaps = &cp.gaps;
    cp.recent
        .retain(|s| s.t >= window || gaps.iter().any(|g| g.oldest <= s.t && s.t <= g.newest));
    cp.recent
        .sort_by(|a, b| b.t.cmp(&a.t).then_with(|| a.id.cmp(&b.id)));
    cp.recent.dedup();
    if let Some(floor) = cp.recent_floor
        && floor < window
    {
        cp.recent_floor = None;
    }
    if cp.recent.len() > MAX_RECENT_IDS {
        // Drop whole timestamps from the oldest end, so the set stays complete above the
        // new floor.
        let cut = cp.recent[MAX_RECENT_IDS - 1].t;
        cp.recent.retain(|s| s.t > cut);
        let floor = EventTime(cut.0.saturating_add(1));
        cp.recent_floor = Some(cp.recent_floor.map_or(floor, |f| f.max(floor)));
    }
}

/// Stores `recent` compactly: UUID ids as 16 bytes plus an 8-byte time, base64 encoded;
/// any other id shape is kept as text.
mod compact_ids {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::SeenId;
    use crate::domain::event::EventTime;

    #[derive(Serialize, Deserialize, Default)]
    struct Stored {
        #[serde(default)]
        uuids: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        other: Vec<SeenId>,
    }

    pub fn serialize<S: Serializer>(ids: &[SeenId], serializer: S) -> Result<S::Ok, S::Error> {
        let mut bytes = Vec::with_capacity(ids.len() * 24);
        let mut other = Vec::new();
        for seen in ids {
            match uuid::Uuid::parse_str(&seen.id) {
                Ok(u) if u.hyphenated().to_string() == seen.id => {
                    bytes.extend_from_slice(&seen.t.0.to_be_bytes());
                    bytes.extend_from_slice(u.as_bytes());
                }
                _ => other.push(seen.clone()),
            }
        }
        Stored {
            uuids: STANDARD.encode(bytes),
            other,
        }
        .serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<SeenId>, D::Error> {
        let stored = Stored::deserialize(deserializer)?;
        let bytes = STANDARD
            .decode(stored.uuids.as_bytes())
            .map_err(serde::de::Error::custom)?;
        if bytes.len() % 24 != 0 {
            return Err(serde::de::Error::custom("recent ids are truncated"));
        }
        let mut ids: Vec<SeenId> = bytes
            .chunks_exact(24)
            .map(|chunk| {
                let t = i64::from_be_bytes(chunk[..8].try_into().expect("8 bytes"));
                let id = uuid::Uuid::from_slice(&chunk[8..]).expect("16 bytes");
                SeenId {
                    t: EventTime(t),
                    id: id.hyphenated().to_string(),
                }
            })
            .collect();
        ids.extend(stored.other);
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};
    use serde_json::value::RawValue;
    use std::collections::{BTreeSet, HashMap};

    const SEC: i64 = 1_000_000_000;

    /// KnowBe4's list, in memory: newest first, ties by id.
    #[derive(Default)]
    struct List {
        events: BTreeSet<(std::cmp::Reverse<i64>, String)>,
        next_id: u64,
    }

    impl List {
        fn insert(&mut self, t: i64, rng: &mut StdRng) -> String {
            self.next_id += 1;
            let id = uuid::Uuid::from_u128(rng.random::<u128>() ^ u128::from(self.next_id))
                .hyphenated()
                .to_string();
            self.events.insert((std::cmp::Reverse(t), id.clone()));
            id
        }
        fn newest(&self) -> Option<i64> {
            self.events.first().map(|(t, _)| t.0)
        }
        fn delete_random(&mut self, rng: &mut StdRng) {
            if self.events.is_empty() {
                return;
            }
            let i = rng.random_range(0..self.events.len());
            let key = self.events.iter().nth(i).cloned().unwrap();
            self.events.remove(&key);
        }
        fn page(&self, page: u32, reading: &ModelReading) -> Page {
            let size = reading.page_size as usize;
            let start = (page as usize - 1) * size;
            let events: Vec<RawEvent> = self
                .events
                .iter()
                .skip(start)
                .take(size)
                .map(|(t, id)| RawEvent {
                    id: id.clone(),
                    occurred: EventTime(t.0),
                    json: RawValue::from_string(format!("{{\"id\":\"{id}\"}}")).unwrap(),
                })
                .collect();
            let total = self.events.len() as u64;
            let total_pages = total.div_ceil(size as u64);
            Page {
                more: reading.says_more.then_some(u64::from(page) < total_pages),
                count: match reading.count {
                    ModelCount::Page => Some(events.len() as u64),
                    ModelCount::Total => Some(total),
                    ModelCount::Absent => None,
                },
                limit: reading.limit_value.then_some(size as u32),
                total_pages: reading.total_pages.then_some(total_pages),
                undated: Vec::new(),
                events,
            }
        }
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum ModelCount {
        Page,
        Total,
        Absent,
    }

    /// One reading of KnowBe4's unconfirmed paging details, as the model server plays it.
    #[derive(Clone, Copy, Debug)]
    struct ModelReading {
        page_size: u32,
        count: ModelCount,
        total_pages: bool,
        limit_value: bool,
        /// Whether `next_page` / `is_last_page` are sent.
        says_more: bool,
    }

    /// Every combination of: count per page / per list / absent; `total_pages` present /
    /// absent; `limit_value` 50 / 100 / absent (absent: pages of 50 or 100, unlabelled);
    /// `next_page` present / absent.
    fn readings() -> Vec<ModelReading> {
        let mut all = Vec::new();
        for count in [ModelCount::Page, ModelCount::Total, ModelCount::Absent] {
            for total_pages in [true, false] {
                for (page_size, limit_value) in [(50, true), (100, true), (50, false), (100, false)]
                {
                    for says_more in [true, false] {
                        all.push(ModelReading {
                            page_size,
                            count,
                            total_pages,
                            limit_value,
                            says_more,
                        });
                    }
                }
            }
        }
        all
    }

    impl ModelReading {
        /// Whether a list size is observable between pages with one-event resolution
        /// (`count` as the list total): only then can a delete above the walk position
        /// between two page requests always be seen (see the design doc).
        fn exact_size(&self) -> bool {
            self.count == ModelCount::Total
        }
    }

    /// The convenient reading the tests used before readings existed.
    const LIST_TOTAL_100: ModelReading = ModelReading {
        page_size: 100,
        count: ModelCount::Total,
        total_pages: true,
        limit_value: true,
        says_more: true,
    };

    struct Scenario {
        seed: u64,
        runs: usize,
        budget: std::ops::Range<u32>,
        mutate: bool,
        crash_every: Option<usize>,
        reading: ModelReading,
        /// Share of runs (before settling) whose head walk reads new events only.
        new_only_share: f64,
    }

    /// Runs a seeded scenario and returns (lost ids, duplicate deliveries, requests).
    fn run(s: Scenario) -> (Vec<String>, usize, u64) {
        let mut rng = StdRng::seed_from_u64(s.seed);
        let lateness = 600; // seconds
        let mut list = List::default();
        let mut now = 1_700_000_000 * SEC;
        // A backlog over the last two days, some of it older than the first-run floor.
        for _ in 0..2500 {
            let t =
                now - rng.random_range(0..48 * 3600) * SEC - rng.random_range(0..1000) * 1_000_000;
            list.insert(t, &mut rng);
        }
        // Ties: events sharing a timestamp.
        for _ in 0..40 {
            let t = list
                .events
                .iter()
                .nth(rng.random_range(0..list.events.len()))
                .unwrap()
                .0
                .0;
            list.insert(t, &mut rng);
        }
        let lookback = 30 * 3600;
        let floor = now - lookback as i64 * SEC;
        let mut saved = Checkpoint::default();
        let mut delivered: HashMap<String, usize> = HashMap::new();
        let mut requests = 0u64;
        let total_runs = s.runs + 6;
        for run in 0..total_runs {
            let settling = run >= s.runs;
            let head = if !settling && rng.random_bool(s.new_only_share) {
                HeadWalk::NewOnly
            } else {
                HeadWalk::Full
            };
            let mut walker =
                Walker::planned(saved.clone(), EventTime(now), lookback, lateness, head);
            let budget = if settling {
                u32::MAX
            } else {
                rng.random_range(s.budget.clone())
            };
            let crash = !settling && s.crash_every.is_some_and(|n| run % n == n - 1);
            let mut unsaved: Vec<String> = Vec::new();
            let mut used = 0;
            let gaps_at_start = saved.gaps.len() as u64;
            let mut largest_list = list.events.len() as u64;
            let deletes_between_pages = s.reading.exact_size();
            while let Step::Fetch(p) = walker.next_step() {
                if used == budget {
                    break;
                }
                used += 1;
                requests += 1;
                if s.mutate && !settling && rng.random_bool(0.3) {
                    mutate(&mut list, &mut rng, now, lateness, deletes_between_pages);
                }
                largest_list = largest_list.max(list.events.len() as u64);
                // Termination bound: every page of the list once, plus the probes of
                // each gap, the step-backs and a page to confirm each boundary.
                let bound = largest_list.div_ceil(u64::from(s.reading.page_size))
                    + (u64::from(MAX_PROBES) + 2) * (gaps_at_start + 1)
                    + u64::from(MAX_STEP_BACKS * MAX_PAGES_BACK)
                    + 2;
                assert!(
                    u64::from(used) <= bound,
                    "{:?}: run {run} made {used} requests, bound {bound}",
                    s.reading
                );
                let page = list.page(p, &s.reading);
                let out = walker.on_page(p, page).expect("pages are well formed");
                for e in out {
                    unsaved.push(e.id);
                }
                // Flush after each page, except when this run is going to crash.
                if !crash || rng.random_bool(0.5) {
                    for id in unsaved.drain(..) {
                        *delivered.entry(id).or_default() += 1;
                    }
                    saved = walker.snapshot();
                }
            }
            if crash {
                // Events sent but whose checkpoint was not saved reach the sink anyway.
                for id in unsaved.drain(..) {
                    *delivered.entry(id).or_default() += 1;
                }
            } else {
                saved = walker.snapshot();
            }
            assert!(unsaved.is_empty());
            let json = serde_json::to_string(&saved).unwrap();
            assert!(json.len() < 150_000, "checkpoint is {} bytes", json.len());
            let back: Checkpoint = serde_json::from_str(&json).unwrap();
            assert_eq!(back, saved);
            now += rng.random_range(60..900) * SEC;
            if s.mutate && !settling {
                for _ in 0..rng.random_range(0..150) {
                    mutate(&mut list, &mut rng, now, lateness, true);
                }
            }
        }
        let lost: Vec<String> = list
            .events
            .iter()
            .filter(|(t, _)| t.0 >= floor)
            .map(|(_, id)| id.clone())
            .filter(|id| !delivered.contains_key(id))
            .collect();
        let dups = delivered.values().map(|n| n - 1).sum();
        (lost, dups, requests)
    }

    /// Inserts a new event, a backdated one, or (when `deletes`) deletes one at random.
    fn mutate(list: &mut List, rng: &mut StdRng, now: i64, lateness: u64, deletes: bool) {
        let roll = if deletes {
            rng.random_range(0..10)
        } else {
            rng.random_range(0..8)
        };
        match roll {
            0..=5 => {
                list.insert(now - rng.random_range(0..30) * SEC, rng);
            }
            6..=7 => {
                // Backdated within the lateness window of the newest visible event.
                let newest = list.newest().unwrap_or(now);
                let back = rng.random_range(0..(lateness as i64 * 8 / 10)) * SEC;
                list.insert(newest - back, rng);
            }
            _ => list.delete_random(rng),
        }
    }

    #[test]
    fn a_quiet_list_is_collected_once_in_one_run_under_every_reading() {
        for reading in readings() {
            let (lost, dups, _) = run(Scenario {
                seed: 1,
                runs: 1,
                budget: 10_000..10_001,
                mutate: false,
                crash_every: None,
                reading,
                new_only_share: 0.0,
            });
            assert!(lost.is_empty(), "{reading:?}: lost {}", lost.len());
            assert_eq!(dups, 0, "{reading:?}");
        }
    }

    /// Runs `template` for `seeds` seeds under every `stride`-th reading and asserts
    /// nothing is lost and, unless the runs crash, nothing is delivered twice.
    fn across_readings(stride: usize, seeds: u64, template: Scenario) {
        for (i, reading) in readings().into_iter().enumerate().step_by(stride) {
            for seed in 0..seeds {
                let seed = seed * 100 + i as u64;
                let (lost, dups, _) = run(Scenario {
                    seed,
                    reading,
                    budget: template.budget.clone(),
                    ..template
                });
                assert!(
                    lost.is_empty(),
                    "{reading:?} seed {seed}: lost {}",
                    lost.len()
                );
                if template.crash_every.is_none() {
                    assert_eq!(dups, 0, "{reading:?} seed {seed}");
                }
            }
        }
    }

    /// The scenario every property test varies.
    const BASE: Scenario = Scenario {
        seed: 0,
        runs: 30,
        budget: 1..6,
        mutate: true,
        crash_every: None,
        reading: LIST_TOTAL_100,
        new_only_share: 0.0,
    };

    #[test]
    fn short_runs_resume_through_gaps_without_loss_or_duplicates_under_every_reading() {
        across_readings(
            1,
            4,
            Scenario {
                runs: 40,
                budget: 1..4,
                mutate: false,
                ..BASE
            },
        );
    }

    #[test]
    fn inserts_backdates_and_deletes_during_walks_lose_nothing_under_every_reading() {
        // Deletes between two page requests of a walk only where `count` tells the list's
        // size; under the other readings they happen between runs (see the design doc).
        across_readings(1, 6, BASE);
    }

    #[test]
    fn crashes_only_repeat_the_unsaved_batch_under_every_reading() {
        across_readings(
            1,
            4,
            Scenario {
                crash_every: Some(3),
                ..BASE
            },
        );
    }

    #[test]
    fn new_only_head_walks_between_full_ones_lose_nothing_under_every_reading() {
        across_readings(
            3,
            4,
            Scenario {
                runs: 40,
                new_only_share: 0.7,
                ..BASE
            },
        );
    }

    #[test]
    fn the_convenient_reading_keeps_its_old_guarantees() {
        for seed in 0..20 {
            let (lost, dups, _) = run(Scenario {
                seed,
                runs: 30,
                budget: 1..6,
                mutate: true,
                crash_every: None,
                reading: LIST_TOTAL_100,
                new_only_share: 0.0,
            });
            assert!(lost.is_empty(), "seed {seed}: lost {}", lost.len());
            assert_eq!(dups, 0, "seed {seed}");
        }
    }

    #[test]
    fn steady_state_uses_one_request_per_served_page_of_new_events() {
        for reading in readings() {
            steady_state(reading);
        }
    }

    fn steady_state(reading: ModelReading) {
        let size = reading.page_size as usize;
        let mut rng = StdRng::seed_from_u64(7);
        let mut list = List::default();
        let mut now = 1_700_000_000 * SEC;
        for i in 0..500 {
            list.insert(now - i * 60 * SEC, &mut rng);
        }
        let mut cp = Checkpoint::default();
        let mut walker = Walker::new(cp.clone(), EventTime(now), 3600, 600);
        while let Step::Fetch(p) = walker.next_step() {
            walker.on_page(p, list.page(p, &reading)).unwrap();
        }
        cp = walker.snapshot();
        for new_events in [0usize, 30, 99, 150, 250] {
            now += 3600 * SEC;
            for i in 0..new_events {
                list.insert(now - (i as i64) * SEC, &mut rng);
            }
            // The head walk re-reads the lateness window to catch backdated events.
            let window = cp.high.unwrap().0 - 600 * SEC;
            let in_window = list.events.iter().filter(|(t, _)| t.0 >= window).count();
            let mut walker = Walker::new(cp.clone(), EventTime(now), 3600, 600);
            let mut requests = 0;
            let mut got = 0;
            while let Step::Fetch(p) = walker.next_step() {
                requests += 1;
                got += walker.on_page(p, list.page(p, &reading)).unwrap().len();
            }
            cp = walker.snapshot();
            assert_eq!(got, new_events, "{reading:?}");
            // One request per served page from the top of the list down to the window's
            // edge, plus at most one to confirm the boundary.
            assert!(in_window >= new_events);
            assert!(
                requests <= in_window.div_ceil(size) + 1,
                "{reading:?}: {new_events} new, {in_window} in the window: {requests} requests"
            );
        }
    }

    /// A server whose last page is partly filled and whose `count` counts the page: the
    /// walk of the first release looped between the last two pages forever.
    #[test]
    fn a_partly_filled_last_page_with_count_per_page_ends_the_walk() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut list = List::default();
        let now = 1_700_000_000 * SEC;
        for i in 0..250 {
            list.insert(now - i * 60 * SEC, &mut rng);
        }
        for reading in readings() {
            let mut walker = Walker::new(Checkpoint::default(), EventTime(now), 86_400, 600);
            let mut requests = 0;
            let mut got = 0;
            while let Step::Fetch(p) = walker.next_step() {
                requests += 1;
                assert!(
                    requests <= 10,
                    "{reading:?}: no end after {requests} requests"
                );
                got += walker.on_page(p, list.page(p, &reading)).unwrap().len();
            }
            assert_eq!(got, 250, "{reading:?}");
            assert!(requests <= 250usize.div_ceil(reading.page_size as usize) + 1);
        }
    }

    #[test]
    fn unordered_or_unexpected_pages_are_refused() {
        let mut walker = Walker::new(Checkpoint::default(), EventTime(100 * SEC), 3600, 600);
        let ev = |t: i64, id: &str| RawEvent {
            id: id.into(),
            occurred: EventTime(t * SEC),
            json: RawValue::from_string("{}".into()).unwrap(),
        };
        let page = Page::new(vec![ev(10, "a"), ev(20, "b")], false);
        assert_eq!(
            walker.on_page(1, page).unwrap_err(),
            WalkError::Unordered(1)
        );
        let page = Page::new(vec![], false);
        assert!(matches!(
            walker.on_page(3, page),
            Err(WalkError::WrongPage { .. })
        ));
        assert_eq!(walker.snapshot().high, None);
    }

    #[test]
    fn future_dated_events_cannot_push_the_high_mark_past_now() {
        let now = 1_000 * SEC;
        let mut walker = Walker::new(Checkpoint::default(), EventTime(now), 3600, 600);
        let page = Page::new(
            vec![RawEvent {
                id: "f".into(),
                occurred: EventTime(now + 10_000 * SEC),
                json: RawValue::from_string("{}".into()).unwrap(),
            }],
            false,
        );
        assert_eq!(walker.on_page(1, page).unwrap().len(), 1);
        assert_eq!(walker.snapshot().high, Some(EventTime(now)));
    }
}
