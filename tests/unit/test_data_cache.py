"""The tokenized-split cache: keyed by everything that changes the samples, reused otherwise, built once
by one of several processes, and the task's splits read from it memory-mapped."""

import json
import multiprocessing
import os
import time
import types

import datasets
import pytest
from transformers import AutoTokenizer

from fairseq_ext.data import preprocess
from fairseq_ext.data.instruction import build_instruction_split
from fairseq_ext.data.preprocess import cache_key, cached_split
from tests.helpers import EXAMPLE, MODEL_DIR, REPO

RECORDS = [
    {"instruction": "What is the first word?", "input": "cat dog", "output": "cat"},
    {"instruction": "Say hi.", "output": "hi"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


def make_cfg(data_dir, **changes):
    settings = dict(
        data=str(data_dir),
        dataset_type="instruction",
        dataset_name="toy",
        prompt_type="plain",
        chat_template="",
        train_on_all_turns=False,
        sequence_length=512,
        pack_sequences=False,
        precision="fp32",
        seed=1,
    )
    settings.update(changes)
    return types.SimpleNamespace(**settings)


def write_records(data_dir, records=RECORDS, name="toy"):
    path = data_dir / f"{name}_train.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def digest(key):
    return json.dumps(key, sort_keys=True, default=str)


def test_every_input_of_the_samples_changes_the_key(tmp_path, tokenizer):
    data_file = write_records(tmp_path)
    template = tmp_path / "chat.jinja"
    template.write_text((REPO / "tests/assets/chat_templates/qwen2.jinja").read_text())
    base = make_cfg(tmp_path)
    key = digest(cache_key(base, "train", tokenizer, "causal_lm", build_instruction_split))
    assert key == digest(cache_key(make_cfg(tmp_path), "train", tokenizer, "causal_lm", build_instruction_split))
    assert key == digest(
        cache_key(make_cfg(tmp_path, precision="bf16"), "train", tokenizer, "causal_lm", build_instruction_split)
    ), "a setting that does not touch the data"

    def changed(cfg=base, split="train", tok=tokenizer, layout="causal_lm", builder=build_instruction_split):
        return digest(cache_key(cfg, split, tok, layout, builder)) != key

    assert changed(make_cfg(tmp_path, sequence_length=256))
    assert changed(make_cfg(tmp_path, prompt_type="alpaca"))
    assert changed(make_cfg(tmp_path, dataset_type="chat"))
    assert changed(make_cfg(tmp_path, pack_sequences=True))
    assert changed(make_cfg(tmp_path, train_on_all_turns=True))
    assert changed(split="valid")
    assert changed(layout="seq2seq_lm")
    assert changed(tok=AutoTokenizer.from_pretrained(EXAMPLE / "model" / "tiny-t5"))
    chat = make_cfg(tmp_path, dataset_type="chat", chat_template=str(template))
    chat_key = digest(cache_key(chat, "train", tokenizer, "causal_lm", build_instruction_split))
    template.write_text(template.read_text().replace("Qwen", "Kwen"))
    assert digest(cache_key(chat, "train", tokenizer, "causal_lm", build_instruction_split)) != chat_key
    before = os.stat(data_file).st_mtime_ns
    write_records(tmp_path, RECORDS[:1])
    os.utime(data_file, ns=(before + 10**9, before + 10**9))
    assert changed()


def test_the_code_of_the_dataset_type_is_in_the_key(tmp_path, tokenizer):
    module = tmp_path / "my_builder.py"
    module.write_text("def build(cfg, split, tokenizer):\n    return []\n")
    namespace = {}
    exec(compile(module.read_text(), str(module), "exec"), namespace)
    write_records(tmp_path)
    cfg = make_cfg(tmp_path)
    first = digest(cache_key(cfg, "train", tokenizer, "causal_lm", namespace["build"]))
    module.write_text("def build(cfg, split, tokenizer):\n    return [1]\n")
    assert digest(cache_key(cfg, "train", tokenizer, "causal_lm", namespace["build"])) != first


def build_counted(counter, rows=3, delay=0.0):
    def build():
        with open(counter, "a") as f:
            f.write("x")
        time.sleep(delay)
        samples = datasets.Dataset.from_dict(
            {"input_ids": [[1, 2, i] for i in range(rows)], "labels": [[-100, 2, i] for i in range(rows)]}
        )
        return samples, {"samples": rows, "truncated": 0, "dropped": 0}

    return build


def test_a_second_start_reads_the_cache(tmp_path):
    counter = tmp_path / "builds"
    key = {"split": "train", "anything": 1}
    first, stats, hit = cached_split(key, str(tmp_path / "cache"), build_counted(counter))
    again, stats_again, hit_again = cached_split(key, str(tmp_path / "cache"), build_counted(counter))
    assert (hit, hit_again) == (False, True) and counter.read_text() == "x"
    assert again["input_ids"] == first["input_ids"] and stats_again == stats
    assert all(f["filename"].startswith(str(tmp_path / "cache")) for f in again.cache_files), "memory-mapped"
    cached_split({**key, "anything": 2}, str(tmp_path / "cache"), build_counted(counter))
    assert counter.read_text() == "xx"
    assert not [p for p in os.listdir(tmp_path / "cache") if "building" in p], "no temporary folder left"


def _worker(key, root, counter, out):
    samples, _, _ = cached_split(key, root, build_counted(counter, delay=2.0))
    with open(out, "w") as f:
        json.dump(list(samples["input_ids"]), f)


def test_one_process_builds_while_the_others_wait(tmp_path):
    key, root, counter = {"split": "valid", "x": 3}, str(tmp_path / "cache"), str(tmp_path / "builds")
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=_worker, args=(key, root, counter, str(tmp_path / f"out{i}"))) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert open(counter).read() == "x"
    outputs = [json.loads((tmp_path / f"out{i}").read_text()) for i in range(3)]
    assert outputs[0] == outputs[1] == outputs[2] == [[1, 2, 0], [1, 2, 1], [1, 2, 2]]


def test_the_task_reads_its_splits_from_the_cache(tmp_path, caplog):
    """Two task set-ups with the same settings: the second one's samples come from the first one's files."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from tests.helpers import tiny_train_args

    def load():
        args = tiny_train_args(tmp_path / "save", extra=["--data-cache-dir", str(tmp_path / "cache")])
        cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), args))
        task = tasks.setup_task(cfg.task)
        task.select_arch("hf_auto_causal_lm")
        task.load_dataset("valid")
        return task.dataset("valid")

    first = load()
    assert os.listdir(tmp_path / "cache")
    with caplog.at_level("INFO"):
        second = load()
    assert "tokenized samples cached" not in caplog.text and "split valid: 200 samples" in caplog.text
    assert [first[i]["input_ids"].tolist() for i in range(5)] == [second[i]["input_ids"].tolist() for i in range(5)]
    assert (first.sizes == second.sizes).all()
    assert preprocess.cache_root(types.SimpleNamespace(data_cache_dir=str(tmp_path / "c"))) == str(tmp_path / "c")
