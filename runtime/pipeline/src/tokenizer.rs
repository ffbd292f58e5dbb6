//! CLIP BPE tokenizer with the reference behaviour (transformers 4.x slow `CLIPTokenizer`):
//! special tokens (`!` pad, `<|startoftext|>`, `<|endoftext|>`) are split out of the raw text
//! first; each remaining chunk is cleaned (ftfy subset, below), whitespace-collapsed and
//! lower-cased, then split by CLIP's regex and byte-level BPE'd. BOS 49406 + ids + EOS 49407,
//! truncated to 77 keeping EOS last, padded with id 0; mask 1 on BOS..EOS.
//!
//! Cleaning implemented (the parts of ftfy.fix_text that change real prompts): HTML entities
//! unescaped when the text contains no `<` (numeric and the common named ones), curly quotes to
//! straight, Latin ligatures split, full-width ASCII and the ideographic space to ASCII, control
//! characters removed, NFC. Not implemented: ftfy's mojibake repair (`fix_encoding`).

use regex::Regex;
use std::collections::HashMap;
use std::path::Path;
use unicode_normalization::UnicodeNormalization;

pub const BOS: i64 = 49406;
pub const EOS: i64 = 49407;
pub const CONTEXT: usize = star_artifact::stage::TEXT_LEN;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: {why}")]
    Load { path: String, why: String },
}

pub struct Tokenizer {
    encoder: HashMap<String, i64>,
    ranks: HashMap<(String, String), usize>,
    byte_map: Vec<char>,
    pattern: Regex,
    pad_id: i64,
    pad_token: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    pub ids: Vec<i64>,
    pub mask: Vec<i64>,
    /// True when the prompt was longer than 75 tokens and was cut.
    pub truncated: bool,
}

fn bytes_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut map = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        map[*b as usize] = char::from_u32(c).unwrap();
    }
    map
}

fn html_entity(name: &str) -> Option<String> {
    if let Some(num) = name.strip_prefix('#') {
        let v = if let Some(h) = num.strip_prefix('x').or_else(|| num.strip_prefix('X')) {
            u32::from_str_radix(h, 16).ok()
        } else {
            num.parse().ok()
        };
        return v.and_then(char::from_u32).map(|c| c.to_string());
    }
    let s = match name {
        "amp" | "AMP" => "&",
        "lt" | "LT" => "<",
        "gt" | "GT" => ">",
        "quot" | "QUOT" => "\"",
        "apos" => "'",
        "nbsp" => "\u{a0}",
        "copy" => "©",
        "reg" => "®",
        "trade" => "™",
        "hellip" => "…",
        "mdash" => "—",
        "ndash" => "–",
        "lsquo" => "‘",
        "rsquo" => "’",
        "ldquo" => "“",
        "rdquo" => "”",
        "eacute" => "é",
        "egrave" => "è",
        "aacute" => "á",
        "agrave" => "à",
        "uuml" => "ü",
        "ouml" => "ö",
        "auml" => "ä",
        "szlig" => "ß",
        "ccedil" => "ç",
        "ntilde" => "ñ",
        "deg" => "°",
        "times" => "×",
        "euro" => "€",
        "pound" => "£",
        "yen" => "¥",
        "cent" => "¢",
        "sect" => "§",
        "para" => "¶",
        "middot" => "·",
        "bull" => "•",
        _ => return None,
    };
    Some(s.to_string())
}

/// The ftfy subset named in the module docs.
pub fn clean(text: &str) -> String {
    let mut s = text.to_string();
    if !s.contains('<') {
        let re = Regex::new(r"&(#?[0-9A-Za-z]{1,24});").unwrap();
        s = re
            .replace_all(&s, |c: &regex::Captures| {
                html_entity(&c[1]).unwrap_or_else(|| c[0].to_string())
            })
            .into_owned();
    }
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '\u{2018}'..='\u{201b}' | '\u{02bc}' => out.push('\''),
            '\u{201c}'..='\u{201f}' => out.push('"'),
            '\u{fb00}' => out.push_str("ff"),
            '\u{fb01}' => out.push_str("fi"),
            '\u{fb02}' => out.push_str("fl"),
            '\u{fb03}' => out.push_str("ffi"),
            '\u{fb04}' => out.push_str("ffl"),
            '\u{fb05}' => out.push_str("ſt"),
            '\u{fb06}' => out.push_str("st"),
            '\u{0132}' => out.push_str("IJ"),
            '\u{0133}' => out.push_str("ij"),
            '\u{3000}' => out.push(' '),
            '\u{ff01}'..='\u{ff5e}' => out.push(char::from_u32(ch as u32 - 0xfee0).unwrap()),
            c if c.is_control() && !c.is_whitespace() => {}
            c => out.push(c),
        }
    }
    out.nfc().collect()
}

