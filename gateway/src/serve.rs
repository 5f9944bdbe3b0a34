//! Serving: hyper-util's `auto` connections (HTTP/1.1 and h2c), the client-side timeouts, a
//! lingering close, and a graceful shutdown that always ends.
//!
//! - **Header read timeout**: hyper's own, from the moment a connection waits for a head.
//! - **Body read timeout**: tower-http's
//!   [`RequestBodyTimeout`](tower_http::timeout::RequestBodyTimeout), the longest pause between
//!   two chunks of a request body (in [`Gateway`]).
//! - **Idle timeout**: a connection with no request in flight that sends nothing is closed.
//! - **Lingering close**: when the gateway closes a connection whose client may still be
//!   sending (a 413 for a body over the limit, answered before the body was read), it sends its
//!   FIN and then reads and discards what comes, for at most [`LINGER`]: the client reads the
//!   answer instead of a reset.
//! - **Shutdown**: stop accepting at once, let connections finish for `shutdown_timeout`, then
//!   cut what is left.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};

use crate::config::GatewayConfig;
use crate::proxy::{Gateway, GatewayBody};

/// The longest a closing connection keeps reading (and discarding) what its client still sends.
pub const LINGER: Duration = Duration::from_secs(5);

/// The client-side limits of [`serve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// See [`GatewayConfig::header_read_timeout`].
    pub header_read_timeout: Duration,
    /// See [`GatewayConfig::idle_timeout`].
    pub idle_timeout: Duration,
    /// See [`GatewayConfig::shutdown_timeout`].
    pub shutdown_timeout: Duration,
}

impl From<&GatewayConfig> for Limits {
    fn from(c: &GatewayConfig) -> Limits {
        Limits {
            header_read_timeout: c.header_read_timeout,
            idle_timeout: c.idle_timeout,
            shutdown_timeout: c.shutdown_timeout,
        }
    }
}

/// Serves `gateway` on `listener` until `shutdown` completes; then stops accepting, lets the
/// connections finish for `limits.shutdown_timeout` and cuts the rest.
pub async fn serve(
    listener: TcpListener,
    gateway: Gateway,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors, most likely: wait for some to close rather than spin.
                    tracing::warn!(target: "gateway", error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Small writes (a response head, the first event of a stream) go out at once.
        let _ = tcp.set_nodelay(true);
        let activity = Arc::new(Activity::default());
        let io = TokioIo::new(Watched::new(tcp, activity.clone(), limits.idle_timeout));
        let service = Connection {
            gateway: gateway.clone(),
            activity,
        };
        let connection = graceful.watch(builder.serve_connection(io, service).into_owned());
        connections.spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(target: "gateway", error = %e, "connection ended");
            }
        });
        // Reap the finished ones, so the set holds only live connections.
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let live = connections.len();
    if tokio::time::timeout(limits.shutdown_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            target: "gateway",
            "shutdown: {} connections still open after {:?}, cut",
            connections.len(),
            limits.shutdown_timeout
        );
    } else {
        tracing::debug!(target: "gateway", "shutdown: {live} connections finished");
    }
    connections.abort_all();
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// Requests in flight on one connection.
#[derive(Default)]
pub(crate) struct Activity {
    in_flight: AtomicUsize,
}

/// One request in flight; dropped with the response body.
pub(crate) struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(activity: Arc<Activity>) -> InFlight {
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The hyper service of one connection.
#[derive(Clone)]
struct Connection {
    gateway: Gateway,
    activity: Arc<Activity>,
}

impl hyper::service::Service<Request<Incoming>> for Connection {
    type Response = Response<GatewayBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<GatewayBody>, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let guard = InFlight::new(self.activity.clone());
        let gateway = self.gateway.clone();
        Box::pin(async move {
            let mut response = gateway.handle(request).await;
            response.body_mut().hold(guard);
            Ok(response)
        })
    }
}

/// A client's TCP stream, closed when it is silent for the idle timeout while no request is in
/// flight, and closed lingering.
struct Watched {
    tcp: TcpStream,
    activity: Arc<Activity>,
    idle: Duration,
    last: Instant,
    timer: Pin<Box<Sleep>>,
    closing: bool,
    drained: u64,
}

/// Bytes a lingering close reads at most, whatever the time.
const LINGER_BYTES: u64 = 64 << 20;

impl Watched {
    fn new(tcp: TcpStream, activity: Arc<Activity>, idle: Duration) -> Watched {
        let now = Instant::now();
        Watched {
            tcp,
            activity,
            idle,
            last: now,
            timer: Box::pin(tokio::time::sleep_until(now + idle)),
            closing: false,
            drained: 0,
        }
    }
}

impl Watched {
    /// A write that sent bytes is activity.
    fn wrote(&mut self, written: io::Result<usize>) -> io::Result<usize> {
        if matches!(written, Ok(n) if n > 0) {
            self.last = Instant::now();
        }
        written
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.tcp).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    this.last = Instant::now();
                }
                Poll::Ready(result)
            }
            Poll::Pending => {
                if this.activity.in_flight.load(Ordering::Relaxed) == 0 {
                    let deadline = this.last + this.idle;
                    if this.timer.deadline() != deadline {
                        this.timer.as_mut().reset(deadline);
                    }
                    if this.timer.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "idle connection",
                        )));
                    }
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = ready!(Pin::new(&mut this.tcp).poll_write(cx, buf));
        Poll::Ready(this.wrote(written))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = ready!(Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs));
        Poll::Ready(this.wrote(written))
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    /// The lingering close: FIN first, then read and discard until the client closes too, for
    /// at most [`LINGER`] and [`LINGER_BYTES`].
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.closing {
            // An error here (the client already reset) leaves nothing to linger for.
            if ready!(Pin::new(&mut this.tcp).poll_shutdown(cx)).is_err() {
                return Poll::Ready(Ok(()));
            }
            this.closing = true;
            this.timer.as_mut().reset(Instant::now() + LINGER);
        }
        let mut scratch = [0u8; 8192];
        loop {
            if this.timer.as_mut().poll(cx).is_ready() || this.drained > LINGER_BYTES {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match ready!(Pin::new(&mut this.tcp).poll_read(cx, &mut buf)) {
                Ok(()) if !buf.filled().is_empty() => this.drained += buf.filled().len() as u64,
                // The client's FIN, or its reset: nothing more will come.
                _ => return Poll::Ready(Ok(())),
            }
        }
    }
}
