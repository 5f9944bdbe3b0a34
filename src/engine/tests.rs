//! The engine on plain values: no runtime, no service, no polling. Each test feeds events and
//! checks the steps and the report.

use std::sync::Mutex;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use tower::retry::budget::Budget;

use super::*;
use crate::attempt::Assessed;
use crate::resilience::{Admission, HealthStore, Hedge, Retries, TargetId};
use crate::{FallbackLayer, Target, TargetGroup};

type Body = Full<Bytes>;

fn layer(names: &[&str]) -> FallbackLayer {
    FallbackLayer::new(names.iter().map(|n| {
        Target::new(format!("http://{n}.test/v1"))
            .unwrap()
            .with_name(*n)
            .with_model(format!("{n}-model"))
    }))
    .unwrap()
}

fn prepared(layer: &FallbackLayer) -> Prepared {
    let (parts, ()) = Request::post("/chat/completions")
        .header("content-type", "application/json")
        .body(())
        .unwrap()
        .into_parts();
    let body = Bytes::from_static(br#"{"model":"asked","messages":[]}"#);
    Prepared::new(
        parts,
        body,
        &layer.shared().credential_names,
        &layer.shared().targets,
    )
    .unwrap()
}

fn engine(layer: &FallbackLayer, deadline: Option<Instant>) -> Engine<Body> {
    engine_at(layer, deadline, Instant::now())
}

/// A request whose first target is chosen at `now`.
fn engine_at(layer: &FallbackLayer, deadline: Option<Instant>, now: Instant) -> Engine<Body> {
    Engine::start(layer.shared().clone(), prepared(layer), deadline, now).unwrap()
}

fn response(status: u16, decision: Decision) -> Assessed<Body> {
    let response = Response::builder()
        .status(status)
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    Assessed {
        outcome: AttemptOutcome::Status(StatusCode::from_u16(status).unwrap()),
        decision,
        answer: Answer::Response(Peek::new(response)),
        cooldown: None,
        retry_after: None,
    }
}

fn error(kind: ErrorKind, decision: Decision) -> Assessed<Body> {
    Assessed {
        outcome: AttemptOutcome::Error {
            kind,
            message: "down".to_owned(),
        },
        decision,
        answer: Answer::Failed("down".into()),
        cooldown: None,
        retry_after: None,
    }
}

/// Launches the chosen target: its attempt id and the host the request goes to.
fn launch(engine: &mut Engine<Body>, now: Instant) -> (u32, String) {
    let Ok(launch) = engine.launch(now) else {
        panic!("the launch was refused");
    };
    let host = launch.request.uri().host().unwrap_or("").to_owned();
    (launch.id, host)
}

/// The request's output after `step`, which must have ended it.
fn finish(engine: &mut Engine<Body>, step: Step) -> Output<Body> {
    assert_eq!(step, Step::Done, "expected the end");
    engine
        .take_output()
        .expect("an ended request has an output")
}

macro_rules! done {
    ($engine:ident, $step:expr) => {{
        let step = $step;
        finish(&mut $engine, step)
    }};
}

fn report_of(output: &Output<Body>) -> &FallbackReport {
    match output {
        Ok(response) => response.extensions().get::<FallbackReport>().unwrap(),
        Err(error) => error.report(),
    }
}

fn trail(report: &FallbackReport) -> Vec<(&str, Decision)> {
    report
        .attempts()
        .iter()
        .map(|a| (a.target(), a.decision()))
        .collect()
}

#[test]
fn a_success_on_the_first_target_is_handed_back_with_its_report() {
    let layer = layer(&["a", "b"]);
    let mut engine = engine(&layer, None);
    let t0 = Instant::now();
    let (id, host) = launch(&mut engine, t0);
    assert_eq!(host, "a.test");
    let output = done!(
        engine,
        engine.on_outcome(id, response(200, Decision::Return), t0)
    );
    let report = report_of(&output);
    assert_eq!(output.as_ref().unwrap().status(), 200);
    assert_eq!(trail(report), [("a", Decision::Return)]);
    assert_eq!(report.served_by().unwrap().target(), "a");
    assert!(!report.fell_back());
    assert_eq!(report.stop_reason(), None);
    assert_eq!(report.requested_model(), Some("asked"));
}

#[test]
fn a_retryable_failure_moves_to_the_next_target_and_counts_as_a_fallback() {
    let layer = layer(&["a", "b"]);
    let mut engine = engine(&layer, None);
    let t0 = Instant::now();
    let (id, _) = launch(&mut engine, t0);
    let step = engine.on_outcome(id, response(503, Decision::NextTarget), t0);
    assert!(matches!(step, Step::Call));
    let (id, host) = launch(&mut engine, t0);
    assert_eq!(host, "b.test");
    let output = done!(
        engine,
        engine.on_outcome(id, response(200, Decision::Return), t0)
    );
    let report = report_of(&output);
    assert_eq!(
        trail(report),
        [("a", Decision::NextTarget), ("b", Decision::Return)]
    );
    assert!(report.fell_back());
    assert_eq!(layer.stats().snapshot().fell_back, 1);
}

#[test]
fn when_every_target_fails_the_last_response_is_handed_back_as_exhausted() {
    let layer = layer(&["a", "b"]);
    let mut engine = engine(&layer, None);
    let t0 = Instant::now();
    for status in [503, 429] {
        let (id, _) = launch(&mut engine, t0);
        let step = engine.on_outcome(id, response(status, Decision::NextTarget), t0);
        if status == 429 {
            let output = done!(engine, step);
            let report = report_of(&output);
            assert_eq!(output.as_ref().unwrap().status(), 429);
            assert!(report.is_exhausted());
            assert_eq!(report.stop_reason(), Some(StopReason::Exhausted));
            assert_eq!(report.served_by().unwrap().target(), "b");
            return;
        }
        assert!(matches!(step, Step::Call));
    }
    unreachable!();
}

#[test]
fn a_caller_error_is_handed_back_at_once() {
    let layer = layer(&["a", "b"]);
    let mut engine = engine(&layer, None);
    let t0 = Instant::now();
    let (id, _) = launch(&mut engine, t0);
    let output = done!(
        engine,
        engine.on_outcome(id, response(400, Decision::Return), t0)
    );
    assert_eq!(output.as_ref().unwrap().status(), 400);
    assert_eq!(trail(report_of(&output)), [("a", Decision::Return)]);
}

#[test]
fn a_same_target_retry_waits_what_the_upstream_asked_then_calls_the_same_target() {
    let layer = layer(&["a", "b"]).retries(Retries::new(1).jitter(false));
    let mut engine = engine(&layer, None);
    let t0 = Instant::now();
    let (id, _) = launch(&mut engine, t0);
    let mut limited = response(429, Decision::RetrySame);
    limited.retry_after = Some(Duration::from_secs(2));
    let step = engine.on_outcome(id, limited, t0);
    assert!(matches!(step, Step::Wait(d) if d == Duration::from_secs(2)));
    assert!(matches!(engine.on_timer(t0), Step::Call));
    let (id, host) = launch(&mut engine, t0 + Duration::from_secs(2));
    assert_eq!(host, "a.test", "the retry goes to the same target");
    // The retry is spent: the next failure moves on.
    let step = engine.on_outcome(id, response(503, Decision::RetrySame), t0);
    assert!(matches!(step, Step::Call));
    let (_, host) = launch(&mut engine, t0);
    assert_eq!(host, "b.test");
}

#[test]
fn a_retry_whose_wait_would_pass_the_deadline_ends_the_request_instead() {
    let layer = layer(&["a", "b"]).retries(Retries::new(3));
    let t0 = Instant::now();
    let mut engine = engine(&layer, Some(t0 + Duration::from_secs(5)));
    let (id, _) = launch(&mut engine, t0);
    let mut limited = response(429, Decision::RetrySame);
    limited.retry_after = Some(Duration::from_secs(10));
    let output = done!(engine, engine.on_outcome(id, limited, t0));
    let report = report_of(&output);
    assert_eq!(output.as_ref().unwrap().status(), 429);
    assert_eq!(report.stop_reason(), Some(StopReason::Deadline));
    assert_eq!(trail(report), [("a", Decision::Return)]);
}

#[test]
fn past_the_deadline_a_failure_is_the_outcome_and_nothing_new_starts() {
    let layer = layer(&["a", "b"]);
    let t0 = Instant::now();
    let mut engine = engine(&layer, Some(t0 + Duration::from_secs(1)));
    let (id, _) = launch(&mut engine, t0);
    let late = t0 + Duration::from_secs(2);
    let output = done!(
        engine,
        engine.on_outcome(id, error(ErrorKind::Connect, Decision::RetrySame), late)
    );
    let error = output.unwrap_err();
    assert!(error.is_deadline(), "{error}");
    assert_eq!(error.report().attempts().len(), 1);
}

#[test]
fn the_deadline_cancels_the_attempt_in_flight() {
    let layer = layer(&["a", "b"]);
    let t0 = Instant::now();
    let mut engine = engine(&layer, Some(t0 + Duration::from_secs(1)));
    launch(&mut engine, t0);
    let error = done!(engine, engine.on_deadline(t0 + Duration::from_secs(1))).unwrap_err();
    assert!(error.is_deadline());
    let attempt = &error.report().attempts()[0];
    assert!(matches!(
        attempt.outcome(),
        AttemptOutcome::Error {
            kind: ErrorKind::Timeout,
            ..
        }
    ));
    assert_eq!(attempt.elapsed(), Duration::from_secs(1));
}

/// A budget that has nothing to give.
struct Empty;

impl Budget for Empty {
    fn deposit(&self) {}
    fn withdraw(&self) -> bool {
        false
    }
}

#[test]
fn a_spent_budget_stops_before_the_fallback_is_sent() {
    let layer = layer(&["a", "b"]).retry_budget(Empty);
    let mut engine = engine(&layer, None);
    let t0 = Instant::now();
    let (id, _) = launch(&mut engine, t0);
    let step = engine.on_outcome(id, response(503, Decision::NextTarget), t0);
    assert!(matches!(step, Step::Call));
    let Err(step) = engine.launch(t0) else {
        panic!("the budget should refuse the fallback");
    };
    let output = done!(engine, step);
    let report = report_of(&output);
    assert_eq!(output.as_ref().unwrap().status(), 503);
    assert_eq!(report.stop_reason(), Some(StopReason::RetryBudget));
    assert!(!report.is_exhausted());
}

#[test]
fn an_inner_service_that_fails_to_get_ready_ends_with_its_error() {
    let layer = layer(&["a"]);
    let mut engine = engine(&layer, None);
    let error = done!(engine, engine.on_unready("broken".into(), Instant::now())).unwrap_err();
    assert!(error.to_string().contains("broken"), "{error}");
    assert_eq!(error.report().stop_reason(), Some(StopReason::Unready));
}

#[test]
fn a_hedge_starts_the_next_target_on_its_timer_and_the_winner_supersedes_the_rest() {
    let layer = layer(&["a", "b"]).hedge(Hedge::new(Duration::from_secs(1), 2));
    let mut engine = engine(&layer, None);
    let t0 = Instant::now();
    let Ok(first) = engine.launch(t0) else {
        panic!("refused");
    };
    assert_eq!(first.hedge_after, Some(Duration::from_secs(1)));
    let t1 = t0 + Duration::from_secs(1);
    assert!(matches!(engine.on_timer(t1), Step::Call));
    let (second, host) = launch(&mut engine, t1);
    assert_eq!(host, "b.test");
    // No room for a third: the timer does nothing.
    assert!(matches!(engine.on_timer(t1), Step::Poll(None)));
    let output = done!(
        engine,
        engine.on_outcome(second, response(200, Decision::Return), t1)
    );
    let report = report_of(&output);
    let outcomes: Vec<_> = report
        .attempts()
        .iter()
        .map(|a| (a.target(), a.outcome().clone()))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("a", AttemptOutcome::Superseded),
            ("b", AttemptOutcome::Status(StatusCode::OK))
        ]
    );
    assert_eq!(report.served_by().unwrap().target(), "b");
}

