//! Network namespaces for the tests that need hosts other than this one (root only): a
//! namespace joined to the host by a veth pair ([`Namespace`]), namespaces joined only to each
//! other ([`Net`]: routers, balancers, LANs), and this test binary run again inside them to
//! serve or to send there.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// `ip ARGS...`; `Err` says which command failed and why.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("`ip` cannot run: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A network namespace with a veth link to the host; on drop, what runs in it is killed and
/// the link and the namespace are removed.
pub struct Namespace {
    pub name: String,
    /// The host's end of the link.
    pub host_if: String,
    /// The namespace's end of the link.
    pub ns_if: String,
    children: Vec<Child>,
}

impl Namespace {
    /// Creates namespace `name` and a veth pair, `host_if` on the host with `host_addr` and
    /// `ns_if` inside with `ns_addr` (both `ADDRESS/PREFIX`), both up, with the namespace's
    /// loopback up and, given a `gateway`, its default route through it. Whatever an earlier
    /// run left under these names is removed first. `Err` says what failed when this host
    /// cannot (a container without the rights to make namespaces, say); what was made until
    /// then is removed.
    pub fn create(
        name: &str,
        host_if: &str,
        ns_if: &str,
        host_addr: &str,
        ns_addr: &str,
        gateway: Option<&str>,
    ) -> Result<Namespace, String> {
        let ns = Namespace {
            name: name.to_string(),
            host_if: host_if.to_string(),
            ns_if: ns_if.to_string(),
            children: Vec::new(),
        };
        let _ = ip(&["netns", "del", name]);
        let _ = ip(&["link", "del", host_if]);
        ip(&["netns", "add", name])?;
        ip(&[
            "link", "add", host_if, "type", "veth", "peer", "name", ns_if,
        ])?;
        ip(&["link", "set", ns_if, "netns", name])?;
        ip(&["addr", "add", host_addr, "dev", host_if])?;
        ip(&["link", "set", host_if, "up"])?;
        ip(&["-n", name, "addr", "add", ns_addr, "dev", ns_if])?;
        ip(&["-n", name, "link", "set", ns_if, "up"])?;
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        if let Some(gateway) = gateway {
            ip(&["-n", name, "route", "add", "default", "via", gateway])?;
        }
        Ok(ns)
    }

    /// Whether programs can run inside (`ip netns exec NAME true`).
    pub fn can_exec(&self) -> Result<(), String> {
        let ok = Command::new("ip")
            .args(["netns", "exec", &self.name, "true"])
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(())
            .ok_or_else(|| format!("`ip netns exec {} true` failed", self.name))
    }

    /// This test binary, run inside the namespace to run only its test `helper` (a test that
    /// does its part when `env` asks it to, see [`serve_if_asked`]).
    pub fn command(&self, helper: &str, env: &[(&str, String)]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name])
            .arg(std::env::current_exe().unwrap())
            .args([helper, "--exact", "--nocapture", "--test-threads=1"]);
        for (k, v) in env {
            c.env(k, v);
        }
        c
    }

    /// Starts [`Namespace::command`] in the background, its output discarded, until the
    /// namespace is dropped.
    pub fn serve(&mut self, helper: &str, env: &[(&str, String)]) {
        let child = self
            .command(helper, env)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start a helper in the namespace");
        self.children.push(child);
    }

    /// Sets the namespace's end of the link down: the host keeps its route and neighbour
    /// entry, so datagrams leave and vanish, with no ICMP coming back.
    pub fn black_hole(&self) {
        ip(&["-n", &self.name, "link", "set", &self.ns_if, "down"]).unwrap();
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        for mut c in self.children.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// The body of a test that is not one on its own: when the environment variable `var` names
/// an address, serves UDP there until killed, answering each datagram with
/// `answer(payload, sender)`; without it, returns at once. [`Namespace::serve`] runs it inside
/// a namespace.
pub fn serve_if_asked(var: &str, answer: impl Fn(&[u8], SocketAddr) -> Vec<u8>) {
    let Ok(addr) = std::env::var(var) else {
        return;
    };
    let socket = UdpSocket::bind(addr.as_str()).expect("bind the namespaced server");
    if std::env::var_os("UDPLB_TEST_NO_DF").is_some() {
        without_df(&socket);
    }
    let mut buf = vec![0u8; 65_536];
    loop {
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&answer(&buf[..n], from), from);
        }
    }
}

