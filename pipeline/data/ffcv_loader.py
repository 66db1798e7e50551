"""FFCV loaders: two randomly cropped (and flipped) views per image for training, one centre view for evaluation.

Both yield uint8 images ``[n, 3, S, S]``; colour augmentation and normalisation run batched on the training
device afterwards (``pipeline.data.augment``). Under DDP (``distributed=True``) each rank reads a disjoint shard
in a random order seeded by ``seed + epoch``, like PyTorch's ``DistributedSampler``. Each loader checks its file
against the manifest (size, sample count) when it opens it.

FFCV compiles every loader's pipeline with numba on its first pass: each loader anew, in each process anew.
``reuse_compiled_code`` (each Ray Train worker calls it through ``reuse_for_dataset``) makes loaders share the
compiled code of identical operations within the process (one centre-crop decoder for the bank, validation and
test loaders) and keeps what numba can cache on disk for the next processes (FFCV's file readers and integer
decoders, the crop helpers). FFCV's image decoders call OpenCV and libjpeg-turbo through ctypes pointers, which
numba cannot cache: each process compiles them once.
"""
from __future__ import annotations

import os
import threading
import types
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.data.ffcv_two_view import two_view_decoder
from pipeline.data.manifest import verify_beton

if TYPE_CHECKING:  # for the annotations only: FFCV is imported lazily
    from ffcv.pipeline.compiler import Compiler
    from numba.core.typing.templates import Signature

COMPILE_CACHE_ENV = "VARCON_COMPILE_CACHE"  # a folder for numba's cache, or "off"
_reuse_lock = threading.RLock()
_compiled: dict = {}  # reuse key -> numba dispatcher, for the life of the process
_cache_dir: list[Path | None] = [None]
_SCALARS = (bool, int, float, str, bytes, type(None), np.generic)


def reuse_for_dataset(beton: str) -> None:
    """``reuse_compiled_code`` for a worker reading ``beton``: numba's cache in ``$VARCON_COMPILE_CACHE``, by
    default ``numba/`` beside the prepared datasets (in ``data.cache_dir``: on a cluster the shared folder, so
    the first trial on any node of the same CPU kind compiles for all); ``off`` leaves FFCV's own compiles."""
    chosen = os.environ.get(COMPILE_CACHE_ENV, "")
    if chosen != "off":
        reuse_compiled_code(Path(chosen) if chosen else Path(beton).resolve().parent.parent / "numba")


def reuse_compiled_code(cache_dir: str | Path | None) -> None:
    """From now on in this process, FFCV compiles each distinct operation once (the same code with equal frozen
    values) and, with ``cache_dir``, loads what numba can cache from there and saves it there, in a folder per
    CPU kind (``_cpu_kind``). numba's cache key holds the CPU, the code and its frozen values; it writes each file
    to a unique name and renames it, which its documentation gives as safe on a shared file system with atomic
    renames (NFS, EFS); serial and thread-parallel compiles keep separate folders, as the key does not tell them
    apart. A pipeline computes what it did: the same functions with FFCV's own numba
    options. A folder that cannot be written leaves the reuse within the process only."""
    from ffcv.pipeline.compiler import Compiler
    from numba.core.errors import NumbaWarning

    folder = Path(cache_dir) if cache_dir else None
    if folder is not None and not _writable(folder):
        print(f"[loader] {folder} is not writable: FFCV's compiled code is not cached on disk (set "
              f"{COMPILE_CACHE_ENV} to another folder, or to off)")
        folder = None
    with _reuse_lock:
        _cache_dir[0] = folder
        if not getattr(Compiler, "_varcon_reuse", False):
            Compiler.compile = classmethod(_compile)
            Compiler._varcon_reuse = True
    warnings.filterwarnings("ignore", message="Cannot cache compiled function", category=NumbaWarning)


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError:
        return False


def _compile(cls: type[Compiler], code: Callable[..., Any], signature: Signature | None = None) -> Callable[..., Any]:
    """FFCV's ``Compiler.compile`` (the same numba options), through the process's reuse table."""
    if not cls.is_enabled:
        return code
    from numba import njit

    parallel = bool(getattr(code, "is_parallel", False)) and cls.num_threads > 1
    key = _reuse_key(code, signature, parallel)
    with _reuse_lock:
        if key is not None and key in _compiled:
            return _compiled[key]
        folder = _cache_dir[0]
        options = dict(fastmath=True, nogil=True, error_model="numpy", parallel=parallel)
        try:
            with _numba_cache_dir(folder / _cpu_kind() / ("parallel" if parallel else "serial") if folder else None):
                compiled = njit(signature, cache=folder is not None, **options)(code)
        except RuntimeError:  # numba finds no cache locator (code without a source file): compiled uncached
            compiled = njit(signature, **options)(code)
        if key is not None:
            _compiled[key] = compiled
        return compiled


