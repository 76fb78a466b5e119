//! The source-management actions: create, update, restart, delete.

use crate::config::{SourceSpec, ValidationOptions, parse_source_value};
use crate::domain::account::account_id;
use crate::domain::secrets::SourceSecrets;
use crate::domain::state::{Lifecycle, SourceRecord, SourceState};
use crate::error::{Error, Result};

use super::{App, now_ms};

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// The KnowBe4 account a source collects, for spotting a twin source: the User Event API
/// account when it collects user events, else the Reporting API one.
fn source_account(spec: &SourceSpec, secrets: &SourceSecrets) -> String {
    match (&secrets.api_key, &spec.phishing, &secrets.api_key_phishing) {
        (Some(key), _, _) => account_id(&spec.api_base, key),
        (None, Some(phishing), Some(token)) => account_id(&phishing.reporting_base, token),
        // Validation gives every source the key of a data type it collects.
        _ => account_id(&spec.api_base, &secrecy::SecretString::from("")),
    }
}

impl App {
    /// The id of the destination a source with `spec` and `secrets` forwards to.
    pub(super) fn destination_id(
        &self,
        spec: &crate::config::SourceSpec,
        secrets: &SourceSecrets,
    ) -> String {
        match &spec.destination {
            Some(own) => crate::domain::account::destination_id(
                own.format.as_str(),
                secrets.destination_url.as_ref(),
            ),
            None => crate::domain::account::destination_id(
                self.default_destination.format.as_str(),
                self.default_destination.url.as_ref(),
            ),
        }
    }

    /// Validates and stores a new source (state `Pending`); returns its id.
    pub async fn create(&self, source: serde_json::Value, id: Option<String>) -> Result<String> {
        self.create_with(source, id, false).await
    }

