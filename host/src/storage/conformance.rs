//! The storage conformance suite: what every backend must do, whatever it is built on. RocksDB
//! runs it in its unit tests, JetStream in `tests/tests/jetstream.rs` against real nats-servers.
//! Each check gets an `open` that returns a fresh handle onto the same durable state (a reopen
//! after `close`), so recovery is part of the contract.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use super::{
    BodyKind, Commit, Expect, NewMessage, QueueLimits, Record, RecordCheck, RecordWrite, Storage,
    StorageError,
};

/// Opens the backend under test onto the same durable state each time.
pub type Open = dyn Fn() -> Pin<Box<dyn Future<Output = Arc<dyn Storage>> + Send>> + Send + Sync;

/// Runs every check, in order.
pub async fn run_all(open: &Open) {
    append_read_lookup_and_recover(open).await;
    records_compare_and_set(open).await;
    guarded_append_writes_messages_and_record_together_or_not_at_all(open).await;
    commit_writes_everything_or_nothing(open).await;
    concurrent_appends_get_dense_offsets(open).await;
    blobs_watch_and_odd_names(open).await;
    truncate_deletes_a_range_and_never_reuses_offsets(open).await;
    size_limit_keeps_each_queue_within_its_bytes(open).await;
    deleting_records_before_a_key_keeps_the_rest_and_other_spaces(open).await;
    ordered_writes_land_in_order_and_stop_at_the_first_refused_one(open).await;
    ids_that_carry_their_queue_are_found_until_their_range_goes(open).await;
}

pub fn msg(queue: u32, key: Option<&str>, body: &str) -> NewMessage {
    NewMessage {
        id: uuid::Uuid::now_v7(),
        queue,
        key: key.map(String::from),
        tag: Some("t".into()),
        sharding_key: None,
        properties: [("a".to_string(), "b".to_string())].into(),
        body_kind: BodyKind::Json,
        body: body.as_bytes().to_vec(),
        born_at: 1,
        deliver_at: 1,
    }
}

