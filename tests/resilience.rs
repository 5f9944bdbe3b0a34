//! Issue-4 behaviour on tokio's paused clock, with in-process targets whose calls are counted:
//! same-target retries and Retry-After, cooldowns shared across clones, the retry budget, the
//! overall deadline, and the opt-in model-specific fallbacks.

mod support;

use std::time::Duration;

use http::StatusCode;
use support::*;
use tokio::time::Instant;
use tower::retry::budget::TpsBudget;
use tower::{Layer, ServiceExt};
use tower_model_fallback::{
    AttemptOutcome, Cooldowns, Decision, DefaultClassifier, FallbackReport, Hedge, Retries,
    StopReason,
};

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

// ---- same-target retries -------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn retries_back_off_exponentially_on_the_same_target() {
    let client = Scripted::new(&[
        (
            "primary",
            vec![Act::status(503), Act::status(502), Act::status(200)],
        ),
        ("fallback", vec![Act::status(200)]),
    ]);
    let layer = hosts(&["primary", "fallback"]).retries(Retries::new(2).jitter(false));
    let start = Instant::now();
    let (status, report) = send(&layer, &client).await;
    assert_eq!(status, 200);
    assert_eq!((client.count("primary"), client.count("fallback")), (3, 0));
    assert_eq!(
        client.times("primary", start),
        [
            secs(0),
            Duration::from_millis(500),
            Duration::from_millis(1500)
        ]
    );
    let decisions: Vec<Decision> = report.attempts().iter().map(|a| a.decision()).collect();
    assert_eq!(
        decisions,
        [Decision::RetrySame, Decision::RetrySame, Decision::Return]
    );
}

#[tokio::test(start_paused = true)]
async fn retries_run_out_then_the_next_target_is_tried_at_once() {
    let client = Scripted::new(&[
        ("primary", vec![Act::status(503)]),
        ("fallback", vec![Act::status(200)]),
    ]);
    let layer = hosts(&["primary", "fallback"]).retries(Retries::new(1).jitter(false));
    let start = Instant::now();
    let (status, report) = send(&layer, &client).await;
    assert_eq!(status, 200);
    assert_eq!((client.count("primary"), client.count("fallback")), (2, 1));
    assert_eq!(
        client.times("fallback", start),
        [Duration::from_millis(500)],
        "no delay when switching"
    );
    assert_eq!(report.attempts()[1].decision(), Decision::NextTarget);
}

#[tokio::test(start_paused = true)]
async fn jittered_backoff_stays_between_one_and_two_base_delays() {
    let client = Scripted::new(&[("primary", vec![Act::status(503), Act::status(200)])]);
    let layer = hosts(&["primary"]).retries(Retries::new(1).base_delay(secs(2)));
    let start = Instant::now();
    send(&layer, &client).await;
    let waited = client.times("primary", start)[1];
    assert!(waited >= secs(2) && waited < secs(4), "{waited:?}");
}

