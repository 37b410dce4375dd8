//! `semseg serve` options from SageMaker's environment variables (a file of its own: it sets process variables).

use clap::Parser;
use semseg::serve::{BatchStrategy, ServeArgs, ServeConfig};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    serve: ServeArgs,
}

#[test]
fn sagemaker_variables_configure_the_server() -> anyhow::Result<()> {
    let defaults = ServeConfig::from_args(&Cli::try_parse_from(["serve"])?.serve)?;
    assert_eq!(defaults.addr.port(), 8080);
    assert_eq!(defaults.max_payload_bytes, 6 << 20);
    assert_eq!(defaults.execution.max_payload_in_mb, 6);
    assert_eq!(defaults.execution.batch_strategy, BatchStrategy::SingleRecord);
    assert_eq!(defaults.execution.max_concurrent_transforms, defaults.workers);
    assert!(defaults.request_timeout.as_secs() < 60);

    // Edition 2021: set_var is safe; this test binary has no other thread reading the environment.
    std::env::set_var("SAGEMAKER_BIND_TO_PORT", "9123");
    std::env::set_var("SAGEMAKER_MAX_PAYLOAD_IN_MB", "25");
    std::env::set_var("SAGEMAKER_MAX_CONCURRENT_TRANSFORMS", "40");
    std::env::set_var("SAGEMAKER_BATCH_STRATEGY", "MULTI_RECORD");
    let config = ServeConfig::from_args(&Cli::try_parse_from(["serve"])?.serve)?;
    assert_eq!(config.addr.port(), 9123);
    assert_eq!(config.max_payload_bytes, 25 << 20);
    assert_eq!(config.execution.max_payload_in_mb, 25);
    assert_eq!(config.execution.max_concurrent_transforms, 40);
    assert_eq!(config.execution.batch_strategy, BatchStrategy::MultiRecord);
    assert!(config.queue >= 40, "the queue covers the advertised concurrency");
    let json = serde_json::to_value(&config.execution)?;
    assert_eq!(
        json,
        serde_json::json!({"MaxConcurrentTransforms": 40, "BatchStrategy": "MULTI_RECORD", "MaxPayloadInMB": 25})
    );

    std::env::set_var("SAGEMAKER_MAX_PAYLOAD_IN_MB", "101");
    assert!(
        Cli::try_parse_from(["serve"]).is_err(),
        "SageMaker allows at most 100 MB"
    );
    std::env::set_var("SAGEMAKER_MAX_PAYLOAD_IN_MB", "6");
    assert!(Cli::try_parse_from(["serve", "--request-timeout", "60"])
        .map_err(anyhow::Error::from)
        .and_then(|cli| ServeConfig::from_args(&cli.serve))
        .is_err());
    Ok(())
}
