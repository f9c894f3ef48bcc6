//! Asking instead of refusing (issue 14): a request the authorization's policy does not
//! cover is held as a pending **approval** that the authorization's owner decides on a
//! keycast page — *allow once*, *allow this kind from now on* (`sign_event` only), or
//! *deny*.
//!
//! What may be asked: a request that the policy refuses but that the same policy with every
//! capability granted — and its content rules kept — would allow. So a missing kind, a
//! missing encrypt/decrypt capability or a peer other than the user's own key can be asked
//! for; a blocked word cannot (the owner wrote that rule to be absolute, and an app should
//! not be able to put the forbidden text in front of them again and again). Expired,
//! exhausted, rate-limited or revoked grants are refused before the policy is asked at all.
//!
//! How each transport gets its answer ([`Signer::execute_or_ask`]):
//! - **HTTP RPC**: 403 `approval_required` with the URL. After *allow once* the next request
//!   with the same [`fingerprint`] (authorization, method, and the request without the
//!   event's `created_at`, which must be within twice [`ApprovalOptions::ttl_secs`] of the
//!   date the owner was shown) passes, exactly once, within [`ApprovalOptions::ttl_secs`] of the
//!   decision; after *allow kind* every later one passes by policy.
//! - **NIP-46**: `{id, result: "auth_url", error: <URL>}`. The decision is carried out by
//!   the instance that records it ([`Signer::fulfil`]): it runs the stored request through
//!   [`Signer::execute`]'s path with the approval as its permit and hands the reply, with
//!   the request's id, to its NIP-46 transport ([`crate::Change::Nip46Reply`]), which
//!   publishes it on the bunker's relays. Every instance listens on every relay, so which
//!   instance holds the original request does not matter.
//!
//! The id in the URL is 256 random bits; only its SHA-256 is stored. A pending approval
//! expires after [`ApprovalOptions::ttl_secs`] and is decided once (one conditional
//! `UPDATE`). The request is stored NIP-44 encrypted by the bunker key to itself, so text
//! an app asked to encrypt is not at rest in clear.
//!
//! "Allow this kind" is stored per authorization (`authorization_kinds`) and merged into
//! the policy [`crate::policy::evaluate`] sees ([`with_kinds`]), on both transports.

use std::borrow::Cow;
use std::collections::BTreeSet;

use keycast_db::approvals::{self as repo, ApprovalRow, NewApproval};
use keycast_db::{now_unix, AuthorizationId, RepoError, UserId};
use nostr::nips::nip44;
use nostr::{Keys, PublicKey};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::error::{InternalError, SignError};
use crate::policy::{self, Policy};
use crate::request::{Request, Response};
use crate::secret::{hash_token, random_token};
use crate::{Authorization, Signer};

/// How long a pending approval waits for its owner, and how long an HTTP "allow once"
/// waits for the retry: five minutes (seconds).
pub const DEFAULT_APPROVAL_TTL_SECS: i64 = 300;
/// Pending approvals one authorization may have at once; beyond, requests are refused
/// as before (an app cannot fill the owner's screen or the table).
pub const MAX_PENDING_PER_AUTHORIZATION: i64 = 20;

/// Pending approvals one account may have at once across all its grants: each holds its
/// request sealed (up to ~88 KB), and an account may have 100 grants.
pub const MAX_PENDING_PER_ACCOUNT: i64 = 100;

/// The refusal once [`MAX_PENDING_PER_AUTHORIZATION`] approvals of this grant wait.
fn too_many_pending(reason: String) -> SignError {
    SignError::PolicyDenied {
        reason: format!("{reason}; {MAX_PENDING_PER_AUTHORIZATION} approvals already wait for the owner"),
    }
}

/// The refusal once [`MAX_PENDING_PER_ACCOUNT`] approvals of the account wait.
fn too_many_pending_for_the_account(reason: String) -> SignError {
    SignError::PolicyDenied {
        reason: format!("{reason}; {MAX_PENDING_PER_ACCOUNT} approvals already wait for the owner across their apps"),
    }
}
/// The path under the public URL where an approval is shown: `/approvals/<id>`.
pub const PAGE_PATH: &str = "/approvals/";
/// NIP-44 takes at most this much plaintext; a larger request is refused, not asked.
const MAX_SEALED: usize = 65_535;

/// Tuning for approvals.
#[derive(Debug, Clone)]
pub struct ApprovalOptions {
    /// Life of a pending approval, and of an HTTP "allow once" after the decision,
    /// seconds. Default [`DEFAULT_APPROVAL_TTL_SECS`].
    pub ttl_secs: i64,
    /// The public base URL the approval page lives under (`KEYCAST_PUBLIC_URL`).
    pub public_url: String,
}

