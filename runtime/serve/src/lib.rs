//! `star-run serve`: one model loaded once behind an HTTP endpoint (axum/tokio).
//!
//! The model lives on one worker thread (its sessions and KV cache are not shared between
//! threads); HTTP handlers hand it jobs through a bounded queue, refused at once with 429 when
//! full. A job is checked for cancellation (client gone, deadline passed) before it starts and
//! between scales. Readiness follows warm-up (one generation) and turns 503 on SIGTERM/SIGINT,
//! after which in-flight requests get `--drain-s` to finish and the process exits 0. Requests
//! with the same sampling settings are batched into one model run at scale 0 (batch invariance
//! keeps each request's images byte-identical). Async jobs (`/star/v1/jobs`) and `stream: true`
//! report per-scale Server-Sent Events. Host memory is admitted, not hoped for: warm-up measures
//! what a generation adds per image; batches are cut to what the limit holds, and a request
//! fails alone when the system has not the memory it needs (`MemoryModel`).
//!
//! Modules: `request` (the request, checked), `jobs` (jobs and their events), `state` (what the
//! handlers and the worker share), `http` (routes), `worker` (warm-up, then each batch formed,
//! admitted, run, answered), `batching`, `admission` (the memory model), `run` (one model run
//! for a batch), `metrics`.

mod admission;
mod batching;
mod http;
mod jobs;
mod metrics;
mod request;
mod run;
mod state;
mod worker;

use crate::http::*;
use crate::jobs::{Job, JobTable};
use crate::metrics::Metrics;
use crate::state::AppState;
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
        let app = Router::new()
            .route("/v1/images/generations", post(generations))
            .route("/v1/models", get(models))
            .route("/health", get(live))
            .route("/ready", get(ready))
            .route("/v2/health/live", get(live))
            .route("/v2/health/ready", get(ready))
            .route("/v2/models/{name}", get(model_metadata))
            .route("/metrics", get(metrics))
            .route("/star/v1/jobs", post(create_job))
            .route("/star/v1/jobs/{id}", get(get_job))
            .route("/star/v1/jobs/{id}/cancel", post(cancel_job))
            .route("/star/v1/jobs/{id}/events", get(job_events))
            .with_state(state.clone());
        let st = state.clone();
        let drain = o.drain;
        // On SIGTERM/SIGINT: readiness 503 and new work refused while the server still
        // answers; the queued and running work gets up to --drain-s; then the listener closes
        // (open connections finish writing their responses).
        let shutdown = async move {
            shutdown_signal().await;
            st.draining.store(true, Ordering::SeqCst);
            eprintln!(
                "draining: readiness 503, finishing in-flight requests (at most {} s)",
                drain.as_secs()
            );
            let t = Instant::now();
            while st.queued.load(Ordering::SeqCst) + st.running.load(Ordering::SeqCst) > 0 {
                if t.elapsed() >= drain {
                    eprintln!("drain: in-flight requests did not finish within --drain-s; exiting");
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Responses of finished work still being written.
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let server = axum::serve(listener, app).with_graceful_shutdown(shutdown);
        server.await?;
        eprintln!("stopped");
        anyhow::Ok(())
    })
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
