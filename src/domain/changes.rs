//! Change detection for Reporting API records (security tests and their recipients): a
//! record is forwarded when it first appears and each time it changes, never again while
//! it is unchanged.
//!
//! - A record's digest is the first 8 bytes of SHA-256 over its exact text as KnowBe4 sent
//!   it. Any change KnowBe4 makes to the text (a result, an escape, a key order) is a
//!   change: at worst a duplicate, never a loss. Two different texts share a digest with
//!   probability 2^-64.
//! - What is known of one list (the tests, or one test's recipients) is kept as a *log* of
//!   shards, each an item numbered by a sequence that only grows: a page's shard holds only
//!   the records of that page that were new or changed ([`PageChanges::delta`]), written
//!   after the destination accepted them; loading applies the shards in sequence order, so
//!   the latest digest of a record wins whatever page it was on (a record that moved
//!   between pages, a list whose order shifts, a change and its change back — A → B → A —
//!   are all recognised; nothing depends on page order or page size).
//! - At the end of a walk, a log longer than it needs to be is *compacted*
//!   ([`compaction`]): every known entry is written again, 500 per shard, at the next
//!   sequence numbers, then the older shards are deleted. A crash between the two leaves
//!   both, and the newer ones win, so compaction cannot lose or resurrect anything.
//! - A shard holds at most [`SHARD_RECORDS`] = 500 entries: 500 × 16 bytes = 8,000 bytes of
//!   digests (10,668 in base64), so a 50,000-recipient test takes 100 small items after
//!   compaction, each far within DynamoDB's 400 KB item limit. A poll holds one list's
//!   entries in memory at a time (16 bytes each, plus the map's overhead: a few MB for
//!   50,000).
//! - Entries of a record that left the list (a deleted recipient) are kept: they cost 16
//!   bytes and keep a record that comes back from being sent again.

use std::collections::HashMap;

use base64::Engine;
use sha2::{Digest as _, Sha256};

/// Entries per shard (and per shard written by a compaction).
pub const SHARD_RECORDS: usize = 500;
/// Bytes per shard entry of a digest log: the record id and its digest, 8 bytes each.
pub const ENTRY_BYTES: usize = 16;
/// Shards a log may have beyond the fewest that hold its entries before it is compacted.
pub const COMPACT_SLACK: usize = 2;

/// The digest of a record's exact text.
pub type Digest = u64;

/// The digest of `text`, a record exactly as KnowBe4 sent it.
pub fn digest(text: &str) -> Digest {
    let hash = Sha256::digest(text.as_bytes());
    u64::from_le_bytes(hash[..8].try_into().expect("8 bytes"))
}

/// The key of a record that has no usable id (a test without a numeric `pst_id`, a
/// recipient without a numeric `recipient_id`): its digest with the top bit set, so it
/// is forwarded once per distinct text and never collides with a real id (KnowBe4's ids
/// are below 2^63).
pub fn key_without_id(digest: Digest) -> u64 {
    digest | (1 << 63)
}

/// A value stored per record id in a shard: fixed width, little endian.
pub trait Entry: Copy + PartialEq + std::fmt::Debug {
    /// Bytes of the value (the id takes 8 more).
    const BYTES: usize;
    /// Appends the value's bytes.
    fn put(&self, out: &mut Vec<u8>);
    /// The value back from exactly [`BYTES`](Self::BYTES) bytes.
    fn get(bytes: &[u8]) -> Self;
}

impl Entry for Digest {
    const BYTES: usize = 8;
    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn get(bytes: &[u8]) -> Self {
        u64::from_le_bytes(bytes.try_into().expect("8 bytes"))
    }
}

/// One stored shard of a log: `(record id, value)` in id order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shard<V> {
    /// Entries in id order.
    pub entries: Vec<(u64, V)>,
}

impl<V> Default for Shard<V> {
    fn default() -> Self {
        Shard {
            entries: Vec::new(),
        }
    }
}

/// A shard of record digests.
pub type DigestShard = Shard<Digest>;

/// A stored shard that cannot be read back.
#[derive(Debug, thiserror::Error)]
#[error("a stored change-state shard is unreadable: {0}")]
pub struct ShardError(String);

impl<V: Entry> Shard<V> {
    /// The stored form: base64 of the entries (8-byte id, then the value; little endian).
    pub fn encode(&self) -> String {
        let mut bytes = Vec::with_capacity(self.entries.len() * (8 + V::BYTES));
        for (id, value) in &self.entries {
            bytes.extend_from_slice(&id.to_le_bytes());
            value.put(&mut bytes);
        }
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    /// Back from [`encode`](Self::encode).
    pub fn decode(text: &str) -> Result<Self, ShardError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|e| ShardError(e.to_string()))?;
        let width = 8 + V::BYTES;
        if bytes.len() % width != 0 {
            return Err(ShardError(format!(
                "{} bytes is not a whole number of entries",
                bytes.len()
            )));
        }
        let entries = bytes
            .chunks_exact(width)
            .map(|c| {
                (
                    u64::from_le_bytes(c[..8].try_into().expect("8 bytes")),
                    V::get(&c[8..]),
                )
            })
            .collect();
        Ok(Shard { entries })
    }
}

