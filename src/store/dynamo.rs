//! The DynamoDB state store: the state table (named by `STATE_TABLE`), one partition per
//! source, and the change table (`CHANGE_TABLE`, by default `<STATE_TABLE>-changes`) for
//! the change-detection digests, which can be many (see [`changes`]).
//!
//! ## Key design
//!
//! Every item of a source shares the partition key `pk = "SOURCE#<id>"`; the sort key
//! `sk` says what the item is. Both keys are strings. The table bills on demand and
//! expires items through the TTL attribute `expires_at` (seconds since the epoch).
//!
//! | `sk`                  | Attributes                                                     | Written by                                      |
//! |-----------------------|----------------------------------------------------------------|-------------------------------------------------|
//! | `CONFIG`              | `doc` (JSON of `SourceRecord`), `name`, `config_version`       | `create_source`, `update_source`                |
//! | `STATE`               | `doc` (JSON of `SourceState`), `version`                       | `create_source` (version 1), `save_state`       |
//! | `LEASE`               | `owner`, `fence`, `expires_at_ms`, `quiet_until`               | `acquire_lease`, `renew_lease`, `release_lease` |
//! | `HEALTH#<streak_key>` | `doc` (JSON of `HealthEvent`), `last_seen`, `expires_at` (TTL) | `put_health`                                    |
//!
//! The digest shards live in the change table, under the same keys (`pk = "SOURCE#<id>"`):
//!
//! | `sk`                  | Attributes                                                     | Written by                                      |
//! |-----------------------|----------------------------------------------------------------|-------------------------------------------------|
//! | `DIGEST#<list>#<page>`| `digests` (base64 of 16-byte id + digest records, ≤ 10,668 B) | `save_digest_shard`, `delete_digest_shards`     |
//!
//! They are kept out of the state table because the fan-out dispatch reads that table
//! with one `Scan`, and a Scan reads (and bills) every item before its filter applies:
//! with the digests there, every dispatch would read every digest of every source.
//!
//! The limits belong to the KnowBe4 account (API host + key, see [`crate::domain::account`]), so
//! its items live in the partition `pk = "ACCOUNT#<account id>"`:
//!
//! | `sk`                  | Attributes                                                     | Written by                                      |
//! |-----------------------|----------------------------------------------------------------|-------------------------------------------------|
//! | `QUOTA#<YYYY-MM-DD>`  | `used`, `expires_at` (TTL: end of that UTC day + 3 days)       | `reserve_request`, `release_request`            |
//! | `PACE`                | `next_ms`: until when the last send slot is held (epoch ms)     | `claim_send_slot`                               |
//! | `MEMBERS`             | `m#<source id>` = `<limit>:<last seen ms>` per source           | `join_account`                                  |
//!
//! ## Conditions
//!
//! - `create_source` is one transaction: `CONFIG` put with `attribute_not_exists(pk)`,
//!   `STATE` put with version 1. An existing source is `Error::Conflict`.
//! - `update_source` requires `CONFIG` to exist (`Error::NotFound` otherwise) and the
//!   stored `config_version` to be lower than the new one (`Error::Conflict` otherwise).
//! - `save_state` is one transaction: a `ConditionCheck` that `LEASE` still has the
//!   caller's `owner` and `fence` (when a lease is given), a `ConditionCheck` that
//!   `CONFIG` exists (a deleted source is never resurrected), and the `STATE` put
//!   conditioned on `version = expected`. Any failed condition is `Error::Conflict`.
//! - `save_digest_shard` is one transaction with the same two `ConditionCheck`s (on the
//!   state table) and the shard's put (in the change table); `delete_digest_shards` the
//!   same with up to 98 deletes. A shard whose item would pass DynamoDB's 400 KB item
//!   limit is refused before any call, naming the source and list.
//! - `delete_source` deletes `CONFIG` first (every later digest or state write fails its
//!   check), then the source's items in the change table, then the rest of its
//!   partition. `create_source` first removes change-table items an interrupted delete
//!   may have left under the id, so a re-created source never inherits old digests.
//! - `acquire_lease` is an `UpdateItem` conditioned on the lease being absent or expired
//!   (`expires_at_ms < now`); it `ADD`s 1 to `fence`, so the fencing token strictly grows
//!   over every acquisition. `release_lease` sets `expires_at_ms = 0` and keeps `fence`.
//!   (`delete_source` removes `LEASE` too, so a re-created source starts at fence 1
//!   again; owners are unique run ids, so a run of the deleted source still cannot match.)
//! - `reserve_request` is an `UpdateItem` that `ADD`s 1 to `used` only while
//!   `used < limit`: concurrent runs of every source of the account can never reserve
//!   more than the limit.
//! - `claim_send_slot` is an `UpdateItem` that sets `next_ms = now + spacing` only while
//!   `next_ms <= now`: two processes can never hold overlapping slots, so no one-second
//!   window sees more than four requests to the account from all of them.
//!
//! TTL deletes late (up to about two days), so nothing here relies on it for
//! correctness: quota items are keyed by day and health events are capped by `limit`.
//! Reads use `ConsistentRead`. Throttling is retried by the SDK's standard retry
//! configuration, not here.

mod changes;

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, ConditionCheck, DeleteRequest,
    KeySchemaElement, KeyType, Put, ReturnValue, ReturnValuesOnConditionCheckFailure,
    ScalarAttributeType, TableStatus, TimeToLiveSpecification, TimeToLiveStatus, TransactWriteItem,
    WriteRequest,
};

use super::{AccountMembers, MEMBER_TTL_MS, Reservation, SendSlot, StateStore};
use crate::domain::state::{HealthEvent, Lease, Millis, SourceRecord, SourceState, Versioned};
use crate::error::{Error, Result};

