//! The probes and metrics, driven through the router without a socket.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use keycast_db::{Db, DbOptions};
use keycast_http::{app, AppState, HttpOptions};
use metrics_exporter_prometheus::PrometheusBuilder;
use serde_json::Value;
use tower::ServiceExt;

fn state() -> AppState {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    // Each test binary installs the recorder once; later calls fail harmlessly.
    let _ = metrics::set_global_recorder(recorder);
    AppState::new(handle, HttpOptions::default())
}

async fn get(state: &AppState, path: &str) -> (StatusCode, String) {
    let response = app(state.clone())
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn startup_and_ready_are_503_until_the_database_is_open() {
    let state = state();
    let (status, body) = get(&state, "/healthz/startup").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let json: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["error"], "unavailable");
    assert!(json["message"].as_str().unwrap().contains("starting"));
    assert_eq!(get(&state, "/healthz/ready").await.0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(get(&state, "/healthz/live").await.0, StatusCode::OK);

    let dir = tempfile::tempdir().unwrap();
    state.set_db(Db::open_sqlite(&DbOptions::new(dir.path().join("k.db"))).await.unwrap());
    assert_eq!(get(&state, "/healthz/startup").await.0, StatusCode::OK);
    assert_eq!(get(&state, "/healthz/ready").await.0, StatusCode::OK);
}

#[tokio::test]
async fn ready_is_503_with_a_reason_when_the_database_stops_answering() {
    let state = state();
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open_sqlite(&DbOptions::new(dir.path().join("k.db"))).await.unwrap();
    state.set_db(db.clone());
    db.close().await;
    let (status, body) = get(&state, "/healthz/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("did not answer a query"), "{body}");
}

#[tokio::test]
async fn unknown_routes_get_a_json_404() {
    let (status, body) = get(&state(), "/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let json: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["message"], "no route for GET /nope");
}

#[tokio::test]
async fn metrics_count_requests_by_route_template() {
    let state = state();
    get(&state, "/healthz/live").await;
    // Without a token, /metrics answers a loopback peer only (what a scraper beside keycast is).
    let (refused, _) = get(&state, "/metrics").await;
    assert_eq!(refused, StatusCode::FORBIDDEN, "no peer address: not known to be local");
    let mut request = Request::get("/metrics").body(Body::empty()).unwrap();
    let local: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    request.extensions_mut().insert(axum::extract::ConnectInfo(local));
    let response = app(state.clone()).oneshot(request).await.unwrap();
    let status = response.status();
    let body = String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(
        body.lines().any(|l| l.starts_with("keycast_http_requests_total{")
            && l.contains("route=\"/healthz/live\"")
            && l.contains("status=\"200\"")),
        "{body}"
    );
}

/// `(status, content type, body)` of a GET with extra headers.
async fn get_with(state: &AppState, path: &str, headers: &[(&str, &str)]) -> (StatusCode, String, String) {
    let mut request = Request::get(path);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = app(state.clone())
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, content_type, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn a_browser_gets_html_error_pages_and_the_api_keeps_json() {
    let state = state();
    let browser = [("accept", "text/html,application/xhtml+xml,*/*;q=0.8")];
    // An unknown page, for a browser: an HTML 404 with a human message.
    let (status, content_type, body) = get_with(&state, "/no-such-page", &browser).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(content_type.starts_with("text/html"), "{content_type}");
    assert!(
        body.contains("Page not found") && body.contains("there is no page at /no-such-page"),
        "{body}"
    );
    // The same under /api stays JSON, even for a browser.
    let (status, content_type, _) = get_with(&state, "/api/nope", &browser).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(content_type.starts_with("application/json"), "{content_type}");
    // A page route failing (keycast still starting: no database) is an HTML 503 page…
    let cookie = [("cookie", "keycast_session=abc")];
    let (status, content_type, body) = get_with(&state, "/dashboard", &cookie).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(content_type.starts_with("text/html"), "{content_type}");
    assert!(body.contains("keycast is starting; retry in a moment"), "{body}");
    // …and the same cause on an API route is the usual JSON.
    let (status, content_type, body) = get_with(&state, "/api/user/key", &cookie).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(content_type.starts_with("application/json"), "{content_type}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["error"], "unavailable");
}
