//! `/v1/openapi.json` against the real router: every documented operation is served (never
//! `no_route` or `method_not_allowed`), and every other method on a documented path is a 405,
//! so the document lists exactly what the server answers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use reqwest::{Method, StatusCode};
use serde_json::Value;
use wasmq_tests::TestServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_matches_the_routes() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    let (st, doc) = s.get("/v1/openapi.json").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 25, "{} paths", paths.len());
    let methods = [Method::GET, Method::PUT, Method::POST, Method::DELETE];
    let mut checked = 0;
    for (path, item) in paths {
        let url = format!(
            "{}{}",
            s.url,
            path.replace("{topic}", "t").replace(['{', '}'], "")
        );
        for m in &methods {
            let documented = item.get(m.as_str().to_ascii_lowercase()).is_some();
            let resp = s
                .client
                .request(m.clone(), &url)
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await
                .unwrap();
            let status = resp.status();
            let text = resp.text().await.unwrap();
            let code = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["error"]["code"].as_str().map(str::to_string));
            if documented {
                let op = &item[m.as_str().to_ascii_lowercase()];
                assert!(op["summary"].as_str().is_some_and(|x| !x.is_empty()));
                assert!(
                    code.as_deref() != Some("no_route") && status != StatusCode::METHOD_NOT_ALLOWED,
                    "{m} {path} is documented but not served: {status} {text}"
                );
                assert!(!status.is_server_error(), "{m} {path}: {status} {text}");
                checked += 1;
            } else {
                assert_eq!(
                    (status, code.as_deref()),
                    (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed")),
                    "{m} {path} is served but not documented"
                );
            }
        }
    }
    assert!(checked >= 30, "{checked} operations checked");
    // Scopes come from the same rules the auth layer applies.
    assert_eq!(
        paths["/v1/topics/{topic}/messages"]["post"]["x-wasmq-scope"],
        "produce"
    );
    assert_eq!(paths["/v1/plugins/{name}"]["put"]["x-wasmq-scope"], "admin");
    assert_eq!(paths["/v1/topics"]["get"]["x-wasmq-scope"], "read");
    assert_eq!(paths["/healthz"]["get"]["x-wasmq-scope"], "none");
    assert_eq!(
        paths["/v1/subscriptions/{group}"]["put"]["parameters"][0]["name"],
        "group"
    );
    let (st, _) = s.get("/v1/nope").await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}
