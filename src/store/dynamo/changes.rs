//! The change table: every call the DynamoDB store makes on it, and nothing else.
//!
//! The change-detection digests (see [`crate::domain::changes`]) live in their own table
//! (`CHANGE_TABLE`), keyed like the state table (`pk = "SOURCE#<id>"`,
//! `sk = "DIGEST#<list>#<page, 5 digits>"`, one attribute `digests`), so the fan-out
//! dispatch's Scan of the state table never reads (nor pays for) them. Writes stay fenced
//! by the source's lease and `CONFIG` in the state table: each is one transaction whose
//! `ConditionCheck`s name the state table ([`DynamoStore::digest_fence`]) and whose
//! `Put`/`Delete` name the change table; a transaction may span tables.
//!
//! Only this file touches the change table (tests/iam_actions.rs checks that the
//! template grants that table exactly the actions called here: `PutItem` and
//! `DeleteItem` as parts of `TransactWriteItems`, `Query`, `BatchWriteItem`).

use aws_sdk_dynamodb::types::{AttributeValue, Delete, Put, TransactWriteItem};

use super::{DynamoStore, Item, PK, SK, s, transaction_error};
use crate::domain::state::Lease;
use crate::error::{Error, Result};

/// The attribute holding a shard's encoded digests.
const DIGESTS: &str = "digests";

/// A transaction holds at most 100 actions: the fence's two checks and 98 deletes.
const DELETES_PER_TRANSACTION: usize = 98;

impl DynamoStore {
    /// Puts one digest shard into the change table, fenced by the source's lease and
    /// `CONFIG` in the state table.
    pub(super) async fn put_digest_shard(
        &self,
        id: &str,
        list: &str,
        page: u32,
        shard: &str,
        lease: &Lease,
    ) -> Result<()> {
        crate::store::check_digest_shard_size(id, list, page, shard)?;
        let [lease_held, config_exists] = self.digest_fence(id, lease)?;
        let mut item = Self::key(id, crate::store::digest_shard_key(list, page));
        item.insert(DIGESTS.into(), s(shard));
        let put = Put::builder()
            .table_name(&self.change_table)
            .set_item(Some(item))
            .build()
            .map_err(|e| Error::store("building the digest shard put", e))?;
        self.client
            .transact_write_items()
            .transact_items(
                TransactWriteItem::builder()
                    .condition_check(lease_held)
                    .build(),
            )
            .transact_items(
                TransactWriteItem::builder()
                    .condition_check(config_exists)
                    .build(),
            )
            .transact_items(TransactWriteItem::builder().put(put).build())
            .send()
            .await
            .map_err(|e| {
                transaction_error(
                    format!(
                        "DynamoDB TransactWriteItems saving digests of {id} (list {list}, page {page}) in {}",
                        self.change_table
                    ),
                    &[
                        format!("the lease of {id} (fence {}) was lost", lease.fence),
                        format!("source {id} was deleted"),
                        String::new(),
                    ],
                    e,
                )
            })?;
        Ok(())
    }

    /// Deletes digest shards `pages` of `list` from the change table, fenced like
    /// [`put_digest_shard`](Self::put_digest_shard), 98 to a transaction.
    pub(super) async fn remove_digest_shards(
        &self,
        id: &str,
        list: &str,
        pages: &[u32],
        lease: &Lease,
    ) -> Result<()> {
        for chunk in pages.chunks(DELETES_PER_TRANSACTION) {
            let [lease_held, config_exists] = self.digest_fence(id, lease)?;
            let mut request = self
                .client
                .transact_write_items()
                .transact_items(
                    TransactWriteItem::builder()
                        .condition_check(lease_held)
                        .build(),
                )
                .transact_items(
                    TransactWriteItem::builder()
                        .condition_check(config_exists)
                        .build(),
                );
            for page in chunk {
                let delete = Delete::builder()
                    .table_name(&self.change_table)
                    .set_key(Some(Self::key(
                        id,
                        crate::store::digest_shard_key(list, *page),
                    )))
                    .build()
                    .map_err(|e| Error::store("building the digest shard delete", e))?;
                request =
                    request.transact_items(TransactWriteItem::builder().delete(delete).build());
            }
            request.send().await.map_err(|e| {
                transaction_error(
                    format!(
                        "DynamoDB TransactWriteItems deleting digests of {id} (list {list}) in {}",
                        self.change_table
                    ),
                    &[
                        format!("the lease of {id} (fence {}) was lost", lease.fence),
                        format!("source {id} was deleted"),
                    ],
                    e,
                )
            })?;
        }
        Ok(())
    }

    /// Every shard of `list` of source `id` in the change table, in page order.
    pub(super) async fn query_digest_shards(
        &self,
        id: &str,
        list: &str,
    ) -> Result<Vec<(u32, String)>> {
        let prefix = crate::store::digest_list_prefix(list);
        let mut shards = self
            .query_changes(id, Some(&prefix))
            .await?
            .iter()
            .map(|item| {
                let key = match item.get(SK) {
                    Some(AttributeValue::S(key)) => key.clone(),
                    _ => String::new(),
                };
                let page = key
                    .strip_prefix(&prefix)
                    .and_then(|p| p.parse::<u32>().ok());
                match (page, item.get(DIGESTS)) {
                    (Some(page), Some(AttributeValue::S(shard))) => Ok((page, shard.clone())),
                    _ => Err(Error::Store {
                        message: format!(
                            "digest shard item {key} of {id} in {} is malformed",
                            self.change_table
                        ),
                        source: None,
                    }),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        shards.sort_by_key(|(page, _)| *page);
        Ok(shards)
    }

    /// Deletes every item of source `id` from the change table (all lists), unfenced:
    /// for `delete_source` after `CONFIG` is gone (no run can write any more), and for
    /// `create_source` before `CONFIG` exists (leftovers of an interrupted delete).
    pub(super) async fn purge_digests(&self, id: &str) -> Result<usize> {
        let keys: Vec<Item> = self
            .query_changes(id, None)
            .await?
            .into_iter()
            .map(|item| {
                item.into_iter()
                    .filter(|(name, _)| name == PK || name == SK)
                    .collect::<Item>()
            })
            .collect();
        let count = keys.len();
        self.batch_delete(&self.change_table, id, keys).await?;
        Ok(count)
    }

    /// The items of source `id` in the change table (all pages of the Query), only those
    /// whose sort key starts with `prefix` when given; keys only when `prefix` is `None`
    /// (the purge needs nothing else).
    async fn query_changes(&self, id: &str, prefix: Option<&str>) -> Result<Vec<Item>> {
        let mut items = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let mut query = self
                .client
                .query()
                .table_name(&self.change_table)
                .consistent_read(true)
                .expression_attribute_names("#pk", PK)
                .expression_attribute_names("#sk", SK)
                .expression_attribute_values(":pk", s(super::source_pk(id)))
                .set_exclusive_start_key(start.take());
            query = match prefix {
                Some(prefix) => query
                    .key_condition_expression("#pk = :pk AND begins_with(#sk, :prefix)")
                    .expression_attribute_values(":prefix", s(prefix)),
                None => query
                    .key_condition_expression("#pk = :pk")
                    .projection_expression("#pk, #sk"),
            };
            let out = query.send().await.map_err(|e| {
                Error::store(
                    format!("DynamoDB Query on {id} in {}", self.change_table),
                    e,
                )
            })?;
            start = out.last_evaluated_key;
            items.extend(out.items.unwrap_or_default());
            if start.is_none() {
                return Ok(items);
            }
        }
    }
}
