//! The layering rule of the crate, checked on its own source (docs/design.md, "Module map"):
//! every top-level module has a rank, and code in a module refers (`crate::…`) only to modules
//! of a lower rank, or to itself. So there are no import cycles between top-level modules, and
//! a new module must be given a rank here before it can be used.
//!
//! The check reads the source files of this crate, removes comments, and collects every
//! `crate::` path, expanding `use crate::{a::…, b}` groups. It runs as a unit test, in CI.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

/// Top-level modules from the bottom up. A module may use only modules of a lower rank.
const RANKS: &[(&str, u8)] = &[
    ("api", 0),
    ("logging", 0),
    ("metrics", 0),
    ("config", 1),
    ("auth", 1),
    ("storage", 2),
    ("transport", 2),
    ("raft", 3),
    ("client", 3),
    ("sharding", 4),
    ("etcd", 4),
    ("cluster", 5),
];

/// Modules outside the ranks: this check itself (test-only).
const UNRANKED: &[&str] = &["layering"];

fn rank(module: &str) -> Option<u8> {
    RANKS.iter().find(|(m, _)| *m == module).map(|(_, r)| *r)
}

/// Source text without `//` and `/* */` comments or the contents of string literals.
fn strip_comments_and_strings(src: &str) -> String {
    let bytes = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                let mut depth = 0;
                while i < bytes.len() {
                    if bytes[i] == b'/' && bytes.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        i += 2;
                    } else if bytes[i] == b'*' && bytes.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            b'"' => {
                // A string literal (raw strings in this crate hold no quotes).
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                out.push_str("\"\"");
            }
            b'\'' => {
                // A char literal ('x', '\n', '"') or a lifetime ('a): copy a lifetime, skip a char.
                let end = if bytes.get(i + 1) == Some(&b'\\') {
                    src[i + 2..].find('\'').map(|e| i + 2 + e)
                } else {
                    src[i + 1..].char_indices().nth(1).filter(|(_, c)| *c == '\'').map(|(e, _)| i + 1 + e)
                };
                match end {
                    Some(e) => {
                        out.push_str("' '");
                        i = e + 1;
                    }
                    None => {
                        out.push('\'');
                        i += 1;
                    }
                }
            }
            _ => {
                let c = src[i..].chars().next().expect("in bounds");
                out.push(c);
                i += c.len_utf8();
            }
        }
    }
    out
}

/// The top-level modules named by `crate::` paths in `src` (comments removed).
fn referenced_modules(src: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = src;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + "crate::".len()..];
        // An identifier ending in "crate" is not a path from the crate root (`$crate::` is).
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a::x, b, c::{…}}`: the first segment of each top-level item.
            let mut depth = 1;
            let mut item_start = true;
            // Inside `#[...]` (a `cfg` on one item of the group): not a path.
            let mut in_attribute = 0;
            for (i, c) in group.char_indices() {
                match c {
                    '[' if in_attribute > 0 || group[..i].ends_with('#') => in_attribute += 1,
                    ']' if in_attribute > 0 => in_attribute -= 1,
                    _ if in_attribute > 0 => {}
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            rest = &group[i..];
                            break;
                        }
                    }
                    ',' if depth == 1 => item_start = true,
                    c if item_start && (c.is_alphabetic() || c == '_') => {
                        let name = ident_at(&group[i..]);
                        if name != "self" {
                            out.insert(name);
                        }
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            let name = ident_at(rest);
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

fn ident_at(s: &str) -> String {
    s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read source dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a source file belongs to (`None` for lib.rs).
fn top_module(src_dir: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src_dir).expect("under src");
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    match first.strip_suffix(".rs") {
        Some("lib") => None,
        Some(name) => Some(name.to_string()),
        None => Some(first),
    }
}

/// Every `crate::` reference that goes to a module of the same or a higher rank.
fn violations(src_dir: &Path) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(src_dir, &mut files);
    files.sort();
    let mut found = Vec::new();
    for file in &files {
        let Some(module) = top_module(src_dir, file) else { continue };
        if UNRANKED.contains(&module.as_str()) {
            continue;
        }
        let Some(own) = rank(&module) else {
            found.push(format!("{}: module `{module}` has no rank in layering::RANKS", file.display()));
            continue;
        };
        let src = strip_comments_and_strings(&std::fs::read_to_string(file).expect("read source"));
        for used in referenced_modules(&src) {
            if used == module {
                continue;
            }
            if used.starts_with(|c: char| c.is_uppercase()) {
                found.push(format!(
                    "{}: `{module}` uses the crate-root re-export `crate::{used}`; name its module instead",
                    file.display()
                ));
                continue;
            }
            match rank(&used) {
                Some(r) if r < own => {}
                Some(r) => found.push(format!(
                    "{}: `{module}` (rank {own}) uses `crate::{used}` (rank {r}); only lower ranks may be used",
                    file.display()
                )),
                None => found.push(format!("{}: `{module}` uses unranked `crate::{used}`", file.display())),
            }
        }
    }
    found
}

#[test]
fn modules_use_only_lower_ranks() {
    let src_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let found = violations(&src_dir);
    assert!(found.is_empty(), "layering violations:\n{}", found.join("\n"));
}

#[test]
fn every_top_level_module_has_a_rank() {
    let lib = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    let lib = strip_comments_and_strings(&lib);
    let declared: Vec<String> = lib
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod ").or_else(|| l.trim().strip_prefix("mod ")))
        .map(|l| l.trim_end_matches(';').to_string())
        .collect();
    assert!(declared.len() >= RANKS.len(), "modules in lib.rs: {declared:?}");
    for m in declared {
        assert!(rank(&m).is_some() || UNRANKED.contains(&m.as_str()), "module `{m}` has no rank");
    }
}

/// The check itself: it finds grouped, nested and plain paths, skips comments and strings, and
/// flags an upward reference.
#[test]
fn the_check_sees_what_it_must() {
    let src = r#"
        use crate::{self, api::{X, Y}, storage::Z, #[cfg(test)] config};
        // crate::cluster in a comment
        /* crate::client in a block comment */
        let s = "crate::sharding in a string";
        let c = '"'; let l: &'static str = "";
        fn f() -> crate::raft::RaftNode { todo!() }
        macro_rules! m { () => { $crate::transport::x() } }
        let my_crate::x = 1;
    "#;
    let found = referenced_modules(&strip_comments_and_strings(src));
    let found: Vec<&str> = found.iter().map(String::as_str).collect();
    assert_eq!(found, ["api", "config", "raft", "storage", "transport"]);

    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("storage")).unwrap();
    std::fs::write(dir.path().join("lib.rs"), "pub mod storage;").unwrap();
    std::fs::write(dir.path().join("storage/mod.rs"), "use crate::{api::A, raft::B};").unwrap();
    std::fs::write(dir.path().join("config.rs"), "use crate::api::A;").unwrap();
    std::fs::write(dir.path().join("api.rs"), "fn f() -> crate::AspenClient { todo!() }").unwrap();
    let found = violations(dir.path());
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(found.iter().any(|f| f.contains("uses `crate::raft`")), "{found:?}");
    assert!(found.iter().any(|f| f.contains("crate-root re-export `crate::AspenClient`")), "{found:?}");
}
