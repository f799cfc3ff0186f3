//! `wasmq-demo`: starts a wasmq server (embedded RocksDB in --data-dir) with local SMTP and SMS
//! peers, runs the seed scenarios against it and prints a report for each, then keeps serving
//! on --listen until Ctrl-C so the result can be explored with the `wasmq` CLI.

use std::path::PathBuf;

use clap::Parser;
use wasmq::config::Config;
use wasmq_examples::peers::{HttpPeer, SmtpServer};
use wasmq_examples::{Ctx, PluginDir, flash_sale, ordered_profile, price_sync, registration};

#[derive(Parser)]
#[command(about = "Run wasmq's seed scenarios against a fresh server")]
struct Args {
    /// Scenarios to run: registration, flash-sale, ordered-profile, price-sync (default: all).
    scenarios: Vec<String>,
    /// Directory of the compiled plugins (wasm32-wasip2/release of the plugins workspace).
    #[arg(long)]
    plugins: PathBuf,
    #[arg(long, default_value = "127.0.0.1:7700")]
    listen: std::net::SocketAddr,
    /// Demo data; recreated on every run.
    #[arg(long, default_value = "./data-demo")]
    data_dir: PathBuf,
    /// Orders in the flash sale.
    #[arg(long, default_value_t = 50_000)]
    orders: usize,
    /// Exit after the reports instead of serving on.
    #[arg(long)]
    exit: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let all = [
        "registration",
        "flash-sale",
        "ordered-profile",
        "price-sync",
    ];
    for s in &args.scenarios {
        anyhow::ensure!(
            all.contains(&s.as_str()),
            "unknown scenario {s:?}; pick from {all:?}"
        );
    }
    let chosen: Vec<&str> = if args.scenarios.is_empty() {
        all.to_vec()
    } else {
        args.scenarios.iter().map(String::as_str).collect()
    };
    // Demo data is recreated on every run, so the reports always start from nothing.
    if args.data_dir.join("rocksdb").exists() {
        std::fs::remove_dir_all(&args.data_dir)?;
    }
    let (smtp, gateway) = (SmtpServer::start().await, HttpPeer::start().await);
    let mut config = Config::default();
    config.server.data_dir = args.data_dir.clone();
    config.smtp.port = smtp.addr.port();
    config.sms.url = format!("{}/sms", gateway.url);
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(wasmq::run(listener, config, async move {
        let _ = stop_rx.await;
    }));
    let ctx = Ctx::new(&url)?;
    for _ in 0..500 {
        if ctx.get("/healthz").await.is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    println!(
        "wasmq listening on {url} (data in {}); SMTP peer {}, SMS gateway {}\n",
        args.data_dir.display(),
        smtp.addr,
        gateway.url
    );
    let plugins = PluginDir(args.plugins.clone());
    let mut failed = false;
    for s in chosen {
        let report = match s {
            "registration" => registration::run(&ctx, &plugins, &smtp, &gateway, 20)
                .await
                .map(|r| r.to_string()),
            "flash-sale" => flash_sale::run(&ctx, &plugins, &gateway, args.orders, 10_000)
                .await
                .map(|r| r.to_string()),
            "ordered-profile" => ordered_profile::run(&ctx, &plugins, 1000)
                .await
                .map(|r| r.to_string()),
            _ => price_sync::run(&ctx, &plugins, None, 2000)
                .await
                .map(|r| r.to_string()),
        };
        match report {
            Ok(r) => println!("{r}\n"),
            Err(e) => {
                failed = true;
                eprintln!("{s} failed: {e:#}\n");
            }
        }
    }
    if !args.exit {
        println!("still serving on {url}; try `wasmq --server {url} sub list`; Ctrl-C stops");
        let _ = tokio::signal::ctrl_c().await;
    }
    let _ = stop_tx.send(());
    server.await??;
    anyhow::ensure!(!failed, "a scenario failed");
    Ok(())
}
