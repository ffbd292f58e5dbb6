//! `star-run serve` end to end on the embedded demo model: a real server process on a free
//! port, spoken to over HTTP/1.1 with a plain TCP client.

use base64::Engine as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_star-run"))
}

struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(extra: &[&str]) -> Server {
    start_env(extra, &[])
}

fn start_env(extra: &[&str], env: &[(&str, &str)]) -> Server {
    let mut child = Command::new(bin())
        .args(["serve", "--port", "0"])
        .args(extra)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line).unwrap();
    let port: u16 = line
        .split("http://127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    let s = Server { child, port };
    let t = Instant::now();
    loop {
        if http(s.port, "GET", "/ready", "").0 == 200 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "never ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    s
}

/// (status, headers, body)
fn http(port: u16, method: &str, path: &str, body: &str) -> (u16, String, Vec<u8>) {
    let Ok(mut c) = TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new(), vec![]);
    };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    c.write_all(req.as_bytes()).unwrap();
    let mut raw = vec![];
    c.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header block");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head, raw[split + 4..].to_vec())
}

/// Everything the (exited) server wrote to stderr.
fn stderr_of(s: &mut Server) -> String {
    let mut err = String::new();
    if let Some(mut e) = s.child.stderr.take() {
        e.read_to_string(&mut err).unwrap();
    }
    err
}

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)))
}

