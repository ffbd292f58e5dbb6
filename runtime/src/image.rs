//! 8-bit RGB PNG output with tEXt metadata, written atomically (temp file + rename).

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

pub fn write_png(
    path: &Path,
    rgb: &[u8],
    w: usize,
    h: usize,
    meta: &[(String, String)],
) -> Result<()> {
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
    let mut tmp = tempfile::Builder::new()
        .prefix(".star-run-")
        .suffix(".png.tmp")
        .tempfile_in(&dir)
        .map_err(|e| err(format!("cannot write in {}: {e}", dir.display())))?;
    {
        let mut enc = png::Encoder::new(
            std::io::BufWriter::new(tmp.as_file_mut()),
            w as u32,
            h as u32,
        );
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (k, v) in meta {
            enc.add_text_chunk(k.clone(), v.clone())
                .map_err(|e| err(e.to_string()))?;
        }
        let mut wr = enc.write_header().map_err(|e| err(e.to_string()))?;
        wr.write_image_data(rgb).map_err(|e| err(e.to_string()))?;
        wr.finish().map_err(|e| err(e.to_string()))?;
    }
    tmp.as_file_mut().flush().map_err(|e| err(e.to_string()))?;
    tmp.as_file().sync_all().map_err(|e| err(e.to_string()))?;
    tmp.persist(path).map_err(|e| err(e.error.to_string()))?;
    Ok(())
}
