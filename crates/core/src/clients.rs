//! Registered apps: clients an operator vouches for (`keycast clients add`, the admin API),
//! and what an authorization request's `client_id` is worth.
//!
//! A registered client has a name people recognise and the exact redirect URIs it may use:
//! the consent page shows it as *verified*, and any other redirect URI is refused (RFC 6749
//! §3.1.2.3, RFC 9700 §4.1.3: exact string match). An unregistered `client_id` is just a
//! word the app chose: the consent page shows it as *unverified*, with the redirect host
//! (the one fact keycast can vouch for, since the code goes there) as the app's identity —
//! or, when the operator turns open registration off, refuses it.

use keycast_db::clients::{self as client_repo, ClientRow};
use keycast_db::{Db, RepoError};

use crate::oauth::{redirect_origin, OAuthError};
use crate::secret::random_bytes;

/// Longest app name, characters.
pub const MAX_NAME_CHARS: usize = 80;
/// Most redirect URIs per client.
pub const MAX_REDIRECT_URIS: usize = 10;

/// A registered client.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RegisteredClient {
    pub client_id: String,
    pub name: String,
    pub redirect_uris: Vec<String>,
    pub logo_url: Option<String>,
    pub created_at: i64,
}

/// What an operator registers.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct NewClient {
    pub name: String,
    pub redirect_uris: Vec<String>,
    #[serde(default)]
    pub logo_url: Option<String>,
}

/// Why a client could not be registered or read.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The registration is malformed; the message names the field.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("registered client {0} is corrupt")]
    Corrupt(String),
}

impl TryFrom<ClientRow> for RegisteredClient {
    type Error = ClientError;
    fn try_from(row: ClientRow) -> Result<Self, ClientError> {
        let redirect_uris =
            serde_json::from_str(&row.redirect_uris).map_err(|_| ClientError::Corrupt(row.client_id.clone()))?;
        Ok(RegisteredClient {
            client_id: row.client_id,
            name: row.name,
            redirect_uris,
            logo_url: row.logo_url,
            created_at: row.created_at,
        })
    }
}

fn invalid(message: impl Into<String>) -> ClientError {
    ClientError::Invalid(message.into())
}

/// Checks a registration: a name of 1 to [`MAX_NAME_CHARS`] characters, none that disguises
/// it ([`crate::shown::disguised`]), 1 to
/// [`MAX_REDIRECT_URIS`] redirect URIs that keycast would accept (https, or http on
/// loopback; no fragment), and a logo URL, if any, on https.
///
/// # Errors
/// [`ClientError::Invalid`] naming the field.
pub fn validate(new: &NewClient) -> Result<(), ClientError> {
    let name = new.name.trim();
    if name.is_empty() || name.chars().count() > MAX_NAME_CHARS || crate::shown::disguised(name) {
        return Err(invalid(format!(
            "name must be 1 to {MAX_NAME_CHARS} characters, and {}",
            crate::shown::REFUSED
        )));
    }
    if new.redirect_uris.is_empty() || new.redirect_uris.len() > MAX_REDIRECT_URIS {
        return Err(invalid(format!(
            "redirect_uris must list 1 to {MAX_REDIRECT_URIS} URIs"
        )));
    }
    for uri in &new.redirect_uris {
        redirect_origin(uri).map_err(|e| invalid(format!("redirect URI {uri:?}: {}", reason(e))))?;
    }
    if let Some(logo) = &new.logo_url {
        let ok = url::Url::parse(logo).is_ok_and(|u| u.scheme() == "https" && u.host().is_some());
        if !ok {
            return Err(invalid("logo_url must be an absolute https URL"));
        }
    }
    Ok(())
}

fn reason(err: OAuthError) -> String {
    match err {
        OAuthError::InvalidRequest { reason } => reason,
        other => other.to_string(),
    }
}