def _reuse_key(code: Callable[..., Any], signature: Signature | None, parallel: bool) -> tuple | None:
    """What makes two compiles of ``code`` the same function: its bytecode and globals, the values numba freezes
    into it (closure cells and defaults: scalars, tuples of them, compiled functions by what they compile) and the
    options; ``None`` (compiled anew, as FFCV does) for a function without a closure, which may be a helper that
    other compiled code calls (numba's typing of a helper that two callers share fails on its literal-typed
    overloads), and for a frozen value of any other kind, such as an array. Operations (FFCV generates each as a
    closure) are called from Python with arrays: sharing them is safe."""
    if not isinstance(code, types.FunctionType) or not code.__closure__:
        return None
    frozen = _frozen_key(code)
    return None if frozen is None else (frozen, str(signature), parallel)


def _frozen_key(function: types.FunctionType, depth: int = 0) -> tuple | None:
    """``function``'s code, globals and frozen values as a hashable key; ``None`` if a value cannot be keyed."""
    values = []
    for value in [cell.cell_contents for cell in function.__closure__ or ()] + list(function.__defaults__ or ()):
        if isinstance(value, tuple) and all(isinstance(v, _SCALARS) for v in value):
            values.append((tuple, tuple((type(v), v) for v in value)))
        elif isinstance(value, _SCALARS):
            values.append((type(value), value))
        elif hasattr(value, "py_func") and hasattr(value, "targetoptions") and depth < 4:  # a numba dispatcher
            inner = _frozen_key(value.py_func, depth + 1)
            if inner is None:
                return None
            fixed = () if value._can_compile else tuple(map(str, value.signatures))  # njit(signature): eager
            options = tuple(sorted((name, repr(option)) for name, option in value.targetoptions.items()))
            values.append(("dispatcher", inner, options, fixed))
        elif isinstance(value, (types.FunctionType, types.BuiltinFunctionType, type)):  # range, prange, ...
            values.append(("object", value))  # held by the key: its identity cannot be reused
        else:
            return None
    return function.__code__, id(function.__globals__), tuple(values)


def _cpu_kind() -> str:
    """This CPU's name and a digest of numba's whole target key (triple, CPU, features), e.g.
    ``znver4-ec36b34179``: nodes of another kind on a shared folder never rewrite this kind's index files (numba
    would skip their entries anyway: its key holds the CPU), so each kind keeps its compiled code."""
    import hashlib

    from numba.core.registry import cpu_target

    target = cpu_target.target_context.codegen().magic_tuple()
    return f"{target[1]}-{hashlib.sha256(repr(target).encode()).hexdigest()[:10]}"


@contextmanager
def _numba_cache_dir(folder: Path | None) -> Iterator[None]:
    """numba's cache folder for the dispatchers created in the block (numba reads it when a dispatcher is made)."""
    from numba.core import config

    before = config.CACHE_DIR
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        config.CACHE_DIR = str(folder)
    try:
        yield
    finally:
        config.CACHE_DIR = before


def _crop_view(image_size: int, crop_scale_min: float, flip: bool) -> list:
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.transforms import RandomHorizontalFlip, ToTensor, ToTorchImage

    ops = [RandomResizedCropRGBImageDecoder((image_size, image_size), scale=(crop_scale_min, 1.0))]
    if flip:
        ops.append(RandomHorizontalFlip())
    return ops + [ToTensor(), ToTorchImage()]


def _int_pipeline() -> list:
    from ffcv.fields.basics import IntDecoder
    from ffcv.transforms import Squeeze, ToTensor

    return [IntDecoder(), ToTensor(), Squeeze(1)]


class _SkippingOrder:
    """A traversal order for FFCV's ``Loader`` whose next pass can start at batch k. The ``Loader`` always starts
    a pass at its first batch and trains on ``order[:len(loader) * batch_size]`` of the order it is given; this one
    gives that same order (``base``'s, a function of seed and epoch) cut to its full batches, without the first
    ``skip`` batches, once."""

    def __init__(self, base: Any, batch_size: int, full_batches: int) -> None:
        self.base, self.batch_size, self.full_batches, self.skip = base, batch_size, full_batches, 0

    def sample_order(self, epoch: int) -> np.ndarray:
        order = self.base.sample_order(epoch)
        skip, self.skip = self.skip, 0
        return order[skip * self.batch_size:self.full_batches * self.batch_size] if skip else order


