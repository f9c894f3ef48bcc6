//! The server-rendered pages of the OAuth flow: minimal, dependency-free HTML. Every
//! value is escaped with [`escape`]. The account pages (register, login, dashboard) are
//! in `pages.rs` and share [`layout`].

use keycast_db::policies::PolicyRow;

use crate::oauth::AuthorizeParams;

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
         .row{{display:flex;gap:.5rem}}.error{{color:#b00}}{extra_css}</style></head><body>{body}</body></html>",
        title = escape(title)
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

/// The consent page: who asks (the redirect origin), for which policy, approve or deny.
pub fn consent(params: &AuthorizeParams, origin: &str, policy: &PolicyRow, email: &str, csrf: &str) -> String {
    let body = format!(
        "<h1>Allow <strong>{origin}</strong> to sign for you?</h1>\
         <p>Signed in as {email}.</p>\
         <p>Policy: <strong>{name}</strong> (<code>{slug}</code>) — {description}</p>\
         <p>You can revoke this access at any time.</p>\
         <form method=\"post\" action=\"/api/oauth/authorize\">{hidden}\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <div class=\"row\"><button type=\"submit\" name=\"decision\" value=\"deny\">Deny</button>\
         <button type=\"submit\" name=\"decision\" value=\"approve\">Approve</button></div></form>",
        origin = escape(origin),
        email = escape(email),
        name = escape(&policy.display_name),
        slug = escape(&policy.slug),
        description = escape(&policy.description),
        hidden = hidden(params),
        csrf = escape(csrf),
    );
    layout("Authorize", &body)
}
