//! Python and JavaScript plugins under the same contract as Rust ones: the same CPU and memory
//! limits stop them while the host keeps serving, and capabilities need the same grants.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use reqwest::StatusCode;
use serde_json::{Value, json};
use wasmq_tests::peers::HttpPeer;
use wasmq_tests::plugins::RECORDER;
use wasmq_tests::{TestServer, config_in, polyglot_plugin};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_javascript_plugins_that_spin_or_hog_are_stopped_and_the_host_serves_on() {
    let (py, js) = (
        polyglot_plugin("hostile-py").await,
        polyglot_plugin("hostile-js").await,
    );
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_in(dir.path());
    config.plugins.timeout_ms = 300;
    let s = TestServer::start_with(config).await;
    for (name, path) in [
        ("hostile-py", py.to_str().unwrap()),
        ("hostile-js", js.to_str().unwrap()),
        ("recorder", RECORDER),
    ] {
        let (st, v) = s.upload_plugin(name, path).await;
        assert_eq!(st, StatusCode::CREATED, "{name}: {v}");
    }
    for t in ["healthy", "audit", "hostile-py", "hostile-js"] {
        s.create_topic(t, 2).await;
    }
    // The hostile subscriptions get 2 s per call (the healthy one keeps the server's 300 ms):
    // a hog must reach its memory cap before any deadline even when the CPU is contended
    // (CI runs tests side by side on 2 cores; at 300 ms a contended hog sometimes met the
    // wall-clock deadline first), and a spin still meets a deadline.
    for lang in ["py", "js"] {
        s.subscribe(
            &format!("hostile-{lang}"),
            json!({"topic": format!("hostile-{lang}"), "plugin": format!("hostile-{lang}"),
                   "instances": 2, "retry": {"max_attempts": 3, "backoff_ms": [10]},
                   "limits": {"timeout_ms": 2000}}),
        )
        .await;
    }
    s.subscribe(
        "healthy",
        json!({"topic": "healthy", "plugin": "recorder",
               "config": {"audit": "audit"}, "grants": {"publish": ["audit"]}}),
    )
    .await;
    let bodies = [
        json!({"do": "spin"}),
        json!({"do": "hog"}),
        json!({"do": "spin"}),
        json!({"do": "hog"}),
        json!({"do": "nothing"}),
        json!({"do": "nothing"}),
    ];
    for lang in ["py", "js"] {
        let messages: Vec<Value> = bodies.iter().map(|b| json!({"body": b})).collect();
        let (st, v) = s
            .post_json(
                &format!("/v1/topics/hostile-{lang}/messages/batch"),
                &json!({"messages": messages}),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
    }
    // Meanwhile a healthy subscription keeps handling messages (checked below, once the
    // hostile work is done).
    let max = *s
        .trickle_latencies("healthy", "audit", 40)
        .await
        .last()
        .unwrap();
    println!("healthy publish→handle beside hostile Python/JS plugins: max {max} ms");
    let healthy_done = s.last_handled_at("audit").await;

    for lang in ["py", "js"] {
        let group = format!("hostile-{lang}");
        let st = s
            .wait_until(&format!("/v1/subscriptions/{group}"), 60, |v| {
                v["counters"]["dead_lettered"] == 4 && v["counters"]["acked"] == 2
            })
            .await;
        println!("{group}: {}", st["counters"]);
        let (_, dlq) = s.get(&format!("/v1/subscriptions/{group}/dlq")).await;
        let reasons: Vec<&str> = dlq["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["reason"].as_str().unwrap())
            .collect();
        // Two spins ran past the CPU deadline, two hogs past the memory cap.
        let count = |what: &str| reasons.iter().filter(|r| r.contains(what)).count();
        assert_eq!(
            (count("deadline"), count("memory limit")),
            (2, 2),
            "{group}: {reasons:#?}"
        );
    }
    // All 40 healthy messages were handled before the last spin ran out its attempts (both
    // times from the server's clock): the trickle takes 1 s plus 40 small calls, each spin at
    // least 6 s (its 2 s CPU budget on each of 3 attempts, one after the other) however fast
    // the machine, and a host held up by hostile plugins serves the healthy one only after
    // them. Events are ordered, nothing is timed (the isolation benchmark measures latencies).
    let spins_done = s
        .last_dead_at("hostile-py", "deadline")
        .await
        .max(s.last_dead_at("hostile-js", "deadline").await);
    assert!(
        healthy_done < spins_done,
        "the healthy subscription was served only after the spins were done ({healthy_done} ≥ {spins_done})"
    );
    let (st, _) = s.get("/healthz").await;
    assert_eq!(st, StatusCode::OK);
}

/// `log-utf8` takes any bytes from a guest: a line of 1 MiB that is not UTF-8 and holds a line
/// break and a terminal escape is stored decoded lossily (U+FFFD), escaped and cut at 4 KiB,
/// like a `log` string.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_line_of_raw_bytes_is_decoded_lossily_escaped_and_cut() {
    let js = polyglot_plugin("hostile-js").await;
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    s.upload_plugin("hostile-js", js.to_str().unwrap()).await;
    let (st, v) = s
        .post_json(
            "/v1/plugins/hostile-js/invoke",
            &json!({"message": {"body": {"do": "raw-log"}}}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["outcome"]["type"], "ack", "{v}");
    let (_, logs) = s.get("/v1/plugins/hostile-js/logs").await;
    let lines = logs["lines"].as_array().unwrap();
    assert_eq!(lines.len(), 1, "{logs}");
    assert_eq!(lines[0]["level"], "warn");
    let line = lines[0]["message"].as_str().unwrap();
    assert!(
        line.starts_with("\u{fffd}\u{fffd}\\n\\u{1b}[2J\u{fffd}aaa"),
        "{:?}",
        line.chars().take(20).collect::<String>()
    );
    assert!(line.ends_with("a…"), "{} bytes", line.len());
    assert!(line.len() <= 4096 + "…".len(), "{}", line.len());
    assert!(!line.contains(['\n', '\u{1b}']));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_javascript_capabilities_need_the_same_grants() {
    let py = polyglot_plugin("email-notifier-py").await;
    let js = polyglot_plugin("cache-sync-js").await;
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    s.upload_plugin("email-py", py.to_str().unwrap()).await;
    s.upload_plugin("cache-js", js.to_str().unwrap()).await;
    s.create_topic("report", 1).await;
    // Invoked outside a subscription, nothing is granted: the host says no, the plugin maps it.
    let (st, v) = s
        .post_json(
            "/v1/plugins/email-py/invoke",
            &json!({"message": {"body": {"email": "a@example.com", "name": "A"}},
                    "config": {"to": "{{email}}", "subject": "s", "text": "t"}}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["outcome"]["type"], "reject", "{v}");
    assert!(
        v["outcome"]["reason"]
            .as_str()
            .unwrap()
            .starts_with("denied:"),
        "{v}"
    );
    let (st, v) = s
        .post_json(
            "/v1/plugins/cache-js/invoke",
            &json!({"message": {"body": {"snapshot": true}}, "config": {"report": "report"}}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(
        v["outcome"]["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("denied:")),
        "{v}"
    );
    assert!(s.read_queue("report", 0).await.is_empty());
}

/// The fenced code blocks of README.md's "Write a plugin" section, by info string.
fn readme_plugins() -> Vec<(String, String)> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let section = readme.split("## Write a plugin").nth(1).unwrap();
    let section = section.split("\n## ").next().unwrap();
    let mut blocks = Vec::new();
    let mut parts = section.split("```");
    parts.next();
    while let (Some(block), _) = (parts.next(), parts.next()) {
        if let Some((info, code)) = block.split_once('\n')
            && ["rust", "python", "js"].contains(&info)
        {
            blocks.push((info.to_string(), code.to_string()));
        }
    }
    blocks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_plugin_behaves_the_same_in_rust_python_and_javascript() {
    let blocks = readme_plugins();
    assert_eq!(
        blocks.iter().map(|(l, _)| l.as_str()).collect::<Vec<_>>(),
        ["rust", "python", "js"]
    );
    let work = tempfile::tempdir().unwrap();
    let shared = std::path::Path::new(wasmq_tests::plugins::TARGET_DIR);
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    for (lang, code) in blocks {
        let root =
            wasmq::cli::scaffold::new_plugin("signups", &work.path().join(&lang), &lang).unwrap();
        let main = match lang.as_str() {
            "rust" => "src/lib.rs",
            "python" => "app.py",
            _ => "app.js",
        };
        std::fs::write(root.join(main), code).unwrap();
        let target = match lang.as_str() {
            "rust" => shared.to_path_buf(),
            _ => shared.join(format!("readme-{lang}")),
        };
        let wasm = tokio::task::spawn_blocking(move || {
            wasmq::cli::scaffold::build_plugin_in(&root, Some(&target))
        })
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{lang}: {e:#}"));
        let name = format!("signups-{lang}");
        let (st, v) = s.upload_plugin(&name, wasm.to_str().unwrap()).await;
        assert_eq!(st, StatusCode::CREATED, "{lang}: {v}");
        let invoke = |body: Value| {
            let (s, name) = (&s, &name);
            async move {
                let (st, v) = s
                    .post_json(
                        &format!("/v1/plugins/{name}/invoke"),
                        &json!({"message": body}),
                    )
                    .await;
                assert_eq!(st, StatusCode::OK, "{v}");
                v["outcome"].clone()
            }
        };
        // The third address has 2-, 3- and 4-byte UTF-8 characters (a surrogate pair in JS):
        // the JavaScript SDK hands log lines to the host as bytes (`log-utf8`), Rust and Python
        // as a string (`log`).
        for email in ["ann@example.com", "ann@example.com", "zoë@例え.jp 🚀"] {
            let out = invoke(json!({"body": {"email": email}})).await;
            assert_eq!(out["type"], "ack", "{lang}: {out}");
        }
        for bad in [
            json!({"body": {"name": "no email"}}),
            json!({"body_base64": "AAEC"}),
        ] {
            let out = invoke(bad).await;
            assert_eq!(
                (out["type"].as_str(), out["reason"].as_str()),
                (Some("reject"), Some("not a signup")),
                "{lang}"
            );
        }
        // kv kept the count between calls (and instances): the second sign-up was #2.
        let (_, logs) = s.get(&format!("/v1/plugins/{name}/logs")).await;
        let lines: Vec<&str> = logs["lines"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["message"].as_str().unwrap())
            .collect();
        assert_eq!(
            lines,
            [
                "signup ann@example.com (#1)",
                "signup ann@example.com (#2)",
                "signup zoë@例え.jp 🚀 (#3)"
            ],
            "{lang}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_javascript_checkers_decide_transactions_by_check_back() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    for (name, exports) in [
        ("body-checker-py", json!(["wasmq:plugin/checker@0.1.0"])),
        (
            "body-checker-js",
            json!(["wasmq:plugin/consumer@0.1.0", "wasmq:plugin/checker@0.1.0"]),
        ),
    ] {
        let wasm = polyglot_plugin(name).await;
        let (st, v) = s.upload_plugin(name, wasm.to_str().unwrap()).await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        assert_eq!(v["exports"], exports, "{v}");
        let topic = json!({"queues": 1, "transaction_checker": name,
            "transactions": {"check_after_ms": 100, "check_interval_ms": 100, "max_checks": 2}});
        let (st, v) = s.put_json(&format!("/v1/topics/{name}"), &topic).await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        let mut ids = Vec::new();
        for body in ["commit", "rollback", "maybe"] {
            let (st, v) = s
                .post_json(
                    &format!("/v1/topics/{name}/transactions"),
                    &json!({"body": body}),
                )
                .await;
            assert_eq!(st, StatusCode::CREATED, "{v}");
            ids.push(v["txn_id"].as_str().unwrap().to_string());
        }
        for (id, state) in ids.iter().zip(["committed", "rolled_back", "unresolved"]) {
            let v = s
                .wait_until(&format!("/v1/transactions/{id}"), 20, |v| {
                    v["state"] == state
                })
                .await;
            if state == "unresolved" {
                assert_eq!(v["checks"], 2, "{name}: {v}");
            }
        }
        // Only the committed one became visible.
        let visible = s.read_queue(name, 0).await;
        assert_eq!(visible.len(), 1, "{name}: {visible:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_javascript_plugins_send_sms_call_http_and_publish_as_granted() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = HttpPeer::start().await;
    let mut config = config_in(dir.path());
    config.sms.url = format!("{}/sms", gateway.url);
    config.sms.auth_header = "Bearer gateway-secret".into();
    let s = TestServer::start_with(config).await;
    s.create_topic("relay-out", 1).await;
    for lang in ["py", "js"] {
        let name = format!("relay-{lang}");
        let wasm = polyglot_plugin(&name).await;
        let (st, v) = s.upload_plugin(&name, wasm.to_str().unwrap()).await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        s.create_topic(&name, 1).await;
        s.subscribe(
            &name,
            json!({"topic": name, "plugin": name, "config": {"out": "relay-out"},
                   "grants": {"sms": true, "http": [gateway.url], "publish": ["relay-out"]}}),
        )
        .await;
        for url in [
            format!("{}/hook-{lang}", gateway.url),
            // Not the granted origin: the http call is denied and the message dead-lettered.
            "http://127.0.0.1:9/elsewhere".to_string(),
        ] {
            let body = json!({"to": "+15550100", "text": format!("hi from {lang}"), "url": url});
            let (st, v) = s
                .post_json(
                    &format!("/v1/topics/{name}/messages"),
                    &json!({"body": body}),
                )
                .await;
            assert_eq!(st, StatusCode::CREATED, "{v}");
        }
        s.wait_until(&format!("/v1/subscriptions/{name}"), 30, |v| {
            v["counters"]["acked"] == 1 && v["counters"]["dead_lettered"] == 1
        })
        .await;
        let dlq = s
            .wait_until(&format!("/v1/subscriptions/{name}/dlq"), 30, |v| {
                v["entries"].as_array().is_some_and(|e| e.len() == 1)
            })
            .await;
        let reason = dlq["entries"][0]["reason"].as_str().unwrap();
        assert!(reason.contains("denied: "), "{lang}: {reason}");
    }
    assert_eq!(
        s.read_queue("relay-out", 0).await,
        [
            json!({"status": 200, "body": "hello", "group": "relay-py", "lang": "python"}),
            json!({"status": 200, "body": "hello", "group": "relay-js", "lang": "js"}),
        ]
    );
    let mut seen: Vec<(String, Option<String>, String)> = gateway.requests();
    seen.sort();
    let sms = |lang: &str| {
        (
            "/sms".to_string(),
            Some("Bearer gateway-secret".to_string()),
            json!({"to": "+15550100", "text": format!("hi from {lang}")}).to_string(),
        )
    };
    let hook = |lang: &str| (format!("/hook-{lang}"), None, format!("hi from {lang}"));
    // Each message sent its SMS (the denied one too: the SMS came first), each granted one its POST.
    let mut expected = vec![
        hook("js"),
        hook("py"),
        sms("js"),
        sms("js"),
        sms("py"),
        sms("py"),
    ];
    expected.sort();
    assert_eq!(seen, expected);
}
