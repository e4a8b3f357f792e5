"""The on-disk profile cache: a stored profile reads back equal, a later process's compile reads it instead of
profiling, any change of the arguments misses, and a bad file, the off switch, an unwritable folder or
several writers at once never fail a run or show a half-written file."""

import dataclasses
import json
import os
import threading
from typing import List

import pytest

from fairseq_ext.cube import compile as compile_pass
from fairseq_ext.cube import custom, profile_cache
from fairseq_ext.cube.profile import Lora, load_config, profile_model
from fairseq_ext.cube.profile_types import Activations, ModelProfile, ModuleProfile
from tests.helpers import MODEL_DIR

SEQ = 16
LORA = Lora(rank=8, targets=("q_proj", "v_proj"))


@pytest.fixture(scope="module")
def config_json():
    return load_config(str(MODEL_DIR)).to_json_string()


@pytest.fixture(scope="module")
def profiles():
    """A full finetune's profile at tp 2 (vocab parallel: no fused head) and a LoRA one under COMPILE=1 at tp 1:
    between them every field of the three dataclasses holds a value other than its default."""
    config = load_config(str(MODEL_DIR))
    return (
        profile_model(config, SEQ, "fp32", (2,)),
        profile_model(config, SEQ, "bf16-master", (1,), compiled=True, lora=LORA),
    )


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "profiles"
    monkeypatch.setenv(profile_cache.CACHE_ENV, str(folder))
    compile_pass._profile.cache_clear()
    yield folder
    compile_pass._profile.cache_clear()


