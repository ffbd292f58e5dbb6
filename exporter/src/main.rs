use clap::{Parser, Subcommand};
use star_artifact::dtype::Precision;
use star_engines::options::BackendOptions;
use star_export::export::{export, ExportArgs};
use std::path::PathBuf;
use std::process::ExitCode;

/// star-export: turn STAR PyTorch checkpoints into ONNX model directories for star-run.
///
/// A model directory holds one ONNX graph per stage kind (text encoder, text K/V, step for every
/// scale, stable sampler, VQ transitions, decoder), one shared weights file, the tokenizer files
/// and manifest.json (and, at int8, the calibration table). Exit codes: 0 ok, 1 validation failed, 2 bad input.
#[derive(Parser)]
#[command(
    name = "star-export",
    version,
    after_help = "Examples:\n  star-export inspect STAR.pth\n  star-export export --transformer STAR.pth --vae VAE.pth --text-encoder sd21/ --resolution 1024 --out model/\n  star-export export --transformer demo.pth --vae vqvae.pth --text-encoder demo/ --patch-nums 1,2,3,4 --default-cfg 3.0 --out demo-model/\n  star-export validate --model model/ --golden fixtures/tiny-1024s"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once per process: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Export checkpoints to a model directory (written atomically: nothing appears at --out on failure).
    #[command(allow_negative_numbers = true)]
    Export {
        /// Transformer checkpoint: .pth (state_dict under ["trainer"]["var_wo_ddp"]) or .safetensors.
        #[arg(long)]
        transformer: PathBuf,
        /// VQ tokenizer checkpoint (VAR's VQVAE): .pth or .safetensors.
        #[arg(long)]
        vae: PathBuf,
        /// CLIP text encoder: a Stable-Diffusion-style folder (text_encoder/ + tokenizer/) or a CLIPTextModel folder.
        #[arg(long)]
        text_encoder: PathBuf,
        /// Tokenizer folder (vocab.json + merges.txt) if not <text-encoder>/tokenizer.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Image resolution of a released schedule: 256, 512 or 1024.
        #[arg(long)]
        resolution: Option<usize>,
        /// Explicit scale sides, e.g. 1,2,3,4 (overrides the resolution's schedule).
        #[arg(long, value_delimiter = ',')]
        patch_nums: Option<Vec<usize>>,
        /// Output model directory (must not exist, or be empty).
        #[arg(long)]
        out: PathBuf,
        /// Graph precision of the scale stages (step, step_first, sampler): fp32, fp16 or int8.
        /// fp16: FP16 weights and matrix products, norms/softmax/RoPE/head in FP32. int8: Q/DQ on
        /// the blocks' linear layers, calibrated with --calibration. The text encoder, VQ and
        /// decoder stay FP32. On ort-cpu, fp16 is an accuracy check, not a speed path (ONNX
        /// Runtime's CPU provider computes most FP16 nodes through casts to FP32); int8 is the
        /// CPU speed path.
        #[arg(long, default_value = "fp32", value_parser = precision_arg())]
        precision: Precision,
        /// int8: calibration prompts, one per line (# comments); calibration/prompts/ has a
        /// shapes set for the demo and a general set.
        #[arg(long)]
        calibration: Option<PathBuf>,
        /// int8: how each activation range is chosen: percentile (99.99 % of |x| below it; the
        /// most accurate on the demo, benches/RESULTS.md), percentile=P, entropy (TensorRT's KL
        /// divergence) or max.
        #[arg(long, default_value = "percentile", value_parser = star_export::calibrate::parse_method, requires = "calibration")]
        calibration_method: star_calibration::Method,
        /// int8: generations to calibrate over (prompts in order, cycling) [default: one per prompt].
        #[arg(long, requires = "calibration")]
        calibration_samples: Option<usize>,
        /// int8: calibration generation i uses seed SEED + i.
        #[arg(long, default_value_t = 0, requires = "calibration")]
        seed: u64,
        /// Guidance scale stored as this model's default, a finite number >= 0 [default: 4.0].
        #[arg(long, value_parser = star_pipeline::args::cfg)]
        default_cfg: Option<f64>,
        /// top-k stored as this model's default [default: 600 of 4096, scaled to the vocabulary].
        #[arg(long)]
        default_top_k: Option<usize>,
        /// top-p stored as this model's default, in [0, 1] [default: 0.8].
        #[arg(long, value_parser = star_pipeline::args::top_p)]
        default_top_p: Option<f64>,
        /// No progress lines.
        #[arg(long)]
        quiet: bool,
        /// Export weights that hold NaN or Inf (refused by default: they mean a diverged or corrupted checkpoint).
        #[arg(long)]
        allow_nonfinite: bool,
    },
    /// Run every stage of a model directory with ONNX Runtime on a golden fixture folder and compare.
    Validate {
        /// Model directory made by `star-export export`.
        #[arg(long)]
        model: PathBuf,
        /// Fixture variant folder (e.g. fixtures/tiny-256); set-level records are read from its parent.
        #[arg(long)]
        golden: PathBuf,
        /// ONNX Runtime intra-op threads (0 = all cores).
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
    /// Build GPU engines from a model directory: one per graph, one optimization profile per scale
    /// (written atomically, like export). --dry-run needs no GPU: it writes and prints plan.json.
    #[command(
        after_help = "Examples:\n  star-export build-engine --model model/ --backend tensorrt --out engines/ --dry-run\n  star-export build-engine --model model-fp16/ --backend tensorrt --out engines-fp16/ --workspace-gb 8\n  star-run --engine engines-fp16/ --prompt \"a red circle\" --out red.png"
    )]
    BuildEngine {
        /// Model directory made by `star-export export` (any precision: the engines take theirs
        /// from the graphs).
        #[arg(long)]
        model: PathBuf,
        /// tensorrt (native TensorRT 11; star-export built with --features tensorrt) or ort-trt
        /// (ONNX Runtime's TensorRT provider, TensorRT 10; scripts/setup-ort.sh --gpu).
        #[arg(long)]
        backend: String,
        /// Output engine directory (must not exist, or be empty).
        #[arg(long)]
        out: PathBuf,
        /// Images per generation the engines are built for (profiles are exact shapes).
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Builder workspace limit in GiB [default: TensorRT's, the device's memory].
        #[arg(long)]
        workspace_gb: Option<f64>,
        /// TensorRT builder optimization level, 0 to 5 (higher: longer builds, faster engines).
        #[arg(long, default_value_t = 3)]
        opt_level: u32,
        /// libnvinfer to load (tensorrt) [default: $STAR_TENSORRT_LIB, then libnvinfer.so.11 on the
        /// library path].
        #[arg(long)]
        tensorrt_lib: Option<PathBuf>,
        /// CUDA device ordinal to build on.
        #[arg(long, default_value_t = 0)]
        device: usize,
        /// Write plan.json (graphs, per-scale profiles with shapes, precisions, I/O names) into
        /// --out and print it; needs no GPU and no TensorRT.
        #[arg(long)]
        dry_run: bool,
        /// No progress lines.
        #[arg(long)]
        quiet: bool,
    },
    /// Print what a checkpoint file or folder holds and which model it is.
    Inspect {
        path: PathBuf,
        /// Also list every tensor with dtype and shape.
        #[arg(long)]
        keys: bool,
    },
}

