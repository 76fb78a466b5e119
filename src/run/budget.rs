//! The account's budget, request by request: the deadline and the run's share, the daily
//! quota reserved in the state store's ledger before each request, and the account's send
//! slot (4 requests per second across every process).

use std::time::Duration;

use tokio::time::Instant;

use super::{Run, now_ms};
use crate::error::{Error, Result};
use crate::knowbe4::ApiError;
use crate::store::{Reservation, SendSlot};

impl Run<'_> {
    /// Whether one more request may be sent: budget and deadline.
    pub(super) fn may_send(
        &self,
        budget: u32,
        deadline: Instant,
    ) -> std::result::Result<(), FetchFailure> {
        if self.report.requests >= budget {
            return Err(FetchFailure::Budget);
        }
        let needed = self.ctx.settings.deadline_margin + self.ctx.settings.request_timeout;
        if deadline.saturating_duration_since(Instant::now()) < needed {
            return Err(FetchFailure::Deadline);
        }
        Ok(())
    }

    /// Reserves one request in the account's quota ledger for the day before it is sent.
    pub(super) async fn reserve(
        &mut self,
        day: &str,
        limit: u32,
    ) -> std::result::Result<(), FetchFailure> {
        if std::mem::take(&mut self.prereserved) {
            // Reserved when the run read the ledger (`collect_events`).
            return Ok(());
        }
        let account = self
            .account
            .as_deref()
            .expect("the account is known before requests");
        match self.ctx.store.reserve_request(account, day, limit).await {
            Ok(Reservation::Granted(used)) => {
                if let Some(seen) = self.quota_seen.as_mut() {
                    seen.used = used;
                }
                Ok(())
            }
            Ok(Reservation::Exhausted) => Err(FetchFailure::Quota),
            Err(err) => Err(FetchFailure::Other(err)),
        }
    }

    /// What a request task needs to claim the account's send slot.
    pub(super) fn slot_claimer(&self) -> SlotClaimer {
        SlotClaimer {
            store: self.ctx.store.clone(),
            account: self
                .account
                .clone()
                .expect("the account is known before requests"),
            spacing_ms: crate::knowbe4::spacing_for(&self.record.spec.api_base).as_millis() as i64,
        }
    }

    /// Gives back the reservation made with the ledger read if no request used it.
    pub(super) async fn give_back_prereserved(&mut self, day: &str) {
        if std::mem::take(&mut self.prereserved) {
            self.report.requests += 1; // `unreserve` counts it off again
            self.unreserve(day).await;
        }
    }

    /// Gives back the reservation of a request that never reached KnowBe4.
    pub(super) async fn unreserve(&mut self, day: &str) {
        self.report.requests = self.report.requests.saturating_sub(1);
        let account = self
            .account
            .as_deref()
            .expect("the account is known before requests");
        match self.ctx.store.release_request(account, day).await {
            Ok(()) => {
                if let Some(seen) = self.quota_seen.as_mut() {
                    seen.used = seen.used.saturating_sub(1);
                }
            }
            Err(err) => {
                // Keeping the reservation only over-counts: the ledger stays on the safe
                // side.
                tracing::warn!(source_id = %self.record.id, error = %err, "Could not give back an unsent request's quota reservation.");
            }
        }
    }
}

/// Claims the account's next send slot in the state store, waiting while another
/// process (or another source of this one) holds it: the 4 requests per second hold for
/// the account across every process. In-process pacing (the governor limiter) runs
/// first, so one process's own requests rarely find the slot held.
pub(super) struct SlotClaimer {
    store: std::sync::Arc<dyn crate::store::StateStore>,
    account: String,
    spacing_ms: i64,
}

impl SlotClaimer {
    /// Waits for a slot and returns at its start, when the request must be sent; gives up
    /// after [`MAX_SLOT_WAITS`] tries.
    ///
    /// A slot is claimed to start [`SLOT_LEAD_MS`] after the claim is written, and the
    /// request waits for that start: the write's own latency (a DynamoDB call, a local
    /// file's fsync) then never shortens the gap to the next slot. A claim answered after
    /// its slot started (more than [`SLOT_LATE_MS`] late) is not used: the slot is left
    /// to pass and another claimed, so no two sends are ever closer than the spacing less
    /// that tolerance (20 ms, within the 80 ms margin per window of the 270 ms spacing).
    pub(super) async fn claim(&self) -> Result<()> {
        for _ in 0..MAX_SLOT_WAITS {
            let start = now_ms() + SLOT_LEAD_MS;
            match self
                .store
                .claim_send_slot(&self.account, start, self.spacing_ms)
                .await?
            {
                SendSlot::Granted => {
                    let now = now_ms();
                    if now > start + SLOT_LATE_MS {
                        continue;
                    }
                    if start > now {
                        tokio::time::sleep(Duration::from_millis((start - now) as u64)).await;
                    }
                    return Ok(());
                }
                SendSlot::Busy(until) => {
                    // Claim again when a slot starting then would no longer overlap.
                    let wait = (until - SLOT_LEAD_MS - now_ms()).clamp(1, 2_000) as u64;
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
            }
        }
        Err(Error::Store {
            message: format!("the account's send slot stayed taken for {MAX_SLOT_WAITS} tries"),
            source: None,
        })
    }
}

/// Tries a request makes for its account's send slot (each busy answer waits out the
/// holder's slot, ~270 ms): 16 concurrent senders to one account clear in one round.
pub(super) const MAX_SLOT_WAITS: u32 = 64;
/// How far ahead of the claim a send slot starts: room for the claim's write.
pub(super) const SLOT_LEAD_MS: i64 = 60;
/// How late after its start a granted slot may still be used.
pub(super) const SLOT_LATE_MS: i64 = 20;

pub(super) enum FetchFailure {
    Quota,
    Budget,
    Deadline,
    Api(ApiError),
    Other(Error),
}

/// What admitting one Reporting API request found.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// Reserved, paced and in its send slot: send it now.
    Granted,
    /// The account's daily Reporting limit is reached: send nothing until 00:00 UTC.
    QuotaExhausted,
}

/// Admits one request to the Reporting API account of `client`, as the User Event API's
/// requests are: reserved in the state store's daily ledger for `day` (within `limit`,
/// under the Reporting account's own id, so the two APIs never share a ledger), paced in
/// this process, then sent only in the account's send slot, which the store spaces by
/// [`ReportingClient::spacing`](crate::knowbe4::reporting::ReportingClient::spacing)
/// across every process (1.25 s: within 4 a second and 50 a minute). A slot that cannot
/// be claimed gives the reservation back.
pub async fn admit_reporting_request(
    store: &std::sync::Arc<dyn crate::store::StateStore>,
    client: &crate::knowbe4::reporting::ReportingClient,
    day: &str,
    limit: u32,
) -> Result<Admission> {
    match store.reserve_request(client.account(), day, limit).await? {
        Reservation::Granted(_) => {}
        Reservation::Exhausted => return Ok(Admission::QuotaExhausted),
    }
    client.pace().await;
    let slots = SlotClaimer {
        store: store.clone(),
        account: client.account().to_string(),
        spacing_ms: client.spacing().as_millis() as i64,
    };
    if let Err(err) = slots.claim().await {
        // Never sent: keeping the reservation would only over-count, but give it back.
        if let Err(release) = store.release_request(client.account(), day).await {
            tracing::warn!(error = %release, "Could not give back an unsent Reporting request's reservation.");
        }
        return Err(err);
    }
    Ok(Admission::Granted)
}