/// Makes `socket` send IPv4 datagrams without DF (IP_PMTUDISC_DONT: fragmented by routers
/// on the way, as some DNS servers send their answers).
pub fn without_df(socket: &UdpSocket) {
    set_option(
        socket,
        libc::IPPROTO_IP,
        libc::IP_MTU_DISCOVER,
        libc::IP_PMTUDISC_DONT,
        "IP_MTU_DISCOVER",
    );
}

/// Makes `socket` send IPv4 datagrams with no UDP checksum (zero, SO_NO_CHECK), as some
/// embedded senders do.
pub fn without_checksum(socket: &UdpSocket) {
    set_option(
        socket,
        libc::SOL_SOCKET,
        libc::SO_NO_CHECK,
        1,
        "SO_NO_CHECK",
    );
}

/// Sets the integer option `name` (`what`, for the message) of `socket` to `value`.
fn set_option(
    socket: &UdpSocket,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
    what: &str,
) {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is the live socket's; the option value is a c_int of the size
    // given, read by the kernel during the call only.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "{what}: {}", std::io::Error::last_os_error());
}

/// Namespaces linked to each other by veth pairs (none to the host), removed on drop with
/// what runs in them.
pub struct Net {
    names: Vec<String>,
    children: Vec<Child>,
    pub dir: PathBuf,
}

impl Net {
    pub fn new(dir: PathBuf) -> Net {
        Net {
            names: Vec::new(),
            children: Vec::new(),
            dir,
        }
    }

    pub fn add(&mut self, name: &str) -> Result<(), String> {
        let _ = ip(&["netns", "del", name]);
        ip(&["netns", "add", name])?;
        self.names.push(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"])
    }

    /// A veth pair between `a` (interface `ia`, address `xa`) and `b`.
    pub fn link(
        &self,
        a: &str,
        ia: &str,
        xa: &str,
        b: &str,
        ib: &str,
        xb: &str,
    ) -> Result<(), String> {
        ip(&[
            "-n", a, "link", "add", ia, "type", "veth", "peer", "name", ib, "netns", b,
        ])?;
        ip(&["-n", a, "addr", "add", xa, "dev", ia])?;
        ip(&["-n", b, "addr", "add", xb, "dev", ib])?;
        ip(&["-n", a, "link", "set", ia, "up"])?;
        ip(&["-n", b, "link", "set", ib, "up"])
    }

    pub fn exec(ns: &str, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program);
        c
    }

    /// This test binary's `helper` inside `ns`.
    pub fn helper(ns: &str, helper: &str, env: &[(&str, String)]) -> Command {
        let mut c = Net::exec(ns, &std::env::current_exe().unwrap());
        c.args([helper, "--exact", "--nocapture", "--test-threads=1"]);
        for (k, v) in env {
            c.env(k, v);
        }
        c
    }

    /// `udplb run -c CONFIG` inside `ns` (as the other tests' udplb: staying root), its
    /// standard error in `log`.
    pub fn udplb(ns: &str, config: &Path, log: &Path) -> Command {
        let mut c = Net::exec(ns, Path::new(env!("CARGO_BIN_EXE_udplb")));
        c.args(["run", "-c"])
            .arg(config)
            .env("UDPLB_ALLOW_ROOT", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap());
        c
    }

    pub fn keep(&mut self, child: Child) -> u32 {
        let pid = child.id();
        self.children.push(child);
        pid
    }

    pub fn bird(&mut self, ns: &str, name: &str, config: &str) -> u32 {
        let file = self.dir.join(format!("{name}.conf"));
        std::fs::write(&file, config).unwrap();
        let child = Net::exec(ns, Path::new("bird"))
            .arg("-f")
            .arg("-c")
            .arg(&file)
            .arg("-s")
            .arg(self.dir.join(format!("{name}.ctl")))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start bird");
        self.keep(child)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for mut c in self.children.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in &self.names {
            // Also what the children started (an upgrade's successor, a daemon that forked):
            // left running, it would go on in a namespace nobody can reach.
            if let Ok(out) = Command::new("ip").args(["netns", "pids", n]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-KILL", pid]).status();
                }
            }
            let _ = ip(&["netns", "del", n]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
