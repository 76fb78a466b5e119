//! The local state file: the embedded default, so the collector runs without AWS.
//!
//! One JSON document holds every source's records (and, in local mode only, their
//! secrets). Each operation takes an exclusive lock on a sibling `.lock` file, reads the
//! document, changes it, writes a temporary file, fsyncs it and renames it over the old
//! one: a crash mid-write leaves either the old or the new document, never a torn one.
//! The same conditions as DynamoDB (state version, lease fence) apply, so local runs
//! behave like deployed ones.
//!
//! The file can hold API keys, so on Unix: the directory is created with mode 0700; the
//! temporary file gets a random name and is created exclusively (`O_CREAT|O_EXCL`, which
//! refuses any existing path, symlinks included) with `O_NOFOLLOW` and mode 0600 from the
//! start, so nothing placed in the directory beforehand receives the secrets; the lock
//! file is opened with `O_NOFOLLOW` too.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::domain::secrets::{SecretDocument, SourceSecrets};
use crate::domain::state::{HealthEvent, Lease, Millis, SourceRecord, SourceState, Versioned};
use crate::error::{Error, Result};
use crate::store::{AccountMembers, MEMBER_TTL_MS, Reservation, SendSlot, StateStore};

/// Default location of the state file, relative to the working directory.
pub const DEFAULT_STATE_FILE: &str = "./.knowbe4-source/state.json";

#[derive(Default, Serialize, Deserialize)]
struct Document {
    #[serde(default)]
    sources: BTreeMap<String, SourceRecord>,
    #[serde(default)]
    states: BTreeMap<String, StoredState>,
    #[serde(default)]
    leases: BTreeMap<String, Lease>,
    /// account id → day → requests reserved (the ledger belongs to the KnowBe4 account).
    #[serde(default)]
    quota: BTreeMap<String, BTreeMap<String, u32>>,
    /// account id → its send slot and members.
    #[serde(default)]
    accounts: BTreeMap<String, AccountDoc>,
    #[serde(default)]
    health: BTreeMap<String, BTreeMap<String, StoredHealth>>,
    #[serde(default)]
    secrets: BTreeMap<String, SecretDocument>,
    /// source id → digest shard key (`DIGEST#<list>#<page>`) → encoded shard.
    #[serde(default)]
    digests: BTreeMap<String, BTreeMap<String, String>>,
}

/// What the file keeps of one KnowBe4 account besides its ledger.
#[derive(Default, Serialize, Deserialize)]
struct AccountDoc {
    /// Until when the last send slot is held (epoch ms).
    #[serde(default)]
    next_ms: Millis,
    /// source id → (its daily limit, when it last joined).
    #[serde(default)]
    members: BTreeMap<String, (u32, Millis)>,
}

