//! A simulated day of collection, pure: the real [`Walker`] and [`run_budget`] against an
//! in-memory KnowBe4 event list, with a scheduled run every five minutes (ten in one
//! scenario).
//!
//! Each scenario simulates two UTC days of arrivals (plus two hours of history collected
//! before the first day starts) and measures the first day: requests spent per 1,000
//! events collected, requests used against the daily quota (asserted never above it),
//! and collection lag (from an event's arrival in KnowBe4 to the end of the run that
//! delivered it). After the second day, arrivals stop and settling runs on the following
//! days' quotas drain whatever is left; then every event that was not deleted must have been
//! delivered (asserted) and duplicates are counted.
//!
//! A run is modelled in time too: its requests go out `REQUEST_SPACING` apart (the
//! client's pacing), each answered after 300 ms, and events that arrive meanwhile are in
//! the list for the later pages. Only the walker's requests are counted: the collector's
//! speculative requests while draining a backlog are not modelled here.
//!
//! `cargo bench --bench day_simulation` prints one markdown table.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use knowbe4_source::domain::checkpoint::{
    Checkpoint, DEFAULT_PAGE_SIZE, HeadWalk, Page, Step, Walker,
};
use knowbe4_source::domain::planner::{self, PlanInput};
use knowbe4_source::domain::quota::run_budget;
use knowbe4_source::knowbe4::REQUEST_SPACING;
use knowbe4_source::{EventTime, RawEvent};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::value::RawValue;
use time::OffsetDateTime;

/// Nanoseconds per millisecond (the simulation clock is in ms, `EventTime` in ns).
const NS_PER_MS: i64 = 1_000_000;
const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;
/// 2026-03-02T00:00:00Z, the simulated day.
const DAY_START_UNIX_MS: i64 = 1_772_409_600_000;
/// Round trip of one KnowBe4 request.
const LATENCY_MS: i64 = 300;
/// Forwarding and saving the checkpoint at the end of a run.
const FLUSH_MS: i64 = 200;
/// The source's `firstFetchLookbackHours` (default).
const LOOKBACK_SECS: u64 = 24 * 3600;
/// Settling runs allowed after the second day before the drain counts as stuck.
const MAX_SETTLE_RUNS: usize = 2_000;

/// One simulated deployment.
struct Scenario {
    /// Label in the table.
    name: &'static str,
    /// Licensed seats: the quota is 10 requests per seat per day.
    seats: u32,
    /// The schedule (`SCHEDULE_INTERVAL_SECS`).
    interval_secs: u64,
    /// Mean time between arrivals (exponential).
    mean_gap_secs: f64,
    /// Share of arrivals whose `occurred_date` lies in the past.
    backdated_share: f64,
    /// How far back a backdated event's `occurred_date` may lie.
    max_backdate_secs: i64,
    /// Deletes per day, each of a random event among the newest 300.
    deletes_per_day: usize,
    /// `latenessWindowMinutes`, in seconds.
    lateness_secs: u64,
    /// Seeds arrivals and deletes.
    seed: u64,
    /// Whether runs follow the freshness planner (else: every run re-reads the whole
    /// window with its `run_budget`, as before the planner).
    planner: bool,
}

/// KnowBe4's list, in memory: newest `occurred_date` first, ties by id.
#[derive(Default)]
struct List {
    events: BTreeSet<(Reverse<i64>, String)>,
}

impl List {
    /// Page `page` as the recorded reading serves it: 50 events a page whatever was
    /// asked, `count` counting the page, `total_pages` and `limit_value` sent.
    fn page(&self, page: u32) -> Page {
        let per_page = DEFAULT_PAGE_SIZE as usize;
        let start = (page as usize - 1) * per_page;
        let events: Vec<RawEvent> = self
            .events
            .iter()
            .skip(start)
            .take(per_page)
            .map(|(t, id)| RawEvent {
                id: id.clone(),
                occurred: EventTime(t.0),
                json: RawValue::from_string(format!("{{\"id\":\"{id}\"}}")).expect("valid JSON"),
            })
            .collect();
        let total_pages = self.events.len().div_ceil(per_page) as u64;
        Page {
            more: Some(u64::from(page) < total_pages),
            count: Some(events.len() as u64),
            limit: Some(per_page as u32),
            total_pages: Some(total_pages),
            undated: Vec::new(),
            events,
        }
    }
}

