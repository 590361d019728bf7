//! Japanese full-text search over document chunks (M8): a BM25 index (tantivy) per tenant
//! with a Japanese analyser, searched only within the collections the caller may read —
//! the permission filter is part of the index query, never applied to results afterwards.
//!
//! The analyser ([`analyse`]) needs no dictionary: NFKC, lower case, then character
//! bigrams over runs of Japanese script (a single character stays a unigram) and whole
//! words for runs of Latin letters and digits. Bigrams find `マイナンバー` inside
//! `マイナンバーカード`, which a morphological analyser keeps as one token, and measured
//! within half a point of a morphological analyser on JSQuAD-like data. A question's
//! bigrams of hiragana only (です, ます…) are left out when it has enough other terms: on
//! the development set this raised recall a little and cut p99 latency over a million
//! chunks from 53 to 21 ms (`benches/jaquad.rs`, `benches/scale.rs`).
//!
//! When an IPADIC dictionary is there ([`Morph`], built in about a second from Debian's
//! `mecab-ipadic` sources), passages are also indexed by morphemes in a second field and
//! a query asks both: on the development set recall@5 rose from 0.962 to 0.973 and MRR@10
//! from 0.891 to 0.908 (`benches/jaquad_morph.rs`), where either alone scored lower.
//!
//! Passage embeddings, when an embedding model is configured, are searched in
//! [`vectors`] and fused with BM25 by reciprocal rank ([`vectors::rrf`]).

pub mod vectors;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tantivy::collector::TopDocs;
use tantivy::query::{BooleanQuery, ConstScoreQuery, Occur, Query, TermQuery, TermSetQuery};
#[cfg(test)]
use tantivy::schema::TEXT;
use tantivy::schema::{
    Field, IndexRecordOption, Schema, TextFieldIndexing, TextOptions, Value, STORED, STRING,
};
use tantivy::tokenizer::{TextAnalyzer, Token, TokenStream, Tokenizer};
use tantivy::{doc, Index, IndexReader, IndexWriter, ReloadPolicy, TantivyDocument, Term};
use unicode_normalization::UnicodeNormalization;

#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    #[error("index error: {0}")]
    Index(#[from] tantivy::TantivyError),
    #[error("index directory: {0}")]
    Dir(String),
    #[error("index lock poisoned")]
    Poisoned,
    /// The index on disk was made without a field this version has: rebuild it.
    #[error("the index was built by an earlier version and must be rebuilt")]
    OldSchema,
    #[error("dictionary: {0}")]
    Dictionary(String),
    /// A vector of other dimensions than the set's (the embedding model was changed).
    #[error("vector of {got} dimensions where {expected} are expected")]
    Dimensions { expected: usize, got: usize },
}

pub type Result<T, E = SearchError> = std::result::Result<T, E>;

const TOKENIZER: &str = "ja_bigram";
const MORPH_TOKENIZER: &str = "ja_morph";

/// A Japanese morphological analyser (vibrato) over an IPADIC dictionary.
pub struct Morph {
    tok: vibrato::Tokenizer,
}

impl Morph {
    /// Where Debian's `mecab-ipadic` puts the dictionary sources.
    pub const DEBIAN_IPADIC: &'static str = "/usr/share/mecab/dic/ipadic";

    /// Builds the dictionary from MeCab IPADIC sources (EUC-JP `*.csv`, `matrix.def`,
    /// `char.def`, `unk.def`) in `dir`.
    pub fn from_ipadic(dir: &Path) -> Result<Morph> {
        let err = |e: String| SearchError::Dictionary(format!("{}: {e}", dir.display()));
        let euc = |p: PathBuf| -> Result<String> {
            let bytes = std::fs::read(&p).map_err(|e| err(format!("{}: {e}", p.display())))?;
            Ok(encoding_rs::EUC_JP.decode(&bytes).0.into_owned())
        };
        let mut csvs: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| err(e.to_string()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "csv"))
            .collect();
        if csvs.is_empty() {
            return Err(err("no lexicon (*.csv)".into()));
        }
        csvs.sort();
        let mut lexicon = String::new();
        for p in csvs {
            lexicon.push_str(&euc(p)?);
            if !lexicon.ends_with('\n') {
                lexicon.push('\n');
            }
        }
        let dict = vibrato::SystemDictionaryBuilder::from_readers(
            lexicon.as_bytes(),
            euc(dir.join("matrix.def"))?.as_bytes(),
            euc(dir.join("char.def"))?.as_bytes(),
            euc(dir.join("unk.def"))?.as_bytes(),
        )
        .map_err(|e| err(e.to_string()))?;
        Ok(Morph {
            tok: vibrato::Tokenizer::new(dict),
        })
    }

    /// The dictionary in `dir`, built once per process (about a second; tests and the
    /// command line open many indexes).
    pub fn shared(dir: &Path) -> Result<Arc<Morph>> {
        static BUILT: Mutex<Vec<(PathBuf, Arc<Morph>)>> = Mutex::new(Vec::new());
        let mut built = BUILT.lock().map_err(|_| SearchError::Poisoned)?;
        if let Some((_, m)) = built.iter().find(|(p, _)| p == dir) {
            return Ok(m.clone());
        }
        let m = Arc::new(Morph::from_ipadic(dir)?);
        built.push((dir.to_path_buf(), m.clone()));
        Ok(m)
    }

    /// The morphemes of `text` (NFKC, lower case), leaving out punctuation and symbols.
    pub fn terms(&self, text: &str) -> Vec<String> {
        let norm: String = text.nfkc().flat_map(char::to_lowercase).collect();
        let mut w = self.tok.new_worker();
        w.reset_sentence(&norm);
        w.tokenize();
        (0..w.num_tokens())
            .map(|i| w.token(i).surface().to_string())
            .filter(|s| s.chars().any(char::is_alphanumeric))
            .collect()
    }
}

