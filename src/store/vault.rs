//! Where a source's secrets are kept (Secrets Manager deployed, the state file locally),
//! and the ones this process has read: each source's secret is read once per cold start.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::domain::secrets::SourceSecrets;
use crate::domain::state::{SecretRef, SourceRecord};
use crate::error::{Error, Result};
use crate::store::file::FileStore;
use crate::store::secrets_manager::SecretsManagerVault;

/// Where source secrets are kept: Secrets Manager in AWS, the state file locally.
pub enum Vault {
    /// Deployed mode.
    SecretsManager(SecretsManagerVault),
    /// Local mode (`STATE_TABLE` unset).
    Local(FileStore),
}

/// The secret store of the deployment, with the secrets read this process.
pub struct Secrets {
    /// Where they are kept.
    pub vault: Vault,
    /// Secrets read this process, by source id: read once per cold start.
    cache: Mutex<HashMap<String, SourceSecrets>>,
}

impl Secrets {
    /// Secrets kept in `vault`, none read yet.
    pub fn new(vault: Vault) -> Secrets {
        Secrets {
            vault,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// A source's secrets, from the cache unless `force`.
    pub async fn source_secrets(
        &self,
        record: &SourceRecord,
        force: bool,
    ) -> Result<SourceSecrets> {
        if !force && let Some(cached) = self.cache.lock().expect("not poisoned").get(&record.id) {
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
        self.cache
            .lock()
            .expect("not poisoned")
            .insert(record.id.clone(), secrets.clone());
        Ok(secrets)
    }

    /// Stores a source's secrets; returns where they are.
    pub async fn put(&self, id: &str, secrets: &SourceSecrets) -> Result<SecretRef> {
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

    /// Deletes a source's secrets (and forgets the ones read).
    pub async fn delete(&self, id: &str, secret_ref: &SecretRef) -> Result<()> {
        self.forget(id);
        match (secret_ref, &self.vault) {
            (SecretRef::SecretsManager { secret_id }, Vault::SecretsManager(vault)) => {
                vault.delete(secret_id).await
            }
            // The local secret goes with the source's items.
            _ => Ok(()),
        }
    }

    /// Forgets the secrets read for `id`: the next read goes to the store.
    pub fn forget(&self, id: &str) {
        self.cache.lock().expect("not poisoned").remove(id);
    }
}
