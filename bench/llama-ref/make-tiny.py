#!/usr/bin/env python3
"""Writes tiny random-weight GGUF models of the families the local engine runs through
candle's loaders (Qwen2, Qwen3, Llama 3), with byte-level BPE tokenizers and chat templates,
for crates/llm/tests/local_families.rs. Nobody's weights: numbers from a fixed seed. Each
file is about 300 KB. llama.cpp (bench/llama-ref) gives the reference token ids for them.

    python3 bench/llama-ref/make-tiny.py crates/llm/tests/fixtures
"""
import sys

import numpy as np
from gguf import GGUFWriter, TokenType

out = sys.argv[1]
N_EMBD, N_HEAD, N_KV, HEAD, FF, LAYERS = 64, 4, 2, 16, 128, 2


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


B2U = bytes_to_unicode()
TEXT = "市役所で住民票の写しを取るには何が必要ですか？ the city office hello world"


def vocab(specials):
    tokens = [B2U[b] for b in range(256)]
    merges = []
    # Merge the most frequent neighbouring pairs of a small text, as BPE training would.
    seq = [B2U[b] for b in TEXT.encode()]
    for _ in range(40):
        pairs = {}
        for a, b in zip(seq, seq[1:]):
            pairs[(a, b)] = pairs.get((a, b), 0) + 1
        if not pairs:
            break
        (a, b), n = max(pairs.items(), key=lambda kv: kv[1])
        if n < 2:
            break
        merges.append(f"{a} {b}")
        tokens.append(a + b)
        new, i = [], 0
        while i < len(seq):
            if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                new.append(a + b)
                i += 2
            else:
                new.append(seq[i])
                i += 1
        seq = new
    types = [TokenType.NORMAL] * len(tokens)
    for s in specials:
        tokens.append(s)
        types.append(TokenType.CONTROL)
    return tokens, types, merges


def write(arch, path, pre, specials, bos, eos, template, bias, qk_norm, seed):
    rng = np.random.default_rng(seed)
    w = lambda *shape: (rng.standard_normal(shape) * 0.3).astype(np.float32)
    ones = lambda n: (1.0 + rng.standard_normal(n) * 0.1).astype(np.float32)
    tokens, types, merges = vocab(specials)
    g = GGUFWriter(path, arch)
    g.add_name(f"tiny-{arch}")
    g.add_context_length(512)
    g.add_embedding_length(N_EMBD)
    g.add_block_count(LAYERS)
    g.add_feed_forward_length(FF)
    g.add_head_count(N_HEAD)
    g.add_head_count_kv(N_KV)
    g.add_layer_norm_rms_eps(1e-6)
    g.add_rope_freq_base(10000.0)
    g.add_key_length(HEAD)
    g.add_value_length(HEAD)
    g.add_rope_dimension_count(HEAD)
    g.add_vocab_size(len(tokens))
    g.add_tokenizer_model("gpt2")
    g.add_tokenizer_pre(pre)
    g.add_token_list(tokens)
    g.add_token_types(types)
    g.add_token_merges(merges)
    g.add_bos_token_id(tokens.index(bos))
    g.add_eos_token_id(tokens.index(eos))
    g.add_add_bos_token(False)
    g.add_chat_template(template)
    g.add_tensor("token_embd.weight", w(len(tokens), N_EMBD))
    for i in range(LAYERS):
        p = f"blk.{i}."
        g.add_tensor(p + "attn_norm.weight", ones(N_EMBD))
        g.add_tensor(p + "attn_q.weight", w(N_HEAD * HEAD, N_EMBD))
        g.add_tensor(p + "attn_k.weight", w(N_KV * HEAD, N_EMBD))
        g.add_tensor(p + "attn_v.weight", w(N_KV * HEAD, N_EMBD))
        if bias:
            g.add_tensor(p + "attn_q.bias", w(N_HEAD * HEAD))
            g.add_tensor(p + "attn_k.bias", w(N_KV * HEAD))
            g.add_tensor(p + "attn_v.bias", w(N_KV * HEAD))
        if qk_norm:
            g.add_tensor(p + "attn_q_norm.weight", ones(HEAD))
            g.add_tensor(p + "attn_k_norm.weight", ones(HEAD))
        g.add_tensor(p + "attn_output.weight", w(N_EMBD, N_HEAD * HEAD))
        g.add_tensor(p + "ffn_norm.weight", ones(N_EMBD))
        g.add_tensor(p + "ffn_gate.weight", w(FF, N_EMBD))
        g.add_tensor(p + "ffn_up.weight", w(FF, N_EMBD))
        g.add_tensor(p + "ffn_down.weight", w(N_EMBD, FF))
    g.add_tensor("output_norm.weight", ones(N_EMBD))
    g.add_tensor("output.weight", w(len(tokens), N_EMBD))
    g.write_header_to_file()
    g.write_kv_data_to_file()
    g.write_tensors_to_file()
    g.close()


CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
write("qwen2", f"{out}/tiny-qwen2.gguf", "qwen2", CHATML, "<|endoftext|>", "<|im_end|>",
      "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}", True, False, 2)
write("qwen3", f"{out}/tiny-qwen3.gguf", "qwen2", CHATML, "<|endoftext|>", "<|im_end|>",
      "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}", False, True, 3)
LLAMA3 = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
write("llama", f"{out}/tiny-llama3.gguf", "llama-bpe", LLAMA3, "<|begin_of_text|>", "<|eot_id|>",
      "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content | trim }}<|eot_id|>{% endfor %}", False, False, 4)
