//! The pure logic: no I/O, no clock (callers pass `now`), no KnowBe4, destination or
//! store client. Everything here is tested beside the code.
//!
//! - [`checkpoint`]: what was delivered, and the walk that loses nothing (design inside).
//! - [`planner`]: how a run spends its share of the quota: head reads and window re-reads.
//! - [`quota`]: how much of the daily quota a run may spend.
//! - [`state`]: per-source records: lifecycle, retry streak, counters, lease, health.
//! - [`status`]: what `status` and `health` show: RFC 3339 times, resolved events, backlog.
//! - [`event`]: one KnowBe4 event, parsed just enough to order and dedupe it.
//! - [`changes`]: change detection for Reporting API records (digests sharded per page).
//! - [`phishing_poll`]: which security tests a poll reads, and when a test settles.
//! - [`account`]: the account id (API host + key) that the quota, pacing and sharing key on.
//! - [`report`]: what one run did (logged, returned, turned into metrics).
//! - [`secrets`]: a source's secrets and their stored form.

pub mod account;
pub mod changes;
pub mod checkpoint;
pub mod event;
pub mod phishing_poll;
pub mod planner;
pub mod quota;
pub mod report;
pub mod secrets;
pub mod state;
pub mod status;
