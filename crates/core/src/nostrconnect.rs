//! `nostrconnect://` — the NIP-46 connection a *client* starts: the user pastes the
//! client's URI, keycast creates an authorization bound to that client under the chosen
//! policy, and the NIP-46 transport answers the client on its relays with the secret
//! ([`crate::signer::Change::NostrConnect`]).
//!
//! `nostrconnect://<client-pubkey>?relay=<url>&relay=…&secret=<s>&perms=…&name=…&url=…`
//! (relay and secret required). The client's secret is echoed back once and never stored:
//! the authorization gets its own random connect secret that nobody learns, so no other
//! client can bind it.

use std::collections::HashSet;

use nostr::PublicKey;

use crate::secret::Secret;

/// Relays accepted from one URI; each is a connection keycast opens on the user's behalf.
pub const MAX_RELAYS: usize = 5;
/// Default for [`RelayCaps::per_account`].
pub const DEFAULT_MAX_RELAYS_PER_ACCOUNT: usize = 10;
/// Default for [`RelayCaps::total`].
pub const DEFAULT_MAX_RELAYS: usize = 200;

/// How many relays named by apps (every relay but the operator's) keycast accepts
/// (issue 12 item 6). Each is a WebSocket connection keycast keeps open and a party that
/// can send it events, so neither one account nor all of them together may add without
/// bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayCaps {
    /// Distinct relays across one account's live authorizations
    /// (`KEYCAST_NOSTRCONNECT_MAX_RELAYS_PER_ACCOUNT`).
    pub per_account: usize,
    /// Distinct relays across every live authorization (`KEYCAST_NOSTRCONNECT_MAX_RELAYS`).
    pub total: usize,
}

impl Default for RelayCaps {
    fn default() -> Self {
        RelayCaps {
            per_account: DEFAULT_MAX_RELAYS_PER_ACCOUNT,
            total: DEFAULT_MAX_RELAYS,
        }
    }
}
/// Longest accepted secret, name or URL parameter.
const MAX_PARAM_LEN: usize = 512;
/// Longest accepted URI: room for every parameter at its longest, percent-encoded (three
/// characters a byte), so that a URI as long as a body is refused before its parameters are
/// parsed and compared with each other.
pub const MAX_URI_LEN: usize = 24 * 1024;

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

