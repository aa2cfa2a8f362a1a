//! Passwords: the rules a new password must meet, and argon2id hashing and verifying on a few
//! dedicated threads, bounded in how much work may wait.

use argon2::password_hash::{
    rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString,
};
use argon2::Argon2;
use uuid::Uuid;

/// Shortest password, in characters.
pub const MIN_PASSWORD_CHARS: usize = 8;
/// Longest password, in bytes: bounds the argon2 work an attacker can ask for per request.
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// The field code for a password that is too short or too long.
pub fn password_problem(password: &str) -> Option<&'static str> {
    if password.chars().count() < MIN_PASSWORD_CHARS {
        Some("password_too_short")
    } else if password.len() > MAX_PASSWORD_BYTES {
        Some("password_too_long")
    } else {
        None
    }
}

/// Why password work failed.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    /// A thousand are already waiting (or the threads are gone): answered `unavailable`.
    #[error("password work refused: busy")]
    Busy,
    /// argon2 failed (not expected): answered `internal`.
    #[error("password hashing failed: {0}")]
    Hash(String),
}

/// Hashes and verifies passwords on the password threads.
pub struct Passwords {
    pool: PasswordPool,
    /// Hashes and verifications started, by `op` (`hash`, `verify`), when counted.
    work: Option<prometheus::IntCounterVec>,
    /// A real argon2id hash of a random password, verified against when the email is unknown,
    /// so unknown-email and wrong-password logins take similar time.
    dummy_hash: String,
}

impl Passwords {
    /// `threads` password threads.
    pub fn new(threads: usize) -> Result<Self, PasswordError> {
        Ok(Passwords {
            pool: PasswordPool::new(threads).map_err(|e| PasswordError::Hash(e.to_string()))?,
            work: None,
            dummy_hash: hash_password(&Uuid::new_v4().to_string())
                .map_err(|e| PasswordError::Hash(e.to_string()))?,
        })
    }

    /// Counts the work started in `work` (labels `hash`, `verify`).
    pub fn counted(mut self, work: prometheus::IntCounterVec) -> Self {
        self.work = Some(work);
        self
    }

    fn count(&self, op: &str) {
        if let Some(work) = &self.work {
            work.with_label_values(&[op]).inc();
        }
    }

    /// The argon2id hash (PHC string) of `password`.
    pub async fn hash(&self, password: String) -> Result<String, PasswordError> {
        self.count("hash");
        self.pool
            .run(move || hash_password(&password))
            .await
            .map_err(|_| PasswordError::Busy)?
            .map_err(|e| PasswordError::Hash(e.to_string()))
    }

    /// Whether `password` matches `hash`; with no hash (no such user) it is checked against a
    /// dummy hash, so that both failures take the same time.
    pub async fn verify(
        &self,
        password: String,
        hash: Option<String>,
    ) -> Result<bool, PasswordError> {
        self.count("verify");
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| self.dummy_hash.clone());
        let matches = self
            .pool
            .run(move || verify_password(&password, &hash))
            .await
            .map_err(|_| PasswordError::Busy)?;
        Ok(known && matches)
    }
}

/// A job for the password threads.
type PasswordJob = Box<dyn FnOnce() + Send>;

/// Password work waiting for a thread, at most.
const PASSWORD_QUEUE: usize = 1024;

/// The password work is refused: the queue is full, or the pool is gone.
#[derive(Debug, thiserror::Error)]
#[error("password work refused: busy")]
struct PasswordBusy;

/// A few dedicated threads for argon2id. Each hash takes 19 MiB; run on a large, changing set
/// of blocking threads, glibc keeps that memory in every thread's arena (a node reached 3.7 GiB
/// registering 200 users at once, measured in docs/operations.md). Here it stays with these
/// threads. They end when the pool is dropped.
struct PasswordPool {
    jobs: std::sync::mpsc::SyncSender<PasswordJob>,
}

impl PasswordPool {
    fn new(threads: usize) -> std::io::Result<Self> {
        let (jobs, queue) = std::sync::mpsc::sync_channel::<PasswordJob>(PASSWORD_QUEUE);
        let queue = std::sync::Arc::new(std::sync::Mutex::new(queue));
        for i in 0..threads.max(1) {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("password-{i}"))
                .spawn(move || loop {
                    let job = match queue.lock() {
                        Ok(q) => q.recv(),
                        Err(poisoned) => poisoned.into_inner().recv(),
                    };
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                })?;
        }
        Ok(PasswordPool { jobs })
    }

    /// Runs `f` on a password thread.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, PasswordBusy> {
        let (done, result) = tokio::sync::oneshot::channel();
        self.jobs
            .try_send(Box::new(move || {
                let _ = done.send(f());
            }))
            .map_err(|_| PasswordBusy)?;
        result.await.map_err(|_| PasswordBusy)
    }
}

/// Hashes with argon2id (the crate's default parameters: 19 MiB, 2 passes). CPU-heavy: call
/// from a blocking thread.
fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut OsRng);
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

/// Checks a password against a stored PHC hash. CPU-heavy: call from a blocking thread.
fn verify_password(password: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hashes are argon2id and verify only the right password; an unknown user never verifies.
    #[tokio::test]
    async fn passwords_hash_with_argon2id() {
        let passwords = Passwords::new(1).expect("passwords");
        let h = passwords.hash("correct horse".into()).await.expect("hash");
        assert!(h.starts_with("$argon2id$"));
        assert!(passwords
            .verify("correct horse".into(), Some(h.clone()))
            .await
            .expect("verify"));
        assert!(!passwords
            .verify("wrong horse".into(), Some(h))
            .await
            .expect("verify"));
        assert!(!passwords
            .verify("x".into(), Some("not a hash".into()))
            .await
            .expect("verify"));
        assert!(!passwords.verify("x".into(), None).await.expect("verify"));
    }

    /// Length rules count characters for the minimum and bytes for the maximum.
    #[test]
    fn password_rules() {
        assert_eq!(password_problem("short"), Some("password_too_short"));
        assert_eq!(password_problem("éééééééé"), None);
        assert_eq!(
            password_problem(&"x".repeat(1025)),
            Some("password_too_long")
        );
    }
}
