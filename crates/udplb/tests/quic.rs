//! QUIC through udplb: two quinn servers issuing QUIC-LB connection IDs (`udplb-quic-lb`)
//! behind a pool with `payload_key` `kind = "quic-lb"`, and clients that change their address
//! in the middle of a download: quinn clients (`Endpoint::rebind`, as a NAT rebinding does)
//! and Debian's ngtcp2 client (`gtlsclient --change-local-addr`, an active migration with
//! path validation, over HTTP/3). Every download completes with the right bytes (judged by
//! the bytes, not by gtlsclient's exit status, which is 0 whatever happened); the new path
//! reaches the server that holds the connection although nothing about the client's address
//! says so. Needs the package ngtcp2-client (`scripts/test.sh` installs it as root).

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use udplb_quic_lb::{QuicLbConfig, QuicLbGenerator};

/// The ALPN of the tests' own protocol ("N\n" asks for N bytes).
const RAW_ALPN: &[u8] = b"udplb-test";

/// Bytes each download fetches, and after how many the client moves.
const DOWNLOAD: usize = 1 << 20;
const MOVE_AFTER: usize = 256 << 10;

/// The byte at `i` of every download (a pattern a truncation or a mix-up cannot match).
fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 9)) as u8
}

fn crypto() -> (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let key = rustls::pki_types::PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der());
    (vec![cert.cert.der().clone()], key.into())
}

/// A quinn server on a free port of 127.0.0.1 issuing QUIC-LB IDs with `server_id`, counting
/// the clients it saw change address in `moves`. Each bidirectional stream asks
/// for a number of bytes ("N\n") and gets that many of [`pattern`] (ALPN [`RAW_ALPN`]); over
/// HTTP/3 (ALPN `h3`), `GET /N` does.
fn start_server(
    runtime: &tokio::runtime::Runtime,
    server_id: u8,
    certs: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    moves: Arc<AtomicUsize>,
) -> SocketAddr {
    let _guard = runtime.enter();
    let config = QuicLbConfig::new(0, vec![server_id], 6).unwrap();
    let mut endpoint_config = quinn::EndpointConfig::default();
    endpoint_config.cid_generator(move || Box::new(QuicLbGenerator::new(config.clone())));
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    tls.alpn_protocols = vec![b"h3".to_vec(), RAW_ALPN.to_vec()];
    // quinn takes 0 or u32::MAX.
    tls.max_early_data_size = u32::MAX;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    let server_config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let endpoint = quinn::Endpoint::new(
        endpoint_config,
        Some(server_config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .unwrap();
    let addr = endpoint.local_addr().unwrap();
    runtime.spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let moves = Arc::clone(&moves);
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                tokio::spawn(count_moves(conn.clone(), moves));
                let alpn = conn
                    .handshake_data()
                    .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
                    .and_then(|d| d.protocol);
                if alpn.as_deref() == Some(b"h3") {
                    serve_h3(conn).await;
                    return;
                }
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        let request = recv.read_to_end(64).await.unwrap_or_default();
                        let n: usize = String::from_utf8_lossy(&request)
                            .trim()
                            .parse()
                            .unwrap_or(0);
                        let body: Vec<u8> = (0..n).map(pattern).collect();
                        let _ = send.write_all(&body).await;
                        let _ = send.finish();
                        let _ = send.stopped().await;
                    });
                }
            });
        }
    });
    addr
}

/// Counts the times `conn`'s client address changes, until it closes.
async fn count_moves(conn: quinn::Connection, moves: Arc<AtomicUsize>) {
    let mut last = conn.remote_address();
    while conn.close_reason().is_none() {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = conn.remote_address();
        if now != last {
            moves.fetch_add(1, Ordering::Relaxed);
            last = now;
        }
    }
}