/// Everything known of one list: the latest value per record id, and the sequence
/// numbers of the shards it was loaded from (for the next write and for compaction).
#[derive(Clone, Debug)]
pub struct Latest<V> {
    by_id: HashMap<u64, V>,
    /// Sequence numbers of the stored shards, ascending.
    stored: Vec<u32>,
}

impl<V> Default for Latest<V> {
    fn default() -> Self {
        Latest {
            by_id: HashMap::new(),
            stored: Vec::new(),
        }
    }
}

/// Every digest known for one list.
pub type KnownDigests = Latest<Digest>;

impl<V: Entry> Latest<V> {
    /// The log `shards` (any order) applied in sequence order: the latest value wins.
    pub fn from_log(mut shards: Vec<(u32, Shard<V>)>) -> Self {
        shards.sort_by_key(|(seq, _)| *seq);
        let mut by_id = HashMap::new();
        for (_, shard) in &shards {
            by_id.extend(shard.entries.iter().copied());
        }
        Latest {
            by_id,
            stored: shards.into_iter().map(|(seq, _)| seq).collect(),
        }
    }

    /// Records known.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether none is known.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The value known for `id`.
    pub fn get(&self, id: u64) -> Option<V> {
        self.by_id.get(&id).copied()
    }

    /// Every `(id, value)` known, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, V)> + '_ {
        self.by_id.iter().map(|(id, v)| (*id, *v))
    }

    /// The sequence number the next shard is written at; `None` when none is left.
    pub fn next_seq(&self) -> Option<u32> {
        // `None` past u32::MAX (a stray shard so numbered): never overwrite or wrap.
        self.stored
            .last()
            .map_or(Some(1), |last| last.checked_add(1))
    }

    /// Shards stored.
    pub fn shards(&self) -> usize {
        self.stored.len()
    }

    /// Records, once `shard` was saved at `seq`, what it holds.
    pub fn remember(&mut self, seq: u32, shard: &Shard<V>) {
        self.by_id.extend(shard.entries.iter().copied());
        self.stored.push(seq);
    }

    /// Forgets the shards at `seqs` (deleted), keeping the values.
    pub fn forget_shards(&mut self, seqs: &[u32]) {
        self.stored.retain(|seq| !seqs.contains(seq));
    }
}

/// Shards to write, each with its sequence number.
pub type Numbered<V> = Vec<(u32, Shard<V>)>;

/// A compaction of `known`: the shards to write (at [`Latest::next_seq`] onward) and the
/// sequence numbers to delete after they are written; `None` when the log is short
/// enough (at most [`COMPACT_SLACK`] shards more than the fewest that hold its entries).
pub fn compaction<V: Entry>(known: &Latest<V>) -> Option<(Numbered<V>, Vec<u32>)> {
    let fewest = known.len().div_ceil(SHARD_RECORDS);
    if known.shards() <= fewest + COMPACT_SLACK {
        return None;
    }
    let mut entries: Vec<(u64, V)> = known.iter().collect();
    entries.sort_unstable_by_key(|(id, _)| *id);
    let first = known.next_seq()?;
    let write = entries
        .chunks(SHARD_RECORDS)
        .enumerate()
        .map(|(i, chunk)| {
            Some((
                first.checked_add(i as u32)?,
                Shard {
                    entries: chunk.to_vec(),
                },
            ))
        })
        .collect::<Option<Vec<_>>>()?;
    Some((write, known.stored.clone()))
}

/// What one page of records means: which to forward (their indices on the page) and the
/// shard to save once the destination accepted them.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PageChanges {
    /// Indices (on the page) of records that are new or changed.
    pub forward: Vec<usize>,
    /// The digests of the forwarded records, to save after the forward (empty when
    /// nothing changed: nothing to write).
    pub delta: DigestShard,
    /// Ids on the page not seen before in the walk `seen` describes.
    pub new_in_walk: usize,
}

