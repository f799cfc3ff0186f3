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

/// Sends requests to the real server and checks each answer against what the document says
/// of that operation and status: the status is one it lists by number, and the body validates
/// against the listed JSON Schema (draft 2020-12, formats checked).
struct Checker {
    s: TestServer,
    doc: Value,
    /// Operations answered with a 2xx, as `METHOD template`.
    succeeded: std::collections::BTreeSet<String>,
    /// Sent as a bearer token, when the server has tokens.
    token: Option<&'static str>,
}

impl Checker {
    /// Sends `method` to `route` (a documented path, `{param}`s filled from `args` in order,
    /// then an optional `?query`) and checks the answer; returns status and body.
    async fn call(
        &mut self,
        method: Method,
        route: &str,
        args: &[&str],
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let template = route.split('?').next().unwrap().to_string();
        let mut path = String::new();
        let mut args = args.iter();
        for (i, part) in route.split(['{', '}']).enumerate() {
            // Odd parts are parameter names.
            path.push_str(if i % 2 == 1 {
                args.next().unwrap()
            } else {
                part
            });
        }
        let mut req = self
            .s
            .client
            .request(method.clone(), format!("{}{path}", self.s.url));
        if let Some(b) = body {
            req = req.json(&b);
        }
        if let Some(t) = self.token {
            req = req.bearer_auth(t);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.unwrap();
        self.check(method, &template, resp).await
    }

    /// [`Checker::call`] without headers, which must answer `want`.
    async fn want(
        &mut self,
        want: StatusCode,
        method: Method,
        route: &str,
        args: &[&str],
        body: Option<Value>,
    ) -> Value {
        let (status, v) = self.call(method.clone(), route, args, body, &[]).await;
        assert_eq!(status, want, "{method} {route} {args:?}: {v}");
        v
    }

    async fn check(
        &mut self,
        method: Method,
        template: &str,
        resp: reqwest::Response,
    ) -> (StatusCode, Value) {
        let status = resp.status();
        let text = resp.text().await.unwrap();
        let body: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {template}: {status} is not JSON ({e}): {text}"));
        let op = &self.doc["paths"][template][method.as_str().to_ascii_lowercase()];
        assert!(op.is_object(), "{method} {template} is not documented");
        let answer = &op["responses"][status.as_str()];
        assert!(
            answer.is_object(),
            "{method} {template} answered {status}, which the document does not list: {text}"
        );
        let mut schema = answer["content"]["application/json"]["schema"].clone();
        if let Some(r) = schema["$ref"].as_str().map(str::to_string) {
            let name = r.rsplit('/').next().unwrap();
            schema = self.doc["components"]["schemas"][name].clone();
            assert!(schema.is_object(), "{r} is not in the document");
        }
        assert!(
            schema.as_object().is_some_and(|o| !o.is_empty()),
            "{method} {template} {status}: empty schema"
        );
        let validator = jsonschema::draft202012::options()
            .should_validate_formats(true)
            .build(&schema)
            .unwrap_or_else(|e| panic!("{method} {template} {status}: bad schema: {e}"));
        let errors: Vec<String> = validator
            .iter_errors(&body)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{method} {template} {status}: the answer breaks its schema: {errors:?}\n{text}"
        );
        if status.is_success() {
            self.succeeded.insert(format!("{method} {template}"));
        }
        (status, body)
    }
}

