//! Sources' secrets in AWS Secrets Manager: one secret per source, named
//! `{prefix}{source_id}` (the stack's prefix is `<stack>/sources/`, which no other secret
//! of the stack or of another stack shares), holding the JSON [`SecretDocument`]
//! (`{"apiKey": ..., "apiKeyPhishing": ..., "destinationUrl": ..., "destinationToken":
//! ...}`). The state store keeps only the secret's ARN.
//!
//! A secret is only ever written when it is this source's: it is created with the tags
//! [`SOURCE_TAG`] = source id and [`PREFIX_TAG`] = prefix, and an existing secret of the
//! same name is given a new value only when it carries both (so a source id can never
//! overwrite a secret it did not create). Deleting a source schedules its secret's
//! deletion with a [`RECOVERY_WINDOW_DAYS`]-day recovery window.
//!
//! Values never leave this module except as `SecretString`; errors name the secret and
//! say what went wrong, never what it holds. A missing, unreadable or malformed secret is
//! a configuration problem (`Error::Secret { config: true, .. }`); throttling, network and
//! service failures are transient (`config: false`).

use aws_sdk_secretsmanager::Client;
use aws_sdk_secretsmanager::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_secretsmanager::types::Tag;
use secrecy::{ExposeSecret, SecretString};

use crate::domain::secrets::{SecretDocument, SourceSecrets};
use crate::error::{Error, Result};

/// Error codes that mean the secret cannot be used as configured (as opposed to a
/// transient failure): missing, scheduled for deletion, or not readable by this role.
const CONFIG_ERROR_CODES: &[&str] = &[
    "ResourceNotFoundException",
    "InvalidRequestException",
    "DecryptionFailure",
    "AccessDeniedException",
];

/// Tag naming the source a secret belongs to.
pub const SOURCE_TAG: &str = "knowbe4-source:source-id";
/// Tag naming the prefix (the deployment) a secret belongs to.
pub const PREFIX_TAG: &str = "knowbe4-source:secret-prefix";
/// Days a deleted source's secret can still be restored (`RestoreSecret`); 7 is the
/// shortest window Secrets Manager allows.
pub const RECOVERY_WINDOW_DAYS: i64 = 7;

/// Reads and writes sources' secrets in Secrets Manager.
#[derive(Clone, Debug)]
pub struct SecretsManagerVault {
    /// The SDK client, built once per process and shared.
    client: Client,
    /// Prepended to a source id to name its secret; keeps the collector's secrets
    /// together (and lets an IAM policy scope to `{prefix}*`).
    prefix: String,
}

impl SecretsManagerVault {
    /// A vault naming secrets `{prefix}{source_id}`.
    pub fn new(client: Client, prefix: impl Into<String>) -> Self {
        SecretsManagerVault {
            client,
            prefix: prefix.into(),
        }
    }

    /// The name of the secret of `source_id`.
    pub fn secret_name(&self, source_id: &str) -> String {
        format!("{}{source_id}", self.prefix)
    }

    /// Stores `secrets` as the secret `{prefix}{source_id}`: creates it (tagged as this
    /// source's), or puts a new current value when it exists and is tagged as this
    /// source's (restoring it first when its deletion is scheduled). A secret of that
    /// name that is not this source's is left alone: a configuration error. Returns the
    /// secret's ARN.
    pub async fn put(&self, source_id: &str, secrets: &SourceSecrets) -> Result<String> {
        let name = self.secret_name(source_id);
        // Held as a SecretString so the serialised copy is zeroed when dropped.
        let body =
            SecretString::from(serde_json::to_string(&secrets.to_document()).map_err(|_| {
                Error::Secret {
                    name: name.clone(),
                    message: "the secrets could not be serialised".into(),
                    config: false,
                }
            })?);
        let tag = |key: &str, value: &str| Tag::builder().key(key).value(value).build();
        let created = self
            .client
            .create_secret()
            .name(&name)
            .description("KnowBe4 source secrets (API key, destination) of knowbe4-source.")
            .secret_string(body.expose_secret())
            .tags(tag(SOURCE_TAG, source_id))
            .tags(tag(PREFIX_TAG, &self.prefix))
            .send()
            .await;
        let err = match created {
            Ok(out) => return arn(&name, out.arn()),
            Err(err) => err,
        };
        // A name scheduled for deletion is refused with InvalidRequestException.
        if !err
            .as_service_error()
            .is_some_and(|e| e.is_resource_exists_exception() || e.is_invalid_request_exception())
        {
            return Err(secret_error(&name, "CreateSecret", err));
        }
        let existing = self
            .client
            .describe_secret()
            .secret_id(&name)
            .send()
            .await
            .map_err(|e| secret_error(&name, "DescribeSecret", e))?;
        let tagged = |key: &str, value: &str| {
            existing
                .tags()
                .iter()
                .any(|t| t.key() == Some(key) && t.value() == Some(value))
        };
        if !(tagged(SOURCE_TAG, source_id) && tagged(PREFIX_TAG, &self.prefix)) {
            return Err(Error::Secret {
                name,
                message: format!(
                    "a secret of this name exists and is not tagged as source {source_id}'s \
                     ({SOURCE_TAG}, {PREFIX_TAG}); it is left alone: choose another source id \
                     or SECRET_PREFIX"
                ),
                config: true,
            });
        }
        if existing.deleted_date().is_some() {
            self.client
                .restore_secret()
                .secret_id(&name)
                .send()
                .await
                .map_err(|e| secret_error(&name, "RestoreSecret", e))?;
        }
        let out = self
            .client
            .put_secret_value()
            .secret_id(&name)
            .secret_string(body.expose_secret())
            .send()
            .await
            .map_err(|e| secret_error(&name, "PutSecretValue", e))?;
        arn(&name, out.arn())
    }

