//! What an owner shapes after consent: **custom policies** (their own permission sets,
//! used at consent or on an app's grant) and **edits of an app's grant** (another policy,
//! other permissions, another duration or other limits).
//!
//! A custom policy belongs to the user who built it: it is found only for them
//! ([`keycast_db::policies::find_usable`]), never through an app's `scope`, and only they
//! can change it, or delete it once no live app uses it. Every change goes through the
//! [`Signer`], which drops the affected authorizations from every cache (here and, on
//! PostgreSQL, on every other instance), so the very next request on either transport is
//! judged by what the owner now sees. The words shown come from the permissions
//! ([`crate::Policy::summary`]), so the owner reads what is enforced.

use keycast_db::policies::{self as policy_repo, Deletion, PolicyRow};
use keycast_db::{authz as authz_repo, AuthorizationId, PolicyId, RepoError, UserId};

use crate::policy::{Permissions, Policy};
use crate::signer::Signer;
use crate::terms::{GrantDuration, GrantTerms, Limits};

/// Longest policy name, in characters.
pub const MAX_NAME_CHARS: usize = 80;
/// Most blocked words per policy, and longest word in characters.
pub const MAX_BLOCKED_WORDS: usize = 100;
pub const MAX_WORD_CHARS: usize = 100;
/// Most kinds listed as allowed or as denied.
pub const MAX_KINDS: usize = 1000;
/// Custom policies (not deleted) an account may have.
pub const MAX_CUSTOM_POLICIES: u32 = 25;

/// Why a custom policy or a grant edit was refused.
#[derive(Debug, thiserror::Error)]
pub enum GrantEditError {
    /// Bad input, with what to fix. HTTP 400.
    #[error("{0}")]
    Invalid(String),
    /// No such policy or live authorization of the user's. HTTP 404.
    #[error("{0}")]
    NotFound(String),
    /// The policy cannot be deleted while apps use it. HTTP 409.
    #[error("{0}")]
    InUse(String),
    /// The account already has [`MAX_CUSTOM_POLICIES`]. HTTP 409.
    #[error(
        "you already have {MAX_CUSTOM_POLICIES} custom policies, the most an account may have; delete one you \
         no longer use first"
    )]
    TooManyPolicies,
    #[error(transparent)]
    Repo(#[from] RepoError),
}

fn invalid(why: impl Into<String>) -> GrantEditError {
    GrantEditError::Invalid(why.into())
}

/// Checks a custom policy's name and permissions; returns the trimmed name.
///
/// # Errors
/// [`GrantEditError::Invalid`] naming the field.
pub fn check(name: &str, permissions: &Permissions) -> Result<String, GrantEditError> {
    checked(name, permissions, None)
}

/// [`check`], letting `kept` (a policy's current name, which an edit may leave as it is)
/// through the rules added since it was given.
fn checked(name: &str, permissions: &Permissions, kept: Option<&str>) -> Result<String, GrantEditError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > MAX_NAME_CHARS {
        return Err(invalid(format!("name must be 1 to {MAX_NAME_CHARS} characters")));
    }
    // Never meant in a name; and a NUL is text PostgreSQL refuses (a 500 there, and on
    // SQLite a row that stops `keycast migrate --to`).
    if kept != Some(name) && crate::shown::disguised(name) {
        return Err(invalid(format!("name {}", crate::shown::REFUSED)));
    }
    if permissions.blocked_words.iter().any(|w| w.contains('\0')) {
        return Err(invalid("blocked_words may not hold a NUL character"));
    }
    if permissions.blocked_words.len() > MAX_BLOCKED_WORDS
        || permissions
            .blocked_words
            .iter()
            .any(|w| w.chars().count() > MAX_WORD_CHARS)
    {
        return Err(invalid(format!(
            "blocked_words: at most {MAX_BLOCKED_WORDS} words of at most {MAX_WORD_CHARS} characters"
        )));
    }
    let listed = permissions.allowed_kinds.as_ref().map_or(0, |k| k.len());
    if listed > MAX_KINDS || permissions.denied_kinds.len() > MAX_KINDS {
        return Err(invalid(format!(
            "allowed_kinds and denied_kinds: at most {MAX_KINDS} kinds each"
        )));
    }
    Ok(name.to_owned())
}