#[test]
fn a_hedged_failure_waits_for_the_attempts_still_in_flight_before_ending() {
    let layer = layer(&["a", "b"]).hedge(Hedge::new(Duration::from_secs(1), 2));
    let mut engine = engine(&layer, None);
    let t0 = Instant::now();
    let (first, _) = launch(&mut engine, t0);
    assert!(matches!(engine.on_timer(t0), Step::Call));
    let (second, _) = launch(&mut engine, t0);
    // a fails while b runs: no target is left, but b may still answer.
    let step = engine.on_outcome(first, response(503, Decision::NextTarget), t0);
    assert!(matches!(step, Step::Poll(None)));
    let output = done!(
        engine,
        engine.on_outcome(second, error(ErrorKind::Closed, Decision::RetrySame), t0)
    );
    let error = output.unwrap_err();
    assert_eq!(error.report().stop_reason(), Some(StopReason::Exhausted));
    assert_eq!(error.report().attempts().len(), 2);
}

/// A health store that admits everything as a probe and logs what it is told.
#[derive(Default)]
struct Log(Mutex<Vec<(usize, HealthOutcome, bool)>>);

impl HealthStore for Arc<Log> {
    fn admit(&self, _: TargetId<'_>) -> Admission {
        Admission::Probe
    }
    fn cooling_for(&self, _: TargetId<'_>) -> Duration {
        Duration::ZERO
    }
    fn record(&self, target: TargetId<'_>, outcome: HealthOutcome, probe: bool) {
        self.0.lock().unwrap().push((target.index, outcome, probe));
    }
}

