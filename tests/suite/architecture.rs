//! The shape of the code, as ARCHITECTURE.md states it: which crate may
//! depend on which, no import cycles between the modules of a crate, and
//! one definition of the control actions that the DTDs agree with. These
//! read the sources and manifests of the workspace; they fail the moment a
//! change breaks the layering.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use rs_protocol::control::ActionKind;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The product crates: (package name, directory).
const CRATES: &[(&str, &str)] = &[
    ("rs-protocol", "common/protocol"),
    ("rs-store", "common/store"),
    ("rs-net", "common/net"),
    ("rs-node", "common/node"),
    ("rs-proxy", "proxy"),
    ("rs-mlm", "mlm"),
    ("rs-appserver", "appserver"),
    ("rs-ctl", "appserver/rsctl"),
];

fn dependencies(dir: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(root().join(dir).join("Cargo.toml")).unwrap();
    let doc: toml::Table = text.parse().unwrap();
    doc.get("dependencies")
        .and_then(|d| d.as_table())
        .map(|t| t.keys().cloned().collect())
        .unwrap_or_default()
}

#[test]
fn crates_depend_only_on_the_layers_below_them() {
    // Each crate's allowed rs-* dependencies: the layering of ARCHITECTURE.md.
    let allowed: BTreeMap<&str, &[&str]> = BTreeMap::from([
        ("rs-protocol", &[][..]),
        ("rs-store", &["rs-protocol"][..]),
        ("rs-net", &["rs-protocol", "rs-store"][..]),
        ("rs-node", &["rs-protocol", "rs-store", "rs-net"][..]),
        (
            "rs-proxy",
            &["rs-protocol", "rs-store", "rs-net", "rs-node"][..],
        ),
        (
            "rs-mlm",
            &["rs-protocol", "rs-store", "rs-net", "rs-node"][..],
        ),
        (
            "rs-appserver",
            &["rs-protocol", "rs-store", "rs-net", "rs-node"][..],
        ),
        // The admin's command line links no server code.
        ("rs-ctl", &["rs-protocol", "rs-net"][..]),
    ]);
    for (name, dir) in CRATES {
        let deps = dependencies(dir);
        let ours: BTreeSet<&str> = deps
            .iter()
            .map(String::as_str)
            .filter(|d| d.starts_with("rs-"))
            .collect();
        let ok: BTreeSet<&str> = allowed[name].iter().copied().collect();
        let extra: Vec<_> = ours.difference(&ok).collect();
        assert!(
            extra.is_empty(),
            "{name} depends on {extra:?}, above or beside its layer"
        );
    }
    // The protocol does no I/O: none of the crates that do it.
    let io = [
        "tokio", "rusqlite", "openssl", "reqwest", "warp", "hyper", "rustix", "libc",
    ];
    let deps = dependencies("common/protocol");
    for d in io {
        assert!(
            !deps.contains(d),
            "rs-protocol depends on {d}; it must do no I/O"
        );
    }
}

/// The top-level modules of the crate in `src` that each one names with a
/// `crate::` path or in a `use crate::{...}` list (test modules and
/// comments left out; the crate root is not a module here).
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut files = vec![src.to_path_buf()];
    while let Some(p) = files.pop() {
        if p.is_dir() {
            files.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        if p.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let rel = p.strip_prefix(src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_owned();
        if module == "lib" || module == "main" || module == "bin" {
            continue;
        }
        let text = std::fs::read_to_string(&p).unwrap();
        let text = match text.find("#[cfg(test)]\nmod tests") {
            Some(i) => &text[..i],
            None => &text[..],
        };
        let code: String = text
            .lines()
            .map(|l| l.split("//").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        let names = graph.entry(module.clone()).or_default();
        let ident = |s: &str| -> String {
            s.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        };
        for (i, _) in code.match_indices("crate::") {
            let after = &code[i + "crate::".len()..];
            if let Some(list) = after.strip_prefix('{') {
                // use crate::{a::X, b, c::{..}}: the first name of each item.
                let mut depth = 0;
                let mut item_start = true;
                for (j, c) in list.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => item_start = true,
                        c if item_start && !c.is_whitespace() => {
                            item_start = false;
                            names.insert(ident(&list[j..]));
                        }
                        _ => {}
                    }
                }
            } else {
                names.insert(ident(after));
            }
        }
        names.remove(&module);
    }
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    for deps in graph.values_mut() {
        deps.retain(|d| modules.contains(d));
    }
    graph
}

/// A cycle in `graph`, if there is one (depth-first search).
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        g: &BTreeMap<String, BTreeSet<String>>,
        n: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == n) {
            let mut c = path[i..].to_vec();
            c.push(n.to_owned());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_owned());
        for d in &g[n] {
            if let Some(c) = visit(g, d, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for n in graph.keys() {
        if let Some(c) = visit(graph, n, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

#[test]
fn no_module_imports_a_module_that_imports_it() {
    for (name, dir) in CRATES {
        let graph = module_graph(&root().join(dir).join("src"));
        // rsctl is one module; every other crate has several.
        assert!(
            graph.len() > 1 || *name == "rs-ctl",
            "{name}: no modules found in {dir}/src"
        );
        if let Some(c) = find_cycle(&graph) {
            panic!("{name}: import cycle {}", c.join(" -> "));
        }
    }
    // The check itself finds a cycle when there is one.
    let g = BTreeMap::from([
        ("a".to_owned(), BTreeSet::from(["b".to_owned()])),
        ("b".to_owned(), BTreeSet::from(["a".to_owned()])),
    ]);
    assert!(find_cycle(&g).is_some());
}

#[test]
fn the_dtds_list_exactly_the_defined_control_actions() {
    let names: Vec<&str> = ActionKind::ALL.iter().map(|k| k.name()).collect();
    let want = format!("action  ({})", names.join("|"));
    for dtd in ["dtd/control.dtd", "dtd/control-api.dtd"] {
        let text = std::fs::read_to_string(root().join(dtd)).unwrap();
        assert!(text.contains(&want), "{dtd} does not list exactly {want}");
    }
    for k in ActionKind::ALL {
        assert_eq!(ActionKind::parse(k.name()), Some(*k));
    }
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(rust_files(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out
}

/// The application server's SQL is all in its storage code (`store/`, and
/// the schema in `schema.rs`): the rest calls the store's operations, so
/// an engine's differences and a farm's locking stay in one place.
#[test]
fn the_application_server_has_no_sql_outside_its_storage_code() {
    let src = root().join("appserver/src");
    let store = src.join("store");
    let mut found = Vec::new();
    for f in rust_files(&src) {
        if f.starts_with(&store) || f.ends_with("schema.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        for (i, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            if [
                "SELECT ",
                "INSERT INTO",
                "UPDATE ",
                "DELETE FROM",
                "CREATE TABLE",
            ]
            .iter()
            .any(|k| code.contains(k))
            {
                found.push(format!("{}:{}: {}", f.display(), i + 1, code));
            }
        }
    }
    assert!(
        found.is_empty(),
        "SQL outside appserver/src/store/:\n{}",
        found.join("\n")
    );
    // And the storage code is where the statements are.
    let stored: usize = rust_files(&store)
        .iter()
        .map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .matches("SELECT ")
                .count()
        })
        .sum();
    assert!(stored > 20, "only {stored} SELECTs under store/");
}
