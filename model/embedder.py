"""DINOv2 image embeddings through timm: the vectors the indexer stores and searches.

One loading path for every source: a timm name (``vit_small_patch14_dinov2.lvd142m``, or the aliases
``small``/``base``/``large``/``giant``) and a local folder laid out as timm's hub repositories are
(``config.json`` + ``model.safetensors``, what ``hf download timm/<name> --local-dir DIR`` or
``timm.models.save_for_hf`` writes) both go through ``timm.create_model(..., pretrained=True)``; a
folder is named ``local-dir:<path>``, timm's own source prefix. So weights on disk are read exactly
as weights from the Hub would be, position embeddings resampled to the chosen resolution included.

Preprocessing is the model's own (timm's data config: resize the short side, centre crop, bicubic,
ImageNet mean/std), at an explicit input size: the pretrained config of DINOv2 says 518 px whatever
size the model was built for, so we always pass ``input_size`` (MODEL-NOTES.md). Preprocessing (PIL
images to a CPU tensor) and the forward pass (tensor to L2-normalised CLS features) are separate steps,
and :meth:`DinoV2Embedder.embed` runs them on ``model.pipeline``: preprocessing on one thread per core
while the device runs the previous batch. Done one after the other on the calling thread, preprocessing
was the whole cost on a GPU (35-53 of its 3,000-12,000 images/s, README "Embedding on a GPU").
:meth:`~DinoV2Embedder.stages` gives the same steps to a caller that loads images itself and wants a
broken one to fail alone (``Pipeline.run``'s ``item_errors``).

The embedder's :attr:`~DinoV2Embedder.version` (model, weights fingerprint, resolution, precision) is
the index's version: vectors of different versions are never mixed. It can be computed before the model
is loaded (:func:`embedder_version`). This module imports only torch, timm, PIL and numpy: it runs on
GPU workers that have neither Redis nor faiss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from model.devices import autocast, resolve_device, usable_cores
from model.pipeline import Failed, Pipeline, Stages

__all__ = [
    "DEFAULT_EMBEDDER",
    "DEFAULT_IMAGE_SIZE",
    "EMBEDDER_ALIASES",
    "DinoV2Embedder",
    "create_embedder",
    "embedder_version",
]

log = logging.getLogger(__name__)

DEFAULT_EMBEDDER = "vit_small_patch14_dinov2.lvd142m"
"""ViT-S/14, 384-d: ~26 ms/image in bf16 on a 2-core CPU at 224 px; base/large cost ~3x/~10x."""

EMBEDDER_ALIASES: dict[str, str] = {
    "small": "vit_small_patch14_dinov2.lvd142m",
    "base": "vit_base_patch14_dinov2.lvd142m",
    "large": "vit_large_patch14_dinov2.lvd142m",
    "giant": "vit_giant_patch14_dinov2.lvd142m",
}
"""Short names for the four DINOv2 sizes."""

DEFAULT_IMAGE_SIZE = 224
"""Input side in pixels. DINOv2 was trained at 518; 224 costs about a ninth and is what we index at."""

MAX_IMAGE_SIZE = 1036
"""Largest accepted input side (74 patches of 14 px): beyond it one image alone costs seconds on a GPU."""

_PRECISIONS = ("fp32", "bf16", "fp16")
# Files whose bytes make up a local checkpoint's fingerprint (weights and the architecture arguments).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


class DinoV2Embedder:
    """A loaded DINOv2 model with its preprocessing, kept for the life of the process."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        version: str,
        image_size: int,
        device: torch.device,
        precision: str = "fp32",
        batch_size: int = 16,
        preprocess_threads: int | None = None,
        preprocess_processes: int = 0,
        niceness: int = 0,
    ) -> None:
        """``preprocess_threads``: images preprocessed at once by :meth:`embed` (one per usable core).
        ``preprocess_processes``: processes for the runs of :attr:`pipeline` that hand it bytes to decode
        (``model.pipeline``); :meth:`embed`, given decoded images, preprocesses on threads.
        ``niceness``: those threads and processes run at that lower priority (``model.pipeline``)."""
        from timm.data import create_transform, resolve_data_config

        _check_precision(precision, device)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model = model.eval().to(device)
        self.version = version
        self.image_size = image_size
        self.device = device
        self.precision = precision
        self.batch_size = batch_size
        self.dim = int(model.num_features)
        # input_size explicitly: the pretrained config keeps the 518 px it was trained at.
        self.data_config = resolve_data_config({"input_size": (3, image_size, image_size)}, model=model)
        self.transform = create_transform(**self.data_config, is_training=False)
        self.preprocessor = EmbedderPreprocess(self.transform)
        # Kept for the embedder's life: threads per call would start on every call. The images are
        # already decoded, so a load thread is a preprocessing thread: as many of one as of the other.
        self.pipeline = Pipeline(
            device,
            load_threads=preprocess_threads or usable_cores(),
            preprocess_threads=preprocess_threads,
            preprocess_processes=preprocess_processes,
            niceness=niceness,
        )
        self._model_lock = threading.Lock()

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        """One image -> a float32 CPU tensor ``(1, 3, size, size)``: resize, centre crop, normalise.

        Touches no model state, so it may run on many threads at once (the pipeline's preprocessing).
        """
        return self.preprocessor(image)[0]

    def input_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The (width, height) the resize makes of an image of ``size`` before the centre crop.

        Draft decoding asks for it (``model.images.decode_image``'s ``decode_size``): a 12 MP photo
        embedded at 224 px decodes at 1/8 scale, where resizing the full picture costs tens of ms.
        """
        short = max(1, int(self.image_size / self.data_config.get("crop_pct", 1.0)))
        width, height = size
        scale = short / min(width, height)
        return max(short, round(width * scale)), max(short, round(height * scale))

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Images -> a float32 CPU tensor ``(n, 3, size, size)``, on this thread, one after the other."""
        if not images:
            return torch.empty((0, 3, self.image_size, self.image_size), dtype=torch.float32)
        return torch.cat([self.preprocess_image(image) for image in images])

    def forward(self, batch: torch.Tensor) -> np.ndarray:
        """A preprocessed batch -> float32 ``(n, dim)`` L2-normalised CLS features, on the CPU."""
        if batch.shape[0] == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        return self._features(batch.to(self.device, non_blocking=True)).cpu().numpy()

    def stages(self) -> Stages[Image.Image, None, np.ndarray]:
        """Preprocess, forward and postprocess as ``model.pipeline`` runs them; one row per image.

        The forward pass is serialised by the embedder's lock (the pipeline asks its caller to), so
        several threads may run the embedder's pipeline at once. Its outputs stay on the device until
        the pipeline copies them back without blocking the next batch.
        """

        def forward(pixels: torch.Tensor) -> torch.Tensor:
            with self._model_lock:
                return self._features(pixels)

        return Stages(
            preprocess=self.preprocessor,  # not a method of the embedder: it is pickled for processes
            forward=forward,
            postprocess=lambda features, _: list(features.numpy()),
        )

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embed ``images`` on the pipeline in batches of up to :attr:`batch_size`; rows follow the input order.

        Any exception (a truncated image that fails to decode while being resized) stops the call and
        is raised here, as one call is one matrix; to let a broken image fail alone, run
        :attr:`pipeline` with :meth:`stages` and ``item_errors``.
        """
        rows: list[np.ndarray | None] = [None] * len(images)
        # Decoded images stay on the threads: their pixels would cost more to ship than to resize.
        rows_found = self.pipeline.run(images, _as_is, self.stages(), batch_size=self.batch_size, in_processes=False)
        for index, row in rows_found:
            if isinstance(row, Failed):  # cannot happen without a deadline, timeout or item_errors
                raise RuntimeError(f"image {index} was not embedded: {row.reason}")
            rows[index] = row
        if not rows:
            return np.empty((0, self.dim), dtype=np.float32)
        return np.stack(rows)

    def _features(self, batch: torch.Tensor) -> torch.Tensor:
        """A batch already on the device -> float32 L2-normalised CLS features, still on the device."""
        with torch.inference_mode(), autocast(self.device, self.precision):
            features = self.model(batch)
        return torch.nn.functional.normalize(features.float(), dim=-1)


def create_embedder(
    model: str = DEFAULT_EMBEDDER,
    *,
    image_size: int = DEFAULT_IMAGE_SIZE,
    device: str = "auto",
    precision: str = "fp32",
    batch_size: int = 16,
    preprocess_threads: int | None = None,
    preprocess_processes: int = 0,
    niceness: int = 0,
) -> DinoV2Embedder:
    """Load a DINOv2 model by timm name, alias or local folder (the same ``timm.create_model`` path).

    Args:
        model: ``vit_small_patch14_dinov2.lvd142m`` (default), an alias (``small``, ``base``,
            ``large``, ``giant``), any timm DINOv2 name, or a folder in timm's hub layout.
        image_size: input side in pixels (224), a multiple of the patch size.
        device: ``auto`` (first CUDA GPU, else CPU), ``cpu``, ``cuda``, ``cuda:1``...
        precision: ``fp32``, ``bf16`` (autocast; CPU or GPU) or ``fp16`` (GPU only).
        batch_size: most images per forward pass in :meth:`DinoV2Embedder.embed` (16).
        preprocess_threads: images preprocessed at once in :meth:`DinoV2Embedder.embed` (one per usable core).
        preprocess_processes: processes that decode and preprocess for runs of its pipeline given bytes (0).
        niceness: added to the nice value of its image threads and processes (0).

    Returns:
        The loaded embedder; its ``version`` equals ``embedder_version(model, image_size=..., precision=...)``.
    """
    import timm

    source = _timm_source(model)
    _check_image_size(image_size)
    torch_device = resolve_device(device)
    _check_precision(precision, torch_device)
    version = embedder_version(model, image_size=image_size, precision=precision)
    started = time.perf_counter()
    try:
        network = timm.create_model(source, pretrained=True, num_classes=0, img_size=image_size)
    except Exception as exc:  # offline hub, missing file, wrong layout: say which model failed
        raise RuntimeError(f"cannot load DINOv2 model {model!r} ({source}): {type(exc).__name__}: {exc}") from exc
    patch = network.patch_embed.patch_size[0]
    if image_size % patch:
        raise ValueError(f"image_size must be a multiple of the patch size {patch}, got {image_size}")
    embedder = DinoV2Embedder(
        network,
        version=version,
        image_size=image_size,
        device=torch_device,
        precision=precision,
        batch_size=batch_size,
        preprocess_threads=preprocess_threads,
        preprocess_processes=preprocess_processes,
        niceness=niceness,
    )
    log.info(
        "loaded %s (%d-d) on %s (%s, %d px) in %.1f s",
        source,
        embedder.dim,
        torch_device,
        precision,
        image_size,
        time.perf_counter() - started,
    )
    return embedder


def embedder_version(model: str = DEFAULT_EMBEDDER, *, image_size: int = DEFAULT_IMAGE_SIZE, precision: str) -> str:
    """``<name>-<size>px-<precision>-<10 hex digits>``, computable without loading the model.

    The digest covers the resolved timm name, or for a local folder the bytes of its config and weight
    files (so a copied folder keeps its version and replaced weights change it), the resolution and the
    precision. Hub weights are identified by name: timm's DINOv2 repositories are not re-published.
    """
    source = _timm_source(model)
    _check_image_size(image_size)
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(_PRECISIONS)}; got {precision!r}")
    folder = Path(model)
    weights = _folder_fingerprint(folder) if folder.is_dir() else source
    payload = json.dumps({"weights": weights, "image_size": image_size, "precision": precision}, sort_keys=True)
    digest = hashlib.sha256(payload.encode()).hexdigest()[:10]
    name = folder.resolve().name if folder.is_dir() else source.split(":")[-1]
    return f"{name}-{image_size}px-{precision}-{digest}"


def _timm_source(model: str) -> str:
    """The name handed to ``timm.create_model``: an alias resolved, a folder as ``local-dir:``."""
    import timm

    if not model:
        raise ValueError("embedder model must be a timm DINOv2 name, an alias or a local folder; got ''")
    name = EMBEDDER_ALIASES.get(model, model)
    folder = Path(name)
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ValueError(f"embedder folder {name!r} has no config.json (timm's hub layout is expected)")
        return f"local-dir:{folder.resolve()}"
    if name.startswith("hf-hub:"):
        return name
    architecture = name.split(".")[0]
    if "/" in name or "\\" in name or not timm.is_model(architecture) or "dinov2" not in architecture:
        known = ", ".join(sorted(EMBEDDER_ALIASES))
        raise ValueError(
            f"embedder model {model!r} is neither a local folder nor a timm DINOv2 name "
            f"(e.g. {DEFAULT_EMBEDDER}; aliases: {known})"
        )
    return name


def _folder_fingerprint(folder: Path) -> str:
    """SHA-256 over the names and bytes of a checkpoint folder's config and weight files."""
    digest = hashlib.sha256()
    files = sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and (path.name == "config.json" or path.suffix in _WEIGHT_SUFFIXES)
    )
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class EmbedderPreprocess:
    """timm's eval transform for one image, as a pipeline stage: ``(tensor (1, 3, size, size), None)``.

    Holds the transform only, so that a pipeline can pickle it for its preprocessing processes.
    """

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, None]:
        return self.transform(image if image.mode == "RGB" else image.convert("RGB")).unsqueeze(0), None


def _as_is(image: Image.Image) -> Image.Image:
    """The pipeline's load step for images already in memory."""
    return image


def _check_image_size(image_size: Any) -> None:
    if not isinstance(image_size, int) or isinstance(image_size, bool) or not 14 <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image_size must be an integer from 14 to {MAX_IMAGE_SIZE}, got {image_size!r}")


def _check_precision(precision: str, device: torch.device) -> None:
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(_PRECISIONS)}; got {precision!r}")
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("fp16 is for GPUs; use bf16 on the CPU")
