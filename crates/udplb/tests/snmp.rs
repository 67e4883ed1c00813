//! udplb in front of two real SNMP agents (Debian's snmpd), walked with SNMPv3 authPriv by
//! `snmpwalk`: engine discovery and the requests that follow must reach one agent. Needs the
//! packages snmpd and snmp (`scripts/test.sh` installs them as root); the test fails with
//! that message otherwise.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::*;

fn need_here(bin: &str) -> PathBuf {
    need(bin, "snmpd and snmp")
}

/// The subtree walked: `system` (fixed values but sysUpTime).
const SYSTEM: &str = ".1.3.6.1.2.1.1";
const SYS_UPTIME: &str = ".1.3.6.1.2.1.1.3.0";

/// An snmpd process, killed when dropped.
struct Agent {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The SNMP tools' own state and configuration, kept in `dir` (not /var/lib/snmp or
/// /etc/snmp), and no MIB files: numeric OIDs only.
fn snmp_env(cmd: &mut Command, dir: &Path) {
    cmd.env("SNMP_PERSISTENT_DIR", dir.join("persist"))
        .env("SNMPCONFPATH", dir)
        .env("MIBS", "");
}

/// An agent named `name` on a free port of 127.0.0.1 with the SNMPv3 user `lbuser` (SHA, AES)
/// and an engine ID of its own (made from its name), its state in a scratch directory.
fn start_agent(name: &str) -> Agent {
    let dir = scratch_dir(name);
    std::fs::create_dir_all(dir.join("persist")).unwrap();
    let addr = listen_addr("127.0.0.1");
    let engine: String = name.bytes().map(|b| format!("{b:02x}")).collect();
    std::fs::write(
        dir.join("snmpd.conf"),
        format!(
            "[snmp] persistentDir {d}/persist\nexactEngineID 0x80001f8804{engine}\n\
             sysName {name}\nsysLocation location-of-{name}\nsysContact contact-of-{name}\n\
             sysServices 72\nrocommunity public 127.0.0.1\n\
             createUser lbuser SHA authpass123 AES privpass123\nrouser lbuser authPriv\n\
             dontLogTCPWrappersConnects yes\n",
            d = dir.display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(need_here("snmpd"));
    snmp_env(&mut cmd, &dir);
    cmd.args(["-f", "-Lo", "-C", "-c"])
        .arg(dir.join("snmpd.conf"))
        .arg("-p")
        .arg(dir.join("snmpd.pid"))
        .args(["-I", "-smux,mteTrigger,mteTriggerConf"])
        .arg(format!("udp:{addr}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut agent = Agent {
        child: cmd.spawn().expect("start snmpd"),
        addr,
    };
    let client = scratch_dir(&format!("{name}-client"));
    let ready = wait_for(DEADLINE, || {
        if let Ok(Some(status)) = agent.child.try_wait() {
            panic!("snmpd {name} exited: {status}");
        }
        let mut get = Command::new(need_here("snmpget"));
        snmp_env(&mut get, &client);
        get.args(["-v2c", "-c", "public", "-t", "0.1", "-r", "0"])
            .arg(addr.to_string())
            .arg(".1.3.6.1.2.1.1.5.0");
        get.output().is_ok_and(|o| o.status.success())
    });
    assert!(ready, "snmpd {name} never answered on {addr}");
    agent
}

/// An SNMPv3 authPriv walk of `system` at `target` with 1 s timeouts and one retry: its lines
/// (sysUpTime left out), and which agent answered (its sysName).
fn walk_v3(target: SocketAddr, client: &Path) -> (Vec<String>, String) {
    let mut cmd = Command::new(need_here("snmpwalk"));
    snmp_env(&mut cmd, client);
    cmd.args(["-v3", "-l", "authPriv", "-u", "lbuser", "-a", "SHA", "-A"])
        .args(["authpass123", "-x", "AES", "-X", "privpass123", "-On"])
        .args(["-t", "1", "-r", "1"])
        .arg(target.to_string())
        .arg(SYSTEM);
    let out = cmd.output().expect("run snmpwalk");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "snmpwalk {target}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let name = text
        .lines()
        .find(|l| l.starts_with(".1.3.6.1.2.1.1.5.0 "))
        .and_then(|l| l.split('"').nth(1))
        .unwrap_or_default()
        .to_string();
    let lines = text
        .lines()
        .filter(|l| !l.starts_with(SYS_UPTIME))
        .map(|l| l.replace(&name, "AGENT"))
        .collect();
    (lines, name)
}

#[test]
fn snmpv3_walks_reach_one_agent_with_persistence() {
    let one = start_agent("agent-1");
    let two = start_agent("agent-2");
    let client = scratch_dir("snmp-client");
    let (direct, name) = walk_v3(one.addr, &client);
    assert_eq!(name, "agent-1");
    assert!(direct.len() > 20, "{direct:?}");

    let backends = [quoted(one.addr), quoted(two.addr)];
    let (lb, listen) = run_one_pool(
        "127.0.0.1",
        "mode = \"request-response\"\npersistence = \"30s\"",
        &backends,
        "",
    );
    for _ in 0..3 {
        let before = lb.counter("/forwarded");
        let (through, name) = walk_v3(listen, &client);
        assert!(name == "agent-1" || name == "agent-2", "{name}");
        assert_eq!(through, direct, "the walk through udplb, from {name}");
        // Engine discovery, one request per value and the one that ends the walk: no retry
        // (a request that reached the other agent would have cost one, and a second).
        let sent = lb.counter("/forwarded") - before;
        assert_eq!(sent, direct.len() as u64 + 3, "{}", lb.stats());
    }
}
