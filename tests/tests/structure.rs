//! The workspace's structure, checked: the crate graph has no circle and the exporter does not
//! build the server; inside every crate, the modules form no import circle (a module's file
//! naming `crate::other` or `super::other` depends on `other`; declaring a submodule does not).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    star_tests::root()
}

fn cargo_metadata() -> serde_json::Value {
    let out = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["metadata", "--format-version", "1", "--offline"])
        .current_dir(root())
        .output()
        .expect("cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Normal (not dev, not build) dependencies by package id.
fn normal_deps(meta: &serde_json::Value) -> BTreeMap<String, Vec<String>> {
    let mut g = BTreeMap::new();
    for node in meta["resolve"]["nodes"].as_array().unwrap() {
        let deps = node["deps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| {
                d["dep_kinds"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|k| k["kind"].is_null())
            })
            .map(|d| d["pkg"].as_str().unwrap().to_string())
            .collect();
        g.insert(node["id"].as_str().unwrap().to_string(), deps);
    }
    g
}

fn name_of(meta: &serde_json::Value, id: &str) -> String {
    meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == id)
        .map(|p| p["name"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

#[test]
fn the_exporter_builds_no_server_and_crates_form_no_circle() {
    let meta = cargo_metadata();
    let g = normal_deps(&meta);
    let members: Vec<String> = meta["workspace_members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_string())
        .collect();
    // Every crate the exporter builds, transitively.
    let export = members
        .iter()
        .find(|m| name_of(&meta, m) == "star-export")
        .unwrap();
    let mut seen = BTreeSet::new();
    let mut todo = vec![export.clone()];
    while let Some(id) = todo.pop() {
        if seen.insert(id.clone()) {
            todo.extend(g.get(&id).cloned().unwrap_or_default());
        }
    }
    let built: BTreeSet<String> = seen.iter().map(|id| name_of(&meta, id)).collect();
    for server in ["axum", "tokio", "hyper", "star-serve", "star-runtime"] {
        assert!(!built.contains(server), "star-export builds {server}");
    }
    assert!(built.contains("star-pipeline") && built.contains("star-artifact"));
    // The artifact crate reads and writes files: no ONNX Runtime, CUDA or TensorRT.
    let artifact = members
        .iter()
        .find(|m| name_of(&meta, m) == "star-artifact")
        .unwrap();
    for d in &g[artifact] {
        let n = name_of(&meta, d);
        assert!(
            !["ort", "ort-sys", "cudarc", "trtx", "libloading"].contains(&n.as_str()),
            "star-artifact depends on {n}"
        );
    }
    let among: BTreeMap<String, Vec<String>> = members
        .iter()
        .map(|m| {
            let deps = g[m]
                .iter()
                .filter(|d| members.contains(d))
                .cloned()
                .collect();
            (m.clone(), deps)
        })
        .collect();
    assert_eq!(cycles(&among), Vec::<Vec<String>>::new());
}

/// The crate's source files as module paths (`ort::cpu` for `src/ort/cpu.rs`, `ort` for
/// `src/ort/mod.rs`, `` for lib.rs and main.rs).
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let mut todo = vec![src.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
                continue;
            }
            if p.extension().and_then(|x| x.to_str()) != Some("rs") {
                continue;
            }
            let rel = p.strip_prefix(src).unwrap().with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if matches!(
                parts.last().map(String::as_str),
                Some("mod" | "lib" | "main")
            ) {
                parts.pop();
            }
            out.insert(parts.join("::"), p);
        }
    }
    out
}

/// The modules a module's file names: `crate::a::b…` resolved to the longest known module
/// path, `super::x` relative to its parent (paths relative to the module itself, `child::x`,
/// are not seen: write them from `crate::` where it matters). Test modules (`#[cfg(test)]` and
/// below) are not read: tests may reach anywhere.
fn references(module: &str, file: &Path, known: &BTreeSet<String>) -> BTreeSet<String> {
    let text = std::fs::read_to_string(file).unwrap();
    let text = text.split("#[cfg(test)]").next().unwrap_or("");
    let parent: Vec<&str> = {
        let mut p: Vec<&str> = module.split("::").filter(|s| !s.is_empty()).collect();
        p.pop();
        p
    };
    let mut refs = BTreeSet::new();
    let re = regex_lite(text);
    for (base, path) in re {
        let mut full: Vec<String> = match base {
            "crate" => vec![],
            _ => parent.iter().map(|s| s.to_string()).collect(),
        };
        full.extend(path);
        // The longest prefix that is a module.
        while !full.is_empty() {
            let cand = full.join("::");
            if known.contains(&cand) {
                if cand != module {
                    refs.insert(cand);
                }
                break;
            }
            full.pop();
        }
    }
    refs
}