/// A DynamoDB item: attribute name to value.
type Item = HashMap<String, AttributeValue>;

/// Partition key attribute.
const PK: &str = "pk";
/// Sort key attribute.
const SK: &str = "sk";
/// The TTL attribute (seconds since the epoch).
const TTL_ATTRIBUTE: &str = "expires_at";
/// Sort key of the configuration item.
const SK_CONFIG: &str = "CONFIG";
/// Sort key of the state item.
const SK_STATE: &str = "STATE";
/// Sort key of the lease item.
const SK_LEASE: &str = "LEASE";
/// Sort key prefix of the quota ledger items.
const SK_QUOTA_PREFIX: &str = "QUOTA#";
/// Sort key of an account's send-slot record.
const SK_PACE: &str = "PACE";
/// Sort key of an account's member list.
const SK_MEMBERS: &str = "MEMBERS";
/// Attribute name prefix of one member in `MEMBERS`.
const MEMBER_PREFIX: &str = "m#";
/// Sort key prefix of the health event items.
const SK_HEALTH_PREFIX: &str = "HEALTH#";
/// How long a day's quota item outlives the day (TTL), in seconds.
const QUOTA_RETENTION_SECS: i64 = 3 * 24 * 3600;
/// BatchWriteItem takes at most 25 requests.
const BATCH_LIMIT: usize = 25;
/// Attempts at writing a batch's unprocessed items before giving up.
const BATCH_ATTEMPTS: u32 = 8;
/// How long `create_table` waits for a new table to become active.
const TABLE_ACTIVE_TIMEOUT: Duration = Duration::from_secs(300);

/// The change table's name when `CHANGE_TABLE` is not set: `<state table>-changes`.
pub fn default_change_table(state_table: &str) -> String {
    format!("{state_table}-changes")
}

/// The state store backed by the state table and the change table (see the module docs
/// for the key design).
#[derive(Clone, Debug)]
pub struct DynamoStore {
    /// The SDK client, built once per process and shared (it pools connections).
    client: Client,
    /// The table holding every source's items except its digests.
    table: String,
    /// The table holding the change-detection digests (only [`changes`] uses it).
    change_table: String,
}