#[test]
fn every_admission_is_recorded_once_even_when_its_attempt_is_dropped() {
    let log = Arc::new(Log::default());
    let layer = layer(&["a", "b", "c"])
        .health_store(log.clone(), Duration::from_secs(60))
        .hedge(Hedge::new(Duration::from_secs(1), 2));
    let mut engine = engine(&layer, None);
    let t0 = Instant::now();
    let (first, _) = launch(&mut engine, t0);
    assert!(matches!(engine.on_timer(t0), Step::Call));
    let (b, _) = launch(&mut engine, t0);
    let mut limited = response(429, Decision::NextTarget);
    limited.cooldown = Some(Duration::from_secs(30));
    // a fails: c is chosen (admitted) but never sent, since b answers first.
    assert!(matches!(engine.on_outcome(first, limited, t0), Step::Call));
    done!(
        engine,
        engine.on_outcome(b, response(200, Decision::Return), t0)
    )
    .unwrap();
    drop(engine);
    let cooldown = Some(Duration::from_secs(30));
    assert_eq!(
        *log.0.lock().unwrap(),
        [
            (0, HealthOutcome::Failure { at_least: cooldown }, true),
            (1, HealthOutcome::Success, true),
            (2, HealthOutcome::Neutral, true),
        ]
    );
}

