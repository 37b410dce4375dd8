//! The S3 client and the small async runtime it runs on, so the rest of the program calls plain functions.
//!
//! Configuration is the AWS SDK's own: the standard credential chain (environment, profile, web identity, ECS/EC2
//! roles), `AWS_REGION`, and `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3` for S3-compatible stores. With an endpoint URL
//! set, requests use path-style addressing (`http://host/bucket/key`, as MinIO-like stores expect) and send checksums
//! only where S3 requires them (many such stores reject the SDK's newer default trailers).

use std::future::Future;
use std::time::Duration;

use aws_config::meta::region::RegionProviderChain;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_s3::config::{RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::Client;
use aws_smithy_http_client::tls;

use super::StorageError;

/// Default multipart part size (and the size above which uploads go multipart).
pub const DEFAULT_PART_SIZE: u64 = 16 * 1024 * 1024;
/// S3's smallest part (all but the last).
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
/// Region used when none is configured (S3-compatible stores usually accept any).
const FALLBACK_REGION: &str = "us-east-1";

/// How transfers run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferOptions {
    /// Files larger than this are uploaded in parts of this size (at least [`MIN_PART_SIZE`]).
    pub part_size: u64,
    /// Objects (or parts) transferred at the same time.
    pub concurrency: usize,
    /// Tries per object when a transfer breaks mid-way (the SDK also retries each request itself).
    pub attempts: u32,
}

impl Default for TransferOptions {
    fn default() -> Self {
        Self {
            part_size: DEFAULT_PART_SIZE,
            concurrency: 8,
            attempts: 3,
        }
    }
}

/// A connected S3 client with its runtime. Create one per command and reuse it.
pub struct S3Store {
    runtime: tokio::runtime::Runtime,
    client: Client,
    endpoint: String,
    options: TransferOptions,
}

impl S3Store {
    /// Build the client from the environment (see the module doc).
    pub fn from_env(options: TransferOptions) -> Result<Self, StorageError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("semseg-s3")
            .enable_all()
            .build()
            .map_err(|e| StorageError::Setup(format!("cannot start the async runtime: {e}")))?;
        let endpoint_env = std::env::var("AWS_ENDPOINT_URL_S3")
            .or_else(|_| std::env::var("AWS_ENDPOINT_URL"))
            .ok()
            .filter(|url| !url.trim().is_empty());
        let sdk_config = runtime.block_on(
            aws_config::defaults(BehaviorVersion::latest())
                .http_client(
                    aws_smithy_http_client::Builder::new()
                        .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
                        .build_https(),
                )
                .region(RegionProviderChain::default_provider().or_else(FALLBACK_REGION))
                // Bounded: 3 tries with short backoff, so an unreachable endpoint fails in seconds, not minutes.
                .retry_config(
                    RetryConfig::standard()
                        .with_max_attempts(3)
                        .with_initial_backoff(Duration::from_millis(300)),
                )
                .timeout_config(
                    TimeoutConfig::builder()
                        .connect_timeout(Duration::from_secs(5))
                        .read_timeout(Duration::from_secs(60))
                        .build(),
                )
                .load(),
        );
        let endpoint_url = endpoint_env.or_else(|| sdk_config.endpoint_url().map(str::to_string));
        let mut builder = aws_sdk_s3::config::Builder::from(&sdk_config);
        if endpoint_url.is_some() {
            builder = builder
                .force_path_style(true)
                .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
                .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        }
        let region = sdk_config
            .region()
            .map_or_else(|| FALLBACK_REGION.to_string(), |r| r.to_string());
        let endpoint = endpoint_url.unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
        tracing::debug!(%endpoint, %region, "S3 client ready");
        let mut options = options;
        options.part_size = options.part_size.max(MIN_PART_SIZE);
        options.concurrency = options.concurrency.max(1);
        options.attempts = options.attempts.max(1);
        Ok(Self {
            runtime,
            client: Client::from_conf(builder.build()),
            endpoint,
            options,
        })
    }

    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// The endpoint requests go to, for messages.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn options(&self) -> &TransferOptions {
        &self.options
    }

    /// Run an S3 future to completion from synchronous code.
    pub(crate) fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }
}
