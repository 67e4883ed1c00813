//! SIP messages over UDP (RFC 3261): just enough to find a message's `Call-ID`.
//!
//! Owns: recognising a request or status line and reading the header section up to the
//! blank line, for the `Call-ID` header (or its compact form `i`). Must not: read the body
//! or parse anything else of a message.

/// What a datagram holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// A message and its Call-ID (surrounding whitespace removed).
    CallId(&'a [u8]),
    /// A keep-alive (RFC 5626: CRLF pairs): no message, no key.
    KeepAlive,
}

/// Why bytes are not a SIP message with a Call-ID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Malformed;

/// Reads `data` as a SIP message: a start line naming `SIP/2.0`, then header lines; returns
/// its Call-ID.
pub fn call_id(data: &[u8]) -> Result<Message<'_>, Malformed> {
    if data.iter().all(|&b| b == b'\r' || b == b'\n') {
        return Ok(Message::KeepAlive);
    }
    let mut lines = data.split(|&b| b == b'\n').map(trim_cr);
    let start = lines.next().ok_or(Malformed)?;
    let is_request = start.ends_with(b" SIP/2.0");
    let is_status = start.starts_with(b"SIP/2.0 ");
    if !is_request && !is_status {
        return Err(Malformed);
    }
    for line in lines {
        if line.is_empty() {
            break;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = line[..colon].trim_ascii();
        if name.eq_ignore_ascii_case(b"call-id") || name.eq_ignore_ascii_case(b"i") {
            let value = line[colon + 1..].trim_ascii();
            return if value.is_empty() {
                Err(Malformed)
            } else {
                Ok(Message::CallId(value))
            };
        }
    }
    Err(Malformed)
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    const INVITE: &[u8] = b"INVITE sip:bob@example.test SIP/2.0\r\n\
        Via: SIP/2.0/UDP pc33.example.test;branch=z9hG4bK776asdhds\r\n\
        To: Bob <sip:bob@example.test>\r\n\
        Call-ID:  a84b4c76e66710@pc33.example.test \r\n\
        CSeq: 314159 INVITE\r\n\
        Content-Length: 0\r\n\r\n";

    #[test]
    fn finds_the_call_id_of_requests_and_responses() {
        assert_eq!(
            call_id(INVITE),
            Ok(Message::CallId(b"a84b4c76e66710@pc33.example.test"))
        );
        let ok = b"SIP/2.0 200 OK\r\ni: abc\r\n\r\n";
        assert_eq!(call_id(ok), Ok(Message::CallId(b"abc")));
        let lf_only = b"BYE sip:x SIP/2.0\ncall-id: z\n\n";
        assert_eq!(call_id(lf_only), Ok(Message::CallId(b"z")));
        assert_eq!(call_id(b"\r\n\r\n"), Ok(Message::KeepAlive));
    }

    #[test]
    fn not_sip_or_no_call_id_is_malformed() {
        assert_eq!(call_id(b"GET / HTTP/1.1\r\n\r\n"), Err(Malformed));
        assert_eq!(
            call_id(b"OPTIONS sip:x SIP/2.0\r\nTo: a\r\n\r\n"),
            Err(Malformed)
        );
        assert_eq!(
            call_id(b"OPTIONS sip:x SIP/2.0\r\nCall-ID:  \r\n"),
            Err(Malformed)
        );
        // A Call-ID in the body is not the message's.
        assert_eq!(
            call_id(b"OPTIONS sip:x SIP/2.0\r\nTo: a\r\n\r\nCall-ID: body\r\n"),
            Err(Malformed)
        );
        assert_eq!(call_id(b""), Ok(Message::KeepAlive));
        assert_eq!(call_id(b"\xff\xfe"), Err(Malformed));
    }
}