impl AccountDoc {
    fn members(&self, now: Millis) -> AccountMembers {
        AccountMembers {
            members: self
                .members
                .iter()
                .filter(|(_, (_, seen))| now - seen <= MEMBER_TTL_MS)
                .map(|(id, (limit, _))| (id.clone(), *limit))
                .collect(),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct StoredState {
    version: u64,
    doc: SourceState,
}

#[derive(Serialize, Deserialize)]
struct StoredHealth {
    expires_at: i64,
    event: HealthEvent,
}

/// The local JSON state store.
#[derive(Clone, Debug)]
pub struct FileStore {
    /// The state document.
    path: PathBuf,
    /// The lock file serialising writers (processes and tasks alike).
    lock_path: PathBuf,
}

impl FileStore {
    /// A store at `path`; the directory is created on first write.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let mut lock = path.clone().into_os_string();
        lock.push(".lock");
        FileStore {
            path,
            lock_path: PathBuf::from(lock),
        }
    }

    /// Where the document lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the document under the lock, writing it back when `f` says so.
    async fn with_doc<T, F>(&self, write: bool, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Document) -> Result<T> + Send + 'static,
    {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.with_doc_blocking(write, f))
            .await
            .map_err(|e| Error::store("local state task failed", e))?
    }

    fn with_doc_blocking<T>(
        &self,
        write: bool,
        f: impl FnOnce(&mut Document) -> Result<T>,
    ) -> Result<T> {
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            create_private_dir(dir)
                .map_err(|e| Error::store(format!("creating {}", dir.display()), e))?;
        }
        let mut options = OpenOptions::new();
        options.create(true).truncate(false).write(true);
        no_follow(&mut options, 0o600);
        let lock = options
            .open(&self.lock_path)
            .map_err(|e| Error::store(format!("opening {}", self.lock_path.display()), e))?;
        lock.lock()
            .map_err(|e| Error::store(format!("locking {}", self.lock_path.display()), e))?;
        let mut doc = match fs::read(&self.path) {
            Ok(bytes) if bytes.is_empty() => Document::default(),
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                Error::store(
                    format!("{} is not a valid state file", self.path.display()),
                    e,
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Document::default(),
            Err(e) => return Err(Error::store(format!("reading {}", self.path.display()), e)),
        };
        let out = f(&mut doc)?;
        if write {
            self.write_atomically(&doc)?;
        }
        drop(lock);
        Ok(out)
    }

    fn write_atomically(&self, doc: &Document) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(doc)
            .map_err(|e| Error::store("serialising the state file", e))?;
        // A name nobody can guess, created exclusively: a file or symlink planted at a
        // predictable name would otherwise receive the document (and its secrets).
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(format!(".tmp-{}", uuid::Uuid::new_v4().simple()));
        let tmp = PathBuf::from(tmp);
        let result = (|| -> std::io::Result<()> {
            let mut options = OpenOptions::new();
            options.write(true).create_new(true);
            // The file may hold API keys in local mode: owner-only from its creation.
            no_follow(&mut options, 0o600);
            let mut file = options.open(&tmp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            crate::failpoint::hit("state_file_before_rename");
            fs::rename(&tmp, &self.path)?;
            if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                File::open(dir)?.sync_all()?;
            }
            Ok(())
        })();
        result.map_err(|e| {
            let _ = fs::remove_file(&tmp);
            Error::store(format!("writing {}", self.path.display()), e)
        })
    }

    /// Stores a source's secrets in the file (local mode only).
    pub async fn put_secrets(&self, id: &str, secrets: &SourceSecrets) -> Result<()> {
        let id = id.to_string();
        let doc = secrets.to_document();
        self.with_doc(true, move |d| {
            d.secrets.insert(id, doc);
            Ok(())
        })
        .await
    }

    /// Reads a source's secrets from the file.
    pub async fn get_secrets(&self, id: &str) -> Result<SourceSecrets> {
        let id = id.to_string();
        self.with_doc(false, move |d| {
            d.secrets
                .remove(&id)
                .map(SourceSecrets::from_document)
                .ok_or_else(|| Error::Secret {
                    name: format!("local:{id}"),
                    message: "no API key is stored for this source".into(),
                    config: true,
                })
        })
        .await
    }
}

/// Creates `dir` (and missing parents) with mode 0700 on Unix. An existing directory is
/// left as it is: it is the user's.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}

/// On Unix: open with `O_NOFOLLOW` (a symlink at the path is an error, not followed) and
/// create with `mode`.
fn no_follow(options: &mut OpenOptions, mode: u32) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode).custom_flags(libc::O_NOFOLLOW);
    }
    #[cfg(not(unix))]
    let _ = (options, mode);
}

fn lease_is_held(doc: &Document, lease: &Lease) -> bool {
    doc.leases
        .get(&lease.source_id)
        .is_some_and(|held| held.owner == lease.owner && held.fence == lease.fence)
}

#[async_trait]
impl StateStore for FileStore {
    async fn create_source(&self, record: &SourceRecord, state: &SourceState) -> Result<()> {
        let record = record.clone();
        let state = state.clone();
        self.with_doc(true, move |d| {
            if d.sources.contains_key(&record.id) {
                return Err(Error::Conflict(format!(
                    "source {} already exists",
                    record.id
                )));
            }
            d.states.insert(
                record.id.clone(),
                StoredState {
                    version: 1,
                    doc: state,
                },
            );
            d.sources.insert(record.id.clone(), record);
            Ok(())
        })
        .await
    }

    async fn update_source(&self, record: &SourceRecord) -> Result<()> {
        let record = record.clone();
        self.with_doc(true, move |d| match d.sources.get_mut(&record.id) {
            Some(slot) => {
                *slot = record;
                Ok(())
            }
            None => Err(Error::NotFound(record.id)),
        })
        .await
    }