impl DynamoStore {
    /// A store over the state table `table` and the change table
    /// [`default_change_table`]`(table)`, which must exist (see
    /// [`DynamoStore::create_table`]).
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        let table = table.into();
        DynamoStore {
            client,
            change_table: default_change_table(&table),
            table,
        }
    }

    /// The same store with its digests in `change_table` instead of the default.
    pub fn with_change_table(self, change_table: impl Into<String>) -> Self {
        DynamoStore {
            change_table: change_table.into(),
            ..self
        }
    }

    /// Creates the state table `table` and the change table under its default name
    /// ([`default_change_table`]), as [`DynamoStore::new`] expects them: see
    /// [`DynamoStore::create_tables`].
    pub async fn create_table(client: &Client, table: &str) -> Result<()> {
        Self::create_tables(client, table, &default_change_table(table)).await
    }

    /// Creates the state table (on-demand billing, string `pk`/`sk`, TTL on
    /// `expires_at`) and the change table (the same keys, no TTL: nothing there expires)
    /// and waits until both are active. Idempotent: an existing table is left as is, and
    /// TTL is only enabled when it is not already.
    pub async fn create_tables(client: &Client, table: &str, change_table: &str) -> Result<()> {
        Self::create_one_table(client, table, true).await?;
        Self::create_one_table(client, change_table, false).await
    }

    /// Creates one table with string `pk`/`sk` keys and waits until it is active, then
    /// enables TTL on `expires_at` when `ttl`.
    async fn create_one_table(client: &Client, table: &str, ttl: bool) -> Result<()> {
        let key_attr = |name: &str| {
            AttributeDefinition::builder()
                .attribute_name(name)
                .attribute_type(ScalarAttributeType::S)
                .build()
                .map_err(|e| Error::store("building the table definition", e))
        };
        let key = |name: &str, kind: KeyType| {
            KeySchemaElement::builder()
                .attribute_name(name)
                .key_type(kind)
                .build()
                .map_err(|e| Error::store("building the table key schema", e))
        };
        let created = client
            .create_table()
            .table_name(table)
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(key_attr(PK)?)
            .attribute_definitions(key_attr(SK)?)
            .key_schema(key(PK, KeyType::Hash)?)
            .key_schema(key(SK, KeyType::Range)?)
            .send()
            .await;
        match created {
            Ok(_) => tracing::info!(table, "Created the table."),
            Err(err)
                if err
                    .as_service_error()
                    .is_some_and(|e| e.is_resource_in_use_exception()) =>
            {
                tracing::debug!(table, "The table already exists.");
            }
            Err(err) => return Err(Error::store(format!("DynamoDB CreateTable {table}"), err)),
        }

        // UpdateTimeToLive is refused while the table is still being created.
        let started = tokio::time::Instant::now();
        loop {
            let described = client
                .describe_table()
                .table_name(table)
                .send()
                .await
                .map_err(|e| Error::store(format!("DynamoDB DescribeTable {table}"), e))?;
            let status = described.table().and_then(|t| t.table_status());
            if status == Some(&TableStatus::Active) {
                break;
            }
            if started.elapsed() > TABLE_ACTIVE_TIMEOUT {
                return Err(Error::Store {
                    message: format!("table {table} did not become active (status {status:?})"),
                    source: None,
                });
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        if !ttl {
            return Ok(());
        }

        let ttl = client
            .describe_time_to_live()
            .table_name(table)
            .send()
            .await
            .map_err(|e| Error::store(format!("DynamoDB DescribeTimeToLive {table}"), e))?;
        let ttl_on = ttl.time_to_live_description().is_some_and(|d| {
            matches!(
                d.time_to_live_status(),
                Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling)
            )
        });
        if !ttl_on {
            let spec = TimeToLiveSpecification::builder()
                .attribute_name(TTL_ATTRIBUTE)
                .enabled(true)
                .build()
                .map_err(|e| Error::store("building the TTL specification", e))?;
            client
                .update_time_to_live()
                .table_name(table)
                .time_to_live_specification(spec)
                .send()
                .await
                .map_err(|e| Error::store(format!("DynamoDB UpdateTimeToLive {table}"), e))?;
        }
        Ok(())
    }

    /// The primary key of one item of source `id`.
    fn key(id: &str, sk: impl Into<String>) -> Item {
        HashMap::from([(PK.to_string(), s(source_pk(id))), (SK.to_string(), s(sk))])
    }

    /// The primary key of one item of account `account`.
    fn account_key(account: &str, sk: impl Into<String>) -> Item {
        HashMap::from([
            (PK.to_string(), s(format!("ACCOUNT#{account}"))),
            (SK.to_string(), s(sk)),
        ])
    }

    /// A consistent GetItem of one account item.
    async fn get_account_item(&self, account: &str, sk: &str) -> Result<Option<Item>> {
        self.get_key(
            Self::account_key(account, sk),
            format!("{sk} of account {account}"),
        )
        .await
    }

    /// A consistent GetItem of the item at `key` (`what` names it in errors).
    async fn get_key(&self, key: Item, what: String) -> Result<Option<Item>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| Error::store(format!("DynamoDB GetItem on {what}"), e))?;
        Ok(out.item)
    }

    /// A consistent GetItem of one item.
    async fn get(&self, id: &str, sk: &str) -> Result<Option<Item>> {
        self.get_key(Self::key(id, sk), format!("{sk} of {id}"))
            .await
    }

    /// Every item of source `id` (all pages), optionally only those whose sort key
    /// starts with `prefix`.
    async fn query_partition(&self, id: &str, prefix: Option<&str>) -> Result<Vec<Item>> {
        self.query_source(&self.table, id, prefix, false).await
    }

    /// Every item of source `id` in `table` (all pages of a consistent Query), only those
    /// whose sort key starts with `prefix` when given; only their keys when `keys_only`.
    async fn query_source(
        &self,
        table: &str,
        id: &str,
        prefix: Option<&str>,
        keys_only: bool,
    ) -> Result<Vec<Item>> {
        let mut items = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let mut query = self
                .client
                .query()
                .table_name(table)
                .consistent_read(true)
                .expression_attribute_names("#pk", PK)
                .expression_attribute_values(":pk", s(source_pk(id)))
                .set_exclusive_start_key(start.take());
            if prefix.is_some() || keys_only {
                query = query.expression_attribute_names("#sk", SK);
            }
            query = match prefix {
                Some(prefix) => query
                    .key_condition_expression("#pk = :pk AND begins_with(#sk, :prefix)")
                    .expression_attribute_values(":prefix", s(prefix)),
                None => query.key_condition_expression("#pk = :pk"),
            };
            if keys_only {
                query = query.projection_expression("#pk, #sk");
            }
            let out = query
                .send()
                .await
                .map_err(|e| Error::store(format!("DynamoDB Query on {id} in {table}"), e))?;
            start = out.last_evaluated_key;
            items.extend(out.items.unwrap_or_default());
            if start.is_none() {
                return Ok(items);
            }
        }
    }

    /// Deletes `keys` of source `id` from `table` with BatchWriteItem, 25 at a time,
    /// retrying unprocessed items with a short backoff.
    async fn batch_delete(&self, table: &str, id: &str, keys: Vec<Item>) -> Result<()> {
        let mut requests = Vec::with_capacity(keys.len());
        for key in keys {
            let delete = DeleteRequest::builder()
                .set_key(Some(key))
                .build()
                .map_err(|e| Error::store("building a delete request", e))?;
            requests.push(WriteRequest::builder().delete_request(delete).build());
        }
        for chunk in requests.chunks(BATCH_LIMIT) {
            let mut pending = chunk.to_vec();
            let mut attempt = 0;
            while !pending.is_empty() {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_millis(50 << attempt.min(6))).await;
                }
                if attempt == BATCH_ATTEMPTS {
                    return Err(Error::Store {
                        message: format!(
                            "DynamoDB BatchWriteItem on {id} in {table}: {} deletes still unprocessed after {BATCH_ATTEMPTS} attempts",
                            pending.len()
                        ),
                        source: None,
                    });
                }
                attempt += 1;
                let out = self
                    .client
                    .batch_write_item()
                    .request_items(table, pending)
                    .send()
                    .await
                    .map_err(|e| {
                        Error::store(format!("DynamoDB BatchWriteItem on {id} in {table}"), e)
                    })?;
                pending = out
                    .unprocessed_items
                    .and_then(|mut left| left.remove(table))
                    .unwrap_or_default();
            }
        }
        Ok(())
    }

    /// The STATE put (with its version condition) and the CONFIG existence check that
    /// every state write carries, plus the lease check when a lease is given.
    fn save_state_items(
        &self,
        id: &str,
        state: &SourceState,
        expected: u64,
        lease: Option<&Lease>,
    ) -> Result<(Vec<TransactWriteItem>, Vec<String>)> {
        let mut items = Vec::with_capacity(3);
        let mut reasons = Vec::with_capacity(3);
        if let Some(lease) = lease {
            let check = ConditionCheck::builder()
                .table_name(&self.table)
                .set_key(Some(Self::key(id, SK_LEASE)))
                .condition_expression("#owner = :owner AND #fence = :fence")
                .expression_attribute_names("#owner", "owner")
                .expression_attribute_names("#fence", "fence")
                .expression_attribute_values(":owner", s(&lease.owner))
                .expression_attribute_values(":fence", n(lease.fence))
                .build()
                .map_err(|e| Error::store("building the lease check", e))?;
            items.push(TransactWriteItem::builder().condition_check(check).build());
            reasons.push(format!(
                "the lease of {id} (fence {}) was lost",
                lease.fence
            ));
        }
        let config_exists = ConditionCheck::builder()
            .table_name(&self.table)
            .set_key(Some(Self::key(id, SK_CONFIG)))
            .condition_expression("attribute_exists(#pk)")
            .expression_attribute_names("#pk", PK)
            .build()
            .map_err(|e| Error::store("building the source check", e))?;
        items.push(
            TransactWriteItem::builder()
                .condition_check(config_exists)
                .build(),
        );
        reasons.push(format!("source {id} was deleted"));

        let mut item = Self::key(id, SK_STATE);
        item.insert("doc".into(), s(to_json("STATE", id, state)?));
        item.insert("version".into(), n(expected + 1));
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("#version = :expected")
            .expression_attribute_names("#version", "version")
            .expression_attribute_values(":expected", n(expected))
            .build()
            .map_err(|e| Error::store("building the state put", e))?;
        items.push(TransactWriteItem::builder().put(put).build());
        reasons.push(format!(
            "the state of {id} is no longer at version {expected}"
        ));
        Ok((items, reasons))
    }
}

