//! A source's secrets, and where they are kept.
//!
//! In AWS each source has one Secrets Manager secret holding a JSON object
//! (`{"apiKey": ..., "apiKeyPhishing": ..., "destinationUrl": ..., "destinationToken":
//! ...}`, each key its own member, present only when its data type is collected); the state store
//! keeps only its id. In local mode they live in the local state file. In memory they
//! are `SecretString`s, whose `Debug` prints `[REDACTED]`.

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// The secrets of one source.
#[derive(Clone, Debug)]
pub struct SourceSecrets {
    /// The KnowBe4 User Event API key, when the source collects user events.
    pub api_key: Option<SecretString>,
    /// The KnowBe4 Reporting API token, when the source collects phishing security tests.
    pub api_key_phishing: Option<SecretString>,
    /// A per-source destination URL (Sumo URLs carry their token).
    pub destination_url: Option<SecretString>,
    /// A per-source destination token (Splunk HEC, bearer).
    pub destination_token: Option<SecretString>,
}

/// The JSON form stored in Secrets Manager or the local file. Only built transiently,
/// to serialise; never logged.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretDocument {
    /// See [`SourceSecrets::api_key`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    /// See [`SourceSecrets::api_key_phishing`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_phishing: Option<String>,
    /// See [`SourceSecrets::destination_url`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_url: Option<String>,
    /// See [`SourceSecrets::destination_token`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_token: Option<String>,
}

impl std::fmt::Debug for SecretDocument {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretDocument([REDACTED])")
    }
}

impl SourceSecrets {
    /// The document to store.
    pub fn to_document(&self) -> SecretDocument {
        SecretDocument {
            api_key: self.api_key.as_ref().map(|s| s.expose_secret().to_string()),
            api_key_phishing: self
                .api_key_phishing
                .as_ref()
                .map(|s| s.expose_secret().to_string()),
            destination_url: self
                .destination_url
                .as_ref()
                .map(|s| s.expose_secret().to_string()),
            destination_token: self
                .destination_token
                .as_ref()
                .map(|s| s.expose_secret().to_string()),
        }
    }

    /// Back from a stored document.
    pub fn from_document(doc: SecretDocument) -> Self {
        SourceSecrets {
            api_key: doc.api_key.map(SecretString::from),
            api_key_phishing: doc.api_key_phishing.map(SecretString::from),
            destination_url: doc.destination_url.map(SecretString::from),
            destination_token: doc.destination_token.map(SecretString::from),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_secret_values() {
        let secrets = SourceSecrets {
            api_key: Some(SecretString::from("canary-key-123")),
            api_key_phishing: Some(SecretString::from("canary-token-456")),
            destination_url: Some(SecretString::from("https://x/receiver/canary-url")),
            destination_token: None,
        };
        let shown = format!("{secrets:?} {:?}", secrets.to_document());
        assert!(!shown.contains("canary"), "{shown}");
        let back = SourceSecrets::from_document(secrets.to_document());
        assert_eq!(back.api_key.unwrap().expose_secret(), "canary-key-123");
        assert_eq!(
            back.api_key_phishing.unwrap().expose_secret(),
            "canary-token-456"
        );
    }
}
