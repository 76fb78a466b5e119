//! The one error type of the collector, and the health event type each error maps to.
//!
//! Variants say what the caller should do: a `Config` error blocks the source until it is
//! updated or restarted; a `ThirdParty` or `FirstParty` error is retried until the retry deadline.
//! Messages never contain secrets: API keys and destination URLs are held as
//! `SecretString` and are never formatted into an error.

/// The three health event types of the hosted source, with its retry rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum HealthKind {
    /// Invalid configuration: no retries until the source is updated or restarted.
    ThirdPartyConfigError,
    /// Talking to KnowBe4 failed: retried until the retry deadline.
    ThirdPartyGenericError,
    /// Our own side failed (state store, secrets, destination): retried until the deadline.
    FirstPartyGenericError,
}

impl HealthKind {
    /// Whether scheduled runs retry this kind of failure.
    pub fn retried(self) -> bool {
        !matches!(self, HealthKind::ThirdPartyConfigError)
    }

    /// The name used in health events and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            HealthKind::ThirdPartyConfigError => "ThirdPartyConfigError",
            HealthKind::ThirdPartyGenericError => "ThirdPartyGenericError",
            HealthKind::FirstPartyGenericError => "FirstPartyGenericError",
        }
    }
}

/// Everything that can stop a collection run or a management action.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The source configuration (or a payload) is invalid; names the field.
    #[error("invalid configuration: {field}: {message}")]
    InvalidConfig {
        /// The offending field, as the user wrote it (e.g. `source.config.baseURL`).
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// KnowBe4 or the destination refused our credentials or configuration.
    #[error("{system} rejected the configuration: {message}")]
    ThirdPartyConfig {
        /// `KnowBe4` or the destination's kind.
        system: &'static str,
        /// What happened, without secrets.
        message: String,
        /// HTTP status, when there was one.
        status: Option<u16>,
    },
    /// KnowBe4 could not be reached or answered badly.
    #[error("KnowBe4 request failed: {message}")]
    KnowBe4 {
        /// What happened, without secrets.
        message: String,
        /// HTTP status, when there was one.
        status: Option<u16>,
        /// The underlying transport error, if any.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The destination did not accept the events (after its retries).
    #[error("destination failed: {message}")]
    Destination {
        /// What happened, without the URL (it carries a token).
        message: String,
        /// HTTP status, when there was one.
        status: Option<u16>,
    },
    /// The state store failed.
    #[error("state store failed: {message}")]
    Store {
        /// Which operation failed and how.
        message: String,
        /// The SDK or I/O error.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// Secrets Manager failed or the secret is unusable.
    #[error("secret {name} could not be read: {message}")]
    Secret {
        /// The secret's id (a name or ARN, never the value).
        name: String,
        /// What happened.
        message: String,
        /// Whether the secret is missing or unreadable (a config error) rather than a
        /// transient failure.
        config: bool,
    },
    /// The source does not exist.
    #[error("source {0} not found")]
    NotFound(String),
    /// Another writer changed the item first (lease lost or state version moved).
    #[error("conflict: {0}")]
    Conflict(String),
}

impl Error {
    /// Shorthand for a validation failure on `field`.
    pub fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidConfig {
            field: field.into(),
            message: message.into(),
        }
    }

    /// Shorthand for a state-store failure with its source.
    pub fn store(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::Store {
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }

    /// The health event type this error is reported as.
    pub fn health_kind(&self) -> HealthKind {
        match self {
            Error::InvalidConfig { .. } | Error::ThirdPartyConfig { .. } | Error::NotFound(_) => {
                HealthKind::ThirdPartyConfigError
            }
            Error::Secret { config: true, .. } => HealthKind::ThirdPartyConfigError,
            Error::KnowBe4 { .. } => HealthKind::ThirdPartyGenericError,
            Error::Destination { .. }
            | Error::Store { .. }
            | Error::Secret { .. }
            | Error::Conflict(_) => HealthKind::FirstPartyGenericError,
        }
    }

    /// The HTTP status behind this error, if any.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::ThirdPartyConfig { status, .. }
            | Error::KnowBe4 { status, .. }
            | Error::Destination { status, .. } => *status,
            _ => None,
        }
    }
}

/// Result with the collector's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Displays an error with its chain of causes, `outer: cause: root cause`, for people.
///
/// A cause whose text the previous message already contains is left out (many errors
/// repeat their source's message), so nothing is said twice. The errors of this crate never
/// format a secret, and the causes are transport, I/O and SDK errors, which do not either.
///
/// ```
/// use knowbe4_source::error::{Chain, Error};
///
/// let io = std::io::Error::new(std::io::ErrorKind::IsADirectory, "Is a directory");
/// let err = Error::store("reading /tmp", io);
/// assert_eq!(Chain(&err).to_string(), "state store failed: reading /tmp: Is a directory");
/// ```
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut shown = self.0.to_string();
        f.write_str(&shown)?;
        let mut cause = self.0.source();
        while let Some(err) = cause {
            let text = err.to_string();
            if !text.is_empty() && !shown.contains(&text) {
                write!(f, ": {text}")?;
                shown = text;
            }
            cause = err.source();
        }
        Ok(())
    }
}

impl Error {
    /// This error with its chain of causes (see [`Chain`]).
    pub fn chain(&self) -> String {
        Chain(self).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_the_documented_health_kinds() {
        assert_eq!(
            Error::config("source.config.name", "missing").health_kind(),
            HealthKind::ThirdPartyConfigError
        );
        let knowbe4 = Error::KnowBe4 {
            message: "500".into(),
            status: Some(500),
            source: None,
        };
        assert_eq!(knowbe4.health_kind(), HealthKind::ThirdPartyGenericError);
        assert_eq!(knowbe4.status(), Some(500));
        let dest = Error::Destination {
            message: "down".into(),
            status: None,
        };
        assert_eq!(dest.health_kind(), HealthKind::FirstPartyGenericError);
        assert!(!HealthKind::ThirdPartyConfigError.retried());
        assert!(HealthKind::FirstPartyGenericError.retried());
    }

    #[derive(Debug, thiserror::Error)]
    #[error("outer failed: inner broke")]
    struct Repeats(#[source] std::io::Error);

    #[test]
    fn the_chain_names_every_cause_once() {
        let root = std::io::Error::other("inner broke");
        let err = Error::store("saving", Repeats(root));
        // The middle error already says the root's text: it is not repeated.
        assert_eq!(
            err.chain(),
            "state store failed: saving: outer failed: inner broke"
        );
        let plain = Error::NotFound("x".into());
        assert_eq!(plain.chain(), "source x not found");
    }
}
