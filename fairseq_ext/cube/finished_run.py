"""A finished run stays finished: started again with the same settings, it trains nothing and writes nothing.

fairseq's loop takes an update before it checks ``--max-update``, so a run started again from a checkpoint
that already reached ``--max-update`` would train one more update and rewrite its checkpoints each time
(a job re-submitted, a command run again to see its output). Right after the checkpoint is loaded,
:func:`stop_if_complete` ends such a run with one line, before any batch or file is touched; a larger
``--max-update`` (MAX_STEPS) continues from the checkpoint as usual.
"""

import logging
import sys

import torch.distributed as dist

logger = logging.getLogger(__name__)


def completion_message(num_updates: int, max_update: int, checkpoint: str) -> str:
    return (
        f"the run is complete: {checkpoint} is at update {num_updates} and --max-update (MAX_STEPS) is "
        f"{max_update}; nothing was trained and no file was changed. Raise MAX_STEPS to train on from it"
    )


def stop_if_complete(num_updates: int, max_update: int, checkpoint: str) -> None:
    """Exit (status 0, every rank alike) when the loaded checkpoint's ``num_updates`` reached ``max_update``.

    Args:
        num_updates: the updates of the checkpoint just loaded (0 when there was none).
        max_update: fairseq's ``--max-update`` (0: no limit).
        checkpoint: the file it was loaded from, for the message.
    """
    if not max_update or num_updates < max_update:
        return
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        print(f"fairseq_ext: {completion_message(num_updates, max_update, checkpoint)}", flush=True)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank leaves while another still reads the checkpoint
    sys.exit(0)
