//! The receiver's limits on bodies that really stream: the server `serve` runs, on a loopback
//! port, fed by raw TCP sockets that send `Transfer-Encoding: chunked` bodies (no
//! Content-Length) a piece at a time, as a slow or hostile client does. Checked: the size cap
//! stops reading mid-stream, the read deadline ends a trickle, and the byte budget shared by
//! all uploads turns excess connections away with 503 before reading their bodies.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::web;
use driftless::metrics::Metrics;
use driftless::queue::JobQueue;
use driftless::server::{listen, Receiver};
use driftless::settings::Settings;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a test waits for an answer the server owes before failing (a guard against a
/// hang, not a measurement).
const ANSWER_GUARD: Duration = Duration::from_secs(60);

/// The receiver's HTTP server on a free loopback port, with `[server]` settings `server`.
struct Running {
    addr: SocketAddr,
    settings: Settings,
    handle: actix_web::dev::ServerHandle,
    _dir: tempfile::TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        drop(self.handle.stop(false));
    }
}

fn start(server: &str) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "stream-secret\n").unwrap();
    let settings = Settings::from_toml_str(&format!(
        r#"
[server]
{server}
[forges.github]
token_file = "{secret}"
webhook_secret_file = "{secret}"
[[apps]]
name = "hello"
forge = "github"
repo = "Codertocat/Hello-World"
branch = "master"
"#,
        secret = secret.display(),
    ))
    .unwrap();
    let receiver = Receiver::new(
        &settings,
        Arc::new(JobQueue::new()),
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = listen(web::Data::new(receiver), &settings.server, listener).unwrap();
    let handle = server.handle();
    tokio::spawn(server);
    Running {
        addr,
        settings,
        handle,
        _dir: dir,
    }
}

/// Sends the head of a chunked GitHub push delivery with a signature that will not verify.
async fn chunked_upload(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            b"POST /hooks/github HTTP/1.1\r\nHost: receiver\r\nContent-Type: application/json\r\n\
              X-GitHub-Event: push\r\nX-GitHub-Delivery: stream-1\r\n\
              X-Hub-Signature-256: sha256=0000000000000000000000000000000000000000000000000000000000000000\r\n\
              Transfer-Encoding: chunked\r\n\r\n",
        )
        .await
        .unwrap();
    stream
}

/// One chunk of `len` bytes of JSON-ish filler, in chunked framing.
fn chunk(len: usize) -> Vec<u8> {
    let mut out = format!("{len:x}\r\n").into_bytes();
    out.extend(std::iter::repeat_n(b' ', len));
    out.extend_from_slice(b"\r\n");
    out
}

/// An answer read off a raw socket: status, head (lowercased) and body.
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim())
        })
    }
}

/// Reads one HTTP/1.1 response (its body by Content-Length), failing the test on EOF first.
async fn read_answer(stream: &mut (impl AsyncReadExt + Unpin)) -> Answer {
    let read = async {
        let mut buf = Vec::new();
        let mut byte = [0u8; 4096];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                while buf.len() < end + 4 + len {
                    let n = stream.read(&mut byte).await.unwrap();
                    assert!(n > 0, "connection closed inside the response body");
                    buf.extend_from_slice(&byte[..n]);
                }
                let status = head[9..12].parse().unwrap();
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
                return Answer { status, head, body };
            }
            let n = stream.read(&mut byte).await.expect("reading the response");
            assert!(
                n > 0,
                "connection closed without a response: {:?}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&byte[..n]);
        }
    };
    tokio::time::timeout(ANSWER_GUARD, read)
        .await
        .expect("the receiver owed an answer and sent none")
}

/// Trickles `pieces` chunks of `size` bytes, `pause` apart, into the write half while the
/// read half waits for the answer; returns the answer and how many body bytes had been sent
/// when it arrived.
async fn trickle(
    stream: TcpStream,
    size: usize,
    pieces: usize,
    pause: Duration,
) -> (Answer, usize, usize) {
    let (mut read, mut write) = stream.into_split();
    let sent = Arc::new(AtomicUsize::new(0));
    let writer = {
        let sent = sent.clone();
        tokio::spawn(async move {
            for _ in 0..pieces {
                if write.write_all(&chunk(size)).await.is_err() {
                    return;
                }
                sent.fetch_add(size, Ordering::SeqCst);
                tokio::time::sleep(pause).await;
            }
            let _ = write.write_all(b"0\r\n\r\n").await;
        })
    };
    let answer = read_answer(&mut read).await;
    let sent_then = sent.load(Ordering::SeqCst);
    writer.abort();
    (answer, sent_then, size * pieces)
}

