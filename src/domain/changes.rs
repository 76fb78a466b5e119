//! Change detection for Reporting API records (security tests and their recipients): a
//! record is forwarded when it first appears and each time it changes, never again while
//! it is unchanged. Pure logic, not yet driven by a run (the phishing stream is issue 12's
//! step 4).
//!
//! - A record's digest is the first 8 bytes of SHA-256 over its exact text as KnowBe4 sent
//!   it. Any change KnowBe4 makes to the text (a result, an escape, a key order) is a
//!   change: at worst a duplicate, never a loss. Two different texts share a digest with
//!   probability 2^-64.
//! - Digests are kept per test in shards, one per page of the listing
//!   ([`SHARD_RECORDS`] = 500 records): a shard is at most 500 × 16 bytes = 8,000 bytes
//!   (10,668 in base64), so a 50,000-recipient test takes 100 small items, each far
//!   within DynamoDB's 400 KB item limit (and the local file's whole state stays a few
//!   MB). A poll loads all shards of a test into one [`KnownDigests`] (16 bytes per
//!   recipient in memory: 800 KB for 50,000), so a record that moved to another page
//!   is still recognised.
//! - A page's shard is saved right after the destination accepted the page's changed
//!   records, so a crash between forwarding and saving repeats at most that page's batch.
//!   Rewriting a page's shard with exactly the records seen on it drops what moved away.

use std::collections::HashMap;

use base64::Engine;
use sha2::{Digest as _, Sha256};

/// Records per shard: one page of the Reporting API's listing (`per_page=500`).
pub const SHARD_RECORDS: usize = 500;
/// Bytes per shard entry: the record id and its digest, 8 bytes each.
pub const ENTRY_BYTES: usize = 16;

/// The digest of a record's exact text.
pub type Digest = u64;

/// The digest of `text`, a record exactly as KnowBe4 sent it.
pub fn digest(text: &str) -> Digest {
    let hash = Sha256::digest(text.as_bytes());
    u64::from_le_bytes(hash[..8].try_into().expect("8 bytes"))
}

/// The digests of one page of a listing: `(record id, digest)`, in id order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DigestShard {
    /// Entries in id order.
    pub entries: Vec<(u64, Digest)>,
}

/// A stored shard that cannot be read back.
#[derive(Debug, thiserror::Error)]
#[error("a stored digest shard is unreadable: {0}")]
pub struct ShardError(String);

impl DigestShard {
    /// The stored form: base64 of 16 bytes per entry (id, digest; little endian).
    pub fn encode(&self) -> String {
        let mut bytes = Vec::with_capacity(self.entries.len() * ENTRY_BYTES);
        for (id, digest) in &self.entries {
            bytes.extend_from_slice(&id.to_le_bytes());
            bytes.extend_from_slice(&digest.to_le_bytes());
        }
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    /// Back from [`encode`](Self::encode).
    pub fn decode(text: &str) -> Result<DigestShard, ShardError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|e| ShardError(e.to_string()))?;
        if bytes.len() % ENTRY_BYTES != 0 {
            return Err(ShardError(format!(
                "{} bytes is not a whole number of entries",
                bytes.len()
            )));
        }
        let entries = bytes
            .chunks_exact(ENTRY_BYTES)
            .map(|c| {
                (
                    u64::from_le_bytes(c[..8].try_into().expect("8 bytes")),
                    u64::from_le_bytes(c[8..].try_into().expect("8 bytes")),
                )
            })
            .collect();
        Ok(DigestShard { entries })
    }
}

/// Every digest known for one test (all its shards), by record id.
#[derive(Clone, Debug, Default)]
pub struct KnownDigests {
    by_id: HashMap<u64, Digest>,
}

impl KnownDigests {
    /// The digests of `shards` merged; for an id in several shards (a record that moved
    /// between pages before a crash), any of them: a wrong pick only re-sends it once.
    pub fn from_shards<'a>(shards: impl IntoIterator<Item = &'a DigestShard>) -> Self {
        let mut by_id = HashMap::new();
        for shard in shards {
            by_id.extend(shard.entries.iter().copied());
        }
        KnownDigests { by_id }
    }

    /// Records known.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether none is known (a test never read).
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Whether `id` with `digest` must be forwarded: new, or changed.
    pub fn is_news(&self, id: u64, digest: Digest) -> bool {
        self.by_id.get(&id) != Some(&digest)
    }

    /// Records, once `shard` was saved, what it holds.
    pub fn remember(&mut self, shard: &DigestShard) {
        self.by_id.extend(shard.entries.iter().copied());
    }
}

/// What one page of records means: which to forward (their indices on the page) and the
/// shard to save once the destination accepted them.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PageChanges {
    /// Indices (on the page) of records that are new or changed.
    pub forward: Vec<usize>,
    /// The page's digests, to save after the forward.
    pub shard: DigestShard,
}

