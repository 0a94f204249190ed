"""DINO and iBOT projection heads (DINOv3): an MLP to a bottleneck, L2 normalization, prototype scores.

    tokens [N, in_dim] -> Linear -> GELU -> Linear -> GELU -> Linear -> bottleneck [N, bottleneck_dim]
                       -> L2 normalize -> last_layer (Linear, no bias) -> prototype scores [N, out_dim]

The DINO head reads class tokens, the iBOT head reads the (masked) patch tokens; DINOv3 gives each its own
head ("separate heads", train.py builds both). The prototype layer is a plain bias-free Linear: DINOv3 dropped
the weight normalization DINOv1/v2 had there. Module names equal the released training checkpoints' keys:
`mlp.0`, `mlp.2`, `mlp.4` (the GELUs are `mlp.1`, `mlp.3`) and `last_layer.weight`.

Sizes (ViT-7B pretraining config): DINO head hidden 8192 / bottleneck 512 / 262144 prototypes, iBOT head
hidden 4096 (the paper's table says 8192) / bottleneck 384 / 98304 prototypes. Smaller runs use less, e.g.
hidden 2048, bottleneck 256, 65536 prototypes.

Training recipe detail: the prototype layers (`last_layer`) stay frozen at the start of training; the training
loop gives them a learning rate of 0 for those steps, as the official code does (train.apply_schedules).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DINOHead(nn.Module):
    """Projection head: `nlayers` Linear layers with GELU in between, L2 normalization, prototype layer.

    in_dim: backbone width; out_dim: number of prototypes K; hidden_dim: width of the hidden layers;
    bottleneck_dim: width of the normalized embedding the prototypes are compared with; nlayers: number of
    MLP layers (3 in DINOv2/v3; with 1 the MLP is a single Linear in_dim -> bottleneck_dim).
    normalize_prototypes: score with unit-norm prototypes (cosine similarities, as DINOv1/v2's weight-normalized
    last layer with its norm fixed at 1) instead of the raw DINOv3 Linear. The raw layer's scores start with a
    spread of about 0.02 (its init std), which a teacher temperature of 0.04 turns into nearly uniform targets
    until the prototypes grow; cosine scores start about sqrt(bottleneck_dim) times wider.
    embeddings_only: forward gives the normalized embedding [..., bottleneck_dim] and leaves the prototype layer
    unused (the coding-rate objective, losses/coding_rate.py); it stays in the state so checkpoints keep one layout.
    Input: tokens [..., in_dim] (typically [N, in_dim]); output: prototype scores [..., out_dim].
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        normalize_prototypes: bool = False,
        embeddings_only: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden_dim", hidden_dim),
                            ("bottleneck_dim", bottleneck_dim), ("nlayers", nlayers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DINOHead: {name} must be a positive int, got {value!r}")
        widths = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
            if i > 0:
                layers.append(nn.GELU())
            layers.append(nn.Linear(width_in, width_out))
        self.mlp = nn.Sequential(*layers)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.normalize_prototypes = normalize_prototypes
        self.embeddings_only = embeddings_only
        self.init_weights()

    def init_weights(self) -> None:
        """DINOv3 init: truncated normal (std 0.02) Linear weights, zero biases."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def bottleneck(self, tokens: torch.Tensor) -> torch.Tensor:
        """The L2-normalized embedding [..., bottleneck_dim] that the prototype layer scores."""
        embedding = self.mlp(tokens)
        # 1e-12 underflows in fp16 (smallest subnormal ~6e-8), which would let a zero vector divide by 0.
        eps = 1e-6 if embedding.dtype == torch.float16 else 1e-12
        return F.normalize(embedding, p=2, dim=-1, eps=eps)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[-1] != self.mlp[0].in_features:
            raise ValueError(
                f"DINOHead: tokens have width {tokens.shape[-1]} but the head was built with "
                f"in_dim={self.mlp[0].in_features}; pass [N, in_dim] class or patch tokens of the backbone"
            )
        if self.embeddings_only:
            return self.bottleneck(tokens)
        if self.normalize_prototypes:
            return F.linear(self.bottleneck(tokens), F.normalize(self.last_layer.weight, dim=1))
        return self.last_layer(self.bottleneck(tokens))

    def extra_repr(self) -> str:
        flags = [name for name in ("normalize_prototypes", "embeddings_only") if getattr(self, name)]
        return ", ".join(f"{name}=True" for name in flags)