/// Every operation, driven through a real broker's life (a topic, publishes, transactions,
/// a plugin, clustering and broadcast subscriptions with dead letters, deletes), answers as
/// the document's response schemas say, and every error on the way is listed by its number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_matches_its_documented_schema() {
    use serde_json::json;
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    let (_, doc) = s.get("/v1/openapi.json").await;
    let mut c = Checker {
        s,
        doc,
        succeeded: Default::default(),
        token: None,
    };
    let (get, post, put, delete) = (Method::GET, Method::POST, Method::PUT, Method::DELETE);
    let (ok, created) = (StatusCode::OK, StatusCode::CREATED);
    for route in ["/healthz", "/v1/cluster", "/v1/openapi.json"] {
        c.want(ok, get.clone(), route, &[], None).await;
    }

    // Topics.
    let t = "/v1/topics/{topic}";
    let orders = &["orders"][..];
    c.want(created, put.clone(), t, orders, Some(json!({"queues": 2})))
        .await;
    let retention = json!({"retention": {"max_bytes": 1048576}});
    c.want(ok, put.clone(), t, orders, Some(retention)).await;
    let shrink = Some(json!({"queues": 1}));
    c.want(StatusCode::CONFLICT, put.clone(), t, orders, shrink)
        .await;
    c.want(ok, get.clone(), "/v1/topics", &[], None).await;
    c.want(ok, get.clone(), t, orders, None).await;
    c.want(StatusCode::NOT_FOUND, get.clone(), t, &["nope"], None)
        .await;

    // Publishes: one (twice with an idempotency key, then the key with other content), a
    // batch with a binary body, reads by queue, key and id.
    let m = "/v1/topics/{topic}/messages";
    let one = json!({"body": {"do": "say", "text": "hello"}, "key": "k1", "tag": "paid",
                     "properties": {"source": "web"}});
    let key = &[("idempotency-key", "i-1")][..];
    let first = c
        .call(post.clone(), m, orders, Some(one.clone()), key)
        .await;
    assert_eq!(first.0, created, "{}", first.1);
    let again = c.call(post.clone(), m, orders, Some(one), key).await;
    assert_eq!(again, (ok, first.1.clone()));
    let other = Some(json!({"body": {"other": true}}));
    let (st, _) = c.call(post.clone(), m, orders, other, key).await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
    let typo = Some(json!({"bdy": 1}));
    c.want(StatusCode::BAD_REQUEST, post.clone(), m, orders, typo)
        .await;
    let batch = json!({"messages": [
        {"body": {"do": "reject", "reason": "no"}, "sharding_key": "u1"},
        {"body_base64": "AAEC"},
    ]});
    let batch_route = "/v1/topics/{topic}/messages/batch";
    c.want(created, post.clone(), batch_route, orders, Some(batch))
        .await;
    let by_queue = "/v1/topics/{topic}/messages?queue=0&from=0&limit=10";
    let listed = c.want(ok, get.clone(), by_queue, orders, None).await;
    assert!(
        !listed["messages"].as_array().unwrap().is_empty(),
        "{listed}"
    );
    let by_key = "/v1/topics/{topic}/messages?key=k1";
    let found = c.want(ok, get.clone(), by_key, orders, None).await;
    assert_eq!(found["messages"].as_array().unwrap().len(), 1, "{found}");
    let id = first.1["id"].as_str().unwrap().to_string();
    c.want(ok, get.clone(), "/v1/messages/{id}", &[&id], None)
        .await;
    c.want(ok, get.clone(), "/v1/messages/{id}/trace", &[&id], None)
        .await;

    // Transactions: one committed, one rolled back (which then refuses a recheck), one on a
    // topic without a checker: its one check cannot decide, so it ends unresolved and takes
    // a recheck.
    let begin = "/v1/topics/{topic}/transactions";
    let timings =
        json!({"transactions": {"check_after_ms": 1, "check_interval_ms": 1, "max_checks": 1}});
    c.want(created, put.clone(), t, &["halfs"], Some(timings))
        .await;
    let mut txns = Vec::new();
    for topic in ["orders", "orders", "halfs"] {
        let half = Some(json!({"body": {"do": "ack"}, "check_after_ms": 60000}));
        let half = if topic == "halfs" {
            Some(json!({"body": {}}))
        } else {
            half
        };
        let v = c.want(created, post.clone(), begin, &[topic], half).await;
        txns.push(v["txn_id"].as_str().unwrap().to_string());
    }
    let list = "/v1/transactions?state=pending&limit=10";
    c.want(ok, get.clone(), list, &[], None).await;
    let tx = "/v1/transactions/{id}";
    c.want(ok, get.clone(), tx, &[&txns[0]], None).await;
    let decide = [
        (ok, "/v1/transactions/{id}/commit", &txns[0]),
        (ok, "/v1/transactions/{id}/rollback", &txns[1]),
        (
            StatusCode::CONFLICT,
            "/v1/transactions/{id}/recheck",
            &txns[1],
        ),
    ];
    for (status, route, id) in decide {
        c.want(status, post.clone(), route, &[id.as_str()], None)
            .await;
    }
    let unresolved = format!("/v1/transactions/{}", txns[2]);
    c.s.wait_until(&unresolved, 30, |v| v["state"] == "unresolved")
        .await;
    let recheck = "/v1/transactions/{id}/recheck";
    c.want(ok, post.clone(), recheck, &[&txns[2]], None).await;

    // Plugins: upload (again: same bytes, 200), list, show, invoke (an answer and a trap).
    let pl = "/v1/plugins/{name}";
    for (name, path, status) in [
        ("probe", wasmq_tests::plugins::PROBE, created),
        ("probe", wasmq_tests::plugins::PROBE, ok),
        ("trap", wasmq_tests::plugins::TRAP, created),
    ] {
        let resp =
            c.s.client
                .put(format!("{}/v1/plugins/{name}?timeout_ms=2000", c.s.url))
                .header("content-type", "application/wasm")
                .body(std::fs::read(path).unwrap())
                .send()
                .await
                .unwrap();
        let (st, v) = c.check(put.clone(), pl, resp).await;
        assert_eq!(st, status, "{v}");
    }
    let (st, _) = c
        .call(
            put.clone(),
            pl,
            &["junk"],
            Some(json!({"not": "wasm"})),
            &[],
        )
        .await;
    assert!(st.is_client_error(), "{st}");
    c.want(ok, get.clone(), "/v1/plugins", &[], None).await;
    c.want(ok, get.clone(), pl, &["probe"], None).await;
    let inv = "/v1/plugins/{name}/invoke";
    let retry = json!({"message": {"body": {"do": "retry", "after_ms": 5}}});
    let v = c.want(ok, post.clone(), inv, &["probe"], Some(retry)).await;
    assert_eq!(v["outcome"], json!({"type": "retry", "after_ms": 5}), "{v}");
    let any = json!({"message": {"body": {}}});
    let v = c.want(ok, post.clone(), inv, &["trap"], Some(any)).await;
    assert!(v["failure"]["kind"].is_string(), "{v}");

    // Subscriptions: clustering and broadcast, both dead-lettering the rejected message.
    let sub = "/v1/subscriptions/{group}";
    for (group, mode) in [("g1", "clustering"), ("g2", "broadcast")] {
        let spec = json!({"topic": "orders", "plugin": "probe", "mode": mode, "instances": 2,
                          "start": "earliest", "retry": {"max_attempts": 1}});
        c.want(created, put.clone(), sub, &[group], Some(spec))
            .await;
    }
    for group in ["g1", "g2"] {
        c.s.wait_until(&format!("/v1/subscriptions/{group}"), 60, |v| {
            v["lag"] == 0 && v["dlq"].as_u64() >= Some(1)
        })
        .await;
        c.want(ok, get.clone(), sub, &[group], None).await;
        let page = "/v1/subscriptions/{group}/dlq?limit=1";
        let page = c.want(ok, get.clone(), page, &[group], None).await;
        assert_eq!(page["entries"].as_array().unwrap().len(), 1, "{page}");
        for (route, body) in [
            ("/v1/subscriptions/{group}/pause", None),
            ("/v1/subscriptions/{group}/resume", None),
            (
                "/v1/subscriptions/{group}/reset",
                Some(json!({"to": "latest"})),
            ),
            ("/v1/subscriptions/{group}/dlq/redrive", Some(json!({}))),
        ] {
            c.want(ok, post.clone(), route, &[group], body).await;
        }
    }
    c.want(ok, get.clone(), "/v1/subscriptions", &[], None)
        .await;
    let logs = "/v1/plugins/{name}/logs?limit=10";
    let logs = c.want(ok, get.clone(), logs, &["probe"], None).await;
    assert!(!logs["lines"].as_array().unwrap().is_empty(), "{logs}");
    c.want(ok, get.clone(), "/v1/cluster", &[], None).await;

    // Deletes, and what they refuse first.
    let conflict = StatusCode::CONFLICT;
    c.want(conflict, delete.clone(), pl, &["probe"], None).await;
    c.want(conflict, delete.clone(), t, orders, None).await;
    c.want(ok, delete.clone(), sub, &["g1"], None).await;
    c.want(ok, delete.clone(), pl, &["trap"], None).await;
    let force = "/v1/topics/{topic}?force=true";
    let v = c.want(ok, delete.clone(), force, orders, None).await;
    assert_eq!(v["subscriptions"], json!(["g2"]), "{v}");

    // The validator bites: a topic view without its required fields breaks the schema.
    let topic_view = c.doc["components"]["schemas"]["TopicView"].clone();
    assert!(!jsonschema::draft202012::is_valid(
        &topic_view,
        &json!({"name": "x"})
    ));

    // Every documented operation answered with success at least once.
    let mut all = std::collections::BTreeSet::new();
    for (path, item) in c.doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if path != "/metrics" {
                all.insert(format!("{} {path}", method.to_ascii_uppercase()));
            }
        }
    }
    let missed: Vec<_> = all.difference(&c.succeeded).collect();
    assert!(missed.is_empty(), "never answered with success: {missed:?}");
}

