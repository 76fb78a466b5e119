//! The freshness planner: how a run spends its share of the account's daily quota.
//!
//! Every run reads the head of the list (page 1 down to the newest event already
//! delivered: one request when fewer than a page of events arrived). Re-reading the whole
//! lateness window, which catches events pushed with an older `occurred_date`, costs one
//! request per page of it, so with a small quota it cannot happen every run: the planner
//! spaces these full walks so that the day's requests fit the quota, and says what
//! freshness that buys. A full walk is never skipped for long: once it is more than
//! twice overdue it runs with whatever budget there is (a cut-short walk leaves a gap and
//! loses nothing), so every backdated event inside the window is still delivered.
//!
//! Pure: `now` is an argument.

use time::OffsetDateTime;

use crate::domain::checkpoint::HeadWalk;
use crate::domain::event::EventTime;
use crate::domain::quota::run_budget;

const DAY_SECS: u64 = 86_400;

/// What the planner knows about a source and its account before a run.
#[derive(Clone, Copy, Debug)]
pub struct PlanInput {
    /// The account's daily limit for this deployment (smallest among its sources).
    pub daily_limit: u32,
    /// Requests the account used today (all its sources).
    pub used_today: u32,
    /// Wall clock.
    pub now: OffsetDateTime,
    /// The schedule (seconds between runs).
    pub interval_secs: u64,
    /// Sources sharing the account.
    pub sources: u32,
    /// Events per page KnowBe4 serves (as last seen; 50 before any page).
    pub page_size: u32,
    /// Events in the dedupe window (ids the checkpoint holds): the size of a re-read.
    pub window_events: u64,
    /// When the window was last re-read in full; `None` never (or before the planner).
    pub reread_at: Option<EventTime>,
    /// When the head was last read (either kind of walk).
    pub head_at: Option<EventTime>,
    /// Unfinished ranges (a backlog) in the checkpoint.
    pub gaps: usize,
    /// `latenessWindowMinutes`, in seconds.
    pub lateness_secs: u64,
}

/// The longest the planner lets full walks wait when the quota is scarce but could pay
/// for more: half the lateness window, at most 30 minutes. A backdated event is then
/// delivered within about that plus one head period of its arrival.
fn reread_target_secs(input: &PlanInput) -> u64 {
    (input.lateness_secs / 2).clamp(input.interval_secs.max(1), 30 * 60)
}

/// Requests a run must have in hand to work on the backlog when nothing else is due:
/// a gap's first page is found by a few probes, and a run that cannot finish them
/// spends its budget for little.
pub const GAP_MIN_BUDGET: u32 = 8;

/// What a run will do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunPlan {
    /// Requests this run may send (its fair share of the interval's allowance; 0 when the
    /// plan saves the budget because nothing is due).
    pub budget: u32,
    /// The fair share itself, for a run asked for on demand.
    pub available: u32,
    /// Whether the head walk re-reads the whole window or reads new events only.
    pub head: HeadWalk,
    /// The planned time between full walks, seconds.
    pub reread_every_secs: u64,
    /// The planned time between head reads, seconds.
    pub head_every_secs: u64,
}

/// What the quota buys, for `status`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Freshness {
    /// Expected delay, seconds, from a new event's arrival to its delivery (median).
    pub new_events_lag_secs: u64,
    /// Worst delay, seconds, for an event backdated within the lateness window.
    pub backdated_lag_secs: u64,
    /// Planned seconds between full re-reads of the lateness window.
    pub window_reread_every_secs: u64,
    /// Set when the schedule asks for more than the quota pays for.
    pub warning: Option<String>,
}

/// Requests one full walk costs: the window's pages (the head page included).
fn window_pages(input: &PlanInput) -> u64 {
    input
        .window_events
        .div_ceil(u64::from(input.page_size.max(1)))
        + 1
}

/// The account's daily requests available to one source.
fn share(input: &PlanInput) -> u64 {
    u64::from(input.daily_limit) / u64::from(input.sources.max(1))
}

