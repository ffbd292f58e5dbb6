//! gen-random-star: a full-size STAR model with random weights in the official on-disk formats,
//! for export and runtime benchmarks (never committed: a d30 set is ~8 GB).
//!
//! Writes `<out>/star.pth` ({"trainer": {"var_wo_ddp": state_dict}}, fp32, with the stable-sampler
//! modules when --sampler), `<out>/vae.pth` (VAR's VQVAE decoder, quantizer and post_quant_conv at
//! ch 160 / vocab 4096 / Cvae 32; the encoder, which inference never reads, is left out) and
//! `<out>/text/` (a CLIPTextModel folder: config.json, model.safetensors, tokenizer files copied
//! from the fixtures). Weights are uniform with std 1/sqrt(fan_in), norms 1/0, biases small.

use anyhow::{Context, Result};
use clap::Parser;
use star_export::pth_writer::PthWriter;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Parser)]
struct Args {
    /// Transformer depth (width 64*depth, heads = depth).
    #[arg(long, default_value_t = 30)]
    depth: usize,
    /// Number of scales (14 for 1024 px, 10 for 256/512).
    #[arg(long, default_value_t = 14)]
    scales: usize,
    /// Include the stable-sampler modules (3 refiner blocks).
    #[arg(long)]
    sampler: bool,
    /// CLIP text-encoder layers (23 in SD 2.1's OpenCLIP ViT-H).
    #[arg(long, default_value_t = 23)]
    text_layers: usize,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

#[derive(Clone, Copy)]
enum Init {
    /// uniform with this standard deviation
    Std(f32),
    Const(f32),
}

fn fill(out: &mut dyn Write, n: usize, init: Init, rng: &mut Rng) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1 << 20);
    for i in 0..n {
        let v = match init {
            Init::Std(s) => rng.next() * s * 3f32.sqrt(),
            Init::Const(c) => c,
        };
        buf.extend_from_slice(&v.to_le_bytes());
        if buf.len() >= (1 << 20) || i + 1 == n {
            out.write_all(&buf)?;
            buf.clear();
        }
    }
    Ok(())
}

type Spec = Vec<(String, Vec<usize>, Init)>;

fn lin(s: &mut Spec, name: &str, out: usize, inp: usize, bias: bool) {
    s.push((
        format!("{name}.weight"),
        vec![out, inp],
        Init::Std(1.0 / (inp as f32).sqrt()),
    ));
    if bias {
        s.push((format!("{name}.bias"), vec![out], Init::Std(0.02)));
    }
}

fn attn(s: &mut Spec, p: &str, c: usize, h: usize) {
    s.push((
        format!("{p}.scale_mul_1H11"),
        vec![1, h, 1, 1],
        Init::Const(4f32.ln()),
    ));
    for b in ["q_bias", "v_bias"] {
        s.push((format!("{p}.{b}"), vec![c], Init::Std(0.05)));
    }
    s.push((format!("{p}.zero_k_bias"), vec![c], Init::Const(0.0)));
}