/// Query terms: deduplicated, and kana-only ones left out when there are at least
/// `others` other terms (their postings are the longest and say the least). For bigrams
/// that takes three others; kana-only morphemes are particles and endings (の, は, ます),
/// dropped as soon as the question has one content word.
fn query_terms(mut terms: Vec<String>, others: usize) -> Vec<String> {
    terms.sort();
    terms.dedup();
    let kana = |t: &String| t.chars().all(|c| ('\u{3040}'..='\u{309F}').contains(&c));
    if terms.iter().filter(|t| !kana(t)).count() >= others {
        terms.retain(|t| !kana(t));
    }
    terms
}

/// The morphological field's analyser; without a dictionary it yields nothing.
#[derive(Clone)]
struct MorphTokenizer(Option<Arc<Morph>>);

impl Tokenizer for MorphTokenizer {
    type TokenStream<'a> = Tokens;
    fn token_stream<'a>(&'a mut self, text: &'a str) -> Tokens {
        Tokens::of(self.0.as_ref().map(|m| m.terms(text)).unwrap_or_default())
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Japanese,
    Word,
    Other,
}

fn class(c: char) -> Class {
    if c.is_ascii_alphanumeric() {
        return Class::Word;
    }
    let u = c as u32;
    let japanese = matches!(u,
        0x3040..=0x30FF   // hiragana, katakana (with ー)
        | 0x3400..=0x4DBF // CJK extension A
        | 0x4E00..=0x9FFF // CJK unified ideographs
        | 0xF900..=0xFAFF // compatibility ideographs
        | 0x20000..=0x3FFFF
        | 0x3005 | 0x3006 | 0x3007 // 々 〆 〇
    );
    if japanese {
        Class::Japanese
    } else if c.is_alphanumeric() {
        Class::Word
    } else {
        Class::Other
    }
}

/// The terms of `text`, in order: what is indexed and what a query looks for.
pub fn analyse(text: &str) -> Vec<String> {
    let norm: String = text.nfkc().flat_map(char::to_lowercase).collect();
    let chars: Vec<char> = norm.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let k = class(chars[i]);
        let mut j = i;
        while j < chars.len() && class(chars[j]) == k {
            j += 1;
        }
        match k {
            Class::Japanese => {
                if j - i == 1 {
                    out.push(chars[i].to_string());
                } else {
                    for w in chars[i..j].windows(2) {
                        out.push(w.iter().collect());
                    }
                }
            }
            Class::Word => out.push(chars[i..j].iter().collect()),
            Class::Other => {}
        }
        i = j;
    }
    out
}

#[derive(Clone, Default)]
struct BigramTokenizer;

struct Tokens {
    tokens: Vec<Token>,
    at: usize,
}

impl Tokens {
    /// A stream of already analysed terms, one position each.
    fn of(terms: Vec<String>) -> Tokens {
        let tokens = terms
            .into_iter()
            .enumerate()
            .map(|(position, text)| Token {
                offset_from: 0,
                offset_to: 0,
                position,
                text,
                position_length: 1,
            })
            .collect();
        Tokens { tokens, at: 0 }
    }
}

