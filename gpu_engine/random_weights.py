"""Random weights for benchmarks (``load_format="random"``): no checkpoint files needed.

Initialised in place on the model's device (a 7B model on a GPU in well under a second):
linear and embedding weights ~ N(0, std²), norms 1, biases 0 — the HF init, so activations
stay in range through deep stacks.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def init_random_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 2)
        if name.endswith(".bias"):
            param.zero_()
        elif len(leaf) >= 2 and "norm" in leaf[-2]:
            param.fill_(1.0)
        else:
            param.normal_(0.0, std, generator=gen)
