//! A small HTTP client for the API and page tests: one cookie (the session), no redirect
//! following, and helpers to read forms out of keycast's HTML.

use std::time::Duration;

use serde_json::{json, Value};

use super::Keycast;

/// The redirect URI the tests register apps with (loopback, so keycast allows plain http).
pub const REDIRECT: &str = "http://127.0.0.1:9/callback";
/// The password of every account the tests create.
pub const PASSWORD: &str = "correct horse battery";
/// The content type of HTML form posts.
pub const FORM: &str = "application/x-www-form-urlencoded";

// ---------------------------------------------------------------------------------------
// A small HTTP client with one cookie (the session) and no redirect following.
// ---------------------------------------------------------------------------------------

pub struct Reply {
    pub status: u16,
    pub location: Option<String>,
    pub retry_after: Option<String>,
    pub set_cookie: Option<String>,
    pub www_authenticate: Option<String>,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|_| Value::String(self.body.clone()))
    }
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .new_agent()
}

pub fn reply(result: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Reply {
    let mut r = result.expect("keycast answers");
    let header = |name: &str| r.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (location, retry_after, set_cookie) = (header("location"), header("retry-after"), header("set-cookie"));
    Reply {
        status: r.status().as_u16(),
        location,
        retry_after,
        set_cookie,
        www_authenticate: header("www-authenticate"),
        body: r.body_mut().read_to_string().unwrap_or_default(),
    }
}

/// `(path, content type, body)` POST with an optional session cookie and extra headers.
pub fn post(
    server: &Keycast,
    path: &str,
    cookie: Option<&str>,
    content_type: &str,
    body: &str,
    extra: &[(&str, &str)],
) -> Reply {
    let mut req = agent()
        .post(format!("{}{path}", server.base))
        .header("Content-Type", content_type);
    if let Some(c) = cookie {
        req = req.header("Cookie", c);
    }
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    reply(req.send(body))
}

pub fn post_json(server: &Keycast, path: &str, cookie: Option<&str>, body: &Value) -> Reply {
    post(server, path, cookie, "application/json", &body.to_string(), &[])
}

pub fn get(server: &Keycast, path: &str, cookie: Option<&str>) -> Reply {
    let mut req = agent().get(format!("{}{path}", server.base));
    if let Some(c) = cookie {
        req = req.header("Cookie", c);
    }
    reply(req.call())
}

/// The session's live grants (not revoked), as `GET /api/user/authorizations` lists them.
pub fn live_grants(server: &Keycast, cookie: &str) -> Vec<Value> {
    let listed = get(server, "/api/user/authorizations", Some(cookie)).json();
    listed["authorizations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["revoked_at"].is_null())
        .cloned()
        .collect()
}

pub fn delete(server: &Keycast, path: &str, cookie: &str) -> Reply {
    reply(
        agent()
            .delete(format!("{}{path}", server.base))
            .header("Cookie", cookie)
            .call(),
    )
}

pub fn rpc(server: &Keycast, token: &str, method: &str, params: Value) -> Reply {
    let body = json!({ "method": method, "params": params }).to_string();
    post(
        server,
        "/api/nostr",
        None,
        "application/json",
        &body,
        &[("Authorization", &format!("Bearer {token}"))],
    )
}

/// `keycast_session=…` from a Set-Cookie header.
pub fn cookie_of(reply: &Reply) -> String {
    let header = reply.set_cookie.as_deref().expect("a session cookie is set");
    header.split(';').next().unwrap().to_owned()
}

pub fn form(pairs: &[(&str, &str)]) -> String {
    let mut s = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    s.finish()
}

pub fn query_param(url: &str, name: &str) -> Option<String> {
    let url = url::Url::parse(url).unwrap();
    url.query_pairs().find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

/// The value of the hidden `name` input in a page.
pub fn hidden_input(html: &str, name: &str) -> Option<String> {
    let marker = format!("name=\"{name}\" value=\"");
    let start = html.find(&marker)? + marker.len();
    let end = html[start..].find('"')?;
    Some(html[start..start + end].replace("&amp;", "&"))
}

pub fn post_form(server: &Keycast, path: &str, cookie: Option<&str>, pairs: &[(&str, &str)]) -> Reply {
    post(server, path, cookie, FORM, &form(pairs), &[])
}

/// The `action` of the first form whose action starts with `prefix`.
pub fn form_action(html: &str, prefix: &str) -> Option<String> {
    let marker = format!("action=\"{prefix}");
    let start = html.find(&marker)? + "action=\"".len();
    let end = html[start..].find('"')?;
    Some(html[start..start + end].to_owned())
}

/// A JSON request with any method (`PUT`, `PATCH`) and a session cookie.
pub fn send_json(server: &Keycast, method: &str, path: &str, cookie: &str, body: &Value) -> Reply {
    let url = format!("{}{path}", server.base);
    let text = body.to_string();
    let req = match method {
        "PUT" => agent().put(url),
        "PATCH" => agent().patch(url),
        "POST" => agent().post(url),
        other => panic!("send_json: {other}"),
    };
    reply(
        req.header("Content-Type", "application/json")
            .header("Cookie", cookie)
            .send(text.as_str()),
    )
}

/// A request to the admin API with `Authorization: Bearer <token>` (none if `token` is
/// `None`) and an optional JSON body.
pub fn admin(server: &Keycast, method: &str, path: &str, token: Option<&str>, body: Option<&Value>) -> Reply {
    let url = format!("{}{path}", server.base);
    let auth = token.map(|t| format!("Bearer {t}"));
    let agent = agent();
    let result = match (method, body) {
        ("POST", Some(body)) => {
            let mut req = agent.post(&url).header("Content-Type", "application/json");
            if let Some(a) = &auth {
                req = req.header("Authorization", a);
            }
            req.send(body.to_string())
        }
        ("GET", _) => {
            let mut req = agent.get(&url);
            if let Some(a) = &auth {
                req = req.header("Authorization", a);
            }
            req.call()
        }
        ("DELETE", _) => {
            let mut req = agent.delete(&url);
            if let Some(a) = &auth {
                req = req.header("Authorization", a);
            }
            req.call()
        }
        other => panic!("unsupported {other:?}"),
    };
    reply(result)
}
