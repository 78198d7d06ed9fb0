//! The string formats kube-openapi's `strfmt` registry checks in CRD
//! schemas. Formats it does not know pass, as they do on the real server.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::LazyLock;

use base64::Engine;
use regex::Regex;

static UUID: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$")
        .expect("static regex")
});
static HOSTNAME: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^([a-zA-Z0-9]([a-zA-Z0-9\-]{0,61}[a-zA-Z0-9])?\.)*[a-zA-Z0-9]([a-zA-Z0-9\-]{0,61}[a-zA-Z0-9])?\.?$")
        .expect("static regex")
});
static EMAIL: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[^@\s]+@[^@\s]+$").expect("static regex"));
static MAC: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^([0-9A-Fa-f]{2}[:-]){5}([0-9A-Fa-f]{2})$").expect("static regex")
});
static DATE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^\d{4}-\d{2}-\d{2}$").expect("static regex"));
static DURATION: LazyLock<Regex> = LazyLock::new(|| {
    // go-openapi's duration: Go units, or a number and a long unit name.
    Regex::new(r"^((-?[0-9]+(\.[0-9]*)?(ns|us|µs|ms|s|m|h))+|[0-9]+\s*(ns|us|µs|ms|s|m|h|d|w|second|seconds|sec|secs|minute|minutes|min|mins|hour|hours|hr|hrs|day|days|week|weeks)|0)$")
        .expect("static regex")
});
static HEXCOLOR: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^#?([0-9a-fA-F]{3}|[0-9a-fA-F]{6})$").expect("static regex"));

/// Whether `text` is a valid value of string format `format`.
pub(crate) fn string_matches(format: &str, text: &str) -> bool {
    match format {
        "date-time" | "datetime" => chrono::DateTime::parse_from_rfc3339(text).is_ok(),
        "date" => {
            DATE.is_match(text) && chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d").is_ok()
        }
        "duration" => DURATION.is_match(text),
        "uuid" | "uuid3" | "uuid4" | "uuid5" => UUID.is_match(text),
        "ipv4" => text.parse::<Ipv4Addr>().is_ok(),
        "ipv6" => text.parse::<Ipv6Addr>().is_ok(),
        "cidr" => cidr(text),
        "hostname" => text.len() <= 255 && HOSTNAME.is_match(text),
        "email" => EMAIL.is_match(text),
        "mac" => MAC.is_match(text),
        "byte" => base64::engine::general_purpose::STANDARD
            .decode(text)
            .is_ok(),
        "uri" => uri(text),
        "hexcolor" => HEXCOLOR.is_match(text),
        _ => true,
    }
}

fn cidr(text: &str) -> bool {
    let Some((addr, bits)) = text.split_once('/') else {
        return false;
    };
    let Ok(bits) = bits.parse::<u8>() else {
        return false;
    };
    if let Ok(_v4) = addr.parse::<Ipv4Addr>() {
        bits <= 32
    } else if let Ok(_v6) = addr.parse::<Ipv6Addr>() {
        bits <= 128
    } else {
        false
    }
}

/// Go's `url.ParseRequestURI`: an absolute URI or an absolute path.
fn uri(text: &str) -> bool {
    if text.starts_with('/') {
        return !text.contains(char::is_whitespace);
    }
    match text.split_once(':') {
        Some((scheme, rest)) => {
            !scheme.is_empty()
                && scheme
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
                && !rest.is_empty()
                && !text.contains(char::is_whitespace)
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::string_matches;

    #[test]
    fn formats_accept_and_reject_like_strfmt() {
        for (f, good, bad) in [
            ("date-time", "2024-01-02T03:04:05Z", "yesterday"),
            ("date", "2024-02-29", "2023-02-29"),
            ("uuid", "123e4567-e89b-12d3-a456-426614174000", "123"),
            ("ipv4", "10.0.0.1", "10.0.0.256"),
            ("ipv6", "fe80::1", "fe80::g"),
            ("cidr", "10.0.0.0/8", "10.0.0.0/33"),
            ("hostname", "host-1.example.com", "-bad-.com"),
            ("byte", "aGVsbG8=", "not base64!"),
            ("uri", "https://example.com/x", "no scheme"),
            ("duration", "1h30m", "forever"),
            ("mac", "52:54:00:12:34:56", "52:54:00"),
        ] {
            assert!(string_matches(f, good), "{f} should accept {good}");
            assert!(!string_matches(f, bad), "{f} should reject {bad}");
        }
        assert!(string_matches("k8s-unknown-format", "anything"));
    }
}