/// One event's life, for the oracle.
struct Arrival {
    /// When it appeared in KnowBe4 (simulation ms).
    at: i64,
    /// Its `occurred_date` (ns).
    occurred: i64,
    id: String,
}

/// The whole simulation's state.
struct World {
    list: List,
    arrivals: Vec<Arrival>,
    next_arrival: usize,
    /// Delete times (simulation ms), ascending.
    deletes: Vec<i64>,
    next_delete: usize,
    /// Arrival time by id (for lag) of every event that ever existed.
    arrived_at: HashMap<String, i64>,
    /// Ids deleted before they were delivered.
    deleted_undelivered: BTreeSet<String>,
    /// Deliveries per id.
    delivered: HashMap<String, u32>,
    /// End of the run that first delivered each id.
    first_delivery: HashMap<String, i64>,
    rng: StdRng,
    /// Whether arrivals and deletes still happen.
    live: bool,
}

impl World {
    /// Applies every arrival and delete up to simulation time `to`.
    fn advance(&mut self, to: i64) {
        if !self.live {
            return;
        }
        loop {
            let next_arrival = self.arrivals.get(self.next_arrival).map(|a| a.at);
            let next_delete = self.deletes.get(self.next_delete).copied();
            match (next_arrival, next_delete) {
                (Some(a), d) if a <= to && d.is_none_or(|d| a <= d) => {
                    let event = &self.arrivals[self.next_arrival];
                    self.list
                        .events
                        .insert((Reverse(event.occurred), event.id.clone()));
                    self.arrived_at.insert(event.id.clone(), event.at);
                    self.next_arrival += 1;
                }
                (_, Some(d)) if d <= to => {
                    self.next_delete += 1;
                    let newest = self.list.events.len().min(300);
                    if newest == 0 {
                        continue;
                    }
                    let i = self.rng.random_range(0..newest);
                    let key = self.list.events.iter().nth(i).cloned().expect("in range");
                    self.list.events.remove(&key);
                    if !self.delivered.contains_key(&key.1) {
                        self.deleted_undelivered.insert(key.1);
                    }
                }
                _ => return,
            }
        }
    }
}

/// What one run did.
struct RunOutcome {
    requests: u32,
    delivered: usize,
}

/// One scheduled run at simulation time `start` with `budget` requests.
fn run_once(
    world: &mut World,
    checkpoint: &mut Checkpoint,
    start: i64,
    (budget, head): (u32, HeadWalk),
    lateness_secs: u64,
) -> RunOutcome {
    let now = EventTime((DAY_START_UNIX_MS + start) * NS_PER_MS);
    let mut walker = Walker::planned(checkpoint.clone(), now, LOOKBACK_SECS, lateness_secs, head);
    let mut requests = 0u32;
    let mut clock = start;
    let mut batch: Vec<String> = Vec::new();
    while let Step::Fetch(page_no) = walker.next_step() {
        if requests >= budget {
            break;
        }
        if requests > 0 {
            clock += REQUEST_SPACING.as_millis() as i64;
        }
        world.advance(clock);
        requests += 1;
        let page = world.list.page(page_no);
        let events = walker
            .on_page(page_no, page)
            .expect("pages are well formed");
        batch.extend(events.into_iter().map(|e| e.id));
    }
    let end = clock + LATENCY_MS + FLUSH_MS;
    for id in &batch {
        *world.delivered.entry(id.clone()).or_default() += 1;
        world.first_delivery.entry(id.clone()).or_insert(end);
    }
    *checkpoint = walker.snapshot();
    RunOutcome {
        requests,
        delivered: batch.len(),
    }
}

/// The run's budget and head walk: the freshness planner's, or (before it) the plain
/// per-interval allowance with a full window re-read every run.
fn plan_run(
    s: &Scenario,
    quota: u32,
    used: u32,
    now: OffsetDateTime,
    checkpoint: &Checkpoint,
) -> (u32, HeadWalk) {
    if !s.planner {
        return (
            run_budget(quota, used, now, s.interval_secs),
            HeadWalk::Full,
        );
    }
    let plan = planner::plan(&PlanInput {
        daily_limit: quota,
        used_today: used,
        now,
        interval_secs: s.interval_secs,
        sources: 1,
        page_size: DEFAULT_PAGE_SIZE,
        window_events: checkpoint.recent.len() as u64,
        reread_at: checkpoint.reread_at,
        head_at: checkpoint.head_at,
        gaps: checkpoint.gaps.len(),
        lateness_secs: s.lateness_secs,
    });
    (plan.budget, plan.head)
}