#[tokio::test(start_paused = true)]
async fn retry_after_ms_and_retry_after_seconds_are_honoured() {
    let client = Scripted::new(&[(
        "primary",
        vec![
            Act::status(429).header("retry-after-ms", "1200"),
            Act::status(503).header("retry-after", "3"),
            Act::status(200),
        ],
    )]);
    let layer = hosts(&["primary", "fallback"]).retries(Retries::new(2));
    let start = Instant::now();
    let (status, _) = send(&layer, &client).await;
    assert_eq!(status, 200);
    assert_eq!(
        client.times("primary", start),
        [
            secs(0),
            Duration::from_millis(1200),
            Duration::from_millis(4200)
        ]
    );
    assert_eq!(client.count("fallback"), 0);
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_above_the_cap_moves_on_instead_of_waiting() {
    let client = Scripted::new(&[
        (
            "primary",
            vec![Act::status(429).header("retry-after", "120")],
        ),
        ("fallback", vec![Act::status(200)]),
    ]);
    let layer = hosts(&["primary", "fallback"]).retries(Retries::new(3).max_wait(secs(10)));
    let start = Instant::now();
    let (status, report) = send(&layer, &client).await;
    assert_eq!(status, 200);
    assert_eq!(client.times("fallback", start), [secs(0)]);
    assert_eq!(
        (client.count("primary"), report.attempts()[0].decision()),
        (1, Decision::NextTarget)
    );
}

#[tokio::test(start_paused = true)]
async fn model_specific_failures_are_not_retried_on_the_same_target() {
    let client = Scripted::new(&[
        (
            "primary",
            vec![Act::status(404).body(r#"{"error":{"code":"model_not_found"}}"#)],
        ),
        ("fallback", vec![Act::status(200)]),
    ]);
    let layer = hosts(&["primary", "fallback"]).retries(Retries::new(3));
    let (status, _) = send(&layer, &client).await;
    assert_eq!(
        (
            status.as_u16(),
            client.count("primary"),
            client.count("fallback")
        ),
        (200, 1, 1)
    );
}

// ---- cooldowns -----------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_429_with_retry_after_cools_the_target_for_every_clone_then_one_probe_closes_it() {
    let client = Scripted::new(&[
        (
            "primary",
            vec![
                Act::status(429).header("retry-after", "30"),
                Act::status(200),
            ],
        ),
        ("fallback", vec![Act::status(200)]),
    ]);
    let layer = hosts(&["primary", "fallback"]).cooldowns(Cooldowns::new());
    let service = layer.layer(client.clone());

    let first = service.clone().oneshot(chat_request(CHAT)).await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!((client.count("primary"), client.count("fallback")), (1, 1));

    // Another clone, later: the primary is skipped without a call.
    tokio::time::advance(secs(10)).await;
    let second = service.clone().oneshot(chat_request(CHAT)).await.unwrap();
    let report = second.extensions().get::<FallbackReport>().unwrap();
    assert_eq!((client.count("primary"), client.count("fallback")), (1, 2));
    assert_eq!(report.skipped().len(), 1);
    assert_eq!(report.skipped()[0].target(), "primary");
    assert_eq!(report.skipped()[0].remaining(), secs(20));

    // After the cooldown, one probe reaches the primary; its success closes the breaker.
    tokio::time::advance(secs(20)).await;
    let third = service.clone().oneshot(chat_request(CHAT)).await.unwrap();
    assert_eq!(
        third
            .extensions()
            .get::<FallbackReport>()
            .unwrap()
            .served_by()
            .unwrap()
            .target(),
        "primary"
    );
    let fourth = service.oneshot(chat_request(CHAT)).await.unwrap();
    assert_eq!(
        fourth
            .extensions()
            .get::<FallbackReport>()
            .unwrap()
            .served_by()
            .unwrap()
            .target(),
        "primary"
    );
    assert_eq!((client.count("primary"), client.count("fallback")), (3, 2));
}

#[tokio::test(start_paused = true)]
async fn n_failures_within_the_window_open_the_breaker() {
    let client = Scripted::new(&[
        ("primary", vec![Act::status(503)]),
        ("fallback", vec![Act::status(200)]),
    ]);
    let layer =
        hosts(&["primary", "fallback"]).cooldowns(Cooldowns::new().failures(2).cooldown(secs(30)));
    for _ in 0..2 {
        send(&layer, &client).await;
    }
    assert_eq!(client.count("primary"), 2);
    for _ in 0..3 {
        let (_, report) = send(&layer, &client).await;
        assert_eq!(report.skipped().len(), 1);
    }
    assert_eq!((client.count("primary"), client.count("fallback")), (2, 5));
}

#[tokio::test(start_paused = true)]
async fn only_one_probe_goes_through_after_a_cooldown() {
    let client = Scripted::new(&[
        (
            "primary",
            vec![Act::status(503), Act::status(200).after(secs(5))],
        ),
        ("fallback", vec![Act::status(200)]),
    ]);
    let layer =
        hosts(&["primary", "fallback"]).cooldowns(Cooldowns::new().failures(1).cooldown(secs(30)));
    send(&layer, &client).await;
    tokio::time::advance(secs(30)).await;
    // The probe takes 5 s; meanwhile another request skips the primary.
    let probe = tokio::spawn(layer.layer(client.clone()).oneshot(chat_request(CHAT)));
    tokio::time::sleep(secs(1)).await;
    let (_, report) = send(&layer, &client).await;
    assert_eq!(
        report.skipped()[0].remaining(),
        Duration::ZERO,
        "cooled down, but probed by another request"
    );
    let probed = probe.await.unwrap().unwrap();
    assert_eq!(
        probed
            .extensions()
            .get::<FallbackReport>()
            .unwrap()
            .served_by()
            .unwrap()
            .target(),
        "primary"
    );
    assert_eq!(client.count("primary"), 2);
}

#[tokio::test(start_paused = true)]
async fn a_failed_probe_extends_the_cooldown() {
    let client = Scripted::new(&[
        ("primary", vec![Act::status(503)]),
        ("fallback", vec![Act::status(200)]),
    ]);
    let layer =
        hosts(&["primary", "fallback"]).cooldowns(Cooldowns::new().failures(1).cooldown(secs(30)));
    send(&layer, &client).await;
    tokio::time::advance(secs(30)).await;
    send(&layer, &client).await; // the probe fails
    assert_eq!(client.count("primary"), 2);
    tokio::time::advance(secs(29)).await;
    let (_, report) = send(&layer, &client).await;
    assert_eq!(report.skipped()[0].remaining(), secs(1));
    assert_eq!(client.count("primary"), 2);
}

#[tokio::test(start_paused = true)]
async fn when_every_target_is_cooling_they_are_still_tried_soonest_first() {
    let client = Scripted::new(&[
        (
            "a",
            vec![
                Act::status(429).header("retry-after", "50"),
                Act::status(503),
            ],
        ),
        (
            "b",
            vec![
                Act::status(429).header("retry-after", "20"),
                Act::status(200),
            ],
        ),
    ]);
    let layer = hosts(&["a", "b"]).cooldowns(Cooldowns::new());
    let (status, _) = send(&layer, &client).await;
    assert_eq!(status, 429, "both cooled down by this first request");
    tokio::time::advance(secs(5)).await;
    let (status, report) = send(&layer, &client).await;
    assert_eq!(status, 200, "no failure without a call");
    assert_eq!(
        client.sequence(),
        ["a", "b", "b"],
        "b recovers sooner, so b goes first"
    );
    assert!(report.skipped().is_empty());
}

#[tokio::test(start_paused = true)]
async fn insufficient_quota_moves_on_and_cools_the_target_for_a_long_time() {
    let client = Scripted::new(&[
        ("primary", vec![Act::status(429).body(r#"{"error":{"code":"insufficient_quota","message":"You exceeded your current quota"}}"#)]),
        ("fallback", vec![Act::status(200)]),
    ]);
    let layer = hosts(&["primary", "fallback"])
        .retries(Retries::new(2))
        .cooldowns(Cooldowns::new().quota_cooldown(secs(900)));
    let (status, report) = send(&layer, &client).await;
    assert_eq!(
        (status.as_u16(), client.count("primary")),
        (200, 1),
        "no same-target retry on a spent quota"
    );
    assert_eq!(report.attempts()[0].decision(), Decision::NextTarget);
    tokio::time::advance(secs(899)).await;
    let (_, report) = send(&layer, &client).await;
    assert_eq!(report.skipped()[0].remaining(), secs(1));
    assert_eq!(client.count("primary"), 1);
}

// ---- retry budget --------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn the_retry_budget_limits_fallbacks_to_a_share_of_requests() {
    let client = Scripted::new(&[
        ("primary", vec![Act::status(503)]),
        ("fallback", vec![Act::status(200)]),
    ]);
    // No reserve; one retry per two requests.
    let layer = hosts(&["primary", "fallback"]).retry_budget(TpsBudget::new(secs(10), 0, 0.5));
    let mut spent = 0;
    for _ in 0..10 {
        let (status, report) = send(&layer, &client).await;
        if status == 503 {
            assert_eq!(report.stop_reason(), Some(StopReason::RetryBudget));
            assert_eq!(report.attempts().len(), 1);
            spent += 1;
        }
    }
    assert_eq!(
        (client.count("primary"), client.count("fallback"), spent),
        (10, 5, 5)
    );
}

// ---- overall deadline ----------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn the_deadline_cancels_the_attempt_in_flight_and_starts_nothing_after_it() {
    let client = Scripted::new(&[
        ("primary", vec![Act::status(503).after(secs(4))]),
        ("fallback", vec![Act::status(200).after(secs(3))]),
        ("third", vec![Act::status(200)]),
    ]);
    let layer = hosts(&["primary", "fallback", "third"]).deadline(secs(5));
    let start = Instant::now();
    let err = layer
        .layer(client.clone())
        .oneshot(chat_request(CHAT))
        .await
        .unwrap_err();
    assert_eq!(
        start.elapsed(),
        secs(5),
        "the fallback got only the second that was left"
    );
    assert!(err.is_deadline() && err.is_timeout(), "{err}");
    assert_eq!(err.report().attempts().len(), 2);
    assert_eq!(err.report().stop_reason(), Some(StopReason::Deadline));
    tokio::time::sleep(secs(60)).await;
    assert_eq!(
        client.sequence(),
        ["primary", "fallback"],
        "nothing started after the deadline"
    );
}

#[tokio::test(start_paused = true)]
async fn a_backoff_that_would_cross_the_deadline_hands_back_the_last_response() {
    let client = Scripted::new(&[("primary", vec![Act::status(503).header("retry-after", "8")])]);
    let layer = hosts(&["primary"])
        .retries(Retries::new(3))
        .deadline(secs(5));
    let start = Instant::now();
    let (status, report) = send(&layer, &client).await;
    assert_eq!((status.as_u16(), start.elapsed()), (503, secs(0)));
    assert_eq!(report.stop_reason(), Some(StopReason::Deadline));
    assert_eq!(client.count("primary"), 1);
}

// ---- opt-in model-specific fallbacks -------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn context_length_and_content_policy_fall_back_only_when_opted_in() {
    let too_long = r#"{"error":{"message":"This model's maximum context length is 8192 tokens","type":"invalid_request_error","code":"context_length_exceeded"}}"#;
    let refused = r#"{"error":{"message":"rejected by the safety system","type":"invalid_request_error","code":"content_policy_violation"}}"#;
    for (body, opt_in, expect_fallback) in [
        (too_long, None, false),
        (refused, None, false),
        (
            too_long,
            Some(DefaultClassifier::new().fall_back_on_context_length(true)),
            true,
        ),
        (
            refused,
            Some(DefaultClassifier::new().fall_back_on_context_length(true)),
            false,
        ),
        (
            refused,
            Some(DefaultClassifier::new().fall_back_on_content_policy(true)),
            true,
        ),
    ] {
        let client = Scripted::new(&[
            ("primary", vec![Act::status(400).body(body)]),
            ("fallback", vec![Act::status(200)]),
        ]);
        let mut layer = hosts(&["primary", "fallback"]).retries(Retries::new(2));
        if let Some(policy) = opt_in {
            layer = layer.classifier(policy);
        }
        let (status, _) = send(&layer, &client).await;
        assert_eq!(
            client.count("primary"),
            1,
            "never retried on the same model"
        );
        assert_eq!(
            (status == 200, client.count("fallback") == 1),
            (expect_fallback, expect_fallback),
            "{body}"
        );
    }
}

// ---- hedging -------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_slow_head_starts_the_next_target_in_parallel_and_the_first_answer_wins() {
    let client = Scripted::new(&[
        ("primary", vec![Act::hang()]),
        ("fallback", vec![Act::status(200).after(secs(1))]),
    ]);
    let layer = hosts(&["primary", "fallback"]).hedge(Hedge::new(secs(2), 2));
    let start = Instant::now();
    let (status, report) = send(&layer, &client).await;
    assert_eq!((status.as_u16(), start.elapsed()), (200, secs(3)));
    assert_eq!(client.times("fallback", start), [secs(2)]);
    let outcomes: Vec<(&str, &AttemptOutcome)> = report
        .attempts()
        .iter()
        .map(|a| (a.target(), a.outcome()))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("primary", &AttemptOutcome::Superseded),
            ("fallback", &AttemptOutcome::Status(StatusCode::OK))
        ]
    );
    assert_eq!(report.served_by().unwrap().target(), "fallback");
}