#[test]
fn a_request_that_starts_past_a_cooling_target_counts_as_a_fallback() {
    let layer = layer(&["a", "b"]).health_store(FirstCooling, Duration::from_secs(60));
    let mut engine = engine(&layer, None);
    let t0 = Instant::now();
    let (id, host) = launch(&mut engine, t0);
    assert_eq!(host, "b.test");
    let output = done!(
        engine,
        engine.on_outcome(id, response(200, Decision::Return), t0)
    );
    let report = report_of(&output);
    assert_eq!(report.skipped()[0].target(), "a");
    assert!(report.fell_back(), "served past its first choice");
    assert_eq!(layer.stats().snapshot().fell_back, 1, "the stats agree");
}

#[test]
fn retries_of_the_same_target_are_not_a_fallback() {
    let layer = layer(&["a", "b"]).retries(Retries::new(1).jitter(false));
    let mut engine = engine(&layer, None);
    let t0 = Instant::now();
    let (id, _) = launch(&mut engine, t0);
    let step = engine.on_outcome(id, error(ErrorKind::Closed, Decision::RetrySame), t0);
    assert!(matches!(step, Step::Wait(_)));
    assert!(matches!(engine.on_timer(t0), Step::Call));
    let (id, _) = launch(&mut engine, t0);
    let output = done!(
        engine,
        engine.on_outcome(id, response(200, Decision::Return), t0)
    );
    let report = report_of(&output);
    assert_eq!(report.attempts().len(), 2);
    assert!(!report.fell_back());
    assert_eq!(layer.stats().snapshot().fell_back, 0);
}

