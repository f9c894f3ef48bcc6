//! Azure Blob Storage settings from the variables Azure's own tools read: the
//! `AZURE_STORAGE_CONNECTION_STRING` that the `az` CLI, every Azure SDK and Azurite's docs
//! use, or the separate `AZURE_STORAGE_ACCOUNT_NAME` / `AZURE_STORAGE_ACCOUNT_KEY`, and
//! `AZURE_STORAGE_USE_EMULATOR` (object_store's switch for Azurite). Everything is read
//! through the `env` closure [`super::super::Store::from_url`] was given; nothing from
//! the process environment directly.

use super::super::StoreError;

/// The development account every Azurite accepts, and its published key (Azurite's
/// README; it is no secret).
const DEV_ACCOUNT: &str = "devstoreaccount1";
const DEV_ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
/// Where Azurite listens by default; the account is the first path segment there.
const DEV_BLOB_SERVICE: &str = "http://127.0.0.1:10000";

/// What the environment says about the account and where its blob service is.
#[derive(Debug, Default, PartialEq)]
pub(super) struct AzureSettings {
    pub account: Option<String>,
    pub key: Option<String>,
    pub sas: Option<String>,
    /// The account's blob service URL (`BlobEndpoint`), when not the public cloud's
    /// `https://<account>.blob.core.windows.net`.
    pub endpoint: Option<url::Url>,
}

impl AzureSettings {
    /// Reads the connection string if set (it wins), else the separate variables.
    pub fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<AzureSettings, StoreError> {
        let mut settings = match env("AZURE_STORAGE_CONNECTION_STRING") {
            Some(text) => parse_connection_string(&text)?,
            None if env("AZURE_STORAGE_USE_EMULATOR").is_some_and(|v| matches!(v.as_str(), "1" | "true")) => {
                // object_store's emulator convention: the service at AZURITE_BLOB_STORAGE_URL.
                let service = env("AZURITE_BLOB_STORAGE_URL").unwrap_or_else(|| DEV_BLOB_SERVICE.into());
                let account = env("AZURE_STORAGE_ACCOUNT_NAME").unwrap_or_else(|| DEV_ACCOUNT.into());
                let endpoint = format!("{}/{account}", service.trim_end_matches('/'));
                AzureSettings {
                    endpoint: Some(parse_url("AZURITE_BLOB_STORAGE_URL", &endpoint)?),
                    key: Some(env("AZURE_STORAGE_ACCOUNT_KEY").unwrap_or_else(|| DEV_ACCOUNT_KEY.into())),
                    account: Some(account),
                    sas: None,
                }
            }
            None => AzureSettings::default(),
        };
        settings.account = settings.account.or_else(|| env("AZURE_STORAGE_ACCOUNT_NAME"));
        settings.key = settings.key.or_else(|| env("AZURE_STORAGE_ACCOUNT_KEY"));
        Ok(settings)
    }
}

/// Parses `Key=Value;Key=Value` as Azure documents it. Keys for other services (queues,
/// tables, files) are ignored; an unknown key is an error, so a typo is not silently
/// dropped.
fn parse_connection_string(text: &str) -> Result<AzureSettings, StoreError> {
    let bad = |reason: String| StoreError::Config {
        variable: "AZURE_STORAGE_CONNECTION_STRING",
        reason,
    };
    let mut settings = AzureSettings::default();
    let (mut protocol, mut suffix, mut development) = ("https".to_string(), None, false);
    for (index, pair) in text
        .split(';')
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
        .enumerate()
    {
        // The pair itself is not echoed: it may be a key.
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| bad(format!("part {} is not Key=Value", index + 1)))?;
        match key.trim() {
            "AccountName" => settings.account = Some(value.to_string()),
            "AccountKey" => settings.key = Some(value.to_string()),
            "SharedAccessSignature" => settings.sas = Some(value.to_string()),
            "BlobEndpoint" => settings.endpoint = Some(parse_url("AZURE_STORAGE_CONNECTION_STRING", value)?),
            "DefaultEndpointsProtocol" => protocol = value.to_string(),
            "EndpointSuffix" => suffix = Some(value.to_string()),
            "UseDevelopmentStorage" => development = value.eq_ignore_ascii_case("true"),
            "QueueEndpoint" | "TableEndpoint" | "FileEndpoint" | "DevelopmentStorageProxyUri" => {}
            other => return Err(bad(format!("unknown key {other:?}"))),
        }
    }
    if development {
        settings.account.get_or_insert_with(|| DEV_ACCOUNT.into());
        settings.key.get_or_insert_with(|| DEV_ACCOUNT_KEY.into());
        if settings.endpoint.is_none() {
            let endpoint = format!("{DEV_BLOB_SERVICE}/{DEV_ACCOUNT}");
            settings.endpoint = Some(parse_url("AZURE_STORAGE_CONNECTION_STRING", &endpoint)?);
        }
    }
    if settings.endpoint.is_none() {
        if let (Some(account), Some(suffix)) = (&settings.account, &suffix) {
            let endpoint = format!("{protocol}://{account}.blob.{suffix}");
            settings.endpoint = Some(parse_url("AZURE_STORAGE_CONNECTION_STRING", &endpoint)?);
        }
    }
    if settings.account.is_none() {
        return Err(bad("has no AccountName (nor UseDevelopmentStorage=true)".into()));
    }
    Ok(settings)
}