    async fn get_source(&self, id: &str) -> Result<Option<SourceRecord>> {
        let id = id.to_string();
        self.with_doc(false, move |d| Ok(d.sources.remove(&id)))
            .await
    }

    async fn list_sources(&self) -> Result<Vec<SourceRecord>> {
        self.with_doc(false, |d| {
            Ok(std::mem::take(&mut d.sources).into_values().collect())
        })
        .await
    }

    async fn delete_source(&self, id: &str) -> Result<()> {
        let id = id.to_string();
        self.with_doc(true, move |d| {
            d.sources.remove(&id);
            d.states.remove(&id);
            d.leases.remove(&id);
            // The quota ledger belongs to the account, which other sources may share;
            // the source only stops being one of its members.
            for account in d.accounts.values_mut() {
                account.members.remove(&id);
            }
            d.health.remove(&id);
            d.secrets.remove(&id);
            d.digests.remove(&id);
            Ok(())
        })
        .await
    }

    async fn load_state(&self, id: &str) -> Result<Option<Versioned<SourceState>>> {
        let id = id.to_string();
        self.with_doc(false, move |d| {
            Ok(d.states.remove(&id).map(|s| Versioned {
                value: s.doc,
                version: s.version,
            }))
        })
        .await
    }

    async fn save_state(
        &self,
        id: &str,
        state: &SourceState,
        expected: u64,
        lease: Option<&Lease>,
    ) -> Result<u64> {
        let id = id.to_string();
        let state = state.clone();
        let lease = lease.cloned();
        self.with_doc(true, move |d| {
            if !d.sources.contains_key(&id) {
                return Err(Error::Conflict(format!("source {id} was deleted")));
            }
            if let Some(lease) = &lease
                && !lease_is_held(d, lease)
            {
                return Err(Error::Conflict(format!("lease on {id} was lost")));
            }
            let current = d.states.get(&id).map_or(0, |s| s.version);
            if current != expected {
                return Err(Error::Conflict(format!(
                    "state of {id} is at version {current}, not {expected}"
                )));
            }
            d.states.insert(
                id,
                StoredState {
                    version: expected + 1,
                    doc: state,
                },
            );
            Ok(expected + 1)
        })
        .await
    }

    async fn acquire_lease(
        &self,
        id: &str,
        owner: &str,
        now: Millis,
        ttl_ms: i64,
    ) -> Result<Option<Lease>> {
        let id = id.to_string();
        let owner = owner.to_string();
        self.with_doc(true, move |d| {
            let previous = d.leases.get(&id);
            if previous.is_some_and(|l| l.expires_at >= now) {
                return Ok(None);
            }
            let lease = Lease {
                source_id: id.clone(),
                owner,
                fence: previous.map_or(0, |l| l.fence) + 1,
                expires_at: now + ttl_ms,
                quiet_until: previous.map_or(0, |l| {
                    super::takeover_quiet_until(l.expires_at, l.quiet_until, now)
                }),
            };
            d.leases.insert(id, lease.clone());
            Ok(Some(lease))
        })
        .await
    }

    async fn renew_lease(&self, lease: &Lease, now: Millis, ttl_ms: i64) -> Result<Lease> {
        let lease = lease.clone();
        self.with_doc(true, move |d| {
            if !lease_is_held(d, &lease) {
                return Err(Error::Conflict(format!(
                    "lease on {} was lost",
                    lease.source_id
                )));
            }
            let renewed = Lease {
                expires_at: now + ttl_ms,
                ..lease
            };
            d.leases.insert(renewed.source_id.clone(), renewed.clone());
            Ok(renewed)
        })
        .await
    }

    async fn release_lease(&self, lease: &Lease, quiet_until: Millis) -> Result<()> {
        let lease = lease.clone();
        self.with_doc(true, move |d| {
            if lease_is_held(d, &lease) {
                d.leases.insert(
                    lease.source_id.clone(),
                    Lease {
                        expires_at: 0,
                        quiet_until,
                        ..lease
                    },
                );
            }
            Ok(())
        })
        .await
    }