/// HTTP/3 on `conn`: `GET /N` answers N bytes of [`pattern`].
async fn serve_h3(conn: quinn::Connection) {
    let Ok(mut h3) =
        h3::server::Connection::<_, bytes::Bytes>::new(h3_quinn::Connection::new(conn)).await
    else {
        return;
    };
    while let Ok(Some(resolver)) = h3.accept().await {
        tokio::spawn(async move {
            let Ok((request, mut stream)) = resolver.resolve_request().await else {
                return;
            };
            let n: usize = request
                .uri()
                .path()
                .trim_start_matches('/')
                .parse()
                .unwrap_or(0);
            let response = http::Response::builder()
                .status(200)
                .header("content-length", n)
                .body(())
                .unwrap();
            if stream.send_response(response).await.is_err() {
                return;
            }
            for start in (0..n).step_by(64 << 10) {
                let end = (start + (64 << 10)).min(n);
                let chunk: Vec<u8> = (start..end).map(pattern).collect();
                if stream.send_data(bytes::Bytes::from(chunk)).await.is_err() {
                    return;
                }
            }
            let _ = stream.finish().await;
        });
    }
}

/// What one download got: its bytes were all right, and the client moved mid-way.
#[derive(Debug)]
struct Download {
    complete: bool,
    moved: bool,
}

/// Downloads [`DOWNLOAD`] bytes from `target` through a client endpoint of its own, which
/// moves to a new local port after [`MOVE_AFTER`] bytes.
async fn download(
    target: SocketAddr,
    roots: Arc<rustls::RootCertStore>,
) -> Result<Download, String> {
    let mut endpoint =
        quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).map_err(|e| e.to_string())?;
    let crypto = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut crypto = crypto;
    crypto.alpn_protocols = vec![RAW_ALPN.to_vec()];
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(crypto).map_err(|e| e.to_string())?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let conn = endpoint
        .connect(target, "localhost")
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(format!("{DOWNLOAD}\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    let mut got = 0usize;
    let mut right = true;
    let mut moved = false;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match tokio::time::timeout(Duration::from_secs(5), recv.read(&mut buf)).await {
            Err(_) => return Err(format!("stalled after {got} bytes (moved: {moved})")),
            Ok(Err(e)) => return Err(format!("after {got} bytes (moved: {moved}): {e}")),
            Ok(Ok(None)) => break,
            Ok(Ok(Some(n))) => n,
        };
        right &= buf[..n]
            .iter()
            .enumerate()
            .all(|(i, &b)| b == pattern(got + i));
        got += n;
        if !moved && got >= MOVE_AFTER {
            // A new local port: to the balancer, a new client address.
            let socket = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
            endpoint.rebind(socket).map_err(|e| e.to_string())?;
            moved = true;
        }
    }
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    Ok(Download {
        complete: right && got == DOWNLOAD,
        moved,
    })
}

/// Two servers (IDs 01 and 02) on a runtime of their own, the roots that trust them, and the
/// count of client moves they saw.
struct Servers {
    /// One thread runs servers and clients alike, whenever the test waits on it.
    runtime: tokio::runtime::Runtime,
    roots: Arc<rustls::RootCertStore>,
    one: SocketAddr,
    two: SocketAddr,
    moves: Arc<AtomicUsize>,
}

fn two_servers() -> Servers {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (certs, key) = crypto();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certs[0].clone()).unwrap();
    let moves = Arc::new(AtomicUsize::new(0));
    let one = start_server(
        &runtime,
        1,
        certs.clone(),
        key.clone_key(),
        Arc::clone(&moves),
    );
    let two = start_server(&runtime, 2, certs, key, Arc::clone(&moves));
    Servers {
        runtime,
        roots: Arc::new(roots),
        one,
        two,
        moves,
    }
}

/// udplb in flow mode in front of `one` (server ID 01) and `two` (02), routing by QUIC-LB.
fn quic_lb_in_front_of(one: SocketAddr, two: SocketAddr) -> (Udplb, SocketAddr) {
    run_one_pool(
        "127.0.0.1",
        "mode = \"flow\"",
        &[quoted(one), quoted(two)],
        &format!(
            "scheduler = \"maglev\"\n[pools.p.payload_key]\nkind = \"quic-lb\"\n\
             server_id_length = 1\nserver_ids = {{ \"{one}\" = \"01\", \"{two}\" = \"02\" }}"
        ),
    )
}

