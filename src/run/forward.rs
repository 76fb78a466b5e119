//! Forwarding, then checkpointing: the checkpoint that covers a batch is saved only after
//! the destination accepted the batch.

use std::time::Duration;

use time::OffsetDateTime;
use tokio::time::Instant;

use super::Run;
use crate::domain::checkpoint::Walker;
use crate::domain::event::RawEvent;
use crate::domain::quota::utc_day;
use crate::error::{Error, Result};

impl Run<'_> {
    /// On a KnowBe4 failure mid-walk, still deliver and checkpoint what was fetched.
    pub(super) async fn flush_then(
        &mut self,
        err: Error,
        destination: &crate::sink::Destination,
        meta: &crate::sink::SourceMeta,
        buffer: &mut Vec<RawEvent>,
        walker: &Walker,
    ) -> Error {
        let deadline = Instant::now() + Duration::from_secs(60);
        match self
            .flush(destination, meta, buffer, walker, deadline)
            .await
        {
            Ok(()) => err,
            Err(flush_err) => flush_err,
        }
    }

    /// Forwards the buffer, then saves the checkpoint that covers it.
    pub(super) async fn flush(
        &mut self,
        destination: &crate::sink::Destination,
        meta: &crate::sink::SourceMeta,
        buffer: &mut Vec<RawEvent>,
        walker: &Walker,
        deadline: Instant,
    ) -> Result<()> {
        self.forward(destination, meta, buffer, walker, deadline)
            .await?;
        self.save().await
    }

    /// The walk's last flush when it ended without error: forwards the buffer and moves
    /// the checkpoint in memory only; the run's outcome saves it (one write, still after
    /// the destination accepted the events; a crash before it re-reads the batch).
    pub(super) async fn flush_last(
        &mut self,
        destination: &crate::sink::Destination,
        meta: &crate::sink::SourceMeta,
        buffer: &mut Vec<RawEvent>,
        walker: &Walker,
        deadline: Instant,
    ) -> Result<()> {
        if self
            .forward(destination, meta, buffer, walker, deadline)
            .await?
        {
            self.checkpoint_unsaved = true;
        }
        Ok(())
    }

    /// Forwards the buffer and moves the checkpoint in memory; whether anything changed.
    async fn forward(
        &mut self,
        destination: &crate::sink::Destination,
        meta: &crate::sink::SourceMeta,
        buffer: &mut Vec<RawEvent>,
        walker: &Walker,
        deadline: Instant,
    ) -> Result<bool> {
        let snapshot = walker.snapshot();
        let unchanged = snapshot == self.state.as_ref().expect("loaded").value.checkpoint;
        if buffer.is_empty() && unchanged {
            return Ok(false);
        }
        if !buffer.is_empty() {
            crate::failpoint::hit("after_fetch_before_forward");
            let send_deadline = deadline
                .checked_sub(self.ctx.settings.deadline_margin / 2)
                .unwrap_or(deadline);
            destination.send(meta, buffer, send_deadline).await?;
            crate::failpoint::hit("after_forward_before_checkpoint");
        }
        let forwarded = buffer.len() as u64;
        let newest = buffer.iter().map(|e| e.occurred.0).max();
        buffer.clear();
        self.report.forwarded += forwarded;
        let today = utc_day(OffsetDateTime::now_utc());
        let state = self.state_mut();
        state.checkpoint = snapshot;
        let counters = &mut state.counters;
        if counters.day != today {
            counters.day = today;
            counters.forwarded_today = 0;
        }
        counters.forwarded_today += forwarded;
        counters.forwarded_total += forwarded;
        if let Some(newest) = newest {
            counters.newest_forwarded =
                Some(counters.newest_forwarded.map_or(newest, |n| n.max(newest)));
        }
        Ok(true)
    }
}
