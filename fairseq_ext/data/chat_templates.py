"""Chat templates for ``DATASET_TYPE=chat``: the tokenizer's own, the built-in ``chatml``, or a Jinja file.

``CHAT_TEMPLATE`` / ``--chat-template`` chooses: empty (default) takes the tokenizer's ``chat_template`` and
falls back to ``chatml`` when the tokenizer has none; ``chatml`` forces the built-in ChatML template (the
format of Qwen and many others: ``<|im_start|>role\\ncontent<|im_end|>\\n``); any other value is the path of
a Jinja file in Hugging Face's chat-template format. Templates with ``{% generation %}`` markers say
themselves which tokens the assistant wrote; for the others ``chat.py`` finds the assistant turns by
rendering the conversation turn by turn.
"""

import os
import re
from dataclasses import dataclass

from ..errors import UserInputError

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
BUILTIN_TEMPLATES = {"chatml": CHATML}
GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
SENTINEL = "\u2063FAIRSEQ_EXT_ANSWER\u2063"


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template's Jinja text and where it came from (``source`` is shown in messages)."""

    text: str
    source: str

    @property
    def has_generation_markers(self) -> bool:
        """Whether the template marks assistant text with ``{% generation %}`` (then Hugging Face gives the mask)."""
        return bool(GENERATION_MARKER.search(self.text))


def resolve_chat_template(choice: str, tokenizer) -> ChatTemplate:
    """The template for ``CHAT_TEMPLATE=choice`` (see the module docstring) and ``tokenizer``."""
    choice = (choice or "").strip()
    if not choice:
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # several named templates: the default one
            own = own.get("default")
        if own:
            return ChatTemplate(own, "the tokenizer's chat_template")
        return ChatTemplate(CHATML, "chatml (the tokenizer has no chat_template)")
    if choice in BUILTIN_TEMPLATES:
        return ChatTemplate(BUILTIN_TEMPLATES[choice], choice)
    if not os.path.isfile(choice):
        raise UserInputError(
            f"CHAT_TEMPLATE {choice!r} is neither a built-in template ({', '.join(BUILTIN_TEMPLATES)}) "
            f"nor a Jinja file; give the path of a chat template file or leave CHAT_TEMPLATE empty"
        )
    with open(choice, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise UserInputError(f"CHAT_TEMPLATE file {choice} is empty")
    return ChatTemplate(text, choice)


def end_of_turn(tokenizer, template: ChatTemplate) -> str:
    """The text a template writes right after an assistant's words (e.g. ``<|im_end|>``, ``<|eot_id|>``,
    ``<end_of_turn>``), without surrounding whitespace; generation stops there. Empty when it writes nothing."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": SENTINEL}]
    rendered = tokenizer.apply_chat_template(messages, chat_template=template.text, tokenize=False)
    return rendered[rendered.rindex(SENTINEL) + len(SENTINEL) :].strip()