/// A target `http://{name}.test/v1` named `name`.
fn target(name: &str) -> Target {
    Target::new(format!("http://{name}.test/v1"))
        .unwrap()
        .with_name(name)
}

/// A layer over groups: each `(group, members)`; an empty group name is a target on its own.
fn groups(entries: &[(&str, &[(&str, u32)])]) -> FallbackLayer {
    FallbackLayer::new(entries.iter().map(|(name, members)| {
        if name.is_empty() {
            return TargetGroup::from(target(members[0].0));
        }
        members.iter().fold(TargetGroup::new(*name), |g, (m, w)| {
            g.weighted(target(m), *w)
        })
    }))
    .unwrap()
    .balance_seed(7)
}

/// One request served in `took` by whichever member is chosen: its host.
fn serve_in(layer: &FallbackLayer, now: Instant, took: Duration) -> String {
    let mut engine = engine_at(layer, None, now);
    let (id, host) = launch(&mut engine, now);
    done!(
        engine,
        engine.on_outcome(id, response(200, Decision::Return), now + took)
    )
    .unwrap();
    host
}

fn serve_one(layer: &FallbackLayer, now: Instant) -> String {
    serve_in(layer, now, Duration::ZERO)
}

fn count<'a>(hosts: impl IntoIterator<Item = &'a String>, host: &str) -> usize {
    hosts.into_iter().filter(|h| *h == host).count()
}

#[test]
fn the_choice_within_a_group_avoids_the_member_with_the_slower_latency_estimate() {
    let layer = groups(&[("g", &[("a", 1), ("b", 1), ("c", 1)])]);
    let t0 = Instant::now();
    let loads = &layer.shared().loads;
    loads.start(0).finish(Duration::from_millis(20), t0);
    loads.start(1).finish(Duration::from_millis(400), t0);
    loads.start(2).finish(Duration::from_millis(20), t0);
    let hosts: Vec<String> = (0..30).map(|_| serve_one(&layer, t0)).collect();
    // Two of three are drawn each time, and b loses every draw it is in.
    assert_eq!(count(&hosts, "b.test"), 0, "{hosts:?}");
    assert!(
        count(&hosts, "a.test") >= 5 && count(&hosts, "c.test") >= 5,
        "{hosts:?}"
    );
    // Idle long enough, its estimate decays below what a and c keep showing, and it is tried
    // again.
    let later = t0 + Duration::from_secs(120);
    let took = Duration::from_millis(20);
    let hosts: Vec<String> = (0..30).map(|_| serve_in(&layer, later, took)).collect();
    assert!(count(&hosts, "b.test") > 0, "{hosts:?}");
}