pub async fn append_read_lookup_and_recover(open: &Open) {
    let s = open().await;
    let sent = vec![
        msg(0, Some("k1"), "1"),
        msg(1, None, "2"),
        msg(0, Some("k1"), "3"),
    ];
    let out = s.append("orders", sent.clone()).await.unwrap();
    assert_eq!(
        out.iter().map(|a| (a.queue, a.offset)).collect::<Vec<_>>(),
        vec![(0, 0), (1, 0), (0, 1)]
    );
    let ids = out.iter().map(|a| a.id).collect::<Vec<_>>();
    // A topic whose name is a prefix of another's must not share its queues.
    s.append("orders2", vec![msg(0, Some("k1"), "x")])
        .await
        .unwrap();
    s.close().await;
    assert!(matches!(
        s.append("orders", vec![msg(0, None, "late")]).await,
        Err(StorageError::Closed)
    ));
    drop(s);

    let s = open().await;
    assert_eq!(s.high_water("orders", 0).await.unwrap(), 2);
    assert_eq!(s.high_water("orders", 1).await.unwrap(), 1);
    assert_eq!(s.high_water("orders2", 0).await.unwrap(), 1);
    assert_eq!(s.high_water("nope", 0).await.unwrap(), 0);
    let q0 = s.read("orders", 0, 0, 10).await.unwrap();
    assert_eq!(q0.len(), 2);
    // Everything comes back as it was given.
    assert_eq!(q0[1].message, sent[2]);
    assert_eq!((q0[1].topic.as_str(), q0[1].offset), ("orders", 1));
    assert_eq!(s.read("orders", 0, 1, 10).await.unwrap().len(), 1);
    assert_eq!(s.read("orders", 0, 0, 1).await.unwrap().len(), 1);
    assert!(s.read("orders", 0, 2, 10).await.unwrap().is_empty());
    assert!(s.read("nope", 3, 0, 10).await.unwrap().is_empty());
    let m = s.message_by_id(ids[1]).await.unwrap().unwrap();
    assert_eq!(
        (m.topic.as_str(), m.message.queue, m.offset),
        ("orders", 1, 0)
    );
    let by_key = s.messages_by_key("orders", "k1", 10).await.unwrap();
    assert_eq!(by_key.iter().map(|m| m.offset).collect::<Vec<_>>(), [0, 1]);
    assert_eq!(s.messages_by_key("orders", "k1", 1).await.unwrap().len(), 1);
    assert!(
        s.messages_by_key("orders", "k2", 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        s.message_by_id(uuid::Uuid::now_v7())
            .await
            .unwrap()
            .is_none()
    );
    let next = s.append("orders", vec![msg(0, None, "4")]).await.unwrap();
    assert_eq!(next[0].offset, 2);
    s.close().await;
}

pub async fn records_compare_and_set(open: &Open) {
    let s = open().await;
    let r1 = s
        .put_record("topic", "a", Some(b"1".to_vec()), Expect::Absent)
        .await
        .unwrap();
    assert!(matches!(
        s.put_record("topic", "a", Some(b"x".to_vec()), Expect::Absent)
            .await,
        Err(StorageError::Conflict { .. })
    ));
    let r2 = s
        .put_record("topic", "a", Some(b"2".to_vec()), Expect::Revision(r1))
        .await
        .unwrap();
    assert!(r2 > r1);
    assert!(matches!(
        s.put_record("topic", "a", Some(b"3".to_vec()), Expect::Revision(r1))
            .await,
        Err(StorageError::Conflict { .. })
    ));
    s.put_record("topic", "b", Some(b"b".to_vec()), Expect::Any)
        .await
        .unwrap();
    s.put_record("topicz", "a", Some(b"z".to_vec()), Expect::Any)
        .await
        .unwrap();
    let all = s.list_records("topic", "", 100).await.unwrap();
    assert_eq!(
        all.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert_eq!(all[0].1.value, b"2");
    assert_eq!(all[0].1.revision, r2);
    assert_eq!(s.list_records("topic", "b", 100).await.unwrap().len(), 1);
    assert_eq!(s.list_records("topic", "", 1).await.unwrap().len(), 1);
    // Paging: after a key, within the prefix and the space, at most `limit`.
    let keys = |v: Vec<(String, Record)>| v.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
    let after = |a: &'static str, p: &'static str, n: usize| {
        let s = s.clone();
        async move { keys(s.list_records_after("topic", p, a, n).await.unwrap()) }
    };
    assert_eq!(after("", "", 100).await, ["a", "b"]);
    assert_eq!(after("a", "", 100).await, ["b"]);
    assert_eq!(after("", "", 1).await, ["a"]);
    assert_eq!(after("b", "", 100).await, Vec::<String>::new());
    assert_eq!(after("0", "b", 100).await, ["b"]);
    assert_eq!(after("aa", "", 100).await, ["b"], "a key between two");
    s.put_record("topic", "b", None, Expect::Any).await.unwrap();
    assert!(s.get_record("topic", "b").await.unwrap().is_none());
    assert_eq!(s.list_records("topic", "", 100).await.unwrap().len(), 1);
    // A deleted record can be created again; a delete can be conditional too.
    let r = s
        .put_record("topic", "b", Some(b"b2".to_vec()), Expect::Absent)
        .await
        .unwrap();
    assert!(matches!(
        s.put_record("topic", "b", None, Expect::Revision(r + 1000))
            .await,
        Err(StorageError::Conflict { .. })
    ));
    s.put_record("topic", "b", None, Expect::Revision(r))
        .await
        .unwrap();
    assert!(s.get_record("topic", "b").await.unwrap().is_none());
    // Revisions keep growing across a restart, so a stale revision can never match again.
    s.close().await;
    drop(s);
    let s = open().await;
    assert_eq!(
        s.get_record("topic", "a").await.unwrap().unwrap().revision,
        r2
    );
    let r3 = s
        .put_record("topic", "c", Some(b"c".to_vec()), Expect::Absent)
        .await
        .unwrap();
    assert!(r3 > r);
    s.close().await;
}

pub async fn guarded_append_writes_messages_and_record_together_or_not_at_all(open: &Open) {
    let s = open().await;
    let rev = s
        .put_record("txn", "t1", Some(b"pending".to_vec()), Expect::Absent)
        .await
        .unwrap();
    let guard = |expect| RecordWrite {
        space: "txn".into(),
        key: "t1".into(),
        value: Some(b"committed".to_vec()),
        expect,
    };
    let stale = s
        .append_guarded(
            "t",
            vec![msg(0, None, "a")],
            guard(Expect::Revision(rev + 100)),
        )
        .await;
    assert!(matches!(stale, Err(StorageError::Conflict { .. })));
    assert_eq!(
        s.high_water("t", 0).await.unwrap(),
        0,
        "a failed guard must not append"
    );
    let (appended, new_rev) = s
        .append_guarded("t", vec![msg(0, None, "a")], guard(Expect::Revision(rev)))
        .await
        .unwrap();
    assert_eq!(appended[0].offset, 0);
    assert!(new_rev > rev);
    assert_eq!(
        s.get_record("txn", "t1").await.unwrap().unwrap().value,
        b"committed"
    );
    // The same guard again is stale now: exactly one of two racing commits wins.
    assert!(
        s.append_guarded("t", vec![msg(0, None, "b")], guard(Expect::Revision(rev)))
            .await
            .is_err()
    );
    assert_eq!(s.high_water("t", 0).await.unwrap(), 1);
    assert_eq!(s.read("t", 0, 0, 10).await.unwrap()[0].message.body, b"a");
    s.close().await;
}

/// A delivery's commit (issue 24): a completion marker, kv writes under the revisions read, a
/// checked read and messages on two topics land together, or nothing does when any condition
/// fails; a second commit of the same delivery fails on its marker.
pub async fn commit_writes_everything_or_nothing(open: &Open) {
    let s = open().await;
    let counter = s
        .put_record("kv", "counter", Some(b"1".to_vec()), Expect::Any)
        .await
        .unwrap();
    let config = s
        .put_record("kv", "config", Some(b"c".to_vec()), Expect::Any)
        .await
        .unwrap();
    let timer = s
        .put_record("timer", "t1", Some(b"due".to_vec()), Expect::Any)
        .await
        .unwrap();
    let write = |space: &str, key: &str, value: Option<&str>, expect| RecordWrite {
        space: space.into(),
        key: key.into(),
        value: value.map(|v| v.as_bytes().to_vec()),
        expect,
    };
    let commit = |counter_rev, config_rev| Commit {
        checks: vec![RecordCheck {
            space: "kv".into(),
            key: "config".into(),
            expect: Expect::Revision(config_rev),
        }],
        records: vec![
            write("done", "m1", Some(""), Expect::Absent),
            write("kv", "counter", Some("2"), Expect::Revision(counter_rev)),
            write("kv", "new", Some("n"), Expect::Absent),
            write("timer", "t1", None, Expect::Present),
        ],
        appends: vec![
            ("derived", vec![msg(0, None, "d1"), msg(0, None, "d2")]),
            ("audit", vec![msg(0, None, "a1")]),
        ]
        .into_iter()
        .map(|(t, m)| (t.to_string(), m))
        .collect(),
    };
    let nothing_written = |why: &'static str| {
        let s = s.clone();
        async move {
            assert_eq!(s.high_water("derived", 0).await.unwrap(), 0, "{why}");
            assert_eq!(s.high_water("audit", 0).await.unwrap(), 0, "{why}");
            assert!(s.get_record("done", "m1").await.unwrap().is_none(), "{why}");
            assert!(s.get_record("kv", "new").await.unwrap().is_none(), "{why}");
            assert!(
                s.get_record("timer", "t1").await.unwrap().is_some(),
                "{why}"
            );
            assert_eq!(
                s.get_record("kv", "counter").await.unwrap().unwrap().value,
                b"1",
                "{why}"
            );
        }
    };
    // A key the call wrote changed under it; then one it only read.
    for (c, why) in [
        (commit(counter + 100, config), "a stale write"),
        (commit(counter, config + 100), "a stale read"),
    ] {
        assert!(
            matches!(s.commit(c).await, Err(StorageError::Conflict { .. })),
            "{why}"
        );
        nothing_written(why).await;
    }
    let done = s.commit(commit(counter, config)).await.unwrap();
    assert_eq!(done.appended.len(), 3);
    assert_eq!(done.revisions.len(), 4);
    assert_eq!(done.revisions[3], 0, "a delete has no revision");
    assert_eq!(
        s.get_record("kv", "counter").await.unwrap().unwrap().value,
        b"2"
    );
    assert_eq!(
        s.get_record("kv", "new").await.unwrap().unwrap().value,
        b"n"
    );
    assert!(s.get_record("timer", "t1").await.unwrap().is_none());
    assert!(s.get_record("done", "m1").await.unwrap().is_some());
    let bodies = |topic: &'static str| {
        let s = s.clone();
        async move {
            s.read(topic, 0, 0, 10)
                .await
                .unwrap()
                .into_iter()
                .map(|m| String::from_utf8(m.message.body).unwrap())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(bodies("derived").await, ["d1", "d2"]);
    assert_eq!(bodies("audit").await, ["a1"]);
    let _ = timer;
    // The same delivery again: its marker exists, nothing more is written.
    let again = s.commit(commit(done.revisions[1], config)).await;
    assert!(
        matches!(&again, Err(StorageError::Conflict { space, key }) if space == "done" && key == "m1"),
        "{again:?}"
    );
    assert_eq!(s.high_water("derived", 0).await.unwrap(), 2);
    s.close().await;
}

pub async fn concurrent_appends_get_dense_offsets(open: &Open) {
    let s = open().await;
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut offs = Vec::new();
            for _ in 0..25 {
                offs.push(s.append("dense", vec![msg(0, None, "x")]).await.unwrap()[0].offset);
            }
            offs
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_unstable();
    assert_eq!(all, (0..400).collect::<Vec<u64>>());
    assert_eq!(s.read("dense", 0, 0, 1000).await.unwrap().len(), 400);
    s.close().await;
}

pub async fn blobs_watch_and_odd_names(open: &Open) {
    let s = open().await;
    // Plugin components from Python toolchains are tens of MB.
    let big: Vec<u8> = (0..20u32 << 20).map(|i| (i % 251) as u8).collect();
    s.put_blob("plugin/py/1", Some(big.clone())).await.unwrap();
    s.put_blob("plugin/rs/1", Some(b"small".to_vec()))
        .await
        .unwrap();
    assert_eq!(s.get_blob("plugin/py/1").await.unwrap().unwrap(), big);
    s.put_blob("plugin/rs/1", None).await.unwrap();
    assert!(s.get_blob("plugin/rs/1").await.unwrap().is_none());
    assert!(s.get_blob("never").await.unwrap().is_none());

    // Appends wake watchers of their topic.
    let mut w = s.watch("watched");
    s.append("watched", vec![msg(0, None, "x")]).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), w.changed())
        .await
        .expect("no wake-up after an append")
        .unwrap();

    // Names with characters backends may reserve.
    let odd = "a.b c/d*e>f=g:ü";
    s.append(odd, vec![msg(0, Some(odd), "o")]).await.unwrap();
    assert_eq!(s.read(odd, 0, 0, 10).await.unwrap()[0].topic, odd);
    assert_eq!(s.messages_by_key(odd, odd, 10).await.unwrap().len(), 1);
    s.put_record(odd, odd, Some(b"v".to_vec()), Expect::Absent)
        .await
        .unwrap();
    s.put_record(odd, "", Some(b"empty".to_vec()), Expect::Absent)
        .await
        .unwrap();
    let listed = s.list_records(odd, "", 10).await.unwrap();
    assert_eq!(
        listed.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        ["", odd]
    );
    assert_eq!(s.list_records(odd, "a.b", 10).await.unwrap().len(), 1);
    s.close().await;
}