class TwoViewLoader:
    """Iterates ``(view1, view2, labels, index)``: uint8 ``[n, 3, S, S]`` twice, int64 labels ``[n]`` and the
    int64 global sample indices ``[n]`` (the device-side augmentation draws by them), n = batch_size. Reuse one
    instance across epochs: FFCV compiles its pipeline on first use.

    ``decode_once`` (default): one pipeline decodes each image once and renders both views with crops and flips
    drawn from (seed, epoch, sample index, view) (``pipeline.data.ffcv_two_view``); otherwise two FFCV pipelines
    on the field, each decoding the image and drawing its crop from FFCV's unseeded generator.
    """

    def __init__(self, path: str, batch_size: int, image_size: int, crop_scale_min: float, flip: bool,
                 distributed: bool, seed: int, threads: int = 1, indices: np.ndarray | None = None,
                 decode_once: bool = True) -> None:
        from ffcv.loader import Loader, OrderOption
        from ffcv.pipeline import PipelineSpec
        from ffcv.transforms import ToTensor

        verify_beton(path, check_hash="never")
        self.decode_once = decode_once
        self.epoch_cell = np.zeros(1, np.int64)  # read by the compiled decoder at run time
        if decode_once:
            decoder = two_view_decoder(image_size, (crop_scale_min, 1.0), (3 / 4, 4 / 3), flip, seed,
                                       self.epoch_cell)
            pipelines = {"image": PipelineSpec("image", decoder=decoder, transforms=[ToTensor()]),
                         "label": _int_pipeline(), "index": _int_pipeline()}
        else:
            pipelines = {
                "image": _crop_view(image_size, crop_scale_min, flip),
                "label": _int_pipeline(),
                "index": _int_pipeline(),
                "image_view2": PipelineSpec("image", transforms=_crop_view(image_size, crop_scale_min, flip)),
            }
        self.loader = Loader(path, batch_size=batch_size, num_workers=threads, order=OrderOption.RANDOM,
                             distributed=distributed, seed=seed, drop_last=True, pipelines=pipelines,
                             indices=indices)
        self.order = _SkippingOrder(self.loader.traversal_order, batch_size, len(self.loader))
        self.loader.traversal_order = self.order

    def skip_next(self, batches: int) -> None:
        """The next pass starts at its batch ``batches`` (a resume within an epoch): the batches before it are
        neither read nor decoded, and the rest are those of an uninterrupted pass."""
        self.order.skip = batches

    @property
    def epoch(self) -> int:
        """The epoch whose order the next iteration uses (FFCV counts passes)."""
        return self.loader.next_epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.loader.next_epoch = value

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        if not self.decode_once:
            for view1, labels, index, view2 in self.loader:
                yield view1, view2, labels.long(), index.long()
            return
        self.epoch_cell[0] = self.loader.next_epoch  # the pass about to start draws its crops with this epoch
        for views, labels, index in self.loader:  # views: [n, 2, S, S, 3] -> two [n, 3, S, S] (channels-last)
            yield views[:, 0].permute(0, 3, 1, 2), views[:, 1].permute(0, 3, 1, 2), labels.long(), index.long()


class EvalLoader:
    """Iterates ``(images, labels, index)`` over ``indices`` (default: all) in file order: a centre crop of
    ``crop_ratio`` of the shorter side, resized to ``image_size``. With ``distributed`` each rank reads every
    ``world``-th sample; the last ranks' final samples repeat the first ones (``DistributedSampler`` padding):
    ``num_samples`` is the count without repeats.
    """

    def __init__(self, path: str, batch_size: int, image_size: int, crop_ratio: float = 1.0,
                 threads: int = 1, indices: np.ndarray | None = None, distributed: bool = False) -> None:
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import ToTensor, ToTorchImage

        verify_beton(path, check_hash="never")
        if indices is not None:  # FFCV's own type for all samples: the bank, validation and test loaders then
            indices = np.asarray(indices, dtype=np.uint64)  # share one compiled decoder (its argument types)
        pipelines = {"image": [CenterCropRGBImageDecoder((image_size, image_size), crop_ratio), ToTensor(),
                               ToTorchImage()], "label": _int_pipeline(), "index": _int_pipeline()}
        self.loader = Loader(path, batch_size=batch_size, num_workers=threads, order=OrderOption.SEQUENTIAL,
                             distributed=distributed, drop_last=False, pipelines=pipelines, indices=indices)
        self.num_samples = len(self.loader.indices)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        # FFCV refills a ring of batch buffers: labels and indices are kept across batches (feature extraction
        # concatenates them), so they are copied; images are consumed before the buffer comes round again
        for images, labels, index in self.loader:
            yield images, labels.long().clone(), index.long().clone()