#[async_trait]
impl StateStore for DynamoStore {
    async fn create_source(&self, record: &SourceRecord, state: &SourceState) -> Result<()> {
        let id = record.id.as_str();
        // Digests an interrupted delete left under this id would make the new source skip
        // records as unchanged. No run writes any while CONFIG is absent.
        if self.get(id, SK_CONFIG).await?.is_none() {
            let purged = self.purge_digests(id).await?;
            if purged > 0 {
                tracing::info!(
                    source_id = id,
                    purged,
                    "Removed digest items a previous delete of this id left behind."
                );
            }
        }
        let mut config = Self::key(id, SK_CONFIG);
        config.insert("doc".into(), s(to_json("CONFIG", id, record)?));
        config.insert("name".into(), s(&record.spec.name));
        config.insert("config_version".into(), n(record.config_version));
        let config = Put::builder()
            .table_name(&self.table)
            .set_item(Some(config))
            .condition_expression("attribute_not_exists(#pk)")
            .expression_attribute_names("#pk", PK)
            .build()
            .map_err(|e| Error::store("building the config put", e))?;

        // Unconditional: a STATE left over by an interrupted delete is replaced.
        let mut state_item = Self::key(id, SK_STATE);
        state_item.insert("doc".into(), s(to_json("STATE", id, state)?));
        state_item.insert("version".into(), n(1u64));
        let state_put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(state_item))
            .build()
            .map_err(|e| Error::store("building the state put", e))?;