/// The changes on one page of `(record id, exact text)` against what is `known`; `seen`
/// collects the ids of the walk so far (a page with no new id tells the walk the server
/// is repeating itself). A record listed twice on a page or in a walk (which a list
/// shifting under the reader can do) is forwarded once at most, given the caller
/// [remembers](Latest::remember) each page's delta before the next page.
pub fn page_changes<'a>(
    known: &KnownDigests,
    seen: &mut std::collections::HashSet<u64>,
    records: impl IntoIterator<Item = (u64, &'a str)>,
) -> PageChanges {
    let mut forward = Vec::new();
    let mut entries: Vec<(u64, Digest)> = Vec::new();
    let mut new_in_walk = 0;
    let mut on_page = std::collections::HashSet::new();
    for (index, (id, text)) in records.into_iter().enumerate() {
        if seen.insert(id) {
            new_in_walk += 1;
        }
        if !on_page.insert(id) {
            // Listed twice on the page: the first copy counts.
            continue;
        }
        let d = digest(text);
        if known.get(id) != Some(d) {
            forward.push(index);
            entries.push((id, d));
        }
    }
    entries.sort_unstable();
    PageChanges {
        forward,
        delta: Shard { entries },
        new_in_walk,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn recipient(id: u64, opened: Option<&str>) -> String {
        format!(
            r#"{{"recipient_id":{id},"pst_id":1,"user":{{"email":"u{id}@example.com"}},"opened_at":{},"template":{{"name":"A \u0026 B"}}}}"#,
            opened.map_or("null".to_string(), |o| format!("\"{o}\""))
        )
    }

    /// Runs one page through `known` as the stream does: changes, then the delta saved
    /// (at the next sequence number) and remembered. Returns the forwarded ids.
    fn read_page(
        known: &mut KnownDigests,
        seen: &mut HashSet<u64>,
        page: &[(u64, String)],
    ) -> Vec<u64> {
        let changes = page_changes(known, seen, page.iter().map(|(id, t)| (*id, t.as_str())));
        if !changes.delta.entries.is_empty() {
            let seq = known.next_seq().unwrap();
            known.remember(seq, &changes.delta);
        }
        changes.forward.iter().map(|i| page[*i].0).collect()
    }

    #[test]
    fn new_and_changed_records_are_forwarded_unchanged_ones_are_not() {
        let first: Vec<(u64, String)> = (1..=3).map(|id| (id, recipient(id, None))).collect();
        let mut known = KnownDigests::default();
        assert_eq!(
            read_page(&mut known, &mut HashSet::new(), &first),
            [1, 2, 3]
        );
        assert_eq!(known.shards(), 1);
        assert!(read_page(&mut known, &mut HashSet::new(), &first).is_empty());
        assert_eq!(known.shards(), 1, "an unchanged page writes nothing");
        let mut second = first.clone();
        second[1].1 = recipient(2, Some("2026-12-06T10:00:00.000Z"));
        assert_eq!(read_page(&mut known, &mut HashSet::new(), &second), [2]);
    }

    /// The review's loss case: a record changes A → B on one page, then back to A on
    /// another. Page-indexed shards compared B's change back with a stale A and dropped
    /// it; the log's latest entry wins.
    #[test]
    fn a_change_and_its_change_back_are_both_forwarded_whatever_the_pages() {
        let a = recipient(2, None);
        let b = recipient(2, Some("2026-12-06T10:00:00.000Z"));
        let mut known = KnownDigests::default();
        let page1 = vec![(1, recipient(1, None)), (2, a.clone())];
        let page2 = vec![(2, b.clone()), (3, recipient(3, None))];
        assert_eq!(read_page(&mut known, &mut HashSet::new(), &page1), [1, 2]);
        assert_eq!(
            read_page(&mut known, &mut HashSet::new(), &page2),
            [2, 3],
            "A → B"
        );
        assert_eq!(
            read_page(&mut known, &mut HashSet::new(), &page1),
            [2],
            "B → A"
        );
        // Reloaded from the stored log (any order), the latest still wins.
        let mut log = Vec::new();
        let mut replay = KnownDigests::default();
        for page in [&page1, &page2, &page1] {
            let changes = page_changes(
                &replay,
                &mut HashSet::new(),
                page.iter().map(|(id, t)| (*id, t.as_str())),
            );
            let seq = replay.next_seq().unwrap();
            replay.remember(seq, &changes.delta);
            log.push((seq, changes.delta));
        }
        log.reverse();
        let reloaded = KnownDigests::from_log(log);
        assert_eq!(reloaded.get(2), Some(digest(&a)));
        assert_eq!(reloaded.next_seq(), Some(4));
    }

    #[test]
    fn a_record_that_moved_pages_within_a_walk_is_forwarded_once() {
        let texts: Vec<(u64, String)> = (1..=4).map(|id| (id, recipient(id, None))).collect();
        let mut known = KnownDigests::default();
        let mut seen = HashSet::new();
        assert_eq!(read_page(&mut known, &mut seen, &texts[..2]), [1, 2]);
        // Something was inserted before: record 2 slid onto page 2.
        assert_eq!(read_page(&mut known, &mut seen, &texts[1..3]), [3]);
    }

    #[test]
    fn a_page_with_no_new_id_is_visible_to_the_walk() {
        let page: Vec<(u64, String)> = (1..=3).map(|id| (id, recipient(id, None))).collect();
        let known = KnownDigests::default();
        let mut seen = HashSet::new();
        let first = page_changes(
            &known,
            &mut seen,
            page.iter().map(|(id, t)| (*id, t.as_str())),
        );
        assert_eq!(first.new_in_walk, 3);
        let repeated = page_changes(
            &known,
            &mut seen,
            page.iter().map(|(id, t)| (*id, t.as_str())),
        );
        assert_eq!(repeated.new_in_walk, 0);
    }

    #[test]
    fn a_record_listed_twice_on_a_page_is_forwarded_once() {
        let text = recipient(7, None);
        let page = page_changes(
            &KnownDigests::default(),
            &mut HashSet::new(),
            [(7, text.as_str()), (7, text.as_str())],
        );
        assert_eq!(page.forward, [0]);
        assert_eq!(page.delta.entries.len(), 1);
    }

    #[test]
    fn records_without_an_id_are_keyed_apart_from_real_ids() {
        let key = key_without_id(digest("{}"));
        assert!(key >= 1 << 63);
        assert_eq!(key, key_without_id(digest("{}")));
        assert_ne!(key, key_without_id(digest("{\"a\":1}")));
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

    /// Compaction rewrites the latest entries 500 to a shard past every old shard, and
    /// names every old one for deletion; the result, alone or next to leftovers of a
    /// crash, loads to the same values.
    #[test]
    fn compaction_keeps_the_latest_values_in_the_fewest_shards() {
        let mut known = KnownDigests::default();
        for round in 0..3u64 {
            for page in 0..4u64 {
                let records: Vec<(u64, String)> = (0..300u64)
                    .map(|i| {
                        let id = page * 300 + i;
                        (id, format!("{id}-{round}"))
                    })
                    .collect();
                read_page(&mut known, &mut HashSet::new(), &records);
            }
        }
        assert_eq!((known.len(), known.shards()), (1_200, 12));
        let (write, delete) = compaction(&known).expect("12 shards for 1,200 entries");
        assert_eq!(write.len(), 3);
        assert_eq!(write[0].0, 13);
        assert_eq!(delete, (1..=12).collect::<Vec<_>>());
        let compacted = KnownDigests::from_log(write.clone());
        assert_eq!(compacted.len(), 1_200);
        assert!(known.iter().all(|(id, d)| compacted.get(id) == Some(d)));
        assert!(compaction(&compacted).is_none());
        // A stray shard numbered u32::MAX: no next number, no compaction, nothing wraps.
        let stray = KnownDigests::from_log(vec![
            (
                u32::MAX,
                DigestShard {
                    entries: vec![(1, 1)],
                },
            ),
            (
                1,
                DigestShard {
                    entries: vec![(2, 2)],
                },
            ),
            (
                2,
                DigestShard {
                    entries: vec![(3, 3)],
                },
            ),
            (
                3,
                DigestShard {
                    entries: vec![(4, 4)],
                },
            ),
        ]);
        assert_eq!(stray.next_seq(), None);
        assert!(compaction(&stray).is_none());
        // A crash after writing, before deleting: old and new together still agree.
        let mut both: Vec<(u32, DigestShard)> = write;
        let stale = DigestShard {
            entries: vec![(5, digest("5-0"))],
        };
        both.push((1, stale));
        assert_eq!(KnownDigests::from_log(both).get(5), Some(digest("5-2")));
    }

    /// 50,000 recipients: 100 shards of 500 after compaction, each far within DynamoDB's
    /// 400 KB item limit (a shard item also holds its keys: under 1 KB more).
    #[test]
    fn a_fifty_thousand_recipient_test_fits_in_items_well_under_the_limit() {
        let mut known = KnownDigests::default();
        let mut largest = 0;
        for page in 0..100u64 {
            let texts: Vec<(u64, String)> = (0..SHARD_RECORDS as u64)
                .map(|i| (page * 1000 + i, recipient(page * 1000 + i, None)))
                .collect();
            let changes = page_changes(
                &known,
                &mut HashSet::new(),
                texts.iter().map(|(id, t)| (*id, t.as_str())),
            );
            largest = largest.max(changes.delta.encode().len());
            let seq = known.next_seq().unwrap();
            known.remember(seq, &changes.delta);
        }
        assert_eq!(largest, 10_668, "500 entries of 16 bytes, base64");
        assert!(largest + 1_024 < 400 * 1024);
        assert_eq!(known.len(), 50_000);
        assert!(
            compaction(&known).is_none(),
            "100 full shards are already the fewest"
        );
    }
}
