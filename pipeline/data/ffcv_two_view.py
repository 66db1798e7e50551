"""An FFCV operation that decodes each image once and renders both training views from it.

FFCV 1.0.2 has no multi-view decoder: two pipelines on one field decode every JPEG twice. ``TwoViewCropDecoder``
follows FFCV's own ``ResizedCropRGBImageDecoder`` (the public ``Operation`` / ``AllocationQuery`` interface, one
scratch buffer per batch slot, ``imdecode`` for JPEG, the stored bytes for raw) and emits ``[2, S, S, 3]`` per
sample: each view's crop and flip drawn by ``pipeline.data.crops`` from (seed, epoch, sample index, view) and
rendered with its antialiased bilinear resize. The epoch is read at run time from a one-element array the loader
sets before each pass (compiled code cannot take it as an argument: FFCV fixes the signature).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numba as nb
import numpy as np
from numba.core import cgutils, types
from numba.extending import intrinsic

from pipeline.data import crops

if TYPE_CHECKING:  # FFCV, numba's internals and llvmlite for the annotations only: FFCV is imported lazily
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.operation import Operation
    from ffcv.pipeline.state import State
    from llvmlite import ir
    from numba.core.base import BaseContext
    from numba.core.typing.context import BaseContext as TypingContext
    from numba.core.typing.templates import Signature


@intrinsic
def _address_as_pointer(typingctx: TypingContext, address: types.Integer) -> tuple[Signature, Callable[..., ir.Value]]:
    """An int64 address as a ``void*`` (to view memory that Python owns from compiled code)."""
    def codegen(context: BaseContext, builder: ir.IRBuilder, signature: Signature,
                args: Sequence[ir.Value]) -> ir.Value:
        return builder.inttoptr(args[0], cgutils.voidptr_t)
    return types.voidptr(types.int64), codegen


@nb.njit(cache=True)
def read_cell(address: int) -> int:
    """The int64 at ``address`` (a live one-element array's data)."""
    return nb.carray(_address_as_pointer(address), 1, np.int64)[0]


def two_view_decoder(output_size: int, scale: tuple[float, float], ratio: tuple[float, float], flip: bool,
                     seed: int, epoch_cell: np.ndarray) -> Operation:
    """The operation (its class is built on first use: FFCV imports lazily)."""
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.libffcv import imdecode
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.operation import Operation

    class TwoViewCropDecoder(Operation):
        def declare_state_and_memory(self, previous_state: State
                                     ) -> tuple[State, tuple[AllocationQuery, AllocationQuery]]:
            self.max_height = np.uint64(self.metadata["height"].max())
            self.max_width = np.uint64(self.metadata["width"].max())
            shape = (2, output_size, output_size, 3)
            return (replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype("<u1")),
                    (AllocationQuery(shape, np.dtype("<u1")),
                     AllocationQuery((self.max_height * self.max_width * np.uint64(3),), np.dtype("<u1"))))

        def generate_code(self) -> Callable[..., np.ndarray]:
            jpg = IMAGE_MODES["jpg"]
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c = Compiler.compile(imdecode)
            crop_box, flips, resize_crop = crops.crop_box, crops.flips, crops.resize_crop
            address = np.int64(epoch_cell.ctypes.data)
            scale_min, scale_max = float(scale[0]), float(scale[1])
            ratio_min, ratio_max = float(ratio[0]), float(ratio[1])
            the_seed, mirror = np.int64(seed), bool(flip)

            def decode(batch_indices: np.ndarray, my_storage: tuple[np.ndarray, np.ndarray], metadata: np.ndarray,
                       storage_state: tuple[np.ndarray, ...]) -> np.ndarray:
                destination, temp_storage = my_storage
                epoch = read_cell(address)
                for dst_ix in my_range(len(batch_indices)):
                    source_ix = batch_indices[dst_ix]
                    field = metadata[source_ix]
                    image_data = mem_read(field["data_ptr"], storage_state)
                    height, width = np.uint32(field["height"]), np.uint32(field["width"])
                    if field["mode"] == jpg:
                        buffer = temp_storage[dst_ix]
                        imdecode_c(image_data, buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                        image = buffer.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                    else:
                        image = image_data.reshape(height, width, 3)
                    for view in range(2):
                        top, left, h, w = crop_box(the_seed, epoch, source_ix, view, height, width, scale_min,
                                                   scale_max, ratio_min, ratio_max)
                        mirrored = mirror and flips(the_seed, epoch, source_ix, view)
                        resize_crop(image, top, left, h, w, mirrored, destination[dst_ix, view])
                return destination[:len(batch_indices)]

            decode.is_parallel = True
            return decode

    return TwoViewCropDecoder()
