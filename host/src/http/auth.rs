//! Bearer-token auth: which scope each route needs (`admin`, `produce` for listed topics,
//! `read`), 401 without a valid token, 403 with a token lacking the scope. With no tokens
//! configured the API is open, which `run` allows only on a loopback address.

use axum::extract::Request;
use axum::http::{Method, StatusCode, header};
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
    /// Deciding this transaction (a producer's commit or rollback): a produce action on the
    /// transaction's topic, which [`check`] looks up.
    Decide(String),
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
        (&Method::POST, ["v1", "transactions", id, "commit" | "rollback"]) => {
            Need::Decide((*id).to_string())
        }
        (&Method::GET | &Method::HEAD, _) => Need::Read,
        _ => Need::Admin,
    }
}

/// The scope a route needs, as the OpenAPI document names it.
pub fn scope_name(method: &Method, path: &str) -> &'static str {
    match need(method, path) {
        Need::Nothing => "none",
        Need::Read => "read",
        Need::Produce(_) | Need::Decide(_) => "produce",
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

/// Whether token `t` may do what `need` says; `txn_topic` is the topic of the transaction a
/// [`Need::Decide`] names (`None`: no such transaction, which the route answers with 404).
fn allows(t: &TokenConfig, need: &Need, txn_topic: Option<&str>) -> bool {
    let has = |s: &str| t.scopes.iter().any(|x| x == s);
    if has("admin") {
        return true;
    }
    let produces_to =
        |topic: &str| t.topics.is_empty() || t.topics.iter().any(|x| x == "*" || x == topic);
    match need {
        Need::Nothing => true,
        Need::Read => has("read"),
        Need::Produce(topic) => has("produce") && produces_to(topic),
        Need::Decide(_) => has("produce") && txn_topic.is_none_or(produces_to),
        Need::Admin => false,
    }
}

/// Checks the request's token against what its route needs, then answers with `run` (the
/// routes) or 401/403; plugin config and grants are redacted for tokens without `admin`.
pub async fn check<Fut: Future<Output = Response>>(
    state: &AppState,
    mut req: Request,
    run: impl FnOnce(Request) -> Fut,
) -> Response {
    let tokens = &state.tokens;
    if tokens.is_empty() {
        req.extensions_mut().insert(super::streams::Caller {
            token: None,
            admin: true,
        });
        return run(req).await;
    }
    let need = need(req.method(), req.uri().path());
    if need == Need::Nothing {
        return run(req).await;
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
    for (i, t) in tokens.iter().enumerate() {
        if same(t.token.as_bytes(), presented.as_bytes()) {
            found = Some((i, t));
        }
    }
    if let Some((i, t)) = found {
        req.extensions_mut().insert(super::streams::Caller {
            token: Some(i),
            admin: allows(t, &Need::Admin, None),
        });
    }
    let redacts = found.is_some_and(|(_, t)| !allows(t, &Need::Admin, None))
        && shows_plugin_config(req.method(), req.uri().path());
    let found = found.map(|(_, t)| t);
    // A decision is a produce action on its transaction's topic.
    let txn_topic = match &need {
        Need::Decide(id) => state.transactions.get(id).await.ok().map(|t| t.topic),
        _ => None,
    };
    match found {
        None => {
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "unknown token").into_response()
        }
        Some(t) if allows(t, &need, txn_topic.as_deref()) => {
            let resp = run(req).await;
            if redacts { redact(resp).await } else { resp }
        }
        Some(_) => ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("this token lacks the scope for {need:?}"),
        )
        .into_response(),
    }
}

/// Routes whose answers carry plugin config and grants (where users put API keys): a token
/// that may not administer sees them redacted.
fn shows_plugin_config(method: &Method, path: &str) -> bool {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    matches!(*method, Method::GET | Method::HEAD)
        && matches!(
            parts.as_slice(),
            ["v1", "subscriptions"]
                | ["v1", "subscriptions", _]
                | ["v1", "topics"]
                | ["v1", "topics", _]
        )
}

/// What a redacted field reads.
pub(super) const REDACTED: &str = "[redacted]";

/// The fields that hold plugin config or grants, wherever they appear in an answer.
pub(super) const REDACTED_FIELDS: [&str; 4] = [
    "config",
    "grants",
    "transaction_checker_config",
    "transaction_checker_grants",
];

fn redact_value(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                if REDACTED_FIELDS.contains(&k.as_str()) {
                    *x = serde_json::Value::String(REDACTED.into());
                } else {
                    redact_value(x);
                }
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(redact_value),
        _ => {}
    }
}

/// The answer with plugin config and grants replaced by `"[redacted]"`.
async fn redact(resp: Response) -> Response {
    let (mut parts, body) = resp.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return ApiError::internal("cannot read an answer to redact").into_response();
    };
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return Response::from_parts(parts, axum::body::Body::from(bytes));
    };
    redact_value(&mut v);
    let out = serde_json::to_vec(&v).unwrap_or_default();
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(out))
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
            Need::Decide("x".into())
        );
        assert_eq!(
            need(&Method::POST, "/v1/transactions/x/recheck"),
            Need::Admin
        );
        assert_eq!(need(&Method::GET, "/v1/subscriptions/g"), Need::Read);
        assert_eq!(need(&Method::PUT, "/v1/topics/orders"), Need::Admin);
        assert_eq!(need(&Method::DELETE, "/v1/topics/orders"), Need::Admin);
        assert_eq!(need(&Method::POST, "/v1/plugins/p/invoke"), Need::Admin);
    }

    #[test]
    fn a_decision_is_a_produce_action_on_the_transactions_topic() {
        let token = |scopes: &[&str], topics: &[&str]| TokenConfig {
            token: "t".into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            topics: topics.iter().map(|s| s.to_string()).collect(),
        };
        let decide = Need::Decide("x".into());
        let a = token(&["produce"], &["topic-a"]);
        assert!(allows(&a, &decide, Some("topic-a")));
        assert!(!allows(&a, &decide, Some("topic-b")));
        assert!(allows(&a, &decide, None), "unknown: the route answers 404");
        assert!(allows(&token(&["produce"], &[]), &decide, Some("topic-b")));
        assert!(!allows(&token(&["read"], &[]), &decide, Some("topic-a")));
        assert!(allows(&token(&["admin"], &[]), &decide, Some("topic-b")));
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
