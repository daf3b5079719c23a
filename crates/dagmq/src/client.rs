//! A small HTTP/1.1 client for the CLI and the webhook notifier: one request per connection,
//! JSON bodies, plain `http://` (the API listens on loopback by default).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest a request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest response read, in bytes.
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// An `http://host:port/prefix` address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Path prefix, without a trailing slash.
    pub path: String,
}

impl HttpUrl {
    /// Parses `http://host[:port][/path]`.
    pub fn parse(url: &str) -> Result<HttpUrl, String> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            format!("{url:?} is not an http:// address (https is not supported here; put a local TLS proxy in front)")
        })?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => {
                (host, port.parse::<u16>().map_err(|_| format!("{url:?}: bad port {port:?}"))?)
            }
            _ => (authority, 80),
        };
        if host.is_empty() {
            return Err(format!("{url:?}: missing host"));
        }
        Ok(HttpUrl { host: host.trim_matches(['[', ']']).to_string(), port, path: path.to_string() })
    }
}

/// A response: status and body.
#[derive(Debug)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Body (chunked encoding already decoded).
    pub body: Vec<u8>,
}

/// Sends one request and reads the whole response.
pub async fn request(
    url: &HttpUrl,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    token: Option<&str>,
) -> Result<HttpResponse, String> {
    tokio::time::timeout(REQUEST_TIMEOUT, request_inner(url, method, path, body, token)).await.map_err(|_| {
        format!("{method} http://{}:{}{}{path}: no answer within {REQUEST_TIMEOUT:?}", url.host, url.port, url.path)
    })?
}

async fn request_inner(
    url: &HttpUrl,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    token: Option<&str>,
) -> Result<HttpResponse, String> {
    let target = format!("http://{}:{}{}{}", url.host, url.port, url.path, path);
    let mut stream = TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|e| format!("cannot connect to {target}: {e}"))?;
    let body = body.unwrap_or_default();
    let mut head = format!(
        "{method} {}{path} HTTP/1.1\r\nHost: {}:{}\r\nConnection: close\r\nAccept: application/json\r\nContent-Length: {}\r\n",
        url.path,
        url.host,
        url.port,
        body.len()
    );
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    if let Some(token) = token {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.map_err(|e| format!("{target}: {e}"))?;
    stream.write_all(body).await.map_err(|e| format!("{target}: {e}"))?;
    let mut raw = Vec::new();
    (&mut stream).take(MAX_RESPONSE_BYTES as u64).read_to_end(&mut raw).await.map_err(|e| format!("{target}: {e}"))?;
    parse_response(&raw).map_err(|e| format!("{target}: {e}"))
}

/// Parses a whole HTTP/1.1 response.
fn parse_response(raw: &[u8]) -> Result<HttpResponse, String> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or("malformed response: no end of headers")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("malformed status line {status_line:?}"))?;
    let chunked = lines.any(|l| {
        let lower = l.to_ascii_lowercase();
        lower.starts_with("transfer-encoding:") && lower.contains("chunked")
    });
    let body = &raw[split + 4..];
    let body = if chunked { decode_chunked(body)? } else { body.to_vec() };
    Ok(HttpResponse { status, body })
}

fn decode_chunked(mut body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n").ok_or("malformed chunked body")?;
        let size_text = String::from_utf8_lossy(&body[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if body.len() < size + 2 {
            return Err("truncated chunked body".to_string());
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        assert_eq!(
            HttpUrl::parse("http://127.0.0.1:9191").unwrap(),
            HttpUrl { host: "127.0.0.1".into(), port: 9191, path: String::new() }
        );
        assert_eq!(HttpUrl::parse("http://hooks.local/a/b/").unwrap().path, "/a/b");
        assert_eq!(HttpUrl::parse("http://hooks.local/a").unwrap().port, 80);
        assert!(HttpUrl::parse("https://x").unwrap_err().contains("not an http:// address"));
        assert!(HttpUrl::parse("http://x:notaport").unwrap_err().contains("bad port"));
    }

    #[test]
    fn parses_plain_and_chunked_responses() {
        let plain = parse_response(b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!((plain.status, plain.body.as_slice()), (201, &b"{}"[..]));
        let chunked =
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
                .unwrap();
        assert_eq!(chunked.body, b"abcde");
        assert!(parse_response(b"garbage").is_err());
    }
}