#[test]
fn a_member_that_answers_a_fast_caller_error_does_not_win_the_draws() {
    // b's key was revoked: it answers 401 in 20 ms, while a serves in 800 ms. A fast 401 is no
    // fast answer; if it counted as one, b would win every draw and every caller would get 401.
    let layer = groups(&[("g", &[("a", 1), ("b", 1)])]);
    let t0 = Instant::now();
    let mut hosts = Vec::new();
    for i in 0..20u64 {
        let now = t0 + Duration::from_millis(i);
        let mut engine = engine_at(&layer, None, now);
        let (id, host) = launch(&mut engine, now);
        let (status, took) = match host.as_str() {
            "b.test" => (401, 20),
            _ => (200, 800),
        };
        let answer = response(status, Decision::Return);
        let took = Duration::from_millis(took);
        done!(engine, engine.on_outcome(id, answer, now + took)).unwrap();
        hosts.push(host);
    }
    // Each is measured once (an unmeasured member is tried first); after that a wins.
    assert!(count(&hosts, "b.test") <= 1, "{hosts:?}");
}

#[test]
fn weights_bias_the_choice_by_capacity() {
    let layer = groups(&[("g", &[("a", 3), ("b", 1)])]);
    let t0 = Instant::now();
    // Four requests in flight at once: a, of weight 3, carries three before b gets one.
    let mut engines = Vec::new();
    let mut hosts = Vec::new();
    for _ in 0..4 {
        let mut engine = engine(&layer, None);
        hosts.push(launch(&mut engine, t0).1);
        engines.push(engine);
    }
    assert_eq!(
        (count(&hosts, "a.test"), count(&hosts, "b.test")),
        (3, 1),
        "{hosts:?}"
    );
    drop(engines);
    // Dropped, they are no longer in flight: a alone is chosen again.
    assert_eq!(serve_one(&layer, t0), "a.test");
}

/// Target 0 cools down; the others are open.
struct FirstCooling;

