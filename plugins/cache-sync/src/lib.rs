//! A local price cache per instance (the price-sync scenario): every broadcast instance gets
//! every update and keeps its own table in memory. `{"sku","price","seq"}` updates it (an
//! older `seq` never overwrites a newer one); `{"snapshot": true}` publishes the instance's
//! table to the config's `report` topic. For the demo of a failing node, config
//! `fail_instance`/`fail_attempts`/`fail_below_seq` make one instance fail the first attempts
//! of the early updates.

use std::cell::RefCell;
use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::json;
use wasmq_guest_sdk::{Consumer, Message, MessageExt, Outcome, context, publish};

#[derive(Deserialize)]
struct Config {
    report: String,
    #[serde(default)]
    fail_instance: Option<u32>,
    #[serde(default)]
    fail_attempts: u32,
    /// Only updates with a lower `seq` fail: the instance is down "for a while".
    #[serde(default)]
    fail_below_seq: u64,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Update {
    Price { sku: String, price: f64, seq: u64 },
    Snapshot { snapshot: bool },
}

thread_local! {
    static PRICES: RefCell<BTreeMap<String, (f64, u64)>> = const { RefCell::new(BTreeMap::new()) };
}

pub struct CacheSync;

impl Consumer for CacheSync {
    fn handle(message: Message) -> Outcome {
        let Ok(config) = context::config::<Config>() else {
            return Outcome::Reject("config needs a report topic".into());
        };
        let me = context::identity().instance_index;
        match message.json::<Update>() {
            Ok(Update::Price { sku, price, seq }) => {
                if config.fail_instance == Some(me)
                    && seq < config.fail_below_seq
                    && message.attempt <= config.fail_attempts
                {
                    return Outcome::Retry(0);
                }
                PRICES.with(|p| {
                    let mut p = p.borrow_mut();
                    if p.get(&sku).is_none_or(|(_, s)| *s < seq) {
                        p.insert(sku, (price, seq));
                    }
                });
                Outcome::Ack
            }
            Ok(Update::Snapshot { snapshot: true }) => {
                let table: BTreeMap<String, f64> = PRICES.with(|p| {
                    p.borrow()
                        .iter()
                        .map(|(k, (v, _))| (k.clone(), *v))
                        .collect()
                });
                match publish::send_json(&config.report, &json!({"instance": me, "prices": table}))
                {
                    Ok(_) => Outcome::Ack,
                    Err(_) => Outcome::Retry(0),
                }
            }
            Ok(Update::Snapshot { snapshot: false }) => Outcome::Ack,
            Err(e) => Outcome::Reject(format!("not a price update: {e}")),
        }
    }
}

wasmq_guest_sdk::export!(CacheSync);
