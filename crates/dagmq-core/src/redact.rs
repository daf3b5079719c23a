//! What keeps dagmq's own secrets out of sight: URLs with their passwords masked for logs and
//! error messages, and the environment variables a task's process must not inherit.

use url::Url;

/// What a hidden secret looks like.
const HIDDEN: &str = "***";

/// The environment variables that carry dagmq's own secrets, or name the files that hold them:
/// API and metrics tokens, broker and store URLs (with their passwords), the webhook URL (often a
/// capability in itself), the client key for mutual TLS, and the config file's path (the file
/// may hold the webhook URL). A task's process never inherits them, so a task that prints its
/// environment leaks nothing into a log every API reader sees.
pub const SECRET_ENV_VARS: &[&str] = &[
    "DAGMQ_API_TOKEN",
    "DAGMQ_API_TOKEN_FILE",
    "DAGMQ_METRICS_TOKEN",
    "DAGMQ_METRICS_TOKEN_FILE",
    "DAGMQ_AMQP_URL",
    "DAGMQ_AMQP_URL_FILE",
    "DAGMQ_REDIS_URL",
    "DAGMQ_REDIS_URL_FILE",
    "DAGMQ_REDIS_SENTINEL",
    "DAGMQ_REDIS_SENTINEL_FILE",
    "DAGMQ_NOTIFY_WEBHOOK",
    "DAGMQ_NOTIFY_WEBHOOK_FILE",
    "DAGMQ_TLS_KEY",
    "DAGMQ_CONFIG",
];

/// A URL with its password (or its user, when it has no password), and the values of query
/// parameters that look like secrets (`password=`, `..._token=`), replaced by `***`, for logs
/// and errors. The URL is read by a
/// URL parser, so a password holding `@`, `:` or percent-escapes is masked whole. A URL no parser
/// can read (a raw `/` in the password, several hosts) has everything between its scheme and its
/// last `@` hidden, which may hide more than the password but never less. A comma-separated list
/// of URLs (the nodes of one cluster, `--amqp URL,URL`) has each of its URLs masked so.
pub fn mask_url(url: &str) -> String {
    if let Some(elements) = list_elements(url) {
        return elements.iter().map(|element| mask_url(element)).collect::<Vec<_>>().join(",");
    }
    if let Ok(mut parsed) = Url::parse(url)
        && !parsed.cannot_be_a_base()
    {
        let mut changed = false;
        if parsed.password().is_some() && parsed.set_password(Some(HIDDEN)).is_ok() {
            changed = true;
        } else if !parsed.username().is_empty() && parsed.set_username(HIDDEN).is_ok() {
            // A user without a password is, for many clients, the password itself
            // (`redis://SECRET@host`): hidden too.
            changed = true;
        }
        if parsed.query_pairs().any(|(key, _)| secret_query_key(&key)) {
            let pairs: Vec<(String, String)> = parsed
                .query_pairs()
                .map(|(key, value)| {
                    let value = if secret_query_key(&key) { HIDDEN.to_string() } else { value.into_owned() };
                    (key.into_owned(), value)
                })
                .collect();
            parsed.query_pairs_mut().clear().extend_pairs(pairs);
            changed = true;
        }
        // Unchanged, the URL is shown as given rather than as the parser would spell it.
        return if changed { parsed.to_string() } else { url.to_string() };
    }
    match hidden_span(url) {
        Some((start, end)) => format!("{}{HIDDEN}{}", &url[..start], &url[end..]),
        None => url.to_string(),
    }
}

