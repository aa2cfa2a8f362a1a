//! Native TLS on the public port: a client connects over `wss://` with a test certificate, a
//! renewed certificate is picked up without a restart, and bad TLS settings are refused by key.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use support::*;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// A self-signed certificate for 127.0.0.1: its PEM files written to `dir`, and its DER to trust.
fn write_certificate(dir: &Path) -> rustls::pki_types::CertificateDer<'static> {
    let generated = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()])
        .expect("generate certificate");
    // The key first: a reload that sees the new key with the old certificate fails and retries.
    std::fs::write(dir.join("key.pem"), generated.signing_key.serialize_pem()).expect("key");
    std::fs::write(dir.join("cert.pem"), generated.cert.pem()).expect("cert");
    generated.cert.der().clone()
}

/// Opens `wss://addr/ws` trusting only `root`; the hello frame, or the error.
async fn connect_wss(
    addr: std::net::SocketAddr,
    user: &User,
    root: &rustls::pki_types::CertificateDer<'static>,
) -> Result<serde_json::Value, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).map_err(|e| e.to_string())?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut req = format!("wss://{addr}/ws")
        .into_client_request()
        .map_err(|e| e.to_string())?;
    req.headers_mut().insert(
        "Authorization",
        format!("Bearer {}", user.token).parse().expect("header"),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async_tls_with_config(
        req,
        None,
        false,
        Some(tokio_tungstenite::Connector::Rustls(Arc::new(config))),
    )
    .await
    .map_err(|e| e.to_string())?;
    recv(&mut ws).await.ok_or_else(|| "no hello".to_string())
}

/// A client trusting the test certificate gets `hello` over `wss://`; plain `ws://` to the same
/// port fails; after the files are replaced, new connections get the new certificate.
#[actix_web::test]
async fn wss_with_a_test_certificate_and_reload() {
    let dir = std::env::temp_dir().join(format!("chat-tls-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("dir");
    let first = write_certificate(&dir);
    let cluster = Cluster::new().await;
    let node = cluster
        .start_with(gateway::config::GatewayConfig {
            gateway_tls_cert_path: Some(dir.join("cert.pem").display().to_string()),
            gateway_tls_key_path: Some(dir.join("key.pem").display().to_string()),
            gateway_tls_reload_secs: 1,
            ..cluster.config("node-tls")
        })
        .await;
    let alice = chat_core::testing::insert_user(
        &chat_core::testing::connect(&cluster.db_url).await,
        "alice",
    )
    .await;
    let alice = User {
        id: alice,
        token: test_auth().issue(alice, 0).expect("token"),
    };

    let hello = connect_wss(node.http, &alice, &first).await.expect("wss");
    assert_eq!(hello["type"], "hello");
    assert_eq!(hello["user_id"], alice.id.to_string());
    let plain = tokio_tungstenite::connect_async(format!("ws://{}/ws", node.http)).await;
    assert!(plain.is_err(), "plain WebSocket to the TLS port must fail");

    let second = write_certificate(&dir);
    let reloaded = chat_core::testing::eventually(Duration::from_secs(5), || {
        let (alice, second) = (alice.clone(), second.clone());
        async move { connect_wss(node.http, &alice, &second).await.is_ok() }
    })
    .await;
    assert!(
        reloaded,
        "the renewed certificate is served without a restart"
    );
    assert!(
        connect_wss(node.http, &alice, &first).await.is_err(),
        "the old certificate is no longer served"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// TLS settings are checked before anything binds, and the error names the key.
#[test]
fn bad_tls_settings_name_their_key() {
    let base = || gateway::config::GatewayConfig {
        jwt_secret: Some(SECRET.into()),
        ..Default::default()
    };
    let only_cert = gateway::config::GatewayConfig {
        gateway_tls_cert_path: Some("/nonexistent/cert.pem".into()),
        ..base()
    };
    let err = only_cert.validate().expect_err("no key").to_string();
    assert!(err.contains("gateway_tls_key_path"), "{err}");
    let unreadable = gateway::config::GatewayConfig {
        gateway_tls_cert_path: Some("/nonexistent/cert.pem".into()),
        gateway_tls_key_path: Some("/nonexistent/key.pem".into()),
        ..base()
    };
    let err = unreadable.validate().expect_err("no files").to_string();
    assert!(err.contains("gateway_tls_cert_path"), "{err}");
}
