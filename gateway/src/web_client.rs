//! The reference web client: the four files under `web/`, compiled into the binary and served
//! at `/`, so a browser needs nothing but a running gateway.

use actix_web::http::header;
use actix_web::HttpResponse;

/// A page asset: its body and content type.
struct Asset {
    body: &'static str,
    content_type: &'static str,
}

const INDEX: Asset = Asset {
    body: include_str!("../../web/index.html"),
    content_type: "text/html; charset=utf-8",
};
const STYLE: Asset = Asset {
    body: include_str!("../../web/style.css"),
    content_type: "text/css; charset=utf-8",
};
const APP: Asset = Asset {
    body: include_str!("../../web/app.js"),
    content_type: "text/javascript; charset=utf-8",
};
const CLIENT: Asset = Asset {
    body: include_str!("../../web/chat-client.js"),
    content_type: "text/javascript; charset=utf-8",
};

/// What the page may load and connect to: only this origin (`ws:`/`wss:` of it included).
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; connect-src 'self' ws: wss:; \
     img-src 'self' data: https:; style-src 'self' 'unsafe-inline'; script-src 'self'; frame-ancestors 'none'; \
     base-uri 'none'; form-action 'self'";

fn serve(asset: &Asset) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, asset.content_type))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header(("content-security-policy", CONTENT_SECURITY_POLICY))
        .insert_header(("referrer-policy", "no-referrer"))
        .body(asset.body)
}

/// `GET /`
pub async fn index() -> HttpResponse {
    serve(&INDEX)
}

/// `GET /style.css`
pub async fn style() -> HttpResponse {
    serve(&STYLE)
}

/// `GET /app.js`
pub async fn app() -> HttpResponse {
    serve(&APP)
}

/// `GET /chat-client.js`
pub async fn client() -> HttpResponse {
    serve(&CLIENT)
}