/// The measured numbers of one scenario.
struct Report {
    /// Events never delivered because settling did not finish within
    /// [`MAX_SETTLE_RUNS`] (only the old policy may; the planner's are asserted zero).
    unsettled: usize,
    quota: u32,
    arrived: usize,
    collected_day1: usize,
    requests_day1: u32,
    requests_day2: u32,
    runs_without_budget: usize,
    backlog_end_day1: usize,
    /// Unfinished ranges in the checkpoint at 24:00.
    gaps_end_day1: usize,
    /// Whether the dedupe window had overflowed (narrowed) at 24:00.
    narrowed_end_day1: bool,
    lag_secs: Vec<f64>,
    /// Lags of the backdated events (arrived more than a second after their date).
    backdated_lag_secs: Vec<f64>,
    deleted_undelivered: usize,
    duplicates: u64,
    settle_runs: usize,
    elapsed_ms: u128,
}

fn utc(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(DAY_START_UNIX_MS + ms) * 1_000_000)
        .expect("in range")
}

fn simulate(s: &Scenario) -> Report {
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(s.seed);
    let quota = s.seats * 10;
    let interval_ms = s.interval_secs as i64 * 1000;

    // Arrivals from two hours before day 1 to the end of day 2.
    let mut arrivals = Vec::new();
    let mut t = -2 * HOUR_MS;
    loop {
        let u: f64 = rng.random::<f64>().max(1e-12);
        t += (-u.ln() * s.mean_gap_secs * 1000.0) as i64 + 1;
        if t >= 2 * DAY_MS {
            break;
        }
        let backdate_ms = if rng.random_bool(s.backdated_share) {
            rng.random_range(1..=s.max_backdate_secs * 1000)
        } else {
            // Pushed within a second of happening.
            rng.random_range(0..1000)
        };
        let occurred =
            (DAY_START_UNIX_MS + t - backdate_ms) * NS_PER_MS + rng.random_range(0..NS_PER_MS);
        let id = uuid::Uuid::from_u128(rng.random::<u128>())
            .hyphenated()
            .to_string();
        arrivals.push(Arrival {
            at: t,
            occurred,
            id,
        });
    }
    let mut deletes: Vec<i64> = (0..s.deletes_per_day * 2)
        .map(|_| rng.random_range(0..2 * DAY_MS))
        .collect();
    deletes.sort_unstable();

    let mut world = World {
        list: List::default(),
        arrivals,
        next_arrival: 0,
        deletes,
        next_delete: 0,
        arrived_at: HashMap::new(),
        deleted_undelivered: BTreeSet::new(),
        delivered: HashMap::new(),
        first_delivery: HashMap::new(),
        rng: StdRng::seed_from_u64(s.seed ^ 0xDE1E7E),
        live: true,
    };

    // The source was created yesterday and has caught up: one unlimited run just before
    // midnight, not counted against day 1.
    let mut checkpoint = Checkpoint::default();
    run_once(
        &mut world,
        &mut checkpoint,
        -10_000,
        (u32::MAX, HeadWalk::Full),
        s.lateness_secs,
    );

    let mut used_by_day: HashMap<String, u32> = HashMap::new();
    let mut collected_day1 = 0;
    let mut runs_without_budget = 0;
    let mut backlog_end_day1 = 0;
    let mut gaps_end_day1 = 0;
    let mut narrowed_end_day1 = false;
    let runs_per_day = (DAY_MS / interval_ms) as usize;
    let trace = std::env::var_os("DAY_SIM_TRACE").is_some();
    for k in 0..2 * runs_per_day {
        let start = k as i64 * interval_ms;
        if start == DAY_MS {
            // Day 1 is over: what arrived in it and is still to deliver.
            backlog_end_day1 = undelivered(&world, |at| (0..DAY_MS).contains(&at));
            gaps_end_day1 = checkpoint.gaps.len();
            narrowed_end_day1 = checkpoint.recent_floor.is_some();
        }
        world.advance(start);
        let now = utc(start);
        let day = knowbe4_source::domain::quota::utc_day(now);
        let used = used_by_day.entry(day).or_default();
        let (budget, head) = plan_run(s, quota, *used, now, &checkpoint);
        if budget == 0 {
            if trace {
                eprintln!("{} {:>6}s budget=0", s.name, start / 1000);
            }
            if start < DAY_MS {
                runs_without_budget += 1;
            }
            continue;
        }
        let outcome = run_once(
            &mut world,
            &mut checkpoint,
            start,
            (budget, head),
            s.lateness_secs,
        );
        if trace {
            eprintln!(
                "{} {:>6}s budget={:>3} requests={:>3} delivered={:>4} gaps={:>2} recent={:>4} high={:?}",
                s.name,
                start / 1000,
                budget,
                outcome.requests,
                outcome.delivered,
                checkpoint.gaps.len(),
                checkpoint.recent.len(),
                checkpoint
                    .high
                    .map(|h| (h.0 / NS_PER_MS - DAY_START_UNIX_MS) / 1000)
            );
        }
        *used += outcome.requests;
        if let Some(watch) = std::env::var("DAY_SIM_WATCH")
            .ok()
            .and_then(|w| w.parse::<i64>().ok())
        {
            let t = (DAY_START_UNIX_MS + watch * 1000) * NS_PER_MS;
            let sec = |e: EventTime| (e.0 / NS_PER_MS - DAY_START_UNIX_MS) / 1000;
            let covering: Vec<(i64, i64)> = checkpoint
                .gaps
                .iter()
                .filter(|g| {
                    g.oldest.0 <= t + 1_000 * NS_PER_MS && g.newest.0 >= t - 1_000 * NS_PER_MS
                })
                .map(|g| (sec(g.oldest), sec(g.newest)))
                .collect();
            let first_gap = checkpoint
                .gaps
                .first()
                .map(|g| (sec(g.oldest), sec(g.newest)));
            eprintln!(
                "watch {}s: run {start}ms high={:?} reread={:?} recent_floor={:?} covering={covering:?} first={first_gap:?} gaps={}",
                watch,
                checkpoint.high.map(sec),
                checkpoint.reread_high.map(sec),
                checkpoint.recent_floor.map(sec),
                checkpoint.gaps.len()
            );
        }
        assert!(*used <= quota, "{}: quota overrun ({used})", s.name);
        if start < DAY_MS {
            collected_day1 += outcome.delivered;
        }
    }
    let requests_day1 = used_by_day.get("2026-03-02").copied().unwrap_or(0);
    let requests_day2 = used_by_day.get("2026-03-03").copied().unwrap_or(0);

    // Settle: no more arrivals; the following days' quotas drain what is left.
    world.live = false;
    let mut settle_runs = 0;
    let mut start = 2 * DAY_MS;
    while settle_runs < MAX_SETTLE_RUNS
        && (undelivered(&world, |_| true) > 0 || !checkpoint.gaps.is_empty())
    {
        let now = utc(start);
        let used = used_by_day
            .entry(knowbe4_source::domain::quota::utc_day(now))
            .or_default();
        let (budget, head) = plan_run(s, quota, *used, now, &checkpoint);
        if budget > 0 {
            let before: Vec<(i64, i64)> = checkpoint
                .gaps
                .iter()
                .map(|g| (g.oldest.0, g.newest.0))
                .collect();
            *used += run_once(
                &mut world,
                &mut checkpoint,
                start,
                (budget, head),
                s.lateness_secs,
            )
            .requests;
            if let Some(watch) = std::env::var("DAY_SIM_WATCH")
                .ok()
                .and_then(|w| w.parse::<i64>().ok())
            {
                let t = (DAY_START_UNIX_MS + watch * 1000) * NS_PER_MS;
                let sec = |e: i64| (e / NS_PER_MS - DAY_START_UNIX_MS) / 1000;
                let had = before.iter().any(|(o, n)| *o <= t && t <= *n);
                let has = checkpoint
                    .gaps
                    .iter()
                    .any(|g| g.oldest.0 <= t && t <= g.newest.0);
                if had && !has {
                    eprintln!(
                        "settle {start}: gap covering the watch closed; before {:?} after {:?}",
                        before
                            .iter()
                            .map(|(o, n)| (sec(*o), sec(*n)))
                            .collect::<Vec<_>>(),
                        checkpoint
                            .gaps
                            .iter()
                            .map(|g| (sec(g.oldest.0), sec(g.newest.0), g.above_hint))
                            .collect::<Vec<_>>()
                    );
                }
            }
            assert!(*used <= quota, "{}: quota overrun while settling", s.name);
        }
        settle_runs += 1;
        start += interval_ms;
    }

    // Nothing lost: every event that was not deleted before delivery was delivered.
    let lost: Vec<&String> = world
        .arrived_at
        .keys()
        .filter(|id| !world.delivered.contains_key(*id) && !world.deleted_undelivered.contains(*id))
        .collect();
    if std::env::var_os("DAY_SIM_LOST").is_some() {
        for a in world
            .arrivals
            .iter()
            .filter(|a| lost.contains(&&a.id))
            .take(20)
        {
            eprintln!(
                "lost: arrived {}s occurred {}s (backdated {}s)",
                a.at / 1000,
                (a.occurred / NS_PER_MS - DAY_START_UNIX_MS) / 1000,
                ((DAY_START_UNIX_MS + a.at) * NS_PER_MS - a.occurred) / NS_PER_MS / 1000
            );
        }
    }
    // The planner is what the collector runs: it must lose nothing. The old policy (a
    // full window re-read every run) is measured for comparison; with pages of 50 it can
    // starve and never settle, which is reported, not asserted.
    let unsettled = lost.len();
    assert!(
        lost.is_empty() || !s.planner,
        "{}: {} events lost (e.g. {:?}); {} settling runs, {} gaps left",
        s.name,
        lost.len(),
        lost.first(),
        settle_runs,
        checkpoint.gaps.len()
    );
    let duplicates = world.delivered.values().map(|n| u64::from(n - 1)).sum();

    let mut lag_secs: Vec<f64> = world
        .arrived_at
        .iter()
        .filter(|(_, at)| (0..DAY_MS).contains(*at))
        .filter_map(|(id, at)| {
            world
                .first_delivery
                .get(id)
                .map(|end| (end - at) as f64 / 1000.0)
        })
        .collect();
    lag_secs.sort_by(f64::total_cmp);
    let mut backdated_lag_secs: Vec<f64> = world
        .arrivals
        .iter()
        .filter(|a| (0..DAY_MS).contains(&a.at))
        .filter(|a| (DAY_START_UNIX_MS + a.at) * NS_PER_MS - a.occurred > 1_000 * NS_PER_MS)
        .filter_map(|a| {
            world
                .first_delivery
                .get(&a.id)
                .map(|end| (end - a.at) as f64 / 1000.0)
        })
        .collect();
    backdated_lag_secs.sort_by(f64::total_cmp);
    let arrived = world
        .arrived_at
        .values()
        .filter(|at| (0..DAY_MS).contains(*at))
        .count();
    let deleted_undelivered = world
        .deleted_undelivered
        .iter()
        .filter(|id| {
            world
                .arrived_at
                .get(*id)
                .is_some_and(|at| (0..DAY_MS).contains(at))
        })
        .count();
    Report {
        unsettled,
        quota,
        arrived,
        collected_day1,
        requests_day1,
        requests_day2,
        runs_without_budget,
        backlog_end_day1,
        gaps_end_day1,
        narrowed_end_day1,
        lag_secs,
        backdated_lag_secs,
        deleted_undelivered,
        duplicates,
        settle_runs,
        elapsed_ms: started.elapsed().as_millis(),
    }
}

