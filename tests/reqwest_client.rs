//! `ReqwestService` (feature `reqwest`): a reqwest client under the layer, its timeouts and
//! connect errors classified as such, so they move on to the next target. Real servers on
//! 127.0.0.1; `cargo test --features reqwest --test reqwest_client`.

mod support;

use std::time::Duration;

use support::*;
use tokio::net::TcpListener;
use tower::ServiceExt;
use tower_model_fallback::{
    AttemptOutcome, ErrorKind, FallbackLayer, FallbackReport, ReqwestService, Target,
};

/// A server that accepts connections, reads what comes and never answers.
async fn hanging_server() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::AsyncReadExt;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        // Bounded: the test makes one connection.
        for _ in 0..4 {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await;
            held.push(stream); // kept open, never answered
        }
    });
    (addr, task)
}

fn kind(report: &FallbackReport, attempt: usize) -> Option<ErrorKind> {
    match report.attempts()[attempt].outcome() {
        AttemptOutcome::Error { kind, .. } => Some(*kind),
        _ => None,
    }
}

// The hanging target's client has a 1 s `.timeout`; the serving target's has none, so only the
// first attempt has a timer. On the paused clock the timeout fires as soon as the runtime
// waits on nothing but the hanging socket.
#[tokio::test(start_paused = true)]
async fn a_reqwest_timeout_against_a_hanging_server_falls_back_to_the_next_target() {
    let (hanging, _server) = hanging_server().await;
    let up = Upstream::chat("served").await;
    let layer = FallbackLayer::new([
        Target::new(format!("http://{hanging}/v1"))
            .unwrap()
            .with_name("hanging")
            .with_model("m1"),
        Target::new(up.url_with("/v1"))
            .unwrap()
            .with_name("serving")
            .with_model("m2"),
    ])
    .unwrap();
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let service = layer
        .per_target([
            ReqwestService::new(impatient),
            ReqwestService::new(reqwest::Client::new()),
        ])
        .unwrap();
    let start = tokio::time::Instant::now();
    let response = service.oneshot(chat_request(CHAT)).await.unwrap();
    let report = report_of(&response);
    println!("{report}");
    assert_eq!(response.status(), 200);
    let body = body_string(response.into_body()).await;
    assert!(
        body.contains(r#""content":"served""#) && body.contains(r#""model":"m2""#),
        "{body}"
    );
    assert_eq!(report.served_by().unwrap().target(), "serving");
    assert_eq!(kind(&report, 0), Some(ErrorKind::Timeout), "{report}");
    assert_eq!(
        start.elapsed(),
        Duration::from_secs(1),
        "exactly the client's timeout"
    );
    let seen = up.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].uri.path(), "/v1/chat/completions");
    assert!(String::from_utf8_lossy(&seen[0].body).contains(r#""model":"m2""#));
}

#[tokio::test]
async fn a_refused_connection_through_reqwest_is_a_connect_error_and_falls_back() {
    let refused = refused_addr().await;
    let up = Upstream::chat("served").await;
    let layer = FallbackLayer::new([
        Target::new(format!("http://{refused}/v1"))
            .unwrap()
            .with_name("down"),
        Target::new(up.url_with("/v1")).unwrap().with_name("up"),
    ])
    .unwrap();
    let service = tower::Layer::layer(&layer, ReqwestService::new(reqwest::Client::new()));
    let response = service.oneshot(chat_request(CHAT)).await.unwrap();
    let report = report_of(&response);
    println!("{report}");
    assert_eq!(report.served_by().unwrap().target(), "up");
    assert_eq!(kind(&report, 0), Some(ErrorKind::Connect), "{report}");
    assert!(body_string(response.into_body())
        .await
        .contains(r#""content":"served""#));
}

#[tokio::test]
async fn a_streamed_answer_comes_through_reqwest_chunk_by_chunk() {
    use http_body_util::BodyExt;
    let (senders, mut sender) = tokio::sync::mpsc::unbounded_channel();
    let up = Upstream::start(move |_| {
        let senders = senders.clone();
        async move {
            let (response, tx) = streamed(200);
            let _ = senders.send(tx);
            response
        }
    })
    .await;
    let layer = FallbackLayer::new([Target::new(up.url_with("/v1")).unwrap()]).unwrap();
    let service = tower::Layer::layer(&layer, ReqwestService::new(reqwest::Client::new()));
    let call = tokio::spawn(service.oneshot(chat_request(CHAT)));
    let tx = sender.recv().await.unwrap();
    let first = "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n";
    let second = "data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\n";
    tx.send(Ok(first.into())).await.unwrap();
    // The head comes with the first event, before the second exists.
    let response = call.await.unwrap().unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    let chunk = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(chunk, first);
    tx.send(Ok(second.into())).await.unwrap();
    let chunk = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(chunk, second);
    drop(tx);
    assert!(
        body.frame().await.is_none(),
        "the stream ends when the upstream's does"
    );
}
