//! The state store: one trait, two implementations.
//!
//! - [`dynamo::DynamoStore`]: the DynamoDB state table (selected by `STATE_TABLE`) and
//!   change table (`CHANGE_TABLE`, holding the change-detection digests), the deployed
//!   mode. Key design in the README.
//! - [`file::FileStore`]: a local JSON file written atomically (write, fsync, rename),
//!   the embedded default for trying the collector without AWS; its digests are in
//!   files of their own beside it.
//!
//! Every write that records progress is conditioned twice: on the caller holding the
//! source's lease (its fencing token) and on the state version it read. A late or
//! duplicate run therefore cannot overwrite newer progress.

pub mod aws_env;
pub mod dynamo;
pub mod file;
pub mod secrets_manager;
pub mod vault;

use std::collections::HashMap;

use async_trait::async_trait;

use crate::domain::state::{HealthEvent, Lease, Millis, SourceRecord, SourceState, Versioned};
use crate::error::Result;

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

/// How long a source counts as a member of its account after its last run: a deleted
/// source stops lowering the account's limit after this.
pub const MEMBER_TTL_MS: Millis = 2 * 86_400_000;

/// The sources that share one KnowBe4 account, each with the daily limit it was
/// configured with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccountMembers {
    /// (source id, its `dailyRequestLimit` after `quotaShare`), in id order.
    pub members: Vec<(String, u32)>,
}

impl AccountMembers {
    /// The account's limit: the smallest any member was configured with (the account
    /// cannot have more than its most cautious description says).
    pub fn limit(&self) -> Option<u32> {
        self.members.iter().map(|(_, limit)| *limit).min()
    }

    /// Whether the members disagree on the limit (`status` says so).
    pub fn disagree(&self) -> bool {
        self.members
            .iter()
            .any(|(_, limit)| Some(*limit) != self.limit())
    }

    /// How many sources share the account (at least 1).
    pub fn count(&self) -> u32 {
        (self.members.len() as u32).max(1)
    }
}

/// Outcome of claiming an account's send slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendSlot {
    /// The caller may send now.
    Granted,
    /// Another request holds the slot until this time (epoch ms): try again then.
    Busy(Millis),
}

/// One source as dispatch sees it (see [`StateStore::snapshot`]).
#[derive(Clone, Debug)]
pub struct SourceSnapshot {
    /// Its configuration.
    pub record: SourceRecord,
    /// Its run state (absent while it is being created or deleted).
    pub state: Option<SourceState>,
    /// When its lease lapses (epoch ms; 0 when released), if the store says.
    pub lease_expires_at: Option<Millis>,
}

/// Every source with what decides whether a scheduled run of it is due: its state, its
/// lease, and its account's requests today and members. Read by fan-out dispatch.
#[derive(Clone, Debug, Default)]
pub struct StoreSnapshot {
    /// The sources, in id order.
    pub sources: Vec<SourceSnapshot>,
    /// Requests reserved on the snapshot's day, by account id (absent: none).
    pub quota_used: HashMap<String, u32>,
    /// The members of each account seen in the snapshot, by account id.
    pub members: HashMap<String, AccountMembers>,
    /// Sources left out because an item of theirs could not be read (logged by id).
    pub unreadable: usize,
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

    /// Reserves one request in the ledger of KnowBe4 account `account` (an
    /// [`account_id`](crate::domain::account::account_id), shared by every source using the same
    /// key) for `day` (`YYYY-MM-DD`, UTC) if fewer than `limit` are reserved: an atomic
    /// conditional increment.
    async fn reserve_request(&self, account: &str, day: &str, limit: u32) -> Result<Reservation>;

    /// Gives back one reservation of `day` for a request that provably never reached
    /// KnowBe4 (DNS failure, connection refused): it spent none of the account's quota.
    /// Never takes the count below zero.
    async fn release_request(&self, account: &str, day: &str) -> Result<()>;

    /// Requests reserved in the account's ledger for `day`.
    async fn quota_used(&self, account: &str, day: &str) -> Result<u32>;

    /// Records that `source_id` uses `account` with a daily `limit`, and returns the
    /// account's members (sources seen within [`MEMBER_TTL_MS`] of `now`).
    async fn join_account(
        &self,
        account: &str,
        source_id: &str,
        limit: u32,
        now: Millis,
    ) -> Result<AccountMembers>;

    /// The account's members as last recorded (for `status`), without joining.
    async fn account_members(&self, account: &str, now: Millis) -> Result<AccountMembers>;