/// The changes on one page of `(record id, exact text)` against what is `known`. A record
/// listed twice on a page (which a list shifting under the reader can do) is forwarded
/// once at most.
pub fn page_changes<'a>(
    known: &KnownDigests,
    records: impl IntoIterator<Item = (u64, &'a str)>,
) -> PageChanges {
    let mut forward = Vec::new();
    let mut entries: Vec<(u64, Digest)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (index, (id, text)) in records.into_iter().enumerate() {
        let d = digest(text);
        if !seen.insert((id, d)) {
            continue;
        }
        if known.is_news(id, d) {
            forward.push(index);
        }
        entries.push((id, d));
    }
    entries.sort_unstable();
    entries.dedup_by_key(|(id, _)| *id);
    PageChanges {
        forward,
        shard: DigestShard { entries },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipient(id: u64, opened: Option<&str>) -> String {
        format!(
            r#"{{"recipient_id":{id},"pst_id":1,"user":{{"email":"u{id}@example.com"}},"opened_at":{},"template":{{"name":"A \u0026 B"}}}}"#,
            opened.map_or("null".to_string(), |o| format!("\"{o}\""))
        )
    }

    #[test]
    fn new_and_changed_records_are_forwarded_unchanged_ones_are_not() {
        let first: Vec<String> = (1..=3).map(|id| recipient(id, None)).collect();
        let mut known = KnownDigests::default();
        let page = page_changes(
            &known,
            first
                .iter()
                .enumerate()
                .map(|(i, t)| (i as u64 + 1, t.as_str())),
        );
        assert_eq!(page.forward, [0, 1, 2], "all new");
        known.remember(&page.shard);

        let again = page_changes(
            &known,
            first
                .iter()
                .enumerate()
                .map(|(i, t)| (i as u64 + 1, t.as_str())),
        );
        assert!(again.forward.is_empty(), "unchanged: nothing forwarded");

        let mut second = first.clone();
        second[1] = recipient(2, Some("2026-12-06T10:00:00.000Z"));
        let changed = page_changes(
            &known,
            second
                .iter()
                .enumerate()
                .map(|(i, t)| (i as u64 + 1, t.as_str())),
        );
        assert_eq!(changed.forward, [1], "only the opened one");
    }

    #[test]
    fn a_record_that_moved_to_another_page_is_still_known() {
        let texts: Vec<String> = (1..=4).map(|id| recipient(id, None)).collect();
        let page1 = page_changes(
            &KnownDigests::default(),
            [(1, texts[0].as_str()), (2, texts[1].as_str())],
        );
        let page2 = page_changes(
            &KnownDigests::default(),
            [(3, texts[2].as_str()), (4, texts[3].as_str())],
        );
        let known = KnownDigests::from_shards([&page1.shard, &page2.shard]);
        // Record 2 slid to page 2 (something before it was removed): not news.
        let shifted = page_changes(&known, [(2, texts[1].as_str()), (3, texts[2].as_str())]);
        assert!(shifted.forward.is_empty());
    }

    #[test]
    fn a_record_listed_twice_on_a_page_is_forwarded_once() {
        let text = recipient(7, None);
        let page = page_changes(
            &KnownDigests::default(),
            [(7, text.as_str()), (7, text.as_str())],
        );
        assert_eq!(page.forward, [0]);
        assert_eq!(page.shard.entries.len(), 1);
    }

    #[test]
    fn shards_round_trip_and_refuse_garbage() {
        let shard = DigestShard {
            entries: vec![(1, 2), (u64::MAX, 3), (81_000_000, digest("x"))],
        };
        assert_eq!(DigestShard::decode(&shard.encode()).unwrap(), shard);
        assert!(DigestShard::decode("not base64!").is_err());
        assert!(DigestShard::decode("AAAA").is_err(), "3 bytes is no entry");
    }

    /// 50,000 recipients: 100 shards of 500, each far within DynamoDB's 400 KB item
    /// limit (a shard item also holds its keys and a version: under 1 KB more).
    #[test]
    fn a_fifty_thousand_recipient_test_fits_in_items_well_under_the_limit() {
        let known = KnownDigests::default();
        let mut largest = 0;
        let mut shards = Vec::new();
        for page in 0..100u64 {
            let texts: Vec<String> = (0..SHARD_RECORDS as u64)
                .map(|i| recipient(page * 1000 + i, None))
                .collect();
            let changes = page_changes(
                &known,
                texts
                    .iter()
                    .enumerate()
                    .map(|(i, t)| (page * 1000 + i as u64, t.as_str())),
            );
            largest = largest.max(changes.shard.encode().len());
            shards.push(changes.shard);
        }
        assert_eq!(largest, 10_668, "500 entries of 16 bytes, base64");
        assert!(largest + 1_024 < 400 * 1024);
        assert_eq!(KnownDigests::from_shards(&shards).len(), 50_000);
    }
}