fn transformer(d: usize, sn: usize, sampler: bool) -> Spec {
    let (c, h, v, cv, dt) = (64 * d, d, 4096, 32, 1024);
    let mut s = Spec::new();
    s.push(("pos_start".into(), vec![1, 1, c], Init::Std(0.5)));
    lin(&mut s, "word_embed", c, cv, true);
    s.push(("class_emb.weight".into(), vec![1001, c], Init::Std(0.02)));
    s.push(("lvl_embed.weight".into(), vec![sn, c], Init::Std(0.5)));
    let block = |s: &mut Spec, p: &str, cross: bool| {
        attn(s, &format!("{p}.attn"), c, h);
        lin(s, &format!("{p}.attn.mat_qkv"), 3 * c, c, false);
        lin(s, &format!("{p}.attn.proj"), c, c, true);
        if cross {
            attn(s, &format!("{p}.cross_attn"), c, h);
            lin(s, &format!("{p}.cross_attn.mat_kv"), 2 * c, dt, false);
            lin(s, &format!("{p}.cross_attn.mat_q"), c, c, false);
            lin(s, &format!("{p}.cross_attn.proj"), c, c, true);
        }
        lin(s, &format!("{p}.ffn.fc1"), 4 * c, c, true);
        lin(s, &format!("{p}.ffn.fc2"), c, 4 * c, true);
    };
    for i in 0..d {
        block(&mut s, &format!("blocks.{i}"), true);
    }
    lin(&mut s, "head_logits", v, c, true);
    lin(&mut s, "encoder_proj", c, dt, true);
    if sampler {
        s.push(("pos_start_last".into(), vec![1, 1, c], Init::Std(0.5)));
        lin(&mut s, "word_embed_head", c, cv, true);
        for j in 0..3 {
            block(&mut s, &format!("feat_extract_blocks.{j}"), false);
        }
        lin(&mut s, "head_logits2", v, c, true);
        lin(&mut s, "encoder_proj2", c, dt, true);
        lin(&mut s, "head_proj", c, 2 * c, true);
        s.push(("lvl_embed_2.weight".into(), vec![sn, c], Init::Std(0.5)));
    }
    s
}

fn conv(s: &mut Spec, name: &str, out: usize, inp: usize, k: usize) {
    s.push((
        format!("{name}.weight"),
        vec![out, inp, k, k],
        Init::Std(1.0 / ((inp * k * k) as f32).sqrt()),
    ));
    s.push((format!("{name}.bias"), vec![out], Init::Std(0.02)));
}

fn gn(s: &mut Spec, name: &str, c: usize) {
    s.push((format!("{name}.weight"), vec![c], Init::Const(1.0)));
    s.push((format!("{name}.bias"), vec![c], Init::Const(0.0)));
}

fn vqvae() -> Spec {
    let (ch, z, vocab) = (160, 32, 4096);
    let mult = [1, 1, 2, 2, 4];
    let mut s = Spec::new();
    s.push((
        "quantize.embedding.weight".into(),
        vec![vocab, z],
        Init::Std(1.0),
    ));
    for i in 0..4 {
        conv(
            &mut s,
            &format!("quantize.quant_resi.qresi_ls.{i}"),
            z,
            z,
            3,
        );
    }
    conv(&mut s, "quant_conv", z, z, 3);
    conv(&mut s, "post_quant_conv", z, z, 3);
    let res = |s: &mut Spec, p: &str, cin: usize, cout: usize| {
        gn(s, &format!("{p}.norm1"), cin);
        conv(s, &format!("{p}.conv1"), cout, cin, 3);
        gn(s, &format!("{p}.norm2"), cout);
        conv(s, &format!("{p}.conv2"), cout, cout, 3);
        if cin != cout {
            conv(s, &format!("{p}.nin_shortcut"), cout, cin, 1);
        }
    };
    let att = |s: &mut Spec, p: &str, c: usize| {
        gn(s, &format!("{p}.norm"), c);
        conv(s, &format!("{p}.qkv"), 3 * c, c, 1);
        conv(s, &format!("{p}.proj_out"), c, c, 1);
    };
    let top = ch * mult[4];
    conv(&mut s, "decoder.conv_in", top, z, 3);
    res(&mut s, "decoder.mid.block_1", top, top);
    att(&mut s, "decoder.mid.attn_1", top);
    res(&mut s, "decoder.mid.block_2", top, top);
    let mut cin = top;
    for level in (0..5).rev() {
        let cout = ch * mult[level];
        for j in 0..3 {
            res(&mut s, &format!("decoder.up.{level}.block.{j}"), cin, cout);
            cin = cout;
            if level == 4 {
                att(&mut s, &format!("decoder.up.{level}.attn.{j}"), cout);
            }
        }
        if level != 0 {
            conv(
                &mut s,
                &format!("decoder.up.{level}.upsample.conv"),
                cout,
                cout,
                3,
            );
        }
    }
    gn(&mut s, "decoder.norm_out", cin);
    conv(&mut s, "decoder.conv_out", 3, cin, 3);
    s
}