        self.client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().put(config).build())
            .transact_items(TransactWriteItem::builder().put(state_put).build())
            .send()
            .await
            .map_err(|e| {
                transaction_error(
                    format!("DynamoDB TransactWriteItems creating {id}"),
                    &[format!("source {id} already exists"), String::new()],
                    e,
                )
            })?;
        Ok(())
    }

    async fn update_source(&self, record: &SourceRecord) -> Result<()> {
        let id = record.id.as_str();
        let mut item = Self::key(id, SK_CONFIG);
        item.insert("doc".into(), s(to_json("CONFIG", id, record)?));
        item.insert("name".into(), s(&record.spec.name));
        item.insert("config_version".into(), n(record.config_version));
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_exists(#pk) AND #cv < :cv")
            .expression_attribute_names("#pk", PK)
            .expression_attribute_names("#cv", "config_version")
            .expression_attribute_values(":cv", n(record.config_version))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(err) => match err.as_service_error() {
                Some(e) if e.is_conditional_check_failed_exception() => {
                    let existed = match e {
                        aws_sdk_dynamodb::operation::put_item::PutItemError::ConditionalCheckFailedException(c) => {
                            c.item().is_some_and(|old| !old.is_empty())
                        }
                        _ => false,
                    };
                    if existed {
                        Err(Error::Conflict(format!(
                            "source {id} already has a configuration version at or above {}",
                            record.config_version
                        )))
                    } else {
                        Err(Error::NotFound(id.to_string()))
                    }
                }
                _ => Err(Error::store(
                    format!("DynamoDB PutItem on CONFIG of {id}"),
                    err,
                )),
            },
        }
    }

    async fn get_source(&self, id: &str) -> Result<Option<SourceRecord>> {
        match self.get(id, SK_CONFIG).await? {
            Some(item) => Ok(Some(from_doc("CONFIG", id, &item)?)),
            None => Ok(None),
        }
    }

    async fn list_sources(&self) -> Result<Vec<SourceRecord>> {
        let mut sources = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let out = self
                .client
                .scan()
                .table_name(&self.table)
                .consistent_read(true)
                .filter_expression("#sk = :config")
                .expression_attribute_names("#sk", SK)
                .expression_attribute_values(":config", s(SK_CONFIG))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| Error::store("DynamoDB Scan for sources", e))?;
            for item in out.items.unwrap_or_default() {
                let pk = item
                    .get(PK)
                    .and_then(|v| v.as_s().ok())
                    .cloned()
                    .unwrap_or_default();
                sources.push(from_doc::<SourceRecord>("CONFIG", &pk, &item)?);
            }
            start = out.last_evaluated_key;
            if start.is_none() {
                break;
            }
        }
        sources.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(sources)
    }

    /// Deletes CONFIG first, so a run still going sees the source gone (its next state
    /// or digest write fails), then its digests in the change table, then every other
    /// item of the partition. Deleting a source that does not exist is not an error.
    async fn delete_source(&self, id: &str) -> Result<()> {
        self.client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(Self::key(id, SK_CONFIG)))
            .send()
            .await
            .map_err(|e| Error::store(format!("DynamoDB DeleteItem on CONFIG of {id}"), e))?;
        self.purge_digests(id).await?;
        let keys = self
            .query_partition(id, None)
            .await?
            .into_iter()
            .map(|item| {
                item.into_iter()
                    .filter(|(name, _)| name == PK || name == SK)
                    .collect::<Item>()
            })
            .collect::<Vec<_>>();
        self.batch_delete(&self.table, id, keys).await
    }

    async fn load_state(&self, id: &str) -> Result<Option<Versioned<SourceState>>> {
        let Some(item) = self.get(id, SK_STATE).await? else {
            return Ok(None);
        };
        Ok(Some(Versioned {
            value: from_doc("STATE", id, &item)?,
            version: number(&item, "version", "STATE", id)?,
        }))
    }

    async fn save_state(
        &self,
        id: &str,
        state: &SourceState,
        expected: u64,
        lease: Option<&Lease>,
    ) -> Result<u64> {
        let (items, reasons) = self.save_state_items(id, state, expected, lease)?;
        self.client
            .transact_write_items()
            .set_transact_items(Some(items))
            .send()
            .await
            .map_err(|e| {
                transaction_error(
                    format!("DynamoDB TransactWriteItems saving the state of {id}"),
                    &reasons,
                    e,
                )
            })?;
        Ok(expected + 1)
    }

    async fn acquire_lease(
        &self,
        id: &str,
        owner: &str,
        now: Millis,
        ttl_ms: i64,
    ) -> Result<Option<Lease>> {
        let expires_at = now + ttl_ms;
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(Self::key(id, SK_LEASE)))
            .condition_expression("attribute_not_exists(#pk) OR #exp < :now")
            .update_expression("SET #owner = :owner, #exp = :exp ADD #fence :one")
            .expression_attribute_names("#pk", PK)
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_names("#exp", "expires_at_ms")
            .expression_attribute_names("#fence", "fence")
            .expression_attribute_values(":now", n(now))
            .expression_attribute_values(":owner", s(owner))
            .expression_attribute_values(":exp", n(expires_at))
            .expression_attribute_values(":one", n(1))
            .return_values(ReturnValue::AllOld)
            .send()
            .await;
        match result {
            Ok(out) => {
                // The previous holder's item tells whether it released the lease or
                // crashed holding it (see `super::takeover_quiet_until`).
                let old = out.attributes.unwrap_or_default();
                let (old_fence, old_expiry, old_quiet) = if old.is_empty() {
                    (0, 0, 0)
                } else {
                    let previous = lease_from_item(id, &old)?;
                    (previous.fence, previous.expires_at, previous.quiet_until)
                };
                Ok(Some(Lease {
                    source_id: id.to_string(),
                    owner: owner.to_string(),
                    fence: old_fence + 1,
                    expires_at,
                    quiet_until: super::takeover_quiet_until(old_expiry, old_quiet, now),
                }))
            }
            Err(err) if condition_failed(&err) => Ok(None),
            Err(err) => Err(Error::store(
                format!("DynamoDB UpdateItem acquiring the lease of {id}"),
                err,
            )),
        }
    }

    async fn renew_lease(&self, lease: &Lease, now: Millis, ttl_ms: i64) -> Result<Lease> {
        let id = lease.source_id.as_str();
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(Self::key(id, SK_LEASE)))
            .condition_expression("#owner = :owner AND #fence = :fence")
            .update_expression("SET #exp = :exp")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_names("#fence", "fence")
            .expression_attribute_names("#exp", "expires_at_ms")
            .expression_attribute_values(":owner", s(&lease.owner))
            .expression_attribute_values(":fence", n(lease.fence))
            .expression_attribute_values(":exp", n(now + ttl_ms))
            .return_values(ReturnValue::AllNew)
            .send()
            .await;
        match result {
            Ok(out) => lease_from_item(id, &out.attributes.unwrap_or_default()),
            Err(err) if condition_failed(&err) => Err(Error::Conflict(format!(
                "the lease of {id} (fence {}) was lost",
                lease.fence
            ))),
            Err(err) => Err(Error::store(
                format!("DynamoDB UpdateItem renewing the lease of {id}"),
                err,
            )),
        }
    }

    async fn release_lease(&self, lease: &Lease, quiet_until: Millis) -> Result<()> {
        let id = lease.source_id.as_str();
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(Self::key(id, SK_LEASE)))
            .condition_expression("#owner = :owner AND #fence = :fence")
            .update_expression("SET #exp = :zero, #quiet = :quiet")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_names("#fence", "fence")
            .expression_attribute_names("#exp", "expires_at_ms")
            .expression_attribute_names("#quiet", "quiet_until")
            .expression_attribute_values(":owner", s(&lease.owner))
            .expression_attribute_values(":fence", n(lease.fence))
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":quiet", n(quiet_until))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(err) if condition_failed(&err) => {
                // Someone else holds it now: there is nothing of ours to release.
                tracing::debug!(
                    source_id = id,
                    fence = lease.fence,
                    "Lease already lost, nothing to release."
                );
                Ok(())
            }
            Err(err) => Err(Error::store(
                format!("DynamoDB UpdateItem releasing the lease of {id}"),
                err,
            )),
        }
    }

    async fn reserve_request(&self, id: &str, day: &str, limit: u32) -> Result<Reservation> {
        // The condition below lets the first reservation of a day through, so a zero
        // limit has to be answered here.
        if limit == 0 {
            return Ok(Reservation::Exhausted);
        }
        let expires_at = quota_expiry(day)?;
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(Self::account_key(
                id,
                format!("{SK_QUOTA_PREFIX}{day}"),
            )))
            .condition_expression("attribute_not_exists(#used) OR #used < :limit")
            .update_expression("ADD #used :one SET #ttl = :ttl")
            .expression_attribute_names("#used", "used")
            .expression_attribute_names("#ttl", TTL_ATTRIBUTE)
            .expression_attribute_values(":limit", n(limit))
            .expression_attribute_values(":one", n(1))
            .expression_attribute_values(":ttl", n(expires_at))
            .return_values(ReturnValue::UpdatedNew)
            .send()
            .await;
        match result {
            Ok(out) => {
                let item = out.attributes.unwrap_or_default();
                Ok(Reservation::Granted(number(&item, "used", "QUOTA", id)?))
            }
            Err(err) if condition_failed(&err) => Ok(Reservation::Exhausted),
            Err(err) => Err(Error::store(
                format!("DynamoDB UpdateItem reserving a request for {id} on {day}"),
                err,
            )),
        }
    }

    async fn release_request(&self, id: &str, day: &str) -> Result<()> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(Self::account_key(
                id,
                format!("{SK_QUOTA_PREFIX}{day}"),
            )))
            .condition_expression("#used > :zero")
            .update_expression("ADD #used :minus_one")
            .expression_attribute_names("#used", "used")
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":minus_one", n(-1))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(err) if condition_failed(&err) => Ok(()),
            Err(err) => Err(Error::store(
                format!("DynamoDB UpdateItem releasing a request of {id} on {day}"),
                err,
            )),
        }
    }

    async fn quota_used(&self, account: &str, day: &str) -> Result<u32> {
        match self
            .get_account_item(account, &format!("{SK_QUOTA_PREFIX}{day}"))
            .await?
        {
            Some(item) => number(&item, "used", "QUOTA", account),
            None => Ok(0),
        }
    }

    async fn join_account(
        &self,
        account: &str,
        source_id: &str,
        limit: u32,
        now: Millis,
    ) -> Result<AccountMembers> {
        let out = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(Self::account_key(account, SK_MEMBERS)))
            .update_expression("SET #member = :entry")
            .expression_attribute_names("#member", format!("{MEMBER_PREFIX}{source_id}"))
            .expression_attribute_values(":entry", s(format!("{limit}:{now}")))
            .return_values(ReturnValue::AllNew)
            .send()
            .await
            .map_err(|e| {
                Error::store(format!("DynamoDB UpdateItem joining account {account}"), e)
            })?;
        Ok(members_of(&out.attributes.unwrap_or_default(), now))
    }

    async fn account_members(&self, account: &str, now: Millis) -> Result<AccountMembers> {
        Ok(self
            .get_account_item(account, SK_MEMBERS)
            .await?
            .map(|item| members_of(&item, now))
            .unwrap_or_default())
    }

    async fn claim_send_slot(
        &self,
        account: &str,
        now: Millis,
        spacing_ms: i64,
    ) -> Result<SendSlot> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(Self::account_key(account, SK_PACE)))
            .condition_expression("attribute_not_exists(#next) OR #next <= :now")
            .update_expression("SET #next = :next")
            .expression_attribute_names("#next", "next_ms")
            .expression_attribute_values(":now", n(now))
            .expression_attribute_values(":next", n(now + spacing_ms))
            .send()
            .await;
        match result {
            Ok(_) => Ok(SendSlot::Granted),
            Err(err) if condition_failed(&err) => {
                let held = match self.get_account_item(account, SK_PACE).await? {
                    Some(item) => number::<i64>(&item, "next_ms", "PACE", account)?,
                    None => now,
                };
                Ok(SendSlot::Busy(held.max(now)))
            }
            Err(err) => Err(Error::store(
                format!("DynamoDB UpdateItem claiming a send slot of account {account}"),
                err,
            )),
        }
    }

    async fn put_health(&self, event: &HealthEvent, expires_at: i64) -> Result<()> {
        let id = event.source_id.as_str();
        let mut item = Self::key(id, format!("{SK_HEALTH_PREFIX}{}", event.streak_key()));
        item.insert("doc".into(), s(to_json("HEALTH", id, event)?));
        item.insert("last_seen".into(), n(event.last_seen));
        item.insert(TTL_ATTRIBUTE.into(), n(expires_at));
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .send()
            .await
            .map_err(|e| Error::store(format!("DynamoDB PutItem on HEALTH of {id}"), e))?;
        Ok(())
    }

    async fn list_health(&self, id: &str, limit: usize) -> Result<Vec<HealthEvent>> {
        let mut events = self
            .query_partition(id, Some(SK_HEALTH_PREFIX))
            .await?
            .iter()
            .map(|item| from_doc::<HealthEvent>("HEALTH", id, item))
            .collect::<Result<Vec<_>>>()?;
        events.sort_by_key(|e| std::cmp::Reverse(e.last_seen));
        events.truncate(limit);
        Ok(events)
    }

    /// One paginated Scan of the state table, filtered to the items dispatch reads
    /// (`CONFIG`, `STATE`, `LEASE`, and each account's `MEMBERS` and `QUOTA#<day>`): about
    /// one call per megabyte of the table, however many sources there are. A Scan reads
    /// every item before its filter applies; the digests are in the change table, so it
    /// never reads them.
    async fn snapshot(&self, day: &str, now: Millis) -> Result<super::StoreSnapshot> {
        let quota_sk = format!("{SK_QUOTA_PREFIX}{day}");
        let mut records: HashMap<String, SourceRecord> = HashMap::new();
        let mut states: HashMap<String, SourceState> = HashMap::new();
        let mut leases: HashMap<String, Millis> = HashMap::new();
        let mut unreadable: std::collections::HashSet<String> = std::collections::HashSet::new();
        let mut snapshot = super::StoreSnapshot::default();
        let mut start: Option<Item> = None;
        loop {
            let out = self
                .client
                .scan()
                .table_name(&self.table)
                .consistent_read(true)
                .filter_expression("#sk IN (:config, :state, :lease, :members, :quota)")
                .expression_attribute_names("#sk", SK)
                .expression_attribute_values(":config", s(SK_CONFIG))
                .expression_attribute_values(":state", s(SK_STATE))
                .expression_attribute_values(":lease", s(SK_LEASE))
                .expression_attribute_values(":members", s(SK_MEMBERS))
                .expression_attribute_values(":quota", s(&quota_sk))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| Error::store("DynamoDB Scan for dispatch", e))?;
            for item in out.items.unwrap_or_default() {
                let pk = item.get(PK).and_then(|v| v.as_s().ok()).cloned();
                let sk = item.get(SK).and_then(|v| v.as_s().ok()).cloned();
                let (Some(pk), Some(sk)) = (pk, sk) else {
                    continue;
                };
                if let Some(account) = pk.strip_prefix("ACCOUNT#") {
                    if sk == SK_MEMBERS {
                        snapshot
                            .members
                            .insert(account.to_string(), members_of(&item, now));
                    } else if sk == quota_sk {
                        // Unreadable: counted as nothing used; each run's reservation
                        // still holds the account to its quota.
                        match number(&item, "used", &sk, &pk) {
                            Ok(used) => {
                                snapshot.quota_used.insert(account.to_string(), used);
                            }
                            Err(err) => {
                                tracing::warn!(account, error = %err.chain(), "Dispatch: an account's quota item is unreadable.");
                            }
                        }
                    }
                    continue;
                }
                let Some(id) = pk.strip_prefix("SOURCE#") else {
                    continue;
                };
                // One malformed item leaves its source out (logged, counted), not the
                // whole dispatch.
                let read = match sk.as_str() {
                    SK_CONFIG => from_doc("CONFIG", id, &item)
                        .map(|record| {
                            records.insert(id.to_string(), record);
                        }),
                    SK_STATE => from_doc("STATE", id, &item)
                        .map(|state| {
                            states.insert(id.to_string(), state);
                        }),
                    // Unreadable: unknown; the run finds the lease held or free.
                    SK_LEASE => number(&item, "expires_at_ms", "LEASE", id)
                        .map(|at| {
                            leases.insert(id.to_string(), at);
                        })
                        .or_else(|err| {
                            tracing::warn!(source_id = id, error = %err.chain(), "Dispatch: a source's lease item is unreadable.");
                            Ok(())
                        }),
                    _ => Ok(()),
                };
                if let Err(err) = read {
                    tracing::warn!(source_id = id, item = %sk, error = %err.chain(), "Dispatch: a source's item is unreadable; the source is left out.");
                    unreadable.insert(id.to_string());
                }
            }
            start = out.last_evaluated_key;
            if start.is_none() {
                break;
            }
        }
        let mut sources: Vec<super::SourceSnapshot> = records
            .into_iter()
            .filter(|(id, _)| !unreadable.contains(id))
            .map(|(id, record)| super::SourceSnapshot {
                state: states.remove(&id),
                lease_expires_at: leases.remove(&id).or(Some(0)),
                record,
            })
            .collect();
        snapshot.unreadable = unreadable.len();
        sources.sort_by(|a, b| a.record.id.cmp(&b.record.id));
        snapshot.sources = sources;
        Ok(snapshot)
    }

    async fn save_digest_shard(
        &self,
        id: &str,
        list: &str,
        page: u32,
        shard: &str,
        lease: &Lease,
    ) -> Result<()> {
        self.put_digest_shard(id, list, page, shard, lease).await
    }

    async fn delete_digest_shards(
        &self,
        id: &str,
        list: &str,
        pages: &[u32],
        lease: &Lease,
    ) -> Result<()> {
        self.remove_digest_shards(id, list, pages, lease).await
    }

    async fn load_digest_shards(&self, id: &str, list: &str) -> Result<Vec<(u32, String)>> {
        self.query_digest_shards(id, list).await
    }
}