/// Events that arrived at a time matching `when`, were not deleted, and are not delivered.
fn undelivered(world: &World, when: impl Fn(i64) -> bool) -> usize {
    world
        .arrived_at
        .iter()
        .filter(|(id, at)| {
            when(**at)
                && !world.delivered.contains_key(*id)
                && !world.deleted_undelivered.contains(*id)
        })
        .count()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Seconds as `12m05s` (or `45s`).
fn duration(secs: f64) -> String {
    let secs = secs.round() as u64;
    if secs >= 3600 {
        format!("{}h{:02}m", secs / 3600, secs % 3600 / 60)
    } else if secs >= 60 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{secs}s")
    }
}

fn main() {
    let base = Scenario {
        name: "",
        seats: 50,
        interval_secs: 300,
        mean_gap_secs: 15.0,
        backdated_share: 0.05,
        max_backdate_secs: 30 * 60,
        deletes_per_day: 10,
        lateness_secs: 60 * 60,
        seed: 42,
        planner: false,
    };
    let mut scenarios = Vec::new();
    for planner in [false, true] {
        let base = Scenario { planner, ..base };
        scenarios.extend([
            Scenario {
                name: "10 seats, an event every ~75 s",
                seats: 10,
                mean_gap_secs: 75.0,
                ..base
            },
            Scenario {
                name: "50 seats, lateness 60 min (default)",
                ..base
            },
            Scenario {
                name: "200 seats, lateness 60 min",
                seats: 200,
                ..base
            },
            Scenario {
                name: "50 seats, a run every 10 min",
                interval_secs: 600,
                ..base
            },
        ]);
    }
    println!(
        "Simulated UTC day (2026-03-02): a run every {} s (unless stated), an event every ~{} s (exponential), \
         {:.0}% backdated by up to {} min, {} deletes/day.\n",
        base.interval_secs,
        base.mean_gap_secs,
        base.backdated_share * 100.0,
        base.max_backdate_secs / 60,
        base.deletes_per_day
    );
    println!(
        "| scenario | runs | quota/day | events arrived (day 1) | collected by day-1 runs | requests day 1 (quota use) | requests per 1,000 events | runs with no budget (day 1) | at 24:00: day-1 events undelivered, gaps | lag median | lag p95 | lag max | backdated lag p95 / max | duplicates (% of events) | lost | settled after arrivals stop | sim time |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let only = std::env::var("DAY_SIM_ONLY").ok();
    for s in &scenarios {
        if only
            .as_deref()
            .is_some_and(|o| !format!("{} {}", s.name, s.planner).contains(o))
        {
            continue;
        }
        let r = simulate(s);
        let per_1000 = if r.collected_day1 == 0 {
            0.0
        } else {
            f64::from(r.requests_day1) * 1000.0 / r.collected_day1 as f64
        };
        println!(
            "| {} | {} | {} | {} ({} deleted before delivery) | {} | {} / {} ({:.0}%; day 2: {}) | {:.1} | {} | {} events, {} gaps{} | {} | {} | {} | {} / {} | {} ({:.2}%) | {} | {} | {} ms |",
            s.name,
            if s.planner {
                "planner"
            } else {
                "before: full re-read every run"
            },
            r.quota,
            r.arrived,
            r.deleted_undelivered,
            r.collected_day1,
            r.requests_day1,
            r.quota,
            f64::from(r.requests_day1) * 100.0 / f64::from(r.quota),
            r.requests_day2,
            per_1000,
            r.runs_without_budget,
            r.backlog_end_day1,
            r.gaps_end_day1,
            if r.narrowed_end_day1 {
                ", window narrowed"
            } else {
                ""
            },
            duration(percentile(&r.lag_secs, 50.0)),
            duration(percentile(&r.lag_secs, 95.0)),
            duration(r.lag_secs.last().copied().unwrap_or(0.0)),
            duration(percentile(&r.backdated_lag_secs, 95.0)),
            duration(r.backdated_lag_secs.last().copied().unwrap_or(0.0)),
            r.duplicates,
            r.duplicates as f64 * 100.0 / r.arrived.max(1) as f64,
            if r.unsettled == 0 && s.planner {
                "0 (asserted)".to_string()
            } else if r.unsettled == 0 {
                "0".to_string()
            } else {
                format!("{} never delivered: not settled", r.unsettled)
            },
            if r.settle_runs >= MAX_SETTLE_RUNS {
                format!("not within {MAX_SETTLE_RUNS} runs")
            } else if r.settle_runs == 0 {
                "at once (nothing left)".to_string()
            } else {
                format!(
                    "{} runs ({})",
                    r.settle_runs,
                    duration((r.settle_runs as u64 * s.interval_secs) as f64)
                )
            },
            r.elapsed_ms
        );
    }
}