fn clip(layers: usize) -> Spec {
    let (d, mlp) = (1024, 4096);
    let mut s = Spec::new();
    s.push((
        "text_model.embeddings.token_embedding.weight".into(),
        vec![49408, d],
        Init::Std(0.02),
    ));
    s.push((
        "text_model.embeddings.position_embedding.weight".into(),
        vec![77, d],
        Init::Std(0.01),
    ));
    for i in 0..layers {
        let p = format!("text_model.encoder.layers.{i}");
        for n in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            lin(&mut s, &format!("{p}.self_attn.{n}"), d, d, true);
        }
        gn(&mut s, &format!("{p}.layer_norm1"), d);
        gn(&mut s, &format!("{p}.layer_norm2"), d);
        lin(&mut s, &format!("{p}.mlp.fc1"), mlp, d, true);
        lin(&mut s, &format!("{p}.mlp.fc2"), d, mlp, true);
    }
    gn(&mut s, "text_model.final_layer_norm", d);
    s
}

fn write_pth(path: &Path, spec: &Spec, nest: &[&str], rng: &mut Rng) -> Result<u64> {
    let mut w = PthWriter::create(path).with_context(|| path.display().to_string())?;
    let mut n = 0u64;
    for (name, shape, init) in spec {
        let count: usize = shape.iter().product();
        n += count as u64;
        w.tensor(name, "FloatStorage", shape, |out| {
            fill(out, count, *init, rng)
        })?;
    }
    w.finish(nest, None)?;
    Ok(n)
}

fn write_safetensors(path: &Path, spec: &Spec, rng: &mut Rng) -> Result<u64> {
    let mut header = serde_json::Map::new();
    let mut off = 0usize;
    for (name, shape, _) in spec {
        let bytes = shape.iter().product::<usize>() * 4;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [off, off + bytes]}),
        );
        off += bytes;
    }
    let mut h = serde_json::to_vec(&header)?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut f = std::io::BufWriter::with_capacity(1 << 22, std::fs::File::create(path)?);
    f.write_all(&(h.len() as u64).to_le_bytes())?;
    f.write_all(&h)?;
    let mut n = 0u64;
    for (_, shape, init) in spec {
        let count: usize = shape.iter().product();
        n += count as u64;
        fill(&mut f, count, *init, rng)?;
    }
    f.flush()?;
    Ok(n)
}

fn main() -> Result<()> {
    let a = Args::parse();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ a.seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1);
    std::fs::create_dir_all(a.out.join("text/text_encoder"))?;
    std::fs::create_dir_all(a.out.join("text/tokenizer"))?;
    let t = std::time::Instant::now();
    let n = write_pth(
        &a.out.join("star.pth"),
        &transformer(a.depth, a.scales, a.sampler),
        &["trainer", "var_wo_ddp"],
        &mut rng,
    )?;
    eprintln!(
        "star.pth: {:.3} B parameters ({:.1}s)",
        n as f64 / 1e9,
        t.elapsed().as_secs_f64()
    );
    let n = write_pth(&a.out.join("vae.pth"), &vqvae(), &[], &mut rng)?;
    eprintln!("vae.pth: {:.1} M parameters", n as f64 / 1e6);
    let n = write_safetensors(
        &a.out.join("text/text_encoder/model.safetensors"),
        &clip(a.text_layers),
        &mut rng,
    )?;
    eprintln!("text encoder: {:.1} M parameters", n as f64 / 1e6);
    let cfg = serde_json::json!({
        "architectures": ["CLIPTextModel"], "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
        "num_hidden_layers": a.text_layers, "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "gelu",
        "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "projection_dim": 1024
    });
    std::fs::write(
        a.out.join("text/text_encoder/config.json"),
        serde_json::to_string_pretty(&cfg)?,
    )?;
    let tok = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/clip_tiny/tokenizer");
    for f in [
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        std::fs::copy(tok.join(f), a.out.join("text/tokenizer").join(f))?;
    }
    eprintln!(
        "wrote {} in {:.1}s",
        a.out.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
