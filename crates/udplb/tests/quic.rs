//! QUIC through udplb: two quinn servers issuing QUIC-LB connection IDs (`udplb-quic-lb`)
//! behind a pool with `payload_key` `kind = "quic-lb"`, and quinn clients that change their
//! address in the middle of a download (`Endpoint::rebind`, as a phone moving networks or a
//! NAT rebinding does). Every download completes with the right bytes; the new path reaches
//! the server that holds the connection although nothing about the client's address says so.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use udplb_quic_lb::{QuicLbConfig, QuicLbGenerator};

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

/// A quinn server on a free port of 127.0.0.1 issuing QUIC-LB IDs with `server_id`: each
/// bidirectional stream asks for a number of bytes ("N\n") and gets that many of
/// [`pattern`].
fn start_server(
    runtime: &tokio::runtime::Runtime,
    server_id: u8,
    certs: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
) -> SocketAddr {
    let _guard = runtime.enter();
    let config = QuicLbConfig::new(0, vec![server_id], 6).unwrap();
    let mut endpoint_config = quinn::EndpointConfig::default();
    endpoint_config.cid_generator(move || Box::new(QuicLbGenerator::new(config.clone())));
    let server_config = quinn::ServerConfig::with_single_cert(certs, key).unwrap();
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
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
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

#[test]
fn quic_connections_survive_the_client_moving_with_quic_lb() {
    // One thread runs servers and clients alike, whenever the test waits on it.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (certs, key) = crypto();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certs[0].clone()).unwrap();
    let roots = Arc::new(roots);
    let one = start_server(&runtime, 1, certs.clone(), key.clone_key());
    let two = start_server(&runtime, 2, certs, key);

    let backends = [quoted(one), quoted(two)];
    let (lb, listen) = run_one_pool(
        "127.0.0.1",
        "mode = \"flow\"",
        &backends,
        &format!(
            "scheduler = \"maglev\"\n[pools.p.payload_key]\nkind = \"quic-lb\"\n\
             server_id_length = 1\nserver_ids = {{ \"{one}\" = \"01\", \"{two}\" = \"02\" }}"
        ),
    );
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
