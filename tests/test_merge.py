import torch

from finetune.merge import TIE_MARGIN, compare_logits


def _logits(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_rounding_at_a_near_tie_passes():
    reference = [_logits([[5.0, 4.9, 0.0], [3.0, 0.0, 0.0]])]  # position 0: top-2 margin 0.1
    merged = [_logits([[4.9, 5.0, 0.0], [2.9, 0.0, 0.1]])]
    result = compare_logits(reference, merged, TIE_MARGIN["bfloat16"])
    assert result["top1_disagreements"] == 1
    assert result["disagreements_beyond_ties"] == 0
    assert result["passed"]


def test_a_confident_disagreement_fails():
    reference = [_logits([[5.0, 1.0, 0.0]])]  # margin 4: base+adapter is sure
    merged = [_logits([[1.0, 5.0, 0.0]])]  # e.g. an adapter merged with the wrong scale
    result = compare_logits(reference, merged, TIE_MARGIN["bfloat16"])
    assert result["disagreements_beyond_ties"] == 1
    assert not result["passed"]
    assert result["max_logit_diff"] == 4.0
