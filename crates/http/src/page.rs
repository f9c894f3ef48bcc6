//! The server-rendered pages of the OAuth flow: minimal, dependency-free HTML. Every
//! value is escaped with [`escape`]. The account pages (register, login, dashboard) are
//! in `pages.rs` and share [`layout`], [`html`] and the HTML error pages ([`html_errors`]).

use axum::body::Body;
use axum::extract::Request;
use axum::http::header::{ACCEPT, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use keycast_db::policies::PolicyRow;
use sha2::{Digest, Sha256};
use std::sync::LazyLock;

use crate::error::ErrorMessage;
use keycast_core::clients::ClientIdentity;

use crate::oauth::AuthorizeParams;

/// An HTML page that is never cached (framing, referrer and the rest: [`security_headers`],
/// on every response).
pub(crate) fn html(status: StatusCode, page: String) -> Response {
    let mut response = (status, Html(page)).into_response();
    secure_headers(response.headers_mut());
    response
}

fn secure_headers(headers: &mut HeaderMap) {
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

/// The policy of every HTML page: nothing loads but the page's own inline style and the one
/// script [`PAGE_SCRIPT`] (by its hash: no other script runs), nothing may frame it (RFC 9700
/// §4.16: the consent page must not be clickjacked), no `<base>` can redirect its links.
/// `form-action` is left out on purpose: Chromium applies it to the redirect after the
/// consent form, which goes to the app.
static HTML_CSP: LazyLock<HeaderValue> = LazyLock::new(|| {
    let hash = STANDARD.encode(Sha256::digest(PAGE_SCRIPT.as_bytes()));
    HeaderValue::from_str(&format!(
        "default-src 'none'; style-src 'unsafe-inline'; script-src 'sha256-{hash}'; img-src 'self' data:; \
         frame-ancestors 'none'; base-uri 'none'"
    ))
    .expect("a header value")
});

/// Keeps the buttons that grant or dismiss with one click (`data-after-view`: approve an app,
/// allow a request, authorize a `nostrconnect://` app, hide a warning) disabled until the page has been visible and focused for 800 ms in a row,
/// starting over whenever it loses either. Double-clickjacking: a hostile page that gets a
/// double click from its visitor brings keycast's page up under the pointer between the two
/// clicks (framing is refused, a new window or the opener's navigation is not), and the
/// second click lands on "Approve" the moment the page is uncovered. Server-side, the form's
/// `shown` stamp refuses an approval within 800 ms of the page being served (the page opened
/// between the clicks, or a browser without scripts).
pub(crate) const VIEW_GATE: &str = "(function(){\
var b=document.querySelectorAll('button[data-after-view]'),t=null;\
function set(d){for(var i=0;i<b.length;i++){b[i].disabled=d;}}\
function hold(){clearTimeout(t);t=null;set(true);}\
function watch(){hold();if(document.visibilityState==='visible'&&document.hasFocus()){t=setTimeout(function(){set(false);},800);}}\
window.addEventListener('focus',watch);window.addEventListener('blur',hold);\
document.addEventListener('visibilitychange',watch);watch();})();";
/// Fills each `input[data-from-fragment=NAME]` from `NAME=` in the URL's fragment, hides its
/// label, takes the fragment out of the address bar, and posts each filled form marked
/// `data-submit-when-filled`. A link carries a secret there (a mailed token:
/// `/reset-password#token=…`; an app's `nostrconnect://` URI: `/dashboard#nostrconnect=…`)
/// because a browser never sends a fragment: not to keycast, so no request log in front of
/// it (Cloud Run's keeps every URL) records it, and not in a `Referer`. Without scripts a
/// visible field stays for the secret to be pasted. A link to the page already open changes
/// only its fragment (no new load): that is read too.
pub(crate) const FRAGMENT_FIELDS: &str = "(function(){function fill(){\
var h=location.hash.slice(1);if(!h){return;}\
var p=new URLSearchParams(h),f=document.querySelectorAll('input[data-from-fragment]'),n=0,s=[];\
for(var i=0;i<f.length;i++){var v=p.get(f[i].getAttribute('data-from-fragment'));\
if(v){f[i].value=v;var l=f[i].closest('label');if(l){l.hidden=true;}n++;\
if(f[i].form&&f[i].form.hasAttribute('data-submit-when-filled')){s.push(f[i].form);}}}\
if(n){history.replaceState(null,'',location.pathname+location.search);}\
for(var j=0;j<s.length;j++){s[j].submit();}}\
fill();window.addEventListener('hashchange',fill);})();";
/// The one script of every page: [`VIEW_GATE`], then [`FRAGMENT_FIELDS`].
pub(crate) static PAGE_SCRIPT: LazyLock<String> = LazyLock::new(|| format!("{VIEW_GATE}{FRAGMENT_FIELDS}"));
/// Every other answer (JSON, text) loads nothing and is framed by no one either.
const API_CSP: &str = "default-src 'none'; frame-ancestors 'none'";
/// Two years, the preload lists' minimum; subdomains are the operator's business.
const HSTS: &str = "max-age=63072000";

/// Middleware on every response (issue 12, item 3): `X-Content-Type-Options: nosniff`, a
/// Content-Security-Policy (strict for HTML, none-at-all for the rest), `X-Frame-Options:
/// DENY` for browsers without `frame-ancestors`, a `Referrer-Policy`, and HSTS when the
/// public URL is https.
pub(crate) async fn security_headers(
    axum::extract::State(state): axum::extract::State<crate::AppState>,
    request: Request,
    next: Next,
) -> Response {
    let mut response = next.run(request).await;
    let html = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/html"));
    let headers = response.headers_mut();
    let csp = if html {
        HTML_CSP.clone()
    } else {
        HeaderValue::from_static(API_CSP)
    };
    headers.insert(HeaderName::from_static("content-security-policy"), csp);
    headers.insert(
        HeaderName::from_static("x-frame-options"),
        HeaderValue::from_static("DENY"),
    );
    headers.insert(
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    // `same-origin`, not `no-referrer`: the latter would make browsers send `Origin: null`
    // on the forms' own posts, which the CSRF check refuses; pages reached from a mailed
    // link carry its token in the URL, which must not leak to other sites.
    headers.insert(
        HeaderName::from_static("referrer-policy"),
        HeaderValue::from_static("same-origin"),
    );
    if state.options().public_url.starts_with("https://") {
        headers.insert(
            HeaderName::from_static("strict-transport-security"),
            HeaderValue::from_static(HSTS),
        );
    }
    response
}

/// Middleware for routes that serve HTML: an error answer (any [`crate::AppError`], from the
/// handler or an extractor) becomes an HTML page with the same status and message.
pub(crate) async fn html_errors(request: Request, next: Next) -> Response {
    error_page(next.run(request).await)
}

/// Re-renders an [`crate::AppError`] response as an HTML page (same status and headers, e.g.
/// `Retry-After`); any other response is returned unchanged.
pub(crate) fn error_page(response: Response) -> Response {
    let Some(ErrorMessage(message)) = response.extensions().get::<ErrorMessage>().cloned() else {
        return response;
    };
    let (mut parts, _) = response.into_parts();
    let title = error_title(parts.status);
    let body = format!(
        "<h1>{title}</h1><p class=\"error\" role=\"alert\">{message}</p>\
         <p><a href=\"/\">Back to keycast</a></p>",
        title = escape(title),
        message = escape(&message),
    );
    parts.headers.remove(CONTENT_LENGTH);
    parts
        .headers
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    secure_headers(&mut parts.headers);
    Response::from_parts(parts, Body::from(layout(title, &body)))
}

fn error_title(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "That did not work",
        401 => "Please log in",
        403 => "Not allowed",
        404 => "Page not found",
        409 => "Already taken",
        410 => "Expired",
        429 => "Too many attempts",
        503 => "keycast is not available right now",
        _ => "Something went wrong",
    }
}

/// Whether an unknown route should be answered with an HTML page: outside the API's own
/// paths (`/api/`, `/healthz/`, `/metrics`, `/.well-known/`), for a client that accepts
/// `text/html` (a browser).
pub(crate) fn wants_html(path: &str, headers: &HeaderMap) -> bool {
    let api = !is_page_path(path);
    let accepts_html = headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/html"));
    !api && accepts_html
}

/// Whether `path` is outside the API's own paths (`/api/`, `/healthz/`, `/metrics`,
/// `/.well-known/`): a page for people, whose errors are HTML.
pub(crate) fn is_page_path(path: &str) -> bool {
    !["/api/", "/healthz/", "/metrics", "/.well-known/"]
        .iter()
        .any(|prefix| path.starts_with(prefix))
}

/// HTML-escapes text for element content and double-quoted attributes.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A complete page: `title`, the shared style, and `body` (already escaped HTML).
pub(crate) fn layout(title: &str, body: &str) -> String {
    layout_with(title, "", body)
}

/// [`layout`] with `extra_css` appended to the shared style (a wider page, tables).
pub(crate) fn layout_with(title: &str, extra_css: &str, body: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title} · keycast</title>\
         <style>body{{font-family:system-ui,sans-serif;max-width:28rem;margin:3rem auto;padding:0 1rem}}\
         input,button{{font-size:1rem;padding:.5rem;margin:.25rem 0;width:100%;box-sizing:border-box}}\
         .row{{display:flex;gap:.5rem}}.error{{color:#b00}}.secret{{-webkit-text-security:disc}}{extra_css}</style></head><body>{body}\
         <script>{script}</script></body></html>",
        title = escape(title),
        script = *PAGE_SCRIPT
    )
}

fn hidden(params: &AuthorizeParams) -> String {
    params
        .hidden_fields()
        .into_iter()
        .map(|(name, value)| format!("<input type=\"hidden\" name=\"{name}\" value=\"{}\">", escape(value)))
        .collect()
}

/// The login form shown by `GET /api/oauth/authorize` without a session; it posts to
/// `/api/oauth/login`, which returns to the consent page.
pub fn login(params: &AuthorizeParams, error: Option<&str>) -> String {
    let error = error
        .map(|e| format!("<p class=\"error\">{}</p>", escape(e)))
        .unwrap_or_default();
    let body = format!(
        "<h1>Log in to keycast</h1>{error}\
         <form method=\"post\" action=\"/api/oauth/login\">{hidden}\
         <label>Email <input type=\"email\" name=\"email\" required autocomplete=\"username\"></label>\
         <label>Password <input type=\"password\" name=\"password\" required autocomplete=\"current-password\"></label>\
         <button type=\"submit\">Log in</button></form>",
        hidden = hidden(params)
    );
    layout("Log in", &body)
}

/// Instead of the consent page while the account's email is unverified: no app can be
/// authorized until the mailbox owner has proved control (see `core::account_security`).
pub fn verify_first(email: &str) -> String {
    let body = format!(
        "<h1>Confirm your email first</h1>\
         <p class=\"error\" role=\"alert\">Signed in as {email}, whose address is not confirmed yet. keycast \
         authorizes apps only for confirmed accounts: open the link keycast mailed you, then come back here.</p>\
         <p><a href=\"/dashboard\">Your dashboard</a> sends the link again.</p>",
        email = escape(email),
    );
    layout("Confirm your email", &body)
}

/// The consent page when the account already has its most live grants: nothing to approve
/// until one is revoked.
pub fn at_grant_cap(email: &str, message: &str) -> String {
    let body = format!(
        "<h1>Too many apps</h1>\
         <p class=\"error\" role=\"alert\">Signed in as {email}: {message}.</p>\
         <p><a href=\"/dashboard\">Your dashboard</a> lists your apps and revokes them.</p>",
        email = escape(email),
        message = escape(message),
    );
    layout("Too many apps", &body)
}

/// What the consent page shows besides the user.
pub(crate) struct Consent<'a> {
    pub params: &'a AuthorizeParams,
    /// The redirect URI's origin: where the code goes, the one fact keycast can vouch for.
    pub origin: &'a str,
    pub identity: &'a ClientIdentity,
    pub policy: &'a PolicyRow,
    /// The policy in words, generated from its permissions.
    pub lines: &'a [String],
    /// The user's own policies, offered instead of the one the app asked for, each with
    /// its words.
    pub own: &'a [(PolicyRow, Vec<String>)],
}

/// A registered app by its name, marked verified, with its redirect host; an unregistered
/// one by its redirect host, marked unverified, with the name it gave itself in small print.
/// A registered app's logo is not shown: the pages load nothing from other origins (CSP),
/// so the logo's host never learns who looks at the page.
fn consent_heading(consent: &Consent<'_>) -> String {
    let origin = escape(consent.origin);
    match consent.identity {
        ClientIdentity::Verified(client) => format!(
            "<h1>Allow <strong>{name}</strong> to sign for you?</h1>\
             <p class=\"client verified\">&#10003; Verified app: registered with this keycast by its operator. \
             It will receive your answer at <strong class=\"redirect-host\">{origin}</strong>.</p>",
            name = escape(&client.name),
        ),
        ClientIdentity::Unverified => format!(
            "<h1>Allow <strong class=\"redirect-host\">{origin}</strong> to sign for you?</h1>\
             <p class=\"client unverified\">&#9888; Unverified app: it is not registered with this keycast, and the \
             name it gives itself (<code>{client_id}</code>) is unchecked. Approve only if you came here from \
             <strong>{origin}</strong>: that is where your answer goes.</p>",
            client_id = escape(&consent.params.client_id),
        ),
    }
}

/// The choice of one of the user's own policies instead of the app's, with the words of
/// each (empty without any).
fn own_policies(consent: &Consent<'_>) -> String {
    if consent.own.is_empty() {
        return String::new();
    }
    let mut options = format!(
        "<option value=\"{slug}\" selected>{name}, as the app asks</option>",
        slug = escape(&consent.policy.slug),
        name = escape(&consent.policy.display_name),
    );
    let mut described = String::new();
    for (row, lines) in consent.own {
        options.push_str(&format!(
            "<option value=\"{slug}\">{name} (yours)</option>",
            slug = escape(&row.slug),
            name = escape(&row.display_name),
        ));
        let items: String = lines.iter().map(|l| format!("<li>{}</li>", escape(l))).collect();
        described.push_str(&format!(
            "<p>{name} (yours) lets the app:</p><ul class=\"allows\">{items}</ul>",
            name = escape(&row.display_name)
        ));
    }
    format!(
        "<fieldset><legend>Under which policy</legend><select name=\"policy\">{options}</select>{described}</fieldset>"
    )
}

pub(crate) fn consent(consent: &Consent<'_>, email: &str, csrf: &str, shown: &str) -> String {
    let allows: String = consent
        .lines
        .iter()
        .map(|l| format!("<li>{}</li>", escape(l)))
        .collect();
    let body = format!(
        "{heading}\
         <p>Signed in as {email}.</p>\
         <p>Policy: <strong>{name}</strong> (<code>{slug}</code>). The app may:</p><ul class=\"allows\">{allows}</ul>\
         <p>You can revoke this access at any time.</p>\
         <form method=\"post\" action=\"/api/oauth/authorize\">{hidden}{own}\
         <fieldset><legend>For how long</legend>\
         <select name=\"duration\"><option value=\"hour\">An hour</option><option value=\"day\">A day</option>\
         <option value=\"week\">A week</option><option value=\"forever\" selected>Until I revoke it</option></select>\
         </fieldset><fieldset><legend>Limits (optional; empty means none)</legend>\
         <label>Signatures in all <input type=\"number\" min=\"1\" name=\"max_signatures\"></label>\
         <label>Per minute <input type=\"number\" min=\"1\" name=\"per_minute\"></label>\
         <label>Per hour <input type=\"number\" min=\"1\" name=\"per_hour\"></label>\
         <label>Per day <input type=\"number\" min=\"1\" name=\"per_day\"></label></fieldset>\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <input type=\"hidden\" name=\"shown\" value=\"{shown}\">\
         <div class=\"row\"><button type=\"submit\" name=\"decision\" value=\"deny\">Deny</button>\
         <button type=\"submit\" name=\"decision\" value=\"approve\" data-after-view>Approve</button></div></form>",
        heading = consent_heading(consent),
        email = escape(email),
        name = escape(&consent.policy.display_name),
        slug = escape(&consent.policy.slug),
        hidden = hidden(consent.params),
        own = own_policies(consent),
        csrf = escape(csrf),
        shown = escape(shown),
    );
    layout("Authorize", &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The browser runs the page's one script only if the CSP names its exact bytes: a
    /// change to either that leaves them apart silently turns the double-clickjacking
    /// defence off (the Chromium test proves it end to end where a browser is installed).
    #[test]
    fn the_csp_allows_exactly_the_script_every_page_carries() {
        let csp = HTML_CSP.to_str().unwrap();
        let hash = STANDARD.encode(Sha256::digest(PAGE_SCRIPT.as_bytes()));
        assert!(csp.contains(&format!("script-src 'sha256-{hash}'")), "{csp}");
        let page = layout("t", "<p>body</p>");
        assert!(page.contains(&format!("<script>{}</script>", *PAGE_SCRIPT)), "{page}");
        assert_eq!(page.matches("<script").count(), 1, "one script, no other");
    }
}
