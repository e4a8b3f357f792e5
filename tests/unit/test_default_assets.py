"""The shipped default model folder and data are exactly what scripts/build_default_assets.py writes."""

import filecmp
import json

from scripts.build_default_assets import SPLIT_SIZES, main
from tests.helpers import EXAMPLE


def test_assets_rebuild_identical(tmp_path):
    """Byte-identical, except config.json's transformers_version (the GPU machine runs another transformers)."""
    main(["--out-dir", str(tmp_path)])
    for rel in ["model/tiny-llama/tokenizer.json", "model/tiny-llama/tokenizer_config.json"] + [
            f"data/toy_instructions_{s}.json" for s in SPLIT_SIZES]:
        assert filecmp.cmp(tmp_path / rel, EXAMPLE / rel, shallow=False), f"{rel} differs from the committed file"
    built, committed = (json.loads((root / "model/tiny-llama/config.json").read_text()) for root in (tmp_path, EXAMPLE))
    built.pop("transformers_version"), committed.pop("transformers_version")
    assert built == committed


def test_test_split_is_unseen_in_training():
    def keys(split):
        lines = (EXAMPLE / "data" / f"toy_instructions_{split}.json").read_text().splitlines()
        return {(r["instruction"], r["input"]) for r in map(json.loads, lines)}

    train = keys("train")
    assert not keys("test") & train and not keys("valid") & train
