//! Ingestion and query speed at a city's scale (issue 5):
//!
//! `cargo bench -p search --bench scale -- ingest [pages]` — text-PDF pages per second end
//!   to end (extraction, chunking, normalisation, BM25 indexing), and indexing MB/s.
//! `cargo bench -p search --bench scale -- query [chunks]` — query latency p50/p99 over
//!   that many chunks (default 1,000,000, in 100 collections; each query may read 5 of
//!   them, so the permission filter is on), with the development set's questions.
//! `cargo bench -p search --bench scale -- vectors [n] [dims]` — vector search latency and
//!   the recall of its sign-bit pass (default 1,000,000 vectors of 512 dimensions).
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

/// Vector search over `n` passages of `dims` dimensions in 100 collections, as the
/// product runs it (i8 vectors, sign-bit pass, exact rescoring): latency p50/p99 with the
/// permission filter (5 collections) and over all, and recall@10 of the sign-bit pass
/// against an exact scan of the same vectors. The vectors are clustered (2,000 topics plus
/// noise), as real passage embeddings are, not uniform noise.
fn vectors(n: usize, dims: usize) {
    use search::vectors::{Quantized, VectorDoc, VectorSet, EXACT_LIMIT};
    let mut rng = Lcg(42);
    let mut gauss = move || {
        // Sum of uniforms: near enough to normal for a benchmark.
        (0..6)
            .map(|_| rng.next() as f32 / (1u64 << 31) as f32)
            .sum::<f32>()
            - 3.0
    };
    let topics: Vec<Vec<f32>> = (0..2_000)
        .map(|_| (0..dims).map(|_| gauss()).collect())
        .collect();
    let near = |t: &[f32], g: &mut dyn FnMut() -> f32| -> Vec<f32> {
        t.iter().map(|x| x + 0.8 * g()).collect()
    };
    let t = Instant::now();
    let set = VectorSet::new("bench");
    let mut batch = Vec::with_capacity(10_000);
    for i in 0..n {
        let v = near(&topics[i % topics.len()], &mut gauss);
        batch.push(VectorDoc {
            chunk_id: i.to_string(),
            document_id: (i / 20).to_string(),
            collection_id: format!("c{}", i % 100),
            vector: Quantized::from_f32(&v).unwrap(),
        });
        if batch.len() == 10_000 {
            set.add(&batch).unwrap();
            batch.clear();
        }
    }
    set.add(&batch).unwrap();
    println!(
        "{n} vectors of {dims} dimensions loaded in {:.1} s ({} MB as i8)",
        t.elapsed().as_secs_f64(),
        n * (dims + dims / 8 + 4) / 1_000_000
    );
    let all: Vec<String> = (0..100).map(|c| format!("c{c}")).collect();
    let queries: Vec<Vec<f32>> = (0..500)
        .map(|i| near(&topics[(i * 7) % topics.len()], &mut gauss))
        .collect();
    for (label, pick) in [
        ("5 of 100 collections", 5usize),
        ("all 100 collections", 100),
    ] {
        let mut ms = Vec::new();
        for (i, q) in queries.iter().enumerate() {
            let cols: Vec<String> = (0..pick).map(|j| all[(i + j * 17) % 100].clone()).collect();
            let t = Instant::now();
            let hits = set.search(q, &cols, 20).unwrap();
            ms.push(t.elapsed().as_secs_f64() * 1e3);
            assert!(!hits.is_empty());
        }
        println!(
            "vector query, {label}: p50 {:.2} ms, p99 {:.2} ms",
            pct(&mut ms.clone(), 0.5),
            pct(&mut ms, 0.99)
        );
    }
    // Recall of the sign-bit pass: the same vectors scored exactly (by a set small enough
    // to be scanned whole, one collection at a time) against what the search returned.
    let (mut found, mut wanted) = (0usize, 0usize);
    for q in queries.iter().take(100) {
        let got: std::collections::HashSet<String> = set
            .search(q, &all, 10)
            .unwrap()
            .into_iter()
            .map(|h| h.chunk_id)
            .collect();
        let mut exact: Vec<search::Hit> = Vec::new();
        for c in &all {
            exact.extend(set.search(q, std::slice::from_ref(c), 10).unwrap());
        }
        exact.sort_by(|a, b| b.score.total_cmp(&a.score));
        wanted += 10;
        found += exact
            .iter()
            .take(10)
            .filter(|h| got.contains(&h.chunk_id))
            .count();
    }
    println!(
        "recall@10 of the sign-bit pass against an exact scan: {:.3} (collections of {} vectors are scanned exactly; limit {EXACT_LIMIT})",
        found as f64 / wanted as f64,
        n / 100
    );
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
        Some("vectors") => vectors(
            args.get(1)
                .and_then(|n| n.parse().ok())
                .unwrap_or(1_000_000),
            args.get(2).and_then(|n| n.parse().ok()).unwrap_or(512),
        ),
        _ => {
            ingest(2_000);
            query(1_000_000);
        }
    }
}
