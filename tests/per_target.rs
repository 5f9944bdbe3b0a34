//! Per-target stacks: every attempt carries its `AttemptTarget`, and `PerTarget` gives each
//! target its own rate limit, concurrency limit and timeout. A target that sheds load moves the
//! request on. In-process clients on tokio's paused clock, where time is what is tested.

mod support;

use std::time::Duration;

use http::{Request, Response};
use support::*;
use tokio::time::Instant;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Layer, ServiceBuilder, ServiceExt};
use tower_model_fallback::{AttemptOutcome, AttemptTarget, ErrorKind, FallbackReport, ReplayBody};

type Boxed = BoxCloneSyncService<
    Request<ReplayBody>,
    Response<http_body_util::Full<bytes::Bytes>>,
    BoxError,
>;

fn report<B>(response: &Response<B>) -> FallbackReport {
    response
        .extensions()
        .get::<FallbackReport>()
        .cloned()
        .unwrap()
}

fn overloaded(report: &FallbackReport, attempt: usize) -> bool {
    matches!(
        report.attempts()[attempt].outcome(),
        AttemptOutcome::Error {
            kind: ErrorKind::Overloaded,
            ..
        }
    )
}

#[tokio::test(start_paused = true)]
async fn a_target_over_its_own_rate_limit_sheds_and_the_next_target_serves() {
    let client = Scripted::new(&[
        ("primary", vec![Act::status(200)]),
        ("backup", vec![Act::status(200)]),
    ]);
    // The primary allows 1 request per 10 s; the backup has no limit.
    let primary = ServiceBuilder::new()
        .buffer(8)
        .load_shed()
        .rate_limit(1, Duration::from_secs(10))
        .service(client.clone());
    let layer = hosts(&["primary", "backup"]);
    let service = layer
        .per_target([Boxed::new(primary), Boxed::new(client.clone())])
        .unwrap();
    let start = Instant::now();

    let first = service.clone().oneshot(chat_request(CHAT)).await.unwrap();
    let second = service.clone().oneshot(chat_request(CHAT)).await.unwrap();
    println!("first:  {}", report(&first));
    println!("second: {}", report(&second));
    assert_eq!(report(&first).served_by().unwrap().target(), "primary");
    let shed = report(&second);
    assert_eq!(shed.served_by().unwrap().target(), "backup");
    assert!(overloaded(&shed, 0), "{shed}");
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "shedding does not wait for the limit"
    );

    // Once the primary's window has passed, it serves again.
    tokio::time::advance(Duration::from_secs(10)).await;
    let third = service.clone().oneshot(chat_request(CHAT)).await.unwrap();
    println!("third (10 s later): {}", report(&third));
    assert_eq!(report(&third).served_by().unwrap().target(), "primary");
    assert_eq!(report(&third).attempts().len(), 1);
    assert_eq!(client.sequence(), ["primary", "backup", "primary"]);
}

#[tokio::test(start_paused = true)]
async fn a_concurrency_limit_on_one_target_moves_the_next_request_on() {
    let client = Scripted::new(&[
        (
            "primary",
            vec![Act::status(200).after(Duration::from_secs(5))],
        ),
        ("backup", vec![Act::status(200)]),
    ]);
    let primary = ServiceBuilder::new()
        .load_shed()
        .concurrency_limit(1)
        .service(client.clone());
    let service = hosts(&["primary", "backup"])
        .per_target([Boxed::new(primary), Boxed::new(client.clone())])
        .unwrap();
    let slow = tokio::spawn(service.clone().oneshot(chat_request(CHAT)));
    tokio::time::sleep(Duration::from_millis(1)).await; // the first holds the primary's slot
    let second = service.clone().oneshot(chat_request(CHAT)).await.unwrap();
    let shed = report(&second);
    assert_eq!(shed.served_by().unwrap().target(), "backup");
    assert!(overloaded(&shed, 0), "{shed}");
    let first = slow.await.unwrap().unwrap();
    assert_eq!(report(&first).served_by().unwrap().target(), "primary");
    // The slot is free again: the primary serves.
    let third = service.oneshot(chat_request(CHAT)).await.unwrap();
    assert_eq!(report(&third).served_by().unwrap().target(), "primary");
    assert_eq!(client.count("primary"), 2);
}

#[tokio::test(start_paused = true)]
async fn each_target_has_its_own_timeout() {
    let client = Scripted::new(&[
        (
            "primary",
            vec![Act::status(200).after(Duration::from_secs(5))],
        ),
        (
            "backup",
            vec![Act::status(200).after(Duration::from_secs(3))],
        ),
    ]);
    // The primary is given 1 s; the backup, known to be slow, as long as it takes.
    let primary = ServiceBuilder::new()
        .timeout(Duration::from_secs(1))
        .service(client.clone());
    let service = hosts(&["primary", "backup"])
        .per_target([Boxed::new(primary), Boxed::new(client.clone())])
        .unwrap();
    let start = Instant::now();
    let response = service.oneshot(chat_request(CHAT)).await.unwrap();
    let report = report(&response);
    assert_eq!(report.served_by().unwrap().target(), "backup");
    assert!(matches!(
        report.attempts()[0].outcome(),
        AttemptOutcome::Error {
            kind: ErrorKind::Timeout,
            ..
        }
    ));
    assert_eq!(
        start.elapsed(),
        Duration::from_secs(4),
        "1 s on the primary, 3 s on the backup"
    );
}

#[tokio::test]
async fn every_attempt_carries_its_target_and_per_target_checks_the_count() {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    let client = Scripted::new(&[
        ("a", vec![Act::status(503)]),
        ("b", vec![Act::status(503)]),
        ("c", vec![Act::status(200)]),
    ]);
    let inner = tower::service_fn(move |req: Request<ReplayBody>| {
        let target = req.extensions().get::<AttemptTarget>().cloned();
        record
            .lock()
            .unwrap()
            .push(target.map(|t| (t.index(), t.name().to_owned())));
        client.clone().oneshot(req)
    });
    let layer = hosts(&["a", "b", "c"]);
    let response = layer
        .layer(inner)
        .oneshot(chat_request(CHAT))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let expected: Vec<Option<(usize, String)>> = ["a", "b", "c"]
        .iter()
        .enumerate()
        .map(|(i, n)| Some((i, n.to_string())))
        .collect();
    assert_eq!(*seen.lock().unwrap(), expected);

    let err = layer.per_target([Scripted::default()]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "per_target: 1 services for 3 targets; give one per target, in order"
    );
    // A request that did not come through the layer reaches no service.
    let direct = tower_model_fallback::PerTarget::new([Scripted::default()])
        .oneshot(Request::new(ReplayBody::default()))
        .await;
    assert!(direct.unwrap_err().to_string().contains("no AttemptTarget"));
}
