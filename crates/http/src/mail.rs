//! Outgoing mail (email verification, password reset): through SMTP when
//! `KEYCAST_SMTP_URL` is set ([`SmtpMailer`]), otherwise into the in-memory development
//! [`Outbox`].
//!
//! Sending never holds up the request that caused it: the handler commits the token, hands
//! the message to [`SmtpMailer::send`] and answers. SMTP delivery runs in a background task
//! (at most [`Lane::sends`] at once per [`Lane`], each bounded by [`SMTP_TIMEOUT`]).
//! Mail to new sign-ups and mail about existing accounts (resets, security notices) go in
//! separate lanes, each with its own sending slots and its own bound on mails waiting: a
//! flood of registrations — anyone can register any address — cannot delay or crowd out
//! a reset or a "your key was exported" notice. A failure is
//! logged with the recipient, subject and the server's answer — never the body (it carries a
//! single-use token) nor the SMTP credentials — and loses nothing else: the account exists,
//! and the user can ask for a new link (`POST /api/auth/resend-verification`,
//! `/forgot-password`). A mail still in flight when the process stops is lost the same way.
//!
//! Tests read the development outbox through `GET /api/test/outbox` (test routes only).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keycast_core::Secret;
use lettre::message::header::ContentType;
use lettre::message::Mailbox;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::Serialize;
use tokio::sync::Semaphore;

/// Messages kept; older ones are dropped first.
pub const OUTBOX_CAPACITY: usize = 200;
/// Longest an SMTP exchange may take (each command), so a dead server cannot pile up tasks.
pub const SMTP_TIMEOUT: Duration = Duration::from_secs(30);
/// Mails waiting for a slot or being sent, in each lane; past this a new one is dropped
/// (logged and counted in `keycast_mail_dropped_total`): a slow server, or requests that each
/// mail, must not pile up tasks and memory without bound. A user who asks for a link while
/// their lane is full is told to retry instead ([`SmtpMailer::has_room`]).
pub const MAX_QUEUED: usize = 256;

/// Which sending lane a mail takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Verification mail to an address just registered (or asked for again).
    SignUp,
    /// Everything about an existing account: reset links, security notices.
    Account,
}

impl Lane {
    /// The lane of a mail with this [`Mail::purpose`].
    pub fn of(purpose: &str) -> Lane {
        match purpose {
            "verify_email" => Lane::SignUp,
            _ => Lane::Account,
        }
    }

    /// SMTP deliveries running at once in this lane; more wait for a slot. Account mail gets
    /// the more: a reset or a notice must not wait behind others' sign-ups.
    pub fn sends(self) -> usize {
        match self {
            Lane::SignUp => 2,
            Lane::Account => 4,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Lane::SignUp => "sign_up",
            Lane::Account => "account",
        }
    }
}

/// One lane's sending slots and mails accepted and not yet done.
#[derive(Debug)]
struct LaneState {
    slots: Semaphore,
    queued: std::sync::atomic::AtomicUsize,
}

impl LaneState {
    fn new(lane: Lane) -> LaneState {
        LaneState {
            slots: Semaphore::new(lane.sends()),
            queued: std::sync::atomic::AtomicUsize::new(0),
        }
    }
}

/// One message.
#[derive(Debug, Clone, Serialize)]
pub struct Mail {
    pub to: String,
    pub subject: String,
    /// Contains the link with the token: never log it.
    pub body: String,
    /// What the mail is for: `verify_email`, `reset_password` or `key_exported`.
    pub purpose: &'static str,
    /// The raw token, so tests need not parse the body (empty for a notice).
    pub token: String,
    /// A link the development outbox may print in the log, so that one machine with no
    /// mail server can run the whole flow: only the verification link, which is harmless
    /// without the account's password. Never a reset link. Not sent over SMTP.
    #[serde(skip)]
    pub link: Option<String>,
}

/// The development outbox. Cheap to share (inside `AppState`).
#[derive(Debug, Default)]
pub struct Outbox {
    messages: Mutex<VecDeque<Mail>>,
}

impl Outbox {
    /// Queues `mail`, logging recipient and subject (and its [`Mail::link`], if any).
    pub fn send(&self, mail: Mail) {
        match &mail.link {
            Some(link) => {
                tracing::info!(to = %mail.to, subject = %mail.subject, %link, "mail queued in the development outbox (no SMTP configured); open the link to continue")
            }
            None => {
                tracing::info!(to = %mail.to, subject = %mail.subject, "mail queued in the development outbox (no SMTP configured)")
            }
        }
        let mut messages = self.messages.lock().unwrap_or_else(|p| p.into_inner());
        if messages.len() == OUTBOX_CAPACITY {
            messages.pop_front();
        }
        messages.push_back(mail);
    }

