//! Scenario 1 and 2, user registration: a registration service (its own HTTP server and store)
//! sends a half message, writes the user, commits; email and SMS notifiers (two groups) send a
//! welcome; a checker plugin asks the service (granted HTTP) about sign-ups whose commit never
//! came. With 50 ms per side effect it measures sign-up latency beside the serial and parallel
//! baselines, and shows a crash between half message and commit resolved by the check-back.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::peers::{HttpPeer, SmtpServer};
use crate::{Ctx, PluginDir};

/// Simulated time of each side effect (DB write, email, SMS).
pub const SIDE_EFFECT: Duration = Duration::from_millis(50);

struct Service {
    broker: Ctx,
    users: Mutex<HashMap<String, Value>>,
}

/// The registration service: `POST /signup` (`?crash=1` dies between writing the user and
/// committing), `GET /users/{id}` for the checker.
pub struct RegistrationService {
    pub addr: SocketAddr,
    pub url: String,
}

async fn signup(
    State(s): State<Arc<Service>>,
    query: axum::extract::RawQuery,
    Json(user): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let crash = query.0.as_deref() == Some("crash=1");
    let id = user["user_id"].as_str().unwrap_or_default().to_string();
    // 1. The half message: if this fails, the user is not registered.
    let half = match s
        .broker
        .post(
            "/v1/topics/user-registered/transactions",
            &json!({"body": user, "key": id}),
        )
        .await
    {
        Ok(v) => v,
        Err(e) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"error": e.to_string()})),
            );
        }
    };
    // 2. The local transaction.
    tokio::time::sleep(SIDE_EFFECT).await;
    if let Ok(mut users) = s.users.lock() {
        users.insert(id.clone(), user.clone());
    }
    if crash {
        // The process dies here: no commit. The broker's check-back must finish the job.
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": "crashed before commit"})),
        );
    }
    // 3. Commit: the welcome messages go out from here, asynchronously.
    let txn = half["txn_id"].as_str().unwrap_or_default();
    match s
        .broker
        .post(&format!("/v1/transactions/{txn}/commit"), &json!({}))
        .await
    {
        Ok(_) => (StatusCode::CREATED, Json(json!({"user_id": id}))),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": e.to_string()})),
        ),
    }
}

async fn user(State(s): State<Arc<Service>>, Path(id): Path<String>) -> StatusCode {
    match s.users.lock().map(|u| u.contains_key(&id)) {
        Ok(true) => StatusCode::OK,
        _ => StatusCode::NOT_FOUND,
    }
}

impl RegistrationService {
    pub async fn start(broker: Ctx) -> anyhow::Result<Self> {
        let state = Arc::new(Service {
            broker,
            users: Mutex::new(HashMap::new()),
        });
        let app = Router::new()
            .route("/signup", post(signup))
            .route("/users/{id}", get(user))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Self {
            addr,
            url: format!("http://{addr}"),
        })
    }
}

