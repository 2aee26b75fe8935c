"""k-means in plain PyTorch: k-means++ seeding, then Lloyd iterations; deterministic given a seed.

Used to initialise each RQ-VAE codebook from a large batch of residuals (TIGER section 3.1), so
codes start where the data is instead of in empty space, which is where codebook collapse begins.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def squared_distances(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """[N, K] squared Euclidean distances, without the [N, K, D] intermediate of broadcasting."""
    d = (x * x).sum(1, keepdim=True) - 2 * x @ centroids.T + (centroids * centroids).sum(1)
    return d.clamp_min_(0)


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # [K, D]
    assignments: torch.Tensor  # [N] int64
    inertia: float  # mean squared distance of a point to its centroid


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Pick k distinct seed rows, each with probability proportional to its distance to the seeds so far."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centroids = [x[first]]
    closest = squared_distances(x, x[first : first + 1]).squeeze(1)
    for _ in range(1, k):
        total = closest.sum()
        if total <= 0:  # every point is already a seed (duplicates): fall back to uniform picks
            idx = int(torch.randint(n, (1,), generator=generator))
        else:
            idx = int(torch.multinomial(closest / total, 1, generator=generator))
        centroids.append(x[idx])
        closest = torch.minimum(closest, squared_distances(x, x[idx : idx + 1]).squeeze(1))
    return torch.stack(centroids)


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters: int = 25, seed: int = 0) -> KMeansResult:
    """Cluster the rows of ``x`` [N, D] into ``k`` centroids.

    With fewer rows than ``k`` the rows are repeated with a little noise, so every centroid still
    sits on the data. Clusters that empty out during Lloyd steps are moved to the points farthest
    from their centroids, so all ``k`` centroids stay in use.
    """
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"kmeans needs a non-empty [N, D] matrix, got shape {tuple(x.shape)}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    device, dtype = x.device, x.dtype
    x = x.detach().to("cpu", torch.float32)
    n = x.shape[0]
    if n < k:
        extra = x[torch.randint(x.shape[0], (k - x.shape[0],), generator=generator)]
        scale = 1e-3 * (x.std() if x.shape[0] > 1 else x.abs().mean()).clamp_min(1e-6)
        x = torch.cat([x, extra + scale * torch.randn(extra.shape, generator=generator)])
    centroids = kmeans_plus_plus(x, k, generator)
    for _ in range(iters):
        dist = squared_distances(x, centroids)
        assignments = dist.argmin(1)
        counts = torch.bincount(assignments, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centroids).index_add_(0, assignments, x)
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp_min(1)[:, None])
        if empty.any():
            far = dist.gather(1, assignments[:, None]).squeeze(1).topk(int(empty.sum())).indices
            centroids[empty] = x[far]
    dist = squared_distances(x[:n], centroids)
    assignments = dist.argmin(1)
    inertia = float(dist.gather(1, assignments[:, None]).mean())
    return KMeansResult(centroids.to(device, dtype), assignments.to(device), inertia)
