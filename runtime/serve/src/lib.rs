//! `star-run serve`: one model loaded once behind an HTTP endpoint (axum/hyper on tokio).
//!
//! The model lives on one worker thread (its sessions and KV cache are not shared between
//! threads); HTTP handlers hand it jobs through a bounded queue, refused at once with 429 when
//! full. A job is checked for cancellation (client gone, deadline passed, drain over) before
//! it starts and between scales. Readiness follows warm-up (one generation) and turns 503 on
//! SIGTERM/SIGINT; in-flight requests get `--drain-s`, after which queued ones are answered 503,
//! the running batch stops at its next scale, every connection is closed and the process exits.
//! Requests with the same sampling settings are batched into one model run (batch invariance
//! keeps each request's images byte-identical). Host memory is admitted, not hoped for
//! (`admission`).
//!
//! Protocols, each as its own clients speak it: OpenAI's images API (`openai`, streamed with
//! progressive previews), the Open Inference Protocol (`kserve`), STAR's async jobs with
//! Server-Sent Events (`jobs_api`), operations (`ops`); the OpenAPI document is generated from
//! their types (`api`, `openapi`). Every request passes `edge` (body limits, error shapes,
//! metrics); connections are served by `conn` (timeouts, drain).
//!
//! Modules: `request` (the request, checked), `submit` (queueing and waiting), `jobs` (jobs
//! and their events), `state` (what the handlers and the worker share), `worker` (warm-up,
//! then each batch formed, admitted, run, answered), `batching`, `admission` (the memory
//! model), `run` (one model run for a batch), `metrics`, `errors`.

mod admission;
mod api;
mod batching;
mod conn;
mod edge;
mod errors;
mod jobs;
mod jobs_api;
mod kserve;
mod metrics;
mod openai;
mod openapi;
mod ops;
mod request;
mod run;
mod state;
mod submit;
mod worker;

use crate::conn::Timeouts;
use crate::jobs::{Job, JobTable};
use crate::metrics::Metrics;
use crate::state::{AppState, BodyLimits};
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use star_engines::options::BackendOptions;
use star_pipeline::pipeline::Pipeline;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

pub struct ServeOptions {
    pub model: PathBuf,
    pub backend: BackendOptions,
    pub host: String,
    pub port: u16,
    pub max_queue: usize,
    /// Most images per model run (requests batched at scale 0).
    pub max_batch: usize,
    /// How long a request waits for others to batch with.
    pub max_delay: Duration,
    /// Most images per request (`n`).
    pub max_images: usize,
    pub request_timeout: Duration,
    pub drain: Duration,
    /// A request head must arrive within this, from its first byte.
    pub header_timeout: Duration,
    /// An idle keep-alive connection is closed after this.
    pub keep_alive: Duration,
    /// A request body must arrive within this.
    pub body_timeout: Duration,
    /// The largest request body (413 above it, before reading when declared).
    pub max_body_bytes: usize,
    /// The most resident memory the process may reach (`--max-memory`); None: 90% of the
    /// machine's or the container's limit.
    pub max_memory: Option<u64>,
}

/// Open the model (errors here are the caller's, before anything listens), bind, serve until
/// SIGTERM/SIGINT, drain.
pub fn serve(o: ServeOptions) -> anyhow::Result<()> {
    // The model lives on its own thread from the start (its engine is not Send): it opens the
    // directory, reports the manifest (or the error, before anything listens), receives the
    // shared state, warms up and takes jobs.
    let (opened_tx, opened_rx) =
        mpsc::channel::<Result<star_artifact::manifest::Manifest, String>>();
    let (state_tx, state_rx) = mpsc::channel::<(Arc<AppState>, mpsc::Receiver<Job>)>();
    let (model, mut backend) = (o.model.clone(), o.backend.clone());
    // Memory admission needs a run's peak to depend on its batch only (see MemoryModel).
    backend.cpu.release_activations = true;
    let (max_batch, max_delay, max_memory) = (o.max_batch, o.max_delay, o.max_memory);
    std::thread::Builder::new()
        .name("star-model".into())
        .spawn(move || {
            let p = match Pipeline::open(&model, backend) {
                Ok(p) => p,
                Err(e) => {
                    let _ = opened_tx.send(Err(e.to_string()));
                    return;
                }
            };
            let _ = opened_tx.send(Ok(p.md.manifest.clone()));
            if let Ok((state, jobs)) = state_rx.recv() {
                worker::worker(p, state, jobs, max_batch, max_delay, max_memory);
            }
        })?;
    let manifest = opened_rx
        .recv()
        .map_err(|_| anyhow::anyhow!("the model thread stopped while opening the model"))?
        .map_err(anyhow::Error::msg)?;
    let size = format!("{0}x{0}", manifest.schedule.image_size);
    let model_name = format!("star-{}", manifest.model_hash);
    let (tx, rx) = mpsc::sync_channel::<Job>(o.max_queue);
    let state = Arc::new(AppState {
        model_name,
        size,
        manifest,
        queue: tx,
        queued: AtomicUsize::new(0),
        running: AtomicUsize::new(0),
        ready: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        metrics: Mutex::new(Metrics::default()),
        max_images: o.max_images,
        request_timeout: o.request_timeout,
        jobs: Mutex::new(JobTable::default()),
        memory: Mutex::new(None),
        scale_delay: std::env::var("STAR_SERVE_SCALE_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis),
        body_limits: BodyLimits {
            max_bytes: o.max_body_bytes,
            timeout: o.body_timeout,
        },
        stop: tokio::sync::watch::channel(false).0,
        scale_ms: Mutex::new(vec![]),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((o.host.as_str(), o.port))
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}:{}: {e}", o.host, o.port))?;
        let addr = listener.local_addr()?;
        // Warm-up starts once the port is bound (health answers meanwhile, readiness 503).
        state_tx
            .send((state.clone(), rx))
            .map_err(|_| anyhow::anyhow!("the model thread stopped before serving"))?;
        println!(
            "listening on http://{addr} (model {}, warming up)",
            state.model_name
        );
        let app = router(state.clone());
        let timeouts = Timeouts {
            header: o.header_timeout,
            keep_alive: o.keep_alive,
        };
        serve_until_drained(listener, app, timeouts, state, o.drain).await;
        eprintln!("stopped");
        anyhow::Ok(())
    })
}

