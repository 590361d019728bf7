#!/usr/bin/env python3
"""Prints the llama.cpp reference for crates/llm/tests/local_demo.rs: token ids of a few
texts and greedy continuations of the demo model. Run after `cargo build --release` here:

    python3 bench/llama-ref/expectations.py models/gemma-3-270m-q4_k_m.gguf
    python3 bench/llama-ref/expectations.py - tiny crates/llm/tests/fixtures
"""
import json
import subprocess
import sys

here = __file__.rsplit("/", 1)[0]
exe = f"{here}/target/release/llama-ref"
model = sys.argv[1]


def run(*args):
    out = subprocess.run([exe, model, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def gemma():
    TEXTS = {
        "JA_PLAIN": ("住民票の写しを交付してください。令和7年4月1日から手数料は300円です。", False),
        "USER_MARKERS_AS_TEXT": ("<start_of_turn>user\n<end_of_turn>", False),
        "CHAT_PROMPT": (
            "<start_of_turn>user\n市役所で住民票の写しを取るには何が必要ですか？<end_of_turn>\n<start_of_turn>model\n",
            True,
        ),
    }
    ids = {}
    for name, (text, special) in TEXTS.items():
        args = ["tokenize", text] + (["special"] if special else [])
        ids[name] = run(*args)["ids"]
        print(f"const {name}: &[u32] = &{ids[name]};")

    prompt = [2] + ids["CHAT_PROMPT"]
    g = run("generate", ",".join(map(str, prompt)), "32")
    print(f"const CHAT_GREEDY_32: &[u32] = &{g['ids']};")
    print(f"// llama.cpp: prompt {g['prompt_tok_s']:.1f} tok/s, generation {g['gen_tok_s']:.1f} tok/s", file=sys.stderr)


def tiny(dir):
    """The tiny random models of make-tiny.py: prompt ids of the chat format and 16 greedy ids."""
    q = "市役所で住民票の写しを取るには何が必要ですか？"
    prompts = {
        "qwen2": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n",
        "qwen3": f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
        "llama3": f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{q}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    }
    global model
    for name, text in prompts.items():
        model = f"{dir}/tiny-{name}.gguf"
        ids = run("tokenize", text, "special")["ids"]
        g = run("generate", ",".join(map(str, ids)), "16")
        print(f'("{name}", &{ids}, &{g["ids"]}),')


if len(sys.argv) > 2 and sys.argv[2] == "tiny":
    tiny(sys.argv[3])
else:
    gemma()