impl DynamoStore {
    /// `writes` behind the two checks that fence a digest write like `save_state` (the
    /// lease still held, the source not deleted): the items of one transaction.
    fn digest_fence(
        &self,
        id: &str,
        lease: &Lease,
        writes: impl IntoIterator<Item = TransactWriteItem>,
    ) -> Result<Vec<TransactWriteItem>> {
        let lease_held = ConditionCheck::builder()
            .table_name(&self.table)
            .set_key(Some(Self::key(id, SK_LEASE)))
            .condition_expression("#owner = :owner AND #fence = :fence")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_names("#fence", "fence")
            .expression_attribute_values(":owner", s(&lease.owner))
            .expression_attribute_values(":fence", n(lease.fence))
            .build()
            .map_err(|e| Error::store("building the lease check", e))?;
        let config_exists = ConditionCheck::builder()
            .table_name(&self.table)
            .set_key(Some(Self::key(id, SK_CONFIG)))
            .condition_expression("attribute_exists(#pk)")
            .expression_attribute_names("#pk", PK)
            .build()
            .map_err(|e| Error::store("building the source check", e))?;
        let checks = [lease_held, config_exists]
            .map(|check| TransactWriteItem::builder().condition_check(check).build());
        Ok(checks.into_iter().chain(writes).collect())
    }
}

