//! SentencePiece (BPE by scores) tokenizer built from GGUF metadata, the way llama.cpp reads
//! `tokenizer.ggml.model = "llama"` vocabularies (Gemma, Llama 2, Mistral): spaces become
//! `▁`, neighbouring pieces merge by the highest vocabulary score (ties: leftmost first),
//! pieces without a token fall back to `<0xXX>` byte tokens, and special tokens in the text
//! are recognised before any of that (user-defined ones always, control ones on request).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
pub const TYPE_NORMAL: i32 = 1;
pub const TYPE_UNKNOWN: i32 = 2;
pub const TYPE_CONTROL: i32 = 3;
pub const TYPE_USER_DEFINED: i32 = 4;
pub const TYPE_BYTE: i32 = 6;

pub struct Spm {
    tokens: Vec<String>,
    scores: Vec<f32>,
    types: Vec<i32>,
    index: HashMap<String, u32>,
    bytes: [Option<u32>; 256],
    unk: Option<u32>,
    add_space_prefix: bool,
    /// Special tokens that may appear in text, longest first (ties: lower id first).
    specials: Vec<(u32, bool)>,
}

impl Spm {
    pub fn new(
        tokens: Vec<String>,
        scores: Vec<f32>,
        types: Vec<i32>,
        unk: Option<u32>,
        add_space_prefix: bool,
    ) -> Result<Spm, String> {
        if tokens.is_empty() {
            return Err("the vocabulary is empty".into());
        }
        if scores.len() != tokens.len() || types.len() != tokens.len() {
            return Err(format!(
                "the vocabulary has {} tokens but {} scores and {} types",
                tokens.len(),
                scores.len(),
                types.len()
            ));
        }
        let mut index = HashMap::with_capacity(tokens.len());
        let mut bytes = [None; 256];
        let mut specials = Vec::new();
        for (i, t) in tokens.iter().enumerate() {
            let id = i as u32;
            index.entry(t.clone()).or_insert(id);
            match types[i] {
                TYPE_BYTE => {
                    if let Some(b) = t
                        .strip_prefix("<0x")
                        .and_then(|h| h.strip_suffix('>'))
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                    {
                        bytes[b as usize] = Some(id);
                    }
                }
                TYPE_CONTROL | TYPE_UNKNOWN if !t.is_empty() => specials.push((id, true)),
                TYPE_USER_DEFINED if !t.is_empty() => specials.push((id, false)),
                _ => {}
            }
        }
        specials.sort_by(|a, b| {
            tokens[b.0 as usize]
                .len()
                .cmp(&tokens[a.0 as usize].len())
                .then(a.0.cmp(&b.0))
        });
        Ok(Spm {
            tokens,
            scores,
            types,
            index,
            bytes,
            unk,
            add_space_prefix,
            specials,
        })
    }