pub async fn truncate_deletes_a_range_and_never_reuses_offsets(open: &Open) {
    let s = open().await;
    let (topic, other) = ("retained", "retained2");
    let sent: Vec<_> = (0..10)
        .map(|i| msg(0, Some(&format!("k{i}")), &i.to_string()))
        .collect();
    let ids: Vec<_> = s
        .append(topic, sent)
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.id)
        .collect();
    s.append(topic, vec![msg(1, None, "q1")]).await.unwrap();
    s.append(other, vec![msg(0, None, "o")]).await.unwrap();
    assert_eq!(s.low_water(topic, 0).await.unwrap(), 0);

    assert_eq!(s.truncate(topic, 0, 4).await.unwrap(), 4);
    assert_eq!(s.low_water(topic, 0).await.unwrap(), 4);
    assert_eq!(s.high_water(topic, 0).await.unwrap(), 10);
    // A read from below the low water starts at it; lookups miss what was deleted.
    let read = s.read(topic, 0, 0, 100).await.unwrap();
    assert_eq!(
        read.iter().map(|m| m.offset).collect::<Vec<_>>(),
        (4..10).collect::<Vec<_>>()
    );
    assert!(s.message_by_id(ids[3]).await.unwrap().is_none());
    assert_eq!(s.message_by_id(ids[4]).await.unwrap().unwrap().offset, 4);
    assert!(s.messages_by_key(topic, "k2", 10).await.unwrap().is_empty());
    assert_eq!(s.messages_by_key(topic, "k7", 10).await.unwrap().len(), 1);
    // Other queues and topics are untouched; a lower cut changes nothing.
    assert_eq!(s.read(topic, 1, 0, 10).await.unwrap().len(), 1);
    assert_eq!(s.read(other, 0, 0, 10).await.unwrap().len(), 1);
    assert_eq!(s.truncate(topic, 0, 2).await.unwrap(), 4);

    // Everything, and more than there is: capped at the high water, which stays.
    assert_eq!(s.truncate(topic, 0, u64::MAX).await.unwrap(), 10);
    assert!(s.read(topic, 0, 0, 100).await.unwrap().is_empty());
    s.close().await;
    drop(s);

    // After a restart the emptied queue keeps its offsets: the next append gets 10.
    let s = open().await;
    assert_eq!(s.low_water(topic, 0).await.unwrap(), 10);
    assert_eq!(s.high_water(topic, 0).await.unwrap(), 10);
    let next = s.append(topic, vec![msg(0, None, "after")]).await.unwrap();
    assert_eq!(next[0].offset, 10);
    let read = s.read(topic, 0, 0, 100).await.unwrap();
    assert_eq!(read.iter().map(|m| m.offset).collect::<Vec<_>>(), vec![10]);
    assert_eq!(s.truncate("never-written", 0, 5).await.unwrap(), 0);
    s.close().await;
}