    /// Reads a source's secrets (`secret_id` is a name or an ARN). The value must be a
    /// JSON [`SecretDocument`]; anything else is a configuration error.
    pub async fn get(&self, secret_id: &str) -> Result<SourceSecrets> {
        let value = self.get_value(secret_id).await?;
        let doc: SecretDocument = serde_json::from_str(value.expose_secret()).map_err(|e| {
            // serde's message can quote the value: report only where and what kind.
            Error::Secret {
                name: secret_id.to_string(),
                message: format!(
                    "the value is not a JSON object of strings (apiKey, apiKeyPhishing, destinationUrl, destinationToken) ({:?} error at line {} column {})",
                    e.classify(),
                    e.line(),
                    e.column()
                ),
                config: true,
            }
        })?;
        if doc.api_key.is_none() && doc.api_key_phishing.is_none() {
            return Err(Error::Secret {
                name: secret_id.to_string(),
                message: "the value is a JSON object with neither apiKey nor apiKeyPhishing".into(),
                config: true,
            });
        }
        Ok(SourceSecrets::from_document(doc))
    }

    /// Reads a single-valued secret, such as a destination URL or token shared by every
    /// source. A plain string value is returned as is (surrounding whitespace trimmed).
    /// A value that is a JSON object yields its `url` key, else its `token` key (each
    /// must be a string); an object with neither is a configuration error. A JSON string
    /// literal yields the string.
    pub async fn get_string(&self, secret_id: &str) -> Result<SecretString> {
        let value = self.get_value(secret_id).await?;
        let text = value.expose_secret().trim();
        let config_error = |message: &str| Error::Secret {
            name: secret_id.to_string(),
            message: message.to_string(),
            config: true,
        };
        if text.starts_with('{') {
            let object: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text)
                .map_err(|_| config_error("the value looks like JSON but is not a valid object"))?;
            return ["url", "token"]
                .iter()
                .find_map(|key| object.get(*key))
                .and_then(|v| v.as_str())
                .map(|v| SecretString::from(v.to_string()))
                .ok_or_else(|| {
                    config_error("the JSON value has no string \"url\" or \"token\" key")
                });
        }
        if text.starts_with('"')
            && let Ok(serde_json::Value::String(inner)) = serde_json::from_str(text)
        {
            return Ok(SecretString::from(inner));
        }
        if text.is_empty() {
            return Err(config_error("the value is empty"));
        }
        Ok(SecretString::from(text.to_string()))
    }

    /// Schedules a secret's deletion after a [`RECOVERY_WINDOW_DAYS`]-day recovery
    /// window: a mistaken delete (or one naming the wrong secret) can be undone with
    /// `RestoreSecret`. A secret that does not exist, or whose deletion is already
    /// scheduled, is not an error.
    pub async fn delete(&self, secret_id: &str) -> Result<()> {
        let result = self
            .client
            .delete_secret()
            .secret_id(secret_id)
            .recovery_window_in_days(RECOVERY_WINDOW_DAYS)
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(err)
                if err
                    .as_service_error()
                    .is_some_and(|e| e.is_resource_not_found_exception()) =>
            {
                tracing::debug!(secret_id, "Secret already gone, nothing to delete.");
                Ok(())
            }
            // Secrets Manager refuses to delete a secret marked deleted again.
            Err(err)
                if err
                    .as_service_error()
                    .is_some_and(|e| e.is_invalid_request_exception())
                    && self.is_marked_deleted(secret_id).await =>
            {
                tracing::debug!(secret_id, "Secret deletion already scheduled.");
                Ok(())
            }
            Err(err) => Err(secret_error(secret_id, "DeleteSecret", err)),
        }
    }

    /// Whether the secret exists with its deletion scheduled.
    async fn is_marked_deleted(&self, secret_id: &str) -> bool {
        self.client
            .describe_secret()
            .secret_id(secret_id)
            .send()
            .await
            .is_ok_and(|d| d.deleted_date().is_some())
    }

    /// The current string value of a secret.
    async fn get_value(&self, secret_id: &str) -> Result<SecretString> {
        let out = self
            .client
            .get_secret_value()
            .secret_id(secret_id)
            .send()
            .await
            .map_err(|e| secret_error(secret_id, "GetSecretValue", e))?;
        out.secret_string
            .map(SecretString::from)
            .ok_or_else(|| Error::Secret {
                name: secret_id.to_string(),
                message: "the secret has no string value (binary secrets are not supported)".into(),
                config: true,
            })
    }
}

/// The ARN from a create or put answer.
fn arn(name: &str, arn: Option<&str>) -> Result<String> {
    arn.map(str::to_string).ok_or_else(|| Error::Secret {
        name: name.to_string(),
        message: "Secrets Manager returned no ARN".into(),
        config: false,
    })
}

/// Maps an SDK failure to `Error::Secret`, deciding whether it is a configuration
/// problem. The message holds the service's error code and message, or the chain of
/// transport errors; never the raw response (the SDK's `Debug` would print it).
fn secret_error<E, R>(name: &str, operation: &str, err: SdkError<E, R>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let (detail, config) = match err.as_service_error() {
        Some(service) => {
            let code = service.code().unwrap_or("unknown error");
            let detail = match service.message() {
                Some(message) => format!("{code}: {message}"),
                None => code.to_string(),
            };
            (detail, CONFIG_ERROR_CODES.contains(&code))
        }
        None => (error_chain(&err), false),
    };
    Error::Secret {
        name: name.to_string(),
        message: format!("{operation} failed: {detail}"),
        config,
    }
}

/// An error and its sources, `Display` only.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
