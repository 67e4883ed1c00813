//! `GET /metrics`: parses as Prometheus text, names follow the conventions, counters move with
//! traffic.

mod common;

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
    let (lb, listen) = Udplb::serve(&["--max-flows", "100"], &[a.addr]);
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
    assert!(value(&after, "process_open_fds", &[]).unwrap() > 0.0);
    let started = value(&after, "process_start_time_seconds", &[]).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now - 600.0..=now + 1.0).contains(&started),
        "{started} vs {now}"
    );
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

    // Conventions: every sample has the udplb_ prefix (the process's have the standard
    // process_ names); every counter sample ends in _total; every family has help.
    let mut counters = 0;
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut parts = line.split_whitespace().skip(2);
        let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
        assert!(
            name.starts_with("udplb_") || name.starts_with("process_"),
            "{line}"
        );
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
    let (lb, _) = Udplb::serve(&[], &[a.addr]);
    let (text, scrape) = scrape(&lb);
    let mut exported: std::collections::HashSet<String> =
        scrape.samples.iter().map(|s| s.metric.clone()).collect();
    // Families without samples yet (histograms fill with traffic) are declared all the same;
    // a histogram's series are its name with _bucket, _sum and _count.
    for line in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let mut parts = line.split_whitespace();
        let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
        exported.insert(name.to_string());
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                exported.insert(format!("{name}{suffix}"));
            }
        }
    }
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
            // The kernel data plane's, which this udplb does not run: tests/kernel.rs checks
            // them against one that does.
            if name.starts_with("udplb_kernel_") && !exported.contains(name) {
                continue;
            }
            assert!(
                exported.contains(name),
                "{file} uses {name}, which udplb does not export"
            );
        }
    }
}

/// The histograms of one family in a scrape, by their `backend` label: (count, sum, buckets).
fn histogram(
    scrape: &prometheus_parse::Scrape,
    metric: &str,
    backend: &str,
) -> Option<(u64, f64, Vec<prometheus_parse::HistogramCount>)> {
    scrape.samples.iter().find_map(|s| {
        if s.metric != metric || s.labels.get("backend") != Some(backend) {
            return None;
        }
        match &s.value {
            prometheus_parse::Value::Histogram(b) => {
                let count = b.last().map_or(0, |c| c.count as u64);
                let sum = scrape
                    .samples
                    .iter()
                    .find(|x| {
                        x.metric == format!("{metric}_sum")
                            && x.labels.get("backend") == Some(backend)
                    })
                    .map_or(f64::NAN, |x| match x.value {
                        prometheus_parse::Value::Untyped(v) | prometheus_parse::Value::Gauge(v) => {
                            v
                        }
                        _ => f64::NAN,
                    });
                Some((count, sum, b.clone()))
            }
            _ => None,
        }
    })
}

#[test]
fn reply_latency_and_check_duration_histograms_fill() {
    let a = Backend::start("127.0.0.1", "a");
    let (admin, listen) = (admin_addr(), listen_addr("127.0.0.1"));
    let lb = run_toml(
        admin,
        &format!(
            "[admin]\nlisten = \"{admin}\"\n[listeners.dns]\naddress = \"{listen}\"\npool = \"p\"\n\
             mode = \"request-response\"\n[pools.p]\nbackends = [\"{}\"]\n[pools.p.health]\n\
             check = \"udp\"\nsend = \"ping\"\nexpect_regex = \":ping$\"\ninterval = \"100ms\"\n\
             timeout = \"100ms\"\nrise = 1\nfall = 1\n",
            a.addr
        ),
    );
    let backend = a.addr.to_string();
    let checks = |lb: &Udplb| {
        histogram(
            &scrape(lb).1,
            "udplb_health_check_duration_seconds",
            &backend,
        )
        .map_or(0, |h| h.0)
    };
    assert!(
        wait_for(DEADLINE, || checks(&lb) >= 2),
        "no check durations"
    );

    // Each request from a fresh port is one request-response exchange: one sample each.
    for _ in 0..5 {
        let c = client("127.0.0.1:0");
        request(&c, listen, b"query");
    }
    assert!(wait_for(DEADLINE, || lb.counter("/replies_out") >= 5));
    let (text, after) = scrape(&lb);
    let (count, sum, buckets) =
        histogram(&after, "udplb_backend_reply_latency_seconds", &backend).expect(&text);
    assert_eq!(count, 5, "{text}");
    assert!(sum > 0.0 && sum < 5.0, "sum {sum}: {text}");
    assert!(
        buckets
            .windows(2)
            .all(|w| w[0].count <= w[1].count && w[0].less_than < w[1].less_than),
        "buckets are cumulative: {text}"
    );
    assert!(buckets.last().unwrap().less_than.is_infinite(), "{text}");
    // A loopback echo answers well within a second.
    let within_1s = buckets.iter().find(|b| b.less_than == 1.0).unwrap().count;
    assert_eq!(within_1s as u64, 5, "{text}");
    let (n, check_sum, _) =
        histogram(&after, "udplb_health_check_duration_seconds", &backend).unwrap();
    assert!(n >= 2 && check_sum > 0.0, "{text}");
}