@pytest.fixture
def profiler(monkeypatch, profiles):
    """compile's profile_model, counting its calls and answering the full profile at once."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(args)
        return profiles[0]

    monkeypatch.setattr(compile_pass, "profile_model", counting)
    return calls


def round_trip(profile: ModelProfile) -> ModelProfile:
    return profile_cache.decode(ModelProfile, json.loads(json.dumps(profile_cache.encode(profile))))


def test_the_tests_never_read_the_users_cache(profile_cache_folder):
    assert os.environ[profile_cache.CACHE_ENV] == str(profile_cache_folder)


def test_a_profile_reads_back_equal(profiles, cache):
    for profile in profiles:
        assert round_trip(profile) == profile
        profile_cache.store("k", profile)
        again = profile_cache.load("k")
        assert again == profile
        assert again.tp_degrees == profile.tp_degrees and isinstance(again.tp_degrees, tuple)
        assert list(again.modules) == list(profile.modules)  # int keys, in order


def test_every_field_is_stored_and_exercised(profiles):
    """A field added to a profile dataclass is stored (the codec walks the fields), and must be given a
    non-default value by ``profiles`` so that the round trip above covers it."""
    exercised = {ModelProfile: set(), ModuleProfile: set(), Activations: set()}

    def walk(value):
        if dataclasses.is_dataclass(value):
            assert set(profile_cache.encode(value)) == {f.name for f in dataclasses.fields(value)}
            for f in dataclasses.fields(value):
                default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                if getattr(value, f.name) != default:
                    exercised[type(value)].add(f.name)
                walk(getattr(value, f.name))
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, tuple):
            for item in value:
                walk(item)

    for profile in profiles:
        walk(profile)
    for kind, names in exercised.items():
        assert names == {f.name for f in dataclasses.fields(kind)}, kind.__name__


def test_the_codec_refuses_what_it_cannot_read_back(profiles):
    data = profile_cache.encode(profiles[0])
    for broken in (
        {**data, "extra": 1},
        {k: v for k, v in data.items() if k != "compiled"},
        {**data, "num_layers": "2"},
        {**data, "compiled": 1},
        {**data, "tp_degrees": [2, "x"]},
    ):
        with pytest.raises(ValueError):
            profile_cache.decode(ModelProfile, broken)
    with pytest.raises(TypeError, match="cannot store"):
        profile_cache.encode(dataclasses.replace(profiles[0], precision=object()))
    with pytest.raises(NotImplementedError, match="cannot read"):  # an annotation the codec lacks is no miss
        profile_cache.decode(List[int], [1])


def test_a_later_process_reads_the_profile_instead_of_profiling(config_json, cache, profiler, profiles):
    args = (config_json, SEQ, "fp32", (2,), "sdpa", False, None)
    assert compile_pass._profile(*args) == profiles[0] and len(profiler) == 1
    assert [p.name for p in cache.iterdir()] == [f"{profile_cache.profile_key(*args)}.json"]
    compile_pass._profile.cache_clear()  # as a new process starts
    assert compile_pass._profile(*args) == profiles[0] and len(profiler) == 1
    changes = [
        (json.dumps({**json.loads(config_json), "rms_norm_eps": 1e-6}),),
        (config_json, SEQ * 2),
        (config_json, SEQ, "bf16"),
        (config_json, SEQ, "fp32", (1, 2)),
        (config_json, SEQ, "fp32", (2,), "eager"),
        (config_json, SEQ, "fp32", (2,), "sdpa", True),
        (config_json, SEQ, "fp32", (2,), "sdpa", False, LORA),
    ]
    for i, change in enumerate(changes, start=2):
        changed = change + args[len(change) :]
        assert changed != args
        compile_pass._profile(*changed)
        assert len(profiler) == i, changed


def test_the_key_follows_registered_modules_and_skips_unshipped_model_types(config_json, monkeypatch):
    args = (config_json, SEQ, "fp32", (2,), "sdpa", False, None)
    key = profile_cache.profile_key(*args)
    monkeypatch.setitem(custom.CUSTOM_MODULES, "LlamaMLP", {})
    assert profile_cache.profile_key(*args) != key
    unshipped = json.dumps({**json.loads(config_json), "model_type": "my-own-llama"})
    assert profile_cache.profile_key(unshipped, *args[1:]) is None


@pytest.mark.parametrize(
    "content", ["", "{not json", "[]", '{"format": 0}', "{}", '{"format": 1, "key": "other", "profile": {}}']
)
def test_a_bad_file_is_profiled_again_and_replaced(content, config_json, cache, profiler, profiles):
    args = (config_json, SEQ, "fp32", (2,), "sdpa", False, None)
    key = profile_cache.profile_key(*args)
    cache.mkdir()
    (cache / f"{key}.json").write_text(content)
    assert compile_pass._profile(*args) == profiles[0] and len(profiler) == 1
    assert profile_cache.load(key) == profiles[0]


def test_the_off_switch_and_an_unwritable_folder_leave_profiling_as_it_was(
    config_json, tmp_path, monkeypatch, profiler, profiles
):
    args = (config_json, SEQ, "fp32", (2,), "sdpa", False, None)
    (tmp_path / "a-file").write_text("")
    for setting in ("off", "OFF", str(tmp_path / "a-file" / "profiles")):
        monkeypatch.setenv(profile_cache.CACHE_ENV, setting)
        for _ in range(2):
            compile_pass._profile.cache_clear()
            assert compile_pass._profile(*args) == profiles[0]
    assert len(profiler) == 6
    assert os.listdir(tmp_path) == ["a-file"]
    monkeypatch.delenv(profile_cache.CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert profile_cache.cache_dir() == str(tmp_path / ".cache" / "fairseq_ext" / "profiles")


def test_a_write_renames_a_whole_file_into_place(cache, monkeypatch, profiles):
    renames = []
    replace = os.replace

    def checked_replace(src, dst):
        assert os.path.dirname(src) == os.path.dirname(dst) and src != dst
        assert profile_cache.decode(ModelProfile, json.load(open(src))["profile"]) == profiles[1]
        renames.append((src, dst))
        replace(src, dst)

    monkeypatch.setattr(profile_cache.os, "replace", checked_replace)
    profile_cache.store("k", profiles[1])
    assert renames and renames[0][1] == str(cache / "k.json")
    assert os.listdir(cache) == ["k.json"]  # the temporary name is gone

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(profile_cache.os, "replace", failing_replace)
    profile_cache.store("other", profiles[1])
    assert os.listdir(cache) == ["k.json"]  # nothing of the failed write is left


def test_writers_at_once_never_show_a_partial_file(cache, profiles):
    seen, stop = [], threading.Event()

    def read():
        while not stop.is_set():
            seen.append(profile_cache.load("k"))

    writers = [
        threading.Thread(target=lambda: [profile_cache.store("k", profiles[0]) for _ in range(10)]) for _ in range(3)
    ]
    reader = threading.Thread(target=read)
    reader.start()
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    stop.set()
    reader.join()
    assert all(p is None or p == profiles[0] for p in seen) and profile_cache.load("k") == profiles[0]
    assert os.listdir(cache) == ["k.json"]
