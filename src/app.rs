//! The application: clients built once per process, and every action (collect, create,
//! update, restart, delete, status, health, list) behind one entry point shared by the
//! Lambda handler and the command line.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::time::Instant;

use crate::config::{ValidationOptions, parse_source_value};
use crate::domain::account::account_id;
use crate::domain::event::EventTime;
use crate::domain::quota::utc_day;
use crate::domain::secrets::SourceSecrets;
use crate::domain::state::{HealthEvent, Lifecycle, SecretRef, SourceRecord, SourceState};
use crate::domain::status::{HealthView, TransitionView, rfc3339_ms};
use crate::error::{Error, Result};
use crate::run::{RunReport, Trigger, collect_source_with};
use crate::sink::{Destination, DestinationConfig, Format};
use crate::store::StateStore;
use crate::store::file::{DEFAULT_STATE_FILE, FileStore};
use crate::store::secrets_manager::SecretsManagerVault;

/// The per-source secret prefix when `SECRET_PREFIX` is unset: what the stack sets for
/// its documented name `knowbe4-source` (`<stack>/sources/`).
pub const DEFAULT_SECRET_PREFIX: &str = "knowbe4-source/sources/";

/// The HTTP client for KnowBe4: it follows no redirect (the key goes to the validated
/// host only, never where an answer points) and sends no `Referer`. Replies may be
/// gzipped; the KnowBe4 client bounds the page bodies it reads.
pub fn knowbe4_http_client() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .referer(false)
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(60))
        .user_agent(concat!("knowbe4-source/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| Error::store("building the KnowBe4 HTTP client", e))
}

/// Tunables read from the environment once per process.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Stop this long before the invocation deadline (`DEADLINE_MARGIN_SECS`, default 20).
    pub deadline_margin: Duration,
    /// How often the schedule runs (`SCHEDULE_INTERVAL_SECS`, default 300), for quota
    /// planning.
    pub schedule_interval_secs: u64,
    /// Sources collected at once by a scheduled run (`COLLECT_CONCURRENCY`, default 4).
    pub concurrency: usize,
    /// Longest run outside Lambda (`RUN_TIMEOUT_SECS`, default 840, like a 15-minute
    /// Lambda minus margin).
    pub cli_run_timeout: Duration,
    /// Timeout of one KnowBe4 request (`KNOWBE4_REQUEST_TIMEOUT_SECS`, default 30).
    pub request_timeout: Duration,
    /// Validation switches (`KNOWBE4_ALLOW_CUSTOM_BASE_URL`).
    pub validation: ValidationOptions,
    /// Prefix of per-source Secrets Manager secrets (`SECRET_PREFIX`, default
    /// [`DEFAULT_SECRET_PREFIX`]); the stack sets `<stack>/sources/`, which no other
    /// secret of the stack or of another stack shares.
    pub secret_prefix: String,
    /// Requests kept in flight while draining (`KNOWBE4_MAX_IN_FLIGHT`, default 6; 1
    /// turns pipelining off, for comparison).
    pub max_in_flight: usize,
    /// A run's lease lasts this long unless renewed (`LEASE_TTL_SECS`, default 120): how
    /// long a crashed run blocks its source. Runs renew it as they go.
    pub lease_ttl: Duration,
    /// Where EMF metric lines go (`EMF_METRICS`).
    pub metrics: crate::metrics::MetricsOutput,
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

impl Settings {
    /// From the environment, with the documented defaults.
    pub fn from_env() -> Self {
        Settings {
            deadline_margin: Duration::from_secs(env_u64("DEADLINE_MARGIN_SECS", 20)),
            schedule_interval_secs: env_u64("SCHEDULE_INTERVAL_SECS", 300).max(1),
            concurrency: env_u64("COLLECT_CONCURRENCY", 4).clamp(1, 64) as usize,
            cli_run_timeout: Duration::from_secs(env_u64("RUN_TIMEOUT_SECS", 840)),
            request_timeout: Duration::from_secs(
                env_u64("KNOWBE4_REQUEST_TIMEOUT_SECS", 30).max(1),
            ),
            validation: ValidationOptions::from_env(),
            secret_prefix: std::env::var("SECRET_PREFIX")
                .ok()
                .filter(|p| !p.trim().is_empty())
                .unwrap_or_else(|| DEFAULT_SECRET_PREFIX.into()),
            max_in_flight: env_u64("KNOWBE4_MAX_IN_FLIGHT", 6).clamp(1, 16) as usize,
            lease_ttl: Duration::from_secs(env_u64("LEASE_TTL_SECS", 120).max(1)),
            metrics: crate::metrics::MetricsOutput::from_env(),
        }
    }
}

/// Where source secrets are kept: Secrets Manager in AWS, the state file locally.
pub enum Vault {
    /// Deployed mode.
    SecretsManager(SecretsManagerVault),
    /// Local mode (`STATE_TABLE` unset).
    Local(FileStore),
}

/// Everything an action needs, built once per process (cold start) and shared.
pub struct App {
    /// The state store.
    pub store: Arc<dyn StateStore>,
    /// The secret store.
    pub vault: Vault,
    /// The HTTP client (connection pool) for KnowBe4 ([`knowbe4_http_client`]).
    pub http: reqwest::Client,
    /// The HTTP client for destinations ([`crate::sink::http_client`]): its own, because
    /// destinations must not follow redirects nor have their replies decompressed.
    pub destination_http: reqwest::Client,
    /// The deployment's destination (from `FORWARD_*`), for sources without their own.
    pub default_destination: DestinationConfig,
    /// Tunables.
    pub settings: Settings,
    /// Secrets read this process, by source id: read once per cold start.
    secrets_cache: Mutex<HashMap<String, SourceSecrets>>,
}

/// A management or collection request: the Lambda payload and what the CLI builds.
/// `Debug` leaves the source JSON out: it holds the API key.
#[derive(Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Action {
    /// Collect one source, or every source when `sourceId` is absent.
    Collect {
        /// The source to collect.
        #[serde(rename = "sourceId")]
        source_id: Option<String>,
        /// Set for an EventBridge scheduled event (or `collect --scheduled`): runs follow
        /// the freshness plan. An explicit `collect` collects everything its budget pays
        /// for now.
        #[serde(skip)]
        scheduled: bool,
    },
    /// Create a source from the hosted JSON.
    Create {
        /// The hosted source JSON (`{"api.version":"v1","source":{...}}` or `source`).
        source: serde_json::Value,
        /// The id to use (default: derived from the name).
        #[serde(default)]
        id: Option<String>,
        /// Create it even when a source with the same account and destination exists.
        #[serde(default, rename = "allowDuplicate")]
        allow_duplicate: bool,
    },
    /// Replace a source's configuration (the API key may be omitted to keep it).
    Update {
        /// The source.
        #[serde(rename = "sourceId")]
        source_id: String,
        /// The new hosted JSON.
        source: serde_json::Value,
    },
    /// Clear `Error` and the retry streak; the next run starts at `Started`.
    Restart {
        /// The source.
        #[serde(rename = "sourceId")]
        source_id: String,
    },
    /// Stop and remove a source and its secret.
    Delete {
        /// The source.
        #[serde(rename = "sourceId")]
        source_id: String,
    },
    /// Status of one source, or all.
    Status {
        /// The source.
        #[serde(rename = "sourceId")]
        source_id: Option<String>,
    },
    /// Health events of a source.
    Health {
        /// The source.
        #[serde(rename = "sourceId")]
        source_id: String,
    },
    /// All sources, one line each.
    List {},
}

