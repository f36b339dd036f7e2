"""The loop's gap per domain: per-domain means weigh the eval scorer's per-row sums by their tokens."""

import math

import pytest

from raydistill.loop.gap import domain_gaps

def test_domain_gaps_weigh_rows_by_their_tokens():
    sums = {"tokens": [2, 6, 0, 4], "kl": [1.0, 3.0, 0.0, 8.0], "nll": [2.0, 6.0, 0.0, 4.0], "top1_agree": [1.0, 3.0, 0.0, 0.0]}
    gaps = domain_gaps(["code", "code", "empty", "chat"], sums)
    assert gaps["code"] == {"rows": 2, "tokens": 8, "kl": 0.5, "nll": 1.0, "top1_agreement": 0.5}
    assert gaps["chat"] == {"rows": 1, "tokens": 4, "kl": 2.0, "nll": 1.0, "top1_agreement": 0.0}
    assert gaps["empty"]["rows"] == 1 and gaps["empty"]["tokens"] == 0 and math.isnan(gaps["empty"]["kl"])
    assert domain_gaps([], {"tokens": [], "kl": [], "nll": [], "top1_agree": []}) == {}
    with pytest.raises(ValueError, match="2 domains for 4 rows"):
        domain_gaps(["a", "b"], sums)
