//! Crash-recovery soak: rounds of start → load (publishers, plugins with random failures) →
//! SIGKILL at a random moment → restart, against the real binary; then checks that every
//! acknowledged publish is stored, every stored message was acked by the plugin or dead-lettered,
//! and (exactly-once processing, issue 24) that no effect of a plugin was repeated: the
//! recorder's audit topic holds one record per acked message, and the tally plugin (a kv
//! counter and a derived message per input, with random retries and traps after both) leaves a
//! derived topic whose counter values are exactly 1..n, one per input. Prints the counts; exits
//! non-zero when a check fails. `.ci/soak` runs it (`--quick` in CI) on RocksDB and, with
//! `--jetstream`, on a nats-server it starts. Each round publishes at most `--per-round`
//! messages (default 20 000 with `--quick`, 2 000 on JetStream).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wasmq_examples::Rng;
use wasmq_tests::ChildServer;

const QUEUES: u32 = 4;
const INSTANCES: u32 = 4;
const MAX_IN_FLIGHT: u32 = 16;
const PUBLISHERS: usize = 4;
/// The tally plugin's kv counters: each message counts on one of them at random.
const COUNTERS: u64 = 16;

struct Options {
    bin: PathBuf,
    /// Messages published at most per round.
    per_round: i64,
    /// Store on a JetStream server (started here) instead of RocksDB.
    jetstream: bool,
    rounds: u32,
    /// Longest time a round runs before its SIGKILL.
    round_ms: u64,
    seed: u64,
}

