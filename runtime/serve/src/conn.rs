//! The HTTP/1.1 connections under the routes: one task per connection with the timeouts a
//! server facing real clients needs, and a drain that ends every connection by a deadline.
//!
//! hyper's own header-read timer starts as soon as a connection is idle, so it cannot tell an
//! idle keep-alive connection from a client that stalls half-way through a request head. Each
//! connection is watched instead: bytes read while no request is in flight start the head
//! timer (`--header-timeout-s`); no bytes and no request start the idle timer
//! (`--keep-alive-s`). Either expiring drops the connection. The body has its own timer where
//! handlers read it (`crate::body`).

use axum::body::Body;
use axum::extract::Request;
use axum::Router;
use http_body_util::BodyExt;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tower::ServiceExt;

/// How long a connection may take to send a request head, and stay idle between requests.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timeouts {
    pub(crate) header: Duration,
    pub(crate) keep_alive: Duration,
}

/// What one connection is doing, as far as its timers care.
struct Watch {
    /// Requests whose response has not been fully written (or dropped).
    in_flight: AtomicUsize,
    /// Requests begun on this connection.
    served: AtomicUsize,
    /// No request in flight since then.
    idle_since: Mutex<Instant>,
    /// The first byte of a request head that has not been parsed yet.
    head_since: Mutex<Option<Instant>>,
}

impl Watch {
    fn new() -> Self {
        Watch {
            in_flight: AtomicUsize::new(0),
            served: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            head_since: Mutex::new(None),
        }
    }
    fn begin(&self) {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.served.fetch_add(1, Ordering::SeqCst);
        *lock(&self.head_since) = None;
    }
    fn end(&self) {
        *lock(&self.idle_since) = Instant::now();
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
    fn read(&self) {
        if self.in_flight.load(Ordering::SeqCst) == 0 {
            lock(&self.head_since).get_or_insert_with(Instant::now);
        }
    }
    /// Whether a timer has expired: the connection is to be dropped.
    fn expired(&self, t: &Timeouts) -> bool {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return false;
        }
        match *lock(&self.head_since) {
            Some(h) => h.elapsed() > t.header,
            None => lock(&self.idle_since).elapsed() > t.keep_alive,
        }
    }
    /// A keep-alive connection between requests: one served, nothing in flight, no head begun.
    fn between_requests(&self) -> bool {
        self.served.load(Ordering::SeqCst) > 0
            && self.in_flight.load(Ordering::SeqCst) == 0
            && lock(&self.head_since).is_none()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The socket, telling its watch when bytes arrive.
struct Watched {
    inner: TcpStream,
    watch: Arc<Watch>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.watch.read();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Counts a request from its head to the end (or drop) of its response body.
struct InFlight {
    conn: Arc<Watch>,
    server: Arc<AtomicUsize>,
}

impl InFlight {
    fn new(conn: Arc<Watch>, server: Arc<AtomicUsize>) -> Self {
        conn.begin();
        server.fetch_add(1, Ordering::SeqCst);
        InFlight { conn, server }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.conn.end();
        self.server.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serve one connection until it closes, a timer expires, or the drain ends it: `drain` turns
/// true at SIGTERM (the connection finishes its request, then closes; an idle one closes now).
/// The drain's deadline aborts the task from outside.
pub(crate) async fn connection(
    stream: TcpStream,
    router: Router,
    timeouts: Timeouts,
    in_flight: Arc<AtomicUsize>,
    mut drain: tokio::sync::watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let watch = Arc::new(Watch::new());
    let io = TokioIo::new(Watched {
        inner: stream,
        watch: watch.clone(),
    });
    let w = watch.clone();
    let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let guard = InFlight::new(w.clone(), in_flight.clone());
        let router = router.clone();
        async move {
            let resp = router
                .oneshot(req.map(Body::new))
                .await
                .unwrap_or_else(|never| match never {});
            // The guard lives as long as the body: a streamed response stays in flight.
            Ok::<_, std::convert::Infallible>(resp.map(move |b| {
                Body::new(b.map_frame(move |f| {
                    let _ = &guard;
                    f
                }))
            }))
        }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        // The watch times heads and idleness (see the module's comment).
        .header_read_timeout(None)
        .keep_alive(!*drain.borrow())
        .serve_connection(io, svc);
    tokio::pin!(conn);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut draining = *drain.borrow();
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            r = drain.changed(), if !draining => {
                draining = true;
                if r.is_ok() {
                    conn.as_mut().graceful_shutdown();
                }
            }
            _ = tick.tick() => {
                // While draining, a keep-alive connection between requests has nothing to
                // finish (a new one still gets its request answered, with 503).
                if watch.expired(&timeouts) || (draining && watch.between_requests()) {
                    return;
                }
            }
        }
    }
}