    /// Creates a source; unless `allow_duplicate`, refuses one whose KnowBe4 account and
    /// destination both equal an existing source's (it would forward every event twice
    /// and halve the account's budget), naming that source.
    pub async fn create_with(
        &self,
        source: serde_json::Value,
        id: Option<String>,
        allow_duplicate: bool,
    ) -> Result<String> {
        let parsed = parse_source_value(source, self.settings.validation)?;
        let secrets = parsed.secrets(None)?;
        let id = match id {
            Some(id) if valid_id(&id) => id,
            Some(_) => {
                return Err(Error::config(
                    "id",
                    "must be 1 to 64 letters, digits, '-' or '_'",
                ));
            }
            None => {
                let slug: String = parsed
                    .spec
                    .name
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() {
                            c.to_ascii_lowercase()
                        } else {
                            '-'
                        }
                    })
                    .collect::<String>()
                    .split('-')
                    .filter(|p| !p.is_empty())
                    .collect::<Vec<_>>()
                    .join("-");
                let slug: String = slug.chars().take(40).collect();
                let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
                if slug.is_empty() {
                    format!("src-{suffix}")
                } else {
                    format!("{slug}-{suffix}")
                }
            }
        };
        // Every input is valid: only now read the store.
        let account = source_account(&parsed.spec, &secrets);
        let destination = self.destination_id(&parsed.spec, &secrets);
        if !allow_duplicate
            && let Some(twin) = self.store.list_sources().await?.into_iter().find(|r| {
                r.account.as_deref() == Some(&account)
                    && r.destination.as_deref() == Some(&destination)
            })
        {
            return Err(Error::Conflict(format!(
                "source {} already collects this KnowBe4 account into the same destination; use --allow-duplicate (allowDuplicate in a payload) to create another anyway",
                twin.id
            )));
        }
        if self.store.get_source(&id).await?.is_some() {
            return Err(Error::Conflict(format!("source {id} already exists")));
        }
        let secret_ref = self.secrets.put(&id, &secrets).await?;
        let now = now_ms();
        let record = SourceRecord {
            id: id.clone(),
            spec: parsed.spec,
            secret_ref: secret_ref.clone(),
            config_version: 1,
            created_at: now,
            updated_at: now,
            account: Some(account),
            destination: Some(destination),
        };
        if let Err(err) = self
            .store
            .create_source(&record, &SourceState::new(now))
            .await
        {
            self.secrets.delete(&id, &secret_ref).await.ok();
            return Err(err);
        }
        tracing::info!(source_id = %id, name = %record.spec.name, "Source created.");
        Ok(id)
    }

    /// Replaces a source's configuration; clears a ThirdPartyConfigError block and an
    /// `Error` state (the new configuration deserves a try).
    pub async fn update(&self, id: &str, source: serde_json::Value) -> Result<()> {
        let mut record = self
            .store
            .get_source(id)
            .await?
            .ok_or_else(|| Error::NotFound(id.to_string()))?;
        let options = ValidationOptions {
            key_optional: true,
            ..self.settings.validation
        };
        let parsed = parse_source_value(source, options)?;
        // Only what the new configuration says changes: a kept secret is read and written
        // back with the new ones, as long as its endpoint is unchanged.
        let previous = self.source_secrets(&record, true).await.ok();
        let secrets = parsed.secrets(previous.as_ref().map(|p| (&record.spec, p)))?;
        record.secret_ref = self.secrets.put(id, &secrets).await?;
        self.secrets.forget(id);
        record.account = Some(source_account(&parsed.spec, &secrets));
        record.destination = Some(self.destination_id(&parsed.spec, &secrets));
        record.spec = parsed.spec;
        record.config_version += 1;
        record.updated_at = now_ms();
        self.store.update_source(&record).await?;
        // The Reporting account the source now names (host + token).
        let reporting = record.spec.phishing.as_ref().and_then(|p| {
            let token = secrets.api_key_phishing.as_ref()?;
            Some(crate::knowbe4::reporting::reporting_account_id(
                &p.reporting_base,
                token,
            ))
        });
        self.reset_state(
            id,
            "Source updated; the next run starts collecting again.",
            reporting.as_deref(),
        )
        .await?;
        tracing::info!(source_id = %id, config_version = record.config_version, "Source updated.");
        Ok(())
    }

    /// Clears `Error` and the retry streak; the next run starts at `Started`.
    pub async fn restart(&self, id: &str) -> Result<()> {
        if self.store.get_source(id).await?.is_none() {
            return Err(Error::NotFound(id.to_string()));
        }
        self.reset_state(id, "Restarted; the next run starts collecting again.", None)
            .await?;
        tracing::info!(source_id = %id, "Source restarted.");
        Ok(())
    }

    /// `reporting`: the Reporting account an update names; another than the one the
    /// phishing stream last used drops that account's `Retry-After` and poll progress.
    pub(super) async fn reset_state(
        &self,
        id: &str,
        reason: &str,
        reporting: Option<&str>,
    ) -> Result<()> {
        for _ in 0..5 {
            let Some(mut state) = self.store.load_state(id).await? else {
                return Err(Error::NotFound(id.to_string()));
            };
            let s = &mut state.value;
            s.streak = None;
            s.blocked_config_version = None;
            if let Some(phishing) = s.phishing.as_mut() {
                phishing.streak = None;
                phishing.stopped_config_version = None;
                phishing.quota_exhausted_day = None;
                if let Some(new) = reporting
                    && phishing.account.as_deref().is_some_and(|old| old != new)
                {
                    phishing.not_before = None;
                    phishing.rate_limited_runs = 0;
                    phishing.poll_started = None;
                    phishing.tests_listed = None;
                    phishing.tests_resume = None;
                    phishing.resume = None;
                    phishing.per_page = None;
                    phishing.account = Some(new.to_string());
                }
            }
            if matches!(
                s.lifecycle,
                Lifecycle::Error
                    | Lifecycle::Collecting
                    | Lifecycle::Authenticated
                    | Lifecycle::Initialized
            ) {
                s.transition(Lifecycle::Pending, now_ms(), reason);
            }
            match self.store.save_state(id, s, state.version, None).await {
                Err(Error::Conflict(_)) => continue,
                other => return other.map(|_| ()),
            }
        }
        Err(Error::Conflict(format!(
            "state of {id} kept changing; try again"
        )))
    }

    /// `Stopping`, then removes the source's items and its secret. A run in progress
    /// finishes without writing new progress (its writes are conditioned on the state
    /// version and on the source existing).
    pub async fn delete(&self, id: &str) -> Result<()> {
        let record = self
            .store
            .get_source(id)
            .await?
            .ok_or_else(|| Error::NotFound(id.to_string()))?;
        if let Some(mut state) = self.store.load_state(id).await? {
            state
                .value
                .transition(Lifecycle::Stopping, now_ms(), "Delete requested.");
            // Best effort: the items go next whatever happens here.
            let _ = self
                .store
                .save_state(id, &state.value, state.version, None)
                .await;
        }
        self.secrets.delete(id, &record.secret_ref).await?;
        self.store.delete_source(id).await?;
        tracing::info!(source_id = %id, "Source deleted.");
        Ok(())
    }
}
