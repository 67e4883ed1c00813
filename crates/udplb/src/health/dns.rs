//! The DNS check: one real query (built and parsed with hickory-proto) over UDP.
//!
//! Owns: building the query and judging the reply. Must not: retry (the monitor's rise/fall
//! handles flakiness) or follow referrals.

use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RecordType};

use super::probe::{Failure, Outcome, io_failure, timed_out};

/// What a DNS check asks and expects.
pub struct DnsCheck {
    pub name: String,
    pub qtype: RecordType,
    pub rcode: ResponseCode,
    pub answer: Option<String>,
}

/// Parses a record type name ("A", "aaaa", "TXT").
pub fn parse_type(s: &str) -> Result<RecordType, String> {
    s.to_ascii_uppercase()
        .parse()
        .map_err(|_| format!("{s:?} is not a DNS record type (A, AAAA, TXT, SOA, …)"))
}

/// Parses a response code name ("NOERROR", "nxdomain").
pub fn parse_rcode(s: &str) -> Result<ResponseCode, String> {
    Ok(match s.to_ascii_uppercase().as_str() {
        "NOERROR" => ResponseCode::NoError,
        "FORMERR" => ResponseCode::FormErr,
        "SERVFAIL" => ResponseCode::ServFail,
        "NXDOMAIN" => ResponseCode::NXDomain,
        "NOTIMP" => ResponseCode::NotImp,
        "REFUSED" => ResponseCode::Refused,
        _ => {
            return Err(format!(
                "{s:?} is not a response code (NOERROR, NXDOMAIN, REFUSED, SERVFAIL, …)"
            ));
        }
    })
}

/// Asks `target` and judges the reply: same id, QR set, the question echoed (the same name, in
/// any case), the expected
/// rcode and (if given) the expected answer. Other datagrams are ignored until the deadline.
pub async fn probe(target: SocketAddr, check: &DnsCheck, timeout: Duration) -> Outcome {
    let deadline = Instant::now() + timeout;
    let name = absolute(&check.name)?;
    let id = RandomState::new().hash_one(Instant::now()) as u16;
    let mut query = Message::new(id, MessageType::Query, OpCode::Query);
    query.add_query(Query::query(name.clone(), check.qtype));
    let wire = query
        .to_vec()
        .map_err(|e| format!("encoding the query: {e}"))?;
    let socket = super::probe::connected_udp(target).await?;
    socket
        .send(&wire)
        .await
        .map_err(|e| io_failure("send", &e))?;
    let mut buf = vec![0u8; 65_536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let n = match tokio::time::timeout(left, socket.recv(&mut buf)).await {
            Err(_) => return Err(timed_out(timeout)),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                return Err("refused (nothing listens)".into());
            }
            Ok(Err(e)) => return Err(io_failure("receive", &e)),
            Ok(Ok(n)) => n,
        };
        let Ok(reply) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        if reply.metadata.id != id || reply.metadata.message_type != MessageType::Response {
            continue;
        }
        return judge(&reply, &name, check).map_err(Failure::Backend);
    }
}

/// The name a check asks for, absolute whether written with the trailing dot or not (a check
/// cannot rely on a search list). Names compare case-insensitively.
fn absolute(name: &str) -> Result<Name, String> {
    let mut parsed = Name::from_ascii(name).map_err(|e| format!("bad name {name:?}: {e}"))?;
    parsed.set_fqdn(true);
    Ok(parsed)
}

fn judge(reply: &Message, name: &Name, check: &DnsCheck) -> Result<(), String> {
    let echoed = reply.queries.iter().any(|q| {
        q.name() == name && q.query_type() == check.qtype && q.query_class() == DNSClass::IN
    });
    if !echoed {
        return Err("the reply does not echo the question".into());
    }
    let rcode = reply.metadata.response_code;
    if rcode != check.rcode {
        return Err(format!("rcode {rcode}, expected {}", check.rcode));
    }
    let Some(expected) = &check.answer else {
        return Ok(());
    };
    let got: Vec<String> = reply.answers.iter().map(|r| r.data.to_string()).collect();
    let matches = |text: &String| text == expected || text.trim_matches('"') == expected;
    if got.iter().any(matches) {
        Ok(())
    } else {
        Err(format!("no answer {expected} (got: {})", got.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_absolute_with_or_without_its_dot_and_compares_in_any_case() {
        let plain = absolute("www.example.test").unwrap();
        let dotted = absolute("www.example.test.").unwrap();
        let shouting = absolute("WWW.Example.TEST").unwrap();
        assert_eq!(plain, dotted);
        assert_eq!(plain, shouting);
        assert!(plain.is_fqdn());
        // What a server echoes back is parsed from the wire: absolute, in its own case.
        let echoed = Name::from_ascii("www.EXAMPLE.test.").unwrap();
        assert_eq!(plain, echoed);
        assert!(absolute("bad..name").is_err());
    }
}