    pub fn token_text(&self, id: u32) -> &str {
        self.tokens.get(id as usize).map_or("", String::as_str)
    }

    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.index.get(text).copied()
    }

    /// Token ids for `text`, without BOS. With `parse_special`, control tokens written in
    /// the text (`<start_of_turn>`) become their ids; without it only user-defined ones do,
    /// so text typed by a user cannot forge a turn marker.
    pub fn encode(&self, text: &str, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::new();
        let mut prev_special = true;
        for frag in self.partition(text, parse_special) {
            match frag {
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text(t) => {
                    let mut s = String::with_capacity(t.len() + 3);
                    if self.add_space_prefix && prev_special {
                        s.push(' ');
                    }
                    s.push_str(t);
                    let escaped = s.replace(' ', "\u{2581}");
                    self.encode_piece(&escaped, &mut out);
                    prev_special = false;
                }
            }
        }
        out
    }

    /// The bytes a token stands for when shown: `▁` as a space, byte tokens as their byte,
    /// control tokens (turn markers, BOS, EOS) as nothing.
    pub fn piece(&self, id: u32) -> Vec<u8> {
        let Some(t) = self.tokens.get(id as usize) else {
            return Vec::new();
        };
        match self.types[id as usize] {
            TYPE_NORMAL => t.replace('\u{2581}', " ").into_bytes(),
            TYPE_USER_DEFINED => t.as_bytes().to_vec(),
            TYPE_BYTE => self
                .bytes
                .iter()
                .position(|b| *b == Some(id))
                .map(|b| vec![b as u8])
                .unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            bytes.extend(self.piece(id));
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn partition<'a>(&self, text: &'a str, parse_special: bool) -> Vec<Fragment<'a>> {
        let mut frags = vec![Fragment::Text(text)];
        for &(id, control) in &self.specials {
            if control && !parse_special {
                continue;
            }
            let needle = self.tokens[id as usize].as_str();
            if !frags
                .iter()
                .any(|f| matches!(f, Fragment::Text(t) if t.contains(needle)))
            {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len() + 2);
            for f in frags {
                match f {
                    Fragment::Text(t) if t.contains(needle) => {
                        let mut rest = t;
                        while let Some(at) = rest.find(needle) {
                            if at > 0 {
                                next.push(Fragment::Text(&rest[..at]));
                            }
                            next.push(Fragment::Token(id));
                            rest = &rest[at + needle.len()..];
                        }
                        if !rest.is_empty() {
                            next.push(Fragment::Text(rest));
                        }
                    }
                    other => next.push(other),
                }
            }
            frags = next;
        }
        frags
    }

    fn encode_piece(&self, text: &str, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let mut syms: Vec<Symbol> = Vec::new();
        for (i, (at, c)) in text.char_indices().enumerate() {
            syms.push(Symbol {
                start: at,
                len: c.len_utf8(),
                prev: i as isize - 1,
                next: i as isize + 1,
            });
        }
        if let Some(last) = syms.last_mut() {
            last.next = -1;
        }
        let mut queue = BinaryHeap::new();
        let mut rev_merge: HashMap<&str, (usize, usize)> = HashMap::new();
        for i in 1..syms.len() {
            self.try_bigram(text, &syms, i - 1, i as isize, &mut queue, &mut rev_merge);
        }
        while let Some(b) = queue.pop() {
            let (l, r) = (b.left, b.right);
            if syms[l].len == 0 || syms[r].len == 0 || syms[l].len + syms[r].len != b.size {
                continue;
            }
            syms[l].len += syms[r].len;
            syms[r].len = 0;
            syms[l].next = syms[r].next;
            if syms[r].next >= 0 {
                let n = syms[r].next as usize;
                syms[n].prev = l as isize;
            }
            let prev = syms[l].prev;
            if prev >= 0 {
                self.try_bigram(
                    text,
                    &syms,
                    prev as usize,
                    l as isize,
                    &mut queue,
                    &mut rev_merge,
                );
            }
            let next = syms[l].next;
            self.try_bigram(text, &syms, l, next, &mut queue, &mut rev_merge);
        }
        let mut i = 0isize;
        while i >= 0 && (i as usize) < syms.len() {
            let s = &syms[i as usize];
            self.resegment(text, &syms, s.start, s.len, &rev_merge, out);
            i = s.next;
        }
    }

    fn try_bigram<'t>(
        &self,
        text: &'t str,
        syms: &[Symbol],
        left: usize,
        right: isize,
        queue: &mut BinaryHeap<Bigram>,
        rev_merge: &mut HashMap<&'t str, (usize, usize)>,
    ) {
        if right < 0 {
            return;
        }
        let right = right as usize;
        if right >= syms.len() {
            return;
        }
        let start = syms[left].start;
        let size = syms[left].len + syms[right].len;
        let piece = &text[start..start + size];
        let Some(&id) = self.index.get(piece) else {
            return;
        };
        queue.push(Bigram {
            left,
            right,
            score: self.scores[id as usize],
            size,
        });
        rev_merge.insert(piece, (left, right));
    }

    fn resegment(
        &self,
        text: &str,
        syms: &[Symbol],
        start: usize,
        len: usize,
        rev_merge: &HashMap<&str, (usize, usize)>,
        out: &mut Vec<u32>,
    ) {
        let piece = &text[start..start + len];
        if let Some(&id) = self.index.get(piece) {
            out.push(id);
            return;
        }
        if let Some(&(l, r)) = rev_merge.get(piece) {
            let (ls, rs) = (syms[l].start, syms[r].start);
            // The halves as they were when merged: left from its start up to the right one.
            self.resegment(text, syms, ls, rs - ls, rev_merge, out);
            self.resegment(text, syms, rs, start + len - rs, rev_merge, out);
            return;
        }
        for b in piece.bytes() {
            if let Some(id) = self.bytes[b as usize].or(self.unk) {
                out.push(id);
            }
        }
    }

    #[cfg(test)]
    pub fn token_type(&self, id: u32) -> i32 {
        self.types[id as usize]
    }
}

enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

struct Symbol {
    start: usize,
    len: usize,
    prev: isize,
    next: isize,
}

struct Bigram {
    left: usize,
    right: usize,
    score: f32,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    /// Highest score first; on equal scores the leftmost pair first.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy() -> Spm {
        // ids: 0 <unk>, 1 <s>, 2 </s>, 3 <turn>, 4..: pieces, then two byte tokens.
        let toks = [
            ("<unk>", 0.0, TYPE_UNKNOWN),
            ("<s>", 0.0, TYPE_CONTROL),
            ("</s>", 0.0, TYPE_CONTROL),
            ("<turn>", 0.0, TYPE_CONTROL),
            ("▁", -1.0, TYPE_NORMAL),
            ("a", -2.0, TYPE_NORMAL),
            ("b", -2.0, TYPE_NORMAL),
            ("ab", -0.5, TYPE_NORMAL),
            ("▁ab", -0.1, TYPE_NORMAL),
            ("bb", -0.4, TYPE_NORMAL),
            ("<0xE3>", 0.0, TYPE_BYTE),
            ("<0x81>", 0.0, TYPE_BYTE),
            ("<0x82>", 0.0, TYPE_BYTE),
            ("\n\n", 0.0, TYPE_USER_DEFINED),
        ];
        Spm::new(
            toks.iter().map(|t| t.0.to_string()).collect(),
            toks.iter().map(|t| t.1).collect(),
            toks.iter().map(|t| t.2).collect(),
            Some(0),
            false,
        )
        .unwrap()
    }

    #[test]
    fn merges_by_score_and_falls_back_to_bytes() {
        let t = toy();
        // "▁ab" wins over "ab" then "▁"; "bb" merges before "ab" would (higher score).
        assert_eq!(t.encode(" ab", false), vec![8]);
        assert_eq!(t.encode("abb", false), vec![5, 9]);
        // "あ" is E3 81 82, not in the vocabulary: bytes.
        assert_eq!(t.encode("あ", false), vec![10, 11, 12]);
        assert_eq!(t.decode(&[10, 11, 12]), "あ");
        assert_eq!(t.decode(&[8, 9]), " abbb");
    }

    #[test]
    fn special_tokens_only_when_asked() {
        let t = toy();
        assert_eq!(t.encode("<turn>ab", true), vec![3, 7]);
        let plain = t.encode("<turn>ab", false);
        assert!(!plain.contains(&3), "{plain:?}");
        // User-defined tokens are always recognised.
        assert_eq!(t.encode("ab\n\nab", false), vec![7, 13, 7]);
        assert_eq!(t.decode(&[1, 7, 2]), "ab");
        assert_eq!(t.token_type(3), TYPE_CONTROL);
    }
}