    async fn reserve_request(&self, id: &str, day: &str, limit: u32) -> Result<Reservation> {
        let id = id.to_string();
        let day = day.to_string();
        self.with_doc(true, move |d| {
            let days = d.quota.entry(id).or_default();
            // Only today's and recent days matter; keep the file small.
            while days.len() > 7 {
                let oldest = days.keys().next().cloned().expect("non-empty");
                days.remove(&oldest);
            }
            let used = days.entry(day).or_default();
            if *used >= limit {
                return Ok(Reservation::Exhausted);
            }
            *used += 1;
            Ok(Reservation::Granted(*used))
        })
        .await
    }

    async fn release_request(&self, id: &str, day: &str) -> Result<()> {
        let id = id.to_string();
        let day = day.to_string();
        self.with_doc(true, move |d| {
            if let Some(used) = d.quota.get_mut(&id).and_then(|days| days.get_mut(&day)) {
                *used = used.saturating_sub(1);
            }
            Ok(())
        })
        .await
    }

    async fn join_account(
        &self,
        account: &str,
        source_id: &str,
        limit: u32,
        now: Millis,
    ) -> Result<AccountMembers> {
        let account = account.to_string();
        let source_id = source_id.to_string();
        self.with_doc(true, move |d| {
            let doc = d.accounts.entry(account).or_default();
            doc.members.insert(source_id, (limit, now));
            Ok(doc.members(now))
        })
        .await
    }

    async fn account_members(&self, account: &str, now: Millis) -> Result<AccountMembers> {
        let account = account.to_string();
        self.with_doc(false, move |d| {
            Ok(d.accounts
                .get(&account)
                .map(|doc| doc.members(now))
                .unwrap_or_default())
        })
        .await
    }

    async fn claim_send_slot(
        &self,
        account: &str,
        now: Millis,
        spacing_ms: i64,
    ) -> Result<SendSlot> {
        let account = account.to_string();
        // Under the file's lock: processes sharing the file take turns here.
        self.with_doc(true, move |d| {
            let doc = d.accounts.entry(account).or_default();
            if doc.next_ms > now {
                return Ok(SendSlot::Busy(doc.next_ms));
            }
            doc.next_ms = now + spacing_ms;
            Ok(SendSlot::Granted)
        })
        .await
    }

    async fn quota_used(&self, id: &str, day: &str) -> Result<u32> {
        let id = id.to_string();
        let day = day.to_string();
        self.with_doc(false, move |d| {
            Ok(d.quota
                .get(&id)
                .and_then(|days| days.get(&day))
                .copied()
                .unwrap_or(0))
        })
        .await
    }

    async fn put_health(&self, event: &HealthEvent, expires_at: i64) -> Result<()> {
        let event = event.clone();
        self.with_doc(true, move |d| {
            let events = d.health.entry(event.source_id.clone()).or_default();
            events.insert(event.streak_key(), StoredHealth { expires_at, event });
            // TTL, as DynamoDB would eventually do, and a bound on the file's size.
            let now_s = time::OffsetDateTime::now_utc().unix_timestamp();
            events.retain(|_, h| h.expires_at > now_s);
            while events.len() > 200 {
                let oldest = events
                    .iter()
                    .min_by_key(|(_, h)| h.event.last_seen)
                    .map(|(k, _)| k.clone())
                    .expect("non-empty");
                events.remove(&oldest);
            }
            Ok(())
        })
        .await
    }

    async fn list_health(&self, id: &str, limit: usize) -> Result<Vec<HealthEvent>> {
        let id = id.to_string();
        self.with_doc(false, move |d| {
            let mut events: Vec<HealthEvent> = d
                .health
                .remove(&id)
                .unwrap_or_default()
                .into_values()
                .map(|h| h.event)
                .collect();
            events.sort_by_key(|e| std::cmp::Reverse(e.last_seen));
            events.truncate(limit);
            Ok(events)
        })
        .await
    }

    async fn save_digest_shard(
        &self,
        id: &str,
        list: &str,
        page: u32,
        shard: &str,
        lease: &Lease,
    ) -> Result<()> {
        let id = id.to_string();
        let key = crate::store::digest_shard_key(list, page);
        let shard = shard.to_string();
        let lease = lease.clone();
        self.with_doc(true, move |d| {
            if !d.sources.contains_key(&id) {
                return Err(Error::Conflict(format!("source {id} was deleted")));
            }
            if !lease_is_held(d, &lease) {
                return Err(Error::Conflict(format!("lease on {id} was lost")));
            }
            d.digests.entry(id).or_default().insert(key, shard);
            Ok(())
        })
        .await
    }

