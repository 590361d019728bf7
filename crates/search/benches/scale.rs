//! Ingestion and query speed at a city's scale (issue 5):
//!
//! `cargo bench -p search --bench scale -- ingest [pages]` — text-PDF pages per second end
//!   to end (extraction, chunking, normalisation, BM25 indexing), and indexing MB/s.
//! `cargo bench -p search --bench scale -- query [chunks]` — query latency p50/p99 over
//!   that many chunks (default 1,000,000, in 100 collections; each query may read 5 of
//!   them, so the permission filter is on), with the development set's questions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use search::{ChunkDoc, SearchIndex};
use std::time::Instant;

fn lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn jaquad() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/bench/jaquad-dev")
}

/// A small deterministic generator (no dependency needed for a benchmark).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

/// The product's second field when Debian's mecab-ipadic is installed; `BIGRAMS_ONLY=1`
/// measures without it.
fn morph() -> Option<std::sync::Arc<search::Morph>> {
    let dir = std::path::Path::new(search::Morph::DEBIAN_IPADIC);
    let on = dir.is_dir() && std::env::var_os("BIGRAMS_ONLY").is_none();
    eprintln!("morphological field: {}", if on { "on" } else { "off" });
    if !on {
        return None;
    }
    search::Morph::shared(dir)
        .map_err(|e| eprintln!("morphological field off: {e}"))
        .ok()
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn ingest(pages: usize) {
    let fixtures =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../documents/tests/fixtures");
    let pdfs: Vec<Vec<u8>> = ["kitei.pdf", "manual.pdf"]
        .iter()
        .map(|f| std::fs::read(fixtures.join(f)).unwrap())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let ix = SearchIndex::open(dir.path(), morph()).unwrap();
    let t = Instant::now();
    let (mut done, mut bytes, mut n) = (0usize, 0usize, 0usize);
    while done < pages {
        let pdf = &pdfs[n % pdfs.len()];
        n += 1;
        let kind = documents::detect(pdf, "a.pdf").unwrap();
        let ps = documents::extract_pages(pdf, kind).unwrap();
        done += ps.len();
        let chunks = documents::chunk::chunk_pages(&ps);
        let docs: Vec<ChunkDoc> = chunks
            .iter()
            .enumerate()
            .map(|(i, c)| ChunkDoc {
                chunk_id: format!("{n}-{i}"),
                document_id: n.to_string(),
                collection_id: "c".into(),
                text: documents::chunk::search_text(&c.text),
            })
            .collect();
        bytes += docs.iter().map(|d| d.text.len()).sum::<usize>();
        ix.add(&docs).unwrap();
        if n % 200 == 0 {
            ix.commit().unwrap();
        }
    }
    ix.commit().unwrap();
    let s = t.elapsed().as_secs_f64();
    println!(
        "ingest: {done} text-PDF pages in {s:.2} s = {:.0} pages/s; {:.1} MB of text indexed ({:.2} MB/s)",
        done as f64 / s,
        bytes as f64 / 1e6,
        bytes as f64 / 1e6 / s
    );
}

fn query(chunks: usize) {
    let corpus = lines(&jaquad().join("corpus.jsonl"));
    let sentences: Vec<String> = corpus
        .iter()
        .flat_map(|d| {
            d["text"]
                .as_str()
                .unwrap()
                .split_inclusive('。')
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .filter(|s| s.chars().count() > 10)
        .collect();
    let queries: Vec<String> = lines(&jaquad().join("queries.jsonl"))
        .iter()
        .take(1000)
        .map(|q| q["text"].as_str().unwrap().to_string())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let ix = SearchIndex::open(dir.path(), morph()).unwrap();
    let mut rng = Lcg(42);
    let t = Instant::now();
    let mut bytes = 0usize;
    let batch = 50_000;
    let mut i = 0;
    while i < chunks {
        let docs: Vec<ChunkDoc> = (i..(i + batch).min(chunks))
            .map(|k| {
                let text: String = (0..4)
                    .map(|_| sentences[rng.next() as usize % sentences.len()].as_str())
                    .collect();
                bytes += text.len();
                ChunkDoc {
                    chunk_id: k.to_string(),
                    document_id: (k / 20).to_string(),
                    collection_id: format!("c{}", k % 100),
                    text,
                }
            })
            .collect();
        ix.add(&docs).unwrap();
        ix.commit().unwrap();
        i += batch;
    }
    let index_s = t.elapsed().as_secs_f64();
    println!(
        "indexed {chunks} chunks ({:.0} MB of text) in {index_s:.0} s ({:.1} MB/s); {} in the index",
        bytes as f64 / 1e6,
        bytes as f64 / 1e6 / index_s,
        ix.len()
    );
    for (label, k) in [
        ("filter: 5 of 100 collections", 5usize),
        ("filter: all 100 collections", 100),
    ] {
        let mut lat = Vec::with_capacity(queries.len());
        let mut hits = 0usize;
        for (n, q) in queries.iter().enumerate() {
            let allowed: Vec<String> = (0..k)
                .map(|j| format!("c{}", (n * 7 + j * 13) % 100))
                .collect();
            let t = Instant::now();
            hits += ix.search(q, &allowed, 6).unwrap().len();
            lat.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        println!(
            "query ({label}): p50 {:.2} ms, p99 {:.2} ms over {} queries ({:.1} hits each)",
            pct(&mut lat, 0.5),
            pct(&mut lat, 0.99),
            queries.len(),
            hits as f64 / queries.len() as f64
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    match args.first().map(String::as_str) {
        Some("ingest") => ingest(args.get(1).and_then(|n| n.parse().ok()).unwrap_or(2_000)),
        Some("query") => query(
            args.get(1)
                .and_then(|n| n.parse().ok())
                .unwrap_or(1_000_000),
        ),
        _ => {
            ingest(2_000);
            query(1_000_000);
        }
    }
}
