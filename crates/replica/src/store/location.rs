//! Where a replica lives: turning a replica URL and the provider's standard environment
//! variables into an object-store client ([`Store::from_url`] calls in here). Kept apart from
//! the store's operations because it is all configuration: schemes, buckets, credentials,
//! endpoints, and keeping secrets out of descriptions.

use super::*;
use object_store::azure::AzureConfigKey;
use object_store::gcp::GcpCredential;
use object_store::{ClientOptions, StaticCredentialProvider};

mod azure_settings;

use azure_settings::AzureSettings;

/// Region used when neither `AWS_REGION` nor `AWS_DEFAULT_REGION` is set,
/// as in Litestream.
const DEFAULT_AWS_REGION: &str = "us-east-1";

/// Environment variables for ambient AWS credentials (EKS web identity, ECS
/// task roles), passed through so a pod or task role works without keys.
const AWS_AMBIENT_CREDENTIAL_VARS: [(&str, AmazonS3ConfigKey); 6] = [
    ("AWS_WEB_IDENTITY_TOKEN_FILE", AmazonS3ConfigKey::WebIdentityTokenFile),
    ("AWS_ROLE_ARN", AmazonS3ConfigKey::RoleArn),
    ("AWS_ROLE_SESSION_NAME", AmazonS3ConfigKey::RoleSessionName),
    (
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        AmazonS3ConfigKey::ContainerCredentialsRelativeUri,
    ),
    (
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        AmazonS3ConfigKey::ContainerCredentialsFullUri,
    ),
    (
        "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
        AmazonS3ConfigKey::ContainerAuthorizationTokenFile,
    ),
];

pub(super) fn open_file(url: &str, path: &str) -> Result<Store, StoreError> {
    if path.is_empty() {
        return Err(invalid_url(
            url,
            "missing directory, e.g. file:///var/lib/keycast/replica",
        ));
    }
    let dir = PathBuf::from(path);
    let local_dir = |source| StoreError::LocalDir {
        dir: dir.clone(),
        source,
    };
    std::fs::create_dir_all(&dir).map_err(local_dir)?;
    let root = std::fs::canonicalize(&dir).map_err(local_dir)?;
    let objects = LocalFileSystem::new_with_prefix(&root)
        .map_err(|source| StoreError::Backend {
            operation: "open",
            key: root.display().to_string(),
            source,
        })?
        // A replica is a backup: a put that returned must survive a crash.
        .with_fsync(true);
    let description = format!("file://{}", root.display());
    Ok(Store::new(
        Arc::new(objects),
        Backend::File,
        Path::default(),
        Some(root),
        description,
    ))
}

/// Splits `bucket/some/prefix` into the bucket and the cleaned prefix.
fn bucket_and_prefix(url: &str, rest: &str) -> Result<(String, Path), StoreError> {
    let (bucket, path) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(invalid_url(url, "missing bucket or container name"));
    }
    // Also keeps `user:password@` out of bucket names, and so out of describe().
    if !bucket
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    {
        return Err(invalid_url(
            url,
            "bucket and container names may only contain letters, digits, '.', '-' and '_'",
        ));
    }
    let mut segments = Vec::new();
    for segment in path.split('/') {
        match segment {
            "" | "." => {}
            ".." => return Err(invalid_url(url, "\"..\" is not allowed in the key prefix")),
            segment => segments.push(segment),
        }
    }
    let prefix = Path::parse(segments.join("/"))
        .map_err(|err| invalid_url(url, format!("the key prefix is not a valid object path: {err}")))?;
    Ok((bucket.to_string(), prefix))
}

