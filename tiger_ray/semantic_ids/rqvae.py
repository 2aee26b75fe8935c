"""RQ-VAE (TIGER, Rajput et al. 2023, section 3.1): item embedding -> 3 codewords.

An MLP encoder maps an item's text embedding x to a latent z. Residual quantisation then picks one
codeword per level from that level's codebook, each time quantising what the previous levels left:

    r_0 = z;   c_l = argmin_k ||r_l - e_{l,k}||;   r_{l+1} = r_l - e_{l,c_l};   z_hat = sum_l e_{l,c_l}

and an MLP decoder mirroring the encoder reconstructs x from z_hat. Training minimises

    ||x - x_hat||^2  +  sum_l ( ||sg[r_l] - e_l||^2  +  beta * ||r_l - sg[e_l]||^2 )

with straight-through gradients from the decoder to the encoder (the argmin has no gradient).
The tuple (c_0, c_1, c_2) is an item's Semantic ID prefix; similar items share leading codes.

Plain PyTorch: no Ray import here. Training loops live in ``trainer.py`` (plain) and
``ray_train.py`` (Ray Train).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# The config lives in a torch-free module so `tiger --help` can build flags without torch.
from tiger_ray.semantic_ids.config import ARCHITECTURE_FIELDS, PRESETS, RQVAEConfig  # noqa: F401
from tiger_ray.semantic_ids.kmeans import kmeans, squared_distances


def mlp(dims: list[int]) -> nn.Sequential:
    """Linear layers with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@dataclass
class RQVAEOutput:
    x_hat: torch.Tensor  # [B, input_dim] reconstruction
    codes: torch.Tensor  # [B, num_levels] int64
    loss: torch.Tensor  # scalar: recon + (1 + beta) * quant
    recon_loss: torch.Tensor  # mean over the batch of ||x - x_hat||^2
    # sum over levels of ||r_l - e_l||^2: the value of both the codebook term ||sg[r] - e||^2 (which
    # moves codewords) and the commitment term ||r - sg[e]||^2 (which moves the encoder)
    quant_loss: torch.Tensor