/// `crate::a::b::…` and `super::a::…` paths (also inside `use crate::{a, b::c}` groups: the
/// group's first segment suffices for module-level edges).
fn regex_lite(text: &str) -> Vec<(&'static str, Vec<String>)> {
    let mut out = vec![];
    for base in ["crate", "super"] {
        let pat = format!("{base}::");
        let mut rest = text;
        while let Some(i) = rest.find(&pat) {
            let before = rest[..i].chars().last();
            rest = &rest[i + pat.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let segs: Vec<String> = rest
                .split("::")
                .map(|s| {
                    s.chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect::<String>()
                })
                .take_while(|s| !s.is_empty())
                .collect();
            if base == "crate" || base == "super" {
                out.push((if base == "crate" { "crate" } else { "super" }, segs));
            }
        }
    }
    out
}

/// Every circle of a directed graph (its strongly connected components of more than one node,
/// or with a self-loop), sorted.
fn cycles(g: &BTreeMap<String, Vec<String>>) -> Vec<Vec<String>> {
    // Kosaraju: order by finish time, then components on the reversed graph.
    fn visit(
        n: &str,
        g: &BTreeMap<String, Vec<String>>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) {
        if !seen.insert(n.to_string()) {
            return;
        }
        for m in g.get(n).into_iter().flatten() {
            visit(m, g, seen, order);
        }
        order.push(n.to_string());
    }
    let mut seen = BTreeSet::new();
    let mut order = vec![];
    for n in g.keys() {
        visit(n, g, &mut seen, &mut order);
    }
    let mut rev: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (a, bs) in g {
        for b in bs {
            rev.entry(b.clone()).or_default().push(a.clone());
        }
    }
    let mut seen = BTreeSet::new();
    let mut out = vec![];
    for n in order.iter().rev() {
        let mut comp = vec![];
        visit(n, &rev, &mut seen, &mut comp);
        let looped = g.get(n).is_some_and(|bs| bs.contains(n));
        if comp.len() > 1 || (comp.len() == 1 && looped) {
            comp.sort();
            out.push(comp);
        }
    }
    out.sort();
    out
}

#[test]
fn no_crate_has_an_import_circle_between_its_modules() {
    let crates = [
        "engines/artifact/src",
        "engines/src",
        "runtime/pipeline/src",
        "runtime/serve/src",
        "runtime/src",
        "exporter/src",
        "calibration/src",
        "tests/src",
        "tests/cli/src",
        "benches/src",
    ];
    let mut found = vec![];
    for c in crates {
        let mods = modules(&root().join(c));
        let known: BTreeSet<String> = mods.keys().cloned().collect();
        let g: BTreeMap<String, Vec<String>> = mods
            .iter()
            .map(|(m, f)| (m.clone(), references(m, f, &known).into_iter().collect()))
            .collect();
        for cyc in cycles(&g) {
            found.push(format!("{c}: {}", cyc.join(" <-> ")));
        }
    }
    assert!(found.is_empty(), "import circles:\n{}", found.join("\n"));
}

#[test]
fn the_checker_sees_a_circle() {
    let g: BTreeMap<String, Vec<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(cycles(&g), vec![vec!["a", "b", "c"]]);
    let known: BTreeSet<String> = ["", "x", "x::y", "z"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let t = tempfile::tempdir().unwrap();
    let f = t.path().join("y.rs");
    std::fs::write(
        &f,
        "use crate::z::thing;\nuse super::x_other;\nfn f() { crate::x::y::g(); super::z; }\n#[cfg(test)]\nuse crate::x;",
    )
    .unwrap();
    // From x::y: crate::z and super:: (= x) resolve; the module itself and tests do not count.
    let r = references("x::y", &f, &known);
    assert_eq!(r, ["x", "z"].iter().map(|s| s.to_string()).collect());
}