pub(super) fn open_s3(url: &str, rest: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Store, StoreError> {
    let (bucket, prefix) = bucket_and_prefix(url, rest)?;
    if prefix.as_ref().is_empty() {
        return Err(invalid_url(
            url,
            "an s3 replica needs a key prefix: use s3://bucket/prefix",
        ));
    }
    let region = env("AWS_REGION")
        .or_else(|| env("AWS_DEFAULT_REGION"))
        .unwrap_or_else(|| DEFAULT_AWS_REGION.into());
    let mut builder = AmazonS3Builder::new()
        .with_retry(request_retries())
        .with_bucket_name(&bucket)
        .with_region(&region)
        // Create-only puts (If-None-Match: *) are how a fenced writer learns it lost a race.
        .with_conditional_put(S3ConditionalPut::ETagMatch)
        // Large objects are copied into place from a staging key, create-only: a part copy
        // completed with If-None-Match: * (see store/stream.rs).
        .with_config(AmazonS3ConfigKey::CopyIfNotExists, "multipart");
    builder = with_aws_credentials(builder, env)?;
    let endpoint = env("AWS_ENDPOINT_URL")
        .map(|value| parse_endpoint(&value))
        .transpose()?;
    // A custom endpoint has no instance-metadata service: without keys the SDK would wander
    // off to 169.254.169.254 and fail obscurely. Say what is missing instead.
    if endpoint.is_some() && env("AWS_ACCESS_KEY_ID").is_none() {
        return Err(StoreError::Config {
            variable: "AWS_ACCESS_KEY_ID",
            reason: "is required with AWS_ENDPOINT_URL (an S3-compatible server has no instance credentials)".into(),
        });
    }
    let mut description = format!("s3://{bucket}/{prefix} (");
    match &endpoint {
        Some(endpoint) => {
            builder = builder
                .with_endpoint(endpoint.as_str().trim_end_matches('/'))
                .with_allow_http(endpoint.scheme() == "http")
                .with_virtual_hosted_style_request(false);
            description.push_str(&format!("endpoint {}, ", redacted(endpoint)));
        }
        // Virtual-hosted style is AWS's default; dotted bucket names would break TLS with it.
        None => builder = builder.with_virtual_hosted_style_request(!bucket.contains('.')),
    }
    description.push_str(&format!("region {region})"));
    let objects = builder.build().map_err(|source| backend_config_error(url, source))?;
    Ok(Store::new(Arc::new(objects), Backend::S3, prefix, None, description))
}

fn with_aws_credentials(
    mut builder: AmazonS3Builder,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<AmazonS3Builder, StoreError> {
    let must_pair = |variable| StoreError::Config {
        variable,
        reason: "must be set together with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY".into(),
    };
    match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
        (Some(id), Some(secret)) => builder = builder.with_access_key_id(id).with_secret_access_key(secret),
        (Some(_), None) => return Err(must_pair("AWS_SECRET_ACCESS_KEY")),
        (None, Some(_)) => return Err(must_pair("AWS_ACCESS_KEY_ID")),
        (None, None) => {
            for (variable, key) in AWS_AMBIENT_CREDENTIAL_VARS {
                if let Some(value) = env(variable) {
                    builder = builder.with_config(key, value);
                }
            }
        }
    }
    if let Some(token) = env("AWS_SESSION_TOKEN") {
        builder = builder.with_token(token);
    }
    Ok(builder)
}

fn parse_endpoint(value: &str) -> Result<url::Url, StoreError> {
    let bad = |reason: String| StoreError::Config {
        variable: "AWS_ENDPOINT_URL",
        reason,
    };
    let endpoint = url::Url::parse(value).map_err(|err| bad(format!("not a valid URL: {err}")))?;
    if !matches!(endpoint.scheme(), "http" | "https") {
        return Err(bad(format!(
            "scheme must be http or https, not {:?}",
            endpoint.scheme()
        )));
    }
    Ok(endpoint)
}

pub(super) fn open_gcs(url: &str, rest: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Store, StoreError> {
    let (bucket, prefix) = bucket_and_prefix(url, rest)?;
    let mut builder = GoogleCloudStorageBuilder::new()
        .with_bucket_name(&bucket)
        .with_retry(request_retries());
    let mut description = format!("gs://{bucket}/{prefix}");
    // The variable Google's own client libraries (and Litestream, gcloud) honour: with it,
    // every request goes to the emulator, unauthenticated, and credentials are ignored.
    if let Some(host) = env("STORAGE_EMULATOR_HOST") {
        let base = emulator_base_url(&host)?;
        let no_auth = GcpCredential { bearer: String::new() };
        builder = builder
            .with_base_url(base.as_str().trim_end_matches('/'))
            .with_credentials(Arc::new(StaticCredentialProvider::new(no_auth)))
            .with_client_options(ClientOptions::new().with_allow_http(base.scheme() == "http"));
        description.push_str(&format!(" (emulator {})", redacted(&base)));
    } else {
        if let Some(path) = env("GOOGLE_SERVICE_ACCOUNT") {
            builder = builder.with_service_account_path(path);
        }
        if let Some(path) = env("GOOGLE_APPLICATION_CREDENTIALS") {
            builder = builder.with_application_credentials(path);
        }
    }
    let objects = builder.build().map_err(|source| backend_config_error(url, source))?;
    Ok(Store::new(Arc::new(objects), Backend::Gcs, prefix, None, description))
}

/// `STORAGE_EMULATOR_HOST` as Google's libraries read it: `host:port`, meaning plain
/// HTTP, or a full `http(s)://host:port` URL.
fn emulator_base_url(value: &str) -> Result<url::Url, StoreError> {
    let with_scheme = if value.contains("://") {
        value.to_string()
    } else {
        format!("http://{value}")
    };
    let bad = |reason: String| StoreError::Config {
        variable: "STORAGE_EMULATOR_HOST",
        reason,
    };
    let base = url::Url::parse(&with_scheme).map_err(|err| bad(format!("not host:port or a URL: {err}")))?;
    if !matches!(base.scheme(), "http" | "https") || base.host().is_none() {
        return Err(bad("expected host:port or http(s)://host:port".into()));
    }
    Ok(base)
}

pub(super) fn open_azure(url: &str, rest: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Store, StoreError> {
    // Litestream's form is abs://account@container/path.
    let (url_account, rest) = match rest.split_once('@') {
        Some((account, rest)) if !account.contains('/') => (Some(account.to_string()), rest),
        _ => (None, rest),
    };
    let (container, prefix) = bucket_and_prefix(url, rest)?;
    let settings = AzureSettings::from_env(env)?;
    let account = url_account.or(settings.account).ok_or_else(|| StoreError::Config {
        variable: "AZURE_STORAGE_ACCOUNT_NAME",
        reason: "must be set (or use abs://account@container/prefix, or AZURE_STORAGE_CONNECTION_STRING)".into(),
    })?;
    let mut builder = MicrosoftAzureBuilder::new()
        .with_retry(request_retries())
        .with_container_name(&container)
        .with_account(&account);
    if let Some(key) = settings.key {
        builder = builder.with_access_key(key);
    }
    if let Some(sas) = settings.sas {
        builder = builder.with_config(AzureConfigKey::SasKey, sas);
    }
    let mut description = format!("az://{container}/{prefix} (account {account}");
    if let Some(endpoint) = &settings.endpoint {
        builder = builder
            .with_endpoint(endpoint.as_str().trim_end_matches('/').to_string())
            .with_allow_http(endpoint.scheme() == "http");
        description.push_str(&format!(", endpoint {}", redacted(endpoint)));
    }
    description.push(')');
    let objects = builder.build().map_err(|source| backend_config_error(url, source))?;
    Ok(Store::new(Arc::new(objects), Backend::Azure, prefix, None, description))
}

fn backend_config_error(url: &str, source: object_store::Error) -> StoreError {
    StoreError::Backend {
        operation: "configure",
        key: redact_url_text(url),
        source,
    }
}

pub(super) fn invalid_url(url: &str, reason: impl Into<String>) -> StoreError {
    StoreError::InvalidUrl {
        url: redact_url_text(url),
        reason: reason.into(),
    }
}

/// Hides a `user:password@` in a URL someone put a secret into.
pub(super) fn redact_url_text(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    match authority.rfind('@') {
        Some(at) if authority[..at].contains(':') => format!("{scheme}://***@{}", &rest[at + 1..]),
        _ => url.to_string(),
    }
}

fn redacted(endpoint: &url::Url) -> String {
    let mut endpoint = endpoint.clone();
    // Both only fail for URLs that cannot carry credentials in the first place.
    let _ = endpoint.set_username("");
    let _ = endpoint.set_password(None);
    endpoint.as_str().trim_end_matches('/').to_string()
}

/// Retries inside one request stay short: the replicator has its own retry loop (with
/// backoff and health reporting), and a request that retries for minutes would stall it, a
/// durable wait, or a lease renewal far past any useful deadline.
fn request_retries() -> object_store::RetryConfig {
    object_store::RetryConfig {
        max_retries: 2,
        retry_timeout: std::time::Duration::from_secs(10),
        ..object_store::RetryConfig::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(url: &str, vars: &[(&str, &str)]) -> Result<Store, StoreError> {
        let vars: std::collections::HashMap<String, String> =
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Store::from_url(url, &move |name| vars.get(name).cloned()).map(|store| store.expect("a store"))
    }

    #[test]
    fn storage_emulator_host_is_host_port_or_url_and_is_described() {
        let store = open("gs://bkt/app", &[("STORAGE_EMULATOR_HOST", "127.0.0.1:4443")]).unwrap();
        assert_eq!(store.describe(), "gs://bkt/app (emulator http://127.0.0.1:4443)");
        let store = open("gs://bkt/app", &[("STORAGE_EMULATOR_HOST", "https://gcs.test:4443/")]).unwrap();
        assert_eq!(store.describe(), "gs://bkt/app (emulator https://gcs.test:4443)");
    }

    #[test]
    fn a_bad_storage_emulator_host_names_the_variable() {
        for value in ["ftp://host:1", "http://"] {
            let err = open("gs://bkt/app", &[("STORAGE_EMULATOR_HOST", value)]).unwrap_err();
            assert!(
                matches!(
                    err,
                    StoreError::Config {
                        variable: "STORAGE_EMULATOR_HOST",
                        ..
                    }
                ),
                "{value}: {err}"
            );
        }
    }

    #[test]
    fn an_azure_connection_string_sets_the_endpoint_and_keeps_the_key_out_of_descriptions() {
        let text = "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=c2VjcmV0LWtleQ==;\
                    BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;";
        let store = open("az://ctr/app", &[("AZURE_STORAGE_CONNECTION_STRING", text)]).unwrap();
        assert_eq!(
            store.describe(),
            "az://ctr/app (account devstoreaccount1, endpoint http://127.0.0.1:10000/devstoreaccount1)"
        );
        assert!(!format!("{store:?}").contains("c2VjcmV0"));
    }
}
