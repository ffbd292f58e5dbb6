use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use star_engines::options::{BackendOptions, GpuOptions};
use star_pipeline::image::Meta;
use star_pipeline::pipeline::{GenParams, Generated, Hooks, Pipeline};
use std::path::PathBuf;
use std::process::ExitCode;

/// star-run: generate images from prompts with a STAR model directory (made by star-export).
///
/// Without --model it uses the demo model the repository carries (64x64 coloured shapes).
/// Exit codes: 0 ok, 1 replay mismatch, 2 bad input or missing files.
#[derive(Parser)]
#[command(
    name = "star-run",
    version,
    args_conflicts_with_subcommands = true,
    allow_negative_numbers = true,
    after_help = "Examples:\n  star-run --prompt \"a red circle on a blue background\" --out red.png\n  star-run --model model/ --prompt \"a cat\" --batch 4 --seed 1 --out-dir cats/\n  star-run replay --model model/ --golden fixtures/tiny-256\n  star-run bench --model model/ --runs 10 --json bench.json\n\nONNX Runtime: set ORT_DYLIB_PATH to libonnxruntime.so (from the PyPI onnxruntime wheel), or run scripts/setup-ort.sh to install it into ./.venv."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    gen: GenArgs,
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// Model directory (star-export export output) [default: the embedded demo model, or with
    /// --engine the model the engines were built from].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Engine directory (star-export build-engine output): its backend (tensorrt or ort-trt) is
    /// taken from its engine.json, which is checked against this GPU and library first.
    #[arg(long, conflicts_with = "backend")]
    engine: Option<PathBuf>,
    #[command(flatten)]
    backend: BackendArgs,
}

/// How to run: the backend and its device options (every command that runs a model).
#[derive(Args, Clone)]
struct BackendArgs {
    /// Execution backend: ort-cpu (ONNX Runtime's CPU provider: int8 is the CPU speed path; fp16
    /// on the CPU is an accuracy check, not a speed path) or ort-cuda (ONNX Runtime's CUDA
    /// provider with the KV cache on the GPU; needs `scripts/setup-ort.sh --gpu`). Every backend
    /// runs fp32, fp16 and int8 directories as exported [default: ort-cpu].
    #[arg(long)]
    backend: Option<String>,
    /// ONNX Runtime intra-op threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// CUDA device ordinal (GPU backends).
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// GPU backends: accept graph nodes that ONNX Runtime would place on the CPU (refused by
    /// default, naming every such node: a silent CPU fallback is a slow GPU run).
    #[arg(long)]
    allow_cpu_fallback: bool,
    /// ort-cuda and tensorrt: capture each bound stage run as a CUDA graph once and replay it
    /// (fixed addresses make this possible). Off by default until the GPU check has compared
    /// its images with uncaptured runs.
    #[arg(long)]
    cuda_graphs: bool,
    /// Print the device and the provider each stage runs on (with --allow-cpu-fallback, also
    /// the nodes that run on the CPU).
    #[arg(long)]
    verbose: bool,
}

impl BackendArgs {
    fn options(&self) -> BackendOptions {
        let mut o =
            BackendOptions::named(self.backend.as_deref().unwrap_or("ort-cpu"), self.threads);
        o.verbose = self.verbose;
        o.gpu = GpuOptions {
            device: self.device,
            allow_cpu_fallback: self.allow_cpu_fallback,
            cuda_graphs: self.cuda_graphs,
        };
        o
    }
}

impl ModelArgs {
    /// The model directory and backend options; with --engine, the backend of the engine
    /// directory and (unless --model is given) the model it was built from.
    fn resolve(&self) -> anyhow::Result<(PathBuf, BackendOptions)> {
        let mut opts = self.backend.options();
        let Some(e) = &self.engine else {
            let dir = self
                .model
                .clone()
                .unwrap_or_else(|| PathBuf::from(star_pipeline::EMBEDDED_MODEL));
            return Ok((dir, opts));
        };
        if !e
            .join(star_artifact::engine_manifest::ENGINE_MANIFEST_FILE)
            .exists()
            && e.join(star_artifact::manifest::MANIFEST_FILE).exists()
        {
            anyhow::bail!(
                "{} is a model directory, not an engine directory: run it with --model {0} (--engine takes the output of star-export build-engine)",
                e.display()
            );
        }
        let em = star_artifact::engine_manifest::EngineManifest::load(e)?;
        opts.name = em.plan.backend.name().into();
        opts.engine_dir = Some(e.clone());
        let dir = self
            .model
            .clone()
            .unwrap_or_else(|| PathBuf::from(&em.plan.model.path));
        Ok((dir, opts))
    }
}

