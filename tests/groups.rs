//! Target groups on tokio's paused clock, over in-process members whose calls are counted: the
//! choice by latency, the skip of a cooling member, the move within a group on a failure another
//! member could fix, and the move to the next group on a model-specific one.

mod support;

use std::time::Duration;

use support::*;
use tower_model_fallback::{Cooldowns, FallbackLayer, Target, TargetGroup};

fn member(host: &str) -> Target {
    Target::new(format!("http://{host}/v1"))
        .unwrap()
        .with_name(host)
}

fn group(name: &str, hosts: &[&str]) -> TargetGroup {
    hosts
        .iter()
        .fold(TargetGroup::new(name), |g, h| g.member(member(h)))
}

const MODEL_NOT_FOUND: &str = r#"{"error":{"code":"model_not_found"}}"#;

#[tokio::test(start_paused = true)]
async fn the_choice_goes_to_the_member_with_the_lower_latency() {
    let client = Scripted::new(&[
        (
            "fast",
            vec![Act::status(200).after(Duration::from_millis(10))],
        ),
        (
            "slow",
            vec![Act::status(200).after(Duration::from_millis(300))],
        ),
    ]);
    let layer = FallbackLayer::new([group("g", &["fast", "slow"])]).unwrap();
    for _ in 0..20 {
        let (status, report) = send(&layer, &client).await;
        assert_eq!(status, 200);
        assert_eq!(report.served_by().unwrap().group(), Some("g"));
    }
    // Each is tried once while unmeasured; then the slow one loses every draw (its estimate
    // would take some 30 s of idleness to decay below the fast one's).
    assert_eq!((client.count("fast"), client.count("slow")), (19, 1));
    let stats = layer.stats().snapshot();
    assert_eq!(
        (stats.targets[0].successes, stats.targets[1].successes),
        (19, 1)
    );
    assert_eq!(stats.targets[1].group.as_deref(), Some("g"));
}

#[tokio::test(start_paused = true)]
async fn a_rate_limited_member_is_tried_once_then_left_out_and_its_group_serves() {
    // Slower than the penalty a failure counts as, so that only its cooldown keeps k1 out.
    let ok = || vec![Act::status(200).after(Duration::from_millis(1500))];
    let client = Scripted::new(&[
        ("k1", vec![Act::status(429)]),
        ("k2", ok()),
        ("k3", ok()),
        ("other", ok()),
    ]);
    let layer = FallbackLayer::new([group("openai", &["k1", "k2", "k3"]), member("other").into()])
        .unwrap()
        .cooldowns(
            Cooldowns::new()
                .failures(1)
                .cooldown(Duration::from_secs(300)),
        )
        .balance_seed(1);
    let mut skips = 0;
    let mut moved = 0;
    for _ in 0..30 {
        let (status, report) = send(&layer, &client).await;
        assert_eq!(status, 200);
        let served = report.served_by().unwrap();
        assert_eq!(served.group(), Some("openai"), "{report}");
        assert_ne!(served.target(), "k1");
        if report.attempts().len() == 2 {
            // The 429 moved to another member of the group, not to the next entry.
            assert_eq!(report.attempts()[0].target(), "k1");
            moved += 1;
        }
        skips += report
            .skipped()
            .iter()
            .filter(|s| s.target() == "k1")
            .count();
    }
    assert_eq!(client.count("k1"), 1, "skipped for its whole cooldown");
    assert_eq!(client.count("other"), 0);
    assert_eq!(moved, 1);
    // Left out of the draw while it cools: never drawn, so never a skip (nor, by the luck of
    // a draw, a fallback).
    assert_eq!(skips, 0);
    let stats = layer.stats().snapshot();
    assert_eq!(stats.targets[0].cooldown_skips, 0);
    assert_eq!(
        stats.fell_back, 1,
        "only the request whose 429 moved within the group"
    );
    assert_eq!(stats.targets[0].retryable_failures, 1);
    assert_eq!(stats.targets[3].attempts, 0);
}

#[tokio::test(start_paused = true)]
async fn a_group_whose_every_member_fails_falls_back_to_the_next_entry() {
    let client = Scripted::new(&[
        ("k1", vec![Act::status(503)]),
        ("k2", vec![Act::status(500)]),
        ("other", vec![Act::status(200)]),
    ]);
    let layer = FallbackLayer::new([group("g", &["k1", "k2"]), member("other").into()]).unwrap();
    let (status, report) = send(&layer, &client).await;
    assert_eq!(status, 200);
    let trail: Vec<(Option<&str>, &str)> = report
        .attempts()
        .iter()
        .map(|a| (a.group(), a.target()))
        .collect();
    assert_eq!(trail.len(), 3, "{report}");
    assert!(trail[..2].contains(&(Some("g"), "k1")) && trail[..2].contains(&(Some("g"), "k2")));
    assert_eq!(trail[2], (None, "other"));
}

#[tokio::test(start_paused = true)]
async fn a_missing_model_moves_to_the_next_group_at_once() {
    let missing = || vec![Act::status(404).body(MODEL_NOT_FOUND)];
    let client = Scripted::new(&[
        ("a1", missing()),
        ("a2", missing()),
        ("b1", vec![Act::status(200)]),
        ("b2", vec![Act::status(200)]),
    ]);
    let layer = FallbackLayer::new([group("a", &["a1", "a2"]), group("b", &["b1", "b2"])]).unwrap();
    let (status, report) = send(&layer, &client).await;
    assert_eq!(status, 200);
    let groups: Vec<Option<&str>> = report.attempts().iter().map(|a| a.group()).collect();
    assert_eq!(groups, [Some("a"), Some("b")], "{report}");
    assert_eq!(client.count("a1") + client.count("a2"), 1);
}
