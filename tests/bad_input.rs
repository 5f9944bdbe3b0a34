//! Bad input: a clear error or a documented behaviour, never a panic, and nothing sent upstream.

mod support;

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Request;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use support::*;
use tower::ServiceExt;
use tower_model_fallback::{FallbackError, FallbackLayer, Target};

async fn send<B>(layer: &FallbackLayer, request: Request<B>) -> Result<u16, FallbackError>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<tower::BoxError>,
{
    stack(layer)
        .oneshot(request)
        .await
        .map(|r| r.status().as_u16())
}

async fn one_target() -> (Upstream, FallbackLayer) {
    let up = Upstream::chat("should not be called").await;
    let layer = FallbackLayer::new([Target::new(up.url()).unwrap().with_model("m")]).unwrap();
    (up, layer)
}

fn json_post<B>(body: B) -> Request<B> {
    Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(body)
        .unwrap()
}

#[tokio::test]
async fn an_oversize_body_is_refused_before_anything_is_sent() {
    let (up, layer) = one_target().await;
    let layer = layer.max_body_bytes(1024);
    let err = send(&layer, json_post(Full::new(Bytes::from(vec![b' '; 1025]))))
        .await
        .unwrap_err();
    assert!(err.is_body_too_large() && err.is_nothing_sent());
    assert!(err.to_string().contains("limit of 1024 bytes"), "{err}");
    // Exactly at the bound is fine.
    let ok = format!(r#"{{"model":"x","pad":"{}"}}"#, "p".repeat(1024 - 22));
    assert_eq!(ok.len(), 1024);
    assert_eq!(
        send(&layer, json_post(Full::new(Bytes::from(ok))))
            .await
            .unwrap(),
        200
    );
    assert_eq!(up.count(), 1);
}

/// A body of `n` chunks of `size` spaces, with no size hint.
struct Chunks {
    n: usize,
    size: usize,
}
impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.n == 0 {
            return Poll::Ready(None);
        }
        self.n -= 1;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b' '; self.size])))))
    }
}

#[tokio::test]
async fn an_oversize_body_in_many_chunks_without_a_size_hint_is_refused() {
    let (up, layer) = one_target().await;
    let layer = layer.max_body_bytes(10_000);
    let err = send(&layer, json_post(Chunks { n: 100, size: 1000 }))
        .await
        .unwrap_err();
    assert!(err.is_body_too_large());
    assert_eq!(up.count(), 0);
}

/// A body that announces more than the bound up front: refused without reading a byte.
struct Announced;
impl Body for Announced {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        panic!("the layer must not read a body whose size hint is over the bound");
    }
    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(1 << 40)
    }
}

#[tokio::test]
async fn a_body_announcing_a_size_over_the_bound_is_refused_unread() {
    let (up, layer) = one_target().await;
    let err = send(&layer, json_post(Announced)).await.unwrap_err();
    assert!(err.is_body_too_large());
    assert_eq!(up.count(), 0);
}

/// A body that yields one chunk, then fails.
struct Broken(bool);
impl Body for Broken {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if self.0 {
            Poll::Ready(Some(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "client went away",
            ))))
        } else {
            self.0 = true;
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"{\"model\":")))))
        }
    }
}