/// A chunked body past `server.body_limit` is refused with 413 as soon as the limit is
/// crossed: the server answers while the client is still sending, never buffering the rest.
#[tokio::test]
async fn a_streamed_body_over_the_limit_is_cut_off_mid_stream() {
    let server = start(r#"body_limit = "64KiB""#);
    let upload = chunked_upload(server.addr).await;
    // 8 MiB offered 4 KiB at a time; the limit is crossed after 17 chunks.
    let (answer, sent, offered) = trickle(upload, 4096, 2048, Duration::from_millis(5)).await;
    assert_eq!(answer.status, 413, "{}", answer.body);
    assert!(answer.body.contains("65536 bytes"), "{}", answer.body);
    assert!(
        sent < offered,
        "the answer came only after the whole body ({sent} of {offered} bytes)"
    );
}

/// A body that trickles in slower than `server.read_timeout` allows is cut off with 408.
#[tokio::test]
async fn a_trickled_body_is_cut_off_at_the_read_deadline() {
    let server = start(r#"read_timeout = "1s""#);
    let upload = chunked_upload(server.addr).await;
    // One byte every 100 ms for 10 minutes: only the deadline can end this.
    let (answer, sent, offered) = trickle(upload, 1, 6000, Duration::from_millis(100)).await;
    assert_eq!(answer.status, 408, "{}", answer.body);
    assert!(
        answer.body.contains("not received within 1s"),
        "{}",
        answer.body
    );
    assert!(sent < offered);
}

/// A complete, small delivery with a Content-Length and a bad signature: 401 when the
/// receiver reads it, 503 when the byte budget has no room for it.
async fn probe(addr: SocketAddr) -> Answer {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let body = br#"{"zen":"probe"}"#;
    let head = format!(
        "POST /hooks/github HTTP/1.1\r\nHost: receiver\r\nContent-Type: application/json\r\n\
         X-GitHub-Event: ping\r\nX-Hub-Signature-256: sha256=00\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    read_answer(&mut stream).await
}

/// The receiver's own count of reserved body bytes, read from `/metrics`.
async fn reserved(addr: SocketAddr) -> usize {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("driftless_webhook_body_bytes_reserved "))
        .unwrap_or_else(|| panic!("no body budget gauge in /metrics:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// Waits until the receiver reports `bytes` reserved (a stalled upload's head has arrived, or
/// a closed one's reservation came back).
async fn until_reserved(addr: SocketAddr, bytes: usize) {
    let mut tries = 0;
    while reserved(addr).await != bytes {
        tries += 1;
        assert!(tries < 400, "the reservations never came to {bytes} bytes");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Stalled chunked uploads, each holding a reservation of `body_limit` bytes, fill the byte
/// budget; then every new delivery is refused with 503 and a Retry-After before it sends a
/// single body byte, and a closed upload gives its reservation back.
#[tokio::test]
async fn the_byte_budget_turns_excess_uploads_away_before_reading_them() {
    // The default size limits; a long deadline so that no stalled upload times out here.
    let server = start(r#"read_timeout = "5m""#);
    let limits = &server.settings.server;
    let slots = limits.body_budget / limits.body_limit;
    assert!(slots >= 2, "{limits:?}");
    let mut stalled = Vec::new();
    for i in 1..=slots {
        let answer = probe(server.addr).await;
        assert_eq!(
            answer.status, 401,
            "room for a small delivery: {}",
            answer.body
        );
        let mut upload = chunked_upload(server.addr).await;
        upload.write_all(&chunk(16)).await.unwrap();
        stalled.push(upload);
        until_reserved(server.addr, i * limits.body_limit).await;
    }

    // Full: a small delivery with its whole body, a head declaring a length and a chunked
    // head are all refused, the last two before sending any body.
    let full = probe(server.addr).await;
    assert_eq!(full.status, 503, "{}", full.body);
    assert!(full.body.contains("retry later"), "{}", full.body);
    assert_eq!(full.header("retry-after"), Some("300"), "{}", full.head);
    let mut declared = TcpStream::connect(server.addr).await.unwrap();
    declared
        .write_all(
            b"POST /hooks/github HTTP/1.1\r\nHost: receiver\r\nContent-Type: application/json\r\n\
              X-GitHub-Event: push\r\nX-Hub-Signature-256: sha256=00\r\nContent-Length: 900\r\n\r\n",
        )
        .await
        .unwrap();
    for (what, mut head_only) in [
        ("declared", declared),
        ("chunked", chunked_upload(server.addr).await),
    ] {
        let answer = read_answer(&mut head_only).await;
        assert_eq!(answer.status, 503, "{what}: {}", answer.body);
        assert!(
            answer.header("retry-after").is_some(),
            "{what}: {}",
            answer.head
        );
    }
    assert_eq!(reserved(server.addr).await, slots * limits.body_limit);

    // Closing a stalled upload gives its reservation back, and deliveries are read again.
    drop(stalled.pop());
    until_reserved(server.addr, (slots - 1) * limits.body_limit).await;
    assert_eq!(probe(server.addr).await.status, 401);
}
