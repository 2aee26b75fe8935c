"""Settings of `tiger serve` (and of the Serve config YAML's ``args``): one dataclass, three presets.

    tiny   tests: small CPU shares so the whole app fits beside other tests on 2 cores
    cpu    this 2-core machine: one TIGER replica with a full core, the baseline and ingress beside it
    paper  a GPU cluster: TIGER replicas on one GPU each, bigger batches
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tiger_ray.ray_env import LOOPBACK
from tiger_ray.serving.schema import DEFAULT_MAX_BODY_BYTES

MODELS = ("tiger", "ann", "hybrid")
DEFAULT_MODELS = ("tiger", "ann")  # the hybrid is served when asked for (it needs tune-hybrid)


@dataclass
class ServeConfig:
    # ---- where
    host: str = field(default=LOOPBACK, metadata={
        "help": "address the HTTP proxy binds to (0.0.0.0 exposes it to the network)"})
    port: int = field(default=8000, metadata={"help": "HTTP port"})
    models: tuple[str, ...] = field(default=DEFAULT_MODELS, metadata={
        "help": "models to serve: tiger, ann, hybrid (TIGER + dual encoder; `tiger tune-hybrid` first)"})
    app_name: str = field(default="tiger", metadata={"help": "Serve application name"})
    # ---- TIGER deployment
    tiger_replicas: int = field(default=1, metadata={"help": "TIGER replicas"})
    tiger_max_batch_size: int = field(default=32, metadata={
        "help": "most TIGER requests decoded together (one beam search per batch)"})
    tiger_cpus: float = field(default=1.0, metadata={"help": "CPUs reserved per TIGER replica"})
    beam_size: int = field(default=0, metadata={
        "help": "TIGER beam size (0 = the retriever's default)"})
    temperature: float = field(default=0.0, metadata={
        "help": "default TIGER temperature (0 = beam search); requests may override it"})
    # ---- baseline deployment
    ann_replicas: int = field(default=1, metadata={"help": "dual-encoder + FAISS replicas"})
    ann_max_batch_size: int = field(default=64, metadata={"help": "most baseline requests searched together"})
    ann_cpus: float = field(default=0.5, metadata={"help": "CPUs reserved per baseline replica"})
    ann_index_type: str = field(default="", metadata={
        "help": "FAISS index to load (flat, ivf, hnsw, ...; empty = the one chosen at training)"})
    # ---- hybrid deployment (it holds both models)
    hybrid_replicas: int = field(default=1, metadata={"help": "hybrid replicas"})
    hybrid_max_batch_size: int = field(default=32, metadata={"help": "most hybrid requests decoded together"})
    hybrid_cpus: float = field(default=1.0, metadata={"help": "CPUs reserved per hybrid replica"})
    hybrid_tiger_weight: float = field(default=-1.0, metadata={
        "help": "hybrid: TIGER's share of the mixed score (-1 = the one `tiger tune-hybrid` chose)"})
    # ---- every model deployment
    batch_wait_timeout_s: float = field(default=0.005, metadata={
        "help": "longest a request waits for others to fill its batch"})
    max_ongoing_requests: int = field(default=128, metadata={
        "help": "requests one model replica holds at once (>= max batch size, so batches can fill)"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per model replica"})
    torch_threads: int = field(default=0, metadata={
        "help": "intra-op threads per model replica (0 = its CPU share, at least 1)"})
    # ---- HTTP ingress
    ingress_replicas: int = field(default=1, metadata={"help": "FastAPI ingress replicas"})
    ingress_cpus: float = field(default=0.25, metadata={"help": "CPUs reserved per ingress replica"})
    ingress_max_ongoing_requests: int = field(default=256, metadata={
        "help": "requests one ingress replica holds at once"})
    max_body_bytes: int = field(default=DEFAULT_MAX_BODY_BYTES, metadata={
        "help": "larger request bodies are refused with 413"})
    access_log: bool = field(default=False, metadata={
        "help": "log every request in every replica (Serve's access log; costs throughput)"})

    def __post_init__(self):
        self.models = tuple(self.models)
        unknown = [m for m in self.models if m not in MODELS]
        if unknown or not self.models:
            raise ValueError(f"models: choose from {', '.join(MODELS)}, got {list(self.models)}")
        for name in ("tiger_replicas", "ann_replicas", "hybrid_replicas", "ingress_replicas",
                     "tiger_max_batch_size", "ann_max_batch_size", "hybrid_max_batch_size",
                     "max_ongoing_requests", "ingress_max_ongoing_requests", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("tiger_cpus", "ann_cpus", "hybrid_cpus", "ingress_cpus", "batch_wait_timeout_s", "beam_size",
                     "temperature", "torch_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.hybrid_tiger_weight != -1.0 and not 0.0 <= self.hybrid_tiger_weight <= 1.0:
            raise ValueError(f"hybrid_tiger_weight must be in [0, 1] (or -1), got {self.hybrid_tiger_weight}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")

    def max_batch_size(self, model: str) -> int:
        return getattr(self, f"{model}_max_batch_size")

    def replicas(self, model: str) -> int:
        return getattr(self, f"{model}_replicas")

    def cpus(self, model: str) -> float:
        return getattr(self, f"{model}_cpus")

    def model_options(self, model: str) -> dict:
        """Keyword options for ``load_retriever(run, model, **options)``; unset ones are left out."""
        if model == "tiger":
            options = {"beam_size": self.beam_size or None, "temperature": self.temperature or None}
        elif model == "hybrid":
            options = {"tiger_candidates": self.beam_size or None, "index_type": self.ann_index_type or None,
                       "tiger_weight": None if self.hybrid_tiger_weight == -1.0 else self.hybrid_tiger_weight}
        else:
            options = {"index_type": self.ann_index_type or None}
        if self.use_gpu:
            options["device"] = "cuda"
        return {k: v for k, v in options.items() if v is not None}


PRESETS: dict[str, dict] = {
    "tiny": dict(tiger_cpus=0.25, ann_cpus=0.25, hybrid_cpus=0.25, ingress_cpus=0.1,
                 tiger_max_batch_size=8, ann_max_batch_size=8, hybrid_max_batch_size=8,
                 batch_wait_timeout_s=0.02, max_ongoing_requests=32, ingress_max_ongoing_requests=64,
                 torch_threads=1),
    "cpu": {},
    "paper": dict(use_gpu=True, tiger_replicas=4, tiger_cpus=2.0, tiger_max_batch_size=128,
                  ann_replicas=2, ann_cpus=2.0, ann_max_batch_size=256, ingress_replicas=2,
                  ingress_cpus=1.0, max_ongoing_requests=512, ingress_max_ongoing_requests=1024),
}