fn router(state: Arc<AppState>) -> Router {
    use crate::{jobs_api as j, kserve as k, openai as oa};
    Router::new()
        .route("/v1/images/generations", post(oa::generations))
        .route("/v1/models", get(oa::models))
        .route("/v1/models/{id}", get(oa::model))
        .route("/v2", get(k::server_metadata))
        .route("/v2/health/live", get(ops::v2_live))
        .route("/v2/health/ready", get(ops::v2_ready))
        .route("/v2/models/{name}", get(k::model_metadata))
        .route("/v2/models/{name}/ready", get(k::model_ready))
        .route("/v2/models/{name}/infer", post(k::infer))
        .route(
            "/v2/models/{name}/versions/{version}",
            get(k::version_metadata),
        )
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(k::version_ready),
        )
        .route(
            "/v2/models/{name}/versions/{version}/infer",
            post(k::version_infer),
        )
        .route("/star/v1/jobs", post(j::create_job))
        .route("/star/v1/jobs/{id}", get(j::get_job))
        .route("/star/v1/jobs/{id}/cancel", post(j::cancel_job))
        .route("/star/v1/jobs/{id}/events", get(j::job_events))
        .route("/health", get(ops::live))
        .route("/ready", get(ops::ready))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(openapi::openapi_json))
        .fallback(ops::fallback)
        // `edge` reads bodies under its own limit and timeout.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            edge::edge,
        ))
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// Accept connections until SIGTERM/SIGINT, then drain: readiness 503 and new work refused
/// (connections still answered); in-flight work gets `drain`; past it, the stop flag answers
/// what waits with 503 and stops the running batch at its next scale. Responses being written
/// get a moment, then every connection is closed, whatever its client is doing.
async fn serve_until_drained(
    listener: tokio::net::TcpListener,
    app: Router,
    timeouts: Timeouts,
    st: Arc<AppState>,
    drain: Duration,
) {
    let (drain_tx, drain_rx) = tokio::sync::watch::channel(false);
    let in_flight = Arc::new(AtomicUsize::new(0));
    let mut conns = tokio::task::JoinSet::new();
    let signal = shutdown_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            _ = &mut signal => break,
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    conns.spawn(conn::connection(stream, app.clone(), timeouts, in_flight.clone(), drain_rx.clone()));
                }
            }
            // Reap finished connections as they go.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    st.draining.store(true, Ordering::SeqCst);
    let _ = drain_tx.send(true);
    eprintln!(
        "draining: readiness 503, finishing in-flight requests (at most {} s)",
        drain.as_secs()
    );
    let t = Instant::now();
    let work = || st.queued.load(Ordering::SeqCst) + st.running.load(Ordering::SeqCst);
    let accept_during = async {
        // New connections during the drain are still answered (503 for work).
        loop {
            if let Ok((stream, _)) = listener.accept().await {
                conns.spawn(conn::connection(
                    stream,
                    app.clone(),
                    timeouts,
                    in_flight.clone(),
                    drain_rx.clone(),
                ));
            }
        }
    };
    let wait_work = async {
        while work() > 0 && t.elapsed() < drain {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if work() > 0 {
            eprintln!("drain: --drain-s passed with requests in flight: queued ones answered 503, the running batch stopped at its next scale");
            let _ = st.stop.send(true);
        }
        // Responses being written (the stopped ones' 503s included) get a moment.
        let flush = Instant::now();
        while in_flight.load(Ordering::SeqCst) > 0 && flush.elapsed() < Duration::from_millis(500) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::select! {
        _ = accept_during => {}
        _ = wait_work => {}
    }
    let _ = st.stop.send(true);
    conns.abort_all();
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}
