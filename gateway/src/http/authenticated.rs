//! The `Authenticated` extractor: the caller of an HTTP API request, proven by the bearer token
//! in its `Authorization` header (never the query string).

use actix_web::dev::Payload;
use actix_web::{web, FromRequest, HttpRequest};
use futures_util::future::LocalBoxFuture;

use crate::api_error::ApiError;
use crate::auth::Identity;
use crate::authn::{Authenticator, TokenFrom};

/// The authenticated caller. Put it after the body and query extractors of a handler, so a
/// malformed request is answered `400` before the token is checked.
pub struct Authenticated(pub Identity);

impl FromRequest for Authenticated {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let req = req.clone();
        Box::pin(async move {
            let authenticator = req
                .app_data::<web::Data<Authenticator>>()
                .cloned()
                .ok_or_else(ApiError::internal)?;
            authenticator
                .authenticate(&req, TokenFrom::Header)
                .await
                .map(Authenticated)
        })
    }
}
