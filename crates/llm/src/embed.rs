//! Embeddings over the OpenAI `/embeddings` wire format, spoken by OpenAI, Azure OpenAI
//! (deployment in the path) and the OpenAI-compatible servers a city runs on its own
//! network (text-embeddings-inference, vLLM, llama.cpp, Ollama, LiteLLM).

use serde::Deserialize;
use serde_json::{json, Value};

use crate::config::{ProviderConfig, ProviderKind};
use crate::error::{ErrorKind, LlmError};
use crate::wire;

/// An answer larger than this is not an embedding response (a 2,048-input batch of
/// 3,072-dimension vectors written as JSON is about 130 MB; batches are far smaller).
pub(crate) const MAX_BODY: usize = 64 * 1024 * 1024;

/// The vectors, in the order of the inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct Embeddings {
    pub vectors: Vec<Vec<f32>>,
    /// `usage.prompt_tokens` (or `total_tokens`) when the server reports it.
    pub tokens: Option<u64>,
}

pub(crate) fn url(
    base: &reqwest::Url,
    cfg: &ProviderConfig,
    model: &str,
) -> Result<reqwest::Url, LlmError> {
    match cfg.kind {
        ProviderKind::AzureOpenAi => {
            let mut u = wire::strip_trailing_segment(base, "openai");
            wire::push_segments(&mut u, &["openai", "deployments", model, "embeddings"])?;
            u.query_pairs_mut()
                .append_pair("api-version", cfg.azure_api_version());
            Ok(u)
        }
        ProviderKind::OpenAi => {
            let mut u = base.clone();
            wire::push_segments(&mut u, &["embeddings"])?;
            Ok(u)
        }
        other => Err(LlmError::new(
            ErrorKind::Config,
            format!(
                "{} does not offer embeddings here; use an OpenAI-compatible or Azure OpenAI endpoint",
                other.as_str()
            ),
        )),
    }
}

pub(crate) fn body(model: &str, inputs: &[String]) -> Value {
    json!({"model": model, "input": inputs, "encoding_format": "float"})
}

#[derive(Deserialize)]
struct Response {
    data: Vec<Item>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Item {
    embedding: Vec<f32>,
    index: Option<usize>,
}

#[derive(Deserialize)]
struct Usage {
    prompt_tokens: Option<u64>,
    total_tokens: Option<u64>,
}

/// Reads the response: one finite vector per input, all of one length, put in input
/// order by `index` (servers may answer out of order).
pub(crate) fn parse(bytes: &[u8], inputs: usize) -> Result<Embeddings, LlmError> {
    let bad = |m: String| LlmError::new(ErrorKind::BadResponse, m);
    let r: Response = serde_json::from_slice(bytes)
        .map_err(|e| bad(format!("the embeddings response is not as expected: {e}")))?;
    if r.data.len() != inputs {
        return Err(bad(format!(
            "{} embeddings for {inputs} inputs",
            r.data.len()
        )));
    }
    let mut slots: Vec<Option<Vec<f32>>> = vec![None; inputs];
    for (i, item) in r.data.into_iter().enumerate() {
        let at = item.index.unwrap_or(i);
        match slots.get_mut(at) {
            Some(slot @ None) => *slot = Some(item.embedding),
            _ => return Err(bad(format!("embedding index {at} is out of place"))),
        }
    }
    let vectors: Vec<Vec<f32>> = slots.into_iter().flatten().collect();
    let dims = vectors.first().map_or(0, Vec::len);
    if vectors.len() != inputs
        || (inputs > 0 && dims == 0)
        || vectors
            .iter()
            .any(|v| v.len() != dims || v.iter().any(|x| !x.is_finite()))
    {
        return Err(bad(
            "the embeddings are empty, of different lengths or not finite".into(),
        ));
    }
    Ok(Embeddings {
        vectors,
        tokens: r.usage.and_then(|u| u.prompt_tokens.or(u.total_tokens)),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn urls_per_kind() {
        let cfg = ProviderConfig::new(ProviderKind::OpenAi, "http://h/v1", "");
        let base = reqwest::Url::parse("http://h/v1").unwrap();
        assert_eq!(
            url(&base, &cfg, "m").unwrap().as_str(),
            "http://h/v1/embeddings"
        );
        let cfg = ProviderConfig::new(
            ProviderKind::AzureOpenAi,
            "https://r.openai.azure.com/openai",
            "k",
        );
        let base = reqwest::Url::parse("https://r.openai.azure.com/openai").unwrap();
        assert_eq!(
            url(&base, &cfg, "emb-3").unwrap().as_str(),
            "https://r.openai.azure.com/openai/deployments/emb-3/embeddings?api-version=2024-10-21"
        );
        let cfg = ProviderConfig::new(ProviderKind::Anthropic, "https://api.anthropic.com", "k");
        assert_eq!(url(&base, &cfg, "m").unwrap_err().kind, ErrorKind::Config);
    }

    #[test]
    fn parse_orders_and_checks() {
        let ok = br#"{"object":"list","data":[
            {"object":"embedding","index":1,"embedding":[0.0,1.0]},
            {"object":"embedding","index":0,"embedding":[1.0,0.0]}],
            "model":"m","usage":{"prompt_tokens":7,"total_tokens":7}}"#;
        let e = parse(ok, 2).unwrap();
        assert_eq!(e.vectors, vec![vec![1.0, 0.0], vec![0.0, 1.0]]);
        assert_eq!(e.tokens, Some(7));
        for bad in [
            &br#"{"data":[{"index":0,"embedding":[1.0]}]}"#[..],
            br#"{"data":[{"index":0,"embedding":[1.0]},{"index":0,"embedding":[1.0]}]}"#,
            br#"{"data":[{"index":0,"embedding":[1.0]},{"index":5,"embedding":[1.0]}]}"#,
            br#"{"data":[{"index":0,"embedding":[1.0]},{"index":1,"embedding":[1.0,2.0]}]}"#,
            br#"{"data":[{"index":0,"embedding":[]},{"index":1,"embedding":[]}]}"#,
            br#"{"data":"nope"}"#,
            b"<html>",
        ] {
            assert_eq!(parse(bad, 2).unwrap_err().kind, ErrorKind::BadResponse);
        }
    }
}
