"""BM25 (as shipped) against USE vectors alone and fused by reciprocal rank, on jaquad-dev.

    DUMP_RANKINGS=/tmp/usexp/bm25.json cargo bench -p search --features morph --bench jaquad_morph
    python3 bench/use-hybrid/fuse.py /tmp/usexp
"""
import json
import sys

import numpy as np

from common import evaluate, qrels, rrf

out = sys.argv[1]
wanted = qrels()
C, Q = np.load(out + '/C.npy'), np.load(out + '/Q.npy')
cids, qids = json.load(open(out + '/cids.json')), json.load(open(out + '/qids.json'))
bm = {x['q']: x['ids'] for x in json.load(open(out + '/bm25.json'))}
S = Q @ C.T
dense = {qids[i]: [cids[j] for j in np.argsort(-S[i])[:100]] for i in range(len(qids))}

print('BM25 (both fields, as shipped)  ', evaluate(lambda q: bm[q], wanted))
print('USE vectors alone               ', evaluate(lambda q: dense[q], wanted))
for depth in (20, 50, 100):
    for w in (1.0, 0.5, 0.3):
        print(f'RRF k=60 depth {depth:3} vector weight {w}',
              evaluate(lambda q: rrf(bm[q], dense[q], depth, w), wanted))