/// The partition key of source `id`.
fn source_pk(id: &str) -> String {
    format!("SOURCE#{id}")
}

/// A string attribute.
fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

/// A number attribute.
fn n(value: impl ToString) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

/// Serialises a stored document.
fn to_json(what: &str, id: &str, value: &impl serde::Serialize) -> Result<String> {
    serde_json::to_string(value)
        .map_err(|e| Error::store(format!("serialising the {what} document of {id}"), e))
}

/// Parses the `doc` attribute of an item.
fn from_doc<T: serde::de::DeserializeOwned>(what: &str, id: &str, item: &Item) -> Result<T> {
    let doc = item.get("doc").and_then(|v| v.as_s().ok()).ok_or_else(|| {
        malformed(format!(
            "the {what} item of {id} has no string attribute doc"
        ))
    })?;
    serde_json::from_str(doc)
        .map_err(|e| Error::store(format!("the {what} document of {id} is not valid"), e))
}

/// Reads a number attribute.
fn number<T: std::str::FromStr>(item: &Item, name: &str, what: &str, id: &str) -> Result<T> {
    item.get(name)
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            malformed(format!(
                "the {what} item of {id} has no valid number attribute {name}"
            ))
        })
}

/// Whether an `UpdateItem` failed only because its condition did not hold.
fn condition_failed<R>(err: &SdkError<UpdateItemError, R>) -> bool {
    err.as_service_error()
        .is_some_and(|e| e.is_conditional_check_failed_exception())
}