/// The drops column of `/proc/net/udp` for the sockets bound to 127.0.0.1:`port`: the kernel's own
/// per-socket count of datagrams dropped on a full receive buffer.
fn kernel_drops_on_port(port: u16) -> u64 {
    // Only 127.0.0.1:port, the listeners' address: other tests may hold the same port number
    // on another address (an IPv6 socket, say), with drops of their own.
    let local = format!("0100007F:{port:04X}");
    // The kernel builds the listing a read at a time; a socket another test opens or closes
    // meanwhile can make one socket's line show twice. Each socket counts once, by its inode.
    let per_socket: std::collections::HashMap<String, u64> =
        std::fs::read_to_string("/proc/net/udp")
            .unwrap_or_default()
            .lines()
            .skip(1)
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                if *fields.get(1)? != local {
                    return None;
                }
                Some((fields.get(9)?.to_string(), fields.last()?.parse().ok()?))
            })
            .collect();
    per_socket.values().sum()
}

/// Kernel drops are summed over every listener socket (two listeners here, each dropping
/// while udplb is stopped) and show without any further datagram arriving.
#[test]
fn kernel_drops_sum_every_listener_socket_and_refresh_on_their_own() {
    let a = Backend::start("127.0.0.1", "a");
    let (one, two) = (listen_addr("127.0.0.1"), listen_addr("127.0.0.1"));
    let admin = admin_addr();
    let lb = run_toml(
        admin,
        &format!(
            "[admin]\nlisten = \"{admin}\"\n[runtime]\nworkers = 1\n\
             [listeners.one]\naddress = \"{one}\"\npool = \"p\"\nsocket_buffer = 4096\n\
             [listeners.two]\naddress = \"{two}\"\npool = \"p\"\nsocket_buffer = 4096\n\
             [pools.p]\nbackends = [\"{}\"]\n",
            a.addr
        ),
    );
    // Stopped, udplb reads nothing: its sockets' small buffers fill and the kernel drops the
    // rest, a different number on each listener.
    signal(lb.pid(), "STOP");
    let c = client("127.0.0.1:0");
    for (listener, count) in [(one, 300), (two, 500)] {
        for i in 0..count {
            c.send_to(format!("{i:0>200}").as_bytes(), listener)
                .unwrap();
        }
    }
    signal(lb.pid(), "CONT");
    let (drops_one, drops_two) = (
        kernel_drops_on_port(one.port()),
        kernel_drops_on_port(two.port()),
    );
    assert!(drops_one > 0 && drops_two > 0, "{drops_one} {drops_two}");
    let metric = |listener: &str| {
        value(
            &scrape(&lb).1,
            "udplb_kernel_receive_queue_drops_total",
            &[("listener", listener)],
        )
    };
    // No datagram arrives any more: the counters refresh by themselves.
    assert!(
        wait_for(DEADLINE, || {
            metric("one") == Some(drops_one as f64) && metric("two") == Some(drops_two as f64)
        }),
        "metric {:?} + {:?}, sockets {drops_one} + {drops_two}",
        metric("one"),
        metric("two")
    );
    assert_eq!(
        lb.stats()["rxq_overflow"].as_u64(),
        Some(drops_one + drops_two)
    );
}
