//! The status page at `/` on the admin port, loaded in a real headless browser (Debian's
//! chromium): listeners, pools and backends with their health and state appear.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

use common::*;

fn chromium() -> PathBuf {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("chromium not found: install Debian's chromium (scripts/test.sh does as root)")
}

/// The page's DOM after its scripts ran (virtual time lets the first fetch complete).
fn rendered(url: &str) -> String {
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=5000",
            "--dump-dom",
            url,
        ])
        .output()
        .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn status_page_shows_backends_and_their_states_in_a_browser() {
    let live = Backend::start("127.0.0.1", "live");
    let dead = listen_addr("127.0.0.1");
    let admin = admin_addr();
    let listen = listen_addr("127.0.0.1");
    let lb = run_toml(
        admin,
        &format!(
            "[admin]\nlisten = \"{admin}\"\nallow_changes = true\n[listeners.dns]\naddress = \"{listen}\"\npool = \"servers\"\n\
             [pools.servers]\nbackends = [\"{}\", {{ address = \"{dead}\", state = \"draining\" }}]\n\
             [pools.servers.health]\ncheck = \"udp\"\nsend = \"ping\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\n\
             rise = 1\nfall = 1\n",
            live.addr
        ),
    );
    assert!(wait_for(DEADLINE, || {
        let b = &lb.stats()["pools"][0]["backends"];
        b[0]["healthy"] == true && b[1]["checks_failed"].as_u64().unwrap_or(0) > 0
    }));

    let dom = rendered(&format!("http://{admin}/"));
    assert!(
        dom.contains(r#"data-listener="dns""#),
        "listener missing: {dom}"
    );
    assert!(dom.contains("Pool servers"), "pool missing: {dom}");
    let row = |addr: SocketAddr| {
        let start = dom
            .find(&format!(r#"data-backend="{addr}""#))
            .unwrap_or_else(|| panic!("{addr} missing: {dom}"));
        dom[start..start + dom[start..].find("</tr>").unwrap()].to_string()
    };
    let live_row = row(live.addr);
    assert!(
        live_row.contains(r#"<td class="up">up</td>"#) && live_row.contains("<td>enabled</td>"),
        "{live_row}"
    );
    // Live flows and rates per backend, version and uptime, drops by reason.
    assert!(
        dom.contains(&format!(
            r#"<span id="version">{}</span>"#,
            env!("CARGO_PKG_VERSION")
        )),
        "version missing: {dom}"
    );
    assert!(
        dom.contains("<th>flows</th>") && dom.contains("<th>to/s</th>"),
        "per-backend traffic missing: {dom}"
    );
    assert!(
        !dom.contains(r#"<span id="uptime">-</span>"#),
        "uptime missing: {dom}"
    );
    // Changes are allowed: an enabled backend can be drained or disabled from the page, a
    // draining one enabled.
    assert!(
        live_row.contains(r#"data-action="drain""#)
            && live_row.contains(r#"data-action="disable""#),
        "{live_row}"
    );
    let dead_row = row(dead);
    assert!(dead_row.contains(r#"data-action="enable""#), "{dead_row}");
    assert!(
        dead_row.contains(r#"<td class="down">down</td>"#)
            && dead_row.contains("<td>draining</td>"),
        "{dead_row}"
    );
}
