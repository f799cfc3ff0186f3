//! The NATS JetStream storage backend against real nats-server processes: the storage
//! conformance suite that RocksDB passes too, and a whole server running on it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use reqwest::StatusCode;
use serde_json::json;
use wasmq::config::Backend;
use wasmq::storage::{JetStreamStorage, Storage, conformance};
use wasmq_tests::plugins::RECORDER;
use wasmq_tests::{NatsCluster, NatsServer, TestServer, config_in, queue_owners};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_backend_passes_the_conformance_suite() {
    let nats = NatsServer::start().await;
    let url = nats.url.clone();
    let open = move || {
        let url = url.clone();
        Box::pin(async move {
            Arc::new(JetStreamStorage::connect(&[url], 1).await.unwrap()) as Arc<dyn Storage>
        }) as std::pin::Pin<Box<dyn std::future::Future<Output = Arc<dyn Storage>> + Send>>
    };
    conformance::run_all(&open).await;
}

/// A storage on `nats` with topic `t` (1 queue) prepared.
async fn writer_of_t(nats: &NatsServer) -> JetStreamStorage {
    let writer = JetStreamStorage::connect(std::slice::from_ref(&nats.url), 1)
        .await
        .unwrap();
    writer
        .prepare_topic("t", 1, Default::default())
        .await
        .unwrap();
    writer
}

/// The guard of a transaction `key`'s commit: its record, written committed if absent.
fn committed_guard(key: &str) -> wasmq::storage::RecordWrite {
    wasmq::storage::RecordWrite {
        space: "txn".into(),
        key: key.into(),
        value: Some(b"committed".to_vec()),
        expect: wasmq::storage::Expect::Absent,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guarded_append_cut_short_by_a_dead_writer_is_finished_by_recovery() {
    use wasmq::storage::jetstream::INTENT_AGE;
    let nats = NatsServer::start().await;
    let writer = writer_of_t(&nats).await;
    let m = conformance::msg(0, Some("order-1"), "committed body");
    let guard = committed_guard("tx1");
    // The writer wrote its intent and the guard (the commit), then died.
    writer
        .guarded_append_dying_halfway("t", vec![m.clone()], guard)
        .await
        .unwrap();
    let other = JetStreamStorage::connect(std::slice::from_ref(&nats.url), 1)
        .await
        .unwrap();
    // Young: it may be a live writer's, so recovery leaves it.
    assert_eq!(other.recover(INTENT_AGE).await.unwrap(), 0);
    assert!(other.read("t", 0, 0, 10).await.unwrap().is_empty());
    // Old enough: the messages appear, once, beside the guard that promised them.
    assert_eq!(other.recover(std::time::Duration::ZERO).await.unwrap(), 1);
    assert_eq!(other.recover(std::time::Duration::ZERO).await.unwrap(), 0);
    let read = other.read("t", 0, 0, 10).await.unwrap();
    assert_eq!(
        read.iter().map(|r| r.message.id).collect::<Vec<_>>(),
        vec![m.id]
    );
    assert_eq!(
        other.get_record("txn", "tx1").await.unwrap().unwrap().value,
        b"committed"
    );
    assert!(other.message_by_id(m.id).await.unwrap().is_some());
}

/// A guarded append (a transaction's commit, an idempotent publish) whose guard record was
/// stored but whose answer was lost: the server that took it died before answering. The
/// writer used to delete its intent on any error of the guard write, so nothing named the
/// append any more: the retry found the transaction committed, and its message was never
/// stored. Only a conflict (nothing written) takes the intent now; recovery finishes this one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guarded_append_whose_guard_answer_was_lost_is_finished_by_recovery() {
    let nats = NatsServer::start().await;
    let writer = writer_of_t(&nats).await;
    let m = conformance::msg(0, Some("order-2"), "committed body");
    let lost = writer
        .guarded_append_answer_lost("t", vec![m.clone()], committed_guard("tx2"))
        .await;
    assert!(
        matches!(lost, Err(wasmq::storage::StorageError::Unavailable(_))),
        "{lost:?}"
    );
    // A conflict wrote nothing, and leaves nothing for recovery.
    let refused = writer
        .guarded_append_answer_lost(
            "t",
            vec![conformance::msg(1, None, "x")],
            committed_guard("tx2"),
        )
        .await;
    assert!(
        matches!(refused, Err(wasmq::storage::StorageError::Conflict { .. })),
        "{refused:?}"
    );
    let other = JetStreamStorage::connect(std::slice::from_ref(&nats.url), 1)
        .await
        .unwrap();
    assert_eq!(
        other.recover(std::time::Duration::ZERO).await.unwrap(),
        1,
        "the promised append is still named"
    );
    let read = other.read("t", 0, 0, 10).await.unwrap();
    assert_eq!(
        read.iter().map(|r| r.message.id).collect::<Vec<_>>(),
        vec![m.id]
    );
    assert_eq!(other.recover(std::time::Duration::ZERO).await.unwrap(), 0);
}

/// Recovery finishes a dead writer's commit from its intent, which may be stale: the writer
/// may have finished it since, and a later commit may have written the same kv keys. An
/// unconditional kv write used to be replayed over whatever the key held, so a later commit's
/// value was replaced by the older one (queue takeover finishes commits from a listing, so a
/// live writer's finished commit could be replayed this way). Now such a write lands only
/// over what the key held at the commit point: a key written before it gets the commit's
/// value, a key written or deleted after it keeps the later value or stays deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_does_not_replay_a_kv_write_over_a_later_commits_value() {
    use wasmq::storage::{Commit, Expect, RecordWrite};
    let nats = NatsServer::start().await;
    let connect = || JetStreamStorage::connect(std::slice::from_ref(&nats.url), 1);
    let put = |key: &str, value: &[u8]| RecordWrite {
        space: "kv/s".into(),
        key: key.into(),
        value: Some(value.to_vec()),
        expect: Expect::Any,
    };
    let other = connect().await.unwrap();
    for key in ["before", "gone"] {
        other
            .put_record("kv/s", key, Some(b"older".to_vec()), Expect::Any)
            .await
            .unwrap();
    }
    let writer = connect().await.unwrap();
    let commit = Commit {
        checks: Vec::new(),
        records: vec![
            RecordWrite {
                space: "done/g".into(),
                key: "q0/5".into(),
                value: Some(b"done".to_vec()),
                expect: Expect::Absent,
            },
            put("before", b"dead writer"),
            put("after", b"dead writer"),
            put("untouched", b"dead writer"),
            put("gone", b"dead writer"),
        ],
        appends: Vec::new(),
    };
    writer.commit_dying_halfway(commit).await.unwrap();
    // Later commits write one of its keys and delete another after the commit point.
    other
        .put_record("kv/s", "after", Some(b"later".to_vec()), Expect::Any)
        .await
        .unwrap();
    other
        .put_record("kv/s", "gone", None, Expect::Any)
        .await
        .unwrap();
    assert_eq!(other.finish_commits_of("done/g", "q0/").await.unwrap(), 1);
    let value = |key: &'static str| {
        let other = &other;
        async move {
            let r = other.get_record("kv/s", key).await.unwrap().unwrap();
            String::from_utf8(r.value).unwrap()
        }
    };
    assert_eq!(
        (
            value("before").await,
            value("after").await,
            value("untouched").await
        ),
        (
            "dead writer".to_string(),
            "later".to_string(),
            "dead writer".to_string()
        )
    );
    assert!(
        other.get_record("kv/s", "gone").await.unwrap().is_none(),
        "a key deleted after the commit point stays deleted"
    );
    // Finishing it again (a second listing) changes nothing.
    assert_eq!(other.finish_commits_of("done/g", "q0/").await.unwrap(), 0);
    assert_eq!(value("after").await, "later");
}

/// A dead-letter step whose writer died right after its commit point is finished by recovery
/// even after other steps moved the count. The count used to be the commit point: recovery
/// compared it with what the dead writer meant to store, found a later step's value, took the
/// step for never committed and dropped its entry, which the count had counted: a lost dead
/// letter. Now the entry is the commit point: its key is the step's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_step_cut_short_by_a_dead_writer_is_finished_after_later_steps() {
    use wasmq::dispatch::dlq;
    use wasmq::dispatch::state::{DeadLetter, dlq_space};
    use wasmq::storage::Expect;
    let nats = NatsServer::start().await;
    let connect = || JetStreamStorage::connect(std::slice::from_ref(&nats.url), 1);
    let dead = |i: u64| DeadLetter {
        message_id: format!("m{i}"),
        member: "all".into(),
        queue: 0,
        offset: i,
        attempts: 1,
        reason: "rejected".into(),
        dead_at: 1_000 + i,
    };
    let one = |i: u64| dlq::Change {
        add: vec![dead(i)],
        remove: Vec::new(),
    };
    let writer = connect().await.unwrap();
    dlq::apply(&writer, "g", one(1)).await.unwrap();
    // The second step's writer wrote its intent and commit point, then died.
    let count = writer
        .get_record(&dlq::count_space("g"), dlq::COUNT_KEY)
        .await
        .unwrap();
    let cut = dlq::step("g", 1, Expect::Revision(count.unwrap().revision), &one(2)).unwrap();
    writer.commit_dying_halfway(cut).await.unwrap();
    let other = connect().await.unwrap();
    dlq::apply(&other, "g", one(3)).await.unwrap();
    assert_eq!(other.recover(std::time::Duration::ZERO).await.unwrap(), 1);
    let entries = other.list_records(&dlq_space("g"), "", 10).await.unwrap();
    assert_eq!(
        entries.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
        [1, 2, 3].map(|i| dead(i).key()),
        "every dead letter whose step got past its commit point is kept"
    );
}

