//! 8-bit RGB PNG output with metadata, written atomically (temp file + rename).
//!
//! Free text (the prompts) goes into iTXt chunks, which are UTF-8: tEXt is Latin-1 and cannot
//! hold CJK, emoji or curly quotes. Fields we generate ourselves (seed, hashes, numbers) are ASCII
//! and stay tEXt, the chunk every PNG reader shows.

use crate::pipeline::{Result, RunError};
use std::io::Write;
use std::path::Path;

/// One image of a (B, 3, H, W) tensor in [0, 1] as interleaved RGB bytes: round(x * 255).
pub fn to_rgb8(data: &[f32], index: usize, h: usize, w: usize) -> Vec<u8> {
    let plane = h * w;
    let base = index * 3 * plane;
    let mut out = Vec::with_capacity(3 * plane);
    for i in 0..plane {
        for c in 0..3 {
            let v = data[base + c * plane + i];
            out.push((v * 255.0 + 0.5).floor().clamp(0.0, 255.0) as u8);
        }
    }
    out
}

/// One metadata field: keyword and value.
#[derive(Clone, Debug)]
pub enum Meta {
    /// A value we produce, ASCII by construction: tEXt.
    Ascii(&'static str, String),
    /// User text, any Unicode: iTXt (UTF-8, uncompressed).
    Utf8(&'static str, String),
}

impl Meta {
    pub fn key(&self) -> &'static str {
        match self {
            Meta::Ascii(k, _) | Meta::Utf8(k, _) => k,
        }
    }
}

/// The metadata of a generated image (the CLI and the server write the same).
pub fn generation_meta(
    prompt: &str,
    negative: &str,
    image_seed: u64,
    gp: &crate::pipeline::GenParams,
    p: &crate::pipeline::Pipeline,
) -> Vec<Meta> {
    let m = &p.md.manifest;
    vec![
        Meta::Utf8("prompt", prompt.to_string()),
        Meta::Utf8("negative_prompt", negative.to_string()),
        Meta::Ascii("seed", image_seed.to_string()),
        Meta::Ascii("cfg", gp.cfg.to_string()),
        Meta::Ascii("top_k", gp.top_k.to_string()),
        Meta::Ascii("top_p", gp.top_p.to_string()),
        Meta::Ascii("stable_sampling", gp.stable_sampling.to_string()),
        Meta::Ascii("model_hash", m.model_hash.clone()),
        Meta::Ascii("backend", p.md.opts.name.clone()),
        Meta::Ascii("precision", m.precision.to_string()),
        Meta::Ascii(
            "software",
            format!("star-run {}", env!("CARGO_PKG_VERSION")),
        ),
    ]
}

/// An 8-bit RGB PNG with metadata, in memory.
pub fn png_bytes(
    rgb: &[u8],
    w: usize,
    h: usize,
    meta: &[Meta],
) -> std::result::Result<Vec<u8>, String> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w as u32, h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for m in meta {
            match m {
                Meta::Ascii(k, v) => enc.add_text_chunk(k.to_string(), v.clone()),
                Meta::Utf8(k, v) => enc.add_itxt_chunk(k.to_string(), v.clone()),
            }
            .map_err(|e| format!("metadata {}: {e}", m.key()))?;
        }
        let mut wr = enc.write_header().map_err(|e| e.to_string())?;
        wr.write_image_data(rgb).map_err(|e| e.to_string())?;
        wr.finish().map_err(|e| e.to_string())?;
    }
    Ok(out)
}

pub fn write_png(path: &Path, rgb: &[u8], w: usize, h: usize, meta: &[Meta]) -> Result<()> {
    let err = |why: String| RunError::Output {
        path: path.display().to_string(),
        why,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(err(format!("directory {} does not exist", dir.display())));
    }
    let bytes = png_bytes(rgb, w, h, meta).map_err(err)?;
    write_atomic(path, &bytes).map_err(|e| err(format!("cannot write in {}: {e}", dir.display())))
}

/// Write `bytes` to `path` atomically (temporary file in the same directory, then rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".star-run-")
        .suffix(".tmp")
        .tempfile_in(&dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}