#[derive(Args, Clone)]
struct SamplingArgs {
    /// Classifier-free guidance scale, a finite number >= 0 (0 = no guidance) [default: the model's, 4.0 for released models].
    #[arg(long, value_parser = star_pipeline::args::cfg)]
    cfg: Option<f64>,
    /// Keep the k most likely tokens (0 = off) [default: the model's].
    #[arg(long)]
    top_k: Option<usize>,
    /// Nucleus filter, in [0, 1] (0 = off) [default: the model's].
    #[arg(long, value_parser = star_pipeline::args::top_p)]
    top_p: Option<f64>,
    /// Seed (0 to 2^64-1); image i of a call uses seed + i.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Plain sampling on every scale even when the model has the stable sampler.
    #[arg(long)]
    no_stable_sampling: bool,
}

#[derive(Args, Clone)]
struct GenArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt; repeat for several images in one batch.
    #[arg(long)]
    prompt: Vec<String>,
    /// Unconditional (negative) prompt for guidance.
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// Images per prompt (image i uses seed + i).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Output PNG (one image).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Output directory (several images: img_000.png, ...).
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// No progress or timing lines.
    #[arg(long)]
    quiet: bool,
    /// Also print every stage's time, session creation included (one line each).
    #[arg(long, conflicts_with = "quiet")]
    timings: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Replay a golden fixture folder with its recorded token choices and compare every tensor.
    #[command(allow_negative_numbers = true)]
    Replay {
        #[command(flatten)]
        model: ModelArgs,
        /// Fixture variant folder (e.g. fixtures/tiny-256).
        #[arg(long)]
        golden: PathBuf,
    },
    /// Hash every file of a model directory against its manifest (opening a directory otherwise
    /// trusts the stamps of the last full verification; a modified file never matches them).
    Verify {
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Accuracy of a candidate model directory (FP16, INT8) against a reference (its FP32
    /// export): teacher-forced logit cosine, max error and token agreement per scale and
    /// sampler sub-step, and free-running image PSNR, on the same prompts, seeds and sampling.
    #[command(
        after_help = "Example:\n  star-run compare --reference model-fp32/ --candidate model-int8/ --prompts calibration/prompts/shapes.txt --seeds 1,2 --json cmp.json --grid cmp.png"
    )]
    Compare {
        /// Reference model directory (sets the sampling parameters both use).
        #[arg(long)]
        reference: PathBuf,
        /// Candidate model directory: an export of the same checkpoints.
        #[arg(long)]
        candidate: PathBuf,
        /// Prompts file: one prompt per line (# comments).
        #[arg(long)]
        prompts: PathBuf,
        /// Seeds; every prompt is generated once per seed.
        #[arg(long, value_delimiter = ',', default_value = "1")]
        seeds: Vec<u64>,
        /// Also write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Also write a PNG: per prompt and seed, reference | candidate | difference x8.
        #[arg(long)]
        grid: Option<PathBuf>,
        /// Run the candidate with CUDA graphs and the reference without (ort-cuda, tensorrt):
        /// with the same directory for both, this compares captured and uncaptured runs.
        #[arg(long)]
        candidate_cuda_graphs: bool,
        /// Backend and device options of both models.
        #[command(flatten)]
        backend: BackendArgs,
    },
    /// Serve the model over HTTP: OpenAI-compatible POST /v1/images/generations, GET /v1/models,
    /// /health, /ready, KServe v2 /v2/health/live, /v2/health/ready, /v2/models/{name}, and
    /// Prometheus /metrics. One model loaded once; a bounded queue (429 when full); warm-up before
    /// readiness; SIGTERM: readiness 503, in-flight requests finish within --drain-s, exit 0.
    #[command(
        after_help = "Example:\n  star-run serve --port 8080 &\n  curl -s localhost:8080/v1/images/generations -d '{\"prompt\": \"a red circle on a blue background\", \"seed\": 1}'"
    )]
    Serve {
        #[command(flatten)]
        model: ModelArgs,
        /// Address to listen on (0.0.0.0 in a container).
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// Port (0: any free port, printed on start).
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Requests that may wait for the model; more are refused with 429 and Retry-After.
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
        max_queue: u32,
        /// Most images per request (`n`).
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
        max_images: u32,
        /// Most images per model run: queued requests with the same sampling settings are
        /// batched (each request's images are byte-identical to a run of it alone). Off by
        /// default: on the CPU it helps small models (demo: 1.7x images/s) and costs large ones
        /// (d16: 0.73-0.76x; benches/RESULTS.md).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        max_batch: u32,
        /// How long a request waits for others to batch with, in milliseconds (with
        /// --max-batch above 1).
        #[arg(long, default_value_t = 10)]
        max_delay_ms: u64,
        /// A request not finished after this many seconds (queue wait included) is stopped
        /// between scales and answered 504.
        #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
        request_timeout_s: u64,
        /// After SIGTERM, how long in-flight requests may take. Then queued requests are
        /// answered 503, the running batch stops at its next scale, every connection is closed
        /// and the process exits (within this + 1 s, whatever the clients do).
        #[arg(long, default_value_t = 30)]
        drain_s: u64,
        /// A request head must arrive within this many seconds of its first byte; a client
        /// that stalls is disconnected.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
        header_timeout_s: u64,
        /// An idle keep-alive connection is closed after this many seconds.
        #[arg(long, default_value_t = 75, value_parser = clap::value_parser!(u64).range(1..))]
        keep_alive_s: u64,
        /// A request body must arrive within this many seconds of its head (else 408).
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
        body_timeout_s: u64,
        /// The largest request body in KiB (413 above it; a larger Content-Length is refused
        /// before the body is read).
        #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1048576))]
        max_body_kb: u64,
        /// The most resident memory the server should reach (e.g. 6Gi, 8G, bytes). Warm-up
        /// measures what each image adds; batches are cut so that their estimate stays within
        /// 95% of this, an `n` that cannot fit is refused with 422, and a request that needs more
        /// than the system has left fails alone with 500. Default: 90% of the machine's memory
        /// or of the container's (cgroup) limit.
        #[arg(long, value_parser = star_pipeline::memory::parse_size)]
        max_memory: Option<u64>,
    },
    /// Latency benchmark: per-stage median/p90/min over repeated generations.
    #[command(allow_negative_numbers = true)]
    Bench {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long, default_value = "a red circle on a blue background")]
        prompt: String,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Timed generations (at least 1).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
        runs: u32,
        /// Also write the results as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// Measure without the KV cache's benefit: re-run every earlier scale before each scale.
        #[arg(long)]
        no_kv_cache: bool,
        /// Also decode N progressive previews per generation (0-3), after the scales `serve`
        /// would choose for `partial_images` N: their cost is the "preview" row.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=3))]
        partial_images: u8,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => return star_pipeline::args::usage_error(e),
    };
    match run(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn open(m: &ModelArgs) -> anyhow::Result<(Pipeline, PathBuf)> {
    let (dir, opts) = m.resolve()?;
    let p = Pipeline::open(&dir, opts)?;
    Ok((p, dir))
}

fn params(p: &Pipeline, s: &SamplingArgs) -> GenParams {
    let d = GenParams::defaults(p, s.seed);
    GenParams {
        cfg: s.cfg.unwrap_or(d.cfg),
        top_k: s.top_k.unwrap_or(d.top_k),
        top_p: s.top_p.unwrap_or(d.top_p),
        stable_sampling: !s.no_stable_sampling,
        ..d
    }
}

struct Progress {
    quiet: bool,
}
impl Hooks for Progress {
    fn scale_done(&mut self, si: usize, pn: usize, ms: f64, wait: f64) {
        if !self.quiet {
            let wait = if wait >= 1.0 {
                format!("  (of which {wait:.0} ms waiting for sessions)")
            } else {
                String::new()
            };
            eprintln!(
                "scale {si:>2}  {pn:>2}x{pn:<2} {:>5} tokens  {ms:>8.1} ms{wait}",
                pn * pn
            );
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Some(Cmd::Replay { model, golden }) => {
            if !golden.is_dir() {
                anyhow::bail!("--golden {}: no such fixture folder", golden.display());
            }
            let (mut p, _) = open(&model)?;
            let rep = star_pipeline::replay::replay(&mut p, &golden)?;
            print!("{}", rep.table());
            Ok(if rep.all_pass() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Some(Cmd::Bench {
            model,
            prompt,
            warmup,
            runs,
            json,
            sampling,
            no_kv_cache,
            partial_images,
        }) => {
            if let Some(j) = &json {
                star_pipeline::args::check_output_file(j, "--json").map_err(anyhow::Error::msg)?;
            }
            let (mut p, _) = open(&model)?;
            let mut gp = params(&p, &sampling);
            gp.recompute_past = no_kv_cache;
            p.check_params(1, &gp)?;
            let r = star_pipeline::bench::bench(
                &mut p,
                &prompt,
                &gp,
                warmup,
                runs as usize,
                model.backend.threads,
                partial_images as usize,
            )?;
            print!("{}", r.table);
            if let Some(j) = json {
                star_pipeline::image::write_atomic(
                    &j,
                    serde_json::to_string_pretty(&r.json)?.as_bytes(),
                )
                .with_context(|| format!("writing {}", j.display()))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(Cmd::Compare {
            reference,
            candidate,
            prompts,
            seeds,
            json,
            grid,
            candidate_cuda_graphs,
            backend,
        }) => {
            let (prompts, _) =
                star_pipeline::args::read_prompts_file(&prompts).map_err(anyhow::Error::msg)?;
            for (f, flag) in [(&json, "--json"), (&grid, "--grid")] {
                if let Some(f) = f {
                    star_pipeline::args::check_output_file(f, flag).map_err(anyhow::Error::msg)?;
                }
            }
            let opts = backend.options();
            let mut r = Pipeline::open(&reference, opts.clone())?;
            let mut c_opts = opts;
            c_opts.gpu.cuda_graphs |= candidate_cuda_graphs;
            let mut c = Pipeline::open(&candidate, c_opts)?;
            let rep = star_pipeline::compare::compare(
                &mut r,
                &mut c,
                &prompts,
                &seeds,
                grid.is_some(),
                |i, n, im| {
                    eprintln!(
                        "[{i:>3}/{n}] seed {:<4} PSNR {:>6.2} dB  {}",
                        im.seed, im.psnr_db, im.prompt
                    )
                },
            )?;
            print!("{}", rep.table());
            if let Some(j) = json {
                star_pipeline::image::write_atomic(
                    &j,
                    serde_json::to_string_pretty(&rep)?.as_bytes(),
                )
                .with_context(|| format!("writing {}", j.display()))?;
            }
            if let Some(g) = grid {
                let (rgb, w, h) = rep.grid(8.0);
                let meta = vec![
                    Meta::Utf8("reference", rep.reference.clone()),
                    Meta::Utf8("candidate", rep.candidate.clone()),
                    Meta::Ascii(
                        "columns",
                        "reference | candidate | |difference| x 8".to_string(),
                    ),
                    Meta::Ascii(
                        "software",
                        format!("star-run {}", env!("CARGO_PKG_VERSION")),
                    ),
                ];
                star_pipeline::image::write_png(&g, &rgb, w, h, &meta)?;
                eprintln!("wrote {} ({w}x{h})", g.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(Cmd::Serve {
            model,
            host,
            port,
            max_queue,
            max_images,
            max_batch,
            max_delay_ms,
            request_timeout_s,
            drain_s,
            header_timeout_s,
            keep_alive_s,
            body_timeout_s,
            max_body_kb,
            max_memory,
        }) => {
            let (dir, backend) = model.resolve()?;
            star_serve::serve(star_serve::ServeOptions {
                model: dir,
                backend,
                host,
                port,
                max_queue: max_queue as usize,
                max_images: max_images as usize,
                max_batch: max_batch as usize,
                max_delay: std::time::Duration::from_millis(max_delay_ms),
                request_timeout: std::time::Duration::from_secs(request_timeout_s),
                drain: std::time::Duration::from_secs(drain_s),
                header_timeout: std::time::Duration::from_secs(header_timeout_s),
                keep_alive: std::time::Duration::from_secs(keep_alive_s),
                body_timeout: std::time::Duration::from_secs(body_timeout_s),
                max_body_bytes: (max_body_kb * 1024) as usize,
                max_memory,
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Some(Cmd::Verify { model }) => {
            let (dir, opts) = model.resolve()?;
            let md = star_engines::model_dir::ModelDir::open_with(
                &dir,
                opts,
                star_artifact::integrity::Integrity::Full,
            )?;
            let m = &md.manifest;
            println!(
                "{}: {} files and {} graphs match manifest.json ({:.2} GB hashed in {:.1} s), model {}",
                dir.display(),
                m.files.len(),
                m.graphs.len(),
                md.verified.hashed_bytes as f64 / 1e9,
                md.verified.ms / 1e3,
                m.model_hash
            );
            Ok(ExitCode::SUCCESS)
        }
        None => generate(cli.gen),
    }
}

fn generate(a: GenArgs) -> anyhow::Result<ExitCode> {
    if a.prompt.is_empty() {
        anyhow::bail!("give at least one --prompt (see --help)");
    }
    if a.batch == 0 {
        anyhow::bail!("--batch must be at least 1");
    }
    let prompts: Vec<String> = a
        .prompt
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.clone(), a.batch))
        .collect();
    // Where the images go is settled, and checked writable, before the model is opened.
    let outs: Vec<PathBuf> = match (&a.out, &a.out_dir) {
        (Some(_), Some(_)) => anyhow::bail!("give --out or --out-dir, not both"),
        (Some(o), None) if prompts.len() == 1 => {
            star_pipeline::args::check_output_file(o, "--out").map_err(anyhow::Error::msg)?;
            vec![o.clone()]
        }
        (Some(_), None) => anyhow::bail!("{} images requested: use --out-dir", prompts.len()),
        (None, Some(d)) => {
            star_pipeline::args::check_output_dir(d).map_err(anyhow::Error::msg)?;
            (0..prompts.len())
                .map(|i| d.join(format!("img_{i:03}.png")))
                .collect()
        }
        (None, None) if prompts.len() == 1 => {
            let o = PathBuf::from("star.png");
            star_pipeline::args::check_output_file(&o, "--out").map_err(anyhow::Error::msg)?;
            vec![o]
        }
        (None, None) => anyhow::bail!("{} images requested: use --out-dir", prompts.len()),
    };
    let (mut p, dir) = open(&a.model)?;
    // One generate call makes every image of this run.
    p.one_shot = true;
    let gp = params(&p, &a.sampling);
    p.check_params(prompts.len(), &gp)?;
    if !a.quiet {
        let v = &p.md.verified;
        eprintln!(
            "start-up {:.0} ms: model checked and opened ({}), sessions created at first use",
            p.open_ms,
            if v.hashed_bytes > 0 {
                format!(
                    "{:.2} GB hashed in {:.0} ms",
                    v.hashed_bytes as f64 / 1e9,
                    v.ms
                )
            } else {
                "integrity stamps matched, nothing re-hashed".to_string()
            }
        );
    }
    let t = std::time::Instant::now();
    let mut prog = Progress { quiet: a.quiet };
    let Generated {
        image, truncated, ..
    } = p.generate(&prompts, &a.negative_prompt, &gp, &mut prog)?;
    for (i, tr) in truncated.iter().enumerate() {
        if *tr {
            eprintln!("warning: prompt {i} is longer than 75 CLIP tokens and was truncated");
        }
    }
    let (h, w) = (image.shape[2], image.shape[3]);
    let m = &p.md.manifest;
    if let Some(d) = &a.out_dir {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    for (i, out) in outs.iter().enumerate() {
        let rgb = star_pipeline::image::to_rgb8(image.as_f32().unwrap(), i, h, w);
        let meta = star_pipeline::image::generation_meta(
            &prompts[i],
            &a.negative_prompt,
            star_pipeline::rng::image_seed(gp.seed, i),
            &gp,
            &p,
        );
        star_pipeline::image::write_png(out, &rgb, w, h, &meta)?;
        if !a.quiet {
            println!("wrote {} ({w}x{h})", out.display());
        }
    }
    if !a.quiet {
        let tm = &p.timings;
        let mut parts: Vec<String> = vec![];
        for k in [
            "session_wait",
            "tokenizer",
            "text_encoder",
            "text_kv",
            "decoder",
        ] {
            parts.push(format!("{k} {:.1}", tm.get(k)));
        }
        // An empty f64 sum is -0.0: + 0.0 shows a stage that did not run as 0.0.
        let sum = |prefix: &str| -> f64 {
            tm.ms
                .iter()
                .filter(|(k, _)| k.starts_with(prefix))
                .map(|(_, v)| v.0)
                .sum::<f64>()
                + 0.0
        };
        let (steps, vq, smp) = (sum("step["), sum("vq["), sum("sampler["));
        // Draws on the engine, and the stable sampler's reveal on the host.
        let draw = sum("sample[") + tm.get("sampling");
        eprintln!(
            "model {} ({}): {} ms total | scale steps {steps:.1}, stable sampler {smp:.1}, sampling {draw:.1}, vq {vq:.1}, {} (ms)",
            dir.display(),
            m.model_hash,
            t.elapsed().as_millis(),
            parts.join(", ")
        );
        if a.timings {
            for (k, (ms, _)) in &tm.ms {
                eprintln!("  {k:<30} {ms:>10.1} ms");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
