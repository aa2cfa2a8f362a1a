//! The reference web client: every file under `web/` that the page loads, compiled into the
//! binary from one table and served at its path, so a browser needs nothing but a gateway.
//! Adding a file to the client is one line in [`ASSETS`].

use std::sync::Arc;

use actix_web::http::header;
use actix_web::{web, HttpResponse};

/// A page asset: the path it is served at and its body.
pub struct Asset {
    pub path: &'static str,
    pub body: &'static str,
}

/// One table entry for `web/<file>`, served at `/<file>`.
macro_rules! asset {
    ($file:literal) => {
        Asset {
            path: concat!("/", $file),
            body: include_str!(concat!("../../web/", $file)),
        }
    };
}

/// Every file of the web client. `index.html` is also served at `/`.
pub static ASSETS: &[Asset] = &[
    Asset {
        path: "/",
        body: include_str!("../../web/index.html"),
    },
    asset!("index.html"),
    asset!("style.css"),
    asset!("chat-client.js"),
    asset!("app.js"),
    asset!("views/dom.js"),
    asset!("views/text.js"),
    asset!("views/time.js"),
    asset!("views/session-store.js"),
    asset!("views/state.js"),
    asset!("views/avatar.js"),
    asset!("views/login.js"),
    asset!("views/reset.js"),
    asset!("views/session.js"),
    asset!("views/profile.js"),
    asset!("views/people.js"),
    asset!("views/conversation-list.js"),
    asset!("views/conversation.js"),
    asset!("views/rooms.js"),
];

/// What the page may load and connect to: only this origin (`ws:`/`wss:` of it included), and
/// pictures from the operator's avatar hosts only, so no viewer's address goes to a host a
/// user picked.
pub fn content_security_policy(avatar_hosts: &[String]) -> String {
    let images: String = avatar_hosts
        .iter()
        .map(|h| format!(" https://{h}"))
        .collect();
    format!(
        "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:{images}; \
         style-src 'self' 'unsafe-inline'; script-src 'self'; frame-ancestors 'none'; \
         base-uri 'none'; form-action 'self'"
    )
}

/// The content type of a path, by its extension (`/` is the page).
fn content_type(path: &str) -> &'static str {
    match path.rsplit_once('.').map(|(_, ext)| ext) {
        Some("css") => "text/css; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        _ => "text/html; charset=utf-8",
    }
}

fn serve(asset: &'static Asset, csp: &str) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, content_type(asset.path)))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header(("content-security-policy", csp.to_string()))
        .insert_header(("referrer-policy", "no-referrer"))
        .body(asset.body)
}

/// Registers a `GET` route for every asset, served with `csp`.
pub fn routes(config: &mut web::ServiceConfig, csp: &Arc<str>) {
    for asset in ASSETS {
        let csp = csp.clone();
        config.route(
            asset.path,
            web::get().to(move || {
                let csp = csp.clone();
                async move { serve(asset, &csp) }
            }),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `spec` (`./a.js`, `../b.js`) relative to directory `dir` (`/views/`).
    fn resolve(dir: &str, spec: &str) -> String {
        let mut parts: Vec<&str> = dir.split('/').filter(|p| !p.is_empty()).collect();
        for part in spec.split('/') {
            match part {
                "." => {}
                ".." => {
                    parts.pop();
                }
                name => parts.push(name),
            }
        }
        format!("/{}", parts.join("/"))
    }

    /// Paths are unique and typed by extension; every module the page imports is in the table.
    #[test]
    fn assets_are_unique_and_complete() {
        let mut seen = std::collections::HashSet::new();
        for asset in ASSETS {
            assert!(seen.insert(asset.path), "{} twice", asset.path);
        }
        assert_eq!(content_type("/app.js"), "text/javascript; charset=utf-8");
        assert_eq!(content_type("/style.css"), "text/css; charset=utf-8");
        assert_eq!(content_type("/"), "text/html; charset=utf-8");
        // Every relative import of every script names a served file.
        for asset in ASSETS.iter().filter(|a| a.path.ends_with(".js")) {
            let dir = &asset.path[..=asset.path.rfind('/').unwrap_or(0)];
            for line in asset.body.lines() {
                let Some(spec) = line
                    .split(" from '")
                    .nth(1)
                    .or_else(|| line.strip_prefix("import '"))
                    .and_then(|rest| rest.split('\'').next())
                else {
                    continue;
                };
                if !spec.starts_with("./") && !spec.starts_with("../") {
                    continue;
                }
                let path = resolve(dir, spec);
                assert!(
                    ASSETS.iter().any(|a| a.path == path),
                    "{} imports {spec}, which is not served",
                    asset.path
                );
            }
        }
    }
}
