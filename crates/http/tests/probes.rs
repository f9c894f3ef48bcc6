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
    let (status, body) = get(&state, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        body.lines().any(|l| l.starts_with("keycast_http_requests_total{")
            && l.contains("route=\"/healthz/live\"")
            && l.contains("status=\"200\"")),
        "{body}"
    );
}