    /// Claims the account's next send slot: granted when no other request of the
    /// account (from any process) holds a slot ending after `now`, and then holds it
    /// until `now + spacing_ms`. Otherwise says until when the current slot is held.
    async fn claim_send_slot(
        &self,
        account: &str,
        now: Millis,
        spacing_ms: i64,
    ) -> Result<SendSlot>;

    /// Inserts or replaces a health event (keyed by source and `streak_key`), expiring
    /// at `expires_at` (seconds since the epoch, DynamoDB TTL).
    async fn put_health(&self, event: &HealthEvent, expires_at: i64) -> Result<()>;

    /// The source's health events, newest first, at most `limit`.
    async fn list_health(&self, id: &str, limit: usize) -> Result<Vec<HealthEvent>>;

    /// Every source with its state, lease and account figures for `day` (see
    /// [`StoreSnapshot`]). This default reads source by source (leases unknown); the
    /// DynamoDB store reads the whole table in one paginated Scan.
    async fn snapshot(&self, day: &str, now: Millis) -> Result<StoreSnapshot> {
        let mut snapshot = StoreSnapshot::default();
        for record in self.list_sources().await? {
            let state = self.load_state(&record.id).await?.map(|s| s.value);
            if let Some(account) = state.as_ref().and_then(|s| s.account.clone())
                && !snapshot.members.contains_key(&account)
            {
                let used = self.quota_used(&account, day).await?;
                snapshot.quota_used.insert(account.clone(), used);
                let members = self.account_members(&account, now).await?;
                snapshot.members.insert(account, members);
            }
            snapshot.sources.push(SourceSnapshot {
                record,
                state,
                lease_expires_at: None,
            });
        }
        Ok(snapshot)
    }

    /// Saves one shard of change-detection digests of source `id`
    /// ([`crate::domain::changes::DigestShard::encode`]): `list` names the listing (`tests`,
    /// or a test's `pst_id`), `page` the page it covers. Fenced like `save_state`: refused
    /// with `Conflict` once `lease` was lost or the source deleted. One shard is one item,
    /// at most 10,668 bytes of digests (500 records); one whose item would pass
    /// DynamoDB's item limit is refused ([`check_digest_shard_size`]) by every store.
    async fn save_digest_shard(
        &self,
        id: &str,
        list: &str,
        page: u32,
        shard: &str,
        lease: &Lease,
    ) -> Result<()>;

    /// Every digest shard of `list` of source `id`, as `(page, encoded shard)`, in page
    /// order.
    async fn load_digest_shards(&self, id: &str, list: &str) -> Result<Vec<(u32, String)>>;

    /// Deletes the digest shards `pages` of `list` of source `id` (those already gone are
    /// no error). Fenced like [`save_digest_shard`](Self::save_digest_shard).
    async fn delete_digest_shards(
        &self,
        id: &str,
        list: &str,
        pages: &[u32],
        lease: &Lease,
    ) -> Result<()>;
}

/// The key of one digest shard under its source: `DIGEST#<list>#<page, 5 digits>`.
pub fn digest_shard_key(list: &str, page: u32) -> String {
    format!("{}{page:05}", digest_list_prefix(list))
}

/// The common start of every digest shard key of `list`.
pub fn digest_list_prefix(list: &str) -> String {
    format!("DIGEST#{list}#")
}

/// DynamoDB's item size limit: 400 KB of attribute names and values (UTF-8 lengths).
pub const MAX_ITEM_BYTES: usize = 400 * 1024;

/// The size of the DynamoDB item of one digest shard: its key attributes (`pk`, `sk`)
/// and `digests`, names and values.
pub fn digest_shard_item_bytes(id: &str, list: &str, page: u32, shard: &str) -> usize {
    "pk".len()
        + "SOURCE#".len()
        + id.len()
        + "sk".len()
        + digest_shard_key(list, page).len()
        + "digests".len()
        + shard.len()
}

/// Refuses a digest shard whose item would pass [`MAX_ITEM_BYTES`], naming the source,
/// list and page (DynamoDB's own refusal names none of them). Both stores check, so a
/// local run fails where a deployed one would.
pub fn check_digest_shard_size(id: &str, list: &str, page: u32, shard: &str) -> Result<()> {
    let bytes = digest_shard_item_bytes(id, list, page, shard);
    if bytes > MAX_ITEM_BYTES {
        return Err(crate::error::Error::Store {
            message: format!(
                "the digest shard of source {id}, list {list}, page {page} is {bytes} bytes as \
                 an item, over DynamoDB's 400 KB item limit ({MAX_ITEM_BYTES} bytes); a shard \
                 holds at most 500 records (10,668 bytes)"
            ),
            source: None,
        });
    }
    Ok(())
}