impl std::fmt::Debug for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (name, id) = match self {
            Action::Collect { source_id, .. } | Action::Status { source_id } => {
                (self.name(), source_id.as_deref())
            }
            Action::Create { id, .. } => (self.name(), id.as_deref()),
            Action::Update { source_id, .. }
            | Action::Restart { source_id }
            | Action::Delete { source_id }
            | Action::Health { source_id } => (self.name(), Some(source_id.as_str())),
            Action::List {} => (self.name(), None),
        };
        let mut out = f.debug_struct("Action");
        out.field("action", &name).field("source_id", &id);
        if matches!(self, Action::Create { .. } | Action::Update { .. }) {
            out.field("source", &"[redacted]");
        }
        out.finish()
    }
}

impl Action {
    /// The action's name, as in payloads.
    pub fn name(&self) -> &'static str {
        match self {
            Action::Collect { .. } => "collect",
            Action::Create { .. } => "create",
            Action::Update { .. } => "update",
            Action::Restart { .. } => "restart",
            Action::Delete { .. } => "delete",
            Action::Status { .. } => "status",
            Action::Health { .. } => "health",
            Action::List {} => "list",
        }
    }

    /// Parses a Lambda payload: an EventBridge scheduled event (collect every source) or
    /// an `{"action": ...}` object.
    pub fn from_payload(payload: serde_json::Value) -> Result<Action> {
        let is_scheduled = payload.get("detail-type").and_then(|v| v.as_str())
            == Some("Scheduled Event")
            || matches!(
                payload.get("source").and_then(|v| v.as_str()),
                Some("aws.events" | "aws.scheduler")
            );
        if is_scheduled && payload.get("action").is_none() {
            return Ok(Action::Collect {
                source_id: None,
                scheduled: true,
            });
        }
        if !payload.is_object() {
            return Err(Error::config("payload", "must be a JSON object"));
        }
        if payload.get("action").is_none() {
            return Err(Error::config(
                "action",
                "is required (collect, create, update, restart, delete, status, health, list) unless the payload is an EventBridge Scheduled Event",
            ));
        }
        // `{"action": "x", ...rest}` is read as `{"x": {...rest}}` (serde's external
        // tagging), which keeps the path of a bad field for the error message.
        let serde_json::Value::Object(mut rest) = payload else {
            unreachable!("checked above")
        };
        let name = match rest.remove("action") {
            Some(serde_json::Value::String(name)) if !name.is_empty() => name,
            _ => return Err(Error::config("action", "must be a non-empty string")),
        };
        let tagged = serde_json::json!({ name.clone(): rest });
        serde_path_to_error::deserialize(tagged).map_err(|e| {
            let path = e.path().to_string();
            let field = path
                .strip_prefix(&format!("{name}."))
                .filter(|f| !f.is_empty())
                .map(str::to_string)
                .unwrap_or_else(|| "action".to_string());
            Error::config(field, e.inner().to_string())
        })
    }
}

