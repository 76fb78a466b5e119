//! The application: clients built once per process, and every action (collect, create,
//! update, restart, delete, status, health, list) behind one entry point shared by the
//! Lambda handler and the command line. The source-management actions are in `sources`,
//! `status` and `health` in `status`; a collection run is [`crate::run`], which borrows
//! what it needs through [`App::run_context`].

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::time::Instant;

use crate::config::ValidationOptions;
use crate::domain::secrets::SourceSecrets;
use crate::domain::state::{HealthEvent, Lifecycle, SourceRecord};
use crate::domain::status::HealthView;
use crate::error::{Error, Result};
use crate::run::{RunContext, RunReport, Trigger, collect_source_types};
use crate::sink::{Destination, DestinationConfig, Format, rename_destination_field};
use crate::store::StateStore;
use crate::store::file::{DEFAULT_STATE_FILE, FileStore};
use crate::store::secrets_manager::SecretsManagerVault;
use crate::store::vault::Secrets;

mod sources;
mod status;

pub use crate::settings::{DEFAULT_SECRET_PREFIX, Settings};
pub use crate::store::vault::Vault;
pub use status::SourceStatus;

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

/// Everything an action needs, built once per process (cold start) and shared.
pub struct App {
    /// The state store.
    pub store: Arc<dyn StateStore>,
    /// The secret store, with the secrets read this process.
    pub secrets: Secrets,
    /// The HTTP client (connection pool) for KnowBe4 ([`knowbe4_http_client`]).
    pub http: reqwest::Client,
    /// The HTTP client for destinations ([`crate::sink::http_client`]): its own, because
    /// destinations must not follow redirects nor have their replies decompressed.
    pub destination_http: reqwest::Client,
    /// The deployment's destination (from `FORWARD_*`), for sources without their own.
    pub default_destination: DestinationConfig,
    /// Tunables.
    pub settings: Settings,
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
        /// Only this data type (`events` or `phishing`), now, ignoring its poll interval;
        /// without it a run collects every data type that is due.
        #[serde(default, rename = "dataType")]
        data_type: Option<crate::run::DataType>,
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
                data_type: None,
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

fn now_ms() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
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
            http,
            destination_http,
            default_destination,
            settings,
            secrets: Secrets::new(vault),
        }
    }

    /// A source's secrets, from the cache unless `force` (see
    /// [`RunContext::source_secrets`]).
    pub async fn source_secrets(
        &self,
        record: &SourceRecord,
        force: bool,
    ) -> Result<SourceSecrets> {
        self.run_context().source_secrets(record, force).await
    }

    /// The destination for a source: its own, or the deployment's default (see
    /// [`RunContext::destination_for`]).
    pub fn destination_for(
        &self,
        record: &SourceRecord,
        secrets: &SourceSecrets,
    ) -> Result<Destination> {
        self.run_context().destination_for(record, secrets)
    }

    /// What a run borrows from the app: its clients, stores and tunables.
    pub fn run_context(&self) -> RunContext<'_> {
        RunContext {
            store: &self.store,
            knowbe4_http: &self.http,
            settings: &self.settings,
            secrets: &self.secrets,
            default_destination: &self.default_destination,
            destination_http: &self.destination_http,
        }
    }

    /// Stores and logs a health event (see [`RunContext::record_health`]).
    pub async fn record_health(&self, event: &HealthEvent, ttl_secs: i64) {
        self.run_context().record_health(event, ttl_secs).await
    }

    /// Runs an action until `deadline`; returns its JSON result.
    pub async fn handle(&self, action: Action, deadline: Instant) -> Result<serde_json::Value> {
        match action {
            Action::Collect {
                source_id,
                scheduled,
                data_type,
            } => {
                let trigger = if scheduled {
                    Trigger::Schedule
                } else {
                    Trigger::OnDemand
                };
                let reports = self
                    .collect_types(source_id.as_deref(), deadline, trigger, data_type)
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
                let state = self.store.load_state(&source_id).await?.map(|s| s.value);
                let views: Vec<HealthView> = events
                    .iter()
                    .map(|e| {
                        let ok = state
                            .as_ref()
                            .and_then(|s| s.last_success_of(e.data_type.as_deref()));
                        HealthView::new(e, ok)
                    })
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
        self.collect_types(source_id, deadline, trigger, None).await
    }

    /// As [`collect_with`](Self::collect_with), for only the data type `only` names (now,
    /// ignoring its poll interval), or every data type that is due.
    pub async fn collect_types(
        &self,
        source_id: Option<&str>,
        deadline: Instant,
        trigger: Trigger,
        only: Option<crate::run::DataType>,
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
                let report =
                    collect_source_types(self.run_context(), &id, deadline, trigger, only).await;
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
}

/// Logs the one-line run summary, each field once: the whole report as one JSON field
/// (`run_summary`) when logs are JSON, the main fields as `key=value` for people.
pub(crate) fn log_run(report: &RunReport) {
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
