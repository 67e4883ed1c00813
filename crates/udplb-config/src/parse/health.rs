//! `[pools.NAME.health]` and the pool's `notify` command: the health-check part of the reader.

use std::time::Duration;

use toml::de::{DeTable, DeValue};
use udplb_core::health::{Initial, Thresholds};

use super::{Item, Reader, join};
use crate::defaults;
use crate::model::{Expect, HealthCheck, Probe};

const HEALTH_KEYS: &[&str] = &[
    "check",
    "interval",
    "timeout",
    "jitter",
    "rise",
    "fall",
    "passive_fall",
    "initial",
    "port",
    // udp
    "send",
    "send_hex",
    "expect",
    "expect_hex",
    "expect_regex",
    // dns
    "name",
    "type",
    "rcode",
    "answer",
    // http
    "path",
    "host",
    "status",
    "body_contains",
    // exec
    "command",
];

/// Which of the kind-specific keys each check kind reads.
const KIND_KEYS: &[(&str, &[&str])] = &[
    (
        "udp",
        &["send", "send_hex", "expect", "expect_hex", "expect_regex"],
    ),
    ("dns", &["name", "type", "rcode", "answer"]),
    ("tcp", &[]),
    ("http", &["path", "host", "status", "body_contains"]),
    ("exec", &["command"]),
    ("none", &[]),
];

/// Whether `key` belongs to one kind of check only (`send`, `name`, `path`, `command`, …).
pub(super) fn is_kind_key(key: &str) -> bool {
    KIND_KEYS.iter().any(|(_, keys)| keys.contains(&key))
}

/// DNS record types a check may ask for.
const DNS_TYPES: &[&str] = &[
    "A", "AAAA", "CNAME", "MX", "NS", "PTR", "SOA", "SRV", "TXT", "CAA", "ANY",
];
/// DNS response codes a check may expect.
const DNS_RCODES: &[&str] = &[
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED",
];

