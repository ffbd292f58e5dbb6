//! Writes PyTorch zip-pickle checkpoints in the layout `torch.save` produces (a `data.pkl` with
//! persistent storage ids, one stored member per storage). Used by the tests (hand-made bad
//! checkpoints, fp16/bf16 storages) and by the benchmark generator of full-size random models;
//! tensor bytes are streamed, so multi-GB files never sit in memory.

use std::io::Write;
use std::path::Path;

pub struct PthWriter {
    zip: zip::ZipWriter<std::io::BufWriter<std::fs::File>>,
    prefix: String,
    entries: Vec<(String, String, Vec<usize>)>,
}

fn put_str(p: &mut Vec<u8>, s: &str) {
    p.push(b'X');
    p.extend((s.len() as u32).to_le_bytes());
    p.extend(s.as_bytes());
}

fn put_int(p: &mut Vec<u8>, v: usize) {
    p.push(b'J');
    p.extend((v as i32).to_le_bytes());
}

impl PthWriter {
    pub fn create(path: &Path) -> std::io::Result<Self> {
        let f = std::io::BufWriter::with_capacity(1 << 22, std::fs::File::create(path)?);
        let prefix = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("archive")
            .to_string();
        Ok(PthWriter {
            zip: zip::ZipWriter::new(f),
            prefix,
            entries: vec![],
        })
    }

    /// Add a tensor whose little-endian bytes `fill` writes (storage kind e.g. "FloatStorage").
    pub fn tensor(
        &mut self,
        name: &str,
        kind: &str,
        shape: &[usize],
        fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let key = self.entries.len().to_string();
        let opt = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .large_file(true);
        self.zip
            .start_file(format!("{}/data/{key}", self.prefix), opt)
            .map_err(std::io::Error::other)?;
        fill(&mut self.zip)?;
        self.entries
            .push((name.to_string(), kind.to_string(), shape.to_vec()));
        Ok(())
    }

    /// Write `data.pkl`: the tensors as a dict nested under `nest` (e.g. ["trainer", "var_wo_ddp"]),
    /// plus an optional foreign GLOBAL (module.name) for tests of the restricted unpickler.
    pub fn finish(mut self, nest: &[&str], foreign: Option<&str>) -> std::io::Result<()> {
        let mut p: Vec<u8> = vec![0x80, 2];
        for k in nest {
            p.push(b'}');
            put_str(&mut p, k);
        }
        p.extend(b"}(");
        for (i, (name, kind, shape)) in self.entries.iter().enumerate() {
            put_str(&mut p, name);
            p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
            p.push(b'(');
            put_str(&mut p, "storage");
            p.extend(format!("ctorch\n{kind}\n").as_bytes());
            put_str(&mut p, &i.to_string());
            put_str(&mut p, "cpu");
            put_int(&mut p, shape.iter().product());
            p.extend(b"tQ");
            put_int(&mut p, 0);
            let mut stride = vec![1usize; shape.len()];
            for d in (0..shape.len().saturating_sub(1)).rev() {
                stride[d] = stride[d + 1] * shape[d + 1];
            }
            for v in [shape, &stride] {
                p.push(b'(');
                for d in v.iter() {
                    put_int(&mut p, *d);
                }
                p.push(b't');
            }
            p.extend(b"\x89NtR");
        }
        if let Some(g) = foreign {
            let (m, n) = g.rsplit_once('.').unwrap_or((g, g));
            put_str(&mut p, "x");
            p.extend(format!("c{m}\n{n}\n").as_bytes());
        }
        p.push(b'u');
        // SETITEM closes each enclosing dict.
        p.extend(std::iter::repeat_n(b's', nest.len()));
        p.push(b'.');
        let opt = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        self.zip
            .start_file(format!("{}/data.pkl", self.prefix), opt)
            .map_err(std::io::Error::other)?;
        self.zip.write_all(&p)?;
        self.zip
            .start_file(format!("{}/byteorder", self.prefix), opt)
            .map_err(std::io::Error::other)?;
        self.zip.write_all(b"little")?;
        let mut f = self.zip.finish().map_err(std::io::Error::other)?;
        f.flush()
    }
}
