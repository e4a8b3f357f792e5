"""A user's own --user-dir adds a dataset type, a prompt template and a criterion, and fairseq-train uses them."""

import sys

from tests.helpers import REPO, fairseq_train, run, tiny_train_args, train_losses

USER_DIR = REPO / "tests" / "assets" / "my_ext"


def test_user_dir_dataset_type_template_and_criterion(tmp_path):
    args = tiny_train_args(tmp_path, max_update=6, extra=[
        "--dataset-type", "shouted", "--prompt-type", "question", "--criterion", "answer_tokens_lm",
        "--batch-size", "8", "--lr", "3e-3"])
    args[args.index("--user-dir") + 1] = str(USER_DIR)
    result = fairseq_train(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "AnswerTokensLoss" in result.stdout  # fairseq prints the criterion it built
    assert '"answer_tokens": "' in result.stdout  # the user's metric is logged
    losses = train_losses(result.stdout)
    assert losses[6] < losses[1]

    # The checkpoint remembers the user dir: evaluation finds the user's template ("question" is only there).
    evaluated = run([sys.executable, REPO / "scripts" / "evaluate.py", "--checkpoint", tmp_path / "checkpoint_last.pt",
                     "--max-new-tokens", "2", "--show", "1"])
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "test exact match: " in evaluated.stdout