/// Parses a permissions document sent by the owner (unknown fields refused).
///
/// # Errors
/// [`GrantEditError::Invalid`] with the parser's reason.
pub fn parse_permissions(value: serde_json::Value) -> Result<Permissions, GrantEditError> {
    serde_json::from_value(value).map_err(|e| invalid(format!("permissions: {e}")))
}

/// Stores a new custom policy of `owner`; its slug is generated (`custom-…`).
///
/// # Errors
/// [`GrantEditError::Invalid`], storage errors.
pub async fn create_policy(
    signer: &Signer,
    owner: &UserId,
    name: &str,
    permissions: Permissions,
    now: i64,
) -> Result<PolicyRow, GrantEditError> {
    let name = check(name, &permissions)?;
    let id = PolicyId::generate();
    let slug = format!("custom-{}", &id.as_str()[..16]);
    let policy = Policy::from_permissions(&slug, permissions);
    let row = PolicyRow {
        id,
        slug,
        display_name: name,
        // Stored for older readers; keycast itself always generates the words.
        description: policy.summary().lines().join(" "),
        permissions: permissions_json(&policy),
        created_at: now,
        owner_user_id: Some(owner.clone()),
        deleted_at: None,
    };
    policy_repo::insert(signer.db(), &row, MAX_CUSTOM_POLICIES)
        .await
        .map_err(|e| match e {
            RepoError::TooMany(_) => GrantEditError::TooManyPolicies,
            e => e.into(),
        })?;
    Ok(row)
}

/// Changes `owner`'s custom policy `slug`; every app under it is judged by the new
/// permissions from its next request on.
///
/// # Errors
/// [`GrantEditError::NotFound`] (not theirs, or a public policy), `Invalid`, storage errors.
pub async fn update_policy(
    signer: &Signer,
    owner: &UserId,
    slug: &str,
    name: &str,
    permissions: Permissions,
) -> Result<PolicyRow, GrantEditError> {
    let row = owned(signer, owner, slug).await?;
    let name = checked(name, &permissions, Some(&row.display_name))?;
    let policy = Policy::from_permissions(&row.slug, permissions);
    let (description, permissions) = (policy.summary().lines().join(" "), permissions_json(&policy));
    if !policy_repo::update_owned(signer.db(), &row.id, owner, &name, &description, &permissions).await? {
        return Err(not_your_policy(slug));
    }
    signer.policy_changed(&row.id).await?;
    Ok(PolicyRow {
        display_name: name,
        description,
        permissions,
        ..row
    })
}

/// Deletes `owner`'s custom policy `slug`. Refused while a live (unrevoked) app uses it:
/// the owner moves those apps to another policy or revokes them first, so no app's
/// permissions change by a deletion. Revoked apps keep naming it in their history.
///
/// # Errors
/// [`GrantEditError::NotFound`] (not theirs, a public policy, already deleted),
/// [`GrantEditError::InUse`], storage errors.
pub async fn delete_policy(signer: &Signer, owner: &UserId, slug: &str, now: i64) -> Result<(), GrantEditError> {
    let row = owned(signer, owner, slug).await?;
    match policy_repo::delete_owned(signer.db(), &row.id, owner, now).await? {
        Deletion::Deleted => Ok(()),
        Deletion::InUse(apps) => Err(GrantEditError::InUse(format!(
            "{apps} app{s} still use{verb} policy {name:?}: put {them} under another policy or revoke {them} first",
            s = if apps == 1 { "" } else { "s" },
            verb = if apps == 1 { "s" } else { "" },
            name = row.display_name,
            them = if apps == 1 { "it" } else { "them" },
        ))),
        Deletion::NotFound => Err(not_your_policy(slug)),
    }
}

/// `owner`'s custom policy `slug`.
///
/// # Errors
/// [`GrantEditError::NotFound`], storage errors.
pub async fn owned(signer: &Signer, owner: &UserId, slug: &str) -> Result<PolicyRow, GrantEditError> {
    match policy_repo::find_usable(signer.db(), owner, slug).await? {
        Some(row) if row.owner_user_id.as_ref() == Some(owner) => Ok(row),
        _ => Err(not_your_policy(slug)),
    }
}

