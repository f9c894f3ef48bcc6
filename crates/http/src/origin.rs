//! Cross-site request forgery: every state-changing request (POST, PUT, PATCH, DELETE) a
//! browser sends must come from keycast's own pages (issue 12, item 2).
//!
//! A page elsewhere can make a visitor's browser post a form to keycast (urlencoded,
//! multipart or `text/plain`, the last one able to carry a JSON-looking body), and the
//! response's `Set-Cookie` is stored: without this check it could log the visitor into an
//! account of its choosing (login CSRF), who would then approve apps under someone else's
//! key. SameSite=Lax cookies do not help there, nor for same-site attackers (a sibling
//! subdomain). So [`require_same_origin`] refuses, with 403:
//! - a request whose `Sec-Fetch-Site` is `cross-site` or `same-site` (sent by every current
//!   browser on every request);
//! - a request whose `Origin` is not keycast's own (the public URL's origin, or the scheme
//!   and host the request was sent to), including `Origin: null`.
//!
//! A request with neither header is not a browser's and passes (command-line clients, apps'
//! servers). Exempt are the endpoints meant for other origins, which never use the session
//! cookie: `POST /api/nostr` (bearer token), `POST /api/oauth/token` (a public client's
//! code exchange) and `POST /api/oauth/revoke` (the token is the credential, RFC 7009).
//! Session-bound forms also carry a CSRF token (`session::csrf_token`), and
//! JSON bodies must say `Content-Type: application/json` (`extract::JsonBody`), which a
//! cross-site form cannot send.

use axum::extract::{Request, State};
use axum::http::header::{HOST, ORIGIN};
use axum::http::{HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::{AppError, AppState};

/// Paths other origins may post to: they authenticate with a bearer token or a PKCE code,
/// never with the session cookie.
const CROSS_ORIGIN_PATHS: &[&str] = &["/api/nostr", "/api/oauth/token", "/api/oauth/revoke"];

/// Middleware: refuses a state-changing request from another site (see the module doc).
pub(crate) async fn require_same_origin(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let unsafe_method = !matches!(*request.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if unsafe_method && !CROSS_ORIGIN_PATHS.contains(&request.uri().path()) {
        if let Err(why) = check(&state.options().public_url, request.headers()) {
            let refusal = AppError::Forbidden(why.into()).into_response();
            return match crate::page::is_page_path(request.uri().path()) {
                true => crate::page::error_page(refusal),
                false => refusal,
            };
        }
    }
    next.run(request).await
}

/// Whether `headers` show a request from keycast's own pages (or from no browser at all).
fn check(public_url: &str, headers: &HeaderMap) -> Result<(), &'static str> {
    let text = |name| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = text("sec-fetch-site") {
        if site.eq_ignore_ascii_case("cross-site") || site.eq_ignore_ascii_case("same-site") {
            return Err("this request came from another site; keycast accepts changes only from its own pages");
        }
    }
    match text(ORIGIN.as_str()) {
        None => Ok(()),
        Some(origin) if is_own_origin(public_url, text(HOST.as_str()), origin) => Ok(()),
        Some(_) => Err(
            "this request came from another origin; keycast accepts changes only from its own pages (Origin mismatch)",
        ),
    }
}

/// `origin` is the public URL's origin, or the scheme and host the request was sent to.
pub(crate) fn is_own_origin(public_url: &str, host: Option<&str>, origin: &str) -> bool {
    let public = url::Url::parse(public_url)
        .map(|u| u.origin().ascii_serialization())
        .unwrap_or_default();
    if origin == public {
        return true;
    }
    host.is_some_and(|host| origin == format!("http://{host}") || origin == format!("https://{host}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, HeaderValue::from_static(v));
        }
        map
    }

    #[test]
    fn own_pages_and_non_browsers_pass_other_sites_do_not() {
        let public = "https://keycast.example";
        let own = headers(&[("origin", "https://keycast.example"), ("sec-fetch-site", "same-origin")]);
        assert!(check(public, &own).is_ok());
        assert!(check(public, &headers(&[])).is_ok(), "curl sends neither header");
        let by_host = headers(&[("origin", "http://127.0.0.1:3000"), ("host", "127.0.0.1:3000")]);
        assert!(check(public, &by_host).is_ok());
        for bad in [
            headers(&[("origin", "https://evil.example")]),
            headers(&[("origin", "null")]),
            headers(&[("sec-fetch-site", "cross-site")]),
            headers(&[("sec-fetch-site", "same-site"), ("origin", "https://keycast.example")]),
            headers(&[("origin", "https://keycast.example.evil.example")]),
        ] {
            assert!(check(public, &bad).is_err(), "{bad:?}");
        }
    }
}
