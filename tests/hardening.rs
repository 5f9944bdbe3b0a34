//! Regressions found in review: health-store bookkeeping, budget draws, deadlines and hedged races on a paused clock.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http::{Request, StatusCode};
use support::*;
use tokio::time::Instant;
use tower::retry::budget::Budget;
use tower::{Layer, Service, ServiceExt};
use tower_model_fallback::{
    Admission, AttemptOutcome, Cooldowns, HealthOutcome, HealthStore, Hedge, ReplayBody, Retries,
    StopReason, TargetId,
};

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn ms(m: u64) -> Duration {
    Duration::from_millis(m)
}

const MODEL_NOT_FOUND: &str = r#"{"error":{"code":"model_not_found"}}"#;

// ---- a health store that counts admissions and records -------------------------------------

#[derive(Default)]
struct LedgerInner {
    cooling: Vec<usize>,
    /// admitted minus recorded, per target index
    outstanding: Mutex<HashMap<usize, i64>>,
    log: Mutex<Vec<String>>,
}

#[derive(Clone, Default)]
struct Ledger(Arc<LedgerInner>);

impl Ledger {
    fn cooling(indices: &[usize]) -> Ledger {
        Ledger(Arc::new(LedgerInner {
            cooling: indices.to_vec(),
            ..Default::default()
        }))
    }
    fn outstanding(&self) -> HashMap<usize, i64> {
        let mut m = self.0.outstanding.lock().unwrap().clone();
        m.retain(|_, v| *v != 0);
        m
    }
}

impl HealthStore for Ledger {
    fn admit(&self, target: TargetId<'_>) -> Admission {
        if self.0.cooling.contains(&target.index) {
            return Admission::Cooling(secs(30));
        }
        *self
            .0
            .outstanding
            .lock()
            .unwrap()
            .entry(target.index)
            .or_default() += 1;
        self.0
            .log
            .lock()
            .unwrap()
            .push(format!("admit {}", target.index));
        Admission::Open
    }
    fn cooling_for(&self, target: TargetId<'_>) -> Duration {
        if self.0.cooling.contains(&target.index) {
            secs(30)
        } else {
            Duration::ZERO
        }
    }
    fn record(&self, target: TargetId<'_>, outcome: HealthOutcome, _probe: bool) {
        *self
            .0
            .outstanding
            .lock()
            .unwrap()
            .entry(target.index)
            .or_default() -= 1;
        self.0
            .log
            .lock()
            .unwrap()
            .push(format!("record {} {outcome:?}", target.index));
    }
}

// ---- a budget that counts ------------------------------------------------------------------

#[derive(Default)]
struct CountingInner {
    refuse: bool,
    deposits: AtomicUsize,
    withdraws: AtomicUsize,
}
#[derive(Clone, Default)]
struct Counting(Arc<CountingInner>);
impl Budget for Counting {
    fn deposit(&self) {
        self.0.deposits.fetch_add(1, Ordering::SeqCst);
    }
    fn withdraw(&self) -> bool {
        self.0.withdraws.fetch_add(1, Ordering::SeqCst);
        !self.0.refuse
    }
}

// ---- an inner service whose readiness the test controls ------------------------------------

#[derive(Default)]
struct GateState {
    closed: bool,
    fail_after_calls: Option<usize>,
    calls: usize,
    waker: Option<Waker>,
}

#[derive(Clone)]
struct Gated {
    inner: Scripted,
    state: Arc<Mutex<GateState>>,
}

impl Gated {
    fn new(inner: Scripted) -> Gated {
        Gated {
            inner,
            state: Arc::default(),
        }
    }
    fn set_closed(&self, closed: bool) {
        let mut s = self.state.lock().unwrap();
        s.closed = closed;
        if let Some(w) = s.waker.take() {
            w.wake();
        }
    }
}

impl Service<Request<ReplayBody>> for Gated {
    type Response = <Scripted as Service<Request<ReplayBody>>>::Response;
    type Error = BoxError;
    type Future = <Scripted as Service<Request<ReplayBody>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        let mut s = self.state.lock().unwrap();
        if s.fail_after_calls.is_some_and(|n| s.calls >= n) {
            return Poll::Ready(Err("inner service failed".into()));
        }
        if s.closed {
            s.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReplayBody>) -> Self::Future {
        self.state.lock().unwrap().calls += 1;
        self.inner.call(req)
    }
}

// 1. choose_next's "nothing tried yet: force the cooling targets" fallback runs after the first
//    attempt, because plan() calls choose_next() before record().