    async fn delete_digest_shards(
        &self,
        id: &str,
        list: &str,
        pages: &[u32],
        lease: &Lease,
    ) -> Result<()> {
        let id = id.to_string();
        let keys: Vec<String> = pages
            .iter()
            .map(|page| crate::store::digest_shard_key(list, *page))
            .collect();
        let lease = lease.clone();
        self.with_doc(true, move |d| {
            if !d.sources.contains_key(&id) {
                return Err(Error::Conflict(format!("source {id} was deleted")));
            }
            if !lease_is_held(d, &lease) {
                return Err(Error::Conflict(format!("lease on {id} was lost")));
            }
            if let Some(shards) = d.digests.get_mut(&id) {
                for key in &keys {
                    shards.remove(key);
                }
            }
            Ok(())
        })
        .await
    }

    async fn load_digest_shards(&self, id: &str, list: &str) -> Result<Vec<(u32, String)>> {
        let id = id.to_string();
        let prefix = crate::store::digest_list_prefix(list);
        self.with_doc(false, move |d| {
            let Some(shards) = d.digests.get(&id) else {
                return Ok(Vec::new());
            };
            shards
                .range(prefix.clone()..)
                .take_while(|(key, _)| key.starts_with(&prefix))
                .map(|(key, shard)| {
                    let page = key[prefix.len()..]
                        .parse::<u32>()
                        .map_err(|_| Error::Store {
                            message: format!("digest shard key {key} of {id} has no page number"),
                            source: None,
                        })?;
                    Ok((page, shard.clone()))
                })
                .collect()
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ValidationOptions, parse_source_value};
    use crate::domain::state::SecretRef;

    fn record(id: &str) -> SourceRecord {
        let parsed = parse_source_value(
            serde_json::json!({"source":{"config":{"name":"n","apiKey":"k","region":"US"}}}),
            ValidationOptions::default(),
        )
        .unwrap();
        SourceRecord {
            id: id.into(),
            spec: parsed.spec,
            secret_ref: SecretRef::LocalFile,
            config_version: 1,
            created_at: 0,
            updated_at: 0,
            account: None,
            destination: None,
        }
    }

    /// Issue 12: a 50,000-recipient test's digests in the local file: 100 shards, read
    /// back in page order, fenced by the lease, removed with the source.
    #[tokio::test]
    async fn digest_shards_round_trip_fenced_and_go_with_the_source() {
        use crate::domain::changes::{KnownDigests, page_changes};
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path().join("state.json"));
        store
            .create_source(&record("p"), &SourceState::new(0))
            .await
            .unwrap();
        let lease = store
            .acquire_lease("p", "run-1", 1_000, 600_000)
            .await
            .unwrap()
            .unwrap();
        let mut saved = Vec::new();
        for page in [2u32, 1, 10] {
            let texts: Vec<String> = (0..500u64)
                .map(|i| format!(r#"{{"recipient_id":{}}}"#, u64::from(page) * 1_000 + i))
                .collect();
            let changes = page_changes(
                &KnownDigests::default(),
                &mut Default::default(),
                texts
                    .iter()
                    .enumerate()
                    .map(|(i, t)| (u64::from(page) * 1_000 + i as u64, t.as_str())),
            );
            let encoded = changes.delta.encode();
            store
                .save_digest_shard("p", "77", page, &encoded, &lease)
                .await
                .unwrap();
            saved.push((page, encoded));
        }
        saved.sort();
        assert_eq!(store.load_digest_shards("p", "77").await.unwrap(), saved);
        assert!(store.load_digest_shards("p", "7").await.unwrap().is_empty());
        store
            .delete_digest_shards("p", "77", &[2, 3], &lease)
            .await
            .unwrap();
        let left: Vec<u32> = store
            .load_digest_shards("p", "77")
            .await
            .unwrap()
            .into_iter()
            .map(|(page, _)| page)
            .collect();
        assert_eq!(left, vec![1, 10]);
        saved.retain(|(page, _)| *page != 2);
        store.release_lease(&lease, 0).await.unwrap();
        store
            .acquire_lease("p", "run-2", 2_000, 600_000)
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(
            store
                .save_digest_shard("p", "77", 1, &saved[0].1, &lease)
                .await,
            Err(Error::Conflict(_))
        ));
        assert!(matches!(
            store.delete_digest_shards("p", "77", &[1], &lease).await,
            Err(Error::Conflict(_))
        ));
        store.delete_source("p").await.unwrap();
        assert!(
            store
                .load_digest_shards("p", "77")
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn versions_and_leases_fence_writers() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path().join("state.json"));
        store
            .create_source(&record("a"), &SourceState::new(0))
            .await
            .unwrap();
        assert!(matches!(
            store
                .create_source(&record("a"), &SourceState::new(0))
                .await,
            Err(Error::Conflict(_))
        ));
        let first = store
            .acquire_lease("a", "run-1", 1_000, 500)
            .await
            .unwrap()
            .unwrap();
        assert!(
            store
                .acquire_lease("a", "run-2", 1_200, 500)
                .await
                .unwrap()
                .is_none()
        );
        // run-1 pauses past its lease; run-2 takes over and must wait a rate window.
        let second = store
            .acquire_lease("a", "run-2", 2_000, 500)
            .await
            .unwrap()
            .unwrap();
        assert!(second.fence > first.fence);
        assert!(second.quiet_until >= 2_000 + 1_000);
        let state = SourceState::new(0);
        assert!(matches!(
            store.save_state("a", &state, 1, Some(&first)).await,
            Err(Error::Conflict(_))
        ));
        assert_eq!(
            store
                .save_state("a", &state, 1, Some(&second))
                .await
                .unwrap(),
            2
        );
        assert!(matches!(
            store.save_state("a", &state, 1, Some(&second)).await,
            Err(Error::Conflict(_))
        ));
        // A clean release hands over its own quiet time, not a takeover wait.
        store.release_lease(&second, 2_400).await.unwrap();
        let third = store
            .acquire_lease("a", "run-3", 2_100, 500)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(third.quiet_until, 2_400);
    }

    #[tokio::test]
    async fn the_account_ledger_stops_at_the_limit_and_outlives_a_deleted_source() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path().join("state.json"));
        store
            .create_source(&record("q"), &SourceState::new(0))
            .await
            .unwrap();
        store.join_account("acct", "q", 3, 0).await.unwrap();
        let mut granted = 0;
        for _ in 0..5 {
            if let Reservation::Granted(_) = store
                .reserve_request("acct", "2026-01-01", 3)
                .await
                .unwrap()
            {
                granted += 1;
            }
        }
        assert_eq!(granted, 3);
        assert_eq!(store.quota_used("acct", "2026-01-01").await.unwrap(), 3);
        assert_eq!(store.quota_used("acct", "2026-01-02").await.unwrap(), 0);
        store.delete_source("q").await.unwrap();
        assert!(store.get_source("q").await.unwrap().is_none());
        assert!(store.load_state("q").await.unwrap().is_none());
        // The ledger is the account's (other sources may share it); the source only
        // stops being a member.
        assert_eq!(store.quota_used("acct", "2026-01-01").await.unwrap(), 3);
        assert!(
            store
                .account_members("acct", 0)
                .await
                .unwrap()
                .members
                .is_empty()
        );
        assert!(matches!(
            store.save_state("q", &SourceState::new(0), 1, None).await,
            Err(Error::Conflict(_))
        ));
    }

    #[tokio::test]
    async fn a_torn_write_leaves_the_previous_document() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let store = FileStore::new(&path);
        store
            .create_source(&record("t"), &SourceState::new(0))
            .await
            .unwrap();
        let before = std::fs::read(&path).unwrap();
        // A crashed writer leaves only its temporary file behind.
        std::fs::write(dir.path().join("state.json.tmp-999"), b"{\"sources\":").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert!(store.get_source("t").await.unwrap().is_some());
        // A corrupt document is an error, never an empty store.
        std::fs::write(&path, b"{\"sources\":").unwrap();
        assert!(matches!(
            store.list_sources().await,
            Err(Error::Store { .. })
        ));
    }
}
