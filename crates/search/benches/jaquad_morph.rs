//! The analyser comparison on jaquad-dev: character bigrams, morphemes (the product's
//! [`search::Morph`]: vibrato with IPADIC built from Debian's `mecab-ipadic` sources, no
//! download), and both fields together (what yakuba ships when the dictionary is there).
//! BM25 for each, with the product's query rules: hiragana-only bigrams dropped when three
//! or more others remain, hiragana-only morphemes when one content word does.
//!
//! `apt-get install mecab-ipadic`, then
//! `cargo bench -p search --features morph --bench jaquad_morph` (with `DUMP_RANKINGS=file`
//! it also writes the shipped ranking, top 100 per question, for `bench/use-hybrid`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use tantivy::collector::TopDocs;
use tantivy::query::{BooleanQuery, Occur, Query, TermQuery};
use tantivy::schema::{IndexRecordOption, Schema, Value, STORED, STRING, TEXT};
use tantivy::{doc, Index, TantivyDocument, Term};

fn lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn kana(t: &str) -> bool {
    t.chars().all(|c| ('\u{3040}'..='\u{309F}').contains(&c))
}

fn query_terms(mut terms: Vec<String>, others: usize) -> Vec<String> {
    terms.sort();
    terms.dedup();
    if terms.iter().filter(|t| !kana(t)).count() >= others {
        terms.retain(|t| !kana(t));
    }
    terms
}

fn main() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/bench/jaquad-dev");
    let corpus = lines(&dir.join("corpus.jsonl"));
    let queries = lines(&dir.join("queries.jsonl"));
    let qrels: HashMap<String, String> = lines(&dir.join("qrels.jsonl"))
        .into_iter()
        .map(|q| {
            (
                q["query_id"].as_str().unwrap().to_string(),
                q["corpus_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let t = std::time::Instant::now();
    let m = match search::Morph::from_ipadic(std::path::Path::new(search::Morph::DEBIAN_IPADIC)) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("{e} (apt-get install mecab-ipadic)");
            return;
        }
    };
    println!(
        "IPADIC dictionary built from mecab-ipadic sources in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let morph = |text: &str| m.terms(text);
    let mut b = Schema::builder();
    let id = b.add_text_field("id", STRING | STORED);
    let bi = b.add_text_field("bi", TEXT);
    let mo = b.add_text_field("mo", TEXT);
    let index = Index::create_in_ram(b.build());
    let mut w = index.writer_with_num_threads(1, 50_000_000).unwrap();
    for d in &corpus {
        let text = format!(
            "{}\n{}",
            d["title"].as_str().unwrap(),
            d["text"].as_str().unwrap()
        );
        // Pre-tokenised, one term per space-separated word (tantivy's default tokenizer).
        w.add_document(doc!(
            id => d["_id"].as_str().unwrap(),
            bi => search::analyse(&text).join(" "),
            mo => morph(&text).join(" "),
        ))
        .unwrap();
    }
    w.commit().unwrap();
    let reader = index.reader().unwrap();
    let searcher = reader.searcher();
    // The shipped ranking (both fields), top 100 per question, for fusion experiments.
    let mut dump = Vec::new();
    for (label, fields) in [
        ("character bigrams", vec![bi]),
        ("morphological (IPADIC, vibrato)", vec![mo]),
        ("both fields together", vec![bi, mo]),
    ] {
        let (mut r5, mut r10, mut mrr, mut n) = (0.0, 0.0, 0.0, 0.0);
        for q in &queries {
            let Some(want) = qrels.get(q["_id"].as_str().unwrap()) else {
                continue;
            };
            let text = q["text"].as_str().unwrap();
            let mut clauses: Vec<(Occur, Box<dyn Query>)> = Vec::new();
            for f in &fields {
                let terms = if *f == bi {
                    query_terms(search::analyse(text), 3)
                } else {
                    // As the product does: kana-only morphemes go once there is a content word.
                    query_terms(morph(text), 1)
                };
                for t in terms {
                    clauses.push((
                        Occur::Should,
                        Box::new(TermQuery::new(
                            Term::from_field_text(*f, &t),
                            IndexRecordOption::WithFreqs,
                        )),
                    ));
                }
            }
            n += 1.0;
            let top = searcher
                .search(
                    &BooleanQuery::new(clauses),
                    &TopDocs::with_limit(100).order_by_score(),
                )
                .unwrap();
            let ids: Vec<String> = top
                .iter()
                .map(|(_, a)| {
                    let d: TantivyDocument = searcher.doc(*a).unwrap();
                    d.get_first(id)
                        .and_then(|v| v.as_str())
                        .unwrap_or_default()
                        .to_string()
                })
                .collect();
            if fields.len() == 2 {
                dump.push(serde_json::json!({"q": q["_id"], "ids": ids.clone()}));
            }
            let ids: Vec<String> = ids.into_iter().take(10).collect();
            if let Some(rank) = ids.iter().position(|x| x == want) {
                if rank < 5 {
                    r5 += 1.0;
                }
                r10 += 1.0;
                mrr += 1.0 / (rank as f64 + 1.0);
            }
        }
        println!(
            "{label:34} recall@5 {:.4}  recall@10 {:.4}  MRR@10 {:.4}",
            r5 / n,
            r10 / n,
            mrr / n
        );
    }
    if let Some(path) = std::env::var_os("DUMP_RANKINGS") {
        std::fs::write(&path, serde_json::to_string(&dump).unwrap()).unwrap();
        println!(
            "rankings written to {}",
            std::path::Path::new(&path).display()
        );
    }
}
