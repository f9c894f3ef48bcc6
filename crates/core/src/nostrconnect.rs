//! `nostrconnect://` — the NIP-46 connection a *client* starts: the user pastes the
//! client's URI, keycast creates an authorization bound to that client under the chosen
//! policy, and the NIP-46 transport answers the client on its relays with the secret
//! ([`crate::signer::Change::NostrConnect`]).
//!
//! `nostrconnect://<client-pubkey>?relay=<url>&relay=…&secret=<s>&perms=…&name=…&url=…`
//! (relay and secret required). The client's secret is echoed back once and never stored:
//! the authorization gets its own random connect secret that nobody learns, so no other
//! client can bind it.

use nostr::PublicKey;

use crate::secret::Secret;

/// Relays accepted from one URI; each is a connection keycast opens on the user's behalf.
pub const MAX_RELAYS: usize = 5;
/// Longest accepted secret, name or URL parameter.
const MAX_PARAM_LEN: usize = 512;

/// A parsed `nostrconnect://` URI.
#[derive(Debug, Clone)]
pub struct NostrConnectUri {
    /// The client's public key: requests come from it, replies go to it.
    pub client: PublicKey,
    /// Where the client listens (ws:// or wss://), at most [`MAX_RELAYS`].
    pub relays: Vec<String>,
    /// Echoed to the client in the `connect` response, which it must check.
    pub secret: Secret<String>,
    /// Display hints, never used for authorization.
    pub name: Option<String>,
    pub url: Option<String>,
    /// Permissions the client asks for (`method[:param]`, comma-separated); shown, not
    /// granted — the user's chosen policy decides.
    pub perms: Option<String>,
}

/// Why a string is not a usable `nostrconnect://` URI. The text is for the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NostrConnectError(String);

fn bad(message: impl Into<String>) -> NostrConnectError {
    NostrConnectError(message.into())
}

impl NostrConnectUri {
    /// Parses and checks a URI.
    ///
    /// # Errors
    /// [`NostrConnectError`] saying what is missing or wrong.
    pub fn parse(text: &str) -> Result<Self, NostrConnectError> {
        let text = text.trim();
        let rest = text
            .strip_prefix("nostrconnect://")
            .ok_or_else(|| bad("a nostrconnect URI starts with nostrconnect://"))?;
        let (key, query) = rest.split_once('?').unwrap_or((rest, ""));
        let client = PublicKey::from_hex(key.trim_end_matches('/'))
            .map_err(|_| bad("the nostrconnect URI must name the client's public key as 64 hex characters"))?;
        let (mut relays, mut secret, mut name, mut url, mut perms) = (Vec::new(), None, None, None, None);
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            if v.len() > MAX_PARAM_LEN {
                return Err(bad(format!("the {k} parameter is too long")));
            }
            let v = v.into_owned();
            match k.as_ref() {
                "relay" => {
                    let relay = nostr::RelayUrl::parse(&v)
                        .map_err(|_| bad(format!("relay {v:?} is not a ws:// or wss:// URL")))?;
                    let relay = relay.to_string();
                    if !relays.contains(&relay) {
                        relays.push(relay);
                    }
                }
                "secret" => secret = Some(v),
                "name" => name = Some(v),
                "url" => url = Some(v),
                "perms" => perms = Some(v),
                _ => {} // image and future hints
            }
        }
        if relays.is_empty() {
            return Err(bad("the nostrconnect URI names no relay (relay=wss://…)"));
        }
        if relays.len() > MAX_RELAYS {
            return Err(bad(format!("the nostrconnect URI names more than {MAX_RELAYS} relays")));
        }
        let secret = secret
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad("the nostrconnect URI has no secret (secret=…)"))?;
        Ok(NostrConnectUri {
            client,
            relays,
            secret: Secret::new(secret),
            name,
            url,
            perms,
        })
    }

    /// Refuses relays on loopback, private, link-local or otherwise internal addresses:
    /// keycast opens a connection to every relay a URI names, and on a hosted instance a
    /// pasted URI must not make it reach into its own network. (Names are judged as
    /// written; one that resolves to an internal address is not caught here.)
    ///
    /// # Errors
    /// [`NostrConnectError`] naming the relay.
    pub fn refuse_internal_relays(&self) -> Result<(), NostrConnectError> {
        match self.relays.iter().find(|r| is_internal(r)) {
            Some(relay) => Err(bad(format!(
                "relay {relay} is an internal address; this keycast only connects to public relays \
                 (KEYCAST_NOSTRCONNECT_INTERNAL_RELAYS=true allows them)"
            ))),
            None => Ok(()),
        }
    }

    /// What the user sees as the app: the `url` hint's origin, else the name, else the
    /// client key (short).
    pub fn display_origin(&self) -> String {
        let origin = self
            .url
            .as_deref()
            .and_then(|u| url::Url::parse(u).ok())
            .filter(|u| u.scheme() == "https" || u.scheme() == "http")
            .map(|u| u.origin().ascii_serialization());
        match (origin, &self.name) {
            (Some(origin), _) => origin,
            (None, Some(name)) => format!("nostrconnect: {name}"),
            (None, None) => format!("nostrconnect: {}…", &self.client.to_hex()[..12]),
        }
    }
}

