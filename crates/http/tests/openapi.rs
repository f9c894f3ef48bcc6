//! The OpenAPI document (`crates/http/openapi.json`, served at `GET /api/openapi.json`)
//! against the real router: every documented operation is routed, and every route the
//! router has (except the test-only `/api/test/*` and the HTML pages of `src/pages.rs`) is
//! documented, with the same methods.
//!
//! The router's routes are derived, not listed by hand: the paths are every literal
//! `.route("…", …)` in `src/*.rs`, and each path's methods are the ones the router itself
//! answers (anything but 405 and the fallback's "no route for …" 404). A new route, a new
//! method on a route, or a removed route therefore fails this test until the document
//! follows.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use http_body_util::BodyExt;
use keycast_http::{app, AppState, HttpOptions};
use metrics_exporter_prometheus::PrometheusBuilder;
use serde_json::Value;
use tower::ServiceExt;

/// The methods probed on every route (HEAD and OPTIONS follow GET and CORS in axum).
const METHODS: &[&str] = &["get", "post", "put", "patch", "delete"];
/// Keys of a path item that are not operations.
const PATH_ITEM_FIELDS: &[&str] = &["summary", "description", "servers", "parameters", "$ref"];
/// Routes that exist only with `HttpOptions::test_routes` and are never documented.
const TEST_ONLY_PREFIX: &str = "/api/test/";
/// The module of the server-rendered account pages (`/`, `/login`, `/dashboard`, …). They
/// are for people in a browser, not API clients, so they are not in the document. Excluded
/// by file rather than by path prefix because `/healthz/*` and `/metrics` are documented
/// outside `/api`; [`source_route_paths`] makes sure no API path hides in these files.
/// `grant_pages.rs` holds the dashboard's pages for custom policies and one app's grant,
/// `account_pages.rs` its forms to change the password and delete the account.
const PAGES_FILES: &[&str] = &["pages.rs", "grant_pages.rs", "account_pages.rs"];

fn state() -> AppState {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let _ = metrics::set_global_recorder(recorder);
    AppState::new(handle, HttpOptions::default())
}

fn document() -> Value {
    serde_json::from_str(keycast_http::openapi::DOCUMENT).expect("openapi.json is valid JSON")
}

/// `/api/user/authorizations/{id}` → `/api/user/authorizations/dummy`.
fn concrete(template: &str) -> String {
    template
        .split('/')
        .map(|segment| {
            if segment.starts_with('{') && segment.ends_with('}') {
                "dummy"
            } else {
                segment
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Whether the router has a route for `method` on `template` (the handler may still
/// refuse the request: 400, 401, 503… all mean the route exists).
async fn routed(state: &AppState, method: &str, template: &str) -> bool {
    let uri = concrete(template);
    let request = Request::builder()
        .method(Method::from_bytes(method.to_uppercase().as_bytes()).unwrap())
        .uri(&uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::empty())
        .unwrap();
    let response = app(state.clone()).oneshot(request).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    if status == StatusCode::METHOD_NOT_ALLOWED {
        return false;
    }
    if status == StatusCode::NOT_FOUND {
        let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let fallback =
            json["error"] == "not_found" && json["message"].as_str().is_some_and(|m| m.starts_with("no route for "));
        return !fallback;
    }
    true
}

/// Every path literal registered with `.route(` in `src/*.rs` (comments skipped), except
/// the HTML pages of [`PAGES_FILES`].
fn source_route_paths() -> BTreeSet<String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut paths = BTreeSet::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let file = entry.unwrap().path();
        if file.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let code: String = std::fs::read_to_string(&file)
            .unwrap()
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .map(|l| format!("{l}\n"))
            .collect();
        for forbidden in [".nest(", ".nest_service(", ".route_service("] {
            assert!(
                !code.contains(forbidden),
                "{}: {forbidden} hides routes from tests/openapi.rs; register them with .route(\"…\", …) or teach the test",
                file.display()
            );
        }
        for (at, _) in code.match_indices(".route(") {
            let rest = code[at + ".route(".len()..].trim_start();
            let path = rest
                .strip_prefix('"')
                .and_then(|r| r.split_once('"'))
                .map(|(p, _)| p.to_owned())
                .unwrap_or_else(|| {
                    panic!(
                        "{}: a .route( without a literal path; tests/openapi.rs cannot see it",
                        file.display()
                    )
                });
            if file.file_name().is_some_and(|n| PAGES_FILES.iter().any(|p| n == *p)) {
                assert!(
                    !path.starts_with("/api/") && !path.starts_with("/.well-known/"),
                    "{path}: API routes belong in openapi.json, not in a pages file ({})",
                    file.display()
                );
                continue;
            }
            paths.insert(path);
        }
    }
    paths
}

/// (path, method) of every operation in the document.
fn documented_operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut ops = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths is an object") {
        for (key, _) in item.as_object().expect("a path item is an object") {
            if !PATH_ITEM_FIELDS.contains(&key.as_str()) {
                ops.insert((path.clone(), key.clone()));
            }
        }
    }
    ops
}

/// Follows a local `$ref` (`#/components/...`).
fn resolve<'a>(doc: &'a Value, reference: &str) -> Option<&'a Value> {
    doc.pointer(reference.strip_prefix('#')?)
}

