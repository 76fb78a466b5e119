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
        let mut item = Self::key(id, crate::store::digest_shard_key(list, page));
        item.insert(DIGESTS.into(), s(shard));
        let put = Put::builder()
            .table_name(&self.change_table)
            .set_item(Some(item))
            .build()
            .map_err(|e| Error::store("building the digest shard put", e))?;
        let items =
            self.digest_fence(id, lease, [TransactWriteItem::builder().put(put).build()])?;
        self.client
            .transact_write_items()
            .set_transact_items(Some(items))
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
            let deletes = chunk
                .iter()
                .map(|page| {
                    Delete::builder()
                        .table_name(&self.change_table)
                        .set_key(Some(Self::key(
                            id,
                            crate::store::digest_shard_key(list, *page),
                        )))
                        .build()
                        .map(|delete| TransactWriteItem::builder().delete(delete).build())
                        .map_err(|e| Error::store("building the digest shard delete", e))
                })
                .collect::<Result<Vec<_>>>()?;
            let items = self.digest_fence(id, lease, deletes)?;
            let request = self
                .client
                .transact_write_items()
                .set_transact_items(Some(items));
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
            .query_source(&self.change_table, id, Some(&prefix), false)
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
            .query_source(&self.change_table, id, None, true)
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
}