/// Why [`NostrConnectUri::check_relay_caps`] refused, or could not decide.
#[derive(Debug, thiserror::Error)]
pub enum RelayCapError {
    /// Over a cap; the text is for the user.
    #[error(transparent)]
    Refused(#[from] NostrConnectError),
    #[error(transparent)]
    Repo(#[from] keycast_db::RepoError),
}

impl NostrConnectUri {
    /// Parses and checks a URI.
    ///
    /// # Errors
    /// [`NostrConnectError`] saying what is missing or wrong.
    pub fn parse(text: &str) -> Result<Self, NostrConnectError> {
        let text = text.trim();
        // Refused before it is read: each parameter is parsed and compared with those before.
        if text.len() > MAX_URI_LEN {
            return Err(bad(format!("a nostrconnect URI is at most {MAX_URI_LEN} bytes")));
        }
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
            // Shown and stored (the name becomes the grant's `client_id`): a control character
            // is never meant, a NUL is text PostgreSQL refuses, and see `shown::disguised`.
            if crate::shown::disguised(&v) {
                return Err(bad(format!("the {k} parameter {}", crate::shown::REFUSED)));
            }
            let v = v.into_owned();
            match k.as_ref() {
                "relay" => {
                    let relay = nostr::RelayUrl::parse(&v)
                        .map_err(|_| bad(format!("relay {v:?} is not a ws:// or wss:// URL")))?;
                    let relay = relay.to_string();
                    if !relays.contains(&relay) {
                        if relays.len() == MAX_RELAYS {
                            return Err(bad(format!("the nostrconnect URI names more than {MAX_RELAYS} relays")));
                        }
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

    /// Refuses relays on loopback, private, link-local or otherwise internal or special
    /// addresses: keycast opens a connection to every relay a URI names, and on a hosted
    /// instance a pasted URI must not make it reach into its own network. Names are resolved
    /// and every address they resolve to is judged ([`forbidden_ip`]); a name that does not
    /// resolve is refused too. The NIP-46 transport checks again at every connect and
    /// reconnect, since a name may resolve elsewhere later (issue 12 item 7).
    ///
    /// # Errors
    /// [`NostrConnectError`] naming the relay.
    pub async fn refuse_internal_relays(&self) -> Result<(), NostrConnectError> {
        for relay in &self.relays {
            if let Err(reason) = check_relay(relay).await {
                return Err(bad(format!(
                    "relay {relay} {reason}; this keycast only connects to public relays \
                     (KEYCAST_NOSTRCONNECT_INTERNAL_RELAYS=true allows them)"
                )));
            }
        }
        Ok(())
    }

    /// Refuses the URI if its relays would take `user` past `caps.per_account` distinct
    /// relays, or keycast past `caps.total`. The operator's relays (`operator`) never
    /// count; a relay already in use (by this account, or by anyone for the total) adds
    /// nothing. `stored` is this URI's own grant once it is stored, left out of the count:
    /// acceptances at once each find room before any stores its grant, so each counts again
    /// after (every other stored grant then counted) and takes its grant back if refused;
    /// of two that overlap, the later one stored sees the earlier. The NIP-46 transport also
    /// never connects to more than `caps.total` relays whatever the database holds.
    ///
    /// # Errors
    /// [`NostrConnectError`] naming the cap and its setting; database errors as
    /// [`RelayCapError::Repo`].
    pub async fn check_relay_caps(
        &self,
        db: &keycast_db::Db,
        user: &keycast_db::UserId,
        caps: RelayCaps,
        operator: &[String],
        stored: Option<&keycast_db::AuthorizationId>,
    ) -> Result<(), RelayCapError> {
        let except = serde_json::to_string(operator).unwrap_or_default();
        let rows = keycast_db::authz::list_live_relays(db, &except, keycast_db::now_unix()).await?;
        let rows = rows.into_iter().filter(|(id, _, _)| Some(id) != stored);
        // `wss://r.example` and `wss://r.example/` are one relay.
        let normalize = |r: &str| url::Url::parse(r).map(String::from).ok();
        let operator: HashSet<String> = operator.iter().filter_map(|r| normalize(r)).collect();
        let (mut mine, mut all) = (HashSet::new(), HashSet::new());
        for (_, owner, relays) in rows {
            let relays: Vec<String> = serde_json::from_str(&relays).unwrap_or_default();
            for relay in relays.iter().filter_map(|r| normalize(r)) {
                if operator.contains(&relay) {
                    continue;
                }
                if owner == *user {
                    mine.insert(relay.clone());
                }
                all.insert(relay);
            }
        }
        let new: HashSet<String> = self
            .relays
            .iter()
            .filter_map(|r| normalize(r))
            .filter(|r| !operator.contains(r))
            .collect();
        let mine_after = mine.len() + new.difference(&mine).count();
        if mine_after > caps.per_account {
            return Err(bad(format!(
                "this account would use {mine_after} relays named by apps, more than the {} this keycast allows \
                 (KEYCAST_NOSTRCONNECT_MAX_RELAYS_PER_ACCOUNT); revoke an app that uses others, or ask the app for \
                 a relay you already use",
                caps.per_account
            ))
            .into());
        }
        let all_after = all.len() + new.difference(&all).count();
        if all_after > caps.total {
            return Err(bad(format!(
                "this keycast already connects to as many relays named by apps as it allows ({}, \
                 KEYCAST_NOSTRCONNECT_MAX_RELAYS); ask the app for a relay in use already, or one of the \
                 operator's relays",
                caps.total
            ))
            .into());
        }
        Ok(())
    }

    /// What the user sees as the app: the `url` hint's origin, else the name, else the
    /// client key (short); always marked as a `nostrconnect` app's own word. Shown where an
    /// OAuth app's proven origin is (the dashboard, the grant and approval pages), a bare
    /// `https://damus.io` would pass an app for the user's real, OAuth-connected Damus.
    pub fn display_origin(&self) -> String {
        let origin = self
            .url
            .as_deref()
            .and_then(|u| url::Url::parse(u).ok())
            .filter(|u| u.scheme() == "https" || u.scheme() == "http")
            .map(|u| u.origin().ascii_serialization());
        match (origin, &self.name) {
            (Some(origin), _) => format!("nostrconnect: {origin} (unverified)"),
            (None, Some(name)) => format!("nostrconnect: {name}"),
            (None, None) => format!("nostrconnect: {}…", &self.client.to_hex()[..12]),
        }
    }
}

/// Resolves a relay URL's host and checks every address: `Ok` with the addresses (to
/// connect to exactly those, not to a second lookup's answer), or why it is refused.
///
/// # Errors
/// A sentence saying what is wrong with the relay (unparsable, an internal name, no address,
/// an internal address).
pub async fn check_relay(relay: &str) -> Result<Vec<std::net::SocketAddr>, String> {
    let url = url::Url::parse(relay).map_err(|_| "is not a URL".to_owned())?;
    let port = url.port_or_known_default().ok_or("has no port")?;
    let addrs: Vec<std::net::SocketAddr> = match url.host() {
        Some(url::Host::Ipv4(ip)) => vec![(ip, port).into()],
        Some(url::Host::Ipv6(ip)) => vec![(ip, port).into()],
        Some(url::Host::Domain(name)) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if internal_name(&name) {
                return Err("is an internal name".into());
            }
            let found = tokio::net::lookup_host((name.as_str(), port))
                .await
                .map_err(|_| "does not resolve".to_owned())?;
            found.collect()
        }
        None => return Err("has no host".into()),
    };
    if addrs.is_empty() {
        return Err("does not resolve".into());
    }
    match addrs.iter().find(|a| forbidden_ip(a.ip())) {
        Some(addr) => Err(format!("is an internal address ({})", addr.ip())),
        None => Ok(addrs),
    }
}

/// Names that mean this machine or its network whatever DNS says: `localhost`, the
/// conventional private suffixes, and single-label names (`metadata`, the cloud metadata
/// server; search domains make any bare name local).
fn internal_name(name: &str) -> bool {
    name == "localhost"
        || !name.contains('.')
        || [
            ".localhost",
            ".local",
            ".internal",
            ".lan",
            ".home.arpa",
            ".intranet",
            ".corp",
        ]
        .iter()
        .any(|s| name.ends_with(s))
}

/// Whether `ip` is anything but a public unicast address: loopback, private, link-local,
/// shared (CGNAT), benchmarking (198.18.0.0/15), documentation, multicast, reserved
/// (240.0.0.0/4), and the IPv6 forms that reach IPv4 or private space (IPv4-mapped and
/// -compatible, NAT64 64:ff9b::/96 and 64:ff9b:1::/48, 6to4 2002::/16, Teredo and the
/// other IETF assignments in 2001::/23, discard 100::/64, unique and site local).
pub fn forbidden_ip(ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            a == 0 // "this network"
                || a == 10
                || a == 127
                || (a == 100 && (b & 0xc0) == 64) // 100.64.0.0/10 shared (CGNAT, cloud)
                || (a == 169 && b == 254)
                || (a == 172 && (b & 0xf0) == 16)
                || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
                || (a == 192 && b == 0 && c == 2) // documentation
                || (a == 192 && b == 88 && c == 99) // 6to4 relay anycast
                || (a == 192 && b == 168)
                || (a == 198 && (b & 0xfe) == 18) // 198.18.0.0/15 benchmarking
                || (a == 198 && b == 51 && c == 100)
                || (a == 203 && b == 0 && c == 113)
                || a >= 224 // multicast 224/4, reserved 240/4, broadcast
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            if let Some(v4) = v6.to_ipv4_mapped() {
                return forbidden_ip(IpAddr::V4(v4));
            }
            v6.is_loopback()
                || v6.is_unspecified()
                || (s[0..6] == [0; 6]) // IPv4-compatible ::a.b.c.d (deprecated)
                || (s[0] == 0x64 && s[1] == 0xff9b) // NAT64 64:ff9b::/96 and 64:ff9b:1::/48
                || (s[0] == 0x100 && s[1..4] == [0; 3]) // discard 100::/64
                || (s[0] == 0x2001 && s[1] < 0x200) // 2001::/23, Teredo among them
                || (s[0] == 0x2001 && s[1] == 0xdb8) // documentation
                || s[0] == 0x2002 // 6to4
                || (s[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
                || (s[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
                || (s[0] & 0xffc0) == 0xfec0 // site-local fec0::/10
                || (s[0] & 0xff00) == 0xff00 // multicast
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
        assert_eq!(uri.display_origin(), "nostrconnect: https://app.example (unverified)");
    }

    #[tokio::test]
    async fn internal_relays_are_told_apart_from_public_ones() {
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
            "wss://metadata",
            "wss://198.18.0.1",
            "wss://240.0.0.1",
            "wss://[64:ff9b::a00:1]",
            "wss://[2002:a00:1::]",
            "wss://[2001:0:a00:1::]",
            "wss://[::a00:1]",
            "wss://0.0.0.0",
        ] {
            let err = uri(internal).refuse_internal_relays().await.unwrap_err().to_string();
            assert!(
                err.contains("KEYCAST_NOSTRCONNECT_INTERNAL_RELAYS"),
                "{internal}: {err}"
            );
        }
        for public in ["wss://8.8.8.8", "wss://[2606:4700::1111]", "wss://1.1.1.1:7777"] {
            assert!(uri(public).refuse_internal_relays().await.is_ok(), "{public}");
        }
    }

    #[tokio::test]
    async fn relays_named_by_apps_are_capped_per_account_and_in_total() {
        use crate::authz::{insert_authorization, NewGrant};
        let fx = crate::testing::fixture().await;
        let policy = crate::testing::social_policy(&fx).await;
        let bob = crate::testing::test_user(fx.pool(), "bob@example.com").await;
        let operator = fx.relays.clone();
        let caps = RelayCaps {
            per_account: 2,
            total: 3,
        };
        let pk = client();
        let uri = |relays: &[&str]| {
            let relays: String = relays.iter().map(|r| format!("relay={r}&")).collect();
            NostrConnectUri::parse(&format!("nostrconnect://{pk}?{relays}secret=s")).unwrap()
        };
        let check = |user: &keycast_db::UserId, relays: &[&str]| {
            let (uri, user, operator) = (uri(relays), user.clone(), operator.clone());
            let pool = fx.pool().clone();
            async move { uri.check_relay_caps(&pool, &user, caps, &operator, None).await }
        };
        let accept = |user: &keycast_db::UserId, relays: &[&str]| {
            let relays: Vec<String> = uri(relays).relays;
            let (user, pool, km, policy) = (user.clone(), fx.pool().clone(), fx.km.clone(), policy.clone());
            async move {
                let new = NewGrant {
                    user_id: &user,
                    policy: &policy,
                    client_id: "app",
                    redirect_origin: "nostrconnect",
                    relays: &relays,
                    token_ttl_secs: 0,
                    terms: Default::default(),
                    max_live: crate::authz::DEFAULT_MAX_LIVE_GRANTS,
                    session: None,
                };
                insert_authorization(&pool, km.as_ref(), &new, 1).await.unwrap();
            }
        };
        // The operator's relays (an OAuth grant carries them) never count.
        let granted = fx.new_grant(&policy);
        insert_authorization(fx.pool(), fx.km.as_ref(), &granted, 1)
            .await
            .unwrap();
        let refused = |r: Result<(), RelayCapError>, setting: &str| match r {
            Err(RelayCapError::Refused(e)) => assert!(e.to_string().contains(setting), "{e}"),
            other => panic!("expected a refusal naming {setting}: {other:?}"),
        };

        check(&fx.user, &["wss://r1.example", "wss://r2.example"])
            .await
            .unwrap();
        accept(&fx.user, &["wss://r1.example", "wss://r2.example"]).await;
        refused(
            check(&fx.user, &["wss://r3.example"]).await,
            "KEYCAST_NOSTRCONNECT_MAX_RELAYS_PER_ACCOUNT",
        );
        check(&fx.user, &["wss://r2.example", &operator[0]]).await.unwrap();
        check(&bob, &["wss://r3.example"]).await.unwrap();
        accept(&bob, &["wss://r3.example"]).await;
        refused(
            check(&bob, &["wss://r4.example"]).await,
            "KEYCAST_NOSTRCONNECT_MAX_RELAYS",
        );
        check(&bob, &["wss://r1.example/"])
            .await
            .expect("a relay in use adds nothing");
    }

    #[test]
    fn every_special_purpose_range_is_forbidden() {
        for ip in [
            "0.1.2.3",
            "10.0.0.1",
            "100.64.0.1",
            "127.0.0.2",
            "169.254.1.1",
            "172.31.0.1",
            "192.0.0.8",
            "192.0.2.1",
            "192.88.99.1",
            "192.168.1.1",
            "198.19.255.255",
            "198.51.100.1",
            "203.0.113.9",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b:1::1",
            "100::1",
            "2001::1",
            "2001:db8::1",
            "2002::1",
            "fc00::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
        ] {
            assert!(forbidden_ip(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "198.20.0.1", "2606:4700::1111", "2a00:1450::1"] {
            assert!(!forbidden_ip(ip.parse().unwrap()), "{ip}");
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

    /// Before, every relay of a URI was parsed and compared with each before it, and the count
    /// checked after: tens of thousands of relays in one pasted URI held a runtime thread for
    /// seconds.
    #[test]
    fn a_uri_longer_than_any_valid_one_is_refused_unread() {
        let pk = client();
        let relays: String = (0..3_000).map(|i| format!("relay=wss://r{i}.example&")).collect();
        let err = NostrConnectUri::parse(&format!("nostrconnect://{pk}?{relays}secret=s"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("at most {MAX_URI_LEN} bytes")), "{err}");
        let longest_valid = format!(
            "nostrconnect://{pk}?{}secret={s}&name={s}&url={s}&perms={s}&image={s}",
            (0..MAX_RELAYS)
                .map(|i| format!("relay=wss://r{i}.example/{}&", "p".repeat(480)))
                .collect::<String>(),
            s = "s".repeat(MAX_PARAM_LEN)
        );
        assert!(longest_valid.len() <= MAX_URI_LEN, "{}", longest_valid.len());
        NostrConnectUri::parse(&longest_valid).unwrap();
    }
}
