"""One process alone on FSDP2 (USE_ZERO >= 1 on one GPU: a mesh of one rank), through run.sh (gloo, CPU,
accumulation 2): USE_ZERO=3 for updates 1-5, resumed by USE_ZERO=1 for updates 6-10 from the sharded checkpoint
the first wrote, against the plain process (USE_ZERO=0, no FSDP2): the same losses (relative 1e-5), gradient
norms, tokens, samples and final weights."""

from tests.distributed.test_plan_run_sh import assert_same_training, chained, checkpoint_format, train


def test_one_process_on_fsdp2_matches_the_plain_process_and_resumes_across_levels(tmp_path):
    plain = train(tmp_path / "plain", NPROC_PER_NODE=1, GRADIENT_ACCU_NUM=2)
    assert "FSDP2" not in plain[3]
    runs = [
        train(tmp_path / "fsdp", NPROC_PER_NODE=1, GRADIENT_ACCU_NUM=2, USE_ZERO=3, args=["--max-update", "5"]),
        train(tmp_path / "fsdp", NPROC_PER_NODE=1, GRADIENT_ACCU_NUM=2, USE_ZERO=1),
    ]
    for run, level in zip(runs, (3, 1)):
        line = f"data parallel (FSDP2, ZeRO {level}): 2 blocks and 1 root(s) over 1 scale units, sharding 1 x 1"
        assert line in run[3], run[3][-3000:]
    assert checkpoint_format(tmp_path / "fsdp") == "dcp"
    assert [sorted(r[0]) for r in runs] == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    assert_same_training(chained(runs), plain)