/// A queue's stored bytes follow appends and truncations (and survive a restart), and a size
/// limit keeps each queue at most that big once applied: by the backend itself, or by cutting
/// where [`Storage::retention_cut`] says.
pub async fn size_limit_keeps_each_queue_within_its_bytes(open: &Open) {
    const LIMIT: u64 = 16 * 1024;
    let s = open().await;
    let topic = "sized";
    let limits = QueueLimits {
        max_age_ms: None,
        max_bytes: Some(LIMIT),
    };
    s.prepare_topic(topic, 2, limits).await.unwrap();
    s.append(topic, vec![msg(1, None, "small")]).await.unwrap();
    let small = s.extent(topic, 1).await.unwrap();
    assert_eq!((small.low_water, small.high_water), (0, 1));
    assert!(small.bytes > 5 && small.bytes < 1000, "{small:?}");
    let body = "x".repeat(1000);
    for _ in 0..10 {
        s.append(topic, (0..10).map(|_| msg(0, None, &body)).collect())
            .await
            .unwrap();
    }
    let now = crate::base::now_ms();
    let cut = s.retention_cut(topic, 0, limits, now).await.unwrap();
    s.truncate(topic, 0, cut).await.unwrap();
    let e = s.extent(topic, 0).await.unwrap();
    assert_eq!(e.high_water, 100);
    assert!(e.low_water > 0 && e.low_water < 100, "{e:?}");
    // At most the limit, and not less than one message below it.
    assert!(e.bytes <= LIMIT && e.bytes > LIMIT - 2_000, "{e:?}");
    let read = s.read(topic, 0, 0, 200).await.unwrap();
    assert_eq!(read.first().map(|m| m.offset), Some(e.low_water));
    assert_eq!(read.len() as u64, e.high_water - e.low_water);
    // The limit is per queue: the small one is untouched, and a second cut changes nothing.
    assert_eq!(s.extent(topic, 1).await.unwrap(), small);
    let again = s.retention_cut(topic, 0, limits, now).await.unwrap();
    assert_eq!(s.truncate(topic, 0, again).await.unwrap(), e.low_water);
    s.close().await;
    drop(s);
    let s = open().await;
    assert_eq!(s.extent(topic, 0).await.unwrap(), e);
    // Without limits nothing is cut.
    let none = s
        .retention_cut(topic, 0, QueueLimits::default(), now)
        .await
        .unwrap();
    assert_eq!(none, e.low_water);
    s.close().await;
}