#[test]
fn quic_connections_survive_the_client_moving_with_quic_lb() {
    let Servers {
        runtime,
        roots,
        one,
        two,
        ..
    } = two_servers();
    let (lb, listen) = quic_lb_in_front_of(one, two);
    // Directly first: the servers and the client work.
    let direct = runtime.block_on(download(one, Arc::clone(&roots)));
    assert!(
        direct.as_ref().is_ok_and(|d| d.complete && d.moved),
        "{direct:?}"
    );

    let results: Vec<Result<Download, String>> = runtime.block_on(async {
        let tasks: Vec<_> = (0..12)
            .map(|_| tokio::spawn(download(listen, Arc::clone(&roots))))
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    let complete = results
        .iter()
        .filter(|r| r.as_ref().is_ok_and(|d| d.complete && d.moved))
        .count();
    assert_eq!(complete, 12, "{results:?}\n{}", lb.stats());
    // Both servers served connections (12 random Initial IDs all on one server: 1 in 2,048),
    // and each connection's two paths were two flows.
    let stats = lb.stats();
    for b in 0..2 {
        assert!(
            stats["pools"][0]["backends"][b]["forwarded"]
                .as_u64()
                .unwrap()
                > 0,
            "{stats}"
        );
    }
    assert!(lb.counter("/flows/created") >= 24, "{stats}");
    assert_eq!(stats["pools"][0]["payload_key"]["malformed"], 0, "{stats}");
}

/// Bytes each gtlsclient download fetches.
const H3_DOWNLOAD: usize = 16 << 20;

/// One gtlsclient download of [`H3_DOWNLOAD`] bytes from `target` into `dir`, migrating to a
/// new local port 50 ms after the handshake; whether every byte arrived right.
async fn gtlsclient(target: SocketAddr, dir: &std::path::Path) -> Result<(), String> {
    let url = format!("https://{target}/{H3_DOWNLOAD}");
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let port = target.port().to_string();
    let out = tokio::process::Command::new("/usr/bin/gtlsclient")
        .args([
            "--quiet",
            "--exit-on-all-streams-close",
            "--change-local-addr=50ms",
        ])
        .args(["--timeout=5s", "--handshake-timeout=5s"])
        .arg(format!("--download={}", dir.display()))
        .args(["127.0.0.1", &port, &url])
        .output()
        .await
        .map_err(|e| {
            format!(
                "gtlsclient: {e} (install Debian's ngtcp2-client; scripts/test.sh does as root)"
            )
        })?;
    let file = dir.join(H3_DOWNLOAD.to_string());
    let got = std::fs::read(&file).unwrap_or_default();
    let right = got.len() == H3_DOWNLOAD && got.iter().enumerate().all(|(i, &b)| b == pattern(i));
    right.then_some(()).ok_or_else(|| {
        format!(
            "{} of {H3_DOWNLOAD} bytes{}; stderr: {}",
            got.len(),
            if got.len() == H3_DOWNLOAD {
                ", wrong ones"
            } else {
                ""
            },
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn ngtcp2_clients_migrating_mid_download_complete_through_quic_lb() {
    let Servers {
        runtime,
        one,
        two,
        moves,
        ..
    } = two_servers();
    let dir = scratch_dir("gtlsclient");
    // Directly first: the client, the server and the migration work.
    let direct = runtime.block_on(gtlsclient(one, &dir.join("direct")));
    assert_eq!(direct, Ok(()));
    assert_eq!(moves.load(Ordering::Relaxed), 1, "the client moved");

    let (lb, listen) = quic_lb_in_front_of(one, two);
    let results: Vec<Result<(), String>> = runtime.block_on(async {
        let mut out = Vec::new();
        for i in 0..6 {
            out.push(gtlsclient(listen, &dir.join(i.to_string())).await);
        }
        out
    });
    assert!(
        results.iter().all(Result::is_ok),
        "{results:?}\n{}",
        lb.stats()
    );
    assert_eq!(
        moves.load(Ordering::Relaxed),
        7,
        "every client moved mid-download"
    );
    assert_eq!(lb.stats()["pools"][0]["payload_key"]["malformed"], 0);
}
