//! Bearer-token auth: which scope each route needs (`admin`, `produce` for listed topics,
//! `read`), 401 without a valid token, 403 with a token lacking the scope. With no tokens
//! configured the API is open, which `run` allows only on a loopback address.

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState};
use crate::config::TokenConfig;

/// What a request needs.
#[derive(Debug, PartialEq, Eq)]
enum Need {
    Nothing,
    Read,
    /// Publishing to this topic.
    Produce(String),
    /// Deciding a transaction (a producer's commit or rollback).
    Decide,
    Admin,
}

fn need(method: &Method, path: &str) -> Need {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, parts.as_slice()) {
        // The dashboard's static files hold no data; the page calls the API with a token.
        (_, ["healthz"] | [""] | ["ui", _]) => Need::Nothing,
        (&Method::POST, ["v1", "topics", topic, "messages"])
        | (&Method::POST, ["v1", "topics", topic, "messages", "batch"])
        | (&Method::POST, ["v1", "topics", topic, "transactions"]) => {
            Need::Produce((*topic).to_string())
        }
        (&Method::POST, ["v1", "transactions", _, "commit" | "rollback"]) => Need::Decide,
        (&Method::GET | &Method::HEAD, _) => Need::Read,
        _ => Need::Admin,
    }
}

/// The scope a route needs, as the OpenAPI document names it.
pub fn scope_name(method: &Method, path: &str) -> &'static str {
    match need(method, path) {
        Need::Nothing => "none",
        Need::Read => "read",
        Need::Produce(_) | Need::Decide => "produce",
        Need::Admin => "admin",
    }
}

/// Compares without an early exit, so timing does not reveal how much of a token matched.
fn same(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i % b.len().max(1)).copied().unwrap_or(0));
    }
    diff == 0
}

fn allows(t: &TokenConfig, need: &Need) -> bool {
    let has = |s: &str| t.scopes.iter().any(|x| x == s);
    if has("admin") {
        return true;
    }
    match need {
        Need::Nothing => true,
        Need::Read => has("read"),
        Need::Produce(topic) => {
            has("produce")
                && (t.topics.is_empty() || t.topics.iter().any(|x| x == "*" || x == topic))
        }
        Need::Decide => has("produce"),
        Need::Admin => false,
    }
}

pub async fn check(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let tokens = &state.tokens;
    if tokens.is_empty() {
        return next.run(req).await;
    }
    let need = need(req.method(), req.uri().path());
    if need == Need::Nothing {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(presented) = presented else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send Authorization: Bearer <token>",
        )
        .into_response();
    };
    // Every token is compared, so the answer time does not depend on which one matched.
    let mut found = None;
    for t in tokens.iter() {
        if same(t.token.as_bytes(), presented.as_bytes()) {
            found = Some(t);
        }
    }
    match found {
        None => {
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "unknown token").into_response()
        }
        Some(t) if allows(t, &need) => next.run(req).await,
        Some(_) => ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("this token lacks the scope for {need:?}"),
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_need_the_right_scope() {
        assert_eq!(need(&Method::GET, "/healthz"), Need::Nothing);
        assert_eq!(
            need(&Method::POST, "/v1/topics/orders/messages"),
            Need::Produce("orders".into())
        );
        assert_eq!(
            need(&Method::POST, "/v1/topics/orders/messages/batch"),
            Need::Produce("orders".into())
        );
        assert_eq!(
            need(&Method::POST, "/v1/transactions/x/commit"),
            Need::Decide
        );
        assert_eq!(
            need(&Method::POST, "/v1/transactions/x/recheck"),
            Need::Admin
        );
        assert_eq!(need(&Method::GET, "/v1/subscriptions/g"), Need::Read);
        assert_eq!(need(&Method::PUT, "/v1/topics/orders"), Need::Admin);
        assert_eq!(need(&Method::POST, "/v1/plugins/p/invoke"), Need::Admin);
    }

    #[test]
    fn comparison_is_exact() {
        assert!(same(b"secret", b"secret"));
        assert!(!same(b"secret", b"secreT"));
        assert!(!same(b"secret", b"secret2"));
        assert!(!same(b"secret", b""));
        assert!(!same(b"", b"x"));
        assert!(same(b"", b""));
        assert!(
            !same(&[b'a'; 8], &[b'a'; 264]),
            "lengths 256 apart still differ"
        );
    }
}
