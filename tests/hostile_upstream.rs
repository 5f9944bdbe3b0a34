//! A hostile upstream (huge headers, an endless error body, a huge announced error body, an
//! endless answer) cannot make the layer buffer without bound. A counting allocator tracks the
//! live heap of this test binary; each case runs alone and its peak is compared with the heap
//! before it.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicIsize, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use support::{chat_request, client, Upstream, CHAT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tower::ServiceExt;
use tower_model_fallback::{FallbackLayer, FallbackReport, Target};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

fn grew(by: usize) {
    let by = isize::try_from(by).unwrap_or(isize::MAX);
    let now = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(
            isize::try_from(layout.size()).unwrap_or(isize::MAX),
            Ordering::Relaxed,
        );
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_sub(
            isize::try_from(layout.size()).unwrap_or(isize::MAX),
            Ordering::Relaxed,
        );
        grew(new_size);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// One case at a time, so that the heap figures are this case's own.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The largest growth of the live heap above its level at the start, while `f` runs.
async fn peak_growth<T>(f: impl std::future::Future<Output = T>) -> (T, usize) {
    let start = LIVE.load(Ordering::Relaxed);
    PEAK.store(start, Ordering::Relaxed);
    let out = f.await;
    let peak = PEAK.load(Ordering::Relaxed);
    (out, usize::try_from(peak - start).unwrap_or(0))
}

const MIB: usize = 1024 * 1024;
/// What the layer may hold at once in these cases: its 8 KiB error-body window plus hyper's
/// own read buffer (at most about 400 KiB) and the test's own servers, with room to spare.
const BOUND: usize = 4 * MIB;

/// A server that reads one request, writes `head`, then writes `chunk` over and over until the
/// client goes away, `cap` bytes have gone, or 20 s have passed. Counts what it wrote.
async fn hostile(head: Vec<u8>, chunk: &'static [u8], cap: u64) -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let written = Arc::new(AtomicU64::new(0));
    let w = written.clone();
    tokio::spawn(async move {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        let mut buf = vec![0u8; 64 * 1024];
        let mut seen = Vec::new();
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(n) if n > 0 => seen.extend_from_slice(&buf[..n]),
                _ => return,
            }
        }
        // The request body is a small chat body: wait for it, briefly.
        let _ = tokio::time::timeout(Duration::from_millis(50), stream.read(&mut buf)).await;
        let _ = tokio::time::timeout(Duration::from_secs(20), async {
            if stream.write_all(&head).await.is_err() {
                return;
            }
            while w.load(Ordering::Relaxed) < cap {
                if stream.write_all(chunk).await.is_err() {
                    return;
                }
                w.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        })
        .await;
    });
    (addr, written)
}

fn layer(primary: SocketAddr, fallback: &Upstream) -> FallbackLayer {
    FallbackLayer::new([
        Target::new(format!("http://{primary}/v1"))
            .unwrap()
            .with_name("hostile"),
        Target::new(fallback.url() + "/v1")
            .unwrap()
            .with_name("fallback"),
    ])
    .unwrap()
}

/// Sends a chat request through the layer; returns who served it.
async fn served_by(primary: SocketAddr, fallback: &Upstream) -> String {
    let response = tower::Layer::layer(&layer(primary, fallback), client())
        .oneshot(chat_request(CHAT))
        .await
        .unwrap();
    // The answer is handed back as it comes; what the caller then reads is the caller's.
    let report = response.extensions().get::<FallbackReport>().unwrap();
    report.served_by().unwrap().target().to_owned()
}

const DATA: usize = 16 * 1024;

/// A chunked-encoding chunk: "4000\r\n", 16 KiB of data, "\r\n".
static CHUNK: [u8; DATA + 8] = {
    let mut c = [b'a'; DATA + 8];
    c[0] = b'4';
    c[1] = b'0';
    c[2] = b'0';
    c[3] = b'0';
    c[4] = b'\r';
    c[5] = b'\n';
    c[DATA + 6] = b'\r';
    c[DATA + 7] = b'\n';
    c
};

fn chunk() -> &'static [u8] {
    &CHUNK
}

static PLAIN: [u8; DATA] = [b'a'; DATA];

#[tokio::test]
async fn huge_response_headers_are_refused_and_the_next_target_serves() {
    let _one = ONE_AT_A_TIME.lock().await;
    let fallback = Upstream::chat("fallback").await;
    let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
    for i in 0..4000 {
        head.extend_from_slice(format!("x-pad-{i}: {}\r\n", "a".repeat(1000)).as_bytes());
    }
    let (addr, _) = hostile(head, b"", 0).await;
    let (served, growth) = peak_growth(served_by(addr, &fallback)).await;
    assert_eq!(served, "fallback");
    assert!(growth < BOUND, "4 MB of headers held {growth} bytes");
}

#[tokio::test]
async fn an_endless_error_body_is_read_only_up_to_the_classification_window() {
    let _one = ONE_AT_A_TIME.lock().await;
    let fallback = Upstream::chat("fallback").await;
    let head = b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    let (addr, written) = hostile(head, chunk(), 1 << 30).await;
    let (served, growth) = peak_growth(served_by(addr, &fallback)).await;
    assert_eq!(served, "fallback");
    assert!(growth < BOUND, "an endless 429 body held {growth} bytes");
    assert!(
        written.load(Ordering::Relaxed) < (1 << 30),
        "the layer stopped reading long before the server's cap"
    );
}

#[tokio::test]
async fn a_huge_announced_error_body_is_not_preallocated() {
    let _one = ONE_AT_A_TIME.lock().await;
    let fallback = Upstream::chat("fallback").await;
    let head = b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 10737418240\r\n\r\n{\"error\":{\"code\":\"model_not_found\",\"message\":\"".to_vec();
    let (addr, _) = hostile(head, &PLAIN, 1 << 30).await;
    let (served, growth) = peak_growth(served_by(addr, &fallback)).await;
    // The first 8 KiB do not hold a complete error, so the 404 is handed back as it is.
    assert_eq!(served, "hostile");
    assert!(
        growth < BOUND,
        "a 10 GiB announced body held {growth} bytes"
    );
}

#[tokio::test]
async fn an_endless_answer_streams_through_without_accumulating() {
    let _one = ONE_AT_A_TIME.lock().await;
    let fallback = Upstream::chat("fallback").await;
    let head =
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
            .to_vec();
    let (addr, written) = hostile(head, chunk(), 1 << 30).await;
    let (read, growth) = peak_growth(async {
        let response = tower::Layer::layer(&layer(addr, &fallback), client())
            .oneshot(chat_request(CHAT))
            .await
            .unwrap();
        let mut body = response.into_body();
        let mut read = 0usize;
        while read < 64 * MIB {
            let frame = body.frame().await.expect("endless").expect("no error");
            read += frame.data_ref().map_or(0, bytes::Buf::remaining);
        }
        read
    })
    .await;
    assert!(read >= 64 * MIB);
    assert!(written.load(Ordering::Relaxed) >= 64 * MIB as u64);
    assert!(
        growth < BOUND,
        "64 MiB streamed through held {growth} bytes at the peak"
    );
    assert_eq!(fallback.count(), 0);
}
