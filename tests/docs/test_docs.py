"""Every shell command and Python snippet of README.md and the example's docs runs as written.

The commands are read from the Markdown (``tests/docs/snippets.py``) and run in order, one scratch copy of
the checkout per file, scaled down by environment only: ``MAX_STEPS=2``, ``EVALUATE=0`` and the shipped
data cut to a few records per split. A block that is not run says why in the Markdown, above its fence.
"""

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.docs.snippets import MarkerError, read_snippets, run_markdown
from tests.helpers import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "cube_examples").glob("*/*.md"))]
SCALE = {"MAX_STEPS": "2", "EVALUATE": "0"}
RECORDS = {"train": 64, "valid": 16, "test": 16}


@pytest.fixture(scope="module")
def doc_runs(request, tmp_path_factory):
    """The selected docs' runs, started at once: the docs are independent (a checkout each) and their processes
    mostly single-threaded, so they share the machine's cores; each test waits for its own doc."""
    selected = [
        item.callspec.params["doc"]
        for item in request.session.items
        if getattr(item, "originalname", "") == "test_documented_commands_run_as_written"
    ]
    pool = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1))
    runs = {
        doc: pool.submit(run_markdown, doc, REPO, tmp_path_factory.mktemp(doc.stem), SCALE, RECORDS) for doc in selected
    }
    yield runs
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_documented_commands_run_as_written(doc, doc_runs):
    print("\n".join(doc_runs[doc].result()))


def write_doc(tmp_path, text: str) -> Path:
    doc = tmp_path / "DOC.md"
    doc.write_text(text)
    return doc


def test_a_broken_command_fails_the_doc_test_naming_its_line(tmp_path):
    broken = "MODEL_ARCH=hf_auto_no_such_head bash cube_examples/finetune_hf_model/run.sh"  # a head renamed away
    doc = write_doc(tmp_path, f"# Doc\n\n```bash\n{broken}\n```\n")
    with pytest.raises(
        AssertionError, match=r"(?s)DOC\.md:3: the bash block exited 2 .*unknown MODEL_ARCH 'hf_auto_no_such_head'"
    ):
        run_markdown(doc, REPO, tmp_path, SCALE, RECORDS)


def test_a_broken_python_snippet_fails_and_markers_are_applied(tmp_path):
    doc = write_doc(
        tmp_path,
        "\n".join(
            [
                "<!-- doc-test: skip: needs a GPU -->",
                "```bash",
                "exit 1",
                "```",
                "<!-- doc-test: env GREETING=hi -->",
                "<!-- doc-test: ci 'exit 3' -> 'exit 0': scaled -->",
                "```bash",
                'test "$GREETING" = hi',
                "exit 3",
                "```",
                "<!-- doc-test: exit 2 -->",
                "```sh",
                "exit 2",
                "```",
                "```python",
                "# pkg/__init__.py",
                "VALUE = 1",
                "```",
                "```python",
                "import sys; sys.path.insert(0, '.')",
                "from pkg import VALUE",
                "assert VALUE == 2",
                "```",
                "",
            ]
        ),
    )
    with pytest.raises(AssertionError, match=r"(?s)DOC\.md:19: the python block exited 1 .*AssertionError"):
        run_markdown(doc, REPO, tmp_path, SCALE, RECORDS)


def test_markers_need_a_reason_and_a_known_name(tmp_path):
    with pytest.raises(MarkerError, match="skip needs a reason"):
        read_snippets(write_doc(tmp_path, "<!-- doc-test: skip -->\n```bash\ntrue\n```\n"))
    with pytest.raises(MarkerError, match="unknown doc-test marker 'skipp: x'"):
        read_snippets(write_doc(tmp_path, "<!-- doc-test: skipp: x -->\n```bash\ntrue\n```\n"))


def test_quoted_outputs_are_compared_with_numbers_as_any_number(tmp_path):
    run = [
        "```bash",
        'echo "fairseq_ext: error: no plan fits MEM_PER_GPU=20: needs 24.3 GB in $PWD"',
        "```",
        "<!-- doc-test: prints -->",
        "```",
    ]
    quoted = "fairseq_ext: error: no plan fits MEM_PER_GPU=8: needs 9 GB in /path/to/repo"
    doc = write_doc(tmp_path, "\n".join(run + [quoted, "...", "```", ""]))
    assert run_markdown(doc, REPO, tmp_path / "a", SCALE, RECORDS)[-1].endswith("output matches")
    quoted = "fairseq_ext: error: no plan fits MEM_PER_GPU=8: needs 9 GiB"
    doc = write_doc(tmp_path, "\n".join(run + [quoted, "```", ""]))
    with pytest.raises(AssertionError, match=r"DOC\.md:5: the quoted output has lines .*\n.*needs 9 GiB"):
        run_markdown(doc, REPO, tmp_path / "b", SCALE, RECORDS)