/// A policy `user` may put on a grant: public, or their own.
///
/// # Errors
/// [`GrantEditError::NotFound`], storage errors.
pub async fn usable(signer: &Signer, user: &UserId, slug: &str) -> Result<PolicyRow, GrantEditError> {
    policy_repo::find_usable(signer.db(), user, slug)
        .await?
        .ok_or_else(|| GrantEditError::NotFound(format!("there is no policy {slug:?} you can use")))
}

fn not_your_policy(slug: &str) -> GrantEditError {
    GrantEditError::NotFound(format!("you have no custom policy {slug:?}"))
}

fn permissions_json(policy: &Policy) -> String {
    serde_json::to_string(&policy.permissions()).unwrap_or_else(|_| "{}".into())
}

/// What the owner changes on an app's grant; `None` keeps what it is.
#[derive(Debug, Clone, Default)]
pub struct GrantEdit {
    /// Another policy (public, or one of the owner's), by slug.
    pub policy: Option<String>,
    /// New permissions for this grant alone. A grant already under a custom policy used
    /// by no other live grant has that policy changed; otherwise a new custom policy
    /// named after the app is made for it.
    pub permissions: Option<Permissions>,
    /// A new duration, counted from now.
    pub duration: Option<GrantDuration>,
    /// New limits (all four replace the old ones).
    pub limits: Option<Limits>,
}

