"""fairseq_ext: finetune Hugging Face Auto models from ``fairseq-train --user-dir fairseq_ext``.

Importing the package registers the task, the models and the criteria with fairseq and installs the
cube trainer hook (fairseq_ext.cube.trainer), the one place that changes fairseq's training loop.
"""

from .errors import install_excepthook

install_excepthook()

from . import criterions, data, models, optim, tasks  # noqa: E402,F401  (registrations)
from .cube import trainer  # noqa: E402
from .cube.worker_lifetime import die_with_launcher  # noqa: E402

trainer.install()
die_with_launcher()
