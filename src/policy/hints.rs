//! What a failed response says about the next attempt: the wait it asks for (`Retry-After`)
//! and the cooldown it calls for (the wait, or a long one for an exhausted quota).

use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode};

/// The wait an upstream asked for: `retry-after-ms` (milliseconds, as OpenAI sends), else
/// `retry-after` (seconds, or an HTTP date).
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|ms| ms.is_finite() && *ms >= 0.0)
    {
        return Some(Duration::from_secs_f64((ms / 1000.0).min(1e9)));
    }
    let value = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds.min(1_000_000_000)));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(
        date.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// The cooldown a failed response calls for: `quota` for an exhausted quota
/// (`insufficient_quota` as a 429's error code), else its `Retry-After` on a 429 or 503.
pub(crate) fn cooldown(
    status: StatusCode,
    headers: &HeaderMap,
    code: Option<&str>,
    quota: Duration,
) -> Option<Duration> {
    let exhausted = || code == Some("insufficient_quota");
    match status {
        StatusCode::TOO_MANY_REQUESTS if exhausted() => Some(quota),
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => retry_after(headers),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (http::HeaderName::from_static(k), v.parse().unwrap()))
            .collect()
    }

    #[test]
    fn reads_every_spelling_of_retry_after() {
        assert_eq!(
            retry_after(&headers(&[("retry-after-ms", "1500")])),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after", "7")])),
            Some(Duration::from_secs(7))
        );
        let later = SystemTime::now() + Duration::from_secs(120);
        let date = httpdate::fmt_http_date(later);
        let wait = retry_after(&headers(&[("retry-after", &date)])).unwrap();
        assert!(
            wait > Duration::from_secs(110) && wait <= Duration::from_secs(120),
            "{wait:?}"
        );
        let past = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(60));
        assert_eq!(
            retry_after(&headers(&[("retry-after", &past)])),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")])), None);
        assert_eq!(retry_after(&headers(&[("retry-after-ms", "-5")])), None);
        assert_eq!(
            retry_after(&headers(&[("retry-after-ms", "20"), ("retry-after", "9")])),
            Some(Duration::from_millis(20)),
            "the millisecond header wins"
        );
    }
}
