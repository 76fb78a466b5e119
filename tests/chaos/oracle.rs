//! The oracle: what must hold after any scenario, and the report row of a class.

use std::collections::{HashMap, HashSet};

use knowbe4_source::domain::state::SourceState;
use knowbe4_source::testkit::recording_sink::RecordingSink;
use knowbe4_source::testkit::sim::Simulator;

/// What one seeded scenario ended with.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Verdict {
    pub seed: u64,
    pub events: usize,
    pub faults: usize,
    pub lost: usize,
    pub duplicates: usize,
    pub duplicate_bound: usize,
    pub max_per_second: usize,
    pub requests: u64,
    pub quota_ledger: u64,
    pub checkpoint_ok: bool,
    pub problems: Vec<String>,
}

impl Verdict {
    pub fn passed(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Compares KnowBe4 (the simulator) with what the destination received.
pub fn judge(sim: &Simulator, sink: &RecordingSink, verdict: &mut Verdict) {
    let received = sink.event_ids();
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for id in &received {
        *counts.entry(id.as_str()).or_default() += 1;
    }
    let present = sim.event_ids();
    verdict.events = present.len();
    verdict.lost = present
        .iter()
        .filter(|id| !counts.contains_key(id.as_str()))
        .count();
    verdict.duplicates = counts.values().map(|n| n - 1).sum();
    verdict.max_per_second = max_in_one_second(sim);
    verdict.requests = sim.stats().requests;
    if verdict.lost > 0 {
        verdict
            .problems
            .push(format!("{} events lost", verdict.lost));
    }
    if verdict.duplicates > verdict.duplicate_bound {
        verdict.problems.push(format!(
            "{} duplicates, more than the bound {}",
            verdict.duplicates, verdict.duplicate_bound
        ));
    }
    if verdict.max_per_second > 4 {
        verdict
            .problems
            .push(format!("{} requests in one second", verdict.max_per_second));
    }
    if sim.stats().rate_violations > 0 {
        verdict
            .problems
            .push("the simulator saw rate violations".into());
    }
    if verdict.quota_ledger < verdict.requests {
        verdict.problems.push(format!(
            "{} requests reached KnowBe4 but only {} were reserved",
            verdict.requests, verdict.quota_ledger
        ));
    }
    if !verdict.checkpoint_ok {
        verdict
            .problems
            .push("the checkpoint moved backwards or past the destination".into());
    }
}

/// The most requests the simulator received within any one-second window.
pub fn max_in_one_second(sim: &Simulator) -> usize {
    let mut times: Vec<u64> = sim.requests().iter().map(|r| r.at_ms).collect();
    times.sort_unstable();
    let mut best = 0;
    let mut start = 0;
    for end in 0..times.len() {
        while times[end] - times[start] >= 1000 {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}

/// Whether runs never interleave in the simulator's log: once another run's request
/// arrives, the earlier run never sends again.
pub fn runs_never_interleave(sim: &Simulator) -> bool {
    let mut requests = sim.requests();
    requests.sort_by_key(|r| r.at_ms);
    let mut finished: HashSet<Option<String>> = HashSet::new();
    let mut current: Option<Option<String>> = None;
    for r in requests {
        if current.as_ref() != Some(&r.run_id) {
            if finished.contains(&r.run_id) {
                return false;
            }
            if let Some(previous) = current.take() {
                finished.insert(previous);
            }
            current = Some(r.run_id.clone());
        }
    }
    true
}

/// Tracks the checkpoint across runs: it never moves backwards, and every id it records
/// as delivered was received.
#[derive(Default)]
pub struct CheckpointWatch {
    high: Option<i64>,
    pub ok: bool,
}

impl CheckpointWatch {
    pub fn new() -> Self {
        CheckpointWatch {
            high: None,
            ok: true,
        }
    }

    pub fn observe(&mut self, state: Option<&SourceState>, sink: &RecordingSink) {
        let Some(state) = state else { return };
        let high = state.checkpoint.high.map(|h| h.0);
        if let (Some(before), Some(now)) = (self.high, high)
            && now < before
        {
            self.ok = false;
        }
        if high.is_some() {
            self.high = high;
        }
        let received: HashSet<String> = sink.event_ids().into_iter().collect();
        let claimed = state
            .checkpoint
            .recent
            .iter()
            .map(|s| &s.id)
            .chain(state.checkpoint.gaps.iter().flat_map(|g| g.skip.iter()));
        for id in claimed {
            if !received.contains(id) {
                self.ok = false;
            }
        }
    }
}

/// Writes a class's row for `scripts/chaos.sh`.
pub fn write_row(class: &str, description: &str, verdicts: &[Verdict]) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/chaos");
    std::fs::create_dir_all(&dir).unwrap();
    let row = serde_json::json!({
        "class": class,
        "description": description,
        "seeds": verdicts.len(),
        "passed": verdicts.iter().filter(|v| v.passed()).count(),
        "events": verdicts.iter().map(|v| v.events).sum::<usize>(),
        "faults": verdicts.iter().map(|v| v.faults).sum::<usize>(),
        "lost": verdicts.iter().map(|v| v.lost).sum::<usize>(),
        "duplicates": verdicts.iter().map(|v| v.duplicates).sum::<usize>(),
        "max_per_second": verdicts.iter().map(|v| v.max_per_second).max().unwrap_or(0),
        "requests": verdicts.iter().map(|v| v.requests).sum::<u64>(),
        "verdicts": verdicts,
    });
    std::fs::write(
        dir.join(format!("{class}.json")),
        serde_json::to_vec_pretty(&row).unwrap(),
    )
    .unwrap();
}

/// The seeds of `class`, saying on stderr which one starts (and the API reading it
/// plays), so a long suite shows what it is doing (`cargo test -- --nocapture`, or the
/// output of a failing test).
pub fn seeds_of(class: &'static str) -> impl Iterator<Item = u64> {
    let range = seeds();
    let total = range.end - range.start;
    range.enumerate().map(move |(i, seed)| {
        let readings = knowbe4_source::testkit::sim::Reading::core();
        eprintln!(
            "[chaos] {class}: seed {seed} ({} of {total}), reading {}",
            i + 1,
            readings[(seed as usize) % readings.len()]
        );
        seed
    })
}

/// Seeds per class: `CHAOS_SEEDS` (default 2), starting at `CHAOS_FIRST_SEED` (default 1).
pub fn seeds() -> std::ops::Range<u64> {
    let n: u64 = std::env::var("CHAOS_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let first: u64 = std::env::var("CHAOS_FIRST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    first..first + n
}
