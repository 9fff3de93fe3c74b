//! The library's layering: every module of `src/` sits in one layer, and its code (tests
//! aside) names only modules of lower layers, so that nothing low depends on something high
//! and no two modules depend on each other. A new module must be placed here.

use std::collections::BTreeMap;
use std::path::Path;

/// The layers, lowest first.
const LAYERS: &[&[&str]] = &[
    &["error"],
    &["files", "memory", "rng"],
    &["diffusion", "weights"],
    &["config", "cuda"],
    &["image", "ops"],
    &["backend"],
    &["device"],
    &["bench", "model", "text"],
    &["sample"],
    &["job"],
];

/// The crate's top-level modules each file of `dir` belongs to, with the text of its code
/// outside `#[cfg(test)]` and comments.
fn modules(dir: &Path, top: Option<&str>, out: &mut BTreeMap<String, String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let module = top.map_or(name.clone(), str::to_string);
        if path.is_dir() {
            if module != "cli" {
                modules(&path, Some(&module), out);
            }
            continue;
        }
        if ["lib", "main"].contains(&module.as_str()) || path.extension().is_none_or(|e| e != "rs")
        {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let code: String = code
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .map(|l| format!("{l}\n"))
            .collect();
        out.entry(module).or_default().push_str(&code);
    }
}

/// The modules `code` names as `crate::<module>` (or `$crate::<module>` in a macro).
fn uses(code: &str) -> Vec<String> {
    code.match_indices("crate::")
        .map(|(i, _)| {
            code[i + 7..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|m| m.chars().next().is_some_and(char::is_lowercase))
        .collect()
}

#[test]
fn no_module_names_one_of_its_own_layer_or_above() {
    let mut found = BTreeMap::new();
    modules(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        None,
        &mut found,
    );
    let layer = |m: &str| LAYERS.iter().position(|l| l.contains(&m));
    let unplaced: Vec<&String> = found.keys().filter(|m| layer(m).is_none()).collect();
    assert!(
        unplaced.is_empty(),
        "modules in no layer (add them to LAYERS): {unplaced:?}"
    );
    let listed: Vec<&str> = LAYERS.iter().flat_map(|l| l.iter().copied()).collect();
    let gone: Vec<&&str> = listed.iter().filter(|m| !found.contains_key(**m)).collect();
    assert!(gone.is_empty(), "LAYERS names modules src/ lacks: {gone:?}");
    let mut wrong = Vec::new();
    for (module, code) in &found {
        let own = layer(module).unwrap();
        let mut named: Vec<String> = uses(code);
        named.sort();
        named.dedup();
        for other in named.iter().filter(|o| *o != module) {
            match layer(other) {
                Some(l) if l < own => {}
                _ => wrong.push(format!(
                    "{module} (layer {own}) names {other} (layer {:?})",
                    layer(other)
                )),
            }
        }
        eprintln!("{module:10} layer {own}: {}", named.join(" "));
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn the_check_reads_crate_paths() {
    let code = "use crate::ops::conv::Conv2d;\nlet x = crate::rng::fill(); $crate::device::Kind";
    assert_eq!(uses(code), ["ops", "rng", "device"]);
    assert!(uses("use super::Thing; crate::Error").is_empty());
}