/// Head reads a day the source's share pays for: one per run, but at most a third of
/// the share when it is scarce (the rest pays re-reads and the backlog; measured in
/// `benches/day_simulation.rs`, a third keeps both new and backdated events fresh at 50
/// seats where half starved the re-reads).
fn heads_per_day(input: &PlanInput) -> u64 {
    let runs = (DAY_SECS / input.interval_secs.max(1)).max(1);
    runs.min(share(input) / 3).max(1)
}

/// Seconds between head reads: the schedule, or longer when the quota is scarce.
pub fn head_every_secs(input: &PlanInput) -> u64 {
    (DAY_SECS / heads_per_day(input)).max(input.interval_secs.max(1))
}

/// Whether the source's share pays for a full walk every run: then every run is one
/// (the planner only steps in when the quota is scarce).
pub fn ample(input: &PlanInput) -> bool {
    let runs = (DAY_SECS / input.interval_secs.max(1)).max(1);
    share(input) >= runs * window_pages(input)
}

/// Seconds between full walks: every run when the quota is ample; otherwise spaced so
/// that a day of head reads plus full walks fits the source's share (what the head reads
/// leave pays the re-reads' extra pages), and at least the re-read target apart.
pub fn reread_every_secs(input: &PlanInput) -> u64 {
    let interval = input.interval_secs.max(1);
    if ample(input) {
        return interval;
    }
    let runs = (DAY_SECS / interval).max(1);
    let extra = window_pages(input).saturating_sub(1).max(1);
    let quota = share(input);
    let heads = heads_per_day(input);
    let for_rereads = quota.saturating_sub(heads).max(1);
    let rereads_per_day = (for_rereads / extra).clamp(1, runs);
    (DAY_SECS / rereads_per_day)
        .max(interval)
        .max(reread_target_secs(input))
}

/// Plans one run.
pub fn plan(input: &PlanInput) -> RunPlan {
    let every = reread_every_secs(input);
    let allowance = run_budget(
        input.daily_limit,
        input.used_today,
        input.now,
        input.interval_secs,
    );
    let budget = if allowance == 0 {
        0
    } else {
        allowance.div_ceil(input.sources.max(1)).max(1)
    };
    if ample(input) {
        // Every run re-reads the whole window with whatever the interval allows.
        return RunPlan {
            budget,
            available: budget,
            head: HeadWalk::Full,
            reread_every_secs: every,
            head_every_secs: input.interval_secs,
        };
    }
    let now = EventTime::from_datetime(input.now);
    // Half an interval early rather than one interval late.
    let slack = input.interval_secs / 2;
    let since = input.reread_at.map(|at| at.secs_until(now));
    let due = since.is_none_or(|s| s + slack >= every);
    let overdue = since.is_none_or(|s| s >= 2 * every);
    let affordable = u64::from(budget) >= window_pages(input);
    let head = if due && (affordable || overdue) {
        HeadWalk::Full
    } else {
        HeadWalk::NewOnly
    };
    let head_due = input
        .head_at
        .is_none_or(|at| at.secs_until(now) + slack >= head_every_secs(input));
    // Nothing due: save the budget (it accrues) unless there is backlog to work on with
    // enough of it in hand. A scarce quota thus reads the head as often as it pays for
    // and still finishes the backlog, instead of spending each request as it accrues.
    let idle =
        head == HeadWalk::NewOnly && !head_due && (input.gaps == 0 || budget < GAP_MIN_BUDGET);
    RunPlan {
        budget: if idle { 0 } else { budget },
        available: budget,
        head,
        reread_every_secs: every,
        head_every_secs: head_every_secs(input),
    }
}

