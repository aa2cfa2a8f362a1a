//! Layered configuration loading: a binary's typed defaults, then an optional TOML file, then
//! `CHAT_*` environment variables (`CHAT_GATEWAY_LISTEN` sets key `gateway_listen`).

use std::path::Path;

use serde::de::DeserializeOwned;

/// A configuration that could not be loaded or is invalid. The message names the key.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration: {key} (env CHAT_{env}): {reason}")]
    Invalid {
        key: &'static str,
        env: String,
        reason: String,
    },
}

impl SettingsError {
    /// A validation failure for `key`.
    pub fn invalid(key: &'static str, reason: impl Into<String>) -> Self {
        SettingsError::Invalid {
            key,
            env: key.to_ascii_uppercase(),
            reason: reason.into(),
        }
    }
}

/// Loads `T` from its serde defaults, the optional TOML `file`, and the environment.
/// `T` should carry `#[serde(default)]` so every key is optional.
pub fn load<T: DeserializeOwned>(file: Option<&Path>) -> Result<T, SettingsError> {
    let mut builder = config::Config::builder();
    if let Some(path) = file {
        builder = builder.add_source(
            config::File::from(path)
                .format(config::FileFormat::Toml)
                .required(true),
        );
    }
    builder = builder.add_source(config::Environment::with_prefix("CHAT").prefix_separator("_"));
    Ok(builder.build()?.try_deserialize()?)
}

/// The machine's hostname, the default node id and consumer name.
pub fn hostname_or(default: &str) -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| hostname::get().ok().and_then(|h| h.into_string().ok()))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| default.to_string())
}

/// Checks a listen address such as `0.0.0.0:8080`.
pub fn parse_listen(key: &'static str, value: &str) -> Result<std::net::SocketAddr, SettingsError> {
    value.parse().map_err(|_| {
        SettingsError::invalid(
            key,
            format!("{value:?} is not an address like 0.0.0.0:8080"),
        )
    })
}

/// The Redis target of `redis_url` and `redis_cluster_urls` (comma-separated seeds; not empty:
/// a cluster), each URL checked.
pub fn redis_target(
    redis_url: &str,
    cluster_urls: &str,
) -> Result<crate::redis_conn::RedisTarget, SettingsError> {
    let target = crate::redis_conn::RedisTarget::from_settings(redis_url, cluster_urls);
    let key = if target.is_cluster() {
        "redis_cluster_urls"
    } else {
        "redis_url"
    };
    for url in target.urls() {
        if !url.starts_with("redis://") && !url.starts_with("rediss://") {
            return Err(SettingsError::invalid(
                key,
                "every URL must start with redis:// or rediss://",
            ));
        }
    }
    Ok(target)
}

/// Checks the Redis (when used) and Postgres URL schemes.
pub fn check_urls(redis_url: Option<&str>, database_url: &str) -> Result<(), SettingsError> {
    if redis_url.is_some_and(|u| !u.starts_with("redis://") && !u.starts_with("rediss://")) {
        return Err(SettingsError::invalid(
            "redis_url",
            "must start with redis:// or rediss://",
        ));
    }
    if !database_url.starts_with("postgres://") && !database_url.starts_with("postgresql://") {
        return Err(SettingsError::invalid(
            "database_url",
            "must start with postgres://",
        ));
    }
    Ok(())
}

/// Checks the tracing settings shared by both binaries and returns the export endpoint, if any
/// (`otel_endpoint` empty or unset turns export off).
pub fn check_tracing(
    endpoint: Option<&str>,
    sampling_ratio: f64,
) -> Result<Option<String>, SettingsError> {
    if !(0.0..=1.0).contains(&sampling_ratio) {
        return Err(SettingsError::invalid(
            "otel_sampling_ratio",
            "must be 0.0 to 1.0",
        ));
    }
    match endpoint.map(str::trim).filter(|e| !e.is_empty()) {
        None => Ok(None),
        Some(e) if e.starts_with("http://") || e.starts_with("https://") => Ok(Some(e.to_string())),
        Some(_) => Err(SettingsError::invalid(
            "otel_endpoint",
            "must be an OTLP/HTTP URL such as http://otel-collector:4318",
        )),
    }
}

/// Checks a key prefix: non-empty, short, and free of characters that break key parsing.
pub fn check_prefix(key: &'static str, value: &str) -> Result<(), SettingsError> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(SettingsError::invalid(
            key,
            "use 1 to 64 characters from [A-Za-z0-9._-]",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(default)]
    struct Sample {
        sample_port: u16,
        sample_name: String,
    }

    impl Default for Sample {
        fn default() -> Self {
            Sample {
                sample_port: 1,
                sample_name: "default".into(),
            }
        }
    }

    /// A TOML file overrides defaults, and a bad value names its key.
    #[test]
    fn file_overrides_defaults_and_errors_name_the_key() {
        let dir = std::env::temp_dir().join(format!("chat-settings-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let good = dir.join("good.toml");
        std::fs::write(&good, "sample_port = 7\n").expect("write");
        let s: Sample = load(Some(&good)).expect("load");
        assert_eq!(s.sample_port, 7);
        assert_eq!(s.sample_name, "default");

        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "sample_port = \"seven\"\n").expect("write");
        let err = load::<Sample>(Some(&bad))
            .expect_err("must fail")
            .to_string();
        assert!(err.contains("sample_port"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Prefixes that would break key parsing are refused.
    #[test]
    fn prefix_rules() {
        assert!(check_prefix("redis_prefix", "chat").is_ok());
        assert!(check_prefix("redis_prefix", "").is_err());
        assert!(check_prefix("redis_prefix", "a:b").is_err());
        assert!(check_prefix("redis_prefix", "a{b}").is_err());
    }
}
