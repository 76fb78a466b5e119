//! Which phishing security tests a poll reads the recipients of, and when a test stops
//! being polled. Pure logic; the phishing stream (`crate::run::phishing`) drives it.
//!
//! Every poll (every `phishingPollInterval` hours) reads the whole list of security tests
//! (one request per 500 tests) and forwards each test that is new or changed. A test's
//! counts (`delivered_count`, `opened_count`, `clicked_count`, `reported_count`, ...) move
//! whenever one of its recipients gets a result, so a changed test object is the signal
//! that its recipients changed. The recipients of a test are read when:
//! 1. the test is not final (its status is neither `Closed` nor `Error`), or
//! 2. the test object changed since the last poll (a late result moved a count), or
//! 3. it became final, or last changed, less than [`QUIET_AFTER_FINAL_MS`] (7 days) ago,
//!    or
//! 4. its recipients were last read [`SETTLED_RECHECK_MS`] (7 days) ago or longer.
//!
//! A test final and unchanged for 7 days is *settled*: only rule 4 reads it. The bound for
//! a late change of a settled test: one that moves a count is caught at the next poll
//! (rule 2); one that moves no count (a recipient's `ip` or `browser` filled in later) is
//! caught within 7 days plus one poll interval (rule 4).

/// How long after a test became final (or last changed) its recipients are still read
/// every poll.
pub const QUIET_AFTER_FINAL_MS: i64 = 7 * 86_400_000;
/// How often a settled test's recipients are read anyway, to catch changes that move no
/// count.
pub const SETTLED_RECHECK_MS: i64 = 7 * 86_400_000;

/// Whether a test's status is final: no more e-mails go out.
pub fn is_final(status: &str) -> bool {
    matches!(status, "Closed" | "Error")
}

/// What is remembered of one test between polls (Unix milliseconds). Kept in the change
/// store as a log of shards (list [`TRACKS_LIST`], 64 bytes a test with its id: an account
/// with 10,000 tests has 20 items of 43 KB), not in the source's state item, so no number of tests can
/// push that item past DynamoDB's 400 KB and stop the user-event checkpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TestTrack {
    /// When the test was first seen final; `None` while it is not.
    pub final_since: Option<i64>,
    /// When the test object last changed (or first appeared).
    pub last_changed: i64,
    /// When its recipients were last read completely; `None` if never.
    pub recipients_read: Option<i64>,
    /// The digest of the test object when its recipients could not be read for a reason
    /// that repeating the same requests cannot change (a malformed or oversized answer, a
    /// list that does not end, a 4xx): not read again until the test object changes or
    /// [`STUCK_RECHECK_MS`] passed. 0: none.
    pub stuck_at: u64,
    /// When it got stuck (ms); 0: not stuck.
    pub stuck_since: i64,
    /// The poll (its start, ms) that queued the test's recipients to be read; 0: none.
    /// Kept in the track so a poll continued by a later run still knows what it queued.
    pub queued_for: i64,
    /// Runs in a row in which reading its recipients failed on KnowBe4's transient
    /// answers (5xx, 408, transport) while the account's tests list was served: the
    /// test's own failures, not an outage's. Read after the other tests; set aside like a
    /// stuck test at [`TEST_FAILURES`]. 0 once its recipients are read.
    pub failures: u32,
}

/// Runs in a row a test's recipients may fail on transient answers (each after its
/// tries) before the test is set aside like a stuck one.
pub const TEST_FAILURES: u32 = 3;

/// How long a stuck test waits before its recipients are asked for again although its
/// object did not change: a day (an answer that was wrong for a while — a maintenance
/// page, a short-lived 404 — does not hide the test's recipients for good; a test whose
/// answer stays wrong costs one request a day).
pub const STUCK_RECHECK_MS: i64 = 86_400_000;

/// The change-store list the tests' tracks are kept under.
pub const TRACKS_LIST: &str = "tracks";

impl crate::domain::changes::Entry for TestTrack {
    const BYTES: usize = 56;
    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.final_since.unwrap_or(i64::MIN).to_le_bytes());
        out.extend_from_slice(&self.last_changed.to_le_bytes());
        out.extend_from_slice(&self.recipients_read.unwrap_or(i64::MIN).to_le_bytes());
        out.extend_from_slice(&self.stuck_at.to_le_bytes());
        out.extend_from_slice(&self.stuck_since.to_le_bytes());
        out.extend_from_slice(&self.queued_for.to_le_bytes());
        out.extend_from_slice(&u64::from(self.failures).to_le_bytes());
    }
    fn get(bytes: &[u8]) -> Self {
        let word = |i: usize| i64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8"));
        let optional = |v: i64| (v != i64::MIN).then_some(v);
        TestTrack {
            final_since: optional(word(0)),
            last_changed: word(1),
            recipients_read: optional(word(2)),
            stuck_at: word(3) as u64,
            stuck_since: word(4),
            queued_for: word(5),
            failures: u32::try_from(word(6)).unwrap_or(u32::MAX),
        }
    }
}