#[test]
fn serves_the_same_png_as_the_cli_and_refuses_bad_fields_in_openai_shape() {
    let s = start(&[]);
    let prompt = "a red circle on a blue background";
    let (st, _, body) = http(
        s.port,
        "POST",
        "/v1/images/generations",
        &format!(r#"{{"prompt": "{prompt}", "seed": 5, "n": 2, "size": "64x64"}}"#),
    );
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
    let v = json(&body);
    assert_eq!(v["size"], "64x64");
    assert_eq!(v["output_format"], "png");
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    // Image i of the request uses seed + i: the CLI's image with that seed, byte for byte.
    for (i, d) in data.iter().enumerate() {
        assert_eq!(d["seed"], 5 + i as u64);
        let png = base64::engine::general_purpose::STANDARD
            .decode(d["b64_json"].as_str().unwrap())
            .unwrap();
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("cli.png");
        let ok = Command::new(bin())
            .args([
                "--prompt",
                prompt,
                "--seed",
                &(5 + i).to_string(),
                "--quiet",
                "--out",
            ])
            .arg(&out)
            .status()
            .unwrap();
        assert!(ok.success());
        assert_eq!(png, std::fs::read(&out).unwrap(), "image {i}");
    }

    for (body, param, needle) in [
        (
            r#"{"prompt": "x", "size": "512x512"}"#,
            "size",
            "this model makes 64x64",
        ),
        (
            r#"{"prompt": "x", "response_format": "url"}"#,
            "response_format",
            "use b64_json",
        ),
        (r#"{"prompt": ""}"#, "prompt", "empty"),
        (r#"{"n": 1}"#, "prompt", "required"),
        (r#"{"prompt": "x", "n": 99}"#, "n", "between 1 and 4"),
        (
            r#"{"prompt": "x", "cfg_scale": -1}"#,
            "cfg_scale",
            "negative",
        ),
        (r#"{"prompt": "x", "top_p": 2}"#, "top_p", "[0, 1]"),
        (
            r#"{"prompt": "x", "colour": "red"}"#,
            "colour",
            "unknown field",
        ),
        ("not json", "body", "not JSON"),
    ] {
        let (st, _, b) = http(s.port, "POST", "/v1/images/generations", body);
        assert_eq!(st, 422, "{body}");
        let e = &json(&b)["error"];
        assert_eq!(e["param"], param, "{body}");
        assert_eq!(e["type"], "invalid_request_error");
        assert_eq!(e["code"], 422);
        assert!(
            e["message"].as_str().unwrap().contains(needle),
            "{body}: {e}"
        );
    }

    let (st, _, b) = http(s.port, "GET", "/v1/models", "");
    assert_eq!(st, 200);
    let name = json(&b)["data"][0]["id"].as_str().unwrap().to_string();
    assert!(name.starts_with("star-"));
    assert_eq!(
        http(s.port, "GET", &format!("/v2/models/{name}"), "").0,
        200
    );
    assert_eq!(http(s.port, "GET", "/v2/models/other", "").0, 404);
    for p in ["/health", "/v2/health/live", "/v2/health/ready", "/ready"] {
        assert_eq!(http(s.port, "GET", p, "").0, 200, "{p}");
    }
    let (st, head, b) = http(s.port, "GET", "/metrics", "");
    assert_eq!(st, 200);
    assert!(head
        .to_lowercase()
        .contains("content-type: text/plain; version=0.0.4"));
    let m = String::from_utf8(b).unwrap();
    for name in [
        "star_requests_total{route=\"/v1/images/generations\",status=\"200\"} 1",
        "star_requests_total{route=\"/v1/images/generations\",status=\"422\"} 9",
        "star_request_duration_seconds_count",
        "star_queue_size 0",
        "star_queue_wait_seconds_count 1",
        "star_batch_size_bucket{le=\"2\"} 1",
        "star_scale_step_duration_seconds_count{scale=\"3\"} 1",
        "star_requests_rejected_total{reason=\"invalid\"} 9",
        "star_requests_cancelled_total 0",
        "star_model_ready 1",
    ] {
        assert!(m.contains(name), "{name} not in:\n{m}");
    }
}

/// A full queue answers 429 with Retry-After at once; every accepted request completes.
#[test]
fn a_full_queue_is_refused_with_429() {
    // Each run takes at least 4 x 100 ms, so the twelve requests always overlap.
    let s = start_env(
        &["--max-queue", "1"],
        &[("STAR_SERVE_SCALE_DELAY_MS", "100")],
    );
    let port = s.port;
    let handles: Vec<_> = (0..12)
        .map(|i| {
            std::thread::spawn(move || {
                http(
                    port,
                    "POST",
                    "/v1/images/generations",
                    &format!(r#"{{"prompt": "a green square on a yellow background", "n": 4, "seed": {i}}}"#),
                )
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let full: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    assert_eq!(
        ok + full.len(),
        12,
        "{:?}",
        results.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    assert!(ok >= 1 && !full.is_empty(), "ok {ok}, 429 {}", full.len());
    for r in full {
        assert!(r.1.to_lowercase().contains("retry-after: 1"));
        assert_eq!(json(&r.2)["error"]["type"], "rate_limit_error");
    }
}

/// SIGTERM: readiness turns 503, the process exits 0.
#[test]
fn sigterm_drains_and_exits_0() {
    let mut s = start(&["--drain-s", "5"]);
    unsafe {
        libc_kill(s.child.id() as i32, 15);
    }
    let t = Instant::now();
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    let err = stderr_of(&mut s);
    assert!(err.contains("draining"), "{err}");
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// 32 concurrent requests with mixed prompts (UTF-8 among them), seeds and image counts are
/// batched (metrics show fewer model runs than requests), and each request's images are
/// byte-identical to the same request sent alone.
#[test]
fn batched_requests_get_the_images_they_get_alone() {
    let s = start(&[
        "--max-delay-ms",
        "300",
        "--max-batch",
        "8",
        "--max-queue",
        "64",
    ]);
    let port = s.port;
    const PROMPTS: [&str; 5] = [
        "a red circle on a blue background",
        "a white triangle on a black background",
        "a yellow circle on a green background",
        "a purple cross on a orange background",
        "un cercle rouge — 赤い丸 🎈 “quoted”",
    ];
    let requests = 32;
    let body = |i: usize| {
        format!(
            r#"{{"prompt": "{}", "n": {}, "seed": {}}}"#,
            PROMPTS[i % PROMPTS.len()],
            1 + i % 2,
            100 + 7 * i
        )
    };
    let prompts = vec![(); requests];
    let handles: Vec<_> = (0..requests)
        .map(|i| {
            let b = body(i);
            std::thread::spawn(move || http(port, "POST", "/v1/images/generations", &b))
        })
        .collect();
    let together: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let (_, _, m) = http(port, "GET", "/metrics", "");
    let m = String::from_utf8(m).unwrap();
    let count = |key: &str| -> u64 {
        m.lines()
            .find_map(|l| l.strip_prefix(key).map(|v| v.trim().parse().unwrap()))
            .unwrap_or_else(|| panic!("{key} not in {m}"))
    };
    // Warm-up is not counted; one image-pair request alone would fall in le="2".
    let runs = count("star_batch_size_count");
    assert!(
        runs < prompts.len() as u64,
        "{runs} model runs for {} concurrent requests: nothing was batched",
        prompts.len()
    );
    for (i, (st, _, b)) in together.iter().enumerate() {
        assert_eq!(*st, 200);
        let alone = http(port, "POST", "/v1/images/generations", &body(i));
        assert_eq!(alone.0, 200);
        assert_eq!(json(b)["data"], json(&alone.2)["data"], "request {i}");
    }
}

fn poll_until_done(port: u16, id: &str) -> serde_json::Value {
    let t = Instant::now();
    loop {
        let (st, _, b) = http(port, "GET", &format!("/star/v1/jobs/{id}"), "");
        assert_eq!(st, 200);
        let v = json(&b);
        if ["completed", "failed", "cancelled"].contains(&v["status"].as_str().unwrap()) {
            return v;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "job {id} never finished: {v}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Async jobs: 202 with a poll URL, per-scale Server-Sent Events ending in `completed`, the same
/// images as the synchronous route; a queued job cancelled stays cancelled; `stream: true` on
/// the OpenAI route streams the same events.
#[test]
fn async_jobs_poll_events_cancel_and_stream() {
    // A long batching window keeps the second job queued while the first waits for company.
    let s = start(&["--max-delay-ms", "800", "--max-batch", "8"]);
    let port = s.port;
    let body = r#"{"prompt": "a blue square on a white background", "seed": 9}"#;
    let (st, _, b) = http(port, "POST", "/star/v1/jobs", body);
    assert_eq!(st, 202);
    let v = json(&b);
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(v["status"], "queued");
    assert_eq!(v["poll_url"], format!("/star/v1/jobs/{id}"));
    // A second, incompatible job (other cfg) waits behind it; cancel it while queued.
    let (_, _, b2) = http(
        port,
        "POST",
        "/star/v1/jobs",
        r#"{"prompt": "a blue square on a white background", "seed": 9, "cfg_scale": 1.5}"#,
    );
    let id2 = json(&b2)["id"].as_str().unwrap().to_string();
    let (st, _, c) = http(port, "POST", &format!("/star/v1/jobs/{id2}/cancel"), "");
    assert_eq!(st, 200);
    assert_eq!(json(&c)["status"], "cancelled");

    let (st, head, ev) = http(port, "GET", &format!("/star/v1/jobs/{id}/events"), "");
    assert_eq!(st, 200);
    assert!(head.to_lowercase().contains("text/event-stream"));
    let ev = String::from_utf8(ev).unwrap();
    for k in 0..4 {
        assert!(
            ev.contains(&format!("\"scale\":{k},")),
            "scale {k} missing:\n{ev}"
        );
    }
    assert!(ev.contains("event: completed"), "{ev}");

    let done = poll_until_done(port, &id);
    assert_eq!(done["status"], "completed");
    let sync = http(port, "POST", "/v1/images/generations", body);
    assert_eq!(done["result"]["data"], json(&sync.2)["data"]);
    assert_eq!(poll_until_done(port, &id2)["status"], "cancelled");
    assert_eq!(http(port, "GET", "/star/v1/jobs/nope", "").0, 404);

    let (st, _, ev) = http(
        port,
        "POST",
        "/v1/images/generations",
        r#"{"prompt": "a blue square on a white background", "seed": 9, "stream": true}"#,
    );
    assert_eq!(st, 200);
    let ev = String::from_utf8(ev).unwrap();
    assert!(
        ev.contains("event: scale") && ev.contains("event: completed"),
        "{ev}"
    );
    let (_, _, m) = http(port, "GET", "/metrics", "");
    assert!(String::from_utf8(m)
        .unwrap()
        .contains("star_requests_cancelled_total 1"));
}

/// Cancelling a running job stops it between scales; a deadline that expires answers 504; a
/// request in flight at SIGTERM completes while readiness is 503 and new requests are refused,
/// then the process exits 0. (STAR_SERVE_SCALE_DELAY_MS slows each scale so that the request is
/// reliably running.)
#[test]
fn running_cancel_deadline_and_sigterm_with_a_request_in_flight() {
    let s = start_env(
        &[
            "--request-timeout-s",
            "1",
            "--drain-s",
            "20",
            "--max-delay-ms",
            "0",
        ],
        &[("STAR_SERVE_SCALE_DELAY_MS", "400")],
    );
    let port = s.port;
    let body = r#"{"prompt": "a red circle on a blue background", "seed": 3}"#;
    // Cancel while running.
    let (_, _, b) = http(port, "POST", "/star/v1/jobs", body);
    let id = json(&b)["id"].as_str().unwrap().to_string();
    let t = Instant::now();
    while json(&http(port, "GET", &format!("/star/v1/jobs/{id}"), "").2)["status"] != "running" {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(10));
    }
    http(port, "POST", &format!("/star/v1/jobs/{id}/cancel"), "");
    assert_eq!(poll_until_done(port, &id)["status"], "cancelled");
    // Four scales of 400 ms each outlast a 1 s deadline (checked before each scale).
    let (st, _, b) = http(port, "POST", "/v1/images/generations", body);
    assert_eq!(st, 504, "{}", String::from_utf8_lossy(&b));
    assert_eq!(json(&b)["error"]["type"], "timeout_error");

    drop(s);

    // SIGTERM with a request in flight: it completes while readiness is 503 and new requests
    // are refused, then the process exits 0.
    let mut s = start_env(
        &["--drain-s", "20", "--max-delay-ms", "0"],
        &[("STAR_SERVE_SCALE_DELAY_MS", "400")],
    );
    let port = s.port;
    let inflight = std::thread::spawn(move || http(port, "POST", "/v1/images/generations", body));
    let t = Instant::now();
    while !String::from_utf8(http(port, "GET", "/metrics", "").2)
        .unwrap()
        .contains("star_batch_size_count 1")
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the request never started"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    unsafe {
        libc_kill(s.child.id() as i32, 15);
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(http(port, "GET", "/ready", "").0, 503);
    let (st, _, b) = http(port, "POST", "/v1/images/generations", body);
    assert_eq!(st, 503);
    assert!(json(&b)["error"]["message"]
        .as_str()
        .unwrap()
        .contains("shutting down"));
    let (st, _, b) = inflight.join().unwrap();
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&b));
    let status = s.child.wait().unwrap();
    assert!(status.success(), "{status}");
    let err = stderr_of(&mut s);
    assert!(err.contains("draining") && err.contains("stopped"), "{err}");
}

/// A gauge or counter of the server's /metrics.
fn metric(port: u16, key: &str) -> u64 {
    let (_, _, m) = http(port, "GET", "/metrics", "");
    let m = String::from_utf8(m).unwrap();
    m.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{key} not in {m}"))
}

#[test]
fn memory_limit_caps_batches_refuses_what_cannot_fit_and_is_never_passed() {
    // What the demo's warm-up calibration measures, on this machine, from a first server.
    let (base, per_image) = {
        let a = start(&[]);
        (
            metric(a.port, "star_memory_base_bytes"),
            metric(a.port, "star_memory_image_bytes"),
        )
    };
    assert!(base > 0 && per_image > 0);
    // A limit for about 8 images per run (runs get 95% of it).
    let limit = (base + 8 * per_image) * 20 / 19;
    let lim = limit.to_string();
    let s = start(&[
        "--max-memory",
        &lim,
        "--max-images",
        "64",
        "--max-batch",
        "64",
        "--max-queue",
        "64",
        "--max-delay-ms",
        "500",
    ]);
    let port = s.port;
    assert_eq!(metric(port, "star_memory_limit_bytes"), limit);
    let fit = metric(port, "star_memory_images_fit") as usize;
    assert!(
        (6..=10).contains(&fit),
        "{fit} images fit in {limit} bytes, expected about 8"
    );
    // More than fits: 422 on n, naming what does.
    let (st, _, b) = http(
        port,
        "POST",
        "/v1/images/generations",
        &format!(r#"{{"prompt": "a red circle", "n": {}}}"#, fit + 1),
    );
    assert_eq!(st, 422, "{}", String::from_utf8_lossy(&b));
    let e = &json(&b)["error"];
    assert_eq!(e["param"], "n");
    let m = e["message"].as_str().unwrap();
    assert!(m.contains(&format!("at most {fit} images")), "{m}");
    // Exactly what fits: served.
    let (st, _, b) = http(
        port,
        "POST",
        "/v1/images/generations",
        &format!(r#"{{"prompt": "a red circle", "n": {fit}}}"#),
    );
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(json(&b)["data"].as_array().unwrap().len(), fit);
    // More concurrent images than fit in one run: every request served, in runs that fit.
    let runs_before = metric(port, "star_batch_size_count");
    let requests = 2 * fit + 1;
    let handles: Vec<_> = (0..requests)
        .map(|i| {
            let b = format!(r#"{{"prompt": "a blue square", "seed": {i}}}"#);
            std::thread::spawn(move || http(port, "POST", "/v1/images/generations", &b))
        })
        .collect();
    for h in handles {
        let (st, _, b) = h.join().unwrap();
        assert_eq!(st, 200, "{}", String::from_utf8_lossy(&b));
    }
    let runs = metric(port, "star_batch_size_count") - runs_before;
    assert!(
        runs >= 3,
        "{requests} images in {runs} runs: more than {fit} in one"
    );
    // The point of it all: no run took the process over the limit (the server restarts the
    // kernel's peak, VmHWM, before each run and keeps the highest; the calibration's included).
    let highest = metric(port, "star_memory_peak_bytes");
    assert!(
        highest >= base && highest <= limit,
        "highest run peak {highest} bytes, limit {limit}"
    );
}
