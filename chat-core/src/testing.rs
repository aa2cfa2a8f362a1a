//! Test support: every integration test gets its own Postgres database and Redis prefix, so tests
//! run in parallel against the same real servers. Enabled by the `testing` feature only.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio_postgres::NoTls;
use uuid::Uuid;

/// Redis for tests: `CHAT_TEST_REDIS_URL`, default the local server.
pub fn redis_url() -> String {
    std::env::var("CHAT_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Seed URLs of a Redis Cluster to run the backend on instead of one instance
/// (`CHAT_TEST_REDIS_CLUSTER_URLS`, comma-separated, as `deploy/redis-cluster.sh` prints them);
/// empty when unset.
pub fn redis_cluster_urls() -> String {
    std::env::var("CHAT_TEST_REDIS_CLUSTER_URLS").unwrap_or_default()
}

/// Postgres server for tests (without a database name): `CHAT_TEST_PG`, default local.
pub fn pg_server() -> String {
    std::env::var("CHAT_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432".into())
}

/// A Redis key prefix no other test uses.
pub fn unique_prefix() -> String {
    format!("t{}", Uuid::new_v4().simple())
}

/// Creates an empty database for one test, migrated, and returns its URL.
pub async fn fresh_database() -> String {
    let name = format!("chat_t_{}", Uuid::new_v4().simple());
    let admin_url = format!("{}/postgres", pg_server());
    let (client, connection) = tokio_postgres::connect(&admin_url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("test postgres at {admin_url} is unreachable: {e}"));
    let driver = tokio::spawn(connection);
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create test database");
    drop(client);
    let _ = driver.await;
    let url = format!("{}/{name}", pg_server());
    crate::store::migrate::migrate(&url)
        .await
        .expect("migrate test database");
    url
}

/// A connected client for assertions.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .expect("connect test database");
    tokio::spawn(connection);
    client
}

/// Inserts a user row directly (for worker tests that need foreign keys satisfied).
pub async fn insert_user(client: &tokio_postgres::Client, name: &str) -> Uuid {
    let id = Uuid::now_v7();
    client
        .execute(
            "INSERT INTO users (id, name, email, password_hash) VALUES ($1, $2, $3, 'x')",
            &[&id, &name, &format!("{id}@example.test")],
        )
        .await
        .expect("insert user");
    id
}

/// Polls `check` every 50 ms until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: std::time::Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A TCP proxy in front of a server (Postgres, Redis) that a test can cut and restore (cutting
/// drops every open link and refuses new ones), or freeze: links stay open and forward nothing
/// (a half-open connection, as a dead peer or a stalled middlebox leaves it). Freezing can be
/// limited to Redis pub/sub links: those whose client sent `SUBSCRIBE`.
pub struct Proxy {
    pub addr: SocketAddr,
    open: Arc<AtomicBool>,
    rule: Arc<FreezeRule>,
    links: Arc<Mutex<Vec<Link>>>,
}

/// Which links freeze.
#[derive(Default)]
struct FreezeRule {
    /// Only links that subscribed (else every link).
    pubsub_only: AtomicBool,
    /// Links opened (or, with `pubsub_only`, subscribing) from now on freeze too.
    new_too: AtomicBool,
}

#[derive(Default)]
struct LinkState {
    frozen: AtomicBool,
    /// The client sent `SUBSCRIBE` (or `SSUBSCRIBE`) on it.
    subscribed: AtomicBool,
}

struct Link {
    task: tokio::task::JoinHandle<()>,
    state: Arc<LinkState>,
}

async fn wait_thawed(state: &LinkState) {
    while state.frozen.load(Ordering::SeqCst) {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Copies `from` into `to` until either ends, forwarding nothing while the link is frozen.
/// `client` is whether `from` is the client side (what it sends is watched for subscribing).
async fn pump<R, W>(
    mut from: R,
    mut to: W,
    state: Arc<LinkState>,
    rule: Arc<FreezeRule>,
    client: bool,
) where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        wait_thawed(&state).await;
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if client
            && buf[..n]
                .windows(9)
                .any(|w| w.eq_ignore_ascii_case(b"SUBSCRIBE"))
        {
            state.subscribed.store(true, Ordering::SeqCst);
            if rule.pubsub_only.load(Ordering::SeqCst) && rule.new_too.load(Ordering::SeqCst) {
                state.frozen.store(true, Ordering::SeqCst);
            }
        }
        wait_thawed(&state).await;
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let open = Arc::new(AtomicBool::new(true));
        let rule: Arc<FreezeRule> = Arc::default();
        let links: Arc<Mutex<Vec<Link>>> = Arc::default();
        let (open2, rule2, links2) = (open.clone(), rule.clone(), links.clone());
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if !open2.load(Ordering::SeqCst) {
                    continue; // dropped: connection refused in effect
                }
                let state: Arc<LinkState> = Arc::default();
                let all_new = rule2.new_too.load(Ordering::SeqCst)
                    && !rule2.pubsub_only.load(Ordering::SeqCst);
                state.frozen.store(all_new, Ordering::SeqCst);
                let (link_state, link_rule) = (state.clone(), rule2.clone());
                let task = tokio::spawn(async move {
                    if let Ok(outbound) = tokio::net::TcpStream::connect(target).await {
                        let (ri, wi) = inbound.into_split();
                        let (ro, wo) = outbound.into_split();
                        tokio::select! {
                            _ = pump(ri, wo, link_state.clone(), link_rule.clone(), true) => {}
                            _ = pump(ro, wi, link_state, link_rule, false) => {}
                        }
                    }
                });
                links2.lock().expect("lock").push(Link { task, state });
            }
        });
        Proxy {
            addr,
            open,
            rule,
            links,
        }
    }

    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for link in self.links.lock().expect("lock").drain(..) {
            link.task.abort();
        }
    }

    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }

    /// Freezes every open link (with `pubsub_only`, every one that subscribed); with `new_too`,
    /// links opened (or subscribing) from now on freeze as well.
    pub fn freeze(&self, pubsub_only: bool, new_too: bool) {
        self.rule.pubsub_only.store(pubsub_only, Ordering::SeqCst);
        self.rule.new_too.store(new_too, Ordering::SeqCst);
        for link in self.links.lock().expect("lock").iter() {
            if !pubsub_only || link.state.subscribed.load(Ordering::SeqCst) {
                link.state.frozen.store(true, Ordering::SeqCst);
            }
        }
    }

    /// Lets every link forward again; new ones are not frozen.
    pub fn thaw(&self) {
        self.rule.new_too.store(false, Ordering::SeqCst);
        for link in self.links.lock().expect("lock").iter() {
            link.state.frozen.store(false, Ordering::SeqCst);
        }
    }
}

/// A proxy in front of the Postgres of `db_url`, and the database URL that goes through it.
pub async fn postgres_proxy(db_url: &str) -> (Proxy, String) {
    let pg: tokio_postgres::Config = db_url.parse().expect("url");
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], port))).await;
    let password = pg
        .get_password()
        .map(|p| format!(":{}", String::from_utf8_lossy(p)))
        .unwrap_or_default();
    let url = format!(
        "postgres://{}{password}@{}/{}",
        pg.get_user().unwrap_or("postgres"),
        proxy.addr,
        pg.get_dbname().expect("db name")
    );
    (proxy, url)
}