/// Whether `id` has the form of a registered app's id (`app_` and 24 hex digits): a name an
/// unregistered app chose for itself must not pass for one.
pub fn is_registered_form(id: &str) -> bool {
    id.strip_prefix("app_")
        .is_some_and(|hex| hex.len() == 24 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Registers a client under a new random id (`app_` and 24 hex digits).
///
/// # Errors
/// [`ClientError::Invalid`]; storage errors.
pub async fn register(db: &Db, new: &NewClient, now: i64) -> Result<RegisteredClient, ClientError> {
    validate(new)?;
    let row = ClientRow {
        client_id: format!("app_{}", hex::encode(random_bytes::<12>().expose())),
        name: new.name.trim().to_owned(),
        redirect_uris: serde_json::to_string(&new.redirect_uris).unwrap_or_else(|_| "[]".into()),
        logo_url: new.logo_url.clone(),
        created_at: now,
    };
    if !client_repo::insert(db, &row).await? {
        // 96 random bits collided: not going to happen, but never overwrite.
        return Err(invalid("client id collision; try again"));
    }
    row.try_into()
}

/// Every registered client, oldest first.
///
/// # Errors
/// Storage errors; [`ClientError::Corrupt`].
pub async fn list(db: &Db) -> Result<Vec<RegisteredClient>, ClientError> {
    client_repo::list(db)
        .await?
        .into_iter()
        .map(TryInto::try_into)
        .collect()
}

/// Removes a registration. Returns whether there was one. Grants already given to the app
/// stay until their owners revoke them; new authorization requests with its id are
/// treated as unregistered from now on.
///
/// # Errors
/// Storage errors.
pub async fn remove(db: &Db, client_id: &str) -> Result<bool, RepoError> {
    client_repo::delete(db, client_id).await
}

/// Who is asking, as the consent page shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientIdentity {
    /// Registered by the operator; the redirect URI is one of its own.
    Verified(RegisteredClient),
    /// A `client_id` nobody registered; only the redirect host is known.
    Unverified,
}

/// Judges an authorization request's client: a registered one must use one of its redirect
/// URIs exactly; an unregistered one is allowed only while `open_registration` is on.
///
/// # Errors
/// [`OAuthError::InvalidRequest`] for a redirect URI the registered client does not have;
/// [`OAuthError::UnauthorizedClient`] for an unregistered client with open registration
/// off; [`OAuthError::Internal`].
pub async fn identify(
    db: &Db,
    client_id: &str,
    redirect_uri: &str,
    open_registration: bool,
) -> Result<ClientIdentity, OAuthError> {
    let row = client_repo::find_by_id(db, client_id).await?;
    let Some(row) = row else {
        if open_registration {
            return Ok(ClientIdentity::Unverified);
        }
        return Err(OAuthError::UnauthorizedClient {
            reason: format!(
                "{client_id:?} is not an app registered with this keycast, and it accepts only registered apps"
            ),
        });
    };
    let client = RegisteredClient::try_from(row).map_err(|e| OAuthError::Internal(e.into()))?;
    if !client.redirect_uris.iter().any(|uri| uri == redirect_uri) {
        return Err(OAuthError::InvalidRequest {
            reason: "redirect_uri is not one of the URIs registered for this app (exact match)".into(),
        });
    }
    Ok(ClientIdentity::Verified(client))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(name: &str, uris: &[&str], logo: Option<&str>) -> NewClient {
        NewClient {
            name: name.into(),
            redirect_uris: uris.iter().map(|u| (*u).to_owned()).collect(),
            logo_url: logo.map(str::to_owned),
        }
    }

    #[test]
    fn registrations_are_validated_field_by_field() {
        assert!(validate(&new(
            "Damus",
            &["https://damus.example/cb"],
            Some("https://damus.example/l.png")
        ))
        .is_ok());
        for (bad, field) in [
            (new("", &["https://a.example/cb"], None), "name"),
            (new(&"x".repeat(81), &["https://a.example/cb"], None), "name"),
            (new("a\u{7}", &["https://a.example/cb"], None), "name"),
            (new("A", &[], None), "redirect_uris"),
            (new("A", &["http://a.example/cb"], None), "redirect URI"),
            (new("A", &["https://a.example/cb#x"], None), "redirect URI"),
            (
                new("A", &["https://a.example/cb"], Some("http://a.example/l.png")),
                "logo_url",
            ),
        ] {
            let err = validate(&bad).unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
    }

    #[tokio::test]
    async fn registered_clients_need_an_exact_redirect_and_unregistered_ones_open_registration() {
        let fx = crate::testing::fixture().await;
        let db = fx.pool();
        let client = register(db, &new(" Damus ", &["https://damus.example/cb"], None), 5)
            .await
            .unwrap();
        assert!(client.client_id.starts_with("app_") && client.client_id.len() == 28);
        assert_eq!(client.name, "Damus");
        let id = &client.client_id;
        assert_eq!(
            identify(db, id, "https://damus.example/cb", false).await.unwrap(),
            ClientIdentity::Verified(client.clone())
        );
        for near in [
            "https://damus.example/cb/",
            "https://damus.example/cb?x=1",
            "https://damus.example/CB",
        ] {
            let err = identify(db, id, near, true).await.unwrap_err();
            assert_eq!(err.code(), "invalid_request", "{near}");
        }
        assert_eq!(
            identify(db, "someone", "https://x.example/cb", true).await.unwrap(),
            ClientIdentity::Unverified
        );
        let refused = identify(db, "someone", "https://x.example/cb", false)
            .await
            .unwrap_err();
        assert_eq!(refused.code(), "unauthorized_client");
        assert_eq!(list(db).await.unwrap(), vec![client.clone()]);
        assert!(remove(db, id).await.unwrap());
        assert_eq!(
            identify(db, id, "https://elsewhere.example/cb", true).await.unwrap(),
            ClientIdentity::Unverified
        );
    }
}