pub struct Report {
    pub signups: usize,
    pub queue_ms: f64,
    pub serial_ms: f64,
    pub parallel_ms: f64,
    pub emails: usize,
    pub sms: usize,
    pub crash_recovered_in: Duration,
    pub crash_email_sent: bool,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "registration: {} sign-ups, 50 ms per side effect (write user, email, SMS), median latency:",
            self.signups
        )?;
        writeln!(
            f,
            "  serial   (write, then email, then SMS): {:6.1} ms",
            self.serial_ms
        )?;
        writeln!(
            f,
            "  parallel (write, then email and SMS):   {:6.1} ms",
            self.parallel_ms
        )?;
        writeln!(
            f,
            "  wasmq    (half message, write, commit):  {:6.1} ms",
            self.queue_ms
        )?;
        writeln!(
            f,
            "  welcome emails {} and SMS {} (one each per sign-up)",
            self.emails, self.sms
        )?;
        write!(
            f,
            "  a crash between half message and commit: the checker committed it after {:.1} s; its email was sent: {}",
            self.crash_recovered_in.as_secs_f64(),
            self.crash_email_sent
        )
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// `smtp` and `gateway` must be the server's `[smtp]` and `[sms]` peers.
pub async fn run(
    ctx: &Ctx,
    plugins: &PluginDir,
    smtp: &SmtpServer,
    gateway: &HttpPeer,
    signups: usize,
) -> anyhow::Result<Report> {
    smtp.state.delay_ms.store(
        SIDE_EFFECT.as_millis() as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
    gateway.state.delay_ms.store(
        SIDE_EFFECT.as_millis() as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
    let service = RegistrationService::start(ctx.clone()).await?;
    for (name, krate) in [
        ("email-notifier", "email-notifier"),
        ("sms-notifier", "sms-notifier"),
        ("registration-checker", "registration-checker"),
    ] {
        ctx.upload(name, &plugins.path(krate)).await?;
    }
    ctx.put(
        "/v1/topics/user-registered",
        &json!({"queues": 4, "transaction_checker": "registration-checker",
                "transactions": {"check_after_ms": 500, "check_interval_ms": 500, "max_checks": 10},
                "transaction_checker_config": {"service": service.url},
                "transaction_checker_grants": {"http": [service.url]}}),
    )
    .await?;
    let retry = json!({"max_attempts": 10, "backoff_ms": [200]});
    ctx.put("/v1/subscriptions/welcome-email", &json!({"topic": "user-registered", "plugin": "email-notifier", "instances": 8, "retry": retry,
        "config": {"to": "{{email}}", "subject": "Welcome {{name}}", "text": "Hi {{name}}, welcome aboard."}, "grants": {"email": true}})).await?;
    ctx.put("/v1/subscriptions/welcome-sms", &json!({"topic": "user-registered", "plugin": "sms-notifier", "instances": 8, "retry": retry,
        "config": {"to": "{{phone}}", "text": "Welcome {{name}}!"}, "grants": {"sms": true}})).await?;

    // Baselines in this run: the same side effects, done by the caller.
    let effect = || tokio::time::sleep(SIDE_EFFECT);
    let (mut serial, mut parallel, mut queued) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..signups.min(10) {
        let t = Instant::now();
        effect().await;
        effect().await;
        effect().await;
        serial.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        effect().await;
        tokio::join!(effect(), effect());
        parallel.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let http = reqwest::Client::new();
    for i in 0..signups {
        let user = json!({"user_id": format!("u{i}"), "name": format!("User{i}"), "email": format!("u{i}@example.com"), "phone": format!("+1555{i:07}")});
        let t = Instant::now();
        let r = http
            .post(format!("{}/signup", service.url))
            .json(&user)
            .send()
            .await
            .context("sign-up")?;
        ensure!(
            r.status() == StatusCode::CREATED.as_u16(),
            "sign-up failed: {}",
            r.status()
        );
        queued.push(t.elapsed().as_secs_f64() * 1e3);
    }
    // The crash: the user row is written, the commit never comes.
    let crashed = json!({"user_id": "crash", "name": "Crash", "email": "crash@example.com", "phone": "+19990000"});
    let t = Instant::now();
    let r = http
        .post(format!("{}/signup?crash=1", service.url))
        .json(&crashed)
        .send()
        .await?;
    ensure!(r.status() == 500, "the crash sign-up should fail");
    let deadline = Instant::now() + Duration::from_secs(60);
    let crash_recovered_in = loop {
        let list = ctx.get("/v1/transactions?state=committed").await?;
        let committed = list["transactions"].as_array().is_some_and(|a| {
            a.iter().any(|t| {
                t["history"]
                    .as_array()
                    .is_some_and(|h| h.iter().any(|e| e["detail"] == "by checker"))
            })
        });
        if committed {
            break t.elapsed();
        }
        ensure!(
            Instant::now() < deadline,
            "the check-back never committed the crashed sign-up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for group in ["welcome-email", "welcome-sms"] {
        ctx.wait_sub(
            group,
            Duration::from_secs(120),
            Duration::from_secs(3600),
            |_| {},
            |st| st["lag"] == 0 && st["in_flight"] == 0 && st["pending_timers"] == 0,
        )
        .await?;
    }
    let mails = smtp.mails();
    let crash_email_sent = mails
        .iter()
        .any(|m| m.to.iter().any(|t| t == "crash@example.com"));
    Ok(Report {
        signups,
        queue_ms: median(queued),
        serial_ms: median(serial),
        parallel_ms: median(parallel),
        emails: mails
            .iter()
            .filter(|m| m.to.iter().any(|t| t != "crash@example.com"))
            .count(),
        sms: gateway
            .requests()
            .iter()
            .filter(|(_, _, body)| !body.contains("+19990000"))
            .count(),
        crash_recovered_in,
        crash_email_sent,
    })
}
