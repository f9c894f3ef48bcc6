//! What a NIP-46 request means: the methods beyond the signer's own (`connect`, `ping`,
//! `switch_relays`, `logout`), and everything else decoded with [`Request::decode`] and
//! run through [`Signer::execute`] — the one signing path HTTP RPC uses too, policy
//! included. Every request gets a reply: a result, or an error with the reason — or, for
//! a request the policy does not cover but the owner may allow, NIP-46's
//! `{id, result: "auth_url", error: <URL>}`; the real reply follows with the same id once
//! the owner decides ([`keycast_core::approval`]).

use std::sync::Arc;

use keycast_core::approval::{nip46_result, Asker};
use keycast_core::nostr::PublicKey;
use keycast_core::{AuthError, DecodeError, Durability, Request, SignError, Signer};
use serde_json::Value;

use crate::wire::{Cipher, RpcReply, RpcRequest};

/// The methods answered here, for the unknown-method error.
const METHODS: &str = "connect, ping, get_public_key, sign_event, nip04_encrypt, nip04_decrypt, \
                       nip44_encrypt, nip44_decrypt, switch_relays, logout";

/// Answers one request from `client` to `bunker`. The outcome is for metrics and logs.
pub async fn answer(
    signer: &Signer,
    durability: Option<&Arc<dyn Durability>>,
    bunker: &PublicKey,
    client: &PublicKey,
    request: &RpcRequest,
    cipher: Cipher,
) -> (RpcReply, Outcome) {
    match run(signer, durability, bunker, client, request, cipher).await {
        Ok(result) => (RpcReply::ok(&request.id, result), Outcome::Ok),
        // NIP-46: the URL travels in `error`, `result` says what it is.
        Err(Refusal {
            outcome: Outcome::AuthUrl,
            message: url,
        }) => (
            RpcReply {
                id: request.id.clone(),
                result: "auth_url".into(),
                error: Some(url),
            },
            Outcome::AuthUrl,
        ),
        Err(refusal) => {
            let outcome = refusal.outcome;
            (RpcReply::error(&request.id, refusal.message), outcome)
        }
    }
}

/// How a request ended, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// Bad or missing credentials: unknown bunker, wrong secret, unbound client, revoked.
    Unauthorized,
    PolicyDenied,
    /// Answered with `auth_url`: the owner is asked (the URL carries a secret: never log it).
    AuthUrl,
    BadRequest,
    Internal,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Unauthorized => "unauthorized",
            Outcome::PolicyDenied => "policy_denied",
            Outcome::AuthUrl => "auth_url",
            Outcome::BadRequest => "bad_request",
            Outcome::Internal => "internal",
        }
    }
}

struct Refusal {
    outcome: Outcome,
    message: String,
}

fn refuse(outcome: Outcome, message: impl Into<String>) -> Refusal {
    Refusal {
        outcome,
        message: message.into(),
    }
}

impl From<AuthError> for Refusal {
    fn from(err: AuthError) -> Self {
        match err {
            AuthError::Internal(cause) => {
                tracing::error!(error = %cause, "nip46: internal error");
                refuse(Outcome::Internal, "internal error; try again later")
            }
            other => refuse(Outcome::Unauthorized, other.to_string()),
        }
    }
}

impl From<SignError> for Refusal {
    fn from(err: SignError) -> Self {
        match err {
            SignError::PolicyDenied { reason } | SignError::GrantRefused { reason, .. } => {
                refuse(Outcome::PolicyDenied, reason)
            }
            SignError::ApprovalRequired { url, .. } => refuse(Outcome::AuthUrl, url),
            SignError::BadRequest { reason } => refuse(Outcome::BadRequest, reason),
            SignError::Revoked | SignError::Expired | SignError::UnknownToken | SignError::Auth(_) => {
                refuse(Outcome::Unauthorized, err.to_string())
            }
            SignError::NoKey => refuse(Outcome::Internal, "the account has no key"),
            SignError::Internal(cause) => {
                tracing::error!(error = %cause, "nip46: internal error");
                refuse(Outcome::Internal, "internal error; try again later")
            }
        }
    }
}