/// With tokens, a read-only token sees plugin config and grants as `"[redacted]"`: the
/// document with tokens says so, and an admin's full answer (an HTTP grant on a five-digit
/// port) matches it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redacted_and_full_answers_match_the_document_with_tokens() {
    use serde_json::json;
    use wasmq::config::TokenConfig;
    const ADMIN: &str = "admin-token-123";
    const READER: &str = "reader-token-456";
    let dir = tempfile::tempdir().unwrap();
    let mut config = wasmq_tests::config_in(dir.path());
    let token = |t: &str, scope: &str| TokenConfig {
        token: t.into(),
        scopes: vec![scope.into()],
        topics: Vec::new(),
    };
    config.auth.tokens = vec![token(ADMIN, "admin"), token(READER, "read")];
    let s = TestServer::start_with(config).await;
    let admin = |r: reqwest::RequestBuilder| r.bearer_auth(ADMIN).send();
    for (name, path) in [
        ("probe", wasmq_tests::plugins::PROBE),
        ("checker", wasmq_tests::plugins::CHECKER),
    ] {
        let r = admin(
            s.client
                .put(format!("{}/v1/plugins/{name}", s.url))
                .header("content-type", "application/wasm")
                .body(std::fs::read(path).unwrap()),
        )
        .await
        .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    let r = admin(s.client.put(format!("{}/v1/topics/t", s.url)).json(
        &json!({"transaction_checker": "checker", "transaction_checker_config": {"k": 1},
                "transaction_checker_grants": {"http": ["http://127.0.0.1:18081"]}}),
    ))
    .await
    .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "{}",
        r.text().await.unwrap()
    );
    let spec = json!({"topic": "t", "plugin": "probe", "config": {"api_key": "x"},
                      "grants": {"http": ["127.0.0.1:18081", "https://api.example.com"]}});
    let r = admin(
        s.client
            .put(format!("{}/v1/subscriptions/g", s.url))
            .json(&spec),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let doc: Value = admin(s.client.get(format!("{}/v1/openapi.json", s.url)))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut c = Checker {
        s,
        doc,
        succeeded: Default::default(),
        token: Some(READER),
    };
    let get = Method::GET;
    let (ok, sub) = (StatusCode::OK, "/v1/subscriptions/{group}");
    let v = c.want(ok, get.clone(), sub, &["g"], None).await;
    assert_eq!(v["spec"]["config"], "[redacted]", "{v}");
    c.want(ok, get.clone(), "/v1/subscriptions", &[], None)
        .await;
    let v = c
        .want(ok, get.clone(), "/v1/topics/{topic}", &["t"], None)
        .await;
    assert_eq!(v["transaction_checker_grants"], "[redacted]", "{v}");
    c.want(ok, get.clone(), "/v1/topics", &[], None).await;
    c.token = Some(ADMIN);
    let v = c.want(ok, get.clone(), sub, &["g"], None).await;
    assert_eq!(v["spec"]["grants"]["http"][0], "127.0.0.1:18081", "{v}");
    c.want(ok, get, "/v1/topics/{topic}", &["t"], None).await;
}
