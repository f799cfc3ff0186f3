//! The web dashboard: static assets compiled into the binary (no CDN), served at `/` and
//! `/ui/…`; the page itself reads the JSON API with the token the user enters.

use axum::extract::Path;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::ApiError;

const INDEX: &str = include_str!("dashboard/index.html");
const APP: &str = include_str!("dashboard/app.js");
const STYLE: &str = include_str!("dashboard/style.css");

pub async fn index() -> Response {
    asset("index.html").unwrap_or_else(IntoResponse::into_response)
}

pub async fn file(Path(name): Path<String>) -> Response {
    asset(&name).unwrap_or_else(IntoResponse::into_response)
}

fn asset(name: &str) -> Result<Response, ApiError> {
    let (body, kind) = match name {
        "index.html" => (INDEX, "text/html; charset=utf-8"),
        "app.js" => (APP, "text/javascript; charset=utf-8"),
        "style.css" => (STYLE, "text/css; charset=utf-8"),
        _ => {
            return Err(ApiError::not_found(
                "no_asset",
                format!("no dashboard file {name:?}"),
            ));
        }
    };
    Ok((
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response())
}