/// The members of an account's `MEMBERS` item seen within [`MEMBER_TTL_MS`] of `now`.
fn members_of(item: &Item, now: Millis) -> AccountMembers {
    let mut members: Vec<(String, u32)> = item
        .iter()
        .filter_map(|(name, value)| {
            let source = name.strip_prefix(MEMBER_PREFIX)?;
            let (limit, seen) = value.as_s().ok()?.split_once(':')?;
            let seen: Millis = seen.parse().ok()?;
            (now - seen <= MEMBER_TTL_MS).then_some((source.to_string(), limit.parse().ok()?))
        })
        .collect();
    members.sort();
    AccountMembers { members }
}

/// A stored item that does not have the expected shape.
fn malformed(message: String) -> Error {
    Error::Store {
        message,
        source: None,
    }
}

/// The lease as stored (after an update that returned every attribute).
fn lease_from_item(id: &str, item: &Item) -> Result<Lease> {
    let owner = item
        .get("owner")
        .and_then(|v| v.as_s().ok())
        .cloned()
        .ok_or_else(|| malformed(format!("the LEASE item of {id} has no owner")))?;
    Ok(Lease {
        source_id: id.to_string(),
        owner,
        fence: number(item, "fence", "LEASE", id)?,
        expires_at: number(item, "expires_at_ms", "LEASE", id)?,
        quiet_until: if item.contains_key("quiet_until") {
            number(item, "quiet_until", "LEASE", id)?
        } else {
            0
        },
    })
}

/// TTL of a day's quota item: the end of that UTC day plus three days, in seconds.
fn quota_expiry(day: &str) -> Result<i64> {
    let date = time::Date::parse(
        day,
        time::macros::format_description!("[year]-[month]-[day]"),
    )
    .map_err(|e| Error::store(format!("quota day {day:?} is not YYYY-MM-DD"), e))?;
    let day_end = date
        .next_day()
        .unwrap_or(date)
        .midnight()
        .assume_utc()
        .unix_timestamp();
    Ok(day_end + QUOTA_RETENTION_SECS)
}

/// Maps a failed transaction: a cancelled one whose conditions failed (or that raced
/// another transaction) is a lost race, `Error::Conflict`, described by the reason of
/// the first failed action (`reasons` is indexed like the transaction's actions).
fn transaction_error<R>(
    operation: String,
    reasons: &[String],
    err: SdkError<TransactWriteItemsError, R>,
) -> Error
where
    R: std::fmt::Debug + Send + Sync + 'static,
{
    if let Some(TransactWriteItemsError::TransactionCanceledException(cancelled)) =
        err.as_service_error()
    {
        let codes = cancelled.cancellation_reasons();
        let failed: Vec<&str> = codes
            .iter()
            .enumerate()
            .filter(|(_, r)| r.code() == Some("ConditionalCheckFailed"))
            .map(|(i, _)| {
                reasons
                    .get(i)
                    .map(String::as_str)
                    .filter(|r| !r.is_empty())
                    .unwrap_or("a condition failed")
            })
            .collect();
        if !failed.is_empty() {
            return Error::Conflict(failed.join("; "));
        }
        if codes
            .iter()
            .any(|r| r.code() == Some("TransactionConflict"))
        {
            return Error::Conflict(format!(
                "{operation}: a concurrent transaction changed the same items"
            ));
        }
        // Without reasons (some emulators omit them) a cancellation can only come from
        // the conditions.
        if codes.is_empty() {
            return Error::Conflict(format!("{operation}: a condition failed"));
        }
    }
    Error::store(operation, err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_items_expire_three_days_after_their_day() {
        // 2024-03-01T00:00:00Z + 3 days.
        assert_eq!(
            quota_expiry("2024-02-29").unwrap(),
            1_709_251_200 + 3 * 86_400
        );
        assert!(quota_expiry("29/02/2024").is_err());
    }

    #[test]
    fn keys_name_the_source_partition() {
        let key = DynamoStore::key("abc", SK_STATE);
        assert_eq!(key[PK], s("SOURCE#abc"));
        assert_eq!(key[SK], s("STATE"));
    }
}