impl TokenStream for Tokens {
    fn advance(&mut self) -> bool {
        if self.at < self.tokens.len() {
            self.at += 1;
            true
        } else {
            false
        }
    }
    fn token(&self) -> &Token {
        &self.tokens[self
            .at
            .saturating_sub(1)
            .min(self.tokens.len().saturating_sub(1))]
    }
    fn token_mut(&mut self) -> &mut Token {
        let i = self
            .at
            .saturating_sub(1)
            .min(self.tokens.len().saturating_sub(1));
        &mut self.tokens[i]
    }
}

impl Tokenizer for BigramTokenizer {
    type TokenStream<'a> = Tokens;
    fn token_stream<'a>(&'a mut self, text: &'a str) -> Tokens {
        Tokens::of(analyse(text))
    }
}

/// One passage to index.
#[derive(Clone, Debug)]
pub struct ChunkDoc {
    pub chunk_id: String,
    pub document_id: String,
    pub collection_id: String,
    /// The text to search: the passage, normalised for search by the caller.
    pub text: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Hit {
    pub chunk_id: String,
    pub document_id: String,
    pub score: f32,
}

#[derive(Clone, Copy)]
struct Fields {
    chunk: Field,
    document: Field,
    collection: Field,
    text: Field,
    morph: Field,
}

/// A tenant's index. Writes are buffered until [`SearchIndex::commit`].
pub struct SearchIndex {
    writer: Mutex<IndexWriter>,
    reader: IndexReader,
    f: Fields,
    morph: Option<Arc<Morph>>,
}

fn schema() -> (Schema, Fields) {
    let mut b = Schema::builder();
    let chunk = b.add_text_field("chunk_id", STRING | STORED);
    let document = b.add_text_field("document_id", STRING | STORED);
    let collection = b.add_text_field("collection_id", STRING);
    let text = b.add_text_field(
        "text",
        TextOptions::default().set_indexing_options(
            TextFieldIndexing::default()
                .set_tokenizer(TOKENIZER)
                .set_index_option(IndexRecordOption::WithFreqsAndPositions),
        ),
    );
    let morph = b.add_text_field(
        "morph",
        TextOptions::default().set_indexing_options(
            TextFieldIndexing::default()
                .set_tokenizer(MORPH_TOKENIZER)
                .set_index_option(IndexRecordOption::WithFreqs),
        ),
    );
    (
        b.build(),
        Fields {
            chunk,
            document,
            collection,
            text,
            morph,
        },
    )
}

impl SearchIndex {
    /// Opens the index in `dir`, creating it when the directory is empty or missing.
    /// With `morph`, passages are also indexed by morphemes and queries use both fields.
    /// An index made by an earlier version is [`SearchError::OldSchema`].
    pub fn open(dir: &Path, morph: Option<Arc<Morph>>) -> Result<SearchIndex> {
        std::fs::create_dir_all(dir).map_err(|e| SearchError::Dir(e.to_string()))?;
        let (schema, f) = schema();
        let mmap = tantivy::directory::MmapDirectory::open(dir)
            .map_err(|e| SearchError::Dir(e.to_string()))?;
        let index = match Index::open_or_create(mmap, schema) {
            Ok(i) => i,
            Err(tantivy::TantivyError::SchemaError(_)) => return Err(SearchError::OldSchema),
            Err(e) => return Err(e.into()),
        };
        Self::with(index, f, morph)
    }

    /// An index in memory (tests, benchmarks).
    pub fn in_memory(morph: Option<Arc<Morph>>) -> Result<SearchIndex> {
        let (schema, f) = schema();
        Self::with(Index::create_in_ram(schema), f, morph)
    }

    fn with(index: Index, f: Fields, morph: Option<Arc<Morph>>) -> Result<SearchIndex> {
        index
            .tokenizers()
            .register(TOKENIZER, TextAnalyzer::from(BigramTokenizer));
        index.tokenizers().register(
            MORPH_TOKENIZER,
            TextAnalyzer::from(MorphTokenizer(morph.clone())),
        );
        let writer = index.writer_with_num_threads(1, 50_000_000)?;
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()?;
        Ok(SearchIndex {
            writer: Mutex::new(writer),
            reader,
            f,
            morph,
        })
    }

    pub fn add(&self, docs: &[ChunkDoc]) -> Result<()> {
        let w = self.writer.lock().map_err(|_| SearchError::Poisoned)?;
        for d in docs {
            w.add_document(doc!(
                self.f.chunk => d.chunk_id.as_str(),
                self.f.document => d.document_id.as_str(),
                self.f.collection => d.collection_id.as_str(),
                self.f.text => d.text.as_str(),
                self.f.morph => d.text.as_str(),
            ))?;
        }
        Ok(())
    }

