"""Keep the host ahead of the GPU across updates: an update ends without waiting for its device work.

fairseq reads what it logs (the loss, the gradient norm) on the host at the end of every update, checks
that the gradient norm is finite before the optimizer step, and copies the next batch from pageable
memory; each of these waits for the device, which then idles while the host does the update's
bookkeeping and starts the next forward. Here:

- the logged values stay where they were computed: fairseq's meters add them up there, and the logging
  output of an update is read from its meters on first access (:class:`LoggedValues`); fairseq itself
  reads its meters at each ``--log-interval``;
- a gradient norm is copied into pinned host memory as soon as it is computed (:class:`HostCopy`) and
  read once the device is known to be busy with later work;
- batches are pinned before their copy to the device (:func:`pinned`), which then waits for nothing.
"""

from collections.abc import Mapping

import torch
from fairseq import utils

from .runtime.local_shards import local_tensor

# fairseq drops these from the logging output an update returns (they are rates and sizes of the log interval)
NOT_PER_UPDATE = ("ppl", "wps", "wpb", "bsz")


class HostCopy:
    """A CUDA tensor's (or DTensor's local) copy into pinned host memory, started now in stream order."""

    def __init__(self, tensor: torch.Tensor):
        tensor = local_tensor(tensor).detach()
        self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self._host.copy_(tensor, non_blocking=True)
        self._landed = torch.cuda.Event()
        self._landed.record()

    def get(self) -> torch.Tensor:
        """The copied values; waits until the device has produced them."""
        self._landed.synchronize()
        return self._host


class LoggedValues(Mapping):
    """The logging output of one fairseq update: the smoothed values of the meters ``aggregator`` holds and
    ``sample_size``, read from the meters on first access (a wait for the device there), not when the
    update ends."""

    def __init__(self, aggregator, sample_size):
        self._aggregator = aggregator
        self._sample_size = sample_size
        self._values = None

    def _read(self) -> dict:
        if self._values is None:
            values = self._aggregator.get_smoothed_values()
            values["sample_size"] = self._sample_size
            for key in NOT_PER_UPDATE:
                values.pop(key, None)
            self._values = values
        return self._values

    def __getitem__(self, key):
        return self._read()[key]

    def __iter__(self):
        return iter(self._read())

    def __len__(self) -> int:
        return len(self._read())

    def __repr__(self) -> str:
        return f"LoggedValues({self._read()!r})"


def pinned(sample):
    """``sample`` with its host tensors in pinned memory, so its copy to the device does not wait for the
    device's queued work (a copy from pageable memory does)."""
    return utils.apply_to_sample(lambda tensor: tensor.pin_memory() if tensor.device.type == "cpu" else tensor, sample)