impl Default for ApprovalOptions {
    fn default() -> Self {
        ApprovalOptions {
            ttl_secs: DEFAULT_APPROVAL_TTL_SECS,
            public_url: "http://localhost:3000".into(),
        }
    }
}

/// Where a request that may be asked came from, and so how its answer travels.
#[derive(Debug, Clone)]
pub enum Asker {
    /// HTTP RPC: the app retries after the decision.
    Http,
    /// NIP-46: the reply goes to `client` with `request_id`, in the request's cipher.
    Nip46 {
        request_id: String,
        client: PublicKey,
        nip04: bool,
    },
}

/// The owner's choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Once,
    Kind,
    Deny,
}

impl Decision {
    /// Parses the form's value: `once`, `kind` or `deny`.
    ///
    /// # Errors
    /// Anything else, with the accepted values.
    pub fn parse(v: &str) -> Result<Decision, String> {
        match v {
            "once" => Ok(Decision::Once),
            "kind" => Ok(Decision::Kind),
            "deny" => Ok(Decision::Deny),
            other => Err(format!("decision {other:?}: expected once, kind or deny")),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Decision::Once => "once",
            Decision::Kind => "kind",
            Decision::Deny => "deny",
        }
    }
}

/// Why an approval cannot be shown or decided. The text is for the owner.
#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    #[error("there is no approval at this address; it may have been decided or have expired and been removed")]
    NotFound,
    #[error("this approval belongs to another account; log in as the owner of the app's authorization")]
    NotYours,
    #[error("this approval has expired; the app has to ask again")]
    Expired,
    #[error("this approval was already decided ({0})")]
    AlreadyDecided(String),
    #[error("only a request to sign an event can be allowed for its kind from now on")]
    KindNeedsSignEvent,
    #[error("the app's authorization has ended (revoked or past its duration): nothing it asked will be signed")]
    AppEnded,
    #[error("internal error")]
    Internal(#[from] InternalError),
}

impl From<keycast_db::RepoError> for ApprovalError {
    fn from(err: keycast_db::RepoError) -> Self {
        ApprovalError::Internal(err.into())
    }
}

/// What the approval page shows.
#[derive(Debug, Clone)]
pub struct ApprovalView {
    /// The app's `client_id`: a name it chose, unless `registered_name` is set.
    pub app: String,
    /// The grant's redirect origin (see [`ApprovalRow::redirect_origin`]).
    pub origin: String,
    /// The name the operator registered the app under (`None`: an app nobody registered,
    /// whose `client_id` is unchecked).
    pub registered_name: Option<String>,
    pub authorization_id: AuthorizationId,
    /// `http` or `nip46`.
    pub transport: String,
    pub method: String,
    pub kind: Option<u16>,
    /// Content (sign) or plaintext (encrypt), whole: "allow once" signs all of it, so the
    /// owner sees all of it (a stored request is at most `MAX_SEALED`).
    pub preview: Option<String>,
    /// The tags of an event to sign, each as JSON (`["e","…"]`), all of them: what it
    /// deletes, mentions, pays or lists is there, not in the content.
    pub tags: Vec<String>,
    /// The date the event to sign carries (unix seconds).
    pub created_at: Option<i64>,
    /// The peer of an encrypt/decrypt request.
    pub peer: Option<PublicKey>,
    pub expires_at: i64,
    /// `None` pending; the decision taken otherwise.
    pub decision: Option<String>,
}

/// A decision just recorded, to be carried out by [`Signer::fulfil`].
#[derive(Debug)]
pub struct Decided {
    row: ApprovalRow,
    decision: Decision,
}

/// What [`Signer::fulfil`] did, for the page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fulfilled {
    /// HTTP: nothing to send; the app retries.
    AppRetries,
    /// NIP-46: the reply went to the app's NIP-46 transport (`Ok`: the result was sent;
    /// `Err`: the request failed anyway, with this reason, and the app was told).
    Replied(Result<(), String>),
}