class RQVAE(nn.Module):
    def __init__(self, config: RQVAEConfig, input_dim: int):
        super().__init__()
        self.config = config
        self.input_dim = input_dim
        dims = [input_dim, *config.hidden_dims, config.latent_dim]
        self.encoder = mlp(dims)
        self.decoder = mlp(dims[::-1])
        # One tensor for all levels: [levels, codes, dim]. Random until k-means initialises it.
        self.codebooks = nn.Parameter(torch.randn(config.num_levels, config.codebook_size, config.latent_dim) * 0.1)
        # 1 once the codebooks were k-means initialised; saved with the weights so a resumed
        # run does not initialise twice.
        self.register_buffer("initialized", torch.zeros((), dtype=torch.long))

    # -- quantisation

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z_hat, codes [B, L], codebook loss, commitment loss (unweighted)) for latents z [B, D]."""
        residual = z
        z_hat = torch.zeros_like(z)
        codes, codebook_loss, commitment_loss = [], z.new_zeros(()), z.new_zeros(())
        for level in range(self.config.num_levels):
            book = self.codebooks[level]
            code = squared_distances(residual.detach(), book.detach()).argmin(1)
            e = book[code]  # gradient reaches the codebook only through the codebook loss
            codebook_loss = codebook_loss + (residual.detach() - e).pow(2).sum(1).mean()
            commitment_loss = commitment_loss + (residual - e.detach()).pow(2).sum(1).mean()
            z_hat = z_hat + e.detach()
            residual = residual - e.detach()
            codes.append(code)
        return z_hat, torch.stack(codes, 1), codebook_loss, commitment_loss

    def forward(self, x: torch.Tensor) -> RQVAEOutput:
        z = self.encoder(x)
        z_hat, codes, codebook_loss, commitment_loss = self.quantize(z)
        # Straight-through: the decoder sees z_hat, its gradient flows to z unchanged.
        x_hat = self.decoder(z + (z_hat - z).detach())
        recon_loss = (x - x_hat).pow(2).sum(1).mean()
        loss = recon_loss + codebook_loss + self.config.beta * commitment_loss
        return RQVAEOutput(x_hat, codes, loss, recon_loss, codebook_loss.detach())

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes [B, L], squared reconstruction error [B]) for a batch of embeddings."""
        z_hat, codes, _, _ = self.quantize(self.encoder(x))
        return codes, (x - self.decoder(z_hat)).pow(2).sum(1)

    @torch.no_grad()
    def residuals(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The residual each level quantises, [B, D] per level, with the current codebooks."""
        residual, out = self.encoder(x), []
        for level in range(self.config.num_levels):
            out.append(residual)
            book = self.codebooks[level]
            residual = residual - book[squared_distances(residual, book).argmin(1)]
        return out

    # -- codebook initialisation and maintenance

    @torch.no_grad()
    def init_codebooks(self, x: torch.Tensor, iters: int = 25, seed: int = 0) -> list[float]:
        """k-means each level on the residuals the previous (already initialised) levels leave.

        Returns the k-means inertia per level.
        """
        residual, inertia = self.encoder(x), []
        for level in range(self.config.num_levels):
            result = kmeans(residual, self.config.codebook_size, iters=iters, seed=seed + level)
            self.codebooks[level] = result.centroids
            residual = residual - result.centroids[result.assignments]
            inertia.append(result.inertia)
        self.initialized.fill_(1)
        return inertia

    @torch.no_grad()
    def reseed_dead_codes(self, x: torch.Tensor, dead: torch.Tensor, generator: torch.Generator) -> list[int]:
        """Move the codes flagged in ``dead`` [L, K] onto residuals of ``x``; returns counts per level.

        Level by level, so a level's new codes see residuals of the already-repaired levels above.
        Replacement residuals are drawn with probability proportional to their squared distance to
        the nearest live code (as in k-means++): new codes go where the codebook serves data worst.
        """
        moved = []
        residual = self.encoder(x)
        for level in range(self.config.num_levels):
            book = self.codebooks[level]
            idx = torch.nonzero(dead[level]).squeeze(1)
            if len(idx) and len(idx) < len(book):
                live = torch.ones(len(book), dtype=torch.bool, device=book.device)
                live[idx] = False
                dist = squared_distances(residual, book[live]).min(1).values.cpu().double()
                weights = dist.clamp_min(1e-12)  # rows sitting exactly on a code stay possible
                rows = torch.multinomial(weights, len(idx), replacement=len(idx) > len(residual),
                                         generator=generator).to(residual.device)
                new = residual[rows]
                if len(idx) > len(residual):  # more dead codes than rows: jitter the duplicates
                    noise = torch.randn(new.shape, generator=generator).to(new) * 1e-3 * residual.std()
                    new = new + noise
                book[idx] = new
            moved.append(int(len(idx)) if len(idx) < len(book) else 0)
            residual = residual - book[squared_distances(residual, book).argmin(1)]
        return moved


def build_optimizer(model: nn.Module, config: RQVAEConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adagrad":
        return torch.optim.Adagrad(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def reset_optimizer_rows(optimizer: torch.optim.Optimizer, codebooks: torch.Tensor, dead: torch.Tensor) -> None:
    """Forget the optimiser's running statistics for re-seeded codes: they start a new life."""
    state = optimizer.state.get(codebooks, {})
    for value in state.values():
        if torch.is_tensor(value) and value.shape == codebooks.shape:
            value[dead] = 0


# -- saving the final model: a plain dict of tensors and numbers, loadable with weights_only=True

def model_payload(model: RQVAE) -> dict:
    from dataclasses import asdict

    return {"config": asdict(model.config), "input_dim": model.input_dim,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}


def model_from_payload(payload: dict) -> RQVAE:
    from tiger_ray.config import from_dict

    config = from_dict(RQVAEConfig, payload["config"])
    model = RQVAE(config, int(payload["input_dim"]))
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def load_model(path, device: str | torch.device = "cpu") -> RQVAE:
    """Load ``RUN/semantic_ids/model.pt`` (written by ``save_model``)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    return model_from_payload(payload).to(device)


def save_model(model: RQVAE, path) -> None:
    from tiger_ray import atomic

    with atomic.atomic_path(path) as tmp:
        torch.save(model_payload(model), tmp)
