//! A state store that fails on purpose: the injectable failure hook for AWS-side faults.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use knowbe4_source::domain::state::{
    HealthEvent, Lease, Millis, SourceRecord, SourceState, Versioned,
};
use knowbe4_source::error::{Error, Result};
use knowbe4_source::store::{AccountMembers, Reservation, SendSlot, StateStore};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// Wraps a real store; each call fails with probability `rate`. Writes fail either before
/// reaching the store (throttled, timed out) or after it applied them (the answer was
/// lost), which is the harder case.
pub struct FaultyStore {
    inner: Arc<dyn StateStore>,
    rng: Mutex<StdRng>,
    rate: f64,
    /// Faults injected, by kind, for the report.
    pub injected: Mutex<Vec<&'static str>>,
}

enum Fault {
    None,
    Before,
    After,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn StateStore>, seed: u64, rate: f64) -> Self {
        FaultyStore {
            inner,
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            rate,
            injected: Mutex::new(Vec::new()),
        }
    }

    fn roll(&self, op: &'static str, write: bool) -> Fault {
        let mut rng = self.rng.lock().unwrap();
        if !rng.random_bool(self.rate) {
            return Fault::None;
        }
        self.injected.lock().unwrap().push(op);
        if write && rng.random_bool(0.5) {
            Fault::After
        } else {
            Fault::Before
        }
    }

    fn error(op: &str) -> Error {
        Error::Store {
            message: format!("injected fault in {op} (throttled or timed out)"),
            source: None,
        }
    }

    /// Faults injected so far.
    pub fn injected(&self) -> usize {
        self.injected.lock().unwrap().len()
    }
}

macro_rules! faulty {
    ($self:ident, $op:literal, $write:expr, $call:expr) => {
        match $self.roll($op, $write) {
            Fault::None => $call.await,
            Fault::Before => Err(Self::error($op)),
            Fault::After => {
                let _ = $call.await;
                Err(Self::error($op))
            }
        }
    };
}

#[async_trait]
impl StateStore for FaultyStore {
    async fn create_source(&self, record: &SourceRecord, state: &SourceState) -> Result<()> {
        self.inner.create_source(record, state).await
    }
    async fn update_source(&self, record: &SourceRecord) -> Result<()> {
        self.inner.update_source(record).await
    }
    async fn get_source(&self, id: &str) -> Result<Option<SourceRecord>> {
        faulty!(self, "get_source", false, self.inner.get_source(id))
    }
    async fn list_sources(&self) -> Result<Vec<SourceRecord>> {
        self.inner.list_sources().await
    }
    async fn delete_source(&self, id: &str) -> Result<()> {
        self.inner.delete_source(id).await
    }
    async fn load_state(&self, id: &str) -> Result<Option<Versioned<SourceState>>> {
        faulty!(self, "load_state", false, self.inner.load_state(id))
    }
    async fn save_state(
        &self,
        id: &str,
        state: &SourceState,
        expected: u64,
        lease: Option<&Lease>,
    ) -> Result<u64> {
        faulty!(
            self,
            "save_state",
            true,
            self.inner.save_state(id, state, expected, lease)
        )
    }
    async fn acquire_lease(
        &self,
        id: &str,
        owner: &str,
        now: Millis,
        ttl_ms: i64,
    ) -> Result<Option<Lease>> {
        faulty!(
            self,
            "acquire_lease",
            true,
            self.inner.acquire_lease(id, owner, now, ttl_ms)
        )
    }
    async fn renew_lease(&self, lease: &Lease, now: Millis, ttl_ms: i64) -> Result<Lease> {
        faulty!(
            self,
            "renew_lease",
            true,
            self.inner.renew_lease(lease, now, ttl_ms)
        )
    }
    async fn release_lease(&self, lease: &Lease, quiet_until: Millis) -> Result<()> {
        faulty!(
            self,
            "release_lease",
            true,
            self.inner.release_lease(lease, quiet_until)
        )
    }
    async fn reserve_request(&self, id: &str, day: &str, limit: u32) -> Result<Reservation> {
        faulty!(
            self,
            "reserve_request",
            true,
            self.inner.reserve_request(id, day, limit)
        )
    }
    async fn release_request(&self, id: &str, day: &str) -> Result<()> {
        faulty!(
            self,
            "release_request",
            true,
            self.inner.release_request(id, day)
        )
    }
    async fn join_account(
        &self,
        account: &str,
        source_id: &str,
        limit: u32,
        now: Millis,
    ) -> Result<AccountMembers> {
        faulty!(
            self,
            "join_account",
            true,
            self.inner.join_account(account, source_id, limit, now)
        )
    }
    async fn account_members(&self, account: &str, now: Millis) -> Result<AccountMembers> {
        faulty!(
            self,
            "account_members",
            false,
            self.inner.account_members(account, now)
        )
    }
    async fn claim_send_slot(
        &self,
        account: &str,
        now: Millis,
        spacing_ms: i64,
    ) -> Result<SendSlot> {
        faulty!(
            self,
            "claim_send_slot",
            true,
            self.inner.claim_send_slot(account, now, spacing_ms)
        )
    }
    async fn quota_used(&self, id: &str, day: &str) -> Result<u32> {
        faulty!(self, "quota_used", false, self.inner.quota_used(id, day))
    }
    async fn put_health(&self, event: &HealthEvent, expires_at: i64) -> Result<()> {
        faulty!(
            self,
            "put_health",
            true,
            self.inner.put_health(event, expires_at)
        )
    }
    async fn list_health(&self, id: &str, limit: usize) -> Result<Vec<HealthEvent>> {
        self.inner.list_health(id, limit).await
    }

    async fn save_digest_shard(
        &self,
        id: &str,
        list: &str,
        page: u32,
        shard: &str,
        lease: &Lease,
    ) -> Result<()> {
        self.inner
            .save_digest_shard(id, list, page, shard, lease)
            .await
    }

    async fn load_digest_shards(&self, id: &str, list: &str) -> Result<Vec<(u32, String)>> {
        self.inner.load_digest_shards(id, list).await
    }

    async fn delete_digest_shards(
        &self,
        id: &str,
        list: &str,
        pages: &[u32],
        lease: &Lease,
    ) -> Result<()> {
        self.inner
            .delete_digest_shards(id, list, pages, lease)
            .await
    }
}