/// What `status` shows for one source.
#[derive(Debug, Serialize, Deserialize)]
pub struct SourceStatus {
    /// The source id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Lifecycle state.
    pub state: Lifecycle,
    /// When the state was entered (RFC 3339).
    pub since: Option<String>,
    /// Last run that completed without error.
    pub last_success: Option<String>,
    /// Newest occurred_date covered (the checkpoint's high-water mark).
    pub checkpoint: Option<String>,
    /// Unfinished ranges still to collect (a backlog).
    pub backlog_ranges: usize,
    /// The backlog as time and events still to collect, and when it should be caught up.
    pub backlog: Option<crate::domain::status::Backlog>,
    /// Whether the dedupe window overflowed and narrowed (see the checkpoint docs).
    pub lateness_window_narrowed: bool,
    /// Requests used today (UTC) by every source of the KnowBe4 account.
    pub quota_used_today: u32,
    /// Requests left today for the account's sources.
    pub quota_left_today: u32,
    /// The account's daily limit for this deployment: the smallest `dailyRequestLimit`
    /// (after `quotaShare`) among the sources sharing the account.
    pub daily_request_limit: u32,
    /// The KnowBe4 account id (a hash of API host and key; see `account`), once a run
    /// has read the key.
    pub account: Option<String>,
    /// The sources (this one included) sharing the account's quota and rate.
    pub account_sources: Vec<String>,
    /// Set when those sources were configured with different limits.
    pub account_note: Option<String>,
    /// What the account's quota buys at this schedule: expected lag for new and for
    /// backdated events, how often the lateness window is re-read, and a warning when
    /// the schedule asks for more than the quota pays.
    pub freshness: crate::domain::planner::Freshness,
    /// Whether the daily quota is used up (not an error).
    pub quota_reached: bool,
    /// Events forwarded by the last run.
    pub forwarded_last_run: u64,
    /// Events forwarded today (UTC).
    pub forwarded_today: u64,
    /// Events forwarded since creation.
    pub forwarded_total: u64,
    /// Seconds between now and the newest forwarded event.
    pub lag_seconds: Option<u64>,
    /// Retry deadline of the current failure streak.
    pub retry_deadline: Option<String>,
    /// Blocked by a ThirdPartyConfigError until updated.
    pub blocked_until_update: bool,
    /// Recent lifecycle transitions, oldest first.
    pub history: Vec<TransitionView>,
    /// The latest health events, newest first, each marked resolved or not.
    pub health: Vec<HealthView>,
}