/// The policy with `kinds` added to what it lets an app sign (borrowed when there is
/// nothing to add). A policy that signs any kind already is returned as it is.
pub fn with_kinds<'a>(policy: &'a Policy, kinds: &BTreeSet<u16>) -> Cow<'a, Policy> {
    if kinds.is_empty() {
        return Cow::Borrowed(policy);
    }
    // `any_kind` (custom policies) signs every kind like `full_access`: adding kinds to its
    // `None` would narrow it to those kinds.
    match (&policy.allowed_kinds, policy.full_access || policy.any_kind) {
        (Some(allowed), _) if kinds.is_subset(allowed) => Cow::Borrowed(policy),
        (None, true) => Cow::Borrowed(policy),
        (allowed, _) => {
            let mut wider = policy.clone();
            let mut all = allowed.clone().unwrap_or_default();
            all.extend(kinds.iter().copied());
            wider.allowed_kinds = Some(all);
            Cow::Owned(wider)
        }
    }
}

/// Whether the owner may be asked about `request`, which `policy` refuses: it is allowed
/// by the same policy with every capability granted and its content rules kept (see the
/// module doc).
pub fn askable(policy: &Policy, request: &Request, user: &PublicKey) -> bool {
    let mut open = policy.clone();
    open.full_access = true;
    open.allowed_kinds = None;
    open.encrypt_to_self = false;
    open.encrypt = true;
    open.decrypt = true;
    policy::evaluate(&open, request, user).is_ok()
}

