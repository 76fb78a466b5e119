//! The state store: one trait, two implementations.
//!
//! - [`dynamo::DynamoStore`]: one DynamoDB table (selected by `STATE_TABLE`), the
//!   deployed mode. Key design in the README.
//! - [`file::FileStore`]: a local JSON file written atomically (write, fsync, rename),
//!   the embedded default for trying the collector without AWS.
//!
//! Every write that records progress is conditioned twice: on the caller holding the
//! source's lease (its fencing token) and on the state version it read. A late or
//! duplicate run therefore cannot overwrite newer progress.

pub mod dynamo;
pub mod file;
pub mod secrets_manager;

use async_trait::async_trait;

use crate::error::Result;
use crate::state::{HealthEvent, Lease, Millis, SourceRecord, SourceState, Versioned};

/// When the new holder of a lease may first call KnowBe4. A released lease (expiry 0)
/// carries the releasing run's `quiet_until`; a lease taken over from a run that crashed
/// holding it says nothing about that run's last request, so the new holder waits one
/// full rate window from now. Either way no one-second window sees more than four requests.
pub fn takeover_quiet_until(
    previous_expiry: Millis,
    previous_quiet: Millis,
    now: Millis,
) -> Millis {
    if previous_expiry > 0 {
        previous_quiet.max(now + 1_050)
    } else {
        previous_quiet
    }
}

/// Outcome of reserving one KnowBe4 request in the daily quota ledger.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reservation {
    /// Reserved; the count of requests reserved today including this one.
    Granted(u32),
    /// The day's limit is reached; nothing was reserved.
    Exhausted,
}

/// Persistence of sources, their state, leases, quota ledger and health events.
#[async_trait]
pub trait StateStore: Send + Sync {
    /// Stores a new source and its initial state. Fails with `Error::Conflict` if the id
    /// exists.
    async fn create_source(&self, record: &SourceRecord, state: &SourceState) -> Result<()>;

    /// Replaces a source's configuration (the caller bumped `config_version`).
    async fn update_source(&self, record: &SourceRecord) -> Result<()>;

    /// Reads a source's configuration.
    async fn get_source(&self, id: &str) -> Result<Option<SourceRecord>>;

    /// All sources, in id order.
    async fn list_sources(&self) -> Result<Vec<SourceRecord>>;

    /// Removes every item of the source (config, state, lease, ledger, health events).
    async fn delete_source(&self, id: &str) -> Result<()>;

    /// Reads the state document (consistent read).
    async fn load_state(&self, id: &str) -> Result<Option<Versioned<SourceState>>>;

    /// Writes the state if its version is still `expected` and, when `lease` is given,
    /// the lease is still held with that fencing token. Returns the new version.
    /// A lost race is `Error::Conflict`.
    async fn save_state(
        &self,
        id: &str,
        state: &SourceState,
        expected: u64,
        lease: Option<&Lease>,
    ) -> Result<u64>;

    /// Takes the source's lease if it is free or expired. `None` when another run holds it.
    async fn acquire_lease(
        &self,
        id: &str,
        owner: &str,
        now: Millis,
        ttl_ms: i64,
    ) -> Result<Option<Lease>>;

    /// Extends a held lease; `Error::Conflict` when it was lost.
    async fn renew_lease(&self, lease: &Lease, now: Millis, ttl_ms: i64) -> Result<Lease>;

    /// Gives the lease up, recording when KnowBe4 may next be called for this source.
    async fn release_lease(&self, lease: &Lease, quiet_until: Millis) -> Result<()>;

    /// Reserves one request in the source's ledger for `day` (`YYYY-MM-DD`, UTC) if
    /// fewer than `limit` are reserved: an atomic conditional increment.
    async fn reserve_request(&self, id: &str, day: &str, limit: u32) -> Result<Reservation>;

    /// Gives back one reservation of `day` for a request that provably never reached
    /// KnowBe4 (DNS failure, connection refused): it spent none of the account's quota.
    /// Never takes the count below zero.
    async fn release_request(&self, id: &str, day: &str) -> Result<()>;

    /// Requests reserved for `day`.
    async fn quota_used(&self, id: &str, day: &str) -> Result<u32>;

    /// Inserts or replaces a health event (keyed by source and `streak_key`), expiring
    /// at `expires_at` (seconds since the epoch, DynamoDB TTL).
    async fn put_health(&self, event: &HealthEvent, expires_at: i64) -> Result<()>;

    /// The source's health events, newest first, at most `limit`.
    async fn list_health(&self, id: &str, limit: usize) -> Result<Vec<HealthEvent>>;
}
