//! The module graph stays layered and acyclic (`make check` runs this).
//!
//! Layers, top to bottom; a module may import from its own layer and those below, never
//! from above:
//!
//! | layer  | modules |
//! |---|---|
//! | shell  | `cli`, `server`, `bench`, `config` |
//! | edge   | `api`, `auth` |
//! | domain | `payments`, `finance`, `vault`, `ledger`, `processor`, `accounts` |
//! | infra  | `telemetry`, `store` |
//! | kernel | `kernel` |
//!
//! And: no cycle among the top-level modules, nor among the sibling modules of any
//! folder (a child may use what its parent declares: that is how Rust's module tree
//! works); no domain, infra or kernel file names `tonic`.
//!
//! And one home per table: every `INSERT INTO`, `UPDATE` and `DELETE FROM` of a table
//! is in the one module `TABLE_HOMES` names for it (a folder and what it holds); a
//! table missing from the list fails too, so a new table gets a home when it is made.
//! Finance names none of the ledger's tables: it reads the books through the ledger.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const LAYERS: &[(&str, &[&str])] = &[
    ("shell", &["cli", "server", "bench", "config"]),
    ("edge", &["api", "auth"]),
    ("domain", &["payments", "finance", "vault", "ledger", "processor", "accounts"]),
    ("infra", &["telemetry", "store"]),
    ("kernel", &["kernel"]),
];

/// Each table and the module (a folder under `src/`) that alone writes it.
const TABLE_HOMES: &[(&str, &str)] = &[
    ("accounts", "accounts"),
    ("audit_log", "accounts/audit.rs"),
    ("idempotency_keys", "ledger/engine/backend"),
    ("ledger_accounts", "ledger/engine/backend"),
    ("ledger_entries", "ledger/engine/backend"),
    ("ledger_postings", "ledger/engine/backend"),
    ("ledger_sequence", "ledger/engine/backend"),
    ("payment_event_sequence", "payments/repo"),
    ("payment_events", "payments/repo"),
    ("payment_methods", "vault"),
    ("payment_refunds", "payments/repo"),
    ("payment_requests", "payments/repo"),
    ("payment_spend", "payments/repo"),
    ("disputes", "payments/repo/disputes.rs"),
    ("listings", "payments/repo/shop"),
    ("purchase_refunds", "payments/repo/shop"),
    ("purchases", "payments/repo/shop"),
    ("listing_stock_adds", "payments/repo/shop"),
    ("outbox_cursors", "payments/outbox.rs"),
    ("stream_tabs", "payments/repo/tabs.rs"),
    ("payments", "payments/repo"),
    ("payouts", "payments/repo/payouts.rs"),
    ("processor_cursors", "payments/repo/payouts.rs"),
    ("recon_days", "finance/recon"),
    ("recon_items", "finance/recon"),
    ("recon_resolutions", "finance/recon"),
    ("recon_run_totals", "finance/recon"),
    ("recon_runs", "finance/recon"),
    ("sandbox_processor_calls", "processor/sandbox/mod.rs"),
    ("sandbox_processor_notifications", "processor/sandbox/payouts.rs"),
];

/// The tables a file's SQL writes: the word after `INSERT INTO`, `UPDATE` or
/// `DELETE FROM` (an `UPDATE SET` of an upsert names no table).
fn written_tables(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for verb in ["INSERT INTO ", "UPDATE ", "DELETE FROM "] {
        for (at, _) in text.match_indices(verb) {
            let rest = &text[at + verb.len()..];
            let table: String = rest.chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
            if !table.is_empty() {
                out.insert(table);
            }
        }
    }
    out
}

fn rank(top: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, mods)| mods.contains(&top))
}

