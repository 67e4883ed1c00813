//! The HTTP check: one `GET` over TCP, healthy when the status is in range and the body holds
//! the expected string (ldirectord's `check.txt` pattern).
//!
//! Owns: the request and the parsing of the response (status line, headers, body with chunked
//! transfer decoding). Must not: follow redirects, keep connections, or read more than
//! [`MAX_RESPONSE`] bytes.

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::probe::{Failure, Outcome, io_failure, timed_out};

/// Largest response read; a larger one fails the check.
const MAX_RESPONSE: u64 = 1 << 20;

/// What an HTTP check asks and expects.
pub struct HttpCheck {
    pub path: String,
    pub host: Option<String>,
    pub status: RangeInclusive<u16>,
    pub body_contains: Option<String>,
}

/// GETs `check.path` from `target` within `timeout` and judges the response.
pub async fn probe(target: SocketAddr, check: &HttpCheck, timeout: Duration) -> Outcome {
    let response = tokio::time::timeout(timeout, fetch(target, check))
        .await
        .unwrap_or_else(|_| Err(timed_out(timeout)))?;
    judge(&response, check).map_err(Failure::Backend)
}

async fn fetch(target: SocketAddr, check: &HttpCheck) -> Result<Vec<u8>, Failure> {
    let mut stream = TcpStream::connect(target)
        .await
        .map_err(|e| io_failure("connect", &e))?;
    let host = check.host.clone().unwrap_or_else(|| target.to_string());
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nUser-Agent: udplb-health\r\nAccept: */*\r\n\r\n",
        check.path
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| io_failure("send", &e))?;
    let mut response = Vec::new();
    stream
        .take(MAX_RESPONSE + 1)
        .read_to_end(&mut response)
        .await
        .map_err(|e| io_failure("receive", &e))?;
    if response.len() as u64 > MAX_RESPONSE {
        return Err("response larger than 1 MiB".into());
    }
    Ok(response)
}

fn judge(response: &[u8], check: &HttpCheck) -> Result<(), String> {
    let (head, body) = split_head(response).ok_or("malformed response")?;
    let status = status_code(head).ok_or("malformed response")?;
    if !check.status.contains(&status) {
        return Err(format!(
            "status {status}, expected {}..={}",
            check.status.start(),
            check.status.end()
        ));
    }
    let Some(needle) = &check.body_contains else {
        return Ok(());
    };
    let body = if is_chunked(head) {
        dechunk(body).ok_or("malformed chunked body")?
    } else {
        body.to_vec()
    };
    if contains(&body, needle.as_bytes()) {
        Ok(())
    } else {
        Err(format!("body lacks {needle:?}"))
    }
}

fn split_head(response: &[u8]) -> Option<(&str, &[u8])> {
    let end = response.windows(4).position(|w| w == b"\r\n\r\n")?;
    Some((
        std::str::from_utf8(&response[..end]).ok()?,
        &response[end + 4..],
    ))
}

/// The status of a `HTTP/1.x NNN reason` line.
fn status_code(head: &str) -> Option<u16> {
    let line = head.lines().next()?;
    let mut parts = line.split_whitespace();
    parts.next().filter(|v| v.starts_with("HTTP/"))?;
    parts.next()?.parse().ok()
}

fn is_chunked(head: &str) -> bool {
    head.lines().skip(1).any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("transfer-encoding")
                && v.to_ascii_lowercase().contains("chunked")
        })
    })
}

/// Decodes a chunked body (sizes in hex, optional extensions, ends at a zero chunk).
fn dechunk(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&body[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(body: Option<&str>) -> HttpCheck {
        HttpCheck {
            path: "/".into(),
            host: None,
            status: 200..=399,
            body_contains: body.map(str::to_string),
        }
    }

    #[test]
    fn judges_status_and_body() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 18\r\n\r\nwebserverisworking";
        assert_eq!(judge(ok, &check(Some("webserverisworking"))), Ok(()));
        assert_eq!(
            judge(ok, &check(Some("nope"))),
            Err("body lacks \"nope\"".into())
        );
        let down = b"HTTP/1.0 503 Service Unavailable\r\n\r\n";
        assert_eq!(
            judge(down, &check(None)),
            Err("status 503, expected 200..=399".into())
        );
    }

    #[test]
    fn decodes_chunked_bodies() {
        let r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6;x=y\r\nwebser\r\nc\r\nverisworking\r\n0\r\n\r\n";
        assert_eq!(judge(r, &check(Some("webserverisworking"))), Ok(()));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for r in [
            &b""[..],
            b"HTTP/1.1\r\n\r\n",
            b"SSH-2.0\r\n\r\n",
            b"HTTP/1.1 abc\r\n\r\n",
            b"\xff\xfe\r\n\r\n",
        ] {
            assert!(judge(r, &check(None)).is_err(), "{r:?}");
        }
        let bad_chunks = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
        assert!(judge(bad_chunks, &check(Some("x"))).is_err());
        let short_chunk = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nff\r\nabc";
        assert!(judge(short_chunk, &check(Some("abc"))).is_err());
    }
}