/// `delete_records_before` deletes one space's keys below the cut (more than a page of them),
/// keeps the key at the cut and after it, neighbouring spaces whose names extend this one's,
/// and what a restart reads back.
pub async fn deleting_records_before_a_key_keeps_the_rest_and_other_spaces(open: &Open) {
    let s = open().await;
    let keys: Vec<String> = (0..1100).map(|i| format!("{i:06}/x")).collect();
    let writes = |space: &str| -> Vec<RecordWrite> {
        keys.iter()
            .map(|k| RecordWrite {
                space: space.into(),
                key: k.clone(),
                value: Some(b"v".to_vec()),
                expect: Expect::Any,
            })
            .collect()
    };
    for chunk in writes("span").chunks(256) {
        s.put_records(chunk.to_vec()).await.unwrap();
    }
    s.put_records(writes("spanner")[..3].to_vec())
        .await
        .unwrap();
    s.delete_records_before("span", "001050").await.unwrap();
    let left = s.list_records("span", "", usize::MAX).await.unwrap();
    let left: Vec<&str> = left.iter().map(|(k, _)| k.as_str()).collect();
    let want: Vec<&str> = keys[1050..].iter().map(String::as_str).collect();
    assert_eq!(left, want);
    assert_eq!(s.list_records("spanner", "", 10).await.unwrap().len(), 3);
    // Nothing below the first key: nothing goes.
    s.delete_records_before("span", "000000").await.unwrap();
    s.close().await;
    drop(s);
    let s = open().await;
    assert_eq!(
        s.list_records("span", "", usize::MAX).await.unwrap().len(),
        50
    );
    assert!(s.get_record("span", "001049/x").await.unwrap().is_none());
    assert!(s.get_record("span", "001050/x").await.unwrap().is_some());
    s.close().await;
}

