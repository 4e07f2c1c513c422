"""The ``random`` design: a random 10-digit secret in a short template.

As in Carlini et al.'s *Secret Sharer* and Steinke et al.'s black-box audit, the secret
is uniformly random, so only training on the canary can make a model prefer it. Each
canary's prefix carries three random words, so no two canaries share a prefix and a
model can tie a secret to its own canary. Panda et al. (ICLR 2025) find such canaries
weak for auditing LLM fine-tuning (4.2% TPR at 1% FPR on Qwen2.5-0.5B, against 49.6%
for new-token canaries): this design is the plain baseline. Each canary is drawn from a
stream of its own, so the first canaries stay the same when ``canaries`` grows.
"""

from __future__ import annotations

import random

from privtune.auditing.designs import DesignInputs, audit_record, register_canary_design
from privtune.data.records import Record
from privtune.train import streams

SECRET_DIGITS = 10
#: Common, short words: a prefix is three of them (64³ ≈ 262k prefixes).
WORDS = (
    "amber", "apple", "arrow", "basin", "birch", "blue", "brick", "cedar", "chalk", "cloud", "coral", "crane",
    "delta", "dune", "eagle", "ember", "fern", "flint", "frost", "glade", "grape", "green", "harbor", "hazel",
    "iris", "ivory", "jade", "kite", "lemon", "linen", "maple", "marsh", "mint", "moss", "north", "oak",
    "olive", "orbit", "pearl", "pine", "plum", "quartz", "raven", "reed", "river", "ruby", "sage", "sand",
    "silver", "slate", "spruce", "stone", "storm", "swift", "thorn", "tide", "tulip", "umber", "velvet",
    "willow", "winter", "yarrow", "zephyr", "zinc",
)
#: Index of the content sub-stream of ``streams.AUDIT_CANARIES`` (the IN/OUT draw is the stream itself).
CONTENT_STREAM = 1


def canary_tag(rng: random.Random) -> str:
    """A canary's own three random words (``amber-iris-oak``), which every design's prefix carries."""
    return "-".join(rng.choices(WORDS, k=3))


@register_canary_design("random")
def random_secrets(inputs: DesignInputs) -> list[Record]:
    out = []
    for i in range(inputs.count):
        rng = random.Random(streams.stream_seed(inputs.seed, streams.AUDIT_CANARIES, CONTENT_STREAM, i))
        tag = canary_tag(rng)
        secret = "".join(rng.choices("0123456789", k=SECRET_DIGITS))
        out.append(audit_record(i, f"Audit note {tag}: the access code is ", secret, "."))
    return out