#[tokio::test(start_paused = true)]
async fn at_most_k_attempts_race_and_a_failure_frees_a_place_at_once() {
    let client = Scripted::new(&[
        ("a", vec![Act::hang()]),
        ("b", vec![Act::status(503).after(secs(3))]),
        ("c", vec![Act::status(200)]),
    ]);
    let layer = hosts(&["a", "b", "c"]).hedge(Hedge::new(secs(2), 2));
    let start = Instant::now();
    let (status, report) = send(&layer, &client).await;
    assert_eq!(status, 200);
    // b starts at 2 s; at 4 s the timer fires but two are in flight; b fails at 5 s and c starts.
    assert_eq!(client.times("b", start), [secs(2)]);
    assert_eq!(client.times("c", start), [secs(5)]);
    assert_eq!(report.attempts().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_failure_no_target_can_fix_from_any_racer_is_handed_back() {
    let client = Scripted::new(&[
        ("primary", vec![Act::hang()]),
        ("fallback", vec![Act::status(401).after(secs(1))]),
    ]);
    let layer = hosts(&["primary", "fallback"]).hedge(Hedge::new(secs(2), 3));
    let (status, report) = send(&layer, &client).await;
    assert_eq!(status, 401);
    assert_eq!(report.attempts()[0].outcome(), &AttemptOutcome::Superseded);
}

#[tokio::test(start_paused = true)]
async fn a_quick_retryable_failure_starts_the_next_target_without_waiting_for_the_hedge_delay() {
    let client = Scripted::new(&[
        (
            "primary",
            vec![Act::status(503).after(Duration::from_millis(500))],
        ),
        ("fallback", vec![Act::status(200)]),
    ]);
    let layer = hosts(&["primary", "fallback"]).hedge(Hedge::new(secs(2), 2));
    let start = Instant::now();
    let (status, _) = send(&layer, &client).await;
    assert_eq!(status, 200);
    assert_eq!(
        client.times("fallback", start),
        [Duration::from_millis(500)]
    );
}

#[tokio::test(start_paused = true)]
async fn when_every_racer_fails_the_last_failure_is_handed_back() {
    let client = Scripted::new(&[
        ("a", vec![Act::status(503).after(secs(3))]),
        ("b", vec![Act::status(502).after(secs(5))]),
    ]);
    let layer = hosts(&["a", "b"]).hedge(Hedge::new(secs(1), 2));
    let (status, report) = send(&layer, &client).await;
    assert_eq!(status.as_u16(), 502);
    assert!(report.is_exhausted());
    assert_eq!((client.count("a"), client.count("b")), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn a_deadline_after_a_transport_error_is_a_deadline_error_carrying_that_error() {
    let inner = tower::service_fn(
        |_req: http::Request<tower_model_fallback::ReplayBody>| async {
            Err::<http::Response<http_body_util::Full<bytes::Bytes>>, tower::BoxError>(Box::new(
                std::io::Error::from(std::io::ErrorKind::ConnectionReset),
            ))
        },
    );
    let layer = hosts(&["primary"])
        .retries(Retries::new(1).base_delay(secs(8)).jitter(false))
        .deadline(secs(5));
    let err = layer
        .layer(inner)
        .oneshot(chat_request(CHAT))
        .await
        .unwrap_err();
    assert!(err.is_deadline() && err.is_timeout(), "{err}");
    assert_eq!(err.report().stop_reason(), Some(StopReason::Deadline));
    let source = std::error::Error::source(&err).expect("the transport error");
    assert_eq!(
        tower_model_fallback::ErrorKind::of(source),
        tower_model_fallback::ErrorKind::Closed
    );
}

// ---- the layer's own attempt timeout ---------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn the_attempt_timeout_bounds_each_head_and_moves_to_the_next_target() {
    let client = Scripted::new(&[
        ("primary", vec![Act::hang()]),
        ("fallback", vec![Act::status(200).after(secs(1))]),
    ]);
    let layer = hosts(&["primary", "fallback"]).attempt_timeout(secs(3));
    let start = Instant::now();
    let (status, report) = send(&layer, &client).await;
    assert_eq!(status, 200);
    assert_eq!(client.times("fallback", start), [secs(3)], "{report}");
    match report.attempts()[0].outcome() {
        AttemptOutcome::Error { kind, .. } => {
            assert_eq!(*kind, tower_model_fallback::ErrorKind::Timeout)
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_eq!(report.attempts()[0].elapsed(), secs(3));
    assert_eq!(report.served_by().unwrap().target(), "fallback");
}

#[tokio::test(start_paused = true)]
async fn attempt_timeout_ms_in_the_config_is_enforced_by_the_layer_it_builds() {
    let config = tower_model_fallback::FallbackConfig::from_json(
        br#"{"targets": [
            {"name": "primary", "base_url": "http://primary/v1"},
            {"name": "fallback", "base_url": "http://fallback/v1"}],
            "attempt_timeout_ms": 1500}"#,
    )
    .unwrap();
    let layer = config.layer().unwrap();
    let client = Scripted::new(&[("primary", vec![Act::hang()])]);
    let start = Instant::now();
    let (status, report) = send(&layer, &client).await;
    assert_eq!(status, 200);
    assert_eq!(
        client.times("fallback", start),
        [Duration::from_millis(1500)]
    );
    assert_eq!(report.attempts().len(), 2);
}