/// A transaction's commit whose writer died between its commit point (the transaction's
/// record, now committed) and the append of its half message. The server's decided-transactions
/// mover finds the committed record within a second or two and moves it out of the undecided
/// space, long before recovery looks at writes that old ([`INTENT_AGE`]). It used to move it
/// as it was: recovery then found no record to compare with, dropped the commit, and the
/// committed message was never appended. Now the mover leaves a transaction whose commit is
/// unfinished until recovery finished it (its message appended).
///
/// [`INTENT_AGE`]: wasmq::storage::jetstream::INTENT_AGE
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_transaction_cut_short_by_a_dead_writer_keeps_its_message_when_it_moves() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_in(dir.path());
    config.storage.backend = Backend::Jetstream;
    config.storage.urls = vec![nats.url.clone()];
    config.storage.replicas = 1;
    let s = TestServer::start_with(config).await;
    s.create_topic("orders", 1).await;
    let (st, txn) = s
        .post_json(
            "/v1/topics/orders/transactions",
            &json!({"body": {"order": 7}}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{txn}");
    let id = txn["txn_id"].as_str().unwrap().to_string();
    // Another writer commits it and dies right after the commit point.
    let writer = JetStreamStorage::connect(std::slice::from_ref(&nats.url), 1)
        .await
        .unwrap();
    let (topic, message, guard) = wasmq::txn::commit_writes(&writer, &id, "dying writer")
        .await
        .unwrap()
        .expect("the transaction is undecided");
    let message_id = message.id;
    writer
        .guarded_append_dying_halfway(&topic, vec![message], guard)
        .await
        .unwrap();
    // The mover takes it out of the undecided space...
    let waited = std::time::Instant::now();
    while writer.get_record("txn", &id).await.unwrap().is_some() {
        if waited.elapsed() > std::time::Duration::from_secs(60) {
            let (_, v) = s.get(&format!("/v1/transactions/{id}")).await;
            panic!("the committed transaction never moved: {v}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        writer
            .get_record("txn-committed", &id)
            .await
            .unwrap()
            .is_some(),
        "moved to the committed space"
    );
    // ...only once its message is there, once.
    let stored = writer.message_by_id(message_id).await.unwrap();
    assert!(stored.is_some(), "the committed message was lost");
    let read = writer.read("orders", 0, 0, 10).await.unwrap();
    assert_eq!(
        read.iter().map(|r| r.message.id).collect::<Vec<_>>(),
        vec![message_id]
    );
    let (st, v) = s.get(&format!("/v1/transactions/{id}")).await;
    assert_eq!(
        (st, v["state"].as_str()),
        (StatusCode::OK, Some("committed")),
        "{v}"
    );
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_on_jetstream_publishes_dispatches_decides_delays_and_restarts() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = || {
        let mut c = config_in(dir.path());
        c.storage.backend = Backend::Jetstream;
        c.storage.urls = vec![nats.url.clone()];
        c.storage.replicas = 1;
        c
    };
    let s = TestServer::start_with(config()).await;
    s.create_topic("jobs", 4).await;
    s.create_topic("audit", 1).await;
    let (st, v) = s.upload_plugin("recorder", RECORDER).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    s.subscribe(
        "work",
        json!({"topic": "jobs", "plugin": "recorder", "instances": 2,
               "config": {"audit": "audit"}, "grants": {"publish": ["audit"]}}),
    )
    .await;
    s.publish_numbered("jobs", 200).await;
    let (st, v) = s
        .post_json(
            "/v1/topics/jobs/messages",
            &json!({"body": {"delayed": true}, "delay_ms": 300, "key": "late"}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let late = v["id"].as_str().unwrap().to_string();
    let (st, txn) = s
        .post_json("/v1/topics/jobs/transactions", &json!({"body": {"txn": 1}}))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{txn}");
    let (st, v) = s
        .post_json(
            &format!(
                "/v1/transactions/{}/commit",
                txn["txn_id"].as_str().unwrap()
            ),
            &json!({}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let audit = s.wait_audit("audit", 202, 60).await;
    assert_eq!(audit.len(), 202);
    assert!(audit.iter().any(|a| a["body"]["delayed"] == true));
    assert!(audit.iter().any(|a| a["body"]["txn"] == 1));
    let (_, found) = s.get("/v1/topics/jobs/messages?key=late").await;
    assert_eq!(found["messages"].as_array().unwrap().len(), 1, "{found}");
    // Its attempt is on record (a trace page, a record on JetStream).
    let trace = s
        .wait_until(&format!("/v1/messages/{late}/trace"), 60, |t| {
            t["subscriptions"][0]["state"] == "acked"
        })
        .await;
    let attempts = trace["subscriptions"][0]["attempts"].as_array().unwrap();
    assert_eq!(
        (attempts.len(), &attempts[0]["fate"]),
        (1, &json!("done")),
        "{trace}"
    );
    s.stop().await.unwrap();

    // A new process on the same JetStream: everything is there, offsets go on, nothing repeats.
    let s = TestServer::start_with(config()).await;
    let (_, topic) = s.get("/v1/topics/jobs").await;
    assert_eq!(topic["messages"], 202, "{topic}");
    s.publish_numbered("jobs", 50).await;
    let audit = s.wait_audit("audit", 252, 60).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(
        s.read_queue("audit", 0).await.len(),
        252,
        "redelivered after restart"
    );
    assert_eq!(audit.len(), 252);
    s.stop().await.unwrap();
}

async fn cluster(s: &TestServer) -> serde_json::Value {
    s.get("/v1/cluster").await.1
}

/// A node named `id` on `nats` (R1) with its state in `dir`.
fn node_config(nats: &NatsServer, dir: &std::path::Path, id: &str) -> wasmq::config::Config {
    let mut c = config_in(dir);
    c.storage.backend = Backend::Jetstream;
    c.storage.urls = vec![nats.url.clone()];
    c.storage.replicas = 1;
    c.server.node_id = id.into();
    c
}

/// Two nodes named `node-a`, `node-b` on one nats-server, with `limits` applied to both.
async fn two_nodes(
    nats: &NatsServer,
    dirs: &[tempfile::TempDir; 2],
    limits: impl Fn(&mut wasmq::config::Config),
) -> (TestServer, TestServer) {
    let config = |i: usize, id: &str| {
        let mut c = node_config(nats, dirs[i].path(), id);
        limits(&mut c);
        c
    };
    (
        TestServer::start_with(config(0, "node-a")).await,
        TestServer::start_with(config(1, "node-b")).await,
    )
}

/// A server given a JetStream storage through `wasmq::run_on` with a config that names no
/// backend (RocksDB by default) still runs as a node of the shared storage: the storage says
/// it is shared, so two such nodes divide the queues under leases instead of each delivering
/// every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_over_a_given_shared_storage_runs_as_one_node_of_it() {
    let nats = NatsServer::start().await;
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let mut nodes = Vec::new();
    for (dir, id) in dirs.iter().zip(["node-a", "node-b"]) {
        let mut config = config_in(dir.path());
        config.server.node_id = id.into();
        let storage = JetStreamStorage::connect_as(std::slice::from_ref(&nats.url), 1, id)
            .await
            .unwrap();
        nodes.push(TestServer::start_on(config, Arc::new(storage)).await);
    }
    let (a, b) = (&nodes[0], &nodes[1]);
    b.create_topic("jobs", 8).await;
    b.create_topic("audit", 1).await;
    let (st, v) = b.upload_plugin("recorder", RECORDER).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    b.subscribe(
        "work",
        json!({"topic": "jobs", "plugin": "recorder",
               "config": {"audit": "audit"}, "grants": {"publish": ["audit"]}}),
    )
    .await;
    let view = a
        .wait_until("/v1/cluster", 20, |v| queue_owners(v, "work").len() == 8)
        .await;
    assert_eq!(view["backend"], "jetstream", "{view}");
    let owners: std::collections::BTreeSet<String> =
        queue_owners(&view, "work").into_values().collect();
    assert_eq!(owners.len(), 2, "both nodes hold queues: {view}");
    a.publish_numbered("jobs", 100).await;
    a.wait_audit("audit", 100, 30).await;
    let v = a
        .wait_until("/v1/subscriptions/work", 30, |v| {
            v["lag"] == 0 && v["in_flight"] == 0
        })
        .await;
    // Each message once, though two nodes run the subscription.
    assert_eq!(a.read_queue("audit", 0).await.len(), 100, "{v}");
    for n in nodes {
        n.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_one_jetstream_divide_the_queues_and_hand_them_over() {
    use wasmq::dispatch::share::{UnitKey, lease_key, preferred};
    let nats = NatsServer::start().await;
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let (a, b) = two_nodes(&nats, &dirs, |_| {}).await;
    // Everything set up through B.
    b.create_topic("jobs", 8).await;
    b.create_topic("audit", 1).await;
    let (st, v) = b.upload_plugin("recorder", RECORDER).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    b.subscribe(
        "work",
        json!({"topic": "jobs", "plugin": "recorder", "instances": 2,
               "config": {"audit": "audit"}, "grants": {"publish": ["audit"]}}),
    )
    .await;
    // Each queue is owned by the node that rendezvous hashing over the live nodes names.
    let nodes = ["node-a".to_string(), "node-b".to_string()];
    let expected: std::collections::BTreeMap<u64, String> = (0..8)
        .map(|q| {
            let key = lease_key("work", UnitKey::Queue(q));
            (u64::from(q), preferred(&key, &nodes).unwrap().clone())
        })
        .collect();
    let view = a
        .wait_until("/v1/cluster", 20, |v| queue_owners(v, "work") == expected)
        .await;
    a.publish_numbered("jobs", 100).await;
    b.publish_numbered("jobs", 100).await;
    a.wait_audit("audit", 200, 30).await;
    let (va, vb) = (cluster(&a).await, cluster(&b).await);
    assert_eq!(va["backend"], "jetstream");
    let held = |n: &str| expected.values().filter(|o| *o == n).count();
    // (These names split the queues, so every check below sees both nodes at work.)
    assert!(held("node-a") > 0 && held("node-b") > 0, "{expected:?}");
    assert_eq!(va["leases_held"], held("node-a"), "{va}");
    assert_eq!(vb["leases_held"], held("node-b"), "{vb}");
    assert_eq!(va["dispatching"], held("node-a") > 0);
    // One node runs the check-backs.
    let checks: Vec<&serde_json::Value> = view["leases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["lease"] == "transactions")
        .collect();
    assert!(
        checks.len() == 1 && nodes.iter().any(|n| checks[0]["owner"] == n.as_str()),
        "{view}"
    );
    // Each node sees both, every time, while both heartbeat.
    for _ in 0..4 {
        for s in [&a, &b] {
            let v = cluster(s).await;
            let up: Vec<bool> = v["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n["up"] == true)
                .collect();
            assert_eq!(up, [true, true], "{v}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    }
    // Both nodes answer alike: the counters are those of both nodes' runners (each node tells
    // the others every second), and the status names each queue's node.
    for s in [&a, &b] {
        let st = s
            .wait_until("/v1/subscriptions/work", 10, |v| {
                v["counters"]["acked"] == 200 && v["counters"]["delivered"] == 200
            })
            .await;
        assert_eq!(
            (st["lag"].clone(), st["in_flight"].clone()),
            (json!(0), json!(0)),
            "{st}"
        );
        for q in st["queues"].as_array().unwrap() {
            assert_eq!(
                q["node"].as_str(),
                Some(expected[&q["queue"].as_u64().unwrap()].as_str()),
                "{st}"
            );
        }
    }
    assert_eq!(b.get("/v1/topics/jobs").await.1["messages"], 200);
    assert_eq!(b.read_queue("audit", 0).await.len(), 200);
    // Scrapes tell the nodes apart. Machine code is not shared: B compiled the upload, A the
    // bytes it read from the object store, each into its own artifact cache.
    let (ma, mb) = (a.metrics().await, b.metrics().await);
    for m in [&ma, &mb] {
        assert!(
            m.lines().any(|l| l == "wasmq_plugin_compiles_total 1"),
            "{m}"
        );
    }
    for dir in &dirs {
        assert_eq!(
            std::fs::read_dir(dir.path().join("artifacts"))
                .unwrap()
                .count(),
            1
        );
    }
    assert!(ma.contains("node=\"node-a\""), "{ma}");
    assert!(
        ma.lines()
            .any(|l| l == format!("wasmq_node_leases {}", held("node-a"))),
        "{ma}"
    );
    assert!(
        mb.lines()
            .any(|l| l == format!("wasmq_node_leases {}", held("node-b"))),
        "{mb}"
    );

    // A reset through one node moves every offset, those of queues the other node runs too:
    // everything is handled once more, nothing a third time.
    let (st, v) = a
        .post_json("/v1/subscriptions/work/reset", &json!({"to": "earliest"}))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    b.wait_audit("audit", 400, 30).await;
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    let audit = b.read_queue("audit", 0).await;
    let mut times: std::collections::HashMap<&str, usize> = Default::default();
    for r in &audit {
        *times.entry(r["id"].as_str().unwrap()).or_default() += 1;
    }
    assert!(
        audit.len() == 400 && times.len() == 200 && times.values().all(|n| *n == 2),
        "{} records of {} messages after the reset",
        audit.len(),
        times.len()
    );

    // Dead letters on queues of both nodes, redriven through one: each is delivered again by
    // the node running its queue (rejected again: a new dead letter for each).
    let rejects: Vec<serde_json::Value> = (0..8)
        .map(|i| json!({"body": {"reject": true}, "sharding_key": format!("r{i}")}))
        .collect();
    b.publish_batch("jobs", rejects).await;
    let dlq = a
        .wait_until("/v1/subscriptions/work/dlq", 30, |v| {
            v["entries"].as_array().is_some_and(|e| e.len() == 8)
        })
        .await;
    // Both nodes dead-lettered into one count (a conditional write each): it is exact.
    assert_eq!(a.get("/v1/subscriptions/work").await.1["dlq"], 8);
    let first: std::collections::HashSet<String> = dlq["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["key"].as_str().unwrap().to_string())
        .collect();
    let (st, v) = a
        .post_json("/v1/subscriptions/work/dlq/redrive", &json!({}))
        .await;
    assert_eq!(
        (st, v["redriven"].clone()),
        (StatusCode::OK, json!(8)),
        "{v}"
    );
    b.wait_until("/v1/subscriptions/work/dlq", 30, |v| {
        v["entries"].as_array().is_some_and(|e| {
            e.len() == 8
                && e.iter()
                    .all(|e| !first.contains(e["key"].as_str().unwrap_or_default()))
        })
    })
    .await;
    for node in [&a, &b] {
        assert_eq!(node.get("/v1/subscriptions/work").await.1["dlq"], 8);
    }

    // Plugin logs: lines logged on A are in B's view too, named by node.
    let (st, v) = a.upload_plugin("probe", wasmq_tests::plugins::PROBE).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    a.invoke("probe", json!({"do": "log", "lines": 3})).await;
    let logs = b
        .wait_until("/v1/plugins/probe/logs", 10, |v| {
            v["lines"].as_array().is_some_and(|l| l.len() == 3)
        })
        .await;
    for (i, line) in logs["lines"].as_array().unwrap().iter().enumerate() {
        assert_eq!(
            (line["node"].as_str(), line["message"].as_str()),
            (Some("node-a"), Some(format!("log line {i}").as_str())),
            "{logs}"
        );
    }
    assert_eq!(
        a.get("/v1/plugins/probe/logs").await.1["lines"]
            .as_array()
            .unwrap()
            .len(),
        3
    );

    // A stops cleanly (in-flight work finishes, offsets stored, leases released): B takes
    // every queue and goes on.
    a.stop().await.unwrap();
    let all_b: std::collections::BTreeMap<u64, String> =
        (0..8).map(|q| (q, "node-b".to_string())).collect();
    b.wait_until("/v1/cluster", 10, |v| queue_owners(v, "work") == all_b)
        .await;
    b.publish_numbered("jobs", 100).await;
    b.wait_audit("audit", 500, 30).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let audit = b.read_queue("audit", 0).await;
    let ids: std::collections::HashSet<&str> =
        audit.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(
        (audit.len(), ids.len()),
        (500, 300),
        "nothing twice after a clean handover"
    );
    let vb = cluster(&b).await;
    assert!(
        vb["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["node"] != "node-a"),
        "{vb}"
    );
    // A comes back under its name: the queues hashing to it move back, nothing twice.
    let a = TestServer::start_with(node_config(&nats, dirs[0].path(), "node-a")).await;
    a.wait_until("/v1/cluster", 20, |v| queue_owners(v, "work") == expected)
        .await;
    a.publish_numbered("jobs", 100).await;
    a.wait_audit("audit", 600, 30).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(a.read_queue("audit", 0).await.len(), 600);
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// A reset through one node stores the subscription paused and waits for the node running it
/// to give its lease back. A spec update made through a third node meanwhile replaced that
/// paused record with one of its own, also paused, and the reset's end kept it as it found
/// it: the subscription stayed paused for good after a reset of a running subscription. The
/// update now keeps the reset's mark, and the reset's end runs the subscription again with
/// the new spec. The same for a pause made while a redrive waits (below). The node running
/// it is held in a plugin's HTTP call the test lets go, so each change lands inside the wait
/// by the order of events, not by timing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_through_another_node_while_a_reset_or_redrive_waits_are_kept() {
    use wasmq::dispatch::share::{UnitKey, lease_key, preferred};
    use wasmq_tests::peers::HttpPeer;
    let nats = NatsServer::start().await;
    let peer = HttpPeer::start().await;
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let names = ["node-a", "node-b", "node-c"].map(String::from);
    let mut nodes = Vec::new();
    for (dir, id) in dirs.iter().zip(&names) {
        let mut c = node_config(&nats, dir.path(), id);
        // The held call must not be cut off by the plugin's deadline (5 s by default), nor
        // by the grace a stopping runner gives its calls (10 s by default).
        c.plugins.timeout_ms = 60_000;
        c.plugins.stop_grace_ms = 60_000;
        nodes.push(TestServer::start_with(c).await);
    }
    // The node that runs the one queue, the one the reset goes through, and a third.
    let owner_name = preferred(&lease_key("work", UnitKey::Queue(0)), &names)
        .unwrap()
        .clone();
    let o = names.iter().position(|n| *n == owner_name).unwrap();
    let (owner, resetter, third) = (&nodes[o], &nodes[(o + 1) % 3], &nodes[(o + 2) % 3]);
    owner.create_topic("jobs", 1).await;
    owner
        .upload_plugin("probe", wasmq_tests::plugins::PROBE)
        .await;
    let grant = format!("127.0.0.1:{}", peer.addr.port());
    let spec = |version: u32| {
        json!({"topic": "jobs", "plugin": "probe", "config": {"version": version},
               "grants": {"http": [grant]}})
    };
    owner.subscribe("work", spec(1)).await;
    third
        .wait_until("/v1/cluster", 30, |v| {
            queue_owners(v, "work").get(&0) == Some(&owner_name)
        })
        .await;
    // The owner's runner is in a call the peer holds.
    peer.state
        .hold
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let call = json!({"body": {"do": "http", "url": format!("{}/held", peer.url)}});
    let (st, v) = owner.post_json("/v1/topics/jobs/messages", &call).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while peer.requests().is_empty() {
        assert!(std::time::Instant::now() < deadline, "the call never came");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // The reset waits for the owner, which cannot stop while its call is held.
    let reset = {
        let url = format!("{}/v1/subscriptions/work/reset", resetter.url);
        tokio::spawn(async move {
            let r = reqwest::Client::new()
                .post(url)
                .json(&json!({"to": "latest"}))
                .send()
                .await
                .unwrap();
            (r.status(), r.text().await.unwrap())
        })
    };
    third
        .wait_until("/v1/subscriptions/work", 30, |v| v["state"] == "paused")
        .await;
    let (st, v) = third.put_json("/v1/subscriptions/work", &spec(2)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(
        !reset.is_finished(),
        "the reset ended before the update, with the call still held"
    );
    peer.state
        .hold
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let (st, body) = reset.await.unwrap();
    assert_eq!(st, StatusCode::OK, "{body}");
    // Running again, with the update, on every node's view of the stored record.
    for node in &nodes {
        let (st, v) = node.get("/v1/subscriptions/work").await;
        assert_eq!(st, StatusCode::OK, "{v}");
        assert_eq!(
            (&v["state"], &v["spec"]["config"]["version"]),
            (&json!("running"), &json!(2)),
            "{v}"
        );
    }
    // And it delivers: a message published after the reset is handled.
    let (st, v) = owner
        .post_json("/v1/topics/jobs/messages", &json!({"body": {"do": "ack"}}))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    third
        .wait_until("/v1/subscriptions/work", 60, |v| {
            v["lag"] == 0 && v["in_flight"].as_u64().unwrap_or(0) == 0
        })
        .await;

    // A redrive through the owner read the record, waited for its runner to stop, and stored
    // what it had read at the end: a pause made through another node meanwhile was undone.
    // Every record change is now made over the revision it read, read again on a conflict.
    peer.state
        .hold
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let (st, v) = owner.post_json("/v1/topics/jobs/messages", &call).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while peer.requests().len() < 2 {
        assert!(std::time::Instant::now() < deadline, "the call never came");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let redrive = {
        let url = format!("{}/v1/subscriptions/work/dlq/redrive", owner.url);
        tokio::spawn(async move {
            let r = reqwest::Client::new()
                .post(url)
                .json(&json!({}))
                .send()
                .await
                .unwrap();
            (r.status(), r.text().await.unwrap())
        })
    };
    let (st, v) = third
        .post_json("/v1/subscriptions/work/pause", &json!({}))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(
        !redrive.is_finished(),
        "the redrive ended before the pause, with the call still held"
    );
    peer.state
        .hold
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let (st, body) = redrive.await.unwrap();
    assert_eq!(st, StatusCode::OK, "{body}");
    for node in &nodes {
        let (st, v) = node.get("/v1/subscriptions/work").await;
        assert_eq!(st, StatusCode::OK, "{v}");
        assert_eq!(v["state"], "paused", "the pause was undone: {v}");
    }
}

/// A reset or delete through one node stops the other node's runner of the subscription
/// before it changes anything, so nothing that runner delivers from the old offsets is stored
/// after the change. Before, node B's runner went on until it noticed (its next reconcile):
/// rejects published just after a reset through A were dead-lettered by it, its offsets were
/// refused, and its new runner delivered them again from the reset offsets: each reject had
/// two dead letters. A delete left such dead letters to the next subscription of that name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_or_delete_through_one_node_leaves_nothing_from_the_other_nodes_old_runner() {
    let nats = NatsServer::start().await;
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let (a, b) = two_nodes(&nats, &dirs, |_| {}).await;
    b.create_topic("jobs", 8).await;
    b.create_topic("audit", 1).await;
    b.upload_plugin("recorder", RECORDER).await;
    let recorder_on = |topic: &str| {
        json!({"topic": topic, "plugin": "recorder", "instances": 2,
               "config": {"audit": "audit"}, "grants": {"publish": ["audit"]}})
    };
    let spec = recorder_on("jobs");
    b.subscribe("work", spec.clone()).await;
    // Every queue of `group` is held, some by each node.
    let both_run = |v: &serde_json::Value, group: &str| {
        let owners = queue_owners(v, group);
        owners.len() == 8
            && owners.values().any(|o| o == "node-a")
            && owners.values().any(|o| o == "node-b")
    };
    let rejects = |round: u64| -> Vec<serde_json::Value> {
        (0..8)
            .map(|i| json!({"body": {"reject": true}, "sharding_key": format!("r{round}-{i}")}))
            .collect()
    };
    // Both nodes run queues of the subscription.
    a.wait_until("/v1/cluster", 20, |v| both_run(v, "work"))
        .await;
    // Resets through both nodes at once, of subscriptions both run: each node gives its leases
    // of the other's back while it waits for its own (not a 503 after 30 s each).
    b.create_topic("other", 8).await;
    b.subscribe("side", recorder_on("other")).await;
    a.wait_until("/v1/cluster", 20, |v| both_run(v, "side"))
        .await;
    let reset = json!({"to": "latest"});
    let ((st_a, v_a), (st_b, v_b)) = tokio::join!(
        a.post_json("/v1/subscriptions/work/reset", &reset),
        b.post_json("/v1/subscriptions/side/reset", &reset)
    );
    assert_eq!(
        (st_a, st_b),
        (StatusCode::OK, StatusCode::OK),
        "{v_a} {v_b}"
    );
    for round in 1..=3u64 {
        // B's runner is busy with these when the reset comes.
        b.publish_numbered("jobs", 40).await;
        let (st, v) = a
            .post_json("/v1/subscriptions/work/reset", &json!({"to": "latest"}))
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        b.publish_batch("jobs", rejects(round)).await;
        // Everything published is behind the stored offsets: whatever was to be delivered twice
        // was delivered by then.
        let st = a
            .wait_until("/v1/subscriptions/work", 30, |v| {
                v["lag"] == 0 && v["in_flight"] == 0 && v["dlq"].as_u64() >= Some(8 * round)
            })
            .await;
        let (_, dlq) = a.get("/v1/subscriptions/work/dlq?limit=1000").await;
        let ids: std::collections::HashSet<&str> = dlq["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["message_id"].as_str().unwrap())
            .collect();
        assert_eq!(
            (st["dlq"].as_u64(), ids.len() as u64),
            (Some(8 * round), 8 * round),
            "round {round}: each reject dead-lettered once: {dlq}"
        );
    }
    // Deleted through A while B holds rejects delayed by 300 ms in its timers: nothing of the
    // old subscription is left to a new one of the same name.
    for round in 4..=6u64 {
        let delayed: Vec<serde_json::Value> = rejects(round)
            .into_iter()
            .map(|mut m| {
                m["delay_ms"] = json!(300);
                m
            })
            .collect();
        b.publish_batch("jobs", delayed).await;
        let (st, v) = a.delete("/v1/subscriptions/work").await;
        assert!(st.is_success(), "{st} {v}");
        let mut fresh = spec.clone();
        fresh["start"] = json!("latest");
        a.subscribe("work", fresh).await;
        // Both nodes run the new subscription (B's reconcile saw it, so its old runner is gone)
        // and the delays are over.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        b.wait_until("/v1/cluster", 20, |v| {
            let owners = queue_owners(v, "work");
            owners.len() == 8 && owners.values().any(|o| o == "node-b")
        })
        .await;
        for s in [&a, &b] {
            let (_, st) = s.get("/v1/subscriptions/work").await;
            let (_, dlq) = s.get("/v1/subscriptions/work/dlq").await;
            assert_eq!(
                (st["dlq"].clone(), dlq["entries"].as_array().map(Vec::len)),
                (json!(0), Some(0)),
                "round {round}: {st} {dlq}"
            );
        }
    }
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_instances_are_divided_among_nodes_and_each_sees_everything_once_in_order() {
    use wasmq::dispatch::share::{UnitKey, lease_key, preferred};
    let nats = NatsServer::start().await;
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let (a, b) = two_nodes(&nats, &dirs, |_| {}).await;
    a.create_topic("prices", 2).await;
    a.create_topic("audit", 1).await;
    a.upload_plugin("recorder", RECORDER).await;
    a.subscribe(
        "caches",
        json!({"topic": "prices", "plugin": "recorder", "mode": "broadcast", "instances": 4,
               "config": {"audit": "audit"}, "grants": {"publish": ["audit"]}}),
    )
    .await;
    let nodes = ["node-a".to_string(), "node-b".to_string()];
    let expected: Vec<(u64, String)> = (0..4)
        .map(|i| {
            let owner = preferred(&lease_key("caches", UnitKey::Instance(i)), &nodes).unwrap();
            (u64::from(i), owner.clone())
        })
        .collect();
    b.wait_until("/v1/cluster", 20, |v| {
        let mut got: Vec<(u64, String)> = v["leases"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["subscription"] == "caches" && l["expired"] == false)
            .map(|l| {
                let i = l["instance"].as_u64().unwrap();
                (i, l["owner"].as_str().unwrap().to_string())
            })
            .collect();
        got.sort();
        got == expected
    })
    .await;
    let msgs: Vec<serde_json::Value> = (0..100)
        .map(|n| json!({"body": {"n": n}, "sharding_key": format!("sku{}", n % 7)}))
        .collect();
    for node in [&a, &b] {
        node.publish_batch("prices", msgs.clone()).await;
    }
    let audit = a.wait_audit("audit", 800, 30).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(a.read_queue("audit", 0).await.len(), 800, "nothing twice");
    // Every instance, wherever it runs, saw each message once, each queue in order.
    for i in 0..4 {
        let mine: Vec<&serde_json::Value> = audit.iter().filter(|r| r["instance"] == i).collect();
        let ids: std::collections::HashSet<&str> =
            mine.iter().map(|r| r["id"].as_str().unwrap()).collect();
        assert_eq!((mine.len(), ids.len()), (200, 200), "instance {i}");
        for q in 0..2 {
            let offsets: Vec<u64> = mine
                .iter()
                .filter(|r| r["queue"] == q)
                .map(|r| r["offset"].as_u64().unwrap())
                .collect();
            assert!(
                offsets.windows(2).all(|w| w[0] < w[1]),
                "instance {i} queue {q}"
            );
        }
    }
    let st = b.get("/v1/subscriptions/caches").await.1;
    assert_eq!(st["lag"], 0, "{st}");
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_bound_and_rate_hold_for_the_whole_cluster() {
    let nats = NatsServer::start().await;
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let (a, b) = two_nodes(&nats, &dirs, |c| c.limits.max_backlog = 50).await;
    a.create_topic("t", 4).await;
    a.create_topic("audit", 1).await;
    a.upload_plugin("recorder", RECORDER).await;
    // 20 messages a second for the subscription, whichever nodes run its queues.
    a.subscribe(
        "slow",
        json!({"topic": "t", "plugin": "recorder", "max_rate": 20.0,
               "config": {"audit": "audit"}, "grants": {"publish": ["audit"]}}),
    )
    .await;
    b.wait_until("/v1/cluster", 20, |v| {
        v["leases"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["subscription"] == "slow" && l["expired"] == false)
            .count()
            == 4
    })
    .await;
    // Let both nodes read the stored offsets once.
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let started = std::time::Instant::now();
    let (mut accepted, mut refused) = (0u64, None);
    for i in 0..300 {
        let node = if i % 2 == 0 { &a } else { &b };
        let (st, v) = node
            .post_json("/v1/topics/t/messages", &json!({"body": {"n": i}}))
            .await;
        if st == StatusCode::TOO_MANY_REQUESTS {
            refused = Some(v);
            break;
        }
        assert_eq!(st, StatusCode::CREATED, "{v}");
        accepted += 1;
    }
    let refused = refused.expect("the backlog bound never applied across nodes");
    assert_eq!(refused["error"]["code"], "backlog_full");
    // The bound is read from offsets up to a second old: a little slack over 50.
    assert!(
        (50..=80).contains(&accepted),
        "accepted {accepted} before pushing back"
    );
    // Together the nodes deliver no faster than the subscription's rate.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let handled = a.get("/v1/topics/audit").await.1["messages"]
        .as_u64()
        .unwrap();
    let allowed = 20.0 * started.elapsed().as_secs_f64() + 4.0;
    assert!(
        (handled as f64) <= allowed,
        "{handled} handled in {:?} at 20/s",
        started.elapsed()
    );
    assert!(handled >= 20, "only {handled} handled");
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_server_dies_mid_load_and_nothing_acknowledged_is_lost() {
    let mut nats = NatsCluster::start(3).await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let config = |dir: &std::path::Path| {
        let mut c = config_in(dir);
        c.storage.backend = Backend::Jetstream;
        c.storage.urls = nats.urls();
        c.storage.replicas = 3;
        c
    };
    let a = TestServer::start_with(config(dir_a.path())).await;
    let b = TestServer::start_with(config(dir_b.path())).await;
    a.create_topic("jobs", 4).await;
    a.create_topic("audit", 1).await;
    let (st, v) = a.upload_plugin("recorder", RECORDER).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    a.subscribe(
        "work",
        json!({"topic": "jobs", "plugin": "recorder", "instances": 2,
               "config": {"audit": "audit"}, "grants": {"publish": ["audit"]}}),
    )
    .await;
    // Publishers on both nodes; one nats-server is SIGKILLed half a second in.
    let started = std::time::Instant::now();
    let (mut acked, mut refused, mut killed) = (Vec::new(), 0, false);
    // 60 acknowledged batches, however many are refused while the cluster re-elects (a
    // loaded machine can take several seconds to).
    let mut round = 0;
    while acked.len() < 60 * 50 {
        round += 1;
        assert!(
            started.elapsed() < std::time::Duration::from_secs(90),
            "publishing never resumed: {} acknowledged, {refused} refused",
            acked.len()
        );
        if !killed && started.elapsed() > std::time::Duration::from_millis(500) {
            nats.servers[0].kill().await;
            killed = true;
        }
        let node = if round % 2 == 0 { &a } else { &b };
        let msgs: Vec<serde_json::Value> = (0..50)
            .map(|i| json!({"body": {"round": round, "i": i}}))
            .collect();
        let (st, v) = node
            .post_json("/v1/topics/jobs/messages/batch", &json!({"messages": msgs}))
            .await;
        if st == StatusCode::CREATED {
            acked.extend(
                v["results"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r["id"].as_str().unwrap().to_string()),
            );
        } else {
            // Refused, not lost: the storage was re-electing (503 storage_unavailable).
            assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{v}");
            refused += 1;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(killed, "the load ended before the kill: nothing was tested");
    // Every acknowledged message is delivered (through the surviving two servers).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    let missing = loop {
        // Reads answer 503 storage_unavailable while the cluster re-elects: try again.
        let page = b
            .get("/v1/topics/audit/messages?queue=0&from=0&limit=1")
            .await;
        if page.0 != StatusCode::OK {
            assert_eq!(page.0, StatusCode::SERVICE_UNAVAILABLE, "{}", page.1);
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            continue;
        }
        let seen: std::collections::HashSet<String> = b
            .read_queue("audit", 0)
            .await
            .iter()
            .filter_map(|r| r["id"].as_str().map(String::from))
            .collect();
        let missing = acked.iter().filter(|id| !seen.contains(*id)).count();
        if missing == 0 || std::time::Instant::now() > deadline {
            break missing;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    };
    println!(
        "{} batches acknowledged ({} messages), {refused} refused while the cluster re-elected; {missing} missing",
        acked.len() / 50,
        acked.len()
    );
    assert_eq!(missing, 0);
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// A node whose queue lease is taken delivers nothing more from that queue, even with a
/// rate-limited backlog (whose dispatch loop once never looked at its cancellation): the
/// runner stops at once, and deliveries after it are at most what was in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_loses_a_queue_lease_stops_delivering_it_under_max_rate() {
    use wasmq::cluster::{LEASE_SPACE, LeaseRecord};
    use wasmq::dispatch::share::{UnitKey, lease_key};
    use wasmq::storage::Expect;
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let a = TestServer::start_with(node_config(&nats, dir.path(), "node-a")).await;
    a.create_topic("jobs", 1).await;
    a.create_topic("audit", 1).await;
    let (st, v) = a.upload_plugin("recorder", RECORDER).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    a.subscribe(
        "work",
        json!({"topic": "jobs", "plugin": "recorder", "max_rate": 20.0, "max_in_flight": 4,
               "config": {"audit": "audit"}, "grants": {"publish": ["audit"]}}),
    )
    .await;
    for _ in 0..2 {
        a.publish_numbered("jobs", 1000).await;
    }
    a.wait_audit("audit", 5, 30).await;
    // Another owner takes the queue's lease behind the node's back.
    let storage = JetStreamStorage::connect(std::slice::from_ref(&nats.url), 1)
        .await
        .unwrap();
    let key = lease_key("work", UnitKey::Queue(0));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let stolen = LeaseRecord {
        owner: "intruder".into(),
        expires_at: now + 600_000,
    };
    storage
        .put_record(
            LEASE_SPACE,
            &key,
            Some(serde_json::to_vec(&stolen).unwrap()),
            Expect::Any,
        )
        .await
        .unwrap();
    // The node notices, and its runner of the queue stops.
    a.wait_until("/v1/cluster", 30, |v| {
        v["dispatching"] == false && v["leases_held"] == 0
    })
    .await;
    let (_, t) = a.get("/v1/topics/audit").await;
    let before = t["messages"].as_u64().unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let (_, t) = a.get("/v1/topics/audit").await;
    let after = t["messages"].as_u64().unwrap();
    assert!(
        after - before <= 4,
        "{} deliveries after the lease was lost",
        after - before
    );
    storage.close().await;
}

/// Issue 23.4 on shared storage: delivery counters survive a node's restart under a new
/// (random) id and another node's stop: each node keeps its own record, and status sums the
/// records of nodes not running the subscription with the live tallies. A subscription
/// created again under the name counts from 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_survive_node_restarts_and_stops_on_shared_storage() {
    let nats = NatsServer::start().await;
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let acked = |v: &serde_json::Value| v["counters"]["acked"].as_u64();
    let a = TestServer::start_with(node_config(&nats, dirs[0].path(), "")).await;
    a.create_topic("orders", 8).await;
    a.upload_plugin("echo", wasmq_tests::plugins::ECHO).await;
    a.subscribe("count", json!({"topic": "orders", "plugin": "echo"}))
        .await;
    a.publish_numbered("orders", 5).await;
    a.wait_until("/v1/subscriptions/count", 60, |v| acked(v) == Some(5))
        .await;
    a.stop().await.unwrap();

    let a = TestServer::start_with(node_config(&nats, dirs[0].path(), "")).await;
    let v = a
        .wait_until("/v1/subscriptions/count", 60, |v| acked(v).is_some())
        .await;
    assert_eq!(acked(&v), Some(5), "after a restart under a new id: {v}");

    let b = TestServer::start_with(node_config(&nats, dirs[1].path(), "node-b")).await;
    a.wait_until("/v1/cluster", 30, |v| {
        let owners = queue_owners(v, "count");
        owners.len() == 8 && owners.values().any(|n| n == "node-b")
    })
    .await;
    a.publish_numbered("orders", 40).await;
    a.wait_until("/v1/subscriptions/count", 60, |v| acked(v) == Some(45))
        .await;
    b.stop().await.unwrap();
    // Once B's last report is stale, its share comes from its record.
    a.wait_until("/v1/cluster", 30, |v| {
        let owners = queue_owners(v, "count");
        owners.len() == 8 && owners.values().all(|n| n != "node-b")
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    let v = a.get("/v1/subscriptions/count").await.1;
    assert_eq!(acked(&v), Some(45), "with node-b stopped: {v}");

    assert_eq!(a.delete("/v1/subscriptions/count").await.0, StatusCode::OK);
    a.subscribe(
        "count",
        json!({"topic": "orders", "plugin": "echo", "start": "latest"}),
    )
    .await;
    let v = a
        .wait_until("/v1/subscriptions/count", 60, |v| acked(v).is_some())
        .await;
    assert_eq!(acked(&v), Some(0), "a new subscription counts afresh: {v}");
    a.stop().await.unwrap();
}

/// Issue 23.3 on JetStream: deleting a topic with `force` leaves nothing of it or of its
/// subscriptions in storage (messages, key lookups, offsets, timers, dead letters and their
/// count, counters, completion markers, kv).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_topic_on_jetstream_leaves_nothing_of_it_or_its_subscriptions() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let s = retention_node(&nats, dir.path()).await;
    s.create_topic("doomed", 2).await;
    s.create_topic("derived", 1).await;
    for (name, path) in [
        ("tally", wasmq_tests::plugins::TALLY),
        ("reject-all", wasmq_tests::plugins::REJECT_ALL),
    ] {
        let (st, v) = s.upload_plugin(name, path).await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
    }
    s.subscribe(
        "counting",
        json!({"topic": "doomed", "plugin": "tally",
               "config": {"derived": "derived"}, "grants": {"publish": ["derived"]}}),
    )
    .await;
    s.subscribe("dead", json!({"topic": "doomed", "plugin": "reject-all"}))
        .await;
    let msgs: Vec<_> = (0..6)
        .map(|n| json!({"body": {"n": n}, "key": format!("k{n}")}))
        .collect();
    s.publish_batch("doomed", msgs).await;
    s.wait_until("/v1/subscriptions/dead", 60, |v| v["dlq"] == 6)
        .await;
    s.wait_until("/v1/subscriptions/counting", 60, |v| v["lag"] == 0)
        .await;
    let (st, gone) = s.delete("/v1/topics/doomed?force=true").await;
    assert_eq!(st, StatusCode::OK, "{gone}");
    assert_eq!(gone["messages"], 6, "{gone}");
    s.stop().await.unwrap();

    let storage = JetStreamStorage::connect(std::slice::from_ref(&nats.url), 1)
        .await
        .unwrap();
    wasmq_tests::assert_nothing_left(&storage, "doomed", 2, "k1", &["counting", "dead"]).await;
    storage.close().await;
}

/// One server on `nats` (R1) that enforces retention every 100 ms.
async fn retention_node(nats: &NatsServer, dir: &std::path::Path) -> TestServer {
    let mut c = config_in(dir);
    c.storage.backend = Backend::Jetstream;
    c.storage.urls = vec![nats.url.clone()];
    c.storage.replicas = 1;
    c.retention.check_interval_ms = 100;
    TestServer::start_with(c).await
}

/// Retention on JetStream: age and size limits are the queue streams' own `max_age` and
/// `max_bytes` (set when the topic is created or changed); `after_consumed` purges what the
/// subscriptions are done with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_on_jetstream_uses_the_streams_limits_and_purges_what_is_consumed() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let s = retention_node(&nats, dir.path()).await;
    let put = |topic: &'static str, body: serde_json::Value| {
        let s = &s;
        async move {
            let (st, v) = s.put_json(&format!("/v1/topics/{topic}"), &body).await;
            assert!(st.is_success(), "{st} {v}");
            v
        }
    };
    // Created without limits, then given a size limit: the stream is updated in place.
    put("sized", json!({"queues": 1})).await;
    put("sized", json!({"retention": {"max_bytes": 8192}})).await;
    let pad = "p".repeat(1000);
    let msgs: Vec<_> = (0..30)
        .map(|n| json!({"body": {"n": n, "pad": pad}}))
        .collect();
    s.publish_batch("sized", msgs).await;
    let (_, t) = s.get("/v1/topics/sized").await;
    let bytes = t["stored_bytes"][0].as_u64().unwrap();
    assert!(bytes <= 8192 && bytes > 4096, "{t}");
    assert!(t["low_water"][0].as_u64().unwrap() > 0, "{t}");
    assert_eq!(t["high_water"][0], 30, "{t}");

    put(
        "aged",
        json!({"queues": 2, "retention": {"max_age_ms": 1000}}),
    )
    .await;
    s.publish_numbered("aged", 6).await;
    let t = s
        .wait_until("/v1/topics/aged", 60, |t| t["stored_messages"] == 0)
        .await;
    assert_eq!(t["messages"], 6, "{t}");

    put(
        "consumed",
        json!({"queues": 2, "retention": {"after_consumed": true, "max_age_ms": null}}),
    )
    .await;
    s.create_topic("audit", 1).await;
    let (st, v) = s.upload_plugin("recorder", RECORDER).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    s.subscribe(
        "work",
        json!({"topic": "consumed", "plugin": "recorder",
               "config": {"audit": "audit"}, "grants": {"publish": ["audit"]}}),
    )
    .await;
    s.publish_numbered("consumed", 10).await;
    assert_eq!(s.wait_audit("audit", 10, 60).await.len(), 10);
    let t = s
        .wait_until("/v1/topics/consumed", 60, |t| t["stored_messages"] == 0)
        .await;
    assert_eq!(t["messages"], 10, "{t}");
    assert_eq!(t["low_water"], t["high_water"], "{t}");
    s.stop().await.unwrap();
}

/// The value of an unlabelled counter in `/metrics`.
async fn metric(s: &TestServer, name: &str) -> u64 {
    let m = s.metrics().await;
    m.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing:\n{m}"))
}

/// Issue 23.2 on JetStream: the key index entries of each queue live in the queue's own index
/// stream (`WQX_{topic}_{queue}`), go by the topic's age limit (the stream's own `max_age`) and
/// by a purge after what size limits, consumption and topic deletion take, with no request per
/// entry; ids carry their topic's tag and queue and are in their message's subject (issue 25),
/// so lookups by id and by key still answer, and nothing goes to the global index any more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_entries_on_jetstream_go_with_their_queue_by_age_size_and_consumption() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let s = retention_node(&nats, dir.path()).await;
    let js = async_nats::jetstream::new(async_nats::connect(&nats.url).await.unwrap());
    let entries = |name: String| {
        let js = js.clone();
        async move {
            match js.get_stream(&name).await {
                Ok(mut stream) => {
                    let info = stream.info().await.unwrap();
                    (info.state.messages, info.config.max_age)
                }
                Err(_) => (0, std::time::Duration::ZERO),
            }
        }
    };
    let index = |topic: &str, q: u32| entries(format!("WQX_{topic}_{q}"));
    let put = |topic: &'static str, body: serde_json::Value| {
        let s = &s;
        async move {
            let (st, v) = s.put_json(&format!("/v1/topics/{topic}"), &body).await;
            assert!(st.is_success(), "{st} {v}");
        }
    };

    // By age: the index streams have the topic's max_age.
    put(
        "brief",
        json!({"queues": 2, "retention": {"max_age_ms": 1000}}),
    )
    .await;
    let msgs: Vec<_> = (0..6)
        .map(|n| json!({"body": {"n": n}, "key": format!("k{n}")}))
        .collect();
    let sent = s.publish_batch("brief", msgs).await;
    let ids: Vec<String> = (0..6)
        .map(|i| sent["results"][i]["id"].as_str().unwrap().to_string())
        .collect();
    for id in &ids {
        assert_eq!(s.get(&format!("/v1/messages/{id}")).await.0, StatusCode::OK);
    }
    let (_, by_key) = s.get("/v1/topics/brief/messages?key=k3").await;
    assert_eq!(by_key["messages"][0]["body"]["n"], 3, "{by_key}");
    let (a, b) = (index("brief", 0).await, index("brief", 1).await);
    assert_eq!(a.0 + b.0, 6, "one key entry per message, none per id");
    assert_eq!(a.1, std::time::Duration::from_secs(1));
    // Nothing in the global index, which keeps older entries by the longest age limit.
    assert_eq!(entries("KV_WQ_IDS".into()).await.0, 0);
    assert_eq!(entries("WQ_KEYS".into()).await.0, 0);
    let global_age = |age: std::time::Duration| {
        let entries = &entries;
        async move {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while entries("KV_WQ_IDS".into()).await.1 != age
                || entries("WQ_KEYS".into()).await.1 != age
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "global index age not {age:?}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    };
    global_age(std::time::Duration::from_secs(1)).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while index("brief", 0).await.0 + index("brief", 1).await.0 > 0 {
        assert!(std::time::Instant::now() < deadline, "index entries kept");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        s.get(&format!("/v1/messages/{}", ids[0])).await.0,
        StatusCode::NOT_FOUND
    );

    // A topic whose messages have no key has no index stream; its ids are found all the same.
    s.create_topic("keyless", 2).await;
    let sent = s
        .publish_batch("keyless", vec![json!({"body": 1}), json!({"body": 2})])
        .await;
    for r in sent["results"].as_array().unwrap() {
        let id = r["id"].as_str().unwrap();
        let (st, v) = s.get(&format!("/v1/messages/{id}")).await;
        assert_eq!(st, StatusCode::OK, "{v}");
    }
    for q in 0..2 {
        assert!(js.get_stream(format!("WQX_keyless_{q}")).await.is_err());
    }

    // After consumption, on a topic without an age limit.
    put(
        "consumed",
        json!({"queues": 2, "retention": {"after_consumed": true, "max_age_ms": null}}),
    )
    .await;
    s.create_topic("audit", 1).await;
    let (st, v) = s.upload_plugin("recorder", RECORDER).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    s.subscribe(
        "work",
        json!({"topic": "consumed", "plugin": "recorder",
               "config": {"audit": "audit"}, "grants": {"publish": ["audit"]}}),
    )
    .await;
    let msgs: Vec<_> = (0..10)
        .map(|n| json!({"body": {"n": n}, "key": format!("c{n}")}))
        .collect();
    let sent = s.publish_batch("consumed", msgs).await;
    let consumed_id = sent["results"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(s.wait_audit("audit", 10, 60).await.len(), 10);
    s.wait_until("/v1/topics/consumed", 60, |t| t["stored_messages"] == 0)
        .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while index("consumed", 0).await.0 + index("consumed", 1).await.0 > 0 {
        assert!(std::time::Instant::now() < deadline, "index entries kept");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(index("consumed", 0).await.1, std::time::Duration::ZERO);
    global_age(std::time::Duration::ZERO).await;
    assert_eq!(
        s.get(&format!("/v1/messages/{consumed_id}")).await.0,
        StatusCode::NOT_FOUND
    );
    // The audit messages (kept: no limit) are still found by id, from another topic.
    let (_, audit) = s.get("/v1/topics/audit/messages?queue=0&from=0").await;
    let audit_id = audit["messages"][9]["id"].as_str().unwrap().to_string();
    assert_eq!(
        s.get(&format!("/v1/messages/{audit_id}")).await.0,
        StatusCode::OK
    );

    // By size, published in rounds with retention passes between them: what the stream's
    // max_bytes took loses its entries a round or two later; what it keeps is still found.
    put(
        "sized",
        json!({"queues": 1, "retention": {"max_bytes": 8192, "max_age_ms": null}}),
    )
    .await;
    let pad = "p".repeat(1000);
    for round in 0..8 {
        let msgs: Vec<_> = (0..5)
            .map(|n| json!({"body": {"n": round * 5 + n, "pad": pad}, "key": format!("s{}", round * 5 + n)}))
            .collect();
        s.publish_batch("sized", msgs).await;
        let passes = metric(&s, "wasmq_retention_passes_total").await;
        while metric(&s, "wasmq_retention_passes_total").await < passes + 2 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    let (_, t) = s.get("/v1/topics/sized").await;
    let stored = t["stored_messages"].as_u64().unwrap();
    assert!(stored < 40 && t["high_water"][0] == 40, "{t}");
    let kept = index("sized", 0).await.0;
    assert!(
        kept <= stored + 10,
        "40 key entries written, {kept} kept for {stored} messages"
    );
    let (_, last) = s.get("/v1/topics/sized/messages?key=s39").await;
    assert_eq!(last["messages"][0]["body"]["n"], 39, "{last}");

    // Deleting a topic purges its index at once.
    let (st, v) = s.delete("/v1/topics/sized").await;
    assert!(st.is_success(), "{st} {v}");
    assert_eq!(index("sized", 0).await.0, 0);
    s.stop().await.unwrap();
}

/// Exactly-once processing across nodes (issue 24): two nodes run the queues of one tally
/// subscription, each with two instances, all incrementing one kv key; retries after the
/// increment and the publish are discarded. The derived values are exactly 1..n, one per
/// input: no increment lost between the nodes (their commits over the key hold its kv-space
/// lock from check to write), none counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_incrementing_one_kv_key_lose_no_update() {
    let nats = NatsServer::start().await;
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let (a, b) = two_nodes(&nats, &dirs, |_| {}).await;
    let (st, v) = b.upload_plugin("tally", wasmq_tests::plugins::TALLY).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    b.create_topic("in", 4).await;
    b.create_topic("derived", 1).await;
    b.subscribe(
        "tally",
        json!({"topic": "in", "plugin": "tally", "instances": 2, "max_in_flight": 16,
               "config": {"derived": "derived", "retry_percent": 20},
               "grants": {"publish": ["derived"]},
               "retry": {"max_attempts": 100, "backoff_ms": [1]}}),
    )
    .await;
    // Both nodes run some of the queues before anything is published.
    a.wait_until("/v1/cluster", 30, |v| {
        let owners = queue_owners(v, "tally");
        owners.len() == 4
            && owners.values().any(|o| o == "node-a")
            && owners.values().any(|o| o == "node-b")
    })
    .await;
    const N: u64 = 200;
    let messages: Vec<serde_json::Value> =
        (0..N).map(|_| json!({"body": {"counter": "c"}})).collect();
    a.publish_batch("in", messages).await;
    // The deadline only stops a hang: the work is bounded by N.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    let derived = loop {
        let d = a.read_queue("derived", 0).await;
        if d.len() as u64 >= N {
            break d;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {N} derived",
            d.len()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    // Nothing more comes once every input is acked.
    b.wait_until("/v1/subscriptions/tally", 300, |v| {
        v["lag"] == 0 && v["in_flight"] == 0
    })
    .await;
    let derived = if derived.len() as u64 == N {
        a.read_queue("derived", 0).await
    } else {
        derived
    };
    let mut values: Vec<u64> = derived
        .iter()
        .map(|d| d["value"].as_u64().unwrap())
        .collect();
    values.sort_unstable();
    assert_eq!(values, (1..=N).collect::<Vec<_>>());
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// Issue 25 goal 6: a message is appended on a subject that ends in its id, so a lookup by id
/// needs no index entry per message. A queue written by a node from before (one subject, an
/// id and a key entry per message in its index stream) keeps answering lookups; the first
/// append binds the id subjects on its stream; a node not yet upgraded that narrows the stream
/// again (its limit change writes back the subjects it read) costs no append, and each message
/// is stored once, at the next offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_written_before_ids_went_into_subjects_stays_readable_and_is_widened_again() {
    use async_nats::jetstream::stream::Config;
    let nats = NatsServer::start().await;
    let js = async_nats::jetstream::new(async_nats::connect(&nats.url).await.unwrap());
    let old = |name: &str, subject: &str| Config {
        name: name.into(),
        subjects: vec![subject.into()],
        allow_direct: true,
        ..Default::default()
    };
    js.create_stream(old("WQM_old_0", "wqm.old.0"))
        .await
        .unwrap();
    js.create_stream(old("WQX_old_0", "wqx.old.0.>"))
        .await
        .unwrap();
    let message = |key: Option<&str>, body: &str| {
        let mut m = conformance::msg(0, key, body);
        m.id = wasmq::storage::message_id_for("old", 0);
        m
    };
    let before = message(Some("k"), "before");
    let publish = |subject: String, payload: Vec<u8>| {
        let js = js.clone();
        async move {
            js.publish(subject, payload.into())
                .await
                .unwrap()
                .await
                .unwrap()
        }
    };
    publish("wqm.old.0".into(), rmp_serde::to_vec(&before).unwrap()).await;
    let at = rmp_serde::to_vec(&0u64).unwrap();
    publish(format!("wqx.old.0.i.{}", before.id), at.clone()).await;
    publish("wqx.old.0.k.k".into(), at).await;
    let info = |name: &'static str| {
        let js = js.clone();
        async move {
            js.get_stream(name)
                .await
                .unwrap()
                .info()
                .await
                .unwrap()
                .clone()
        }
    };

    let s = JetStreamStorage::connect(std::slice::from_ref(&nats.url), 1)
        .await
        .unwrap();
    let after = message(Some("k"), "after");
    let appended = s.append("old", vec![after.clone()]).await.unwrap();
    assert_eq!(appended[0].offset, 1);
    let wide = ["wqm.old.0", "wqm.old.0.*"];
    assert_eq!(info("WQM_old_0").await.config.subjects, wide);
    assert_eq!(
        info("WQX_old_0").await.state.messages,
        3,
        "the new message's key entry, no id entry"
    );

    // A node not yet upgraded changes the limits and writes back the one subject it read.
    let mut narrowed = info("WQM_old_0").await.config;
    narrowed.subjects = vec!["wqm.old.0".into()];
    narrowed.max_age = std::time::Duration::from_secs(3600);
    js.update_stream(&narrowed).await.unwrap();
    // A batch for queue 1 (stored at once) and queue 0 (refused, then sent again with the
    // whole batch): each is stored once.
    let mut other = conformance::msg(1, None, "other");
    other.id = wasmq::storage::message_id_for("old", 1);
    let again = message(None, "again");
    let appended = s
        .append("old", vec![other.clone(), again.clone()])
        .await
        .unwrap();
    assert_eq!((appended[0].offset, appended[1].offset), (0, 2));
    let now = info("WQM_old_0").await;
    assert_eq!(now.config.subjects, wide);
    assert_eq!(now.config.max_age, std::time::Duration::from_secs(3600));
    assert_eq!(now.state.messages, 3);
    assert_eq!(info("WQM_old_1").await.state.messages, 1);
    // Its appends, on the old subject with an id entry, land in the same queue and are found.
    let late = message(None, "late");
    publish("wqm.old.0".into(), rmp_serde::to_vec(&late).unwrap()).await;
    let at = rmp_serde::to_vec(&3u64).unwrap();
    publish(format!("wqx.old.0.i.{}", late.id), at).await;

    let read = s.read("old", 0, 0, 10).await.unwrap();
    let bodies: Vec<&[u8]> = read.iter().map(|m| m.message.body.as_slice()).collect();
    assert_eq!(bodies, [&b"before"[..], b"after", b"again", b"late"]);
    for (m, offset) in [(&before, 0), (&after, 1), (&again, 2), (&late, 3)] {
        let found = s.message_by_id(m.id).await.unwrap().unwrap();
        assert_eq!((found.offset, &found.message.body), (offset, &m.body));
    }
    let keyed: Vec<u64> = s
        .messages_by_key("old", "k", 10)
        .await
        .unwrap()
        .iter()
        .map(|m| m.offset)
        .collect();
    assert_eq!(keyed, [0, 1]);
    s.close().await;
}

/// Issue 25 goal 6: a queue read that goes on where a runner's reads of a backlog went (two
/// full reads in a row) is answered by a pull consumer left there: one request, not a direct
/// get per message. What it returns is what direct gets return (checked against a second
/// connection, which has no readers): the next messages in order, new ones as they come, from
/// the low water after a purge below a reader (which drops it). Reads of fewer than 64 (a
/// `limit` of 0 too) never move a reader, and a reader idle for half its consumer's life is
/// not used; the consumers of readers that go are deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_that_go_on_where_the_last_ended_match_direct_gets() {
    let nats = NatsServer::start().await;
    let js = async_nats::jetstream::new(async_nats::connect(&nats.url).await.unwrap());
    let connect = || JetStreamStorage::connect(std::slice::from_ref(&nats.url), 1);
    let s = connect().await.unwrap();
    let batch = |from: usize, n: usize| -> Vec<_> {
        (from..from + n)
            .map(|i| conformance::msg(0, None, &format!("m{i}")))
            .collect()
    };
    s.append("rd", batch(0, 300)).await.unwrap();
    let consumers = || {
        let js = js.clone();
        async move {
            let mut stream = js.get_stream("WQM_rd_0").await.unwrap();
            stream.info().await.unwrap().state.consumer_count
        }
    };
    let wait_consumers = |n: usize| {
        let consumers = &consumers;
        async move {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while consumers().await != n {
                assert!(std::time::Instant::now() < deadline, "not {n} readers");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    };
    // Reads `range` and checks it against a new connection, which has no readers.
    let read = |from: u64, limit: usize, range: std::ops::Range<u64>| {
        let (s, connect) = (&s, &connect);
        async move {
            let direct = connect().await.unwrap();
            let got = s.read("rd", 0, from, limit).await.unwrap();
            let offsets: Vec<u64> = got.iter().map(|m| m.offset).collect();
            assert_eq!(offsets, range.collect::<Vec<_>>(), "read {from} {limit}");
            let want = direct.read("rd", 0, from, limit).await.unwrap();
            let key = |m: &wasmq::storage::StoredMessage| {
                (m.offset, m.stored_at, m.message.id, m.message.body.clone())
            };
            assert_eq!(
                got.iter().map(key).collect::<Vec<_>>(),
                want.iter().map(key).collect::<Vec<_>>()
            );
            direct.close().await;
        }
    };
    // Waits until the node keeps `n` readers (made in the background).
    let wait_readers = |n: usize| {
        let s = &s;
        async move {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while s.readers_kept() != n {
                assert!(std::time::Instant::now() < deadline, "not {n} readers");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    };
    // A short read leaves nothing; one full read is not yet a run; the second makes a reader.
    read(0, 10, 0..10).await;
    read(0, 100, 0..100).await;
    read(100, 100, 100..200).await;
    wait_readers(1).await;
    assert_eq!((s.reads_pulled(), consumers().await), (0, 1));
    read(200, 100, 200..300).await;
    assert_eq!(s.reads_pulled(), 1);
    // At the end: nothing, then what is appended next, through the same reader.
    read(300, 100, 300..300).await;
    s.append("rd", batch(300, 5)).await.unwrap();
    read(300, 100, 300..305).await;
    assert_eq!(s.reads_pulled(), 3);
    // A read of 0 (or of 1, a lookup) at the reader's offset does not move it.
    read(305, 0, 305..305).await;
    read(305, 1, 305..305).await;
    s.append("rd", batch(305, 3)).await.unwrap();
    read(305, 100, 305..308).await;
    assert_eq!(s.reads_pulled(), 4);
    assert_eq!(
        (s.readers_kept(), consumers().await),
        (1, 1),
        "one reader went on"
    );
    // A reader idle for half its consumer's life is dropped (its consumer deleted), unused.
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    s.append("rd", batch(308, 2)).await.unwrap();
    read(308, 100, 308..310).await;
    assert_eq!((s.reads_pulled(), s.readers_kept()), (4, 0));
    wait_consumers(0).await;
    // A purge below a reader: the reader is dropped and the read starts at the low water, as
    // a direct read does.
    s.append("rd", batch(310, 300)).await.unwrap();
    read(310, 100, 310..410).await;
    read(410, 100, 410..510).await;
    wait_readers(1).await;
    s.truncate("rd", 0, 560).await.unwrap();
    read(510, 100, 560..610).await;
    assert_eq!((s.reads_pulled(), s.readers_kept()), (4, 0));
    wait_consumers(0).await;
    s.close().await;
}

/// A storage on `nats` (R1) and, over it, an [`Unreliable`] whose next `n` commits for which
/// `which` holds stop at their commit point and are answered with an error.
///
/// [`Unreliable`]: wasmq_tests::unreliable::Unreliable
async fn losing_commit_answers(
    nats: &NatsServer,
    n: u32,
    which: fn(&wasmq::storage::Commit) -> bool,
) -> (
    Arc<JetStreamStorage>,
    Arc<wasmq_tests::unreliable::Unreliable>,
) {
    let js = Arc::new(
        JetStreamStorage::connect(std::slice::from_ref(&nats.url), 1)
            .await
            .unwrap(),
    );
    let cut = js.clone();
    let storage = wasmq_tests::unreliable::Unreliable::new(js.clone(), 0, None)
        .with_lost_commit_answers(
            n,
            which,
            Arc::new(move |commit| {
                let cut = cut.clone();
                Box::pin(async move { cut.commit_dying_halfway(commit).await })
            }),
        );
    (js, Arc::new(storage))
}

/// A delivery whose exactly-once commit got past its commit point (intent and completion
/// marker stored) but whose answer was lost (the server that took it died before answering).
/// The runner tries the commit again and finds its marker: already done. It used to drop the
/// staged publish and move on; the marker went once the offset passed it, and recovery then
/// took the intent, whose guard was gone, for a commit never made and dropped it: the derived
/// message was lost. Now the already-done path finishes that commit first. Each of 3 messages
/// loses its commit answer once; every derived message is stored exactly once, also after a
/// recovery pass that takes every intent as old enough.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_whose_commit_answer_was_lost_keeps_its_derived_message() {
    const N: u32 = 3;
    let nats = NatsServer::start().await;
    let (js, storage) = losing_commit_answers(&nats, N, |commit| !commit.appends.is_empty()).await;
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_on(node_config(&nats, dir.path(), "node-a"), storage.clone()).await;
    let (st, v) = s.upload_plugin("recorder", RECORDER).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    s.create_topic("in", 1).await;
    s.create_topic("audit", 1).await;
    s.subscribe(
        "g",
        json!({"topic": "in", "plugin": "recorder", "config": {"audit": "audit"},
               "grants": {"publish": ["audit"]}, "processing_guarantee": "exactly_once"}),
    )
    .await;
    let published = s
        .publish_batch("in", (0..N).map(|i| json!({"body": {"n": i}})).collect())
        .await;
    let mut ids: Vec<String> = published["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    s.wait_until("/v1/subscriptions/g", 60, |v| {
        v["lag"] == 0 && v["in_flight"] == 0 && v["counters"]["acked"] == N
    })
    .await;
    assert_eq!(
        storage.lost_commit_answers_left(),
        0,
        "every commit answer was lost once"
    );
    let derived = |audit: Vec<serde_json::Value>| {
        let mut seen: Vec<String> = audit
            .iter()
            .map(|r| r["id"].as_str().unwrap_or_default().to_string())
            .collect();
        seen.sort();
        seen
    };
    let audit = s.wait_audit("audit", u64::from(N), 60).await;
    assert_eq!(derived(audit), ids, "one derived message per input");
    // Whatever intent is left, recovery takes as a dead writer's: nothing is stored twice
    // and nothing goes.
    js.recover(std::time::Duration::ZERO).await.unwrap();
    assert_eq!(derived(s.read_queue("audit", 0).await), ids);
    s.stop().await.unwrap();
}

/// A dead-letter step that got past its commit point (its new entry) but whose answer was
/// lost. Its retry found the entry stored, took it as done and moved on; the entry's pin and
/// the count were left to recovery, 15 s or more later. Meanwhile the cursor passed the
/// message and retention (after consumed, nothing pinned) deleted it: a dead letter whose
/// message was gone, and a count one short. Now the retry finishes that step at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_step_whose_answer_was_lost_still_holds_its_message() {
    use wasmq_tests::plugins::REJECT_ALL;
    let nats = NatsServer::start().await;
    let (_, storage) = losing_commit_answers(&nats, 1, |commit| {
        commit
            .records
            .first()
            .is_some_and(|r| r.space == "dlq/dead")
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_on(node_config(&nats, dir.path(), "node-a"), storage.clone()).await;
    let (st, v) = s.upload_plugin("reject-all", REJECT_ALL).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let (st, v) = s
        .put_json(
            "/v1/topics/events",
            &json!({"queues": 1, "retention": {"after_consumed": true, "max_age_ms": null}}),
        )
        .await;
    assert!(st.is_success(), "{st} {v}");
    s.subscribe("dead", json!({"topic": "events", "plugin": "reject-all"}))
        .await;
    s.publish_numbered("events", 1).await;
    s.wait_until("/v1/subscriptions/dead", 60, |v| {
        v["lag"] == 0 && v["in_flight"] == 0
    })
    .await;
    assert_eq!(
        storage.lost_commit_answers_left(),
        0,
        "the step's answer was lost"
    );
    let passes = metric(&s, "wasmq_retention_passes_total").await;
    let waited = std::time::Instant::now();
    while metric(&s, "wasmq_retention_passes_total").await < passes + 3 {
        assert!(
            waited.elapsed() < std::time::Duration::from_secs(60),
            "no retention pass"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (_, t) = s.get("/v1/topics/events").await;
    assert_eq!(
        t["low_water"][0], 0,
        "the dead letter holds its message: {t}"
    );
    let (_, v) = s.get("/v1/subscriptions/dead").await;
    assert_eq!(v["dlq"], 1, "{v}");
    s.stop().await.unwrap();
}

/// A transaction checker's rollback that stores the checker's kv writes with it (issue 24)
/// got past its commit point (the transaction's record, now rolled back) but its answer was
/// lost. The next check found the transaction decided and stopped; the decided-transactions
/// mover then moved the record within a second or two, as it looked for unfinished commits
/// only among committed transactions, and recovery, finding the record gone, dropped the
/// checker's kv write. Now every decided record stays until what was stored with its decision
/// is finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkers_rollback_whose_answer_was_lost_keeps_its_kv_writes() {
    use wasmq_tests::plugins::CHECKER;
    let nats = NatsServer::start().await;
    let (js, storage) = losing_commit_answers(&nats, 1, |commit| {
        commit.records.first().is_some_and(|r| r.space == "txn")
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_on(node_config(&nats, dir.path(), "node-a"), storage.clone()).await;
    let (st, v) = s.upload_plugin("body-checker", CHECKER).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let topic = json!({"queues": 1, "transaction_checker": "body-checker",
                       "transactions": {"check_after_ms": 150, "check_interval_ms": 100}});
    let (st, v) = s.put_json("/v1/topics/signups", &topic).await;
    assert!(st.is_success(), "{st} {v}");
    let (st, v) = s
        .post_json(
            "/v1/topics/signups/transactions",
            &json!({"body": "count-rollback"}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let id = v["txn_id"].as_str().unwrap().to_string();
    s.wait_until(&format!("/v1/transactions/{id}"), 60, |t| {
        t["state"] == "rolled_back"
    })
    .await;
    assert_eq!(
        storage.lost_commit_answers_left(),
        0,
        "the rollback's answer was lost"
    );
    // The record moves once recovery (the server's own, at the intent age) finished the
    // decision: the kv write is there by then.
    let waited = std::time::Instant::now();
    while js.get_record("txn", &id).await.unwrap().is_some() {
        assert!(
            waited.elapsed() < std::time::Duration::from_secs(90),
            "the rolled-back transaction never moved"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let answers = js.get_record("kv/body-checker", "answers").await.unwrap();
    assert_eq!(
        answers.map(|r| r.value),
        Some(b"1".to_vec()),
        "the checker's kv write, stored with its rollback"
    );
    s.stop().await.unwrap();
}
