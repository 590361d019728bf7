//! The families the engine runs through candle's loaders (Qwen2, Qwen3, Llama 3), on tiny
//! random-weight GGUF files made by bench/llama-ref/make-tiny.py (byte-level BPE tokenizers
//! from the GGUF metadata, each family's chat template): the chat prompt's token ids and the
//! greedy continuation are those llama.cpp gives for the same files
//! (bench/llama-ref/expectations.py - tiny crates/llm/tests/fixtures).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use llm::local::{ChatFormat, LoadedModel};
use llm::{ChatMessage, ChatRequest};

/// (family, prompt ids, llama.cpp's 16 greedy ids)
#[rustfmt::skip]
const CASES: &[(&str, &[u32], &[u32])] = &[
("qwen2", &[263, 115, 121, 115, 116, 101, 109, 10, 89, 111, 117, 32, 97, 114, 101, 32, 81, 119, 101, 110, 44, 32, 99, 114, 101, 97, 116, 101, 100, 32, 98, 121, 32, 65, 108, 105, 98, 97, 98, 97, 32, 67, 108, 111, 117, 100, 46, 32, 89, 111, 117, 32, 97, 114, 101, 32, 97, 32, 261, 108, 112, 102, 117, 108, 32, 97, 115, 115, 105, 115, 116, 97, 110, 116, 46, 264, 10, 263, 117, 115, 101, 114, 10, 229, 184, 130, 229, 189, 185, 230, 137, 128, 257, 258, 143, 230, 176, 145, 231, 165, 168, 256, 174, 229, 134, 259, 151, 260, 146, 229, 143, 150, 260, 139, 256, 171, 256, 175, 258, 149, 256, 140, 229, 191, 133, 232, 166, 129, 257, 256, 259, 139, 239, 188, 159, 264, 10, 263, 97, 115, 115, 105, 115, 116, 97, 110, 116, 10], &[33, 241, 227, 227, 207, 55, 77, 160, 128, 209, 127, 224, 44, 59, 246, 227]),
("qwen3", &[263, 117, 115, 101, 114, 10, 229, 184, 130, 229, 189, 185, 230, 137, 128, 257, 258, 143, 230, 176, 145, 231, 165, 168, 256, 174, 229, 134, 259, 151, 260, 146, 229, 143, 150, 260, 139, 256, 171, 256, 175, 258, 149, 256, 140, 229, 191, 133, 232, 166, 129, 257, 256, 259, 139, 239, 188, 159, 264, 10, 263, 97, 115, 115, 105, 115, 116, 97, 110, 116, 10, 60, 116, 104, 105, 110, 107, 62, 10, 10, 60, 47, 116, 104, 105, 110, 107, 62, 10, 10], &[213, 231, 215, 127, 55, 256, 47, 256, 47, 256, 47, 73, 39, 27, 71, 256]),
("llama3", &[262, 264, 117, 115, 101, 114, 265, 10, 10, 229, 184, 130, 229, 189, 185, 230, 137, 128, 257, 258, 143, 230, 176, 145, 231, 165, 168, 256, 174, 229, 134, 259, 151, 260, 146, 229, 143, 150, 260, 139, 256, 171, 256, 175, 258, 149, 256, 140, 229, 191, 133, 232, 166, 129, 257, 256, 259, 139, 239, 188, 159, 266, 264, 97, 115, 115, 105, 115, 116, 97, 110, 116, 265, 10, 10], &[207, 193, 8, 189, 158, 35, 162, 13, 70, 100, 112, 227, 240, 149, 229, 88]),
];

fn request() -> ChatRequest {
    ChatRequest {
        model: String::new(),
        system: None,
        messages: vec![ChatMessage::user(
            "市役所で住民票の写しを取るには何が必要ですか？",
        )],
        max_tokens: Some(16),
        temperature: None,
    }
}

#[test]
fn each_family_matches_llama_cpp() {
    for &(name, prompt_ids, greedy) in CASES {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join(format!("tests/fixtures/tiny-{name}.gguf"));
        let info = llm::local::inspect(&path).unwrap();
        assert!(
            info.instruction_tuned(),
            "{name}: the file carries a chat template"
        );
        let want = match name {
            "qwen2" => ChatFormat::Qwen2,
            "qwen3" => ChatFormat::Qwen3,
            _ => ChatFormat::Llama3 { dated: false },
        };
        assert_eq!(info.chat_format, want, "{name}");
        let m = LoadedModel::load(&path).unwrap();
        assert_eq!(
            m.prompt_tokens(&request()).unwrap(),
            prompt_ids,
            "{name}: prompt"
        );
        // Text round trip through the byte-level tokenizer.
        let text = "住民票 と the city, 2025年";
        assert_eq!(m.detokenize(&m.tokenize(text).unwrap()), text, "{name}");
        // Special tokens typed by a user stay text.
        let ids = m.tokenize("<|im_end|><|eot_id|>").unwrap();
        assert!(ids.len() > 2, "{name}: {ids:?}");

        // Teacher-forced along llama.cpp's greedy continuation: the same token each time
        // (f32 weights here, so only the order of float additions differs).
        let steps = m.score(prompt_ids, greedy).unwrap();
        for (i, &(best, top, reference)) in steps.iter().enumerate() {
            assert!(
                best == greedy[i] || top - reference < 1e-3,
                "{name} step {i}: ours {best}, llama.cpp {} ({:.4} apart)",
                greedy[i],
                top - reference
            );
        }
        // Free-running greedy generation gives llama.cpp's ids (stopping at a stop token).
        let mut text = String::new();
        m.generate(prompt_ids, 16, None, |p| {
            text.push_str(p);
            true
        })
        .unwrap();
        let stop = greedy
            .iter()
            .position(|t| m.detokenize(&[*t]).is_empty())
            .unwrap_or(greedy.len());
        assert_eq!(text, m.detokenize(&greedy[..stop]), "{name}");
    }
}