fn parse_url(variable: &'static str, value: &str) -> Result<url::Url, StoreError> {
    let url = url::Url::parse(value).map_err(|err| StoreError::Config {
        variable,
        reason: format!("blob endpoint is not a valid URL: {err}"),
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(StoreError::Config {
            variable,
            reason: format!("blob endpoint scheme must be http or https, not {:?}", url.scheme()),
        });
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn read(vars: &[(&str, &str)]) -> Result<AzureSettings, StoreError> {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        AzureSettings::from_env(&move |name| vars.get(name).cloned())
    }

    #[test]
    fn azurite_connection_string_gives_account_key_and_path_style_endpoint() {
        let text = format!(
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={DEV_ACCOUNT_KEY};\
             BlobEndpoint=http://127.0.0.1:10391/devstoreaccount1;QueueEndpoint=http://127.0.0.1:10001/devstoreaccount1;"
        );
        let settings = read(&[("AZURE_STORAGE_CONNECTION_STRING", &text)]).unwrap();
        assert_eq!(settings.account.as_deref(), Some("devstoreaccount1"));
        assert_eq!(settings.key.as_deref(), Some(DEV_ACCOUNT_KEY));
        assert_eq!(
            settings.endpoint.unwrap().as_str(),
            "http://127.0.0.1:10391/devstoreaccount1"
        );
    }

    #[test]
    fn use_development_storage_means_azurite_on_its_default_port() {
        let settings = read(&[("AZURE_STORAGE_CONNECTION_STRING", "UseDevelopmentStorage=true")]).unwrap();
        assert_eq!(settings.account.as_deref(), Some(DEV_ACCOUNT));
        assert_eq!(
            settings.endpoint.unwrap().as_str(),
            "http://127.0.0.1:10000/devstoreaccount1"
        );
    }

    #[test]
    fn endpoint_suffix_builds_the_public_endpoint() {
        let text =
            "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=a2V5;EndpointSuffix=core.chinacloudapi.cn";
        let settings = read(&[("AZURE_STORAGE_CONNECTION_STRING", text)]).unwrap();
        assert_eq!(
            settings.endpoint.unwrap().as_str(),
            "https://acct.blob.core.chinacloudapi.cn/"
        );
    }

    #[test]
    fn emulator_switch_reads_azurite_url_through_env() {
        let settings = read(&[
            ("AZURE_STORAGE_USE_EMULATOR", "true"),
            ("AZURITE_BLOB_STORAGE_URL", "http://127.0.0.1:12345"),
        ])
        .unwrap();
        assert_eq!(
            settings.endpoint.unwrap().as_str(),
            "http://127.0.0.1:12345/devstoreaccount1"
        );
        assert_eq!(settings.key.as_deref(), Some(DEV_ACCOUNT_KEY));
    }

    #[test]
    fn separate_variables_without_connection_string() {
        let settings = read(&[
            ("AZURE_STORAGE_ACCOUNT_NAME", "acct"),
            ("AZURE_STORAGE_ACCOUNT_KEY", "a2V5"),
        ])
        .unwrap();
        assert_eq!(settings.account.as_deref(), Some("acct"));
        assert_eq!(settings.endpoint, None);
    }

    #[test]
    fn bad_connection_strings_name_the_variable_without_echoing_secrets() {
        for text in [
            "AccountName=acct;AccountKey=c2VjcmV0;Typo=1",
            "AccountKey=c2VjcmV0",
            "AccountName=acct;c2VjcmV0",
            "AccountName=acct;BlobEndpoint=ftp://host/acct",
        ] {
            let err = read(&[("AZURE_STORAGE_CONNECTION_STRING", text)]).unwrap_err();
            assert!(
                matches!(
                    err,
                    StoreError::Config {
                        variable: "AZURE_STORAGE_CONNECTION_STRING",
                        ..
                    }
                ),
                "{text}: {err}"
            );
            assert!(!err.to_string().contains("c2VjcmV0"), "{err}");
        }
    }
}
