//! A 413 for a body over the limit, announced by `content-length` or streamed chunked, and a 401
//! sent before a large body is read, reach clients that are still sending: the gateway closes
//! lingering (FIN, then reads and discards for a bounded time) instead of resetting. Raw-socket
//! clients that keep sending, curl (with and without `Expect: 100-continue`), Python's httpx
//! (sync and async) and the official openai SDK (sync and async) each read the 413, 10 times out
//! of 10.

mod support;

use std::process::Command;

use support::*;
use tokio::io::AsyncWriteExt;

const OK: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 14\r\n\r\n{\"choices\":[]}";
const LIMIT: usize = 1 << 20;
// Over what loopback's socket buffers absorb, so a client is still sending when the 413 comes.
const UPLOAD: usize = 16 << 20;

async fn limited_gateway() -> (Running, RawUpstream) {
    let up = RawUpstream::start(OK, false).await;
    let mut c = config(&[("only", up.url())]);
    c["max_body_bytes"] = LIMIT.into();
    (gateway(c, &[]).await, up)
}

fn big_chat() -> String {
    format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(UPLOAD)
    )
}

fn assert_413(response: &[u8], who: &str) {
    let (head, _) = split(response);
    assert!(head.starts_with("http/1.1 413 "), "{who}: {head:?}");
    let json: serde_json::Value = serde_json::from_slice(&body_of(response)).unwrap();
    assert_eq!(json["error"]["code"], "request_too_large", "{who}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_clients_that_keep_sending_read_the_413_announced_or_chunked() {
    let (gw, up) = limited_gateway().await;
    let body = big_chat();
    for i in 0..10 {
        // Announced: content-length over the limit, the whole body sent before reading.
        let mut tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        tcp.write_all(head.as_bytes()).await.unwrap();
        let _ = tcp.write_all(body.as_bytes()).await;
        assert_413(&read_to_close(&mut tcp).await, &format!("announced #{i}"));

        // Streamed: chunked, 64 KiB a chunk, over the limit only as it goes.
        let mut tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        tcp.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
            .await
            .unwrap();
        for chunk in body.as_bytes().chunks(64 << 10) {
            let mut frame = format!("{:x}\r\n", chunk.len()).into_bytes();
            frame.extend_from_slice(chunk);
            frame.extend_from_slice(b"\r\n");
            if tcp.write_all(&frame).await.is_err() {
                break;
            }
        }
        let _ = tcp.write_all(b"0\r\n\r\n").await;
        assert_413(&read_to_close(&mut tcp).await, &format!("chunked #{i}"));
    }
    assert_eq!(up.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_reads_the_413_with_and_without_expect_100_continue() {
    if Command::new("curl").arg("--version").output().is_err() {
        eprintln!("skipped: curl is not installed (.ci/run installs it)");
        return;
    }
    let (gw, up) = limited_gateway().await;
    let file = std::env::temp_dir().join(format!("tmf-413-{}.json", std::process::id()));
    std::fs::write(&file, big_chat()).unwrap();
    let url = gw.url("/v1/chat/completions");
    let file_arg = format!("@{}", file.display());
    let codes = tokio::task::spawn_blocking(move || {
        let mut codes = Vec::new();
        for expect in ["Expect: 100-continue", "Expect:"] {
            for _ in 0..10 {
                let out = Command::new("curl")
                    .args([
                        "-s",
                        "-o",
                        "/dev/null",
                        "-w",
                        "%{http_code}",
                        "--max-time",
                        "20",
                    ])
                    .args(["-H", "content-type: application/json", "-H", expect])
                    .args(["--data-binary", &file_arg, &url])
                    .output()
                    .unwrap();
                codes.push(String::from_utf8_lossy(&out.stdout).into_owned());
            }
        }
        codes
    })
    .await
    .unwrap();
    let _ = std::fs::remove_file(file);
    assert_eq!(codes, vec!["413"; 20]);
    assert_eq!(up.count(), 0);
}

/// 10 calls with each Python client; prints one line per client: its name and how many of its
/// calls read the 413.
const PYTHON: &str = r#"
import asyncio, sys
import httpx, openai

url, size = sys.argv[1], int(sys.argv[2])
base = url + "/v1"
body = '{"model":"m","messages":[{"role":"user","content":"' + "x" * size + '"}]}'
headers = {"content-type": "application/json"}
messages = [{"role": "user", "content": "x" * size}]

def count(results):
    return sum(1 for r in results if r == 413)

def httpx_status(c):
    try:
        return c.post(base + "/chat/completions", content=body, headers=headers).status_code
    except httpx.TransportError:
        return "transport error"

with httpx.Client(timeout=20) as c:
    print("httpx-sync", count(httpx_status(c) for _ in range(10)))

async def httpx_async():
    out = []
    async with httpx.AsyncClient(timeout=20) as c:
        for _ in range(10):
            try:
                out.append((await c.post(base + "/chat/completions", content=body, headers=headers)).status_code)
            except httpx.TransportError:
                out.append("transport error")
    return out
print("httpx-async", count(asyncio.run(httpx_async())))

def sdk_status(call):
    try:
        call()
        return 200
    except openai.APIStatusError as e:
        return e.status_code
    except openai.APIConnectionError:
        return "connection error"

sync_client = openai.OpenAI(base_url=base, api_key="unused", max_retries=2, timeout=20)
print("openai-sync", count(sdk_status(lambda: sync_client.chat.completions.create(model="m", messages=messages)) for _ in range(10)))

async def sdk_async():
    client = openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=2, timeout=20)
    out = []
    for _ in range(10):
        try:
            await client.chat.completions.create(model="m", messages=messages)
            out.append(200)
        except openai.APIStatusError as e:
            out.append(e.status_code)
        except openai.APIConnectionError:
            out.append("connection error")
    return out
print("openai-async", count(asyncio.run(sdk_async())))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httpx_and_the_openai_sdk_sync_and_async_read_the_413_ten_times_out_of_ten() {
    let has_modules = Command::new("python3")
        .args(["-c", "import httpx, openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_modules {
        eprintln!(
            "skipped: python3 with httpx and openai is needed (.ci/run installs them with pip)"
        );
        return;
    }
    let (gw, up) = limited_gateway().await;
    let url = format!("http://{}", gw.addr);
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args(["-c", PYTHON, &url, &UPLOAD.to_string()])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            "httpx-sync 10",
            "httpx-async 10",
            "openai-sync 10",
            "openai-async 10"
        ],
    );
    // A 413 is not retried: each SDK call uploaded once, and nothing went upstream.
    assert_eq!(up.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_sent_before_a_large_body_is_read_reaches_a_client_still_sending() {
    let up = RawUpstream::start(OK, false).await;
    let mut c = config(&[("only", up.url())]);
    c["clients"] = serde_json::json!([{"name": "web", "key_env": "EARLY_WEB_KEY"}]);
    let gw = gateway(c, &[("EARLY_WEB_KEY", "the-key")]).await;
    let body = big_chat();
    for i in 0..10 {
        let mut tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer not-the-key\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        tcp.write_all(head.as_bytes()).await.unwrap();
        let _ = tcp.write_all(body.as_bytes()).await;
        let response = read_to_close(&mut tcp).await;
        let (head, _) = split(&response);
        assert!(head.starts_with("http/1.1 401 "), "#{i}: {head:?}");
    }
    assert_eq!(up.count(), 0);
}
