"""run.sh with DATASET_TYPE=chat: the shipped toy_chat, rendered with ChatML, visibly learns; its tokenized
splits land in DATA_CACHE_DIR."""

import json

from tests.integration.test_run_sh import exact_match, run_sh


def test_chat_run_learns_the_last_assistant_turn(tmp_path):
    cache = tmp_path / "cache"
    result = run_sh(
        tmp_path,
        timeout=1200,
        DATASET_TYPE="chat",
        MAX_STEPS=1000,
        SAVE_STEPS=1000,
        LOG_INTERVAL=100,
        DATA_CACHE_DIR=cache,
        OMP_NUM_THREADS=1,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "DATASET_NAME                     toy_chat" in result.stdout
    before, after = exact_match(result.stdout, "before"), exact_match(result.stdout, "after")
    assert before < 2.0 and after > before + 10.0, (before, after)
    assert "split train: 2000 samples; 0 truncated to SEQUENCE_LENGTH=512, 0 dropped" in result.stdout
    folders = sorted(p.name.split("-")[0] for p in cache.iterdir() if p.is_dir())
    assert folders == ["train", "valid"]
    for folder in cache.iterdir():
        if folder.is_dir():
            key = json.loads((folder / "key.json").read_text())
            assert key["settings"]["dataset_type"] == "chat" and "<|im_start|>" in key["templates"]["chat"]
