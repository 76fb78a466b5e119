//! A KnowBe4 account as the limits see it: one id per (API host, key), shared by every
//! source and process that uses the key.
//!
//! KnowBe4 counts both the daily quota and the 4 requests per second per account, so
//! the quota ledger, the send-slot record that paces requests across processes, and the
//! list of sources sharing the budget are all keyed by [`account_id`].

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

/// A stable, non-reversible id for the account behind (`api_base`, `key`): the first 16
/// bytes of SHA-256 over a domain tag, the normalised base URL and the key, hex encoded.
///
/// KnowBe4 keys are long random tokens, so the id cannot be turned back into the key or
/// used to test guesses of it in practice; it is stored (state table, local file) and may
/// be logged. The key itself never is.
pub fn account_id(api_base: &str, key: &SecretString) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"knowbe4-source account v1\0");
    hasher.update(
        api_base
            .trim_end_matches('/')
            .to_ascii_lowercase()
            .as_bytes(),
    );
    hasher.update([0]);
    hasher.update(key.expose_secret().trim().as_bytes());
    hex::encode(&hasher.finalize()[..16])
}

/// A stable id for a destination (format and URL), to refuse a second source that would
/// send the same account's events to the same place. Non-reversible like
/// [`account_id`]: a Sumo URL holds a secret token.
pub fn destination_id(format: &str, url: Option<&SecretString>) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"knowbe4-source destination v1\0");
    hasher.update(format.as_bytes());
    hasher.update([0]);
    if let Some(url) = url {
        hasher.update(url.expose_secret().trim().as_bytes());
    }
    hex::encode(&hasher.finalize()[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_id_per_host_and_key_and_never_the_key() {
        let key = SecretString::from("canary-key-0123456789");
        let a = account_id("https://api.events.knowbe4.com/", &key);
        assert_eq!(a, account_id("https://API.events.knowbe4.com", &key));
        assert_ne!(a, account_id("https://api-eu.events.knowbe4.com", &key));
        assert_ne!(
            a,
            account_id(
                "https://api.events.knowbe4.com",
                &SecretString::from("other")
            )
        );
        assert_eq!(a.len(), 32);
        assert!(!a.contains("canary"));
        assert_ne!(
            destination_id("sumo", Some(&SecretString::from("https://x/1"))),
            destination_id("sumo", Some(&SecretString::from("https://x/2")))
        );
    }
}