/// Whether a relay URL names this machine or a private network.
fn is_internal(relay: &str) -> bool {
    use std::net::IpAddr;
    let Ok(url) = url::Url::parse(relay) else {
        return true;
    };
    match url.host() {
        Some(url::Host::Ipv4(ip)) => internal_ip(IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => internal_ip(IpAddr::V6(ip)),
        Some(url::Host::Domain(name)) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            name == "localhost"
                || [".localhost", ".local", ".internal", ".lan"]
                    .iter()
                    .any(|s| name.ends_with(s))
        }
        None => true,
    }
}

fn internal_ip(ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                // 100.64.0.0/10, carrier-grade NAT (also used inside cloud networks)
                || (v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return internal_ip(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || (first & 0xfe00) == 0xfc00 // unique local fc00::/7
                || (first & 0xffc0) == 0xfe80 // link-local fe80::/10
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> String {
        nostr::Keys::generate().public_key().to_hex()
    }

    #[test]
    fn parses_relays_secret_and_hints() {
        let pk = client();
        let uri = NostrConnectUri::parse(&format!(
            "nostrconnect://{pk}?relay=wss%3A%2F%2Fr1.example&relay=ws://127.0.0.1:7000&secret=abc&perms=sign_event%3A1&name=My%20App&url=https://app.example/path"
        ))
        .unwrap();
        assert_eq!(uri.client.to_hex(), pk);
        assert_eq!(uri.relays, ["wss://r1.example", "ws://127.0.0.1:7000"]);
        assert_eq!(uri.secret.expose(), "abc");
        assert_eq!(uri.perms.as_deref(), Some("sign_event:1"));
        assert_eq!(uri.display_origin(), "https://app.example");
    }

    #[test]
    fn internal_relays_are_told_apart_from_public_ones() {
        let pk = client();
        let uri = |relay: &str| NostrConnectUri::parse(&format!("nostrconnect://{pk}?relay={relay}&secret=s")).unwrap();
        for internal in [
            "ws://127.0.0.1:7000",
            "ws://localhost:7000",
            "wss://10.1.2.3",
            "wss://192.168.0.9",
            "wss://169.254.169.254",
            "wss://100.100.1.1",
            "ws://[::1]:7000",
            "wss://[fd00::1]",
            "wss://[::ffff:10.0.0.1]",
            "wss://relay.internal",
        ] {
            let err = uri(internal).refuse_internal_relays().unwrap_err().to_string();
            assert!(
                err.contains("KEYCAST_NOSTRCONNECT_INTERNAL_RELAYS"),
                "{internal}: {err}"
            );
        }
        for public in ["wss://relay.damus.io", "wss://8.8.8.8", "wss://[2001:db8::1]"] {
            assert!(uri(public).refuse_internal_relays().is_ok(), "{public}");
        }
    }

    #[test]
    fn refuses_what_a_signer_cannot_answer() {
        let pk = client();
        let cases = [
            ("bunker://x?relay=wss://r&secret=s".to_owned(), "starts with"),
            ("nostrconnect://nothex?relay=wss://r&secret=s".to_owned(), "64 hex"),
            (format!("nostrconnect://{pk}?secret=s"), "no relay"),
            (
                format!("nostrconnect://{pk}?relay=https://r.example&secret=s"),
                "not a ws",
            ),
            (format!("nostrconnect://{pk}?relay=wss://r.example"), "no secret"),
            (
                format!("nostrconnect://{pk}?relay=wss://r.example&secret="),
                "no secret",
            ),
        ];
        for (text, expected) in cases {
            let err = NostrConnectUri::parse(&text).unwrap_err().to_string();
            assert!(err.contains(expected), "{text}: {err}");
        }
        let many: String = (0..=MAX_RELAYS).map(|i| format!("relay=wss://r{i}.example&")).collect();
        assert!(NostrConnectUri::parse(&format!("nostrconnect://{pk}?{many}secret=s")).is_err());
    }
}