#[tokio::test(start_paused = true)]
async fn a_cooling_target_is_not_called_after_the_first_target_fails() {
    let client = Scripted::new(&[("a", vec![Act::status(503)]), ("b", vec![Act::status(200)])]);
    let ledger = Ledger::cooling(&[1]); // b is cooling, a is healthy
    let layer = hosts(&["a", "b"]).health_store(ledger.clone(), secs(900));
    let (status, report) = send(&layer, &client).await;
    assert_eq!(
        client.sequence(),
        ["a"],
        "b is cooling: it must be skipped, not called; report: {report}"
    );
    assert_eq!(status, 503);
}

#[tokio::test(start_paused = true)]
async fn a_single_target_with_cooldowns_is_retried_only_after_its_retry_after() {
    let client = Scripted::new(&[(
        "primary",
        vec![
            Act::status(429).header("retry-after", "2"),
            Act::status(200),
        ],
    )]);
    let layer = hosts(&["primary"])
        .retries(Retries::new(1))
        .cooldowns(Cooldowns::new());
    let start = Instant::now();
    let (_, report) = send(&layer, &client).await;
    let times = client.times("primary", start);
    assert!(
        times.len() < 2 || times[1] >= secs(2),
        "the upstream asked for 2 s and was called again after {:?}; report:\n{report}",
        times
    );
}

#[tokio::test(start_paused = true)]
async fn hedging_never_launches_into_a_cooling_target() {
    let client = Scripted::new(&[
        ("a", vec![Act::status(200).after(secs(3))]),
        ("b", vec![Act::status(200)]),
    ]);
    let layer = hosts(&["a", "b"])
        .health_store(Ledger::cooling(&[1]), secs(900))
        .hedge(Hedge::new(secs(1), 2));
    let (_, report) = send(&layer, &client).await;
    assert_eq!(client.count("b"), 0, "b is cooling; report:\n{report}");
}

// 2. Hedging: an admitted `upcoming` held while the inner service is not ready is overwritten
//    (leaked) when the race ends in a body-classified failure and plan() picks the next target.

#[tokio::test(start_paused = true)]
async fn a_hedge_chosen_while_the_inner_service_is_busy_is_sent_or_released() {
    let client = Scripted::new(&[
        (
            "a",
            vec![Act::status(404).body(MODEL_NOT_FOUND).after(secs(2))],
        ),
        ("b", vec![Act::status(200)]),
        ("c", vec![Act::status(200)]),
    ]);
    let gated = Gated::new(client.clone());
    let ledger = Ledger::default();
    let layer = hosts(&["a", "b", "c"])
        .health_store(ledger.clone(), secs(900))
        .hedge(Hedge::new(secs(1), 2));
    let service = layer.layer(gated.clone());
    let request = tokio::spawn(service.oneshot(chat_request(CHAT)));
    tokio::time::sleep(ms(500)).await;
    gated.set_closed(true); // b's hedge (at 1 s) waits for readiness
    tokio::time::sleep(secs(3)).await;
    gated.set_closed(false);
    let response = request.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    // a's 404 is read while the race goes on; b, chosen when the hedge timer fired, is sent
    // once the inner service is ready again.
    assert_eq!(client.sequence(), ["a", "b"]);
    assert!(
        ledger.outstanding().is_empty(),
        "admissions never recorded: {:?}\n{:?}",
        ledger.outstanding(),
        ledger.0.log.lock().unwrap()
    );
}

// 3. served_by after the deadline in a race points at the cancelled flight, not at the response
//    handed back.

#[tokio::test(start_paused = true)]
async fn served_by_names_the_response_handed_back_after_a_deadline_in_a_race() {
    let client = Scripted::new(&[
        ("a", vec![Act::status(503).after(secs(2))]),
        ("b", vec![Act::hang()]),
    ]);
    let layer = hosts(&["a", "b"])
        .hedge(Hedge::new(secs(1), 2))
        .deadline(secs(5));
    let (status, report) = send(&layer, &client).await;
    assert_eq!(status, 503);
    let served = report.served_by().unwrap();
    assert_eq!(
        (served.target(), served.outcome()),
        (
            "a",
            &AttemptOutcome::Status(StatusCode::SERVICE_UNAVAILABLE)
        ),
        "{report}"
    );
}

// 4. A racer's 404 model_not_found is decided on its head alone (Return), which cancels the
//    other racers; then its body says NextTarget.

