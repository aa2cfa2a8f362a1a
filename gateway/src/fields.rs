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
    url.len() <= MAX_AVATAR_URL_BYTES
        && !url.chars().any(|c| c.is_whitespace() || c.is_control())
        && url
            .strip_prefix("https://")
            .and_then(|rest| rest.split(['/', '?', '#']).next())
            .is_some_and(|host| !host.is_empty() && !host.contains('@'))
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

    /// Names are trimmed by the caller; empty, too long or with control characters fail.
    #[test]
    fn names() {
        assert_eq!(name_problem(""), Some("name_required"));
        assert_eq!(name_problem("Zoë"), None);
        assert_eq!(name_problem("a\u{7}"), Some("name_invalid"));
        assert_eq!(name_problem(&"x".repeat(101)), Some("name_invalid"));
    }
}
