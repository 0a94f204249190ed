"""Is the run learning? Label-free instruments computed from tensors a training step already has: the teacher's
DINO and iBOT targets and the teacher's class tokens (no extra forward pass).

- Target entropy H(t): the mean entropy of the teacher's target rows, next to its uniform value ln K. Targets
  near ln K carry little about their image.
- View agreement: the cross-entropy between the targets of one image's two global crops ("CE same") against the
  same between one image's first crop and another image's second crop ("CE other"). The DINO objective has
  something to fit only when an image's two views get more alike targets than two images do: the gap
  CE other - CE same is well above 0.
- Spread: the standard deviation across the batch of the L2-normalized class tokens, averaged over dimensions:
  about 1/sqrt(d) for tokens spread over the sphere, 0 for collapsed ones (the same token for every image).
- Effective rank (RankMe, Garrido et al. 2023): exp of the entropy of the normalized singular values of the
  teacher's class tokens over a rolling window of recent batches; 1 when every token is the same direction.

With the coding-rate objective (losses/coding_rate.py) there are no targets: the view agreement is measured on the
teacher's class-token embeddings instead, as the cosine distance 1 - z.z' between one image's two views ("dist
same") against two images' ("dist other"), and the DINO term is its class alignment (a distance, not nats). A fresh
network's embeddings of two views are already closer than two images' (they share colors and layout: a gap of
about 0.37 at the demo's first step), so its verdict measures the gap against the run's first logged value.

`HealthPanel` keeps the window and the values of the last observed step; train.py feeds it and logs its scalars
under `health/`. In a data-parallel run each rank measures its own batch; rank 0 logs its own.
"""

from __future__ import annotations

import math
import time
from collections import deque

import torch
import torch.nn.functional as F

# Target probabilities below this count as this in a cross-entropy between targets: Sinkhorn-Knopp targets at a
# low temperature underflow to 0, and the CE of a target against a zero entry would be infinite. It bounds one
# entry's contribution at ln(1e12) = 27.6 nats.
TARGET_EPS = 1e-12
RANK_WINDOW_BATCHES = 8  # batches of teacher class tokens in the RankMe window
# Verdict thresholds, as fractions of ln K: a gap under GAP_STARTED * ln K is "no more alike than two images'"
# and a DINO term above TERM_AT_UNIFORM * ln K has not left its uniform value (README.md, "Is my run learning?",
# has the values of starved and learning runs).
GAP_STARTED = 0.1
TERM_AT_UNIFORM = 0.97
# Coding-rate objective: the view gap (cosine distance, of 2) must grow by this much over its first logged value.
GAP_STARTED_EMBEDDINGS = 0.1
COLLAPSED_SPREAD = 0.1  # std * sqrt(d) below this: the class tokens have collapsed to (nearly) one direction


