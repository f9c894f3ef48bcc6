//! Mail and the pages its links lead to, against the real binary: the verification mail
//! delivered through a real SMTP server (aiosmtpd) and its link confirming the address;
//! then, with the development outbox, asking for a verification link again, and the whole
//! forgot → mail → reset-password page flow.

mod harness;

use harness::CommandExt as _;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use harness::api::*;
use harness::{Keycast, Launch};
use serde_json::{json, Value};

/// `POST /api/auth/register` for `email` with the harness's password.
fn sign_up(server: &Keycast, email: &str) -> Reply {
    post_json(
        server,
        "/api/auth/register",
        None,
        &json!({ "email": email, "password": PASSWORD }),
    )
}

/// A real SMTP server (aiosmtpd) on a free loopback port, storing every message it
/// receives in a maildir. Stopped when dropped.
struct SmtpServer {
    child: Child,
    port: u16,
    maildir: PathBuf,
}

impl SmtpServer {
    fn start(aiosmtpd: &str, maildir: &Path) -> SmtpServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(aiosmtpd)
            .args([
                "-n",
                "-l",
                &format!("127.0.0.1:{port}"),
                "-c",
                "aiosmtpd.handlers.Mailbox",
            ])
            .arg(maildir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("aiosmtpd starts");
        let server = SmtpServer {
            child,
            port,
            maildir: maildir.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "aiosmtpd did not listen on {port} within 20 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    /// Waits for the first message to arrive; returns its raw text.
    fn wait_for_message(&self) -> String {
        let new = self.maildir.join("new");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(entry) = std::fs::read_dir(&new).ok().and_then(|mut d| d.next()) {
                return std::fs::read_to_string(entry.unwrap().path()).unwrap();
            }
            assert!(Instant::now() < deadline, "no mail reached the SMTP server within 20 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        harness::reap(&mut self.child);
    }
}

/// The text body of a raw message, transfer encoding undone, by Python's `email` package
/// (an implementation independent of the one that built the message).
fn decoded_body(python: &Path, raw: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("message.eml");
    std::fs::write(&file, raw).unwrap();
    let script = "import email, sys; m = email.message_from_file(open(sys.argv[1])); \
                  print(m.get_payload(decode=True).decode(m.get_content_charset() or 'utf-8'))";
    let out = Command::new(python)
        .args(["-c", script])
        .arg(&file)
        .output_within(harness::COMMAND_TIMEOUT);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The first `http…` link in `text` that contains `path`.
fn link_in(text: &str, path: &str) -> String {
    text.split_whitespace()
        .find(|w| w.starts_with("http") && w.contains(path))
        .unwrap_or_else(|| panic!("no {path} link in:\n{text}"))
        .to_owned()
}

/// The `token` in a mailed link's fragment.
fn fragment_token(link: &str) -> String {
    let url = url::Url::parse(link).unwrap();
    url::form_urlencoded::parse(url.fragment().expect("the token is in the fragment").as_bytes())
        .find(|(k, _)| k == "token")
        .expect("a token")
        .1
        .into_owned()
}

/// `/path?query` of an absolute link.
fn path_and_query(link: &str) -> String {
    let url = url::Url::parse(link).unwrap();
    format!("{}?{}", url.path(), url.query().unwrap_or_default())
}

/// Confirms an email by following a mailed verify-email link like a person: open the page,
/// type the account's password, press its button. Returns the confirmation page, or the
/// link's page if it has no button.
/// What a browser does with a confirmation link: opens its page (the token stays in the
/// fragment, which no request carries), and the page's script puts the token in the form.
fn follow_verify_link(server: &Keycast, link: &str) -> Reply {
    let page = get(server, &path_and_query(link), None);
    assert_eq!(page.status, 200, "{}", page.body);
    assert_eq!(
        form_action(&page.body, "/verify-email").as_deref(),
        Some("/verify-email")
    );
    assert!(
        page.body.contains("data-from-fragment=\"token\""),
        "the page takes the token from the fragment: {}",
        page.body
    );
    let token = fragment_token(link);
    post_form(
        server,
        "/verify-email",
        None,
        &[("token", &token), ("password", PASSWORD)],
    )
}

fn email_verified(server: &Keycast, email: &str) -> bool {
    let r = post_json(
        server,
        "/api/auth/login",
        None,
        &json!({ "email": email, "password": PASSWORD }),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["email_verified"].as_bool().unwrap()
}

#[test]
fn the_verification_mail_arrives_over_smtp_and_its_link_verifies_the_email() {
    let Some(aiosmtpd) = harness::peer("KEYCAST_TEST_AIOSMTPD") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let smtp = SmtpServer::start(&aiosmtpd, &dir.path().join("maildir"));
    let server = Launch::new(&dir.path().join("data"))
        .env("KEYCAST_TEST_ROUTES", "true")
        .env("KEYCAST_SMTP_URL", &format!("smtp://127.0.0.1:{}", smtp.port))
        .env("KEYCAST_MAIL_FROM", "keycast <noreply@keycast.test>")
        .start();

    let email = "smtp-user@example.com";
    // A display name and brackets around the address: mail to the address itself, a new
    // account (and mail budget) per name, and the attacker's text in a genuine keycast mail.
    // Before, accepted (201) and delivered to the bracketed address.
    for named in [
        format!("\"https://evil.example/x\" <{email}>"),
        format!("<{email}>"),
        format!("x@evil.example,{email}"),
    ] {
        let r = post_json(
            &server,
            "/api/auth/register",
            None,
            &json!({ "email": named, "password": PASSWORD }),
        );
        assert_eq!(r.status, 400, "{named}: {}", r.body);
    }
    let r = post_json(
        &server,
        "/api/auth/register",
        None,
        &json!({ "email": email, "password": PASSWORD }),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["email_verified"], false);

    let raw = smtp.wait_for_message();
    assert!(raw.contains(&format!("To: {email}")), "{raw}");
    assert!(raw.contains("noreply@keycast.test"), "{raw}");
    assert!(raw.contains("Subject: Confirm your keycast email"), "{raw}");
    let python = Path::new(&aiosmtpd).with_file_name("python3");
    let body = decoded_body(&python, &raw);
    let link = link_in(&body, "/verify-email#token=");
    let port = server.base.rsplit(':').next().unwrap();
    assert!(
        link.starts_with(&format!("http://localhost:{port}/verify-email#token=")),
        "the link points at keycast's public URL: {link}"
    );
    // The mail went to SMTP, not to the development outbox.
    let outbox = get(&server, "/api/test/outbox", None).json();
    assert_eq!(outbox["messages"], json!([]), "{outbox}");

    assert!(!email_verified(&server, email));
    let legacy = get(&server, &format!("/verify-email?token={}", fragment_token(&link)), None);
    assert_eq!(
        (legacy.status, legacy.location.clone()),
        (303, Some(format!("/verify-email#token={}", fragment_token(&link)))),
        "a link mailed before goes on to the fragment form: {}",
        legacy.body
    );
    let done = follow_verify_link(&server, &link);
    assert_eq!(done.status, 200, "{}", done.body);
    assert!(done.body.contains("Your email address is confirmed"), "{}", done.body);
    assert!(email_verified(&server, email));

    // The link is single-use: its form, sent again, explains (the page cannot tell before:
    // the token stays in the fragment)…
    let again = follow_verify_link(&server, &link);
    assert_eq!(again.status, 400, "{}", again.body);
    assert!(again.body.contains("This link no longer works"), "{}", again.body);
    assert!(hidden_input(&again.body, "token").is_none(), "{}", again.body);
    // …and a page opened before the token was used says the same when its button is pressed.
    let token = fragment_token(&link);
    // A link mailed before the token moved to the fragment is sent on to it while it works,
    // and told at once that it no longer does afterwards.
    let legacy = get(&server, &format!("/verify-email?token={token}"), None);
    assert_eq!(legacy.status, 400, "{}", legacy.body);
    assert!(legacy.body.contains("This link no longer works"), "{}", legacy.body);
    let late = post_form(
        &server,
        "/verify-email",
        None,
        &[("token", &token), ("password", PASSWORD)],
    );
    assert_eq!(late.status, 400, "{}", late.body);
    assert!(late.body.contains("This link no longer works"), "{}", late.body);
    assert!(
        !server.log().contains(link.rsplit('=').next().unwrap()),
        "the token must not be logged"
    );
    // Nor the address, once the mail went out: a log kept for months would be a list of
    // who exported a key or deleted an account.
    server.wait_for_log("mail sent", Duration::from_secs(10));
    assert!(
        !server.log().contains(email),
        "the address of a mail sent is logged:\n{}",
        server.log()
    );
}

#[test]
fn a_failed_delivery_is_logged_without_secrets_and_keeps_the_account() {
    // An SMTP server that is not there (a port nothing listens on), with a password in the URL.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::new(&dir.path().join("data"))
        .env(
            "KEYCAST_SMTP_URL",
            &format!("smtp://mailer:hunter2-smtp-pw@127.0.0.1:{port}"),
        )
        .env("KEYCAST_MAIL_FROM", "keycast <noreply@keycast.test>")
        .start();
    let email = "undelivered@example.com";
    let r = post_json(
        &server,
        "/api/auth/register",
        None,
        &json!({ "email": email, "password": PASSWORD }),
    );
    assert_eq!(
        r.status, 201,
        "the account is created although mail cannot go out: {}",
        r.body
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !server.log().contains("could not send mail") {
        assert!(
            Instant::now() < deadline,
            "no delivery failure logged:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = server.log();
    assert!(log.contains(email), "the failure names the recipient:\n{log}");
    assert!(
        !log.contains("hunter2-smtp-pw"),
        "the SMTP password leaked into the log:\n{log}"
    );
    assert!(
        !log.contains("/verify-email#token="),
        "the mailed link leaked into the log:\n{log}"
    );
    // Logging in works (and the address is, rightly, still unconfirmed).
    assert!(!email_verified(&server, email));
}

/// Anyone can register any address, and each registration mails it: a flood of them filled
/// the one mail queue, and a reset link or a "your key was exported" notice asked for
/// meanwhile was dropped — while the owner was told it was on its way, and one of their three
/// tries spent. Now sign-up mail and account mail wait in separate lanes, and a request for a
/// link that finds its lane full is answered 503 before anything is spent.
#[test]
fn a_flood_of_sign_ups_does_not_crowd_out_a_reset_and_a_full_lane_says_so() {
    // A mail server that takes connections and never answers: every mail waits.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let held = std::thread::spawn(move || silent.incoming().map_while(Result::ok).take(64).collect::<Vec<_>>());
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::new(&dir.path().join("data"))
        .env("KEYCAST_SMTP_URL", &format!("smtp://127.0.0.1:{port}"))
        .env("KEYCAST_MAIL_FROM", "keycast <noreply@keycast.test>")
        .env("KEYCAST_SMTP_MAX_WAITING", "4")
        .start();
    let owner = cookie_of(&sign_up(&server, "owner@example.com"));
    for n in 0..6 {
        let r = sign_up(&server, &format!("flood{n}@example.com"));
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let dropped = |lane: &str| {
        let metrics = server.get("/metrics").1;
        metrics
            .lines()
            .filter(|l| l.starts_with("keycast_mail_dropped_total") && l.contains(&format!("lane=\"{lane}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    assert!(dropped("sign_up") >= 3.0, "the sign-up lane overflowed");

    let forgot = |email: &str| post_json(&server, "/api/auth/forgot-password", None, &json!({ "email": email }));
    assert_eq!(forgot("owner@example.com").status, 202);
    assert_eq!(
        dropped("account"),
        0.0,
        "the owner's reset was taken:\n{}",
        server.log()
    );
    assert!(
        !server
            .log()
            .lines()
            .any(|l| l.contains("dropped") && l.contains("owner@example.com") && l.contains("account")),
        "{}",
        server.log()
    );

    // Fill the account lane too: a link asked for now is refused honestly, for an address
    // with an account or without one alike, and costs nothing.
    for n in 0..3 {
        assert_eq!(forgot(&format!("flood{n}@example.com")).status, 202);
    }
    for email in ["flood5@example.com", "nobody@example.com"] {
        let refused = forgot(email);
        assert_eq!(refused.status, 503, "{}", refused.body);
        assert!(refused.retry_after.is_some(), "503 says when to retry");
        assert!(refused.body.contains("ask again"), "{}", refused.body);
    }
    assert_eq!(dropped("account"), 0.0, "nothing was taken only to be dropped");
    // A change whose notice could not be mailed now is refused: whoever holds the password
    // cannot fill the lane first and change the password (or export the key) unannounced.
    let body = json!({ "current_password": PASSWORD, "new_password": "a new password here" });
    let changed = post_json(&server, "/api/user/password", Some(&owner), &body);
    assert_eq!(changed.status, 503, "{}", changed.body);
    assert!(changed.body.contains("notice"), "{}", changed.body);
    let login = harness::flow::login(&server, "owner@example.com", PASSWORD);
    assert_eq!(login.status, 200, "the password is unchanged: {}", login.body);
    drop(server);
    drop(held);
}

/// An address no mailer sends to (a trailing dot, an empty dot-atom) was accepted at sign-up:
/// the account could never get its verification mail nor a reset link, and was told nothing.
/// Now it is refused, saying so.
#[test]
fn an_address_no_mailer_sends_to_is_refused_at_sign_up() {
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::new(&dir.path().join("data")).start();
    for email in ["someone@example.org.", "some..one@example.org", "someone@example..org"] {
        let r = sign_up(&server, email);
        assert_eq!(r.status, 400, "{email}: {}", r.body);
        assert!(r.body.contains("email"), "{}", r.body);
    }
    assert!(outbox(&server).is_empty(), "nothing was mailed");
}

fn outbox(server: &Keycast) -> Vec<Value> {
    get(server, "/api/test/outbox", None).json()["messages"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn mails_to(server: &Keycast, email: &str, purpose: &str) -> Vec<Value> {
    outbox(server)
        .into_iter()
        .filter(|m| m["to"] == email && m["purpose"] == purpose)
        .collect()
}

#[test]
fn a_new_verification_link_can_be_asked_for_without_revealing_accounts() {
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::new(&dir.path().join("data"))
        .env("KEYCAST_TEST_ROUTES", "true")
        .start();
    let email = "resend@example.com";
    let r = post_form(
        &server,
        "/register",
        None,
        &[("email", email), ("password", PASSWORD), ("nsec", "")],
    );
    assert_eq!(r.status, 303, "{}", r.body);
    let cookie = cookie_of(&r);
    assert_eq!(mails_to(&server, email, "verify_email").len(), 1);

    // The API answers the same for an unverified account and an unknown email; only the
    // account gets mail.
    let known = post_json(
        &server,
        "/api/auth/resend-verification",
        None,
        &json!({ "email": email }),
    );
    let unknown = post_json(
        &server,
        "/api/auth/resend-verification",
        None,
        &json!({ "email": "nobody@example.com" }),
    );
    assert_eq!((known.status, known.body.as_str()), (202, unknown.body.as_str()));
    assert_eq!(unknown.status, 202);
    assert_eq!(mails_to(&server, email, "verify_email").len(), 2);
    assert!(mails_to(&server, "nobody@example.com", "verify_email").is_empty());

    // The dashboard offers the same while the address is unconfirmed (with the CSRF token).
    let dashboard = get(&server, "/dashboard", Some(&cookie));
    assert!(dashboard.body.contains("email not verified yet"), "{}", dashboard.body);
    let csrf = hidden_input(&dashboard.body, "csrf").unwrap();
    let forged = post_form(
        &server,
        "/dashboard/resend-verification",
        Some(&cookie),
        &[("csrf", "x")],
    );
    assert_eq!(forged.status, 403, "{}", forged.body);
    let r = post_form(
        &server,
        "/dashboard/resend-verification",
        Some(&cookie),
        &[("csrf", &csrf)],
    );
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(r.location.as_deref(), Some("/dashboard?sent=verification"));
    let mails = mails_to(&server, email, "verify_email");
    assert_eq!(mails.len(), 3);

    // Any of the links confirms; afterwards nothing more is sent, and the answer is the same.
    let link = link_in(mails[2]["body"].as_str().unwrap(), "/verify-email#token=");
    assert_eq!(follow_verify_link(&server, &link).status, 200);
    let verified = post_json(
        &server,
        "/api/auth/resend-verification",
        None,
        &json!({ "email": email }),
    );
    assert_eq!((verified.status, verified.body.as_str()), (202, unknown.body.as_str()));
    assert_eq!(mails_to(&server, email, "verify_email").len(), 3);
    let dashboard = get(&server, "/dashboard", Some(&cookie));
    assert!(!dashboard.body.contains("email not verified yet"), "{}", dashboard.body);

    // Rate-limited per email like forgot-password: a burst of 3, then 429 with Retry-After.
    let other = "limited@example.com";
    let statuses: Vec<u16> = (0..4)
        .map(|_| {
            post_json(
                &server,
                "/api/auth/resend-verification",
                None,
                &json!({ "email": other }),
            )
            .status
        })
        .collect();
    assert_eq!(statuses, [202, 202, 202, 429]);
}

#[test]
fn forgot_password_mails_a_link_whose_page_sets_a_new_password() {
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::new(&dir.path().join("data"))
        .env("KEYCAST_TEST_ROUTES", "true")
        .start();
    let email = "forgetful@example.com";
    let r = post_form(
        &server,
        "/register",
        None,
        &[("email", email), ("password", PASSWORD), ("nsec", "")],
    );
    let old_session = cookie_of(&r);

    // The login page links to the forgot-password page, whose form asks for a link.
    let login = get(&server, "/login", None);
    assert!(login.body.contains("href=\"/forgot-password\""), "{}", login.body);
    let page = get(&server, "/forgot-password", None);
    assert_eq!(page.status, 200);
    assert_eq!(form_action(&page.body, "/forgot").as_deref(), Some("/forgot-password"));
    let sent = post_form(&server, "/forgot-password", None, &[("email", email)]);
    assert_eq!(sent.status, 200, "{}", sent.body);
    assert!(sent.body.contains("Check your mailbox"), "{}", sent.body);
    let nobody = post_form(&server, "/forgot-password", None, &[("email", "nobody@example.com")]);
    assert_eq!(nobody.status, 200);
    assert!(
        nobody.body.contains("Check your mailbox"),
        "the same answer for an unknown email"
    );
    let mails = mails_to(&server, email, "reset_password");
    assert_eq!(mails.len(), 1, "{mails:?}");
    assert!(mails_to(&server, "nobody@example.com", "reset_password").is_empty());

    // The mailed link carries its token in the fragment, which browsers never send: no
    // request log in front of keycast, and no `Referer`, ever holds it. The page it opens
    // has a field the page's script fills from the fragment (the Chromium test runs it).
    let link = link_in(mails[0]["body"].as_str().unwrap(), "/reset-password#token=");
    let parsed = url::Url::parse(&link).unwrap();
    assert_eq!(parsed.query(), None, "{link}");
    let token = parsed.fragment().unwrap()["token=".len()..].to_owned();
    let form_page = get(&server, parsed.path(), None);
    assert_eq!(form_page.status, 200, "{}", form_page.body);
    assert!(
        form_page
            .body
            .contains("name=\"token\" required autocomplete=\"off\" data-from-fragment=\"token\""),
        "{}",
        form_page.body
    );
    // A link mailed before has the token in its query: sent on to the fragment form.
    let legacy = get(&server, &format!("/reset-password?token={token}"), None);
    assert_eq!(legacy.status, 303, "{}", legacy.body);
    assert_eq!(
        legacy.location.as_deref(),
        Some(format!("/reset-password#token={token}").as_str())
    );

    // Posted from another site: refused, as an HTML page.
    let foreign = post(
        &server,
        "/reset-password",
        None,
        FORM,
        &form(&[("token", &token), ("password", "a brand new password")]),
        &[("Origin", "https://evil.example")],
    );
    assert_eq!(foreign.status, 403, "{}", foreign.body);
    assert!(foreign.body.starts_with("<!doctype html>"), "{}", foreign.body);

    // Too short: the form again with the reason, the link still usable.
    let short = post_form(
        &server,
        "/reset-password",
        None,
        &[("token", &token), ("password", "short")],
    );
    assert_eq!(short.status, 400, "{}", short.body);
    assert!(short.body.contains("class=\"error\""), "{}", short.body);
    assert_eq!(hidden_input(&short.body, "token").as_deref(), Some(token.as_str()));

    let new_password = "a brand new password";
    let done = post_form(
        &server,
        "/reset-password",
        None,
        &[("token", &token), ("password", new_password)],
    );
    assert_eq!(done.status, 200, "{}", done.body);
    assert!(done.body.contains("Your password was changed"), "{}", done.body);

    // Every session ended; the new password logs in, the old one no longer does.
    let dashboard = get(&server, "/dashboard", Some(&old_session));
    assert_eq!(dashboard.location.as_deref(), Some("/login"));
    let login = |password: &str| post_form(&server, "/login", None, &[("email", email), ("password", password)]).status;
    assert_eq!(login(PASSWORD), 401);
    assert_eq!(login(new_password), 303);

    // The link is single-use: a link mailed before (token in the query) opened again
    // explains at once; posting the old form fails.
    let reopened = get(&server, &format!("/reset-password?token={token}"), None);
    assert_eq!(reopened.status, 400, "{}", reopened.body);
    assert!(reopened.body.contains("This link no longer works"), "{}", reopened.body);
    assert!(reopened.body.contains("href=\"/forgot-password\""), "{}", reopened.body);
    let again = post_form(
        &server,
        "/reset-password",
        None,
        &[("token", &token), ("password", "yet another password")],
    );
    assert_eq!(again.status, 400, "{}", again.body);
    assert!(again.body.contains("invalid or has expired"), "{}", again.body);
}
