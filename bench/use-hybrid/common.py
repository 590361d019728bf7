"""What fuse.py and chunked.py share: the data, the scoring and the fusion."""
import json
import os

JAQUAD = os.path.join(os.path.dirname(os.path.abspath(__file__)), '../../../shared/bench/jaquad-dev/')


def lines(name):
    return [json.loads(line) for line in open(JAQUAD + name)]


def qrels():
    return {r['query_id']: r['corpus_id'] for r in lines('qrels.jsonl')}


def evaluate(rank, wanted):
    """recall@5, recall@10 and MRR@10 of `rank(question id) -> corpus ids, best first`."""
    r5 = r10 = mrr = n = 0
    for q, want in wanted.items():
        ids = rank(q)
        n += 1
        if want in ids[:10]:
            r = ids.index(want)
            r10 += 1
            mrr += 1 / (r + 1)
            r5 += r < 5
    return f'recall@5 {r5 / n:.4f}  recall@10 {r10 / n:.4f}  MRR@10 {mrr / n:.4f}'


def rrf(first, second, depth, weight=1.0, k=60):
    """Reciprocal-rank fusion of two rankings (the second weighted), best first."""
    s = {}
    for r, c in enumerate(first[:depth]):
        s[c] = s.get(c, 0) + 1 / (k + r + 1)
    for r, c in enumerate(second[:depth]):
        s[c] = s.get(c, 0) + weight / (k + r + 1)
    return sorted(s, key=lambda c: -s[c])