impl HealthStore for FirstCooling {
    fn admit(&self, target: TargetId<'_>) -> Admission {
        match target.index {
            0 => Admission::Cooling(Duration::from_secs(5)),
            _ => Admission::Open,
        }
    }
    fn cooling_for(&self, target: TargetId<'_>) -> Duration {
        Duration::from_secs(u64::from(target.index == 0) * 5)
    }
    fn record(&self, _: TargetId<'_>, _: HealthOutcome, _: bool) {}
}

#[test]
fn a_cooling_member_is_left_out_of_the_draw_and_its_group_serves() {
    let layer = groups(&[("g", &[("a", 1), ("b", 1)]), ("", &[("z", 1)])])
        .health_store(FirstCooling, Duration::from_secs(60));
    let t0 = Instant::now();
    for _ in 0..10 {
        let mut engine = engine(&layer, None);
        let (id, host) = launch(&mut engine, t0);
        assert_eq!(host, "b.test", "never a, never the next group");
        let output = done!(
            engine,
            engine.on_outcome(id, response(200, Decision::Return), t0)
        );
        let report = report_of(&output);
        assert_eq!(report.served_by().unwrap().group(), Some("g"));
        // a is not drawn at all while b is available, so no request counts as a fallback by
        // the luck of the draw.
        assert!(report.skipped().is_empty() && !report.fell_back());
    }
    assert_eq!(layer.stats().snapshot().fell_back, 0);
}

#[test]
fn a_failure_another_member_could_fix_moves_within_the_group_once_per_member() {
    let layer = groups(&[("g", &[("a", 1), ("b", 1), ("c", 1)]), ("", &[("z", 1)])]);
    let mut engine = engine(&layer, None);
    let t0 = Instant::now();
    let failures = [
        response(429, Decision::NextTarget),
        error(ErrorKind::Timeout, Decision::NextTarget),
        response(503, Decision::NextTarget),
    ];
    let mut hosts = Vec::new();
    for failure in failures {
        let (id, host) = launch(&mut engine, t0);
        hosts.push(host);
        assert_eq!(engine.on_outcome(id, failure, t0), Step::Call);
    }
    let (id, host) = launch(&mut engine, t0);
    assert_eq!(
        host, "z.test",
        "the group is exhausted only after each member once"
    );
    let output = done!(
        engine,
        engine.on_outcome(id, response(200, Decision::Return), t0)
    );
    hosts.sort();
    assert_eq!(hosts, ["a.test", "b.test", "c.test"]);
    let report = report_of(&output);
    let groups: Vec<_> = report.attempts().iter().map(|a| a.group()).collect();
    assert_eq!(groups, [Some("g"), Some("g"), Some("g"), None]);
    let line = report.to_string();
    assert!(line.contains("g/") && line.contains("4. z"), "{line}");
    let stats = layer.stats().snapshot();
    assert!(stats.targets[..3].iter().all(|t| t.retryable_failures == 1));
    assert_eq!(stats.targets[3].successes, 1);
}

#[test]
fn a_model_specific_failure_also_drops_a_hedge_chosen_in_the_same_group() {
    let layer = groups(&[("g", &[("a", 1), ("b", 1)]), ("", &[("z", 1)])])
        .hedge(Hedge::new(Duration::from_secs(1), 2));
    let mut engine = engine(&layer, None);
    let t0 = Instant::now();
    let (first, host) = launch(&mut engine, t0);
    assert!(host == "a.test" || host == "b.test", "{host}");
    // The hedge timer chooses g's other member, but the inner service is not ready yet…
    let t1 = t0 + Duration::from_secs(1);
    assert_eq!(engine.on_timer(t1), Step::Call);
    // …when the first answers 404 model_not_found: nobody in g serves the model.
    let step = engine.on_outcome(first, response(404, Decision::NextTarget), t1);
    assert_eq!(step, Step::Call);
    let (_, next) = launch(&mut engine, t1);
    assert_eq!(next, "z.test", "the group was left, its hedge with it");
}

#[test]
fn a_model_specific_failure_moves_to_the_next_group_at_once() {
    let layer = groups(&[("g", &[("a", 1), ("b", 1)]), ("h", &[("c", 1), ("d", 1)])]);
    let mut engine = engine(&layer, None);
    let t0 = Instant::now();
    let (id, first) = launch(&mut engine, t0);
    assert!(first == "a.test" || first == "b.test");
    // 404 model_not_found: no other member of g serves the model.
    let step = engine.on_outcome(id, response(404, Decision::NextTarget), t0);
    assert_eq!(step, Step::Call);
    let (id, second) = launch(&mut engine, t0);
    assert!(second == "c.test" || second == "d.test", "{second}");
    // A rate limit in h stays in h.
    assert_eq!(
        engine.on_outcome(id, response(429, Decision::NextTarget), t0),
        Step::Call
    );
    let (id, third) = launch(&mut engine, t0);
    assert!(
        third != second && (third == "c.test" || third == "d.test"),
        "{third}"
    );
    let output = done!(
        engine,
        engine.on_outcome(id, response(404, Decision::NextTarget), t0)
    );
    let report = report_of(&output);
    let trail: Vec<_> = report.attempts().iter().map(|a| a.group()).collect();
    assert_eq!(trail, [Some("g"), Some("h"), Some("h")]);
    assert_eq!(report.stop_reason(), Some(StopReason::Exhausted));
}

#[test]
fn when_every_member_cools_down_a_model_specific_failure_still_leaves_the_group() {
    struct AllCooling;
    impl HealthStore for AllCooling {
        fn admit(&self, t: TargetId<'_>) -> Admission {
            Admission::Cooling(Duration::from_secs(1 + t.index as u64))
        }
        fn cooling_for(&self, t: TargetId<'_>) -> Duration {
            Duration::from_secs(1 + t.index as u64)
        }
        fn record(&self, _: TargetId<'_>, _: HealthOutcome, _: bool) {}
    }
    let layer = groups(&[("g", &[("a", 1), ("b", 1)]), ("", &[("z", 1)])])
        .health_store(AllCooling, Duration::from_secs(60));
    let mut engine = engine(&layer, None);
    let t0 = Instant::now();
    let (id, host) = launch(&mut engine, t0);
    assert_eq!(host, "a.test", "soonest to recover first");
    engine.on_outcome(id, response(404, Decision::NextTarget), t0);
    assert_eq!(
        launch(&mut engine, t0).1,
        "z.test",
        "b is passed over with its group"
    );
}