impl TestTrack {
    /// The track after a poll saw the test with `status`, `changed` (its object is new or
    /// differs from the last poll's) at `now`.
    pub fn observe(self, status: &str, changed: bool, now: i64) -> TestTrack {
        TestTrack {
            final_since: match (is_final(status), self.final_since) {
                (false, _) => None,
                (true, Some(since)) => Some(since),
                (true, None) => Some(now),
            },
            last_changed: if changed { now } else { self.last_changed },
            recipients_read: self.recipients_read,
            stuck_at: self.stuck_at,
            stuck_since: self.stuck_since,
            queued_for: self.queued_for,
            failures: self.failures,
        }
    }

    /// Whether this poll reads the test's recipients (rules 1 to 4 of the module docs),
    /// given the track as [`observe`](Self::observe) left it.
    pub fn read_recipients(&self, changed: bool, now: i64) -> bool {
        let Some(final_since) = self.final_since else {
            return true;
        };
        let Some(read) = self.recipients_read else {
            return true;
        };
        changed
            || now - final_since.max(self.last_changed) < QUIET_AFTER_FINAL_MS
            || now - read >= SETTLED_RECHECK_MS
    }
}

/// Where a poll that stopped early inside the tests list goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ListAt {
    /// The next page to read.
    pub page: u32,
    /// The page size the walk used.
    pub per_page: u32,
    /// Records the walk received before (its bound counts across runs).
    #[serde(default)]
    pub received: u64,
}

/// Where a poll that stopped early inside a test's recipients goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Resume {
    /// The test.
    pub pst_id: u64,
    /// The next page of its recipients to read.
    pub page: u32,
    /// The page size the walk used (pages of another size do not line up).
    pub per_page: u32,
    /// Records the walk received before (its bound counts across runs).
    #[serde(default)]
    pub received: u64,
}