#[tokio::test(start_paused = true)]
async fn a_model_not_found_racer_does_not_cancel_a_healthy_racer() {
    let client = Scripted::new(&[
        ("a", vec![Act::status(200).after(secs(3))]),
        (
            "b",
            vec![Act::status(404).body(MODEL_NOT_FOUND).after(ms(500))],
        ),
    ]);
    let layer = hosts(&["a", "b"]).hedge(Hedge::new(secs(1), 2));
    let (status, report) = send(&layer, &client).await;
    assert_eq!(status, 200, "a was still racing; report:\n{report}");
}

// 5. The budget is withdrawn when the next attempt is planned, not when it is made.

#[tokio::test(start_paused = true)]
async fn no_budget_is_drawn_for_an_attempt_that_is_never_made() {
    let client = Scripted::new(&[("a", vec![Act::status(503)]), ("b", vec![Act::status(200)])]);
    let gated = Gated::new(client.clone());
    gated.state.lock().unwrap().fail_after_calls = Some(1);
    let budget = Counting::default();
    let layer = hosts(&["a", "b"]).retry_budget(budget.clone());
    let response = layer
        .layer(gated.clone())
        .oneshot(chat_request(CHAT))
        .await
        .unwrap();
    assert_eq!(
        (response.status().as_u16(), client.sequence()),
        (503, vec!["a".to_owned()])
    );
    assert_eq!(
        budget.0.withdraws.load(Ordering::SeqCst),
        0,
        "one attempt made, none after the first, yet the budget was drawn on"
    );
}

// 6. Hedging: a budget stop while a flight is still running is forgotten; the report then says
//    every target was tried.

#[tokio::test(start_paused = true)]
async fn a_budget_stop_during_a_race_is_reported_as_such() {
    let client = Scripted::new(&[
        ("a", vec![Act::status(503).after(secs(3))]),
        ("b", vec![Act::status(200)]),
    ]);
    let budget = Counting(Arc::new(CountingInner {
        refuse: true,
        ..Default::default()
    }));
    let layer = hosts(&["a", "b"])
        .hedge(Hedge::new(secs(1), 2))
        .retry_budget(budget);
    let (status, report) = send(&layer, &client).await;
    assert_eq!(status, 503);
    assert_eq!(client.count("b"), 0);
    assert_eq!(
        (report.stop_reason(), report.is_exhausted()),
        (Some(StopReason::RetryBudget), false),
        "b was never tried; report:\n{report}"
    );
}

// 7. Timers need tokio: the backoff sleep and the hedge timer are created unconditionally
//    (deadline and read timers check for a runtime first).

#[test]
fn a_retry_outside_a_tokio_runtime_does_not_panic() {
    use std::future::Future;
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let inner = tower::service_fn(move |_req: Request<ReplayBody>| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        async move {
            let status = if n == 0 { 503 } else { 200 };
            Ok::<_, BoxError>(
                http::Response::builder()
                    .status(status)
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap(),
            )
        }
    });
    let layer = hosts(&["a"]).retries(Retries::new(1).base_delay(ms(1)));
    let mut service = layer.layer(inner);
    let mut future = std::pin::pin!(service.call(chat_request(CHAT)));
    let waker = Waker::noop();
    let mut cx = Context::from_waker(waker);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for _ in 0..1000 {
            if let Poll::Ready(r) = future.as_mut().poll(&mut cx) {
                return r.map(|r| r.status());
            }
            std::thread::sleep(ms(2));
        }
        panic!("never finished (not the finding)")
    }));
    assert!(
        result.is_ok(),
        "the retry path panicked outside a tokio runtime"
    );
}

// 2b. The same path leaves `launch_now` set: the next race launches its second flight at once,
//     without waiting for the hedge delay.

#[tokio::test(start_paused = true)]
async fn a_finished_race_leaves_no_early_launch_behind() {
    let client = Scripted::new(&[
        (
            "a",
            vec![Act::status(404).body(MODEL_NOT_FOUND).after(secs(2))],
        ),
        ("b", vec![Act::status(200)]),
        ("c", vec![Act::status(200).after(ms(500))]),
        ("d", vec![Act::status(200)]),
    ]);
    let gated = Gated::new(client.clone());
    let layer = hosts(&["a", "b", "c", "d"]).hedge(Hedge::new(secs(1), 2));
    let service = layer.layer(gated.clone());
    let request = tokio::spawn(service.oneshot(chat_request(CHAT)));
    tokio::time::sleep(ms(500)).await;
    gated.set_closed(true);
    tokio::time::sleep(secs(3)).await;
    gated.set_closed(false);
    let response = request.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        client.sequence(),
        ["a", "b"],
        "b answers at once: nothing else starts"
    );
}
