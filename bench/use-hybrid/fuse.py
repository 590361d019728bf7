"""BM25 (as shipped) against USE vectors alone and fused by reciprocal rank, on jaquad-dev.

    DUMP_RANKINGS=/tmp/usexp/bm25.json cargo bench -p search --features morph --bench jaquad_morph
    python3 bench/use-hybrid/fuse.py /tmp/usexp
"""
import json
import os
import sys

import numpy as np

out = sys.argv[1]
d = os.path.join(os.path.dirname(os.path.abspath(__file__)), '../../../shared/bench/jaquad-dev/')
qrels = {}
for line in open(d + 'qrels.jsonl'):
    r = json.loads(line)
    qrels[r['query_id']] = r['corpus_id']
C, Q = np.load(out + '/C.npy'), np.load(out + '/Q.npy')
cids, qids = json.load(open(out + '/cids.json')), json.load(open(out + '/qids.json'))
bm = {x['q']: x['ids'] for x in json.load(open(out + '/bm25.json'))}
S = Q @ C.T
dense = {qids[i]: [cids[j] for j in np.argsort(-S[i])[:100]] for i in range(len(qids))}


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


print('BM25 (both fields, as shipped)  ', ev(lambda q: bm[q]))
print('USE vectors alone               ', ev(lambda q: dense[q]))
for depth in (20, 50, 100):
    for w in (1.0, 0.5, 0.3):
        def rrf(q, depth=depth, w=w, k=60):
            s = {}
            for r, c in enumerate(bm[q][:depth]):
                s[c] = s.get(c, 0) + 1 / (k + r + 1)
            for r, c in enumerate(dense[q][:depth]):
                s[c] = s.get(c, 0) + w / (k + r + 1)
            return sorted(s, key=lambda c: -s[c])
        print(f'RRF k=60 depth {depth:3} vector weight {w}', ev(rrf))
