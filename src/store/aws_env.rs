//! The AWS configuration of deployed mode (`STATE_TABLE` set), checked before first use.
//!
//! Without a region or credentials the SDK only fails at the first DynamoDB call, after
//! several long warnings, with `dispatch failure`. Checking both up front lets the error
//! say what is missing and how to provide it.

use std::time::Duration;

use aws_sdk_dynamodb::config::ProvideCredentials;

use crate::error::{Error, Result};

/// How long the credential chain may take (IMDS on a machine outside AWS times out).
const CREDENTIALS_TIMEOUT: Duration = Duration::from_secs(10);

/// Loads the SDK configuration from the environment and checks that it has a region and
/// credentials; the error names what is missing and the ways to provide it.
pub async fn load_checked() -> Result<aws_config::SdkConfig> {
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .load()
        .await;
    check(&config).await?;
    Ok(config)
}

async fn check(config: &aws_config::SdkConfig) -> Result<()> {
    if config.region().is_none() {
        return Err(Error::config(
            "AWS_REGION",
            "STATE_TABLE is set (state in DynamoDB) but no AWS region is configured: set \
             AWS_REGION (e.g. AWS_REGION=us-east-1) or use a profile with a region \
             (AWS_PROFILE); or unset STATE_TABLE to keep state in a local file (STATE_FILE)",
        ));
    }
    let Some(provider) = config.credentials_provider() else {
        return Err(missing_credentials(None));
    };
    match tokio::time::timeout(CREDENTIALS_TIMEOUT, provider.provide_credentials()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(err)) => Err(missing_credentials(Some(Box::new(err)))),
        Err(elapsed) => Err(missing_credentials(Some(Box::new(elapsed)))),
    }
}

fn missing_credentials(source: Option<Box<dyn std::error::Error + Send + Sync>>) -> Error {
    Error::Store {
        message: "STATE_TABLE is set (state in DynamoDB) but no AWS credentials were found: \
                  set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE (after \
                  `aws configure` or `aws sso login`), or run where an IAM role is attached; \
                  or unset STATE_TABLE to keep state in a local file (STATE_FILE)"
            .into(),
        source,
    }
}
