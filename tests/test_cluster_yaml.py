"""cluster.yaml: valid for Ray's cluster launcher, and its node types can run what the jobs ask for.

The resource requests are not written down here: they are computed from the stages' own `paper`
presets with --use-gpu (what a cluster run uses), so a preset that outgrows the cluster fails here.
"""

from __future__ import annotations

import json
import re
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_MOUNT = "/mnt/tiger"
# vCPUs and GPUs of the instance types cluster.yaml may use (AWS EC2 documentation); the
# resources a node type declares must exist on its hardware.
INSTANCE_HARDWARE = {
    "m5.2xlarge": {"CPU": 8, "GPU": 0},
    "m5.4xlarge": {"CPU": 16, "GPU": 0},
    "m5.8xlarge": {"CPU": 32, "GPU": 0},
    "g5.xlarge": {"CPU": 4, "GPU": 1},
    "g5.2xlarge": {"CPU": 8, "GPU": 1},
    "g5.4xlarge": {"CPU": 16, "GPU": 1},
    "g5.12xlarge": {"CPU": 48, "GPU": 4},
}


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_valid_for_rays_cluster_launcher(cluster):
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)
    # What `ray up` itself does: merge the provider defaults, then validate (no cloud calls).
    validate_config(prepare_config(json.loads(json.dumps(cluster))))


def test_image_matches_the_pinned_ray_and_python(cluster):
    import ray

    image = cluster["docker"]["image"]
    match = re.fullmatch(r"rayproject/ray:(?P<ray>[\d.]+)-py(?P<py>\d+)-(gpu|cu\d+)", image)
    assert match, image
    assert match["ray"] == ray.__version__
    assert match["py"] == f"{sys.version_info.major}{sys.version_info.minor}"
    assert f"-v {SHARED_MOUNT}:{SHARED_MOUNT}" in cluster["docker"]["run_options"]


def test_node_types_declare_what_their_hardware_has(cluster):
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    for name, node in types.items():
        hardware = INSTANCE_HARDWARE[node["node_config"]["InstanceType"]]
        assert set(node["resources"]) >= {"CPU", "GPU"}, f"{name}: declare CPU and GPU explicitly"
        for resource, amount in node["resources"].items():
            assert amount <= hardware[resource], f"{name}: {resource}={amount} > {hardware}"
    workers = {n: t for n, t in types.items() if n != cluster["head_node_type"]}
    assert any(t["resources"]["GPU"] >= 1 for t in workers.values()), "no GPU worker group"
    assert all(t.get("min_workers", 0) == 0 for t in workers.values()), "workers should scale to zero"
    assert sum(t["max_workers"] for t in workers.values()) <= cluster["max_workers"]


# ---------------------------------------------------------------- what the jobs ask for

def _trainer_bundles(config) -> list[dict]:
    """Ray Train workers / actor pools: `workers` bundles of {cpus_per_worker CPU, 1 GPU if use_gpu}."""
    names = {"workers", "cpus_per_worker", "use_gpu"}
    if not names <= set(vars(config)):
        return []
    bundle = {"CPU": config.cpus_per_worker, "GPU": 1 if config.use_gpu else 0}
    # workers=0 means "one per GPU" (tiger embed): at least one must fit.
    bundles = [bundle] * max(config.workers, 1)
    if getattr(config, "assign_concurrency", 0):  # RQ-VAE semantic-id assignment actors
        bundles += [{"CPU": 0, "GPU": 1} if config.use_gpu else {"CPU": 1, "GPU": 0}] * config.assign_concurrency
    return bundles


def job_requests() -> dict[str, list[dict]]:
    """Per stage of `tiger pipeline --preset paper --use-gpu`, and `tiger serve --preset paper`."""
    from tiger_ray.pipeline import STAGES
    from tiger_ray.serving.settings import PRESETS, ServeConfig

    requests = {stage.name: _trainer_bundles(stage.build_config("paper", {"use_gpu": True}))
                for stage in STAGES}
    serve = ServeConfig(**PRESETS["paper"])
    gpu = 1 if serve.use_gpu else 0
    requests["serve"] = ([{"CPU": serve.tiger_cpus, "GPU": gpu}] * serve.tiger_replicas
                         + [{"CPU": serve.ann_cpus, "GPU": gpu}] * serve.ann_replicas
                         + [{"CPU": serve.ingress_cpus, "GPU": 0}] * serve.ingress_replicas)
    return {name: bundles for name, bundles in requests.items() if bundles}