fn options() -> Result<Options, String> {
    let mut o = Options {
        bin: PathBuf::from(std::env::var("WASMQ_BIN").unwrap_or_default()),
        jetstream: false,
        per_round: 0,
        rounds: 10,
        round_ms: 8000,
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--quick" => {
                o.rounds = 3;
                o.round_ms = 2500;
            }
            "--rounds" => o.rounds = value()?.parse().map_err(|e| format!("--rounds: {e}"))?,
            "--round-ms" => {
                o.round_ms = value()?.parse().map_err(|e| format!("--round-ms: {e}"))?
            }
            "--seed" => o.seed = value()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--bin" => o.bin = PathBuf::from(value()?),
            "--jetstream" => o.jetstream = true,
            "--per-round" => {
                o.per_round = value()?.parse().map_err(|e| format!("--per-round: {e}"))?
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if o.per_round <= 0 {
        // JetStream commits take several round trips to the servers: fewer messages there.
        o.per_round = match (o.jetstream, o.rounds <= 3) {
            (false, true) => 20_000,
            (false, false) => 50_000,
            (true, true) => 2_000,
            (true, false) => 5_000,
        };
    }
    if !o.bin.is_file() {
        return Err(format!(
            "the wasmq binary {:?} does not exist (pass --bin or WASMQ_BIN)",
            o.bin
        ));
    }
    Ok(o)
}

/// What a publisher was told was stored, and what should become of it.
#[derive(Default)]
struct Acked {
    /// id → true when the body asks the plugin to reject (so it must end in the DLQ).
    ids: HashMap<String, bool>,
}

async fn publisher(
    url: String,
    acked: Arc<Mutex<Acked>>,
    seed: u64,
    budget: Arc<std::sync::atomic::AtomicI64>,
) {
    let client = reqwest::Client::new();
    let mut rng = Rng::new(seed);
    loop {
        let n = 1 + rng.below(20) as usize;
        // The round's messages are counted out: what the plugins must work off is bounded
        // by counts, not by how fast this machine publishes.
        if budget.fetch_sub(n as i64, std::sync::atomic::Ordering::Relaxed) < n as i64 {
            return;
        }
        let bodies: Vec<Value> = (0..n)
            .map(|_| match rng.below(100) {
                0..5 => json!({"reject": true, "counter": format!("c{}", rng.below(COUNTERS))}),
                5..20 => json!({"fail_attempts": 1 + rng.below(2), "counter": format!("c{}", rng.below(COUNTERS))}),
                _ => json!({"n": rng.below(1_000_000), "counter": format!("c{}", rng.below(COUNTERS))}),
            })
            .collect();
        let messages: Vec<Value> = bodies
            .iter()
            .map(|b| json!({"body": b, "sharding_key": format!("k{}", rng.below(64))}))
            .collect();
        let resp = client
            .post(format!("{url}/v1/topics/orders/messages/batch"))
            .json(&json!({ "messages": messages }))
            .send()
            .await;
        // The server died (SIGKILL): this publisher's work in this round is over.
        let Ok(resp) = resp else { return };
        if !resp.status().is_success() {
            return;
        }
        let Ok(v) = resp.json::<Value>().await else {
            return;
        };
        let mut a = acked.lock().unwrap();
        for (r, b) in v["results"].as_array().into_iter().flatten().zip(&bodies) {
            a.ids.insert(
                r["id"].as_str().unwrap_or("").to_string(),
                b["reject"] == true,
            );
        }
    }
}

async fn get(client: &reqwest::Client, url: &str) -> Value {
    client.get(url).send().await.unwrap().json().await.unwrap()
}

/// Every stored message of a topic: id → body.
async fn stored(
    client: &reqwest::Client,
    url: &str,
    topic: &str,
    queues: u32,
) -> HashMap<String, Value> {
    let mut out = HashMap::new();
    for q in 0..queues {
        let mut from = 0;
        loop {
            let page = get(
                client,
                &format!("{url}/v1/topics/{topic}/messages?queue={q}&from={from}&limit=1000"),
            )
            .await;
            let msgs = page["messages"].as_array().cloned().unwrap_or_default();
            if msgs.is_empty() {
                break;
            }
            from += msgs.len();
            for m in msgs {
                out.insert(m["id"].as_str().unwrap().to_string(), m["body"].clone());
            }
        }
    }
    out
}

async fn dead_letters(client: &reqwest::Client, url: &str) -> HashSet<String> {
    let mut out = HashSet::new();
    let mut after: Option<String> = None;
    loop {
        let mut path = format!("{url}/v1/subscriptions/soak/dlq?limit=500");
        if let Some(a) = &after {
            path.push_str(&format!("&after={a}"));
        }
        let page = get(client, &path).await;
        let entries = page["entries"].as_array().cloned().unwrap_or_default();
        if entries.is_empty() {
            return out;
        }
        for e in &entries {
            out.insert(e["message_id"].as_str().unwrap().to_string());
        }
        after = entries
            .last()
            .and_then(|e| e["key"].as_str())
            .map(str::to_string);
    }
}

async fn setup(url: &str, recorder: &str, tally: &str) {
    let client = reqwest::Client::new();
    for (topic, queues) in [("orders", QUEUES), ("audit", 1), ("derived", 1)] {
        let r = client
            .put(format!("{url}/v1/topics/{topic}"))
            .json(&json!({ "queues": queues }))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "topic {topic}: {}", r.status());
    }
    for (name, path) in [("recorder", recorder), ("tally", tally)] {
        let (st, v) = wasmq_tests::upload_plugin_to(url, name, path).await;
        assert!(st.is_success(), "upload {name}: {st} {v}");
    }
    // One counter for every message: concurrent deliveries conflict on it all the time.
    let spec = json!({
        "topic": "orders", "plugin": "tally", "instances": INSTANCES,
        "max_in_flight": MAX_IN_FLIGHT,
        "config": {"derived": "derived", "retry_percent": 15, "trap_percent": 5},
        "grants": {"publish": ["derived"]},
        "retry": {"max_attempts": 100, "backoff_ms": [10, 20]},
    });
    let r = client
        .put(format!("{url}/v1/subscriptions/tally"))
        .json(&spec)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "subscribe tally: {}", r.status());
    let spec = json!({
        "topic": "orders", "plugin": "recorder", "instances": INSTANCES,
        "max_in_flight": MAX_IN_FLIGHT,
        "config": {"audit": "audit"}, "grants": {"publish": ["audit"]},
        "retry": {"max_attempts": 4, "backoff_ms": [10, 20, 40]},
    });
    let r = client
        .put(format!("{url}/v1/subscriptions/soak"))
        .json(&spec)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "subscribe: {}", r.status());
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let o = match options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("soak: {e}");
            return ExitCode::from(2);
        }
    };
    let dir = tempfile::tempdir().unwrap();
    // JetStream: one nats-server for every round; a fixed node name, so a restarted node takes
    // its leases back at once.
    let nats = if o.jetstream {
        Some(wasmq_tests::NatsServer::start().await)
    } else {
        None
    };
    let config = dir.path().join("wasmq.toml");
    if let Some(n) = &nats {
        std::fs::write(
            &config,
            format!(
                "[server]\nnode_id = \"soak\"\n[storage]\nbackend = \"jetstream\"\nurls = [{:?}]\nreplicas = 1\n",
                n.url
            ),
        )
        .unwrap();
    } else {
        std::fs::write(&config, "").unwrap();
    }
    let config = config.display().to_string();
    let extra = ["--config", config.as_str()];
    let data = dir.path().join("data");
    let acked = Arc::new(Mutex::new(Acked::default()));
    let mut rng = Rng::new(o.seed);
    println!(
        "soak: {} seed {} rounds {} (up to {} ms and {} messages each), {PUBLISHERS} publishers, {INSTANCES} instances, max_in_flight {MAX_IN_FLIGHT}",
        if o.jetstream { "jetstream" } else { "rocksdb" },
        o.seed,
        o.rounds,
        o.round_ms,
        o.per_round
    );
    let started = Instant::now();
    for round in 0..o.rounds {
        let server = ChildServer::start(&o.bin, &data, &extra).await;
        if round == 0 {
            setup(
                &server.url,
                wasmq_tests::plugins::RECORDER,
                wasmq_tests::plugins::TALLY,
            )
            .await;
        }
        let budget = Arc::new(std::sync::atomic::AtomicI64::new(o.per_round));
        let publishers: Vec<_> = (0..PUBLISHERS)
            .map(|i| {
                tokio::spawn(publisher(
                    server.url.clone(),
                    acked.clone(),
                    o.seed ^ (((round as u64) << 8) | (i as u64 + 1)),
                    budget.clone(),
                ))
            })
            .collect();
        let kill_after = 200 + rng.below(o.round_ms.saturating_sub(200).max(1));
        tokio::time::sleep(Duration::from_millis(kill_after)).await;
        server.kill().await;
        for p in publishers {
            let _ = p.await;
        }
        println!(
            "round {round}: SIGKILL after {kill_after} ms; {} publishes acknowledged so far",
            acked.lock().unwrap().ids.len()
        );
    }

    // A last, clean run drains everything.
    let server = ChildServer::start(&o.bin, &data, &extra).await;
    let client = reqwest::Client::new();
    let acked = std::mem::take(&mut acked.lock().unwrap().ids);
    // Only a hang guard: the work is bounded by what the rounds published.
    let deadline = Instant::now() + Duration::from_secs(900);
    let (messages, audit, dead, derived) = loop {
        let messages = stored(&client, &server.url, "orders", QUEUES).await;
        let audit = stored(&client, &server.url, "audit", 1).await;
        let dead = dead_letters(&client, &server.url).await;
        let handled: HashSet<&str> = audit
            .values()
            .filter_map(|a| a["id"].as_str())
            .chain(dead.iter().map(String::as_str))
            .collect();
        let derived = stored(&client, &server.url, "derived", 1).await;
        let all_handled = messages.keys().all(|id| handled.contains(id.as_str()));
        if (all_handled && derived.len() >= messages.len()) || Instant::now() > deadline {
            break (messages, audit, dead, derived);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    let mut failures = Vec::new();
    let lost: Vec<&String> = acked
        .keys()
        .filter(|id| !messages.contains_key(*id))
        .collect();
    if !lost.is_empty() {
        failures.push(format!(
            "{} acknowledged publishes are missing, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(3)]
        ));
    }
    let mut deliveries: HashMap<&str, u32> = HashMap::new();
    for a in audit.values() {
        *deliveries
            .entry(a["id"].as_str().unwrap_or(""))
            .or_default() += 1;
    }
    let unhandled: Vec<&String> = messages
        .keys()
        .filter(|id| !deliveries.contains_key(id.as_str()) && !dead.contains(*id))
        .collect();
    if !unhandled.is_empty() {
        failures.push(format!(
            "{} stored messages were neither acked nor dead-lettered, e.g. {:?}",
            unhandled.len(),
            &unhandled[..unhandled.len().min(3)]
        ));
    }
    let misfiled: Vec<&String> = messages
        .iter()
        .filter(|(id, body)| {
            let must_reject = body["reject"] == true;
            must_reject != dead.contains(*id)
                || (must_reject && deliveries.contains_key(id.as_str()))
        })
        .map(|(id, _)| id)
        .collect();
    if !misfiled.is_empty() {
        failures.push(format!(
            "{} messages ended on the wrong side (acked vs dead-lettered), e.g. {:?}",
            misfiled.len(),
            &misfiled[..misfiled.len().min(3)]
        ));
    }
    // The recorder publishes its audit record as it acks: exactly once per message, however
    // often it crashed mid-way.
    let repeats: u32 = deliveries.values().map(|n| n - 1).sum();
    if repeats > 0 {
        failures.push(format!(
            "{repeats} audit records repeat a message (a publish of a delivery stored twice)"
        ));
    }
    // The tally plugin: one derived message per input, and each counter's values 1..n.
    let mut inputs: HashMap<&str, u32> = HashMap::new();
    let mut by_counter: HashMap<&str, Vec<u64>> = HashMap::new();
    for d in derived.values() {
        *inputs.entry(d["input"].as_str().unwrap_or("")).or_default() += 1;
        by_counter
            .entry(d["counter"].as_str().unwrap_or(""))
            .or_default()
            .push(d["value"].as_u64().unwrap_or(0));
    }
    let twice = inputs.values().filter(|n| **n > 1).count();
    let missing_derived = messages
        .keys()
        .filter(|id| !inputs.contains_key(id.as_str()))
        .count();
    let strangers = inputs
        .keys()
        .filter(|id| !messages.contains_key(**id))
        .count();
    if twice > 0 || missing_derived > 0 || strangers > 0 {
        failures.push(format!(
            "derived topic: {twice} inputs derived more than once, {missing_derived} inputs not derived, {strangers} derived from no stored input"
        ));
    }
    for (counter, values) in &mut by_counter {
        values.sort_unstable();
        let expected: Vec<u64> = (1..=values.len() as u64).collect();
        if *values != expected {
            let first_bad = values
                .iter()
                .zip(&expected)
                .find(|(v, e)| v != e)
                .map(|(v, e)| format!("value {v} where {e} belongs"));
            failures.push(format!(
                "kv counter {counter}'s values are not 1..{}: {} (an increment lost or counted twice)",
                values.len(),
                first_bad.unwrap_or_else(|| "lengths differ".into())
            ));
        }
    }
    server.kill().await;

    println!("| measure | count |");
    println!("|---|---|");
    println!("| crash rounds | {} |", o.rounds);
    println!("| publishes acknowledged | {} |", acked.len());
    println!(
        "| messages stored (incl. unacknowledged writes that landed) | {} |",
        messages.len()
    );
    println!("| acknowledged but missing | {} |", lost.len());
    println!("| acked by the plugin (unique) | {} |", deliveries.len());
    println!("| dead-lettered | {} |", dead.len());
    println!("| neither | {} |", unhandled.len());
    println!("| repeated audit records (exactly-once publish) | {repeats} |");
    println!("| derived messages (tally) | {} |", derived.len());
    println!(
        "| tally counters (their values checked 1..n each) | {} |",
        by_counter.len()
    );
    println!("| time | {:.1} s |", started.elapsed().as_secs_f64());
    if failures.is_empty() {
        println!("soak: OK");
        ExitCode::SUCCESS
    } else {
        for f in &failures {
            eprintln!("soak: FAILED: {f}");
        }
        ExitCode::FAILURE
    }
}