#[tokio::test]
async fn a_body_stream_error_is_an_error_and_nothing_is_sent() {
    let (up, layer) = one_target().await;
    let err = send(&layer, json_post(Broken(false))).await.unwrap_err();
    assert!(err.is_body_unreadable() && err.is_nothing_sent());
    assert!(err.to_string().contains("client went away"), "{err}");
    assert!(std::error::Error::source(&err).is_some());
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn invalid_json_and_non_objects_under_a_json_content_type_are_refused() {
    let (up, layer) = one_target().await;
    let deep_array = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    for body in [
        "{\"model\": \"a\",".to_owned(),
        "{\"model\": 'a'}".to_owned(),
        "[{\"model\":\"a\"}]".to_owned(),
        "\"just a string\"".to_owned(),
        "{\"a\":1} {\"b\":2}".to_owned(),
        deep_array,
        "[".repeat(100_000),
    ] {
        let err = send(&layer, json_post(Full::new(Bytes::from(body.clone()))))
            .await
            .unwrap_err();
        assert!(err.is_invalid_json(), "{err}");
        assert!(err.to_string().contains("nothing was sent"), "{err}");
    }
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn deep_nesting_inside_an_object_is_valid_json_and_is_sent() {
    let (up, layer) = one_target().await;
    let body = format!(
        r#"{{"model":"a","x":{}{}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    assert_eq!(
        send(&layer, json_post(Full::new(Bytes::from(body.clone()))))
            .await
            .unwrap(),
        200
    );
    let seen = &up.requests()[0].body;
    assert_eq!(seen.len(), body.len());
    assert!(seen.starts_with(br#"{"model":"m","x":[[["#));
}

#[tokio::test]
async fn a_path_that_repeats_the_base_path_is_refused_naming_the_fix() {
    let up = Upstream::chat("served").await;
    let layer = FallbackLayer::new([
        Target::new(up.url()).unwrap().with_name("root"),
        Target::new(up.url_with("/v1")).unwrap().with_name("openai"),
    ])
    .unwrap();
    let err = send(&layer, json_post(Full::new(Bytes::from_static(b"{}"))))
        .await
        .unwrap_err();
    assert!(err.is_misdirected() && err.is_nothing_sent(), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("/v1/chat/completions starts with the base path of target openai")
            && message.contains("send /chat/completions"),
        "{message}"
    );
    // A path that only shares the prefix's characters is not the trap.
    let beta = Request::post("/v1beta/models")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(&layer, beta).await.unwrap(), 200);
    assert_eq!(up.count(), 1, "only the /v1beta request went out");
    assert_eq!(up.requests()[0].uri.path(), "/v1beta/models");
}

#[tokio::test]
async fn an_absolute_uri_for_another_host_is_refused_and_a_targets_own_is_taken() {
    let up = Upstream::chat("served").await;
    let layer = FallbackLayer::new([Target::new(up.url_with("/v1")).unwrap()]).unwrap();
    let elsewhere = Request::post("https://api.openai.com/chat/completions")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let err = send(&layer, elsewhere).await.unwrap_err();
    assert!(err.is_misdirected() && err.is_nothing_sent(), "{err}");
    assert!(
        err.to_string()
            .contains("names https://api.openai.com, which is no target's"),
        "{err}"
    );
    // An HTTP/2 request always has an authority (a proxy's server sees its own): not checked.
    let proxied = Request::post("http://gateway.local/chat/completions")
        .version(http::Version::HTTP_2)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    assert_eq!(send(&layer, proxied).await.unwrap(), 200);
    // The same URI with the target's own scheme and host goes to the target's base URL.
    let own = Request::post(up.url_with("/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    assert_eq!(send(&layer, own).await.unwrap(), 200);
    assert_eq!(up.requests()[1].uri.path(), "/v1/chat/completions");
    // …but not with its base path again.
    let twice = Request::post(up.url_with("/v1/chat/completions"))
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    assert!(send(&layer, twice).await.unwrap_err().is_misdirected());
    assert_eq!(up.count(), 2);
}

#[tokio::test]
async fn user_info_in_an_absolute_uri_is_not_part_of_the_destination_and_is_never_echoed() {
    let up = Upstream::chat("served").await;
    let layer = FallbackLayer::new([Target::new(up.url_with("/v1")).unwrap()]).unwrap();
    let with_key = |uri: String| {
        Request::post(uri)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    };
    let elsewhere = with_key("https://user:sk-secret@api.openai.com/chat/completions".into());
    let err = send(&layer, elsewhere).await.unwrap_err();
    assert!(err.is_misdirected(), "{err}");
    let message = format!("{err} {err:?}");
    assert!(
        !message.contains("sk-secret") && !message.contains("user:"),
        "{message}"
    );
    assert!(
        message.contains("names https://api.openai.com,"),
        "{message}"
    );
    // The target's own host with user info in front is still the target's.
    let own = up
        .url_with("/chat/completions")
        .replace("http://", "http://user:sk-secret@");
    assert_eq!(send(&layer, with_key(own)).await.unwrap(), 200);
    assert_eq!(up.count(), 1);
}