fn now_ms() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl App {
    /// Builds the app from the environment: DynamoDB + Secrets Manager when
    /// `STATE_TABLE` is set, the local state file (`STATE_FILE`) otherwise.
    pub async fn from_env() -> Result<App> {
        let settings = Settings::from_env();
        let http = knowbe4_http_client()?;
        let (store, vault): (Arc<dyn StateStore>, Vault) = match std::env::var("STATE_TABLE") {
            Ok(table) if !table.is_empty() => {
                let aws = crate::store::aws_env::load_checked().await?;
                let dynamo = aws_sdk_dynamodb::Client::new(&aws);
                let secrets = aws_sdk_secretsmanager::Client::new(&aws);
                (
                    Arc::new(crate::store::dynamo::DynamoStore::new(dynamo, table)),
                    Vault::SecretsManager(SecretsManagerVault::new(
                        secrets,
                        settings.secret_prefix.clone(),
                    )),
                )
            }
            _ => {
                let path =
                    std::env::var("STATE_FILE").unwrap_or_else(|_| DEFAULT_STATE_FILE.into());
                let file = FileStore::new(path);
                (Arc::new(file.clone()), Vault::Local(file))
            }
        };
        let default_destination = default_destination_from_env(&vault, settings.validation).await?;
        Ok(App::new(store, vault, http, default_destination, settings))
    }

    /// Builds the app from parts (tests, embedding). `http` is the KnowBe4 client (see
    /// [`knowbe4_http_client`]); destinations always get [`crate::sink::http_client`].
    pub fn new(
        store: Arc<dyn StateStore>,
        vault: Vault,
        http: reqwest::Client,
        default_destination: DestinationConfig,
        settings: Settings,
    ) -> App {
        let destination_http = crate::sink::http_client()
            .expect("the destination HTTP client builds (as reqwest::Client::new does)");
        App {
            store,
            vault,
            http,
            destination_http,
            default_destination,
            settings,
            secrets_cache: Mutex::new(HashMap::new()),
        }
    }

    /// A source's secrets, from the cache unless `force`.
    pub async fn source_secrets(
        &self,
        record: &SourceRecord,
        force: bool,
    ) -> Result<SourceSecrets> {
        if !force
            && let Some(cached) = self
                .secrets_cache
                .lock()
                .expect("not poisoned")
                .get(&record.id)
        {
            return Ok(cached.clone());
        }
        let secrets = match (&record.secret_ref, &self.vault) {
            (SecretRef::SecretsManager { secret_id }, Vault::SecretsManager(vault)) => {
                vault.get(secret_id).await?
            }
            (SecretRef::LocalFile, Vault::Local(file)) => file.get_secrets(&record.id).await?,
            _ => {
                return Err(Error::Secret {
                    name: record.id.clone(),
                    message: "the source's secret is kept in a store this deployment does not use"
                        .into(),
                    config: true,
                });
            }
        };
        self.secrets_cache
            .lock()
            .expect("not poisoned")
            .insert(record.id.clone(), secrets.clone());
        Ok(secrets)
    }

    /// The id of the destination a source with `spec` and `secrets` forwards to.
    fn destination_id(&self, spec: &crate::config::SourceSpec, secrets: &SourceSecrets) -> String {
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

    /// The destination for a source: its own, or the deployment's default. Its URL is
    /// checked again (https, or http to loopback behind the switch) every time, because
    /// the stored one may predate the rule or have been edited.
    pub fn destination_for(
        &self,
        record: &SourceRecord,
        secrets: &SourceSecrets,
    ) -> Result<Destination> {
        let (config, prefix) = match &record.spec.destination {
            Some(spec) => (
                DestinationConfig {
                    format: spec.format,
                    url: secrets.destination_url.clone(),
                    token: secrets.destination_token.clone(),
                },
                "source.config.",
            ),
            None => (self.default_destination.clone(), "FORWARD_"),
        };
        config
            .check_transport(self.settings.validation.allow_custom_base_url)
            .map_err(|e| rename_destination_field(e, prefix))?;
        Destination::new(config, self.destination_http.clone())
    }

    /// Stores and logs a health event (one JSON line). Failing to store it is logged,
    /// not raised: the run's own outcome matters more.
    pub async fn record_health(&self, event: &HealthEvent, ttl_secs: i64) {
        tracing::warn!(
            health_event = %serde_json::to_string(event).unwrap_or_default(),
            source_id = %event.source_id,
            kind = event.kind.as_str(),
            count = event.count,
            "Health event recorded."
        );
        self.settings.metrics.emit(&crate::metrics::health_line(
            &event.source_id,
            event.kind,
            event.last_seen,
        ));
        let expires = event.last_seen / 1000 + ttl_secs;
        if let Err(err) = self.store.put_health(event, expires).await {
            tracing::error!(source_id = %event.source_id, error = %err, "Could not store a health event.");
        }
    }

    /// Runs an action until `deadline`; returns its JSON result.
    pub async fn handle(&self, action: Action, deadline: Instant) -> Result<serde_json::Value> {
        match action {
            Action::Collect {
                source_id,
                scheduled,
            } => {
                let trigger = if scheduled {
                    Trigger::Schedule
                } else {
                    Trigger::OnDemand
                };
                let reports = self
                    .collect_with(source_id.as_deref(), deadline, trigger)
                    .await?;
                Ok(serde_json::json!({ "runs": reports }))
            }
            Action::Create {
                source,
                id,
                allow_duplicate,
            } => {
                let id = self.create_with(source, id, allow_duplicate).await?;
                Ok(serde_json::json!({ "sourceId": id, "state": Lifecycle::Pending }))
            }
            Action::Update { source_id, source } => {
                self.update(&source_id, source).await?;
                Ok(serde_json::json!({ "sourceId": source_id, "updated": true }))
            }
            Action::Restart { source_id } => {
                self.restart(&source_id).await?;
                Ok(serde_json::json!({ "sourceId": source_id, "restarted": true }))
            }
            Action::Delete { source_id } => {
                self.delete(&source_id).await?;
                Ok(serde_json::json!({ "sourceId": source_id, "deleted": true }))
            }
            Action::Status { source_id } => to_json(&self.status(source_id.as_deref()).await?),
            Action::Health { source_id } => {
                let events = self.health(&source_id).await?;
                let last_success = self
                    .store
                    .load_state(&source_id)
                    .await?
                    .and_then(|s| s.value.last_success);
                let views: Vec<HealthView> = events
                    .iter()
                    .map(|e| HealthView::new(e, last_success))
                    .collect();
                to_json(&views)
            }
            Action::List {} => to_json(&self.status(None).await?),
        }
    }

    /// Collects one source, or every source with bounded concurrency, on demand (see
    /// [`collect_with`](Self::collect_with)).
    pub async fn collect(
        &self,
        source_id: Option<&str>,
        deadline: Instant,
    ) -> Result<Vec<RunReport>> {
        self.collect_with(source_id, deadline, Trigger::OnDemand)
            .await
    }

    /// Collects one source, or every source with bounded concurrency. One failing source
    /// never stops the others. `trigger` says whether the runs follow the freshness plan
    /// (a schedule) or collect what their budget pays for now (on demand).
    pub async fn collect_with(
        &self,
        source_id: Option<&str>,
        deadline: Instant,
        trigger: Trigger,
    ) -> Result<Vec<RunReport>> {
        let ids: Vec<String> = match source_id {
            Some(id) => {
                if self.store.get_source(id).await?.is_none() {
                    return Err(Error::NotFound(id.to_string()));
                }
                vec![id.to_string()]
            }
            None => self
                .store
                .list_sources()
                .await?
                .into_iter()
                .map(|r| r.id)
                .collect(),
        };
        let reports: Vec<RunReport> = futures::stream::iter(ids)
            .map(|id| async move {
                let report = collect_source_with(self, &id, deadline, trigger).await;
                log_run(&report);
                self.settings
                    .metrics
                    .emit(&crate::metrics::run_line(&report, now_ms()));
                report
            })
            .buffer_unordered(self.settings.concurrency)
            .collect()
            .await;
        Ok(reports)
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
        let account = account_id(&parsed.spec.api_base, &secrets.api_key);
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
        let secret_ref = self.put_secrets(&id, &secrets).await?;
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
            self.delete_secrets(&id, &secret_ref).await.ok();
            return Err(err);
        }
        tracing::info!(source_id = %id, name = %record.spec.name, "Source created.");
        Ok(id)
    }

    async fn put_secrets(&self, id: &str, secrets: &SourceSecrets) -> Result<SecretRef> {
        match &self.vault {
            Vault::SecretsManager(vault) => Ok(SecretRef::SecretsManager {
                secret_id: vault.put(id, secrets).await?,
            }),
            Vault::Local(file) => {
                file.put_secrets(id, secrets).await?;
                Ok(SecretRef::LocalFile)
            }
        }
    }

    async fn delete_secrets(&self, id: &str, secret_ref: &SecretRef) -> Result<()> {
        self.secrets_cache.lock().expect("not poisoned").remove(id);
        match (secret_ref, &self.vault) {
            (SecretRef::SecretsManager { secret_id }, Vault::SecretsManager(vault)) => {
                vault.delete(secret_id).await
            }
            // The local secret goes with the source's items.
            _ => Ok(()),
        }
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
        record.secret_ref = self.put_secrets(id, &secrets).await?;
        self.secrets_cache.lock().expect("not poisoned").remove(id);
        record.account = Some(account_id(&parsed.spec.api_base, &secrets.api_key));
        record.destination = Some(self.destination_id(&parsed.spec, &secrets));
        record.spec = parsed.spec;
        record.config_version += 1;
        record.updated_at = now_ms();
        self.store.update_source(&record).await?;
        self.reset_state(id, "Source updated; the next run starts collecting again.")
            .await?;
        tracing::info!(source_id = %id, config_version = record.config_version, "Source updated.");
        Ok(())
    }

    /// Clears `Error` and the retry streak; the next run starts at `Started`.
    pub async fn restart(&self, id: &str) -> Result<()> {
        if self.store.get_source(id).await?.is_none() {
            return Err(Error::NotFound(id.to_string()));
        }
        self.reset_state(id, "Restarted; the next run starts collecting again.")
            .await?;
        tracing::info!(source_id = %id, "Source restarted.");
        Ok(())
    }

    async fn reset_state(&self, id: &str, reason: &str) -> Result<()> {
        for _ in 0..5 {
            let Some(mut state) = self.store.load_state(id).await? else {
                return Err(Error::NotFound(id.to_string()));
            };
            let s = &mut state.value;
            s.streak = None;
            s.blocked_config_version = None;
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
        self.delete_secrets(id, &record.secret_ref).await?;
        self.store.delete_source(id).await?;
        tracing::info!(source_id = %id, "Source deleted.");
        Ok(())
    }

    /// Status of one source or all.
    pub async fn status(&self, id: Option<&str>) -> Result<Vec<SourceStatus>> {
        let records = match id {
            Some(id) => vec![
                self.store
                    .get_source(id)
                    .await?
                    .ok_or_else(|| Error::NotFound(id.to_string()))?,
            ],
            None => self.store.list_sources().await?,
        };
        let mut out = Vec::with_capacity(records.len());
        let now = OffsetDateTime::now_utc();
        let today = utc_day(now);
        for record in records {
            let state = self.store.load_state(&record.id).await?.map(|s| s.value);
            let state = state.unwrap_or_else(|| SourceState::new(record.created_at));
            let (used, members) = match &state.account {
                Some(account) => (
                    self.store.quota_used(account, &today).await?,
                    self.store.account_members(account, now_ms()).await?,
                ),
                None => (0, Default::default()),
            };
            let health = self.store.list_health(&record.id, 5).await?;
            let limit = members.limit().unwrap_or(record.spec.daily_request_limit);
            let account_note = members.disagree().then(|| {
                let limits: Vec<String> = members
                    .members
                    .iter()
                    .map(|(id, limit)| format!("{id}: {limit}"))
                    .collect();
                format!(
                    "the sources sharing this account give different daily limits ({}); the smallest applies",
                    limits.join(", ")
                )
            });
            let now_ns = EventTime::from_datetime(now);
            out.push(SourceStatus {
                id: record.id.clone(),
                name: record.spec.name.clone(),
                state: state.lifecycle,
                since: state.since().map(rfc3339_ms),
                last_success: state.last_success.map(rfc3339_ms),
                checkpoint: state.checkpoint.high.map(EventTime::to_rfc3339),
                backlog_ranges: state.checkpoint.gaps.len(),
                backlog: crate::domain::status::backlog(
                    &state.checkpoint,
                    state.counters.forwarded_total,
                    limit.saturating_sub(used),
                    limit,
                    now,
                ),
                lateness_window_narrowed: state.checkpoint.recent_floor.is_some(),
                quota_used_today: used,
                quota_left_today: limit.saturating_sub(used),
                daily_request_limit: limit,
                account: state.account.clone(),
                account_sources: members.members.iter().map(|(id, _)| id.clone()).collect(),
                account_note,
                freshness: crate::domain::planner::freshness(&crate::domain::planner::PlanInput {
                    daily_limit: limit,
                    used_today: used,
                    now,
                    interval_secs: self.settings.schedule_interval_secs,
                    sources: members.count(),
                    page_size: state
                        .counters
                        .page_size
                        .unwrap_or(crate::domain::checkpoint::DEFAULT_PAGE_SIZE),
                    window_events: state.checkpoint.recent.len() as u64,
                    reread_at: state.checkpoint.reread_at,
                    head_at: state.checkpoint.head_at,
                    gaps: state.checkpoint.gaps.len(),
                    lateness_secs: record.spec.lateness_window_secs,
                }),
                quota_reached: state.counters.quota_exhausted_day.as_deref()
                    == Some(today.as_str())
                    || used >= limit,
                forwarded_last_run: state.counters.last_run_forwarded,
                forwarded_today: if state.counters.day == today {
                    state.counters.forwarded_today
                } else {
                    0
                },
                forwarded_total: state.counters.forwarded_total,
                lag_seconds: state
                    .counters
                    .newest_forwarded
                    .map(|n| EventTime(n).secs_until(now_ns)),
                retry_deadline: state.streak.as_ref().map(|s| rfc3339_ms(s.deadline)),
                blocked_until_update: state.blocked_config_version == Some(record.config_version),
                history: state.history.iter().map(TransitionView::from).collect(),
                health: health
                    .iter()
                    .map(|e| HealthView::new(e, state.last_success))
                    .collect(),
            });
        }
        Ok(out)
    }

    /// Health events of a source, newest first.
    pub async fn health(&self, id: &str) -> Result<Vec<HealthEvent>> {
        if self.store.get_source(id).await?.is_none() {
            return Err(Error::NotFound(id.to_string()));
        }
        self.store.list_health(id, 100).await
    }
}

/// Logs the one-line run summary, each field once: the whole report as one JSON field
/// (`run_summary`) when logs are JSON, the main fields as `key=value` for people.
fn log_run(report: &RunReport) {
    if crate::logging::json_logs() {
        tracing::info!(
            run_summary = %serde_json::to_string(report).unwrap_or_default(),
            "Run finished."
        );
        return;
    }
    tracing::info!(
        source_id = %report.source_id,
        outcome = ?report.outcome,
        detail = %report.detail,
        fetched = report.fetched,
        forwarded = report.forwarded,
        duplicates_dropped = report.duplicates_dropped,
        requests = report.requests,
        quota_left = report.quota_left,
        duration_ms = report.duration_ms,
        "Run finished."
    );
}

/// Names a destination error's field as the user wrote it: `source.config.destination.url`
/// for a source's own destination, `FORWARD_URL` for the deployment's.
fn rename_destination_field(err: Error, prefix: &str) -> Error {
    match err {
        Error::InvalidConfig { field, message } if prefix == "FORWARD_" => Error::InvalidConfig {
            field: format!(
                "FORWARD_{}",
                field
                    .trim_start_matches("destination.")
                    .to_ascii_uppercase()
            ),
            message,
        },
        Error::InvalidConfig { field, message } => Error::InvalidConfig {
            field: format!("{prefix}{field}"),
            message,
        },
        other => other,
    }
}

async fn default_destination_from_env(
    vault: &Vault,
    options: ValidationOptions,
) -> Result<DestinationConfig> {
    async fn secret_env(vault: &Vault, plain: &str, secret: &str) -> Result<Option<SecretString>> {
        if let Ok(v) = std::env::var(plain)
            && !v.trim().is_empty()
        {
            return Ok(Some(SecretString::from(v.trim().to_string())));
        }
        match (std::env::var(secret), vault) {
            (Ok(id), Vault::SecretsManager(vault)) if !id.trim().is_empty() => {
                Ok(Some(vault.get_string(id.trim()).await?))
            }
            (Ok(id), Vault::Local(_)) if !id.trim().is_empty() => Err(Error::config(
                secret,
                "Secrets Manager ids need STATE_TABLE (deployed mode); set the plain variable locally",
            )),
            _ => Ok(None),
        }
    }
    let url = secret_env(vault, "FORWARD_URL", "FORWARD_URL_SECRET").await?;
    let token = secret_env(vault, "FORWARD_TOKEN", "FORWARD_TOKEN_SECRET").await?;
    let format = match std::env::var("FORWARD_FORMAT") {
        Ok(f) if !f.trim().is_empty() => f.parse::<Format>().map_err(|_| {
            Error::config(
                "FORWARD_FORMAT",
                "must be one of sumo, splunk-hec, ndjson, stdout",
            )
        })?,
        _ if url.is_some() => Format::Sumo,
        _ => Format::Stdout,
    };
    let config = DestinationConfig { format, url, token };
    config
        .validate()
        .and_then(|()| config.check_transport(options.allow_custom_base_url))
        .map_err(|e| rename_destination_field(e, "FORWARD_"))?;
    Ok(config)
}

fn to_json(value: &impl Serialize) -> Result<serde_json::Value> {
    serde_json::to_value(value).map_err(|e| Error::store("serialising the result", e))
}
