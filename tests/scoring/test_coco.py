"""PTB tokenizer, METEOR, ROUGE-L and CIDEr against pycocoevalcap and hand cases."""

from __future__ import annotations

import pytest

from e2e_cases import dev_groups, needs_java
from loralab.scoring import coco

# --------------------------------------------------------------------------- COCO scorers

def test_rouge_l_and_cider_by_hand():
    # source 1: "a c d e" vs "a b c d": LCS 3, P = R = 3/4 -> ROUGE-L 3/4; source 2 identical
    # ROUGE-L 1. CIDEr: every n-gram is in one source's references of 2: idf log 2 for all, so
    # each order's cosine is a plain overlap: unigrams 3/4, bigrams (ac cd de vs ab bc cd) 1/3,
    # no common 3/4-grams; equal bigram counts, no length penalty: 10 (3/4 + 1/3) / 4; source 2
    # scores 10 (all four orders 1).
    got = coco.coco_rouge_l_cider([["a b c d"], ["w x y z"]], ["a c d e", "w x y z"])
    assert got["ROUGE_L"] == pytest.approx((3 / 4 + 1) / 2, abs=1e-12)
    assert got["CIDEr"] == pytest.approx((10 * (3 / 4 + 1 / 3) / 4 + 10) / 2, rel=1e-12)


@pytest.mark.slow
@needs_java
def test_ptb_tokenizer_and_meteor_equal_pycocoevalcap(e2e_dir):
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    refs, hyps = dev_groups(e2e_dir, 40, start=100)
    hyps[0] = "Café (The Eagle) costs £20-25, doesn't it?"
    peer = PTBTokenizer().tokenize({i: [{"caption": h}] for i, h in enumerate(hyps)})
    ours = coco.ptb_tokenize(hyps)
    assert ours == [peer[i][0] for i in range(len(hyps))]
    flat = coco.ptb_tokenize([r for rs in refs for r in rs])
    tok_refs, pos = [], 0
    for rs in refs:
        tok_refs.append(flat[pos:pos + len(rs)])
        pos += len(rs)
    peer_score, peer_seg = Meteor().compute_score({i: r for i, r in enumerate(tok_refs)},
                                                  {i: [h] for i, h in enumerate(ours)})
    score, seg = coco.meteor_score(tok_refs, ours)
    assert score == pytest.approx(peer_score, abs=1e-9)
    assert seg == pytest.approx(peer_seg, abs=1e-9)
