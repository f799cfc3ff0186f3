//! The seed scenarios end to end, with the real server, real plugins and real SMTP/HTTP peers,
//! asserting what each scenario promises.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use wasmq_examples::peers::{HttpPeer, SmtpServer};
use wasmq_examples::{Ctx, PluginDir, flash_sale, ordered_profile, price_sync, registration};
use wasmq_tests::{TestServer, config_in};

fn plugins() -> PluginDir {
    PluginDir(PathBuf::from(wasmq_tests::plugins::TARGET_DIR).join("wasm32-wasip2/release"))
}

async fn server(dir: &std::path::Path, smtp: &SmtpServer, gateway: &HttpPeer) -> (TestServer, Ctx) {
    let mut config = config_in(dir);
    config.smtp.port = smtp.addr.port();
    config.sms.url = format!("{}/sms", gateway.url);
    let s = TestServer::start_with(config).await;
    let ctx = Ctx::new(&s.url).unwrap();
    (s, ctx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_sends_one_welcome_each_and_recovers_a_crash_by_check_back() {
    let dir = tempfile::tempdir().unwrap();
    let (smtp, gateway) = (SmtpServer::start().await, HttpPeer::start().await);
    let (_s, ctx) = server(dir.path(), &smtp, &gateway).await;
    let r = registration::run(&ctx, &plugins(), &smtp, &gateway, 20)
        .await
        .unwrap();
    println!("{r}");
    assert_eq!(
        (r.emails, r.sms),
        (20, 20),
        "one email and one SMS per sign-up"
    );
    assert!(
        r.crash_email_sent,
        "the crashed sign-up was not completed by the check-back"
    );
    // The user waits for the write plus a publish and a commit, not for the email and SMS.
    assert!(
        r.queue_ms < r.parallel_ms,
        "queue {} ms vs parallel {} ms",
        r.queue_ms,
        r.parallel_ms
    );
    assert!(r.serial_ms >= 150.0 && r.parallel_ms >= 100.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flash_sale_notifies_every_order_exactly_once_at_the_set_rate() {
    let dir = tempfile::tempdir().unwrap();
    let (smtp, gateway) = (SmtpServer::start().await, HttpPeer::start().await);
    let (_s, ctx) = server(dir.path(), &smtp, &gateway).await;
    let r = flash_sale::run(&ctx, &plugins(), &gateway, 50_000, 10_000)
        .await
        .unwrap();
    println!("{r}");
    assert_eq!((r.notified_once, r.duplicates, r.missing), (50_000, 0, 0));
    // 50 000 at 10 000/s cannot take less than ~5 s: the limit held.
    assert!(r.drain_secs >= 4.9, "drained in {} s", r.drain_secs);
    assert!(
        r.backlog.first().is_some_and(|(_, lag)| *lag > 0),
        "the backlog never showed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_profiles_end_in_the_source_of_truth() {
    let dir = tempfile::tempdir().unwrap();
    let (smtp, gateway) = (SmtpServer::start().await, HttpPeer::start().await);
    let (_s, ctx) = server(dir.path(), &smtp, &gateway).await;
    let r = ordered_profile::run(&ctx, &plugins(), 1000).await.unwrap();
    println!("{r}");
    assert_eq!(r.users, 1000);
    assert_eq!(r.mismatches, 0);
    assert_eq!(r.global_events, 500);
    assert!(r.global_in_order);
}

/// The price-sync check, with the Rust cache-sync plugin or another language's (`plugin`).
async fn price_sync_check(plugin: Option<PathBuf>) {
    let dir = tempfile::tempdir().unwrap();
    let (smtp, gateway) = (SmtpServer::start().await, HttpPeer::start().await);
    let (_s, ctx) = server(dir.path(), &smtp, &gateway).await;
    let r = price_sync::run(&ctx, &plugins(), plugin.as_deref(), 2000)
        .await
        .unwrap();
    println!("{r}");
    assert!(r.identical, "instances disagree with the latest prices");
    // The failing instance was visibly behind while the others were done.
    assert!(
        r.lag_over_time
            .iter()
            .any(|(_, lags)| lags.get(2).copied().unwrap_or(0) > 0 && lags[0] == 0),
        "{:?}",
        r.lag_over_time
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn price_sync_leaves_every_instance_with_the_latest_prices() {
    price_sync_check(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn price_sync_with_the_javascript_cache_sync_plugin() {
    let wasm = wasmq_tests::polyglot_plugin("cache-sync-js").await;
    price_sync_check(Some(wasm)).await;
}
