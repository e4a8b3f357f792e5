"""Keep the host ahead of the GPU across updates: no wait for the device after the optimizer step.

fairseq reads the values it logs (the loss, the gradient norm) on the host after it has launched the
optimizer step, and copies the next batch from pageable memory; each of these waits for the device to
finish the step, and the device then idles while the host does the update's bookkeeping and starts the
next forward. Here the logged values are copied into pinned host memory as soon as they are computed
(before the step, in stream order) and batches are pinned before their copy to the device, so those
reads and copies no longer wait, and the next update is queued while the device still runs this one.
"""

from typing import Dict, Optional

import torch
from fairseq import utils

from .runtime.local_shards import local_tensor


class HostCopies:
    """Copies of device tensors into pinned host memory, written asynchronously, read after :meth:`wait`."""

    def __init__(self):
        self._done: Optional[torch.cuda.Event] = None  # recorded after the last copy started

    def copy(self, values: Dict[str, object]) -> Dict[str, object]:
        """``values`` with each CUDA tensor (or DTensor) replaced by the host tensor its copy goes to.

        The host tensors hold their values only once :meth:`wait` has returned.
        """
        out = dict(values)
        for key, value in values.items():
            value = local_tensor(value) if torch.is_tensor(value) else value
            if torch.is_tensor(value) and value.is_cuda:
                host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
                host.copy_(value.detach(), non_blocking=True)
                out[key] = host
        if any(out[key] is not values[key] for key in values):
            self._done = torch.cuda.Event()
            self._done.record()
        return out

    def wait(self) -> None:
        """Wait until every copy started so far has landed (they run before the optimizer step: no wait then)."""
        if self._done is not None:
            self._done.synchronize()
            self._done = None


def pinned(sample):
    """``sample`` with its host tensors in pinned memory, so its copy to the device does not wait for the
    device's queued work (a copy from pageable memory does)."""
    return utils.apply_to_sample(lambda tensor: tensor.pin_memory() if tensor.device.type == "cpu" else tensor,
                                 sample)