/// What freshness the quota buys at this schedule.
pub fn freshness(input: &PlanInput) -> Freshness {
    let interval = input.interval_secs.max(1);
    let runs = (DAY_SECS / interval).max(1);
    let quota = share(input);
    let every = reread_every_secs(input);
    let heads = heads_per_day(input);
    // Head reads happen every run when the quota pays for them, else every few runs.
    let head_every = head_every_secs(input);
    let mut warnings = Vec::new();
    if heads < runs {
        warnings.push(format!(
            "the daily quota ({} requests for this source) pays for a new-events read every {} min, not every {} min run",
            quota,
            head_every / 60,
            interval / 60
        ));
    }
    let backdated = every + head_every;
    if backdated > 3_600 {
        warnings.push(format!(
            "events backdated within the lateness window may wait up to {} min",
            backdated / 60
        ));
    }
    Freshness {
        new_events_lag_secs: head_every / 2,
        backdated_lag_secs: backdated,
        window_reread_every_secs: every,
        warning: (!warnings.is_empty()).then(|| warnings.join("; ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn input(seats: u32, window_events: u64) -> PlanInput {
        PlanInput {
            daily_limit: seats * 10,
            used_today: 0,
            now: datetime!(2026-03-02 12:00 UTC),
            interval_secs: 300,
            sources: 1,
            page_size: 50,
            window_events,
            reread_at: None,
            head_at: None,
            gaps: 0,
            lateness_secs: 3_600,
        }
    }

    #[test]
    fn large_quotas_reread_every_run_small_ones_less_often() {
        assert_eq!(
            reread_every_secs(&input(2_000, 240)),
            300,
            "ample: every run"
        );
        assert!(ample(&input(2_000, 240)));
        assert!(!ample(&input(50, 240)));
        let fifty = reread_every_secs(&input(50, 240));
        assert!((600..=3_600).contains(&fifty), "{fifty}");
        let ten = reread_every_secs(&input(10, 60));
        assert!(ten > fifty, "{ten}");
        // A day of head reads and re-reads fits the quota.
        for seats in [10, 50, 200] {
            let i = input(seats, 240);
            let every = reread_every_secs(&i);
            let heads = heads_per_day(&i);
            let cost = heads + DAY_SECS / every * (window_pages(&i) - 1);
            assert!(
                cost <= u64::from(seats) * 10 + window_pages(&i),
                "{seats}: {cost}"
            );
        }
    }

    #[test]
    fn a_due_reread_waits_for_budget_but_never_twice_its_period() {
        let mut i = input(50, 240);
        let every = reread_every_secs(&i);
        i.reread_at = Some(EventTime::from_datetime(i.now).minus_secs(every / 3));
        assert_eq!(plan(&i).head, HeadWalk::NewOnly, "not due");
        i.reread_at = Some(EventTime::from_datetime(i.now).minus_secs(every));
        i.used_today = 300; // the allowance at noon plus the burst, nearly spent
        let p = plan(&i);
        assert!(p.budget < 6);
        assert_eq!(p.head, HeadWalk::NewOnly, "due, not affordable: {p:?}");
        i.reread_at = Some(EventTime::from_datetime(i.now).minus_secs(2 * every));
        assert_eq!(plan(&i).head, HeadWalk::Full, "overdue: walk anyway");
        i.reread_at = None;
        assert_eq!(plan(&i).head, HeadWalk::Full, "never re-read");
    }

    #[test]
    fn a_scarce_quota_saves_its_budget_between_head_reads() {
        let mut i = input(10, 60);
        let now = EventTime::from_datetime(i.now);
        i.reread_at = Some(now.minus_secs(60));
        i.head_at = Some(now.minus_secs(300));
        assert!(head_every_secs(&i) > 1_200);
        assert_eq!(plan(&i).budget, 0, "head read 5 min ago: nothing due");
        i.gaps = 2;
        i.used_today = 0;
        assert!(
            plan(&i).budget >= GAP_MIN_BUDGET,
            "a backlog and budget in hand"
        );
        i.head_at = Some(now.minus_secs(head_every_secs(&i)));
        i.gaps = 0;
        assert!(plan(&i).budget > 0, "head read due");
    }

    #[test]
    fn sources_sharing_an_account_split_the_budget() {
        let mut i = input(200, 50);
        let alone = plan(&i).budget;
        i.sources = 4;
        let shared = plan(&i).budget;
        assert!(shared * 4 >= alone && shared < alone, "{alone} {shared}");
    }

    #[test]
    fn freshness_warns_when_the_schedule_asks_more_than_the_quota_pays() {
        assert_eq!(freshness(&input(200, 240)).warning, None);
        let ten = freshness(&input(10, 60));
        assert!(
            ten.warning
                .unwrap()
                .contains("pays for a new-events read every")
        );
        assert!(ten.new_events_lag_secs > 300);
    }
}