/// What an HTTP retry is matched on: SHA-256 of the authorization, the method and the
/// request — for `sign_event` the kind, tags and content (not `created_at`, which a client
/// may fill afresh on each try), for the others the peer and the text.
pub fn fingerprint(authorization: &AuthorizationId, request: &Request) -> String {
    let body = match request {
        Request::GetPublicKey => Value::Null,
        Request::SignEvent(event) => json!([event.kind.as_u16(), event.tags, event.content]),
        Request::Nip04Encrypt { peer, plaintext } | Request::Nip44Encrypt { peer, plaintext } => {
            json!([peer.to_hex(), plaintext])
        }
        Request::Nip04Decrypt { peer, ciphertext } | Request::Nip44Decrypt { peer, ciphertext } => {
            json!([peer.to_hex(), ciphertext])
        }
    };
    let text = json!([authorization.as_str(), request.method(), body]).to_string();
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// The request as `{method, params}` in the wire shape [`Request::decode`] reads.
fn wire_form(request: &Request) -> Value {
    let params = match request {
        Request::GetPublicKey => json!([]),
        Request::SignEvent(event) => json!([{
            "kind": event.kind.as_u16(),
            "content": event.content,
            "tags": event.tags,
            "created_at": event.created_at.as_secs(),
        }]),
        Request::Nip04Encrypt { peer, plaintext } | Request::Nip44Encrypt { peer, plaintext } => {
            json!([peer.to_hex(), plaintext])
        }
        Request::Nip04Decrypt { peer, ciphertext } | Request::Nip44Decrypt { peer, ciphertext } => {
            json!([peer.to_hex(), ciphertext])
        }
    };
    json!({ "method": request.method(), "params": params })
}

/// The NIP-46 result text of a response (the signed event as JSON text).
pub fn nip46_result(response: Response) -> Result<String, SignError> {
    Ok(match response {
        Response::PublicKey(pk) => pk.to_hex(),
        Response::Event(event) => {
            serde_json::to_string(&*event).map_err(|e| SignError::Internal(InternalError::Crypto(e.to_string())))?
        }
        Response::Text(text) => text,
    })
}

fn seal(bunker: &Keys, request: &Request) -> Option<String> {
    let text = wire_form(request).to_string();
    if text.len() > MAX_SEALED {
        return None;
    }
    nip44::encrypt(bunker.secret_key(), &bunker.public_key(), text, nip44::Version::V2).ok()
}

fn unseal(bunker: &Keys, sealed: &str) -> Result<Request, InternalError> {
    let corrupt = |what: &str| InternalError::Crypto(format!("a stored approval is unreadable: {what}"));
    let text = nip44::decrypt(bunker.secret_key(), &bunker.public_key(), sealed).map_err(|_| corrupt("decrypt"))?;
    let value: Value = serde_json::from_str(&text).map_err(|_| corrupt("json"))?;
    let method = value["method"].as_str().unwrap_or_default();
    let params = value["params"].as_array().cloned().unwrap_or_default();
    Request::decode(method, &params, bunker.public_key()).map_err(|_| corrupt("request"))
}

impl Signer {
    /// [`Signer::execute`], except that a request the policy does not cover but the owner
    /// may allow ([`askable`]) becomes a pending approval: [`SignError::ApprovalRequired`]
    /// with its URL. For HTTP, a request matching an unused "allow once" passes (and uses
    /// it).
    ///
    /// # Errors
    /// As [`Signer::execute`], plus [`SignError::ApprovalRequired`].
    pub async fn execute_or_ask(
        &self,
        authz: &Authorization,
        request: Request,
        asker: Asker,
    ) -> Result<crate::Response, SignError> {
        let (transport, permit) = match &asker {
            Asker::Http => (crate::Transport::Http, Permit::SpendOnce),
            Asker::Nip46 { .. } => (crate::Transport::Nip46, Permit::Policy),
        };
        let asked = request.clone();
        match self.execute_with(authz, request, transport, permit).await {
            Err(SignError::PolicyDenied { reason }) => Err(self.ask(authz, &asked, &asker, reason).await?),
            other => other,
        }
    }

    /// Whether `request`, which `policy` refuses, may pass on `permit` (only if it is
    /// [`askable`]: an approval never overrides a content rule).
    pub(crate) async fn permitted(
        &self,
        authz: &Authorization,
        policy: &Policy,
        request: &Request,
        user: &PublicKey,
        permit: &Permit,
    ) -> Result<bool, SignError> {
        if !askable(policy, request, user) {
            return Ok(false);
        }
        Ok(match permit {
            Permit::Policy => false,
            Permit::Approved(fp) => *fp == fingerprint(&authz.id, request),
            Permit::SpendOnce => self.spend_once(authz, request).await?,
        })
    }

    /// Spends an HTTP "allow once" that `request` retries: one of the same [`fingerprint`],
    /// and for an event one dated within twice the approval's time of the date the owner was
    /// shown (the owner has that long to decide, the retry as long again). A client may date
    /// its retry afresh, but not years ahead: a replaceable event (a relay list, a profile)
    /// dated so would outrank every later one the owner publishes.
    async fn spend_once(&self, authz: &Authorization, request: &Request) -> Result<bool, SignError> {
        let now = now_unix();
        let onces = repo::unused_onces(self.db(), &authz.id, &fingerprint(&authz.id, request), now).await?;
        if onces.is_empty() {
            return Ok(false);
        }
        let window = u64::try_from(self.approval_options().ttl_secs)
            .unwrap_or(0)
            .saturating_mul(2);
        let bunker = self.bunker_keys(authz).await?;
        for once in onces {
            if let Request::SignEvent(event) = request {
                let Request::SignEvent(shown) = unseal(&bunker, &once.request_sealed)? else {
                    continue;
                };
                if shown.created_at.as_secs().abs_diff(event.created_at.as_secs()) > window {
                    continue;
                }
            }
            if repo::spend(self.db(), &once.id_hash, now).await? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Stores a pending approval for `request` and returns the error that carries its URL;
    /// the plain denial when it may not be asked (content rules, too many pending, too big).
    async fn ask(
        &self,
        authz: &Authorization,
        request: &Request,
        asker: &Asker,
        reason: String,
    ) -> Result<SignError, SignError> {
        let denied = SignError::PolicyDenied { reason: reason.clone() };
        let user = self.user_keys_of(&authz.user_id).await?;
        let policy = with_kinds(&authz.policy, &*self.allowed_kinds(&authz.id).await?).into_owned();
        if !askable(&policy, request, &user) {
            return Ok(denied);
        }
        let now = now_unix();
        // Spares the sealing (and, on PostgreSQL, the account's lock) when a cap is plainly
        // reached; the insert counts again.
        if repo::count_pending(self.db(), &authz.id, now).await? >= MAX_PENDING_PER_AUTHORIZATION {
            return Ok(too_many_pending(reason));
        }
        if repo::count_pending_for_account(self.db(), &authz.id, now).await? >= MAX_PENDING_PER_ACCOUNT {
            return Ok(too_many_pending_for_the_account(reason));
        }
        let bunker = self.bunker_keys(authz).await?;
        let Some(sealed) = seal(&bunker, request) else {
            return Ok(denied);
        };
        let id = random_token();
        let expires_at = now + self.approval_options().ttl_secs;
        let (transport, request_id, client, cipher) = match asker {
            Asker::Http => ("http", None, None, None),
            Asker::Nip46 {
                request_id,
                client,
                nip04,
            } => (
                "nip46",
                Some(request_id.as_str()),
                Some(client.to_hex()),
                Some(if *nip04 { "nip04" } else { "nip44" }),
            ),
        };
        let stored = repo::insert(
            self.db(),
            &NewApproval {
                id_hash: &hash_token(id.expose()),
                authorization_id: &authz.id,
                transport,
                method: request.method(),
                kind: request.kind().map(i64::from),
                request_sealed: &sealed,
                fingerprint: &fingerprint(&authz.id, request),
                nip46_request_id: request_id,
                nip46_client: client.as_deref(),
                nip46_cipher: cipher,
                expires_at,
            },
            now,
            MAX_PENDING_PER_AUTHORIZATION,
            MAX_PENDING_PER_ACCOUNT,
        )
        .await;
        match stored {
            Ok(()) => {}
            Err(RepoError::TooMany(_)) => {
                let this_grant = repo::count_pending(self.db(), &authz.id, now).await?;
                return Ok(match this_grant >= MAX_PENDING_PER_AUTHORIZATION {
                    true => too_many_pending(reason),
                    false => too_many_pending_for_the_account(reason),
                });
            }
            Err(other) => return Err(other.into()),
        }
        let base = self.approval_options().public_url.trim_end_matches('/');
        Ok(SignError::ApprovalRequired {
            reason: format!("{reason}; the owner can allow it at the approval URL"),
            url: format!("{base}{PAGE_PATH}{}", id.expose()),
            expires_at,
        })
    }

    /// How long a pending approval waits for the owner.
    pub fn approval_ttl(&self) -> std::time::Duration {
        std::time::Duration::from_secs(u64::try_from(self.approval_options().ttl_secs).unwrap_or(0))
    }

    /// Called by the NIP-46 transport once the approval at `url` (an `auth_url` it sent) has
    /// expired: if nobody decided it, it is closed and the client gets an error reply with
    /// the request's id, so it does not wait forever. A decision at the same moment wins or
    /// loses as a whole (both are conditional updates of an undecided row).
    pub async fn close_if_undecided(&self, url: &str) {
        let Some((_, id)) = url.rsplit_once(PAGE_PATH) else {
            return;
        };
        let row = match repo::close_undecided(self.db(), &hash_token(id), now_unix()).await {
            Ok(Some(row)) => row,
            Ok(None) => return,
            Err(err) => {
                tracing::warn!(error = %err, "approval: cannot close an undecided approval");
                return;
            }
        };
        if row.transport != "nip46" {
            return;
        }
        let secs = self.approval_options().ttl_secs;
        let reason = format!("the owner of the key did not decide within {secs} s; ask again");
        if let Err(err) = self.reply_nip46(&row, Err(reason)).await {
            tracing::warn!(error = %err, "approval: cannot tell the client its approval expired");
        }
    }

    /// The approval at `id` (the secret in its URL) as its owner `user` sees it.
    ///
    /// # Errors
    /// [`ApprovalError::NotFound`], [`ApprovalError::NotYours`], [`ApprovalError::Internal`].
    /// An expired or decided approval is shown (with its state), not refused.
    pub async fn approval(&self, id: &str, user: &UserId) -> Result<ApprovalView, ApprovalError> {
        let row = self.owned_approval(id, user).await?;
        let bunker = self.approval_bunker(&row).await?;
        let request = unseal(&bunker, &row.request_sealed)?;
        let (text, peer, event) = match &request {
            Request::SignEvent(event) => (Some(event.content.as_str()), None, Some(event)),
            Request::Nip04Encrypt { peer, plaintext } | Request::Nip44Encrypt { peer, plaintext } => {
                (Some(plaintext.as_str()), Some(*peer), None)
            }
            Request::Nip04Decrypt { peer, .. } | Request::Nip44Decrypt { peer, .. } => (None, Some(*peer), None),
            Request::GetPublicKey => (None, None, None),
        };
        let tags = event.map_or_else(Vec::new, |event| {
            event
                .tags
                .iter()
                .map(|tag| serde_json::to_string(tag.as_slice()).unwrap_or_default())
                .collect()
        });
        // Registered, and answered at one of its registered addresses: what `identify` checked
        // when the grant was made over OAuth.
        let registered_name = keycast_db::clients::find_by_id(self.db(), &row.client_id)
            .await?
            .and_then(|row| crate::clients::RegisteredClient::try_from(row).ok())
            .filter(|client| {
                client
                    .redirect_uris
                    .iter()
                    .any(|uri| crate::oauth::redirect_origin(uri).is_ok_and(|origin| origin == row.redirect_origin))
            })
            .map(|client| client.name);
        Ok(ApprovalView {
            app: row.client_id.clone(),
            origin: row.redirect_origin.clone(),
            registered_name,
            authorization_id: row.authorization_id.clone(),
            transport: row.transport.clone(),
            method: row.method.clone(),
            kind: request.kind(),
            preview: text.map(str::to_owned),
            tags,
            created_at: event.map(|event| i64::try_from(event.created_at.as_secs()).unwrap_or(i64::MAX)),
            peer,
            expires_at: row.expires_at,
            decision: row.decision.clone(),
        })
    }

    /// Records `user`'s decision on the approval at `id`, once. *Allow kind* also adds the
    /// kind to the authorization (and tells every instance's caches). Commits: the caller
    /// waits for durability, then calls [`Signer::fulfil`].
    ///
    /// # Errors
    /// [`ApprovalError`]: not found, not the owner's, expired, already decided, a kind
    /// decision on a request that is not `sign_event`; storage errors.
    pub async fn decide(&self, id: &str, user: &UserId, decision: Decision) -> Result<Decided, ApprovalError> {
        let row = self.owned_approval(id, user).await?;
        let now = now_unix();
        match row.decision.as_deref() {
            // Closed by the NIP-46 transport when it expired undecided.
            Some("expired") => return Err(ApprovalError::Expired),
            Some(taken) => return Err(ApprovalError::AlreadyDecided(taken.to_owned())),
            None if row.expires_at <= now => return Err(ApprovalError::Expired),
            None => {}
        }
        // An "allow" would be answered "allowed" and sign nothing (the signer refuses an
        // ended grant), and "allow kind" would add to a grant no one can use.
        if decision != Decision::Deny && self.grant_has_ended(&row.authorization_id, now).await? {
            return Err(ApprovalError::AppEnded);
        }
        let kind = match (decision, row.kind) {
            (Decision::Kind, None) => return Err(ApprovalError::KindNeedsSignEvent),
            (Decision::Kind, Some(kind)) => Some(kind),
            _ => None,
        };
        let retry_until = now + self.approval_options().ttl_secs;
        let made = match repo::decide(self.db(), &row.id_hash, decision.as_str(), now, retry_until, kind).await {
            Ok(true) if decide_answer_lost() => Err(crate::signer::lost_answer()),
            answered => answered,
        };
        let made = match made {
            Ok(made) => made,
            // The answer was lost, perhaps after the decision was made: the row says. A
            // decision recorded but never carried out would leave the app unanswered, and
            // the owner's second click would only be told it was decided.
            Err(lost) => match repo::find(self.db(), &row.id_hash).await {
                Ok(Some(now_row))
                    if now_row.decision.as_deref() == Some(decision.as_str()) && now_row.decided_at == Some(now) =>
                {
                    true
                }
                _ => return Err(lost.into()),
            },
        };
        if !made {
            // Decided, expired or revoked between the read and the update (another click).
            return Err(
                match repo::find(self.db(), &row.id_hash).await?.and_then(|r| r.decision) {
                    Some(taken) if taken != "expired" => ApprovalError::AlreadyDecided(taken),
                    Some(_) => ApprovalError::Expired,
                    None if self.grant_has_ended(&row.authorization_id, now).await? => ApprovalError::AppEnded,
                    None => ApprovalError::Expired,
                },
            );
        }
        if kind.is_some() {
            self.invalidate_authorization(&row.authorization_id);
        }
        Ok(Decided { row, decision })
    }

    /// Whether the grant was revoked (or removed) or is past its duration.
    async fn grant_has_ended(&self, id: &AuthorizationId, now: i64) -> Result<bool, ApprovalError> {
        match self.authorization_by_id(id).await {
            Ok(authz) => Ok(authz.revoked_at.is_some() || authz.terms.check_expiry(now).is_err()),
            Err(SignError::Internal(cause)) => Err(ApprovalError::Internal(cause)),
            // Gone (`Revoked`), or not a grant anything could be signed under.
            Err(_) => Ok(true),
        }
    }

    /// Answers a NIP-46 request whose decision was recorded but not confirmed durable (the
    /// replica, or on PostgreSQL the other instances, did not confirm in time): an error
    /// telling the client to send it again, so it does not wait for an answer that will not
    /// come. This request is not carried out on an unconfirmed decision; the one sent again
    /// is judged as any request (an allowed kind recorded here counts). A denial is sent as
    /// it is: refusing needs no record. HTTP apps retry on their own.
    pub async fn fulfil_unsaved(&self, decided: Decided, reason: &str) -> Fulfilled {
        if decided.decision == Decision::Deny {
            return self.fulfil(decided).await;
        }
        let row = decided.row;
        if row.transport != "nip46" {
            return Fulfilled::AppRetries;
        }
        let error = format!("the owner's decision could not be confirmed saved ({reason}); send the request again");
        match self.reply_nip46(&row, Err(error.clone())).await {
            Ok(()) => Fulfilled::Replied(Err(error)),
            Err(err) => Fulfilled::Replied(Err(err)),
        }
    }

    /// Carries out a recorded decision: for NIP-46, runs the request (allowed) or refuses
    /// it (denied) and hands the reply, with the request's id, to the NIP-46 transport.
    pub async fn fulfil(&self, decided: Decided) -> Fulfilled {
        let row = decided.row;
        if row.transport != "nip46" {
            return Fulfilled::AppRetries;
        }
        let result = match decided.decision {
            Decision::Deny => Err("the owner of the key denied this request".to_owned()),
            decision => self.run_approved(&row, decision).await.map_err(|e| match e {
                SignError::Internal(cause) => {
                    tracing::error!(error = %cause, "approval: internal error");
                    "internal error; try again later".to_owned()
                }
                other => other.to_string(),
            }),
        };
        let outcome = result.as_ref().map(|_| ()).map_err(Clone::clone);
        match self.reply_nip46(&row, result).await {
            Ok(()) => Fulfilled::Replied(outcome),
            Err(err) => Fulfilled::Replied(Err(err)),
        }
    }

    /// Hands the reply to the NIP-46 request of `row` to this instance's NIP-46 transport.
    async fn reply_nip46(&self, row: &ApprovalRow, result: Result<String, String>) -> Result<(), String> {
        let (Some(request_id), Some(client)) = (row.nip46_request_id.clone(), row.nip46_client.as_deref()) else {
            return Err("the stored approval lacks its NIP-46 reply address".into());
        };
        let client =
            PublicKey::from_hex(client).map_err(|_| "the stored approval names a bad client key".to_owned())?;
        // A revoked authorization's bunker still answers (its client hears why).
        let row_authz = keycast_db::authz::find_by_id(self.db(), &row.authorization_id)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the authorization is gone")?;
        let bunker = PublicKey::from_hex(&row_authz.bunker_pubkey).map_err(|_| "a bad bunker key".to_owned())?;
        self.send_nip46_reply(crate::Change::Nip46Reply {
            bunker,
            client,
            request_id,
            nip04: row.nip46_cipher.as_deref() == Some("nip04"),
            result,
        });
        Ok(())
    }

    async fn run_approved(&self, row: &ApprovalRow, decision: Decision) -> Result<String, SignError> {
        let authz = self.authorization_by_id(&row.authorization_id).await?;
        let bunker = self.bunker_keys(&authz).await?;
        let request = unseal(&bunker, &row.request_sealed)?;
        let permit = match decision {
            Decision::Once => Permit::Approved(row.fingerprint.clone()),
            // The kind is now part of the policy: it passes as any later request will.
            _ => Permit::Policy,
        };
        let response = self
            .execute_with(&authz, request, crate::Transport::Nip46, permit)
            .await?;
        nip46_result(response)
    }

    async fn owned_approval(&self, id: &str, user: &UserId) -> Result<ApprovalRow, ApprovalError> {
        let row = repo::find(self.db(), &hash_token(id))
            .await?
            .ok_or(ApprovalError::NotFound)?;
        // The row was found by the hash of a 256-bit secret: the comparison below is of
        // ids, not of a secret, so it need not be constant-time.
        if row.user_id != *user {
            return Err(ApprovalError::NotYours);
        }
        Ok(row)
    }

    async fn approval_bunker(&self, row: &ApprovalRow) -> Result<std::sync::Arc<Keys>, ApprovalError> {
        let authz = keycast_db::authz::find_by_id(self.db(), &row.authorization_id)
            .await?
            .ok_or(ApprovalError::NotFound)?;
        let bunker = PublicKey::from_hex(&authz.bunker_pubkey)
            .map_err(|_| InternalError::Crypto("an authorization has a bad bunker key".into()))?;
        self.bunker_secret(&bunker).await.map_err(|e| match e {
            crate::AuthError::Internal(cause) => ApprovalError::Internal(cause),
            _ => ApprovalError::NotFound,
        })
    }

    /// The kinds the owner allowed this authorization from now on.
    pub(crate) async fn allowed_kinds_uncached(&self, id: &AuthorizationId) -> Result<BTreeSet<u16>, SignError> {
        Ok(repo::allowed_kinds(self.db(), id)
            .await?
            .into_iter()
            .filter_map(|k| u16::try_from(k).ok())
            .collect())
    }
}

/// Why a request may pass although the policy refuses it.
#[derive(Debug, Clone)]
pub(crate) enum Permit {
    /// Only the policy (and the kinds allowed from now on).
    Policy,
    /// The owner allowed this request once: its fingerprint.
    Approved(String),
    /// HTTP: an unused "allow once" of the same fingerprint lets it pass (and is used).
    SpendOnce,
}

/// Fault injection: a decision's statement committed and its answer was lost (fail point
/// `approval-decide-answer-lost`).
fn decide_answer_lost() -> bool {
    fail::fail_point!("approval-decide-answer-lost", |_| true);
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use nostr::{Kind, Tags, Timestamp, UnsignedEvent};

    fn sign(user: &PublicKey, kind: u16, content: &str, at: u64) -> Request {
        Request::SignEvent(UnsignedEvent::new(
            *user,
            Timestamp::from(at),
            Kind::from(kind),
            Tags::new(),
            content,
        ))
    }

    #[test]
    fn allowed_kinds_widen_only_the_signing_of_a_policy() {
        let user = Keys::generate().public_key();
        let social = Policy::parse("social", r#"{"allowed_kinds":[1],"blocked_words":["spam"]}"#).unwrap();
        let kinds = BTreeSet::from([30023]);
        let wider = with_kinds(&social, &kinds);
        assert!(policy::evaluate(&wider, &sign(&user, 30023, "article", 1), &user).is_ok());
        assert!(policy::evaluate(&wider, &sign(&user, 7, "+", 1), &user).is_err());
        assert!(policy::evaluate(&wider, &sign(&user, 30023, "spam", 1), &user).is_err());
        let empty = Policy::parse("empty", "{}").unwrap();
        assert!(policy::evaluate(&with_kinds(&empty, &kinds), &sign(&user, 30023, "", 1), &user).is_ok());
        assert!(matches!(with_kinds(&social, &BTreeSet::new()), Cow::Borrowed(_)));
        // A kind approved under one policy, then the grant moved to a policy that signs any
        // kind but a few: the approval must not narrow it to that kind.
        let no_dms = Policy::parse("no-dms", r#"{"any_kind":true,"denied_kinds":[4]}"#).unwrap();
        let moved = with_kinds(&no_dms, &kinds);
        assert!(policy::evaluate(&moved, &sign(&user, 1, "note", 1), &user).is_ok());
        assert!(policy::evaluate(&moved, &sign(&user, 4, "dm", 1), &user).is_err());
    }

    #[test]
    fn a_blocked_word_is_refused_not_asked_and_a_missing_kind_is_asked() {
        let user = Keys::generate().public_key();
        let peer = Keys::generate().public_key();
        let policy = Policy::parse("p", r#"{"allowed_kinds":[1],"blocked_words":["spam"]}"#).unwrap();
        assert!(askable(&policy, &sign(&user, 30023, "article", 1), &user));
        assert!(!askable(&policy, &sign(&user, 30023, "spam here", 1), &user));
        assert!(!askable(&policy, &sign(&user, 1, "SPAM", 1), &user));
        let encrypt = Request::Nip44Encrypt {
            peer,
            plaintext: "hi".into(),
        };
        assert!(askable(&policy, &encrypt, &user));
    }

    #[test]
    fn the_fingerprint_ignores_created_at_but_not_content_kind_or_authorization() {
        let user = Keys::generate().public_key();
        let a = AuthorizationId::new("a");
        let b = AuthorizationId::new("b");
        let base = fingerprint(&a, &sign(&user, 1, "x", 1));
        assert_eq!(base, fingerprint(&a, &sign(&user, 1, "x", 2)));
        assert_ne!(base, fingerprint(&a, &sign(&user, 1, "y", 1)));
        assert_ne!(base, fingerprint(&a, &sign(&user, 7, "x", 1)));
        assert_ne!(base, fingerprint(&b, &sign(&user, 1, "x", 1)));
    }

    #[test]
    fn a_sealed_request_opens_to_the_same_request() {
        let bunker = Keys::generate();
        let request = sign(&bunker.public_key(), 30023, "long read", 42);
        let sealed = seal(&bunker, &request).unwrap();
        assert!(!sealed.contains("long read"));
        let opened = unseal(&bunker, &sealed).unwrap();
        let a = AuthorizationId::new("a");
        assert_eq!(fingerprint(&a, &opened), fingerprint(&a, &request));
        assert_eq!(opened.kind(), Some(30023));
    }
}