fn check_refs(doc: &Value, node: &Value, at: &str, broken: &mut Vec<String>) {
    match node {
        Value::Object(map) => {
            if let Some(Value::String(r)) = map.get("$ref") {
                if resolve(doc, r).is_none() {
                    broken.push(format!("{at}: $ref {r}"));
                }
            }
            for (k, v) in map {
                check_refs(doc, v, &format!("{at}/{k}"), broken);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                check_refs(doc, v, &format!("{at}/{i}"), broken);
            }
        }
        _ => {}
    }
}

#[test]
fn the_document_is_well_formed_openapi_3_1() {
    let doc = document();
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["info"]["title"].is_string(), "info.title is required");
    assert!(doc["info"]["version"].is_string(), "info.version is required");
    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["bearer"]["type"], "http");
    assert_eq!(schemes["bearer"]["scheme"], "bearer");
    assert_eq!(schemes["cookie"]["type"], "apiKey");
    assert_eq!(schemes["cookie"]["in"], "cookie");
    assert_eq!(schemes["cookie"]["name"], "keycast_session");

    let ops = documented_operations(&doc);
    assert!(!ops.is_empty());
    let mut ids = BTreeSet::new();
    for (path, method) in &ops {
        assert!(path.starts_with('/'), "path {path} must start with /");
        assert!(
            METHODS.contains(&method.as_str()),
            "{path}: {method:?} is not an operation this test knows"
        );
        assert!(
            !path.starts_with(TEST_ONLY_PREFIX),
            "{path}: test-only routes are not documented"
        );
        let op = &doc["paths"][path][method];
        let responses = op["responses"].as_object();
        assert!(
            responses.is_some_and(|r| !r.is_empty()),
            "{method} {path} has no responses"
        );
        for (code, response) in responses.unwrap() {
            assert!(
                code == "default" || (code.len() == 3 && code.parse::<u16>().is_ok()),
                "{method} {path}: response key {code:?}"
            );
            let response = match response.get("$ref").and_then(Value::as_str) {
                Some(r) => resolve(&doc, r).unwrap_or(response),
                None => response,
            };
            assert!(
                response["description"].is_string(),
                "{method} {path} {code}: a response needs a description"
            );
        }
        if let Some(id) = op["operationId"].as_str() {
            assert!(ids.insert(id.to_owned()), "duplicate operationId {id}");
        }
        // Every {param} of the template is declared as a path parameter.
        for segment in path.split('/') {
            if let Some(name) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                let declared = op["parameters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .chain(doc["paths"][path]["parameters"].as_array().into_iter().flatten())
                    .any(|p| p["in"] == "path" && p["name"] == name && p["required"] == true);
                assert!(declared, "{method} {path}: path parameter {name} is not declared");
            }
        }
        for requirement in op["security"].as_array().into_iter().flatten() {
            for scheme in requirement.as_object().unwrap().keys() {
                assert!(
                    schemes.get(scheme).is_some(),
                    "{method} {path}: unknown security scheme {scheme}"
                );
            }
        }
    }
    let mut broken = Vec::new();
    check_refs(&doc, &doc, "#", &mut broken);
    assert!(broken.is_empty(), "unresolved $refs: {broken:#?}");
}

#[test]
fn the_route_scan_sees_the_router() {
    // Guards the scan itself: it finds routes of every module, including test-only ones.
    let paths = source_route_paths();
    for expected in [
        "/healthz/live",
        "/api/nostr",
        "/api/user/authorizations/{id}",
        "/api/test/outbox",
        "/api/openapi.json",
    ] {
        assert!(paths.contains(expected), "the scan missed {expected}: {paths:#?}");
    }
}

#[tokio::test]
async fn the_document_and_the_router_agree() {
    let state = state();
    let doc = document();
    let documented = documented_operations(&doc);

    // The router's (path, method) pairs, outside the test-only routes.
    let mut routed_ops = BTreeSet::new();
    let mut unrouted_paths = Vec::new();
    for path in source_route_paths() {
        if path.starts_with(TEST_ONLY_PREFIX) {
            continue;
        }
        let mut any = false;
        for method in METHODS {
            if routed(&state, method, &path).await {
                routed_ops.insert((path.clone(), (*method).to_owned()));
                any = true;
            }
        }
        if !any {
            unrouted_paths.push(path);
        }
    }
    assert!(
        unrouted_paths.is_empty(),
        "registered in src/ but the router answers no method on them: {unrouted_paths:?}"
    );

    // Documented but not routed: stale documentation (probed directly too, so a path the
    // scan could not see is still caught).
    let mut stale = Vec::new();
    for (path, method) in &documented {
        if !routed_ops.contains(&(path.clone(), method.clone())) || !routed(&state, method, path).await {
            stale.push(format!("{} {path}", method.to_uppercase()));
        }
    }
    // Routed but not documented.
    let undocumented: Vec<String> = routed_ops
        .difference(&documented)
        .map(|(path, method)| format!("{} {path}", method.to_uppercase()))
        .collect();

    let mut by_problem = BTreeMap::new();
    if !stale.is_empty() {
        by_problem.insert("documented in openapi.json but not routed", stale);
    }
    if !undocumented.is_empty() {
        by_problem.insert("routed but missing from openapi.json", undocumented);
    }
    assert!(by_problem.is_empty(), "{by_problem:#?}");
}

#[tokio::test]
async fn the_document_is_served() {
    let response = app(state())
        .oneshot(Request::get("/api/openapi.json").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let served: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(served, document());
}
