//! Retrieval quality on the Japanese development set (`../shared/bench/jaquad-dev`):
//! recall@5, recall@10 and MRR@10 of the index as yakuba builds it, and query latency.
//!
//! `cargo bench -p search --bench jaquad [-- <path to jaquad-dev>]`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use search::{ChunkDoc, SearchIndex};
use std::collections::HashMap;
use std::time::Instant;

fn lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn main() {
    let dir = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../../shared/bench/jaquad-dev")
        });
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
    let ix = SearchIndex::in_memory(None).unwrap();
    let t = Instant::now();
    let docs: Vec<ChunkDoc> = corpus
        .iter()
        .map(|d| ChunkDoc {
            chunk_id: d["_id"].as_str().unwrap().to_string(),
            document_id: d["_id"].as_str().unwrap().to_string(),
            collection_id: "bench".into(),
            // As yakuba indexes a chunk: its heading (here the title) with the text.
            text: format!(
                "{}\n{}",
                d["title"].as_str().unwrap(),
                d["text"].as_str().unwrap()
            ),
        })
        .collect();
    let bytes: usize = docs.iter().map(|d| d.text.len()).sum();
    ix.add(&docs).unwrap();
    ix.commit().unwrap();
    let index_s = t.elapsed().as_secs_f64();
    let collections = vec!["bench".to_string()];
    let (mut r5, mut r10, mut mrr, mut n) = (0.0, 0.0, 0.0, 0.0);
    let mut lat = Vec::with_capacity(queries.len());
    for q in &queries {
        let id = q["_id"].as_str().unwrap();
        let Some(want) = qrels.get(id) else { continue };
        let t = Instant::now();
        let hits = ix
            .search(q["text"].as_str().unwrap(), &collections, 10)
            .unwrap();
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        n += 1.0;
        if let Some(rank) = hits.iter().position(|h| &h.chunk_id == want) {
            if rank < 5 {
                r5 += 1.0;
            }
            r10 += 1.0;
            mrr += 1.0 / (rank as f64 + 1.0);
        }
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "jaquad-dev: {} paragraphs ({:.1} MB), {} queries",
        corpus.len(),
        bytes as f64 / 1e6,
        n
    );
    println!("analyser: character bigrams (NFKC, lower case), BM25");
    println!(
        "recall@5 {:.4}  recall@10 {:.4}  MRR@10 {:.4}",
        r5 / n,
        r10 / n,
        mrr / n
    );
    println!(
        "indexing {:.2} s ({:.1} MB/s); query p50 {:.2} ms, p99 {:.2} ms",
        index_s,
        bytes as f64 / 1e6 / index_s,
        pct(0.5),
        pct(0.99)
    );
}