    /// Every queued message, oldest first.
    pub fn messages(&self) -> Vec<Mail> {
        self.messages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

/// Why the SMTP settings cannot be used. The text never contains the URL's password.
#[derive(Debug, thiserror::Error)]
pub enum MailConfigError {
    #[error(
        "expected smtp://host[:port] (plain, or ?tls=required for STARTTLS) or smtps://host[:port] \
         (TLS), with user:password@ for authentication ({0})"
    )]
    Url(String),
    #[error("expected an address such as `keycast <noreply@example.org>` ({0})")]
    From(String),
}

/// Delivers mail through an SMTP server. Cheap to clone; `Debug` shows the server, not the
/// credentials.
#[derive(Clone)]
pub struct SmtpMailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    /// `scheme://host:port`, for logs (no credentials).
    server: String,
    /// Plain SMTP to a host other than this one.
    clear_text: bool,
    /// [`Lane::SignUp`], [`Lane::Account`].
    lanes: Arc<[LaneState; 2]>,
    /// Mails waiting in one lane at most ([`MAX_QUEUED`] unless set).
    max_waiting: usize,
}

impl std::fmt::Debug for SmtpMailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpMailer")
            .field("server", &self.server)
            .field("from", &self.from.to_string())
            .finish_non_exhaustive()
    }
}