def place(bundles: list[dict], cluster: dict) -> bool:
    """First-fit-decreasing of ``bundles`` onto the largest cluster the autoscaler may build."""
    nodes = []
    for name, node in cluster["available_node_types"].items():
        count = 1 if name == cluster["head_node_type"] else node["max_workers"]
        nodes += [dict(node["resources"]) for _ in range(count)]
    for bundle in sorted(bundles, key=lambda b: (b["GPU"], b["CPU"]), reverse=True):
        for free in nodes:
            if all(free.get(k, 0) >= v for k, v in bundle.items()):
                for k, v in bundle.items():
                    free[k] = free.get(k, 0) - v
                break
        else:
            return False
    return True


def test_every_job_fits_on_the_cluster(cluster):
    requests = job_requests()
    # The trainers and the service ask for GPUs on a cluster; the check below must cover them.
    assert {"train-rqvae", "train-seq2seq", "train-baseline", "embed", "serve"} <= set(requests)
    assert all(b["GPU"] >= 1 for b in requests["train-seq2seq"])
    for name, bundles in requests.items():
        assert place(bundles, cluster), f"{name}: {bundles} does not fit on {cluster['available_node_types']}"
    # The CPU-only work (embedding / evaluation without GPUs) fits too.
    cpu_embed = [{"CPU": 1.0, "GPU": 0}] * 16
    assert place(cpu_embed, cluster)


def test_place_can_refuse():
    tiny = {"head_node_type": "h", "available_node_types": {
        "h": {"resources": {"CPU": 0, "GPU": 0}},
        "g": {"resources": {"CPU": 4, "GPU": 1}, "max_workers": 2}}}
    assert place([{"CPU": 4, "GPU": 1}] * 2, tiny)
    assert not place([{"CPU": 4, "GPU": 1}] * 3, tiny)
    assert not place([{"CPU": 5, "GPU": 0}], tiny)


# ---------------------------------------------------------------- setup and shared storage

def test_setup_installs_this_project_with_cuda_torch_and_faiss_gpu(cluster):
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    torch_pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch=="))
    assert any(d.startswith("faiss-gpu") for d in pyproject["project"]["optional-dependencies"]["gpu"])
    commands = cluster["setup_commands"]
    torch_step = next(i for i, c in enumerate(commands) if f'"{torch_pin}"' in c)
    assert "--index-url https://download.pytorch.org/whl/cu" in commands[torch_step]
    uninstall = next(i for i, c in enumerate(commands) if "uninstall" in c and "faiss-cpu" in c)
    mount = next(remote for remote, local in cluster["file_mounts"].items() if local == ".")
    project = next(i for i, c in enumerate(commands) if mount.replace("~", "$HOME") + "[gpu]" in c)
    assert torch_step < project and uninstall < project
    assert {".venv", "runs", ".git"} <= set(cluster["rsync_exclude"])


def test_every_node_sees_the_shared_storage_and_the_job_settings(cluster):
    import importlib.util

    from tiger_ray.data.prepare import DATA_DIR_ENV

    spec = importlib.util.spec_from_file_location("tiger_jobs_common", REPO / "jobs" / "_job.py")
    _job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(_job)

    head_init = " ".join(cluster["initialization_commands"])
    assert "nfs-kernel-server" in head_init and f"{SHARED_MOUNT} " in head_init
    head = cluster["head_node_type"]
    for name, node in cluster["available_node_types"].items():
        if name != head:
            init = " ".join(node["initialization_commands"])
            assert f"$RAY_HEAD_IP:{SHARED_MOUNT} {SHARED_MOUNT}" in init, name
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(cluster[key])
        for variable in (_job.STAGE_DIR_ENV, DATA_DIR_ENV):
            assert re.search(rf"\b{variable}={SHARED_MOUNT}/", start), (key, variable)
    assert "--dashboard-host=127.0.0.1" in " ".join(cluster["head_start_ray_commands"])
