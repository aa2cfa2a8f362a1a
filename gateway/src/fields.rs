//! The field rules of the HTTP API that more than one handler applies: display names (users
//! and rooms), email addresses, avatar URLs. Passwords have theirs in `passwords`.

/// Longest display name, in characters.
pub const MAX_NAME_CHARS: usize = 100;
/// Longest email address, in bytes.
pub const MAX_EMAIL_BYTES: usize = 254;
/// Longest avatar URL, in bytes.
const MAX_AVATAR_URL_BYTES: usize = 2048;

/// The field code for a bad (trimmed) display name.
pub fn name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("name_required")
    } else if name.chars().count() > MAX_NAME_CHARS || name.chars().any(char::is_control) {
        Some("name_invalid")
    } else {
        None
    }
}

/// Checks an email address loosely: one `@`, a dotted domain, no spaces, bounded length.
pub fn email_is_valid(email: &str) -> bool {
    if email.len() > MAX_EMAIL_BYTES || email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return false;
    }
    match email.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && !domain.contains('@')
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
        }
        None => false,
    }
}

/// An avatar URL: `https://`, a host, no whitespace or control characters, bounded.
pub fn avatar_url_is_valid(url: &str) -> bool {
    avatar_host(url).is_some()
}

/// The host (with its port, if any) of a valid avatar URL, lowercased.
fn avatar_host(url: &str) -> Option<String> {
    if url.len() > MAX_AVATAR_URL_BYTES || url.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return None;
    }
    url.strip_prefix("https://")
        .and_then(|rest| rest.split(['/', '?', '#']).next())
        .filter(|host| !host.is_empty() && !host.contains('@'))
        .map(str::to_ascii_lowercase)
}

/// The field code for an avatar URL that is not allowed: not a valid `https://` URL
/// (`avatar_url_invalid`), or on a host the operator did not list in `avatar_hosts`
/// (`avatar_url_host_not_allowed`; the page's CSP would not load it, and other clients would
/// tell that host who looks at the picture).
pub fn avatar_url_problem(url: &str, allowed_hosts: &[String]) -> Option<&'static str> {
    match avatar_host(url) {
        None => Some("avatar_url_invalid"),
        Some(host) if !allowed_hosts.contains(&host) => Some("avatar_url_host_not_allowed"),
        Some(_) => None,
    }
}

/// Parses `avatar_hosts`: comma-separated host names, each optionally with a port
/// (`cdn.example.com`, `127.0.0.1:8443`), lowercased.
pub fn parse_avatar_hosts(list: &str) -> Result<Vec<String>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|h| {
            let ok = h.len() <= 255
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
                && !h.starts_with(['.', '-', ':']);
            if ok {
                Ok(h.to_ascii_lowercase())
            } else {
                Err(format!("{h:?} is not a host name (with an optional :port)"))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The email check accepts ordinary addresses and refuses malformed ones.
    #[test]
    fn email_validation() {
        for ok in ["a@b.co", "first.last+tag@example.org"] {
            assert!(email_is_valid(ok), "{ok}");
        }
        for bad in [
            "", "a", "a@", "@b.co", "a@b", "a b@c.de", "a@b@c.de", "a@.com", "a@com.",
        ] {
            assert!(!email_is_valid(bad), "{bad}");
        }
    }

    /// Avatar URLs must be https with a host, and bounded.
    #[test]
    fn avatar_urls() {
        assert!(avatar_url_is_valid("https://cdn.example.com/a.png?s=64"));
        for bad in [
            "http://cdn.example.com/a.png",
            "https://",
            "https:///a.png",
            "javascript:alert(1)",
            "https://a b.com/",
            "https://user@evil.com/",
        ] {
            assert!(!avatar_url_is_valid(bad), "{bad}");
        }
        assert!(!avatar_url_is_valid(&format!(
            "https://a.com/{}",
            "x".repeat(2100)
        )));
    }

    /// Only listed hosts are allowed, whatever the case; a bad list entry is refused.
    #[test]
    fn avatar_hosts_are_an_allow_list() {
        let hosts = parse_avatar_hosts(" CDN.example.com, 127.0.0.1:1 ,").expect("parse");
        assert_eq!(hosts, vec!["cdn.example.com", "127.0.0.1:1"]);
        assert_eq!(
            avatar_url_problem("https://cdn.EXAMPLE.com/a.png", &hosts),
            None
        );
        assert_eq!(
            avatar_url_problem("https://127.0.0.1:1/a.svg", &hosts),
            None
        );
        assert_eq!(
            avatar_url_problem("https://evil.example/a.png", &hosts),
            Some("avatar_url_host_not_allowed")
        );
        assert_eq!(
            avatar_url_problem("https://cdn.example.com:444/a.png", &hosts),
            Some("avatar_url_host_not_allowed"),
            "another port is another origin"
        );
        assert_eq!(
            avatar_url_problem("http://cdn.example.com/a.png", &hosts),
            Some("avatar_url_invalid")
        );
        assert_eq!(
            avatar_url_problem("https://cdn.example.com/a.png", &[]),
            Some("avatar_url_host_not_allowed"),
            "no hosts: no avatars"
        );
        assert!(parse_avatar_hosts("cdn.example.com/x").is_err());
        assert!(parse_avatar_hosts("https://cdn.example.com").is_err());
    }

    /// Names are trimmed by the caller; empty, too long or with control characters fail.
    #[test]
    fn names() {
        assert_eq!(name_problem(""), Some("name_required"));
        assert_eq!(name_problem("Zoë"), None);
        assert_eq!(name_problem("a\u{7}"), Some("name_invalid"));
        assert_eq!(name_problem(&"x".repeat(101)), Some("name_invalid"));
    }
}