impl SmtpMailer {
    /// A mailer for `url` (lettre's connection URL: `smtps://user:pass@host:465`,
    /// `smtp://host:587?tls=required`, `smtp://host:25`) sending as `from`. Does no I/O.
    ///
    /// # Errors
    /// [`MailConfigError`] for a malformed URL or address.
    pub fn new(url: &Secret<String>, from: &str) -> Result<SmtpMailer, MailConfigError> {
        let parsed = url::Url::parse(url.expose()).map_err(|e| MailConfigError::Url(e.to_string()))?;
        let host = parsed.host_str().unwrap_or_default().to_owned();
        let server = format!(
            "{}://{}:{}",
            parsed.scheme(),
            host,
            parsed.port().map(|p| p.to_string()).unwrap_or_else(|| "default".into())
        );
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url.expose())
            .map_err(|e| MailConfigError::Url(redacted(&e.to_string(), &parsed)))?
            .timeout(Some(SMTP_TIMEOUT))
            .build();
        let from: Mailbox = from
            .parse()
            .map_err(|e: lettre::address::AddressError| MailConfigError::From(e.to_string()))?;
        let encrypted = parsed.scheme() == "smtps" || parsed.query_pairs().any(|(k, v)| k == "tls" && v == "required");
        let loopback = matches!(host.as_str(), "localhost" | "127.0.0.1" | "[::1]");
        Ok(SmtpMailer {
            transport,
            from,
            server,
            clear_text: !encrypted && !loopback,
            lanes: Arc::new([LaneState::new(Lane::SignUp), LaneState::new(Lane::Account)]),
            max_waiting: MAX_QUEUED,
        })
    }

    /// At most `max_waiting` mails waiting (or being sent) in each lane
    /// (`KEYCAST_SMTP_MAX_WAITING`).
    #[must_use]
    pub fn max_waiting(mut self, max_waiting: usize) -> SmtpMailer {
        self.max_waiting = max_waiting;
        self
    }

    fn lane(&self, lane: Lane) -> &LaneState {
        &self.lanes[lane as usize]
    }

    /// Whether `lane` can take another mail now (see [`MAX_QUEUED`]).
    pub fn has_room(&self, lane: Lane) -> bool {
        self.lane(lane).queued.load(std::sync::atomic::Ordering::SeqCst) < self.max_waiting
    }

    /// Logs where mail goes, warning when it would cross the network unencrypted. Called
    /// once at start, after logging is set up.
    pub fn log_setup(&self) {
        if self.clear_text {
            tracing::warn!(server = %self.server, "KEYCAST_SMTP_URL is not encrypted (use smtps:// or ?tls=required): mail with single-use links, and any SMTP password, cross the network in clear text");
        } else {
            tracing::info!(server = %self.server, from = %self.from, "mail goes out through SMTP");
        }
    }

    /// Starts delivering `mail` in the background and returns at once (see the module doc
    /// for what happens on failure). Must be called inside a Tokio runtime.
    pub fn send(&self, mail: Mail) {
        use std::sync::atomic::Ordering;
        let lane = Lane::of(mail.purpose);
        if self.lane(lane).queued.fetch_add(1, Ordering::SeqCst) >= self.max_waiting {
            self.lane(lane).queued.fetch_sub(1, Ordering::SeqCst);
            metrics::counter!("keycast_mail_dropped_total", "lane" => lane.label()).increment(1);
            tracing::warn!(to = %mail.to, subject = %mail.subject, server = %self.server, lane = lane.label(), waiting = self.max_waiting, "mails already wait for the SMTP server in this lane up to KEYCAST_SMTP_MAX_WAITING; this one is dropped (the user can ask for a new link)");
            return;
        }
        let mailer = self.clone();
        tokio::spawn(async move {
            struct Done(Arc<[LaneState; 2]>, Lane);
            impl Drop for Done {
                fn drop(&mut self) {
                    self.0[self.1 as usize]
                        .queued
                        .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
            let _done = Done(mailer.lanes.clone(), lane);
            let Ok(_slot) = mailer.lane(lane).slots.acquire().await else {
                return;
            };
            match mailer.deliver(&mail).await {
                // Not the address: a log kept for months would list who exported a key or
                // deleted an account. A failure names it (the user will ask what happened).
                Ok(()) => tracing::info!(purpose = mail.purpose, server = %mailer.server, "mail sent"),
                Err(reason) => tracing::warn!(
                    to = %mail.to,
                    subject = %mail.subject,
                    server = %mailer.server,
                    %reason,
                    "could not send mail; the user can ask for a new link"
                ),
            }
        });
    }

    async fn deliver(&self, mail: &Mail) -> Result<(), String> {
        // An address, never a mailbox: `"name" <addr>` would reach `addr` under a name the
        // account's registrant chose (accounts refuse that shape; older rows may hold it).
        let to = Mailbox::new(
            None,
            mail.to
                .parse::<lettre::Address>()
                .map_err(|e| format!("the recipient is not a valid address: {e}"))?,
        );
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(mail.subject.clone())
            .header(ContentType::TEXT_PLAIN)
            .body(mail.body.clone())
            .map_err(|e| format!("cannot build the message: {e}"))?;
        self.transport
            .send(message)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// `text` with the URL's password, if any, replaced (lettre's errors do not echo the URL,
/// but this is the one place that could leak it into a log).
fn redacted(text: &str, url: &url::Url) -> String {
    match url.password() {
        Some(password) if !password.is_empty() => text.replace(password, "<redacted>"),
        _ => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that accepts connections and never answers: every delivery waits (up to
    /// `SMTP_TIMEOUT` a command). Before, each mail was one more task waiting, without bound.
    #[tokio::test]
    async fn mails_waiting_for_a_silent_server_are_bounded() {
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("smtp://{}", silent.local_addr().unwrap());
        let mailer = SmtpMailer::new(&Secret::new(url), "k@x.org").unwrap();
        let mail = |n: usize, purpose| Mail {
            to: format!("u{n}@example.org"),
            subject: "s".into(),
            body: "b".into(),
            purpose,
            token: String::new(),
            link: None,
        };
        for n in 0..MAX_QUEUED + 50 {
            mailer.send(mail(n, "verify_email"));
        }
        let queued = |lane| mailer.lane(lane).queued.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(queued(Lane::SignUp), MAX_QUEUED);
        assert!(!mailer.has_room(Lane::SignUp));
        // A flood of sign-ups leaves the account lane (resets, notices) its own room.
        assert!(mailer.has_room(Lane::Account));
        mailer.send(mail(0, "reset_password"));
        mailer.send(mail(1, "key_exported"));
        assert_eq!(queued(Lane::Account), 2);
        drop(silent);
    }

    #[test]
    fn smtp_settings_are_checked_without_echoing_the_password() {
        let ok = SmtpMailer::new(&"smtps://user:s3cret-pw@mail.example:465".into(), "keycast <k@x.org>").unwrap();
        let shown = format!("{ok:?}");
        assert!(
            shown.contains("mail.example:465") && !shown.contains("s3cret-pw"),
            "{shown}"
        );
        SmtpMailer::new(&"smtp://127.0.0.1:2525".into(), "k@x.org").unwrap();
        SmtpMailer::new(&"smtp://mail.example?tls=required".into(), "k@x.org").unwrap();
        for bad in [
            "mail.example",
            "http://user:s3cret-pw@mail.example",
            "smtp://u:s3cret-pw@/x",
        ] {
            let err = SmtpMailer::new(&bad.into(), "k@x.org").unwrap_err().to_string();
            assert!(!err.contains("s3cret-pw"), "{err}");
        }
        assert!(matches!(
            SmtpMailer::new(&"smtp://127.0.0.1:25".into(), "not an address"),
            Err(MailConfigError::From(_))
        ));
    }
}
