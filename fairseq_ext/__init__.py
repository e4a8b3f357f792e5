"""fairseq_ext: finetune Hugging Face Auto models from ``fairseq-train --user-dir fairseq_ext``.

Importing the package registers the task, the models and the criteria with fairseq.
"""

from .errors import install_excepthook

install_excepthook()

from . import criterions, data, models, tasks  # noqa: E402,F401  (registrations)