/// Every `.rs` file under `dir`, with its module path (`ledger::engine::batch`).
fn modules(dir: &Path, prefix: &[String], out: &mut Vec<(Vec<String>, PathBuf)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for path in entries {
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        if path.is_dir() {
            let mut p = prefix.to_vec();
            p.push(name);
            modules(&path, &p, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let mut p = prefix.to_vec();
            if name != "mod" && !(prefix.is_empty() && (name == "lib" || name == "main")) {
                p.push(name);
            }
            if !p.is_empty() {
                out.push((p, path));
            }
        }
    }
}

/// The code of a file without comments (doc comments name modules freely).
fn code(text: &str) -> String {
    text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// The module paths a file refers to (`crate::a::b`, `super::c`), resolved against the
/// modules that exist, as deep as they go.
fn references(module: &[String], text: &str, known: &BTreeSet<Vec<String>>) -> BTreeSet<Vec<String>> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let ident = |i: usize| {
        let mut j = i;
        while j < bytes.len() && (bytes[j].is_ascii_alphanumeric() || bytes[j] == b'_' || bytes[j] == b':') {
            j += 1;
        }
        &text[i..j]
    };
    for (needle, base) in [("crate::", Vec::new()), ("super::", module[..module.len().saturating_sub(1)].to_vec())] {
        let mut from = 0;
        while let Some(pos) = text[from..].find(needle) {
            let start = from + pos;
            from = start + needle.len();
            if start > 0
                && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_' || bytes[start - 1] == b':')
            {
                continue;
            }
            let mut path = base.clone();
            let mut deepest = None;
            for seg in ident(from).split("::").filter(|s| !s.is_empty()) {
                path.push(seg.to_string());
                if known.contains(&path) {
                    deepest = Some(path.clone());
                }
            }
            if let Some(d) = deepest {
                out.insert(d);
            }
        }
    }
    out
}

fn cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for m in edges.get(n).into_iter().flatten() {
            match state.get(m.as_str()) {
                Some(1) => {
                    let at = stack.iter().position(|s| s == m).unwrap_or(0);
                    let mut c = stack[at..].to_vec();
                    c.push(m.clone());
                    return Some(c);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(m, edges, state, stack) {
                        return Some(c);
                    }
                }
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in edges.keys() {
        if !state.contains_key(n) {
            if let Some(c) = visit(n, edges, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn the_module_graph_is_layered_and_acyclic() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    modules(&src, &[], &mut files);
    let known: BTreeSet<Vec<String>> = files.iter().map(|(m, _)| m.clone()).collect();
    let mut problems = Vec::new();
    // Edges between siblings, by parent folder ("" for the top level).
    let mut siblings: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for (module, path) in &files {
        let text = code(&std::fs::read_to_string(path).unwrap());
        let top = &module[0];
        let Some(own) = rank(top) else {
            problems.push(format!("{}: module {top} has no layer in tests/layers.rs", path.display()));
            continue;
        };
        if own >= 2 && (text.contains("tonic::") || text.contains("use tonic")) {
            problems.push(format!("{}: a {} module names tonic", path.display(), LAYERS[own].0));
        }
        for target in references(module, &text, &known) {
            let target_rank = rank(&target[0]).unwrap_or(usize::MAX);
            if target_rank < own {
                problems.push(format!(
                    "{}: {} ({}) imports {} ({}), a layer above",
                    path.display(),
                    module.join("::"),
                    LAYERS[own].0,
                    target.join("::"),
                    LAYERS.get(target_rank).map_or("?", |l| l.0)
                ));
            }
            // The first segment where the two paths part: an edge between siblings,
            // unless the target is an ancestor of the module (a child using its parent).
            let common = module.iter().zip(&target).take_while(|(a, b)| a == b).count();
            if common < target.len() && common < module.len() {
                siblings
                    .entry(module[..common].join("::"))
                    .or_default()
                    .entry(module[common].clone())
                    .or_default()
                    .insert(target[common].clone());
            }
        }
    }
    for (parent, edges) in &siblings {
        if let Some(c) = cycle(edges) {
            let at = if parent.is_empty() { "the top level".to_string() } else { parent.clone() };
            problems.push(format!("a cycle among the modules of {at}: {}", c.join(" -> ")));
        }
    }
    assert!(problems.is_empty(), "{} problem(s):\n{}", problems.len(), problems.join("\n"));
}

#[test]
fn every_table_is_written_from_its_one_home() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    modules(&src, &[], &mut files);
    let homes: BTreeMap<&str, &str> = TABLE_HOMES.iter().copied().collect();
    let mut problems = Vec::new();
    for (_, path) in &files {
        let relative = path.strip_prefix(&src).unwrap().to_string_lossy().replace('\\', "/");
        let text = std::fs::read_to_string(path).unwrap();
        for table in written_tables(&text) {
            match homes.get(table.as_str()) {
                None => problems.push(format!("src/{relative} writes {table}, which has no home in TABLE_HOMES")),
                Some(home) if !(relative == *home || relative.starts_with(&format!("{home}/"))) => {
                    problems.push(format!("src/{relative} writes {table}, whose one home is src/{home}"))
                }
                Some(_) => {}
            }
        }
    }
    assert!(problems.is_empty(), "{} problem(s):\n{}", problems.len(), problems.join("\n"));
    // The check can fail: a file outside a table's home that writes it is caught.
    assert_eq!(
        written_tables("x INSERT INTO payments (a) y UPDATE payment_spend SET"),
        ["payment_spend", "payments"].map(String::from).into()
    );
}

/// Finance reads the books through the ledger's read side (`ledger::read::books`), never
/// the ledger's tables: their shape is the ledger's to change.
#[test]
fn finance_reads_the_books_through_the_ledger() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    modules(&src.join("finance"), &["finance".to_string()], &mut files);
    assert!(!files.is_empty());
    let mut problems = Vec::new();
    for (_, path) in &files {
        let text = std::fs::read_to_string(path).unwrap();
        for table in ["ledger_entries", "ledger_postings", "ledger_accounts", "ledger_sequence", "idempotency_keys"] {
            if text.contains(table) {
                problems.push(format!("{} names the ledger's table {table}", path.display()));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
