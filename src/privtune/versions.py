"""The versions of everything that can change a figure, recorded in every run's result.

Same config, same data digest and same seed give the same figures only under the same
libraries: a new torch kernel, a transformers change to a model's attention, an opacus
or PEFT fix, a faker with other name lists each move numbers. A stored run says which
versions produced it, so a figure can be traced and a difference between two runs of
one config explained.
"""

from __future__ import annotations

import platform
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version

import privtune

#: Distributions whose version can change a figure: the model and training stack, the
#: DP engine, the tokenizer, the data generator, the numerics behind the attacks and
#: accountants, GGUF dequantisation of the packaged models, and Flower (federated runs).
FIGURE_DEPENDENCIES = ("torch", "transformers", "peft", "opacus", "tokenizers", "faker", "numpy", "scipy",
                       "scikit-learn", "gguf", "flwr")


@lru_cache(maxsize=1)
def dependency_versions() -> dict[str, str]:
    """privtune's, Python's and each installed :data:`FIGURE_DEPENDENCIES` version."""
    found = {"privtune": privtune.__version__, "python": platform.python_version()}
    for name in FIGURE_DEPENDENCIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue  # an optional extra (flwr) that is not installed
    return found
