//! `GET /metrics`: parses as Prometheus text, names follow the conventions, counters move with
//! traffic.

mod common;

use std::net::SocketAddr;

use common::*;

fn scrape(lb: &Udplb) -> (String, prometheus_parse::Scrape) {
    let (content_type, body) = lb.get("/metrics");
    assert!(
        content_type.contains("openmetrics-text") || content_type.contains("text/plain"),
        "{content_type}"
    );
    let lines = body.lines().map(|l| Ok(l.to_string()));
    (
        body.clone(),
        prometheus_parse::Scrape::parse(lines).expect("parses as Prometheus text"),
    )
}

fn value(scrape: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape.samples.iter().find_map(|s| {
        let matches = s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v));
        let v = match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        };
        matches.then_some(v)
    })
}

#[test]
fn metrics_parse_follow_the_conventions_and_move_with_traffic() {
    let a = Backend::start("127.0.0.1", "a");
    let listen: SocketAddr = format!("127.0.0.1:{}", free_udp_port("127.0.0.1"))
        .parse()
        .unwrap();
    let lb = Udplb::start(&[
        "--max-flows",
        "100",
        &listen.to_string(),
        &a.addr.to_string(),
    ]);
    let (text, before) = scrape(&lb);
    let l = [("listener", "default")];
    assert_eq!(
        value(&before, "udplb_datagrams_received_total", &l),
        Some(0.0),
        "{text}"
    );

    let c = client("127.0.0.1:0");
    for _ in 0..3 {
        request(&c, listen, b"hello");
    }
    c.send_to(&[], listen).unwrap();
    assert!(wait_for(DEADLINE, || lb.counter("/drops/empty") == 1
        && lb.counter("/replies_out") >= 3));
    let (text, after) = scrape(&lb);
    assert!(
        value(&after, "udplb_datagrams_received_total", &l).unwrap() >= 4.0,
        "{text}"
    );
    assert!(
        value(&after, "udplb_received_bytes_total", &l).unwrap() >= 15.0,
        "{text}"
    );
    assert!(
        value(&after, "udplb_replies_sent_total", &l).unwrap() >= 3.0,
        "{text}"
    );
    assert_eq!(
        value(
            &after,
            "udplb_drops_total",
            &[("listener", "default"), ("reason", "empty")]
        ),
        Some(1.0)
    );
    assert_eq!(value(&after, "udplb_flows_active", &l), Some(1.0), "{text}");
    assert_eq!(
        value(&after, "udplb_flow_capacity", &l),
        Some(100.0),
        "{text}"
    );
    let backend = a.addr.to_string();
    assert_eq!(
        value(
            &after,
            "udplb_backend_up",
            &[("pool", "default"), ("backend", backend.as_str())]
        ),
        Some(1.0)
    );
    assert!(value(&after, "udplb_process_open_fds", &[]).unwrap() > 0.0);
    let b = [("pool", "default"), ("backend", backend.as_str())];
    assert_eq!(
        value(&after, "udplb_backend_datagrams_forwarded_total", &b),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        value(&after, "udplb_backend_replies_received_total", &b),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        value(&after, "udplb_backend_forwarded_bytes_total", &b),
        Some(15.0),
        "{text}"
    );
    assert!(text.contains("udplb_build_info{version=\""), "{text}");

    // Conventions: every sample has the udplb_ prefix; every counter sample ends in _total;
    // every family has help.
    let mut counters = 0;
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut parts = line.split_whitespace().skip(2);
        let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
        assert!(name.starts_with("udplb_"), "{line}");
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "no help for {name}"
        );
        if kind == "counter" {
            counters += 1;
            for sample in text
                .lines()
                .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            {
                assert!(sample.starts_with(&format!("{name}_total")), "{sample}");
            }
        }
    }
    assert!(counters >= 10, "{text}");
}

/// Every metric the shipped alert rules and Grafana dashboard use exists, so they cannot drift
/// from what udplb exports.
#[test]
fn alerts_and_dashboard_use_only_exported_metrics() {
    let a = Backend::start("127.0.0.1", "a");
    let listen: SocketAddr = format!("127.0.0.1:{}", free_udp_port("127.0.0.1"))
        .parse()
        .unwrap();
    let lb = Udplb::start(&[&listen.to_string(), &a.addr.to_string()]);
    let (_, scrape) = scrape(&lb);
    let exported: std::collections::HashSet<&str> =
        scrape.samples.iter().map(|s| s.metric.as_str()).collect();
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../contrib");
    let alerts = std::fs::read_to_string(root.join("prometheus/alerts.yml")).unwrap();
    let dashboard = std::fs::read_to_string(root.join("grafana/udplb.json")).unwrap();
    let _: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    for (file, text) in [("alerts.yml", &alerts), ("udplb.json", &dashboard)] {
        let used: Vec<&str> = text
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("udplb_"))
            .collect();
        assert!(!used.is_empty(), "{file} uses no metric");
        for name in used {
            assert!(
                exported.contains(name),
                "{file} uses {name}, which udplb does not export"
            );
        }
    }
}
