"""Test-wide settings.

The tests run tiny models, where torch's thread pool costs more than it saves, and on a
machine busy with other work two spinning OpenMP threads per process made a 15 s test
take minutes. One thread keeps the suite fast and its timings steady.
"""

import torch

torch.set_num_threads(1)