impl From<DecodeError> for Refusal {
    fn from(err: DecodeError) -> Self {
        match err {
            DecodeError::UnknownMethod(method) => refuse(
                Outcome::BadRequest,
                format!("unknown method {method:?}; supported: {METHODS}"),
            ),
            DecodeError::BadParams(message) => refuse(Outcome::BadRequest, message),
        }
    }
}

async fn run(
    signer: &Signer,
    durability: Option<&Arc<dyn Durability>>,
    bunker: &PublicKey,
    client: &PublicKey,
    request: &RpcRequest,
    cipher: Cipher,
) -> Result<String, Refusal> {
    match request.method.as_str() {
        "connect" => {
            // The first parameter names the remote signer; clients in the field leave it
            // empty (NDK, when the URL names no user), send null, or name the user (NDK, when
            // the bunker URL carries `pubkey=`). It adds nothing to refuse on: the request is
            // addressed to the bunker by its `p` tag, opened only with the bunker's key, and
            // the secret authenticates it (issue 16). The 3rd (requested permissions) and 4th (client metadata) parameters are
            // hints for a consent screen: the grant was made by the owner already, and what
            // a client asks for never widens it.
            let secret = request.params.get(1).and_then(Value::as_str);
            // The bound client connecting again (an app restarting, or one looping) changes
            // nothing: answered from the caches, with no write. Before, each one wrote the
            // binding again, dropped the grant from every cache here and on the other
            // instances, and waited for them: a cheap flood from any app took NIP-46 down for
            // everyone. It still waits for what is unshipped (at once when nothing is): the
            // binding may be the first connect's, not yet in the replica.
            if signer.authorize_bunker(bunker, client).await.is_ok() {
                durable(durability, "the connection was not saved").await?;
                return Ok("ack".into());
            }
            writable(durability).await?;
            signer.connect(bunker, client, secret).await?;
            // The binding decides who may sign: acknowledge it only once it is in the replica.
            durable(durability, "the connection was not saved").await?;
            Ok("ack".into())
        }
        // Answered for any live bunker, bound or not: they reveal nothing the bunker URL
        // does not already carry.
        "ping" => {
            signer.bunker_authorization(bunker).await?;
            Ok("pong".into())
        }
        "switch_relays" => {
            let authz = signer.bunker_authorization(bunker).await?;
            Ok(serde_json::to_string(&authz.relays).unwrap_or_else(|_| "null".into()))
        }
        "logout" => {
            // The client's session ends: its binding goes, so the app may connect again
            // (with the secret) later, from a new client key too. The grant stays until
            // the owner revokes it.
            writable(durability).await?;
            signer.logout(bunker, client).await?;
            durable(durability, "the logout was not saved").await?;
            Ok("ack".into())
        }
        method => {
            let authz = signer.authorize_bunker(bunker, client).await?;
            let call = Request::decode(method, &request.params, authz.bunker_pubkey)?;
            let asker = Asker::Nip46 {
                request_id: request.id.clone(),
                client: *client,
                nip04: cipher == Cipher::Nip04,
            };
            let response = signer.execute_or_ask(&authz, call, asker).await?;
            // NIP-46 returns the signed event as JSON text.
            Ok(nip46_result(response)?)
        }
    }
}

async fn writable(durability: Option<&Arc<dyn Durability>>) -> Result<(), Refusal> {
    if let Some(d) = durability {
        d.check_writable()
            .await
            .map_err(|reason| refuse(Outcome::Internal, format!("cannot do this now: {reason}; retry")))?;
    }
    Ok(())
}

async fn durable(durability: Option<&Arc<dyn Durability>>, what: &str) -> Result<(), Refusal> {
    if let Some(d) = durability {
        d.wait_durable()
            .await
            .map_err(|reason| refuse(Outcome::Internal, format!("{what}: {reason}; retry")))?;
    }
    Ok(())
}