/// `text` (an error message from a client library) with `url` in it masked, and its password
/// hidden wherever it shows on its own, raw or percent-decoded.
pub fn scrub_url(text: &str, url: &str) -> String {
    if let Some(elements) = list_elements(url) {
        let whole = text.replace(url, &mask_url(url));
        return elements.iter().fold(whole, |text, element| scrub_url(&text, element));
    }
    let mut scrubbed = text.replace(url, &mask_url(url));
    let mut secrets = Vec::new();
    if let Ok(parsed) = Url::parse(url)
        && let Some(secret) = parsed.password().or(Some(parsed.username()).filter(|user| !user.is_empty()))
    {
        secrets.push(secret.to_string());
        secrets.push(percent_decode(secret));
    } else if let Some((start, end)) = hidden_span(url) {
        let userinfo = &url[start..end];
        secrets.push(userinfo.split_once(':').map_or(userinfo, |(_, password)| password).to_string());
    }
    // Longest first, so a password that contains another form of itself is hidden whole; short
    // ones are left, so that hiding them cannot shred the message.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    for secret in secrets.iter().filter(|s| s.len() >= 4) {
        scrubbed = scrubbed.replace(secret.as_str(), HIDDEN);
    }
    scrubbed
}

/// The elements (trimmed) of a comma-separated list of URLs; `None` for one URL. A comma counts
/// as a separator only when some element after it has a scheme of its own, so a single URL with
/// several hosts (`redis://:pw@h1:6379,h2:6379`) stays one, and so does one whose password
/// holds a raw comma (`redis://:pa,ss@host`: legal in a URL's userinfo), which split at its
/// comma would show both halves of the password.
fn list_elements(text: &str) -> Option<Vec<&str>> {
    let elements: Vec<&str> = text.split(',').map(str::trim).collect();
    let own = |element: &&str| element.contains("://");
    (elements.len() > 1 && elements[1..].iter().any(own)).then_some(elements)
}

/// Where the part to hide of a URL no parser can read starts and ends: after `scheme://` (or
/// `scheme:`) up to its last `@`; from the start when no scheme comes before that `@` (the
/// tail of a URL cut at a comma of its password, `ss@host:5672`).
fn hidden_span(url: &str) -> Option<(usize, usize)> {
    let at = url.rfind('@')?;
    let start = match url.find("://") {
        Some(i) => i + 3,
        None => url.find(':').filter(|&i| i < at).map_or(0, |i| i + 1),
    };
    (start <= at).then_some((start, at))
}

/// Whether a query parameter's value is a secret by its name.
fn secret_query_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["pass", "pwd", "secret", "token"].iter().any(|word| key.contains(word)) || key == "key" || key.ends_with("_key")
}