/// `--precision`: one of the contract's precisions, listed in --help.
fn precision_arg() -> impl clap::builder::TypedValueParser<Value = Precision> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(Precision::ALL.map(Precision::name))
        .try_map(|s| s.parse::<Precision>())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => return star_pipeline::args::usage_error(e),
    };
    if let Err(e) = star_export::export::install_interrupt_cleanup() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> star_export::Result<ExitCode> {
    match cli.cmd {
        Cmd::Export {
            transformer,
            vae,
            text_encoder,
            tokenizer,
            resolution,
            patch_nums,
            out,
            precision,
            default_cfg,
            default_top_k,
            default_top_p,
            quiet,
            allow_nonfinite,
            calibration,
            calibration_method,
            calibration_samples,
            seed,
        } => {
            let calibration = calibration.map(|prompts| star_export::calibrate::CalibrationArgs {
                prompts,
                method: calibration_method,
                samples: calibration_samples,
                seed,
            });
            let a = ExportArgs {
                transformer,
                vae,
                text_encoder,
                tokenizer,
                resolution,
                patch_nums,
                out: out.clone(),
                precision,
                cfg: default_cfg,
                top_k: default_top_k,
                top_p: default_top_p,
                quiet,
                allow_nonfinite,
                calibration,
                attention_budget: None,
            };
            let t = std::time::Instant::now();
            let m = export(&a)?;
            let c = &m.config;
            println!(
                "exported STAR d{} ({} scales, {}px{}) to {} in {:.1}s: {} graphs, model hash {}",
                c.depth,
                m.schedule.patch_nums.len(),
                m.schedule.image_size,
                if c.sampler_blocks > 0 {
                    ", stable sampler"
                } else {
                    ""
                },
                out.display(),
                t.elapsed().as_secs_f64(),
                m.graphs.len(),
                m.model_hash
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Validate {
            model,
            golden,
            threads,
        } => {
            let rep = star_export::validate::validate(
                &model,
                &golden,
                BackendOptions::named("ort-cpu", threads),
            )?;
            print!("{}", rep.table());
            Ok(if rep.all_pass() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Cmd::BuildEngine {
            model,
            backend,
            out,
            batch,
            workspace_gb,
            opt_level,
            tensorrt_lib,
            device,
            dry_run,
            quiet,
        } => {
            use star_export::build_engine::{build_engine, BuildEngineArgs, Outcome};
            let a = BuildEngineArgs {
                model,
                backend,
                out: out.clone(),
                options: star_artifact::engine_manifest::BuildOptions {
                    batch,
                    workspace_gb,
                    opt_level,
                },
                tensorrt_lib,
                device,
                dry_run,
                quiet,
            };
            let t = std::time::Instant::now();
            match build_engine(&a)? {
                Outcome::DryRun(text) => print!("{text}"),
                Outcome::Built(em) => println!(
                    "built {} {} engines for {} (compute capability {}, TensorRT {}) in {:.1}s: {}",
                    em.built.len(),
                    em.plan.backend.name(),
                    em.target.gpu.name,
                    em.target.gpu.compute_capability,
                    em.target.tensorrt,
                    t.elapsed().as_secs_f64(),
                    out.display()
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Inspect { path, keys } => {
            print!("{}", star_export::inspect::inspect(&path, keys)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}