    pub fn delete_document(&self, document_id: &str) -> Result<()> {
        let w = self.writer.lock().map_err(|_| SearchError::Poisoned)?;
        w.delete_term(Term::from_field_text(self.f.document, document_id));
        Ok(())
    }

    /// Removes everything (then `add` and `commit` to rebuild).
    pub fn clear(&self) -> Result<()> {
        let w = self.writer.lock().map_err(|_| SearchError::Poisoned)?;
        w.delete_all_documents()?;
        Ok(())
    }

    pub fn delete_collection(&self, collection_id: &str) -> Result<()> {
        let w = self.writer.lock().map_err(|_| SearchError::Poisoned)?;
        w.delete_term(Term::from_field_text(self.f.collection, collection_id));
        Ok(())
    }

    /// Makes everything added or deleted so far durable and visible to searches.
    pub fn commit(&self) -> Result<()> {
        let mut w = self.writer.lock().map_err(|_| SearchError::Poisoned)?;
        w.commit()?;
        drop(w);
        self.reader.reload()?;
        Ok(())
    }

    /// The chunk ids a document has in the index (committed), sorted.
    pub fn chunk_ids_of(&self, document_id: &str) -> Result<Vec<String>> {
        let searcher = self.reader.searcher();
        let q = TermQuery::new(
            Term::from_field_text(self.f.document, document_id),
            IndexRecordOption::Basic,
        );
        let found = searcher.search(&q, &tantivy::collector::DocSetCollector)?;
        let mut ids = Vec::with_capacity(found.len());
        for addr in found {
            let d: TantivyDocument = searcher.doc(addr)?;
            if let Some(id) = d.get_first(self.f.chunk).and_then(|v| v.as_str()) {
                ids.push(id.to_string());
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// Chunks in the index (committed).
    pub fn len(&self) -> u64 {
        self.reader.searcher().num_docs()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The best `k` chunks for `query` among the chunks of `collections` only.
    pub fn search(&self, query: &str, collections: &[String], k: usize) -> Result<Vec<Hit>> {
        if collections.is_empty() || k == 0 {
            return Ok(Vec::new());
        }
        // Bigrams of kana only (です, ます, には…) are in most passages: their postings are
        // the longest and say the least. A question with enough other terms leaves them out.
        let mut fields = vec![(self.f.text, query_terms(analyse(query), 3))];
        if let Some(m) = &self.morph {
            fields.push((self.f.morph, query_terms(m.terms(query), 1)));
        }
        let text: Vec<(Occur, Box<dyn Query>)> = fields
            .iter()
            .flat_map(|(field, terms)| {
                terms.iter().map(move |t| {
                    let q: Box<dyn Query> = Box::new(TermQuery::new(
                        Term::from_field_text(*field, t),
                        IndexRecordOption::WithFreqs,
                    ));
                    (Occur::Should, q)
                })
            })
            .collect();
        if text.is_empty() {
            return Ok(Vec::new());
        }
        let allowed = TermSetQuery::new(
            collections
                .iter()
                .map(|c| Term::from_field_text(self.f.collection, c)),
        );
        let q = BooleanQuery::new(vec![
            (
                Occur::Must,
                Box::new(BooleanQuery::new(text)) as Box<dyn Query>,
            ),
            (
                Occur::Must,
                Box::new(ConstScoreQuery::new(Box::new(allowed), 0.0)),
            ),
        ]);
        let searcher = self.reader.searcher();
        let top = searcher.search(&q, &TopDocs::with_limit(k).order_by_score())?;
        let mut hits = Vec::with_capacity(top.len());
        for (score, addr) in top {
            let d: TantivyDocument = searcher.doc(addr)?;
            let get = |f: Field| {
                d.get_first(f)
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_string()
            };
            hits.push(Hit {
                chunk_id: get(self.f.chunk),
                document_id: get(self.f.document),
                score,
            });
        }
        Ok(hits)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn bigrams_for_japanese_words_for_the_rest() {
        assert_eq!(analyse("東大寺"), ["東大", "大寺"]);
        assert_eq!(analyse("市"), ["市"]);
        assert_eq!(
            analyse("ＡＢＣ市の2025年度予算"),
            ["abc", "市の", "2025", "年度", "度予", "予算"]
        );
        // Half-width katakana becomes full width (NFKC).
        assert_eq!(analyse("ﾏｲﾅﾝﾊﾞｰ"), analyse("マイナンバー"));
        assert!(analyse("マイナンバーカード").contains(&"ナン".to_string()));
        assert!(analyse("、。！？ ").is_empty());
    }

    fn chunk(id: &str, collection: &str, text: &str) -> ChunkDoc {
        ChunkDoc {
            chunk_id: id.into(),
            document_id: format!("doc-{id}"),
            collection_id: collection.into(),
            text: text.into(),
        }
    }

    #[test]
    fn search_ranks_and_stays_inside_the_collections_given() {
        let ix = SearchIndex::in_memory(None).unwrap();
        ix.add(&[
            chunk(
                "1",
                "zeimu",
                "住民税の減免は、災害や失業で納税が困難な場合に申請できます。",
            ),
            chunk("2", "zeimu", "固定資産税の納期は年4回です。"),
            chunk(
                "3",
                "fukushi",
                "介護保険の減免は福祉課が担当します。住民税の減免とは別です。",
            ),
        ])
        .unwrap();
        ix.commit().unwrap();
        assert_eq!(ix.len(), 3);
        let hits = ix.search("住民税の減免", &["zeimu".into()], 10).unwrap();
        assert_eq!(hits[0].chunk_id, "1");
        assert!(hits.iter().all(|h| h.chunk_id != "3"), "{hits:?}");
        let both = ix
            .search("住民税の減免", &["zeimu".into(), "fukushi".into()], 10)
            .unwrap();
        assert!(both.iter().any(|h| h.chunk_id == "3"));
        assert!(ix.search("住民税", &[], 10).unwrap().is_empty());
        assert!(ix.search("。", &["zeimu".into()], 10).unwrap().is_empty());
        ix.delete_document("doc-1").unwrap();
        ix.commit().unwrap();
        let hits = ix.search("住民税の減免", &["zeimu".into()], 10).unwrap();
        assert!(hits.iter().all(|h| h.chunk_id != "1"));
    }

    #[test]
    fn the_index_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let ix = SearchIndex::open(dir.path(), None).unwrap();
            ix.add(&[chunk("1", "c", "議会の会議録")]).unwrap();
            ix.commit().unwrap();
        }
        let ix = SearchIndex::open(dir.path(), None).unwrap();
        assert_eq!(ix.search("会議録", &["c".into()], 5).unwrap().len(), 1);
    }

    fn ipadic() -> Option<Arc<Morph>> {
        let dir = Path::new(Morph::DEBIAN_IPADIC);
        if dir.is_dir() {
            Some(Arc::new(Morph::from_ipadic(dir).unwrap()))
        } else {
            eprintln!(
                "SKIPPED: no IPADIC at {} (apt-get install mecab-ipadic)",
                dir.display()
            );
            None
        }
    }

    #[test]
    fn morphemes_are_a_second_field() {
        let Some(m) = ipadic() else { return };
        assert_eq!(
            m.terms("住民票の写しを交付する。"),
            ["住民", "票", "の", "写し", "を", "交付", "する"]
        );
        let ix = SearchIndex::in_memory(Some(m)).unwrap();
        ix.add(&[
            chunk("a", "c1", "住民票の写しは市民課の窓口で交付します。"),
            chunk("b", "c1", "粗大ごみは事前に申し込んでください。"),
        ])
        .unwrap();
        ix.commit().unwrap();
        let hits = ix
            .search("写しはどこで交付されますか", &["c1".to_string()], 5)
            .unwrap();
        assert_eq!(hits[0].chunk_id, "a");
        // The morph field alone finds a passage: 写し is one morpheme, and its bigram too.
        let q = TermQuery::new(
            Term::from_field_text(ix.f.morph, "交付"),
            IndexRecordOption::Basic,
        );
        assert_eq!(
            ix.reader
                .searcher()
                .search(&q, &tantivy::collector::Count)
                .unwrap(),
            1
        );
        // The permission filter still holds.
        assert!(ix
            .search("写しはどこで交付されますか", &["c2".to_string()], 5)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn a_bad_dictionary_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = Morph::from_ipadic(dir.path()).err().unwrap();
        assert!(e.to_string().contains("no lexicon"), "{e}");
    }

    #[test]
    fn an_index_without_the_morph_field_asks_to_be_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        // An index as the previous version wrote it: the same fields less "morph".
        let mut b = Schema::builder();
        b.add_text_field("chunk_id", STRING | STORED);
        b.add_text_field("document_id", STRING | STORED);
        b.add_text_field("collection_id", STRING);
        b.add_text_field("text", TEXT);
        Index::create_in_dir(dir.path(), b.build()).unwrap();
        assert!(matches!(
            SearchIndex::open(dir.path(), None),
            Err(SearchError::OldSchema)
        ));
    }
}