impl Reader<'_> {
    pub(super) fn health(&mut self, key: &str, t: &DeTable<'_>) -> Option<HealthCheck> {
        self.check_keys(key, t, HEALTH_KEYS);
        let kind = self.required(t, key, "check", |r, k, v| r.named(k, v, check_kind))?;
        self.reject_other_kinds_keys(key, t, kind);
        let probe = match kind {
            "none" => Probe::None,
            "udp" => self.udp_probe(key, t)?,
            "dns" => self.dns_probe(key, t)?,
            "tcp" => Probe::Tcp,
            "http" => self.http_probe(key, t)?,
            _ => Probe::Exec {
                command: self.required(t, key, "command", |r, k, v| r.command(k, v))?,
            },
        };
        let interval = self.duration_or(t, key, "interval", defaults::CHECK_INTERVAL);
        let timeout = self.duration_or(t, key, "timeout", defaults::CHECK_TIMEOUT);
        let jitter = self.duration_or(t, key, "jitter", interval / 10);
        let thresholds = Thresholds {
            rise: self
                .ranged(t, key, "rise", defaults::RISE_FALL_RANGE)
                .unwrap_or(defaults::RISE),
            fall: self
                .ranged(t, key, "fall", defaults::RISE_FALL_RANGE)
                .unwrap_or(defaults::FALL),
            passive_fall: self
                .ranged(t, key, "passive_fall", 0..=1000)
                .unwrap_or(defaults::PASSIVE_FALL),
        };
        let initial = self
            .optional(t, key, "initial", |r, k, v| r.named(k, v, parse_initial))
            .unwrap_or_default();
        let port = self.ranged(t, key, "port", 1..=65535);
        Some(HealthCheck {
            probe,
            interval,
            timeout,
            jitter,
            thresholds,
            initial,
            port,
        })
    }

    /// Keys of another check kind are mistakes (`expect` on a tcp check does nothing).
    fn reject_other_kinds_keys(&mut self, key: &str, t: &DeTable<'_>, kind: &str) {
        for (other, keys) in KIND_KEYS.iter().filter(|(k, _)| *k != kind) {
            for k in keys.iter().filter(|k| t.get(**k).is_some()) {
                if KIND_KEYS
                    .iter()
                    .any(|(kk, ks)| *kk == kind && ks.contains(k))
                {
                    continue;
                }
                self.error_key(
                    &join(key, k),
                    format!("applies to check = \"{other}\", not \"{kind}\""),
                );
            }
        }
    }

    fn udp_probe(&mut self, key: &str, t: &DeTable<'_>) -> Option<Probe> {
        let text = self.optional(t, key, "send", |r, k, v| {
            r.string(k, v).map(|s| s.as_bytes().to_vec())
        });
        let hex = self.optional(t, key, "send_hex", |r, k, v| r.hex(k, v));
        let send = match (text, hex) {
            (Some(s), None) | (None, Some(s)) if !s.is_empty() => s,
            (Some(_), Some(_)) => {
                self.error_key(
                    &join(key, "send_hex"),
                    "give send or send_hex, not both".into(),
                );
                return None;
            }
            (None, None) => return self.reachability_probe(key, t),
            _ => {
                self.error_key(
                    &join(key, "send"),
                    "must not be empty (leave send out to check only that the port is open)".into(),
                );
                return None;
            }
        };
        let expect = self.udp_expect(key, t)?;
        Some(Probe::Udp { send, expect })
    }

    /// A udp check without `send`: the port is open (no refusal), whatever the service
    /// answers; an `expect` key would never be used.
    fn reachability_probe(&mut self, key: &str, t: &DeTable<'_>) -> Option<Probe> {
        for k in ["expect", "expect_hex", "expect_regex"] {
            if t.get(k).is_some() {
                self.error_key(
                    &join(key, k),
                    "needs send or send_hex (without them the check only sends an empty \
                     datagram and expects no reply)"
                        .into(),
                );
                return None;
            }
        }
        Some(Probe::Reachable)
    }

    fn udp_expect(&mut self, key: &str, t: &DeTable<'_>) -> Option<Expect> {
        let text = self.optional(t, key, "expect", |r, k, v| {
            r.string(k, v)
                .map(|s| Expect::Prefix(s.as_bytes().to_vec()))
        });
        let hex = self.optional(t, key, "expect_hex", |r, k, v| {
            r.hex(k, v).map(Expect::Prefix)
        });
        let regex = self.optional(t, key, "expect_regex", |r, k, v| {
            r.regex(k, v).map(Expect::Regex)
        });
        let given: Vec<Expect> = [text, hex, regex].into_iter().flatten().collect();
        match given.len() {
            0 => Some(Expect::Anything),
            1 => given.into_iter().next(),
            _ => {
                self.error_key(
                    &join(key, "expect"),
                    "give one of expect, expect_hex, expect_regex".into(),
                );
                None
            }
        }
    }

    fn dns_probe(&mut self, key: &str, t: &DeTable<'_>) -> Option<Probe> {
        let name = self.required(t, key, "name", |r, k, v| r.string(k, v).map(str::to_string))?;
        let upper = |r: &mut Self, k: &str, v: &Item<'_>, allowed: &[&str]| {
            let s = r.string(k, v)?.to_ascii_uppercase();
            if allowed.contains(&s.as_str()) {
                Some(s)
            } else {
                r.error_at(
                    v.span(),
                    k,
                    format!("{s:?}: expected one of: {}", allowed.join(", ")),
                );
                None
            }
        };
        let qtype = self
            .optional(t, key, "type", |r, k, v| upper(r, k, v, DNS_TYPES))
            .unwrap_or_else(|| "A".into());
        let rcode = self
            .optional(t, key, "rcode", |r, k, v| upper(r, k, v, DNS_RCODES))
            .unwrap_or_else(|| "NOERROR".into());
        let answer = self.optional(t, key, "answer", |r, k, v| {
            r.string(k, v).map(str::to_string)
        });
        Some(Probe::Dns {
            name,
            qtype,
            rcode,
            answer,
        })
    }

    fn http_probe(&mut self, key: &str, t: &DeTable<'_>) -> Option<Probe> {
        let path = self
            .optional(t, key, "path", |r, k, v| r.string(k, v).map(str::to_string))
            .unwrap_or_else(|| "/".into());
        if !path.starts_with('/') {
            self.error_key(&join(key, "path"), format!("{path:?} must start with /"));
        }
        let host = self.optional(t, key, "host", |r, k, v| r.string(k, v).map(str::to_string));
        let status = self
            .optional(t, key, "status", |r, k, v| r.status_range(k, v))
            .unwrap_or((200, 399));
        let body_contains = self.optional(t, key, "body_contains", |r, k, v| {
            r.string(k, v).map(str::to_string)
        });
        Some(Probe::Http {
            path,
            host,
            status,
            body_contains,
        })
    }

    fn duration_or(
        &mut self,
        t: &DeTable<'_>,
        key: &str,
        name: &str,
        default: Duration,
    ) -> Duration {
        self.optional(t, key, name, |r, k, v| r.duration(k, v))
            .unwrap_or(default)
    }

    /// A command: a non-empty array of strings (program first), run without a shell.
    pub(super) fn command(&mut self, key: &str, v: &Item<'_>) -> Option<Vec<String>> {
        let DeValue::Array(items) = v.get_ref() else {
            return self.wrong_type(
                key,
                v,
                "an array of strings, program first: [\"/usr/bin/check\", \"--fast\"]",
            );
        };
        let mut out = Vec::with_capacity(items.len());
        for item in items.iter() {
            out.push(self.string(key, item)?.to_string());
        }
        if out.first().is_none_or(|p| p.is_empty()) {
            self.error_at(v.span(), key, "the command needs at least a program".into());
            return None;
        }
        Some(out)
    }

    fn hex(&mut self, key: &str, v: &Item<'_>) -> Option<Vec<u8>> {
        let s = self.string(key, v)?;
        let digits: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        let bytes = digits
            .len()
            .is_multiple_of(2)
            .then(|| {
                (0..digits.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).ok())
                    .collect()
            })
            .flatten();
        if bytes.is_none() {
            self.error_at(
                v.span(),
                key,
                format!("{s:?} is not hex bytes like \"00ff 1a\""),
            );
        }
        bytes
    }

    fn regex(&mut self, key: &str, v: &Item<'_>) -> Option<String> {
        let s = self.string(key, v)?;
        match regex::bytes::Regex::new(s) {
            Ok(_) => Some(s.to_string()),
            Err(e) => {
                self.error_at(v.span(), key, format!("invalid regular expression: {e}"));
                None
            }
        }
    }

    fn status_range(&mut self, key: &str, v: &Item<'_>) -> Option<(u16, u16)> {
        let s = self.string(key, v)?;
        let (lo, hi) = s.split_once('-').unwrap_or((s, s));
        let range = lo
            .trim()
            .parse::<u16>()
            .ok()
            .zip(hi.trim().parse::<u16>().ok());
        match range {
            Some((lo, hi)) if (100..=599).contains(&lo) && (lo..=599).contains(&hi) => {
                Some((lo, hi))
            }
            _ => {
                self.error_at(
                    v.span(),
                    key,
                    format!("{s:?} is not a status like \"200\" or \"200-399\""),
                );
                None
            }
        }
    }
}

fn check_kind(s: &str) -> Result<&'static str, &'static str> {
    ["udp", "dns", "tcp", "http", "exec", "none"]
        .into_iter()
        .find(|k| *k == s)
        .ok_or("expected one of: udp, dns, tcp, http, exec, none")
}

fn parse_initial(s: &str) -> Result<Initial, &'static str> {
    match s {
        "down" => Ok(Initial::Down),
        "up" => Ok(Initial::Up),
        _ => Err("expected one of: down (until the first check passes), up"),
    }
}
