//! The chaos suite: seeded scenarios that attack the collector's promises, each judged by
//! one oracle.
//!
//! Faults come from the KnowBe4 simulator, the recording destination, a state store
//! wrapper that fails calls (throttling, timeouts, writes applied but reported failed),
//! and killing the `knowbe4-source` process at its failpoints. After the faults, clean
//! runs settle, and the oracle checks:
//! - lost = events in KnowBe4 − events received: empty;
//! - duplicates: none without a crash or a lost write, else at most one batch per fault;
//! - at most 4 requests in every one-second window, and requests per day ≤ the quota;
//! - the checkpoint never moves backwards, and every id it records as delivered was
//!   received by the destination.
//!
//! `CHAOS_SEEDS` sets the seeds per class (default 2); each class writes its row to
//! `target/chaos/<class>.json`, which `scripts/chaos.sh` turns into `docs/reliability.md`.

mod faulty_store;
mod oracle;
mod scenarios;

#[allow(dead_code)]
#[path = "../it/helpers.rs"]
mod helpers;
