//! Real protocol peers for capability tests, on 127.0.0.1: an SMTP server that records every
//! mail (and can fail or slow down on request), and an HTTP server standing in for an SMS
//! gateway and for allow-listed APIs.
// A peer that cannot bind its port or take its own lock has no way to go on: it panics.
#![allow(clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{any, post};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// One mail as the SMTP server received it.
#[derive(Debug, Clone)]
pub struct Mail {
    pub from: String,
    pub to: Vec<String>,
    /// Headers and body, dot-unstuffed.
    pub data: String,
}

impl Mail {
    pub fn subject(&self) -> Option<&str> {
        self.data.lines().find_map(|l| l.strip_prefix("Subject: "))
    }
}

#[derive(Default)]
pub struct SmtpState {
    pub mails: Mutex<Vec<Mail>>,
    /// Answer this many DATA commands with a transient 451.
    pub fail_next: AtomicU32,
    /// Wait this long before accepting each mail.
    pub delay_ms: AtomicU64,
    /// Hold every mail's answer until this many sessions are at the end of their DATA at once
    /// (then it drops to 0 and nothing more is held), or until [`GATE_LIMIT`] passes (the same). Shows
    /// that a sender overlaps its mails by counting them, whatever the machine's speed.
    pub gate: AtomicU64,
    /// Sessions at the end of their DATA now, and the most there were at once.
    pub in_data: AtomicU64,
    pub max_in_data: AtomicU64,
}

/// How long a held mail waits for the gate at most (then it is answered anyway, and a test
/// reading `max_in_data` sees the gate was not reached).
pub const GATE_LIMIT: Duration = Duration::from_secs(60);

pub struct SmtpServer {
    pub addr: SocketAddr,
    pub state: Arc<SmtpState>,
}

impl SmtpServer {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("peer");
        let addr = listener.local_addr().expect("peer");
        let state = Arc::new(SmtpState::default());
        let s = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(session(stream, s.clone()));
            }
        });
        SmtpServer { addr, state }
    }

    pub fn mails(&self) -> Vec<Mail> {
        self.state.mails.lock().expect("peer").clone()
    }

    /// Waits until at least `n` mails arrived (panics after `secs`).
    pub async fn wait_for(&self, n: usize, secs: u64) -> Vec<Mail> {
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let mails = self.mails();
            if mails.len() >= n {
                return mails;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "only {} of {n} mails arrived",
                mails.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn session(stream: tokio::net::TcpStream, state: Arc<SmtpState>) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let _ = write.write_all(b"220 sink.test ESMTP\r\n").await;
    let (mut from, mut to) = (String::new(), Vec::new());
    while let Ok(Some(line)) = lines.next_line().await {
        let upper = line.to_ascii_uppercase();
        let reply: String = if upper.starts_with("EHLO") {
            "250-sink.test\r\n250-8BITMIME\r\n250 SIZE 10000000\r\n".into()
        } else if upper.starts_with("HELO") || upper.starts_with("NOOP") {
            "250 ok\r\n".into()
        } else if upper.starts_with("RSET") {
            (from, to) = (String::new(), Vec::new());
            "250 ok\r\n".into()
        } else if upper.starts_with("MAIL FROM:") {
            // MAIL starts a new transaction.
            to.clear();
            from = line[10..]
                .trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_string();
            "250 ok\r\n".into()
        } else if upper.starts_with("RCPT TO:") {
            to.push(
                line[8..]
                    .trim()
                    .trim_start_matches('<')
                    .trim_end_matches('>')
                    .to_string(),
            );
            "250 ok\r\n".into()
        } else if upper.starts_with("DATA") {
            let _ = write.write_all(b"354 end with <CRLF>.<CRLF>\r\n").await;
            let mut data = String::new();
            while let Ok(Some(l)) = lines.next_line().await {
                if l == "." {
                    break;
                }
                data.push_str(
                    l.strip_prefix('.')
                        .filter(|_| l.starts_with(".."))
                        .unwrap_or(&l),
                );
                data.push('\n');
            }
            let now = state.in_data.fetch_add(1, Ordering::SeqCst) + 1;
            state.max_in_data.fetch_max(now, Ordering::SeqCst);
            let held = std::time::Instant::now();
            loop {
                let gate = state.gate.load(Ordering::SeqCst);
                if gate == 0 {
                    break;
                }
                if held.elapsed() >= GATE_LIMIT || state.in_data.load(Ordering::SeqCst) >= gate {
                    state.gate.store(0, Ordering::SeqCst);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let delay = state.delay_ms.load(Ordering::Relaxed);
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            state.in_data.fetch_sub(1, Ordering::SeqCst);
            let failing = state
                .fail_next
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if failing {
                to.clear();
                "451 4.3.0 try again later\r\n".into()
            } else {
                state.mails.lock().expect("peer").push(Mail {
                    from: from.clone(),
                    to: std::mem::take(&mut to),
                    data,
                });
                "250 2.0.0 queued\r\n".into()
            }
        } else if upper.starts_with("QUIT") {
            let _ = write.write_all(b"221 bye\r\n").await;
            return;
        } else {
            "502 command not implemented\r\n".into()
        };
        if write.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// What the HTTP peer saw: (path, Authorization header, body).
#[derive(Default)]
pub struct HttpState {
    pub requests: Mutex<Vec<(String, Option<String>, String)>>,
    /// Answer this many requests with 503.
    pub fail_next: AtomicU32,
    /// Where `/redirect` points.
    pub redirect_to: Mutex<String>,
    /// Wait this long before answering (a slow downstream).
    pub delay_ms: AtomicU64,
    /// While set, every request (recorded first) waits for it to be cleared, for
    /// [`GATE_LIMIT`] at most: a call a test holds in flight until it lets it go.
    pub hold: AtomicBool,
}

pub struct HttpPeer {
    pub addr: SocketAddr,
    pub url: String,
    pub state: Arc<HttpState>,
}

impl HttpPeer {
    /// `POST /sms` records and answers 200 (or 503 while failing); `/redirect` answers 302 to
    /// `redirect_to`; any other path records and answers 200 "hello".
    pub async fn start() -> Self {
        let state = Arc::new(HttpState::default());
        let app = Router::new()
            .route("/sms", post(record))
            .route("/redirect", any(redirect))
            .fallback(any(record))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("peer");
        let addr = listener.local_addr().expect("peer");
        tokio::spawn(async move { axum::serve(listener, app).await });
        HttpPeer {
            addr,
            url: format!("http://{addr}"),
            state,
        }
    }

    pub fn requests(&self) -> Vec<(String, Option<String>, String)> {
        self.state.requests.lock().expect("peer").clone()
    }
}

async fn record(
    State(state): State<Arc<HttpState>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: String,
) -> (StatusCode, &'static str) {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    state
        .requests
        .lock()
        .expect("peer")
        .push((uri.path().to_string(), auth, body));
    let held = std::time::Instant::now();
    while state.hold.load(Ordering::SeqCst) && held.elapsed() < GATE_LIMIT {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if state
        .fail_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return (StatusCode::SERVICE_UNAVAILABLE, "busy");
    }
    (StatusCode::OK, "hello")
}

async fn redirect(
    State(state): State<Arc<HttpState>>,
) -> (StatusCode, [(&'static str, String); 1]) {
    let to = state.redirect_to.lock().expect("peer").clone();
    (StatusCode::FOUND, [("location", to)])
}
