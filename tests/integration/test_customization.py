"""A user's own --user-dir adds a dataset type, a prompt template and a criterion, and fairseq-train uses them."""

import sys

from tests.helpers import REPO, fairseq_train, run, tiny_train_args, train_losses

USER_DIR = REPO / "tests" / "assets" / "my_ext"


def test_user_dir_dataset_type_template_and_criterion(tmp_path):
    args = tiny_train_args(
        tmp_path,
        max_update=6,
        extra=[
            "--dataset-type",
            "shouted",
            "--prompt-type",
            "question",
            "--criterion",
            "answer_tokens_lm",
            "--batch-size",
            "8",
            "--lr",
            "3e-3",
        ],
    )
    args[args.index("--user-dir") + 1] = str(USER_DIR)
    result = fairseq_train(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "AnswerTokensLoss" in result.stdout  # fairseq prints the criterion it built
    assert '"answer_tokens": "' in result.stdout  # the user's metric is logged
    losses = train_losses(result.stdout)
    assert losses[6] < losses[1]

    # The checkpoint remembers the user dir: evaluation finds the user's template ("question" is only there).
    evaluated = run(
        [
            sys.executable,
            REPO / "scripts" / "evaluate.py",
            "--checkpoint",
            tmp_path / "checkpoint_last.pt",
            "--show",
            "1",
        ]
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "test exact match: " in evaluated.stdout


def test_user_dir_model_trains_with_our_task_and_criterion(tmp_path):
    """A plain nn.Module registered with @register_model in the user's --user-dir: our data, batches and loss."""
    args = tiny_train_args(
        tmp_path,
        max_update=8,
        extra=["--arch", "my_gru_lm", "--hidden-size", "32", "--batch-size", "8", "--lr", "1e-2"],
    )
    args[args.index("--user-dir") + 1] = str(USER_DIR)
    result = fairseq_train(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "GRULanguageModel" in result.stdout and "criterion: hf_causal_lm" in result.stdout + result.stderr
    losses = train_losses(result.stdout)
    assert losses[8] < losses[1] - 1.0, losses
    assert (tmp_path / "checkpoint_last.pt").is_file()
    export = run([sys.executable, REPO / "scripts" / "export_hf.py", tmp_path / "checkpoint_last.pt", tmp_path / "hf"])
    assert export.returncode == 2 and "Traceback" not in export.stderr
    assert "holds a GRULanguageModel (--arch my_gru_lm), not a Hugging Face model" in export.stderr, export.stderr
