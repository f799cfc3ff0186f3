//! Scenario 3, ordered delivery: create/update/delete events of 1 000 users, sharded by user
//! id, applied in order by a plugin that keeps profiles in kv; the final state must equal the
//! source of truth. Also a one-queue topic for global order.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Map, Value, json};

use crate::{Ctx, PluginDir, Rng};

pub struct Report {
    pub users: usize,
    pub events: usize,
    pub mismatches: usize,
    pub global_events: usize,
    pub global_in_order: bool,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "ordered-profile: {} events for {} users over 8 queues, applied by an ordered subscription",
            self.events, self.users
        )?;
        writeln!(
            f,
            "  users whose final profile differs from the source of truth: {}",
            self.mismatches
        )?;
        write!(
            f,
            "  global order (one queue, {} events) preserved end to end: {}",
            self.global_events, self.global_in_order
        )
    }
}

/// Generates events and the state they must lead to.
fn events(users: usize, rounds: usize) -> (Vec<Value>, BTreeMap<String, Value>) {
    let mut rng = Rng::new(42);
    let mut truth: BTreeMap<String, Option<Map<String, Value>>> = BTreeMap::new();
    let mut out = Vec::new();
    for seq in 0..(users * rounds) as u64 {
        // Every user is created first, then changes hit random users.
        let user = if (seq as usize) < users {
            format!("user-{seq}")
        } else {
            format!("user-{}", rng.below(users as u64))
        };
        let current = truth.get(&user).cloned().flatten();
        let (op, profile) = match (current.is_some(), rng.below(10)) {
            (false, _) => ("create", json!({"name": format!("{user}"), "v": seq})),
            (true, 0) => ("delete", json!({})),
            (true, _) => (
                "update",
                json!({"v": seq, "city": format!("c{}", rng.below(20))}),
            ),
        };
        let Value::Object(p) = profile else { continue };
        let next = match op {
            "create" => Some(p.clone()),
            "delete" => None,
            _ => current.map(|mut c| {
                c.extend(p.clone());
                c
            }),
        };
        truth.insert(user.clone(), next);
        out.push(json!({"body": {"op": op, "user": user, "profile": p, "seq": seq}, "sharding_key": user}));
    }
    let truth = truth
        .into_iter()
        .map(|(u, p)| (u, p.map(Value::Object).unwrap_or(Value::Null)))
        .collect();
    (out, truth)
}

pub async fn run(ctx: &Ctx, plugins: &PluginDir, users: usize) -> anyhow::Result<Report> {
    ctx.put("/v1/topics/profiles", &json!({"queues": 8}))
        .await?;
    ctx.put("/v1/topics/profile-state", &json!({"queues": 8}))
        .await?;
    ctx.put("/v1/topics/global-log", &json!({"queues": 1}))
        .await?;
    ctx.put("/v1/topics/global-state", &json!({"queues": 1}))
        .await?;
    ctx.upload("profile-store", &plugins.path("profile-store"))
        .await?;
    let sub = |topic: &str, output: &str| {
        json!({"topic": topic, "plugin": "profile-store", "ordered": true, "instances": 4,
               "retry": {"max_attempts": 16, "backoff_ms": [50]},
               "config": {"output": output}, "grants": {"publish": [output]}})
    };
    ctx.put(
        "/v1/subscriptions/profile-apply",
        &sub("profiles", "profile-state"),
    )
    .await?;
    ctx.put(
        "/v1/subscriptions/global-apply",
        &sub("global-log", "global-state"),
    )
    .await?;
    let (evs, truth) = events(users, 5);
    let events_n = evs.len();
    ctx.publish_all("profiles", evs).await?;
    // Global order: one queue, creates of distinct users, sequence numbers in publish order.
    let global: Vec<Value> = (0..500u64)
        .map(|seq| json!({"body": {"op": "create", "user": format!("g{seq}"), "profile": {}, "seq": seq}}))
        .collect();
    ctx.publish_all("global-log", global).await?;
    for group in ["profile-apply", "global-apply"] {
        ctx.wait_sub(
            group,
            Duration::from_secs(120),
            Duration::from_secs(3600),
            |_| {},
            |st| st["lag"] == 0 && st["in_flight"] == 0,
        )
        .await?;
    }
    let mut last: BTreeMap<String, Value> = BTreeMap::new();
    for queue in ctx.read_topic("profile-state").await? {
        for change in queue {
            last.insert(
                change["user"].as_str().unwrap_or_default().to_string(),
                change["profile"].clone(),
            );
        }
    }
    let mismatches = truth
        .iter()
        .filter(|(u, p)| last.get(*u) != Some(p))
        .count();
    let seqs: Vec<u64> = ctx
        .read_topic("global-state")
        .await?
        .concat()
        .iter()
        .filter_map(|c| c["seq"].as_u64())
        .collect();
    let global_in_order = seqs == (0..500).collect::<Vec<u64>>();
    Ok(Report {
        users: truth.len(),
        events: events_n,
        mismatches,
        global_events: seqs.len(),
        global_in_order,
    })
}