/// `%XX` escapes decoded, bytes that are not UTF-8 replaced.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
            }
            (byte, _, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The masked form of `url` must be exactly `masked`.
    fn check(url: &str, masked: &str) {
        assert_eq!(mask_url(url), masked, "masking {url:?}");
    }

    #[test]
    fn masks_passwords() {
        check("redis://:secret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0");
        check("amqp://dagmq:s3cret@h:5672/v", "amqp://dagmq:***@h:5672/v");
        check("amqps://guest:guest@localhost:5671/%2f", "amqps://guest:***@localhost:5671/%2f");
        check("redis://127.0.0.1", "redis://127.0.0.1");
    }

    #[test]
    fn masks_a_user_without_a_password() {
        // For Redis (and many other clients) a lone user is the password.
        check("redis://SECRET@127.0.0.1:1", "redis://***@127.0.0.1:1");
        check("amqp://SECRETUSERONLY@h:5672/%2f", "amqp://***@h:5672/%2f");
        assert_eq!(
            scrub_url("cannot connect to SECRETUSERONLY at h", "amqp://SECRETUSERONLY@h:5672/%2f"),
            "cannot connect to *** at h"
        );
    }

    #[test]
    fn masks_passwords_with_characters_that_fool_a_split() {
        // The userinfo ends at the last `@` of the authority, not the first.
        check("redis://:Redis@Pw@host:6379/0", "redis://:***@host:6379/0");
        check("amqp://u:a@b@c@rabbit/%2f", "amqp://u:***@rabbit/%2f");
        // A `:` in the password belongs to the password.
        check("amqp://dagmq:pa:ss:word@h:5672/v", "amqp://dagmq:***@h:5672/v");
        // Percent-encoded characters, and a user name with one.
        check("amqp://us%40er:p%40ss%2Fw%3Ard@h/%2f", "amqp://us%40er:***@h/%2f");
        check("rediss://:%F0%9F%94%91@[::1]:6380", "rediss://:***@[::1]:6380");
        // A `?` or `#` in the password, encoded, stays inside it.
        check("redis://:a%3Fb%23c@h", "redis://:***@h");
    }

    #[test]
    fn hides_all_it_cannot_parse_up_to_the_last_at() {
        // A raw `/` ends the authority early: no URL parser finds the host, so everything
        // before the last `@` is hidden.
        check("redis://:pa/ss@host:6379", "redis://***@host:6379");
        // Several hosts are not a URL either.
        check("redis://:pw@h1:6379,h2:6379/0", "redis://***@h1:6379,h2:6379/0");
        check("amqp:user:secret@host", "amqp:***@host");
        check("not a url", "not a url");
    }

    #[test]
    fn masks_every_url_of_a_list() {
        // The nodes of one RabbitMQ cluster (`--amqp URL,URL,...`): each password hidden.
        check(
            "amqp://u:pw1@h1:5672/%2f,amqp://u:pw2@h2:5672/%2f, amqps://v:pw3@h3/v",
            "amqp://u:***@h1:5672/%2f,amqp://u:***@h2:5672/%2f,amqps://v:***@h3/v",
        );
        check("amqp://h1/%2f,amqp://h2/%2f", "amqp://h1/%2f,amqp://h2/%2f");
        // An element no parser reads is hidden up to its last `@`, as alone.
        check("amqp://u:pw1@h1,amqp://u:pa/ss@h2", "amqp://u:***@h1,amqp://***@h2");
        let list = "amqp://u:secret1@h1/%2f,amqp://u:secret2@h2/%2f";
        assert_eq!(
            scrub_url(&format!("cannot connect to {list}: secret2 refused"), list),
            "cannot connect to amqp://u:***@h1/%2f,amqp://u:***@h2/%2f: *** refused"
        );
    }

    /// A raw comma is legal in a URL's userinfo (RFC 3986 sub-delims) and the Redis and AMQP
    /// clients accept it, so one URL whose password holds a comma is not a list of URLs: its
    /// password must be hidden whole, never half of it in each "element".
    #[test]
    fn masks_a_single_url_whose_password_holds_a_comma() {
        for url in ["redis://:s3cr3t,pw0rd@host:6379/0", "amqp://user:s3cr3t,pw0rd@host:5672/%2f"] {
            let masked = mask_url(url);
            assert!(!masked.contains("s3cr3t") && !masked.contains("pw0rd"), "{url} masked as {masked}");
            let scrubbed = scrub_url(&format!("cannot connect to {url}"), url);
            assert!(!scrubbed.contains("s3cr3t") && !scrubbed.contains("pw0rd"), "{url} scrubbed as {scrubbed}");
        }
        // What `--amqp` shows of such a URL cut at its comma (`node_urls`: "the RabbitMQ URL
        // pw0rd@host:5672/%2f is not an amqp:// or amqps:// URL"): the tail of the password.
        let tail = mask_url("pw0rd@127.0.0.1:5672/%2f");
        assert!(!tail.contains("pw0rd"), "the element after the comma masked as {tail}");
    }

    #[test]
    fn masks_secrets_in_the_query() {
        check("redis://h/0?password=hunter2&db=1", "redis://h/0?password=***&db=1");
        check("amqp://h/%2f?heartbeat=10&auth_token=t0k", "amqp://h/%2f?heartbeat=10&auth_token=***");
    }

    #[test]
    fn scrubs_a_url_and_its_password_out_of_an_error() {
        let url = "amqp:u:p4ssw0rd@h";
        assert_eq!(scrub_url(&format!("Invalid URL: '{url}'"), url), "Invalid URL: 'amqp:***@h'");
        let url = "redis://:Redis@Pw@host";
        assert_eq!(scrub_url("auth failed for Redis@Pw and Redis%40Pw", url), "auth failed for *** and ***");
        assert_eq!(scrub_url("connection refused", "redis://:pw@h"), "connection refused");
    }

    #[test]
    fn decodes_percent_escapes() {
        assert_eq!(percent_decode("a%40b%2Fc%zz%4"), "a@b/c%zz%4");
    }
}