pub async fn ordered_writes_land_in_order_and_stop_at_the_first_refused_one(open: &Open) {
    let s = open().await;
    let w = |key: &str, value: Option<&str>, expect: Expect| RecordWrite {
        space: "ord".into(),
        key: key.into(),
        value: value.map(|v| v.as_bytes().to_vec()),
        expect,
    };
    // A later write of a key wins over an earlier one.
    s.put_records_in_order(vec![
        w("x", Some("1"), Expect::Any),
        w("y", Some("2"), Expect::Any),
        w("x", None, Expect::Any),
    ])
    .await
    .unwrap();
    assert!(s.get_record("ord", "x").await.unwrap().is_none());
    assert_eq!(s.get_record("ord", "y").await.unwrap().unwrap().value, b"2");
    // A refused write: its error, and nothing after it is written.
    let e = s
        .put_records_in_order(vec![
            w("a", Some("1"), Expect::Any),
            w("y", Some("3"), Expect::Absent),
            w("c", Some("1"), Expect::Any),
        ])
        .await
        .unwrap_err();
    assert!(
        matches!(&e, StorageError::Conflict { space, key } if space == "ord" && key == "y"),
        "{e:?}"
    );
    assert!(s.get_record("ord", "c").await.unwrap().is_none());
    assert_eq!(s.get_record("ord", "y").await.unwrap().unwrap().value, b"2");
    s.close().await;
}

pub async fn ids_that_carry_their_queue_are_found_until_their_range_goes(open: &Open) {
    let s = open().await;
    let mut sent = Vec::new();
    for (i, queue) in [1u32, 1, 0].into_iter().enumerate() {
        let mut m = msg(queue, Some("shared"), &format!("body {i}"));
        m.id = super::message_id_for("located", queue);
        assert!(super::id_locates(&m.id, "located", queue));
        assert!(!super::id_locates(&m.id, "located-not", queue));
        sent.push(m.id);
        s.append("located", vec![m]).await.unwrap();
    }
    for id in &sent {
        let found = s.message_by_id(*id).await.unwrap().unwrap();
        assert_eq!((found.topic.as_str(), found.message.id), ("located", *id));
    }
    let keyed = s.messages_by_key("located", "shared", 10).await.unwrap();
    assert_eq!(keyed.len(), 3, "{keyed:?}");
    // A key only in queue 2 of a topic whose queues 0 and 1 have none is found too.
    for (queue, key) in [(0, None), (2, Some("late")), (1, None)] {
        let mut m = msg(queue, key, "gap");
        m.id = super::message_id_for("gap", queue);
        s.append("gap", vec![m]).await.unwrap();
    }
    let keyed = s.messages_by_key("gap", "late", 10).await.unwrap();
    assert_eq!(
        keyed.iter().map(|m| m.message.queue).collect::<Vec<_>>(),
        [2]
    );
    // Queue 1 loses its first message: its id and key entries stop answering.
    s.truncate("located", 1, 1).await.unwrap();
    s.close().await;
    drop(s);
    let s = open().await;
    assert!(s.message_by_id(sent[0]).await.unwrap().is_none());
    assert!(s.message_by_id(sent[1]).await.unwrap().is_some());
    let keyed = s.messages_by_key("located", "shared", 10).await.unwrap();
    assert_eq!(keyed.len(), 2, "{keyed:?}");
    s.close().await;
}