fn whitespace_clean(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl Tokenizer {
    /// Id of the pad token (tokenizer_config.json's pad_token).
    pub fn pad_id(&self) -> i64 {
        self.pad_id
    }

    /// From a folder with `vocab.json` and `merges.txt` (and optionally `tokenizer_config.json`
    /// naming the pad token).
    pub fn from_dir(dir: &Path) -> Result<Tokenizer, TokenizerError> {
        let load = |f: &str| -> Result<String, TokenizerError> {
            let p = dir.join(f);
            std::fs::read_to_string(&p).map_err(|e| TokenizerError::Load {
                path: p.display().to_string(),
                why: e.to_string(),
            })
        };
        let vocab: HashMap<String, i64> =
            serde_json::from_str(&load("vocab.json")?).map_err(|e| TokenizerError::Load {
                path: dir.join("vocab.json").display().to_string(),
                why: e.to_string(),
            })?;
        let merges = load("merges.txt")?;
        let mut ranks = HashMap::new();
        // The reference reads merges[1 : 49152 - 256 - 2 + 1] (skipping the version header).
        for (i, line) in merges
            .trim()
            .split('\n')
            .skip(1)
            .take(49152 - 256 - 2)
            .enumerate()
        {
            let mut parts = line.split(' ');
            if let (Some(a), Some(b)) = (parts.next(), parts.next()) {
                ranks.insert((a.to_string(), b.to_string()), i);
            }
        }
        let pad_token = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| {
                let p = &v["pad_token"];
                p.as_str()
                    .map(|s| s.to_string())
                    .or_else(|| p["content"].as_str().map(|s| s.to_string()))
            })
            .unwrap_or_else(|| "!".to_string());
        let pad_id = *vocab
            .get(&pad_token)
            .or_else(|| vocab.get(&format!("{pad_token}</w>")))
            .unwrap_or(&0);
        let pattern = Regex::new(r"(?i)<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+").unwrap();
        Ok(Tokenizer {
            encoder: vocab,
            ranks,
            byte_map: bytes_to_unicode(),
            pattern,
            pad_id,
            pad_token,
        })
    }

    fn bpe(&self, token: &str) -> Vec<String> {
        let chars: Vec<char> = token.chars().collect();
        let mut word: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
        if let Some(last) = word.last_mut() {
            last.push_str("</w>");
        }
        loop {
            if word.len() < 2 {
                break;
            }
            let mut best: Option<(usize, usize)> = None;
            for i in 0..word.len() - 1 {
                if let Some(&r) = self.ranks.get(&(word[i].clone(), word[i + 1].clone())) {
                    if best.is_none_or(|(br, _)| r < br) {
                        best = Some((r, i));
                    }
                }
            }
            let Some((_, i)) = best else { break };
            let (a, b) = (word[i].clone(), word[i + 1].clone());
            let mut merged = Vec::with_capacity(word.len());
            let mut j = 0;
            while j < word.len() {
                if j + 1 < word.len() && word[j] == a && word[j + 1] == b {
                    merged.push(format!("{a}{b}"));
                    j += 2;
                } else {
                    merged.push(word[j].clone());
                    j += 1;
                }
            }
            word = merged;
        }
        word
    }

    fn encode_chunk(&self, text: &str, out: &mut Vec<i64>) {
        let t = whitespace_clean(&clean(text)).to_lowercase();
        for m in self.pattern.find_iter(&t) {
            let mapped: String = m
                .as_str()
                .bytes()
                .map(|b| self.byte_map[b as usize])
                .collect();
            for piece in self.bpe(&mapped) {
                out.push(*self.encoder.get(&piece).unwrap_or(&EOS));
            }
        }
    }

    /// Token ids without BOS/EOS.
    pub fn tokens(&self, text: &str) -> Vec<i64> {
        let mut out = vec![];
        let specials = [self.pad_token.as_str(), "<|startoftext|>", "<|endoftext|>"];
        let mut rest = text;
        while !rest.is_empty() {
            let hit = specials
                .iter()
                .filter_map(|s| rest.find(s).map(|p| (p, *s)))
                .min_by_key(|(p, s)| (*p, usize::MAX - s.len()));
            match hit {
                Some((p, s)) => {
                    self.encode_chunk(&rest[..p], &mut out);
                    out.push(match s {
                        "<|startoftext|>" => BOS,
                        "<|endoftext|>" => EOS,
                        _ => self.pad_id,
                    });
                    rest = &rest[p + s.len()..];
                }
                None => {
                    self.encode_chunk(rest, &mut out);
                    break;
                }
            }
        }
        out
    }

    pub fn encode(&self, text: &str) -> Encoded {
        let mut toks = self.tokens(text);
        let truncated = toks.len() > CONTEXT - 2;
        toks.truncate(CONTEXT - 2);
        let mut ids = Vec::with_capacity(CONTEXT);
        ids.push(BOS);
        ids.extend(toks);
        ids.push(EOS);
        let used = ids.len();
        ids.resize(CONTEXT, self.pad_id);
        let mask = (0..CONTEXT).map(|i| (i < used) as i64).collect();
        Encoded {
            ids,
            mask,
            truncated,
        }
    }
}
