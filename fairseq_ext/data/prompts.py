"""Prompt templates for instruction data, selected by name (``PROMPT_TYPE`` / ``--prompt-type``).

Users add their own with :func:`register_prompt_template` from their ``--user-dir``::

    from fairseq_ext.data.prompts import PromptTemplate, register_prompt_template
    register_prompt_template("qa", PromptTemplate(
        with_input="Q: {instruction}\\nContext: {input}\\nA: ",
        without_input="Q: {instruction}\\nA: "))
"""

from dataclasses import dataclass
from typing import Dict

from ..errors import UserInputError


@dataclass(frozen=True)
class PromptTemplate:
    """Two format strings with ``{instruction}`` and ``{input}`` fields.

    ``with_input`` is used when a record's ``input`` is non-empty, ``without_input`` otherwise,
    as in Stanford Alpaca. The rendered prompt is masked out of the loss; the answer follows it.
    """

    with_input: str
    without_input: str

    def render(self, instruction: str, input: str = "") -> str:
        """Return the prompt text for one record."""
        if input and input.strip():
            return self.with_input.format(instruction=instruction, input=input)
        return self.without_input.format(instruction=instruction)


PROMPT_TEMPLATES: Dict[str, PromptTemplate] = {}


def register_prompt_template(name: str, template: PromptTemplate, overwrite: bool = False) -> None:
    """Make ``template`` selectable as ``PROMPT_TYPE=name``."""
    if name in PROMPT_TEMPLATES and not overwrite:
        raise UserInputError(f"prompt template {name!r} is already registered; pass overwrite=True to replace it")
    PROMPT_TEMPLATES[name] = template


def get_prompt_template(name: str) -> PromptTemplate:
    """Look a template up by name; an unknown name is a UserInputError listing the known ones."""
    if name not in PROMPT_TEMPLATES:
        raise UserInputError(
            f"unknown PROMPT_TYPE {name!r}; registered templates: {', '.join(sorted(PROMPT_TEMPLATES))}"
        )
    return PROMPT_TEMPLATES[name]


register_prompt_template(
    "alpaca",
    PromptTemplate(
        with_input=(
            "Below is an instruction that describes a task, paired with an input that provides further "
            "context. Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        ),
        without_input=(
            "Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
        ),
    ),
)

register_prompt_template(
    "plain",
    PromptTemplate(
        with_input="{instruction}\n{input}\n",
        without_input="{instruction}\n",
    ),
)
