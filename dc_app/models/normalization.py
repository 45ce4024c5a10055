"""GroupNorm in float32: the one normalisation layer the UNet, its transformers and the VAE share."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class GroupNorm32(nn.GroupNorm):
    """GroupNorm evaluated in float32 and cast back to the input dtype (upstream's `normalization`).

    Half-precision variance over thousands of elements loses too many bits (and can overflow in fp16), so the
    statistics are always computed in float32, whatever the dtype of the weights and activations.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)
