"""A --user-dir that makes one rank stop taking part (it sleeps) at a chosen update: HUNG_RANK and HUNG_AT_UPDATE.

The other ranks then wait for it in their next collective operation, as they would for a rank stuck in a
driver call or a deadlock.
"""

import os
import time

import fairseq_ext  # noqa: F401  (registers hf_finetune and the rest)
from fairseq_ext.tasks.hf_finetune import HFFinetuneTask

_train_step = HFFinetuneTask.train_step


def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
    if os.environ.get("RANK") == os.environ["HUNG_RANK"] and update_num + 1 == int(os.environ["HUNG_AT_UPDATE"]):
        time.sleep(3600)
    return _train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad)


HFFinetuneTask.train_step = train_step
