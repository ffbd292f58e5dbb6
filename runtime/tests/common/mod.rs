//! What the serve tests share: a real `star-run serve` process on a free port, spoken to over
//! HTTP/1.1 with a plain TCP client.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_star-run"))
}

pub struct Server {
    pub child: Child,
    pub port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn start(extra: &[&str]) -> Server {
    start_env(extra, &[])
}

pub fn start_env(extra: &[&str], env: &[(&str, &str)]) -> Server {
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
pub fn http(port: u16, method: &str, path: &str, body: &str) -> (u16, String, Vec<u8>) {
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
pub fn stderr_of(s: &mut Server) -> String {
    let mut err = String::new();
    if let Some(mut e) = s.child.stderr.take() {
        e.read_to_string(&mut err).unwrap();
    }
    err
}

pub fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)))
}

extern "C" {
    #[link_name = "kill"]
    pub fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// SIGTERM.
pub fn terminate(s: &Server) {
    unsafe {
        libc_kill(s.child.id() as i32, 15);
    }
}

pub fn poll_until_done(port: u16, id: &str) -> serde_json::Value {
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