/// What the phishing stream keeps in the source's state document, apart from the change
/// store (digests and tests' tracks, their own items): when it polled and is due next,
/// where an unfinished poll goes on, and its own failure streak, so a failing phishing
/// poll never stops the user-event stream of the same source (and the other way round).
/// Its size does not grow with the number of tests or recipients (a few hundred bytes).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PhishingState {
    /// When the last complete poll started (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_poll: Option<i64>,
    /// When the next poll is due (ms): `last_poll` + `phishingPollInterval`. `None`: now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_poll: Option<i64>,
    /// When the poll in progress started (ms): set by a poll that stopped early (deadline,
    /// daily limit, 429s), so the next run continues it, skipping the tests whose
    /// recipients it already read since then, instead of starting over (a poll longer
    /// than one invocation still completes). `None` once the poll completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_started: Option<i64>,
    /// Where the poll in progress goes on inside the tests list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tests_resume: Option<ListAt>,
    /// The poll (its `poll_started`) whose tests list was walked to its end: a run
    /// continuing that poll goes straight to the recipients it queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tests_listed: Option<i64>,
    /// Runs in a row that ended rate-limited without a `Retry-After` (the wait before the
    /// next Reporting request doubles with each, up to an hour).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rate_limited_runs: u32,
    /// Where the poll in progress goes on inside a test's recipients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<Resume>,
    /// The page size polls use when the largest one (500) was too large to read; `None`:
    /// 500.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_page: Option<u32>,
    /// No request before this time (ms): the Reporting API's `Retry-After`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<i64>,
    /// When a poll (or part of one) last ended without an error (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success: Option<i64>,
    /// Tests the last complete poll listed.
    #[serde(default)]
    pub tests_tracked: u64,
    /// Tests whose recipients the last complete poll read (the poll rule's live tests).
    #[serde(default)]
    pub tests_live: u64,
    /// The Reporting account (hash of host and token) the last poll used, for `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// The current streak of retryable phishing failures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streak: Option<crate::domain::state::RetryStreak>,
    /// Set when the phishing stream stopped (config error, or retryable errors for longer
    /// than the retry window): the config version it applies to. An update or a restart
    /// clears it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_config_version: Option<u64>,
    /// The UTC day the Reporting daily limit was reached on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_exhausted_day: Option<String>,
    /// Requests of the last poll (complete or not).
    #[serde(default)]
    pub last_poll_requests: u32,
    /// Records forwarded by the last poll.
    #[serde(default)]
    pub last_poll_forwarded: u64,
    /// Records forwarded since the source was created.
    #[serde(default)]
    pub forwarded_total: u64,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl PhishingState {
    /// Whether a poll is due at `now`.
    pub fn due(&self, now: i64) -> bool {
        self.next_poll.is_none_or(|next| now >= next)
    }

    /// Whether a scheduled run should poll at `now`: due, not stopped for this
    /// configuration version, and the daily limit not reached `today`.
    pub fn ready(&self, config_version: u64, today: &str, now: i64) -> bool {
        self.stopped_config_version != Some(config_version)
            && self.quota_exhausted_day.as_deref() != Some(today)
            && self.due(now)
            && !self.waiting(now)
    }

    /// Whether the Reporting API asked (`Retry-After`) for no request before a time
    /// after `now`.
    pub fn waiting(&self, now: i64) -> bool {
        self.not_before.is_some_and(|t| now < t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;
    const DAY: i64 = 24 * HOUR;

    #[test]
    fn open_tests_are_read_every_poll_settled_ones_weekly() {
        let mut track = TestTrack::default();
        let mut reads = 0;
        let mut now = 0;
        // Two weeks in progress, then closed; polled hourly for five weeks.
        for poll in 0..(35 * 24) {
            now = poll as i64 * HOUR;
            let status = if now < 14 * DAY {
                "In Progress"
            } else {
                "Closed"
            };
            let changed = poll == 0 || now == 14 * DAY;
            track = track.observe(status, changed, now);
            if track.read_recipients(changed, now) {
                reads += 1;
                track.recipients_read = Some(now);
            }
        }
        // 14 days open + 7 quiet days after closing, hourly; then one read a week.
        let expected = 14 * 24 + 7 * 24 + 2;
        assert_eq!(reads, expected, "at {now}");
    }

    #[test]
    fn a_late_change_is_caught_at_the_next_poll_when_it_moves_a_count() {
        let settled = TestTrack {
            final_since: Some(0),
            last_changed: 0,
            recipients_read: Some(20 * DAY),
            ..Default::default()
        };
        let now = 21 * DAY;
        assert!(
            !settled
                .observe("Closed", false, now)
                .read_recipients(false, now)
        );
        let moved = settled.observe("Closed", true, now);
        assert!(moved.read_recipients(true, now));
        // ... and every poll of the next week (it changed again, so it is not quiet).
        let later = now + 3 * DAY;
        assert!(
            moved
                .observe("Closed", false, later)
                .read_recipients(false, later)
        );
    }

    #[test]
    fn a_change_that_moves_no_count_is_caught_within_a_week_and_a_poll() {
        let settled = TestTrack {
            final_since: Some(0),
            last_changed: 0,
            recipients_read: Some(10 * DAY),
            ..Default::default()
        };
        let poll = 24 * HOUR; // the longest phishingPollInterval
        let mut now = 10 * DAY;
        let mut waited = 0;
        loop {
            now += poll;
            waited += poll;
            if settled
                .observe("Closed", false, now)
                .read_recipients(false, now)
            {
                break;
            }
            assert!(
                waited <= SETTLED_RECHECK_MS + poll,
                "not read within the bound"
            );
        }
        assert!(waited <= SETTLED_RECHECK_MS + poll);
    }

    #[test]
    fn tracks_round_trip_through_a_shard() {
        use crate::domain::changes::Shard;
        let shard = Shard {
            entries: vec![
                (1, TestTrack::default()),
                (
                    u64::MAX,
                    TestTrack {
                        final_since: Some(-5),
                        last_changed: i64::MAX,
                        recipients_read: None,
                        stuck_at: u64::MAX,
                        stuck_since: -1,
                        queued_for: i64::MIN + 1,
                        failures: u32::MAX,
                    },
                ),
            ],
        };
        assert_eq!(Shard::<TestTrack>::decode(&shard.encode()).unwrap(), shard);
        // 500 tracks a shard: 43 KB of base64, far inside an item.
        assert_eq!(
            Shard {
                entries: vec![(1, TestTrack::default()); 500]
            }
            .encode()
            .len(),
            42_668
        );
    }

    #[test]
    fn a_retry_after_holds_polls_until_it_passes() {
        let state = PhishingState {
            not_before: Some(10),
            ..Default::default()
        };
        assert!(!state.ready(1, "d", 9));
        assert!(state.ready(1, "d", 10));
    }

    #[test]
    fn errored_tests_are_final_and_reopened_tests_are_not() {
        assert!(is_final("Error") && is_final("Closed") && !is_final("In Progress"));
        let track = TestTrack::default().observe("Closed", true, 5);
        assert_eq!(track.final_since, Some(5));
        assert_eq!(track.observe("In Progress", true, 9).final_since, None);
    }
}