@torch.no_grad()
def target_entropy(targets: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the rows of `targets` [N, K] (each a probability distribution)."""
    p = targets.float()
    return -(p * torch.log(p.clamp_min(TARGET_EPS))).sum(dim=-1).mean()


@torch.no_grad()
def target_cross_entropy(targets: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Mean over rows b of -sum_k targets[b, k] * ln other[b, k] (nats), entries of `other` floored at TARGET_EPS."""
    return -(targets.float() * torch.log(other.float().clamp_min(TARGET_EPS))).sum(dim=-1).mean()


@torch.no_grad()
def view_agreement(targets: torch.Tensor, n_global: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE same, CE other) of crop-major targets [n_global * B, K]: the cross-entropy from each image's first crop's
    targets to its second crop's, and to the next image's second crop's (image b against b + 1, cyclic). Needs
    B >= 2 and two global crops."""
    if n_global < 2 or targets.shape[0] % n_global or targets.shape[0] // n_global < 2:
        raise ValueError(f"view_agreement needs two global crops of at least 2 images, crop-major; got "
                         f"{targets.shape[0]} rows for n_global={n_global}")
    first, second = targets.unflatten(0, (n_global, -1))[:2]
    return target_cross_entropy(first, second), target_cross_entropy(first, second.roll(-1, dims=0))


@torch.no_grad()
def embedding_view_distance(embeddings: torch.Tensor, n_global: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(dist same, dist other) of crop-major normalized embeddings [n_global * B, d]: the mean cosine distance
    1 - z.z' from each image's first crop to its second crop, and to the next image's second crop (cyclic)."""
    if n_global < 2 or embeddings.shape[0] % n_global or embeddings.shape[0] // n_global < 2:
        raise ValueError(f"embedding_view_distance needs two global crops of at least 2 images, crop-major; got "
                         f"{embeddings.shape[0]} rows for n_global={n_global}")
    first, second = F.normalize(embeddings.float(), dim=-1).unflatten(0, (n_global, -1))[:2]
    return 1 - (first * second).sum(-1).mean(), 1 - (first * second.roll(-1, dims=0)).sum(-1).mean()


@torch.no_grad()
def token_spread(tokens: torch.Tensor) -> torch.Tensor:
    """Std across the rows of the L2-normalized `tokens` [N, d], averaged over the d dimensions: about 1/sqrt(d)
    for tokens spread over the sphere, 0 when all rows point the same way."""
    return F.normalize(tokens.float(), dim=-1).std(dim=0, unbiased=False).mean()


@torch.no_grad()
def effective_rank(tokens: torch.Tensor) -> torch.Tensor:
    """RankMe of `tokens` [N, d]: exp(entropy of the singular values divided by their sum); in [1, min(N, d)]."""
    singular = torch.linalg.svdvals(tokens.float())
    p = singular / singular.sum().clamp_min(torch.finfo(torch.float32).tiny)
    return torch.exp(-(p * torch.log(p.clamp_min(TARGET_EPS))).sum())


class HealthPanel:
    """The health values of a run. Each step `observe_class_tokens` adds the teacher's class tokens to the RankMe
    window; on a log step `observe_targets` measures the targets and `scalars` gives every value (`health/` names).
    The history of the logged values makes the run's verdict."""

    def __init__(self, dino_prototypes: int, ibot_prototypes: int, window_batches: int = RANK_WINDOW_BATCHES,
                 objective: str = "dino"):
        self.ln_k_dino, self.ln_k_ibot = math.log(dino_prototypes), math.log(ibot_prototypes)
        self.embeddings = objective == "coding_rate"  # no targets: view agreement of the teacher's embeddings
        self.window: deque[torch.Tensor] = deque(maxlen=window_batches)
        self.pending: dict[str, torch.Tensor] = {}
        self.history: list[tuple[int, dict[str, float]]] = []
        self.seconds = 0.0  # wall time spent in the panel (the overhead it adds to a run)

    @torch.no_grad()
    def observe_class_tokens(self, cls_tokens: torch.Tensor) -> None:
        start = time.perf_counter()
        self.window.append(cls_tokens.detach().float().clone())
        self.seconds += time.perf_counter() - start

    @torch.no_grad()
    def observe_targets(self, dino_targets: torch.Tensor, ibot_targets: torch.Tensor, n_global: int) -> None:
        """The step's teacher targets, before any control reorders them: DINO [n_global * B, K] crop-major,
        iBOT [M, K'] (M may be 0: no masked patch this step)."""
        start = time.perf_counter()
        self.pending["dino_entropy"] = target_entropy(dino_targets)
        if ibot_targets.shape[0]:
            self.pending["ibot_entropy"] = target_entropy(ibot_targets)
        if n_global >= 2 and dino_targets.shape[0] >= 2 * n_global:
            self.pending["view_ce_same"], self.pending["view_ce_other"] = view_agreement(dino_targets, n_global)
        self.seconds += time.perf_counter() - start

    @torch.no_grad()
    def observe_embeddings(self, dino_embeddings: torch.Tensor, n_global: int) -> None:
        """The coding-rate objective's stand-in for `observe_targets`: the teacher's class-token embeddings
        [n_global * B, d], crop-major."""
        start = time.perf_counter()
        if n_global >= 2 and dino_embeddings.shape[0] >= 2 * n_global:
            self.pending["view_dist_same"], self.pending["view_dist_other"] = embedding_view_distance(
                dino_embeddings, n_global)
        self.seconds += time.perf_counter() - start

    def scalars(self, step: int, terms: dict[str, float]) -> dict[str, float]:
        """Every health value of this step (`health/<name>`), given the step's loss terms; kept in the history."""
        start = time.perf_counter()
        values = {name: value.item() for name, value in self.pending.items()}
        self.pending = {}
        if "view_ce_same" in values:
            values["view_gap"] = values["view_ce_other"] - values["view_ce_same"]
        if "view_dist_same" in values:
            values["view_gap"] = values["view_dist_other"] - values["view_dist_same"]
        if "dino_entropy" in values:
            values["dino_entropy_over_ln_k"] = values["dino_entropy"] / self.ln_k_dino
        if "ibot_entropy" in values:
            values["ibot_entropy_over_ln_k"] = values["ibot_entropy"] / self.ln_k_ibot
        if not self.embeddings:  # the coding-rate objective's terms are distances, not nats
            values["dino_term_over_ln_k"] = terms["dino"] / self.ln_k_dino
            values["ibot_term_over_ln_k"] = terms["ibot"] / self.ln_k_ibot
        if self.window:
            latest = self.window[-1]
            values["cls_std"] = token_spread(latest).item()
            values["cls_std_sqrt_d"] = values["cls_std"] * math.sqrt(latest.shape[1])
            values["rankme"] = effective_rank(torch.cat(list(self.window))).item()
        self.history.append((step, values))
        self.seconds += time.perf_counter() - start
        return values

    def console(self, values: dict[str, float]) -> str:
        """The compact form for the console line."""
        parts = []
        if "dino_entropy" in values:
            parts.append(f"H(t) {values['dino_entropy']:.2f}/{self.ln_k_dino:.2f}")
        if "dino_term_over_ln_k" in values:
            parts.append(f"dino/lnK {values['dino_term_over_ln_k']:.3f}")
        if "view_gap" in values:
            parts.append(f"view gap {values['view_gap']:.2f}")
        if "cls_std_sqrt_d" in values:
            parts.append(f"std*sqrt(d) {values['cls_std_sqrt_d']:.2f} rank {values['rankme']:.1f}")
        return "health: " + " ".join(parts)

    def verdict(self, last_n: int = 3) -> str:
        """One line on the run: collapsed, the DINO objective not started, starting, or learning; from the mean of
        the last `last_n` logged steps."""
        if not self.history:
            return "no step logged"
        step = self.history[-1][0]
        recent = [values for _, values in self.history[-last_n:]]

        def mean(name: str) -> float | None:
            seen = [v[name] for v in recent if name in v]
            return sum(seen) / len(seen) if seen else None

        spread, term, gap = mean("cls_std_sqrt_d"), mean("dino_term_over_ln_k"), mean("view_gap")
        same, other = mean("view_ce_same"), mean("view_ce_other")
        if spread is not None and spread < COLLAPSED_SPREAD:
            return (f"collapsed: the class tokens point (nearly) one way (std x sqrt(d) {spread:.3f}, rank "
                    f"{mean('rankme'):.1f}) after {step} steps")
        if self.embeddings:
            return self._embedding_verdict(step, gap, mean("view_dist_same"), mean("view_dist_other"))
        if gap is None:
            return f"the DINO term is at {term:.3f} ln K after {step} steps (no view agreement: one image per step)"
        views = f"CE same {same:.2f} vs CE other {other:.2f} nats, gap {gap / self.ln_k_dino:.3f} ln K"
        if gap < GAP_STARTED * self.ln_k_dino and term > TERM_AT_UNIFORM:
            return (f"the DINO objective has not started: two views' targets are no more alike than two images' "
                    f"({views}) and the DINO term is at {term:.3f} ln K after {step} steps")
        if gap >= GAP_STARTED * self.ln_k_dino and term <= TERM_AT_UNIFORM:
            return (f"the DINO objective is learning: two views' targets agree more than two images' ({views}) and "
                    f"the DINO term is down to {term:.3f} ln K after {step} steps")
        return f"the DINO objective is starting: {views}, DINO term at {term:.3f} ln K after {step} steps"

    def _embedding_verdict(self, step: int, gap: float | None, same: float | None, other: float | None) -> str:
        first = next((values["view_gap"] for _, values in self.history if "view_gap" in values), None)
        if gap is None or first is None:
            return f"the coding-rate objective after {step} steps (no view agreement: one image per step)"
        views = (f"cosine distance same {same:.3f} vs other {other:.3f}, gap {gap:.3f} against {first:.3f} at the "
                 f"first logged step")
        if gap < first + GAP_STARTED_EMBEDDINGS:
            return (f"the coding-rate objective has not started: two views' embeddings are no closer, against two "
                    f"images', than at the start ({views}) after {step} steps")
        return (f"the coding-rate objective is learning: two views' embeddings have come closer than two images' "
                f"({views}) after {step} steps")
