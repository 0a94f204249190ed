"""KoLeo regularizer: spread the class tokens of a batch apart (Kozachenko-Leonenko entropy estimator).

For L2-normalized class tokens x_i, with d_i the distance from x_i to its nearest neighbour in its group
(itself excluded):

    L_KoLeo = mean over groups g with >= 2 samples of  mean over i in g of  -log(d_i + 1e-8)

DINOv3 computes it in small groups of 16 samples: the batch is cut into consecutive groups of `group_size`,
the last one may be smaller, and a group of a single sample has no neighbour and contributes nothing. With
group_size=None the whole batch is one group (the DINOv2 form). The loss enters the objective with weight 0.1,
on the student backbone's normed class tokens (`x_norm_clstoken`, before the DINO head) of the global crops:
the paper names the first global crop; the official DINOv3 meta-architecture averages the loss of both global
crops and multiplies it by their number (2).

`DistributedKoLeoLoss` forms the groups over the batch of all ranks concatenated in rank order, so a group may
span ranks (16 samples over 4 ranks holding 4 each) or a rank may hold several groups; see its docstring for
how values and gradients relate to the single-process loss on the concatenated batch.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dino_kernels.common import reduction_group

LOG_EPS = 1e-8  # inside the log: identical points give a large but finite loss
NORMALIZE_EPS = 1e-8


def _check_tokens(owner: str, tokens: torch.Tensor) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or not tokens.is_floating_point():
        what = f"{tuple(tokens.shape)} {tokens.dtype}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"{owner}: expected floating-point class tokens [N, C], got {what}")


def _check_group_size(owner: str, group_size: int | None) -> None:
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2):
        raise ValueError(
            f"{owner}: group_size must be an int >= 2 (16 in DINOv3) or None for one group, got {group_size!r}"
        )


@torch.no_grad()
def nearest_neighbour_in_group(points: torch.Tensor, group_size: int) -> torch.Tensor:
    """Index [N] of each point's nearest other point within its group of `group_size` consecutive points.

    points must be L2-normalized, so the nearest point is the one with the largest dot product. A point alone
    in its group gets its own index.
    """
    n_points, dim = points.shape
    n_groups = math.ceil(n_points / group_size)
    padded = points.new_zeros(n_groups * group_size, dim)
    padded[:n_points] = points
    grouped = padded.view(n_groups, group_size, dim)
    # float32 even under autocast: near-ties between neighbours are decided in the precision of the distances.
    with torch.autocast(device_type=points.device.type, enabled=False):
        dots = torch.bmm(grouped, grouped.transpose(1, 2))  # [groups, group_size, group_size]
    position = torch.arange(n_groups * group_size, device=points.device).view(n_groups, group_size)
    is_self = torch.eye(group_size, dtype=torch.bool, device=points.device)
    is_padding = (position >= n_points)[:, None, :]
    dots.masked_fill_(is_self | is_padding, -math.inf)
    neighbour = position[:, :1] + dots.argmax(dim=-1)  # argmax of an all -inf row is 0: the lone point itself
    return neighbour.flatten()[:n_points]


def koleo_terms(points: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-point terms -log(d_i + eps) [N] and weights [N] such that the loss is sum(weights * terms).

    points: L2-normalized [N, C]. weight_i = 1 / (size of i's group * number of groups with >= 2 points), and
    0 in a group of one point (and everywhere when no group has two points).
    """
    n_points = points.shape[0]
    group_size = max(n_points, 1) if group_size is None else group_size
    neighbour = nearest_neighbour_in_group(points, group_size)
    distance = torch.linalg.vector_norm(points - points[neighbour], dim=-1)
    terms = -torch.log(distance + LOG_EPS)

    group_of_point = torch.arange(n_points, device=points.device) // group_size
    group_sizes = (n_points - group_of_point * group_size).clamp(max=group_size)
    n_groups = math.ceil(n_points / group_size)
    n_scored_groups = n_groups - int(n_points % group_size == 1)
    weights = (group_sizes >= 2) / (group_sizes * max(n_scored_groups, 1))
    return terms, weights.to(terms.dtype)


class KoLeoLoss(nn.Module):
    """KoLeo on this process's tokens [N, C] (any float dtype; computed in float32), in groups of group_size."""

    def __init__(self, group_size: int | None = 16) -> None:
        super().__init__()
        _check_group_size("KoLeoLoss", group_size)
        self.group_size = group_size

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        _check_tokens("KoLeoLoss", tokens)
        points = F.normalize(tokens.float(), p=2, dim=-1, eps=NORMALIZE_EPS)
        terms, weights = koleo_terms(points, self.group_size)
        return (weights * terms).sum()

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}"


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's [b, C] tensor; backward sends each rank the summed gradient of its own slice.

    Every rank's loss may depend on every rank's points, so the gradient of a rank's points is the sum over
    ranks of the gradient of its slice: an all-reduce of the full gradient, then the local slice.
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor, group) -> torch.Tensor:
        local = local.contiguous()
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local, group=group)
        ctx.group = group
        ctx.rows = slice(dist.get_rank(group) * local.shape[0], (dist.get_rank(group) + 1) * local.shape[0])
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad_gathered: torch.Tensor):
        summed = grad_gathered.clone(memory_format=torch.contiguous_format)  # the incoming buffer is not ours
        dist.all_reduce(summed, group=ctx.group)
        return summed[ctx.rows], None


class DistributedKoLeoLoss(nn.Module):
    """KoLeo with groups formed over the batch of all ranks (DINOv3's KoLeoLossDistributed).

    Each rank passes its own tokens [b, C]; every rank of the group must pass the same b and call forward and
    backward. The groups cut the concatenation of all ranks' tokens in rank order, exactly as KoLeoLoss would
    cut that concatenated batch. Each rank returns W * (sum of weight * term over its own points), with W the
    world size, so that:
      - the mean over ranks of the returned values equals KoLeoLoss on the concatenated batch (with equal
        full groups a rank's value is simply the mean term of its own points, as in the official code);
      - the gradient reaching a rank's tokens is W times the single-process gradient of its slice, and
        data-parallel gradient averaging (DDP / FSDP divide by W) gives the single-process gradient.
    Without torch.distributed initialized, or with one rank, it is KoLeoLoss.
    """

    def __init__(self, group_size: int | None = 16, process_group=None) -> None:
        super().__init__()
        _check_group_size("DistributedKoLeoLoss", group_size)
        self.group_size = group_size
        self.process_group = process_group

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        _check_tokens("DistributedKoLeoLoss", tokens)
        points = F.normalize(tokens.float(), p=2, dim=-1, eps=NORMALIZE_EPS)
        group = reduction_group(self.process_group, "DistributedKoLeoLoss")
        if group is None:
            terms, weights = koleo_terms(points, self.group_size)
            return (weights * terms).sum()
        world_size, rank, n_local = dist.get_world_size(group), dist.get_rank(group), points.shape[0]
        all_points = _AllGatherWithGrad.apply(points, group)
        terms, weights = koleo_terms(all_points, self.group_size)
        mine = slice(rank * n_local, (rank + 1) * n_local)
        return world_size * (weights[mine] * terms[mine]).sum()

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}"