/// Applies `edit` to `user`'s live authorization `id`. Commits: the caller waits for
/// durability (on PostgreSQL: every instance has dropped the old grant) before answering.
///
/// # Errors
/// [`GrantEditError::NotFound`] (not theirs, not live, an unusable policy),
/// [`GrantEditError::Invalid`], storage errors.
pub async fn edit_grant(
    signer: &Signer,
    user: &UserId,
    id: &AuthorizationId,
    edit: GrantEdit,
    now: i64,
) -> Result<(), GrantEditError> {
    let gone = || GrantEditError::NotFound("no such live authorization of yours".into());
    let row = authz_repo::find_by_id(signer.db(), id).await?.ok_or_else(gone)?;
    if row.user_id != *user || row.revoked_at.is_some() {
        return Err(gone());
    }
    if edit.policy.is_some() && edit.permissions.is_some() {
        return Err(invalid("send policy or permissions, not both"));
    }
    let mut terms = GrantTerms::from_json(row.terms.as_deref())
        .map_err(|_| invalid("this grant's stored terms are unreadable; revoke it and authorize the app again"))?;
    // An ended grant stopped counting against the account's cap on live grants: extended,
    // it would be a live one the cap never admitted.
    if terms.expires_at.is_some_and(|at| now >= at) {
        return Err(GrantEditError::NotFound(
            "this grant has ended (the duration chosen for it); authorize the app again instead".into(),
        ));
    }
    if let Some(duration) = edit.duration {
        terms.expires_at = duration.secs().map(|secs| now + secs);
    }
    if let Some(limits) = edit.limits {
        terms.limits = limits;
    }
    let policy_id = match (edit.policy, edit.permissions) {
        (Some(slug), _) => usable(signer, user, &slug).await?.id,
        (None, Some(permissions)) => {
            let current = policy_repo::find_by_id(signer.db(), &row.policy_id).await?;
            // Changed in place only if this grant alone uses it: no other live grant, and no
            // code waiting to become one (it would take the edited permissions, which its
            // consent page never showed).
            let sole = match &current {
                Some(p) if p.owner_user_id.as_ref() == Some(user) && p.deleted_at.is_none() => {
                    authz_repo::list_live_ids_for_policy(signer.db(), &p.id).await? == [id.clone()]
                        && !keycast_db::oauth::pending_under_policy(signer.db(), &p.id, now).await?
                }
                _ => false,
            };
            match current {
                Some(p) if sole => {
                    update_policy(signer, user, &p.slug, &p.display_name, permissions)
                        .await?
                        .id
                }
                _ => {
                    let name: String = format!("{} (edited)", row.client_id)
                        .chars()
                        .take(MAX_NAME_CHARS)
                        .collect();
                    create_policy(signer, user, &name, permissions, now).await?.id
                }
            }
        }
        (None, None) => row.policy_id.clone(),
    };
    if !signer.edit_grant(id, user, &policy_id, &terms).await? {
        return Err(gone());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::{insert_authorization, Authorization};
    use crate::request::Request;
    use crate::signer::SignerOptions;
    use crate::testing::{fixture, social_policy, test_user, Fixture};
    use nostr::{Kind, Tags, Timestamp, UnsignedEvent};

    fn signer(fx: &Fixture) -> Signer {
        Signer::new(fx.pool().clone(), fx.km.clone(), SignerOptions::default())
    }

    /// A social grant for a new user `email` (with a key).
    async fn granted(fx: &Fixture, email: &str) -> (UserId, Authorization) {
        let user = test_user(fx.pool(), email).await;
        crate::keys::generate_user_key(fx.pool(), fx.km.as_ref(), &user, 1)
            .await
            .unwrap();
        let policy = social_policy(fx).await;
        let new = crate::authz::NewGrant {
            user_id: &user,
            ..fx.new_grant(&policy)
        };
        let (authz, _) = insert_authorization(fx.pool(), fx.km.as_ref(), &new, 1).await.unwrap();
        (user, authz)
    }

    fn note(kind: u16) -> Request {
        let pk = nostr::Keys::generate().public_key();
        Request::SignEvent(UnsignedEvent::new(
            pk,
            Timestamp::from(1),
            Kind::from(kind),
            Tags::new(),
            "hi",
        ))
    }

    fn only(kinds: &[u16]) -> Permissions {
        Permissions {
            allowed_kinds: Some(kinds.iter().copied().collect()),
            ..Permissions::default()
        }
    }

    #[tokio::test]
    async fn an_edit_applies_to_the_next_request_even_for_a_caller_holding_the_old_grant() {
        let fx = fixture().await;
        let signer = signer(&fx);
        let (user, authz) = granted(&fx, "owner@example.com").await;
        let transport = keycast_db::activity::Transport::Http;
        assert!(signer.execute(&authz, note(1), transport).await.is_ok());
        let edit = GrantEdit {
            permissions: Some(only(&[7])),
            ..GrantEdit::default()
        };
        edit_grant(&signer, &user, &authz.id, edit, 100).await.unwrap();
        let err = signer.execute(&authz, note(1), transport).await.unwrap_err();
        assert!(err.to_string().contains("kind 1 is not allowed"), "{err}");
        assert!(signer.execute(&authz, note(7), transport).await.is_ok());

        // A second edit changes the same (sole) custom policy in place; limits apply too,
        // counting the signatures made so far (recorded once flushed).
        signer.flush().await.unwrap();
        let edit = GrantEdit {
            permissions: Some(only(&[1])),
            limits: Some(Limits {
                max_signatures: Some(1),
                ..Limits::default()
            }),
            ..GrantEdit::default()
        };
        edit_grant(&signer, &user, &authz.id, edit, 100).await.unwrap();
        assert_eq!(policy_repo::list_owned(signer.db(), &user).await.unwrap().len(), 1);
        let err = signer.execute(&authz, note(1), transport).await.unwrap_err();
        assert!(
            err.to_string().contains("used up"),
            "the kind-7 signature counted: {err}"
        );
    }

    /// Editing a grant's permissions changes its custom policy in place only while nothing
    /// else uses it — a code under it, not yet exchanged, too: that code would become a grant
    /// with permissions its consent page never showed. Before, only live grants counted.
    #[tokio::test]
    async fn a_policy_a_pending_code_will_use_is_not_changed_in_place() {
        let fx = fixture().await;
        let signer = signer(&fx);
        let (user, authz) = granted(&fx, "owner@example.com").await;
        let now = keycast_db::now_unix();
        let narrow = GrantEdit {
            permissions: Some(only(&[1])),
            ..GrantEdit::default()
        };
        edit_grant(&signer, &user, &authz.id, narrow, now).await.unwrap();
        let custom = authz_repo::find_by_id(signer.db(), &authz.id)
            .await
            .unwrap()
            .unwrap()
            .policy_id;
        let policy = policy_repo::find_by_id(signer.db(), &custom).await.unwrap().unwrap();
        let challenge = crate::oauth::pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk");
        let session = crate::testing::session(signer.db(), &user).await;
        let request = crate::oauth::CodeRequest {
            user_id: &user,
            client_id: "another-app",
            redirect_uri: "https://other.example/cb",
            policy: &policy,
            code_challenge: &challenge,
            code_challenge_method: "S256",
            choice: crate::terms::Choice::default(),
            session: &session,
        };
        crate::oauth::issue_code(signer.db(), &request, 600, now).await.unwrap();

        let wider = GrantEdit {
            permissions: Some(only(&[1, 7])),
            ..GrantEdit::default()
        };
        edit_grant(&signer, &user, &authz.id, wider, now).await.unwrap();
        let kept = policy_repo::find_by_id(signer.db(), &custom).await.unwrap().unwrap();
        assert_eq!(
            kept.permissions, policy.permissions,
            "the pending code's policy is unchanged"
        );
        assert_eq!(policy_repo::list_owned(signer.db(), &user).await.unwrap().len(), 2);
    }

    /// An edit that leaves the limits as they were (a new duration) must not reset the count
    /// of signatures to what is written: those still buffered were lost from it, and a grant
    /// of 2 signatures signed a third. Now the buffer is written first.
    #[tokio::test]
    async fn an_edit_keeps_the_signatures_not_yet_written_in_the_count() {
        let fx = fixture().await;
        let signer = signer(&fx);
        let (user, authz) = granted(&fx, "owner@example.com").await;
        let transport = keycast_db::activity::Transport::Http;
        let two = GrantEdit {
            limits: Some(Limits {
                max_signatures: Some(2),
                ..Limits::default()
            }),
            ..GrantEdit::default()
        };
        edit_grant(&signer, &user, &authz.id, two, 100).await.unwrap();
        assert!(signer.execute(&authz, note(1), transport).await.is_ok());
        assert!(signer.execute(&authz, note(1), transport).await.is_ok());
        let longer = GrantEdit {
            duration: Some(crate::terms::GrantDuration::parse("week").unwrap()),
            ..GrantEdit::default()
        };
        edit_grant(&signer, &user, &authz.id, longer, keycast_db::now_unix())
            .await
            .unwrap();
        let err = signer.execute(&authz, note(1), transport).await.unwrap_err();
        assert!(err.to_string().contains("used up"), "a third signature of two: {err}");
    }

    #[tokio::test]
    async fn another_users_policy_and_grant_are_out_of_reach() {
        let fx = fixture().await;
        let signer = signer(&fx);
        let (owner, authz) = granted(&fx, "owner@example.com").await;
        let (other, _) = granted(&fx, "other@example.com").await;
        let mine = create_policy(&signer, &owner, "Mine", only(&[1]), 1).await.unwrap();
        assert!(matches!(
            update_policy(&signer, &other, &mine.slug, "Theirs", Permissions::default()).await,
            Err(GrantEditError::NotFound(_))
        ));
        assert!(matches!(
            usable(&signer, &other, &mine.slug).await,
            Err(GrantEditError::NotFound(_))
        ));
        assert!(
            matches!(
                update_policy(&signer, &owner, "social", "Mine", Permissions::default()).await,
                Err(GrantEditError::NotFound(_))
            ),
            "a public policy is nobody's to change"
        );
        let edit = GrantEdit {
            policy: Some("full".into()),
            ..GrantEdit::default()
        };
        assert!(matches!(
            edit_grant(&signer, &other, &authz.id, edit, 1).await,
            Err(GrantEditError::NotFound(_))
        ));
        assert!(matches!(
            check("", &Permissions::default()),
            Err(GrantEditError::Invalid(_))
        ));
    }

    /// A name with a control character is refused, unless it is the policy's current one:
    /// names given before the rule stay editable as they are.
    #[test]
    fn control_characters_are_refused_in_new_names_only() {
        let any = Permissions::default();
        assert!(matches!(check("a\tb", &any), Err(GrantEditError::Invalid(_))));
        assert!(matches!(check("a\u{0}b", &any), Err(GrantEditError::Invalid(_))));
        assert_eq!(checked("a\tb", &any, Some("a\tb")).unwrap(), "a\tb");
        assert!(checked("a\nb", &any, Some("a\tb")).is_err());
    }
}
