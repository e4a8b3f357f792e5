"""The test metric of a model head on a split: for a checkpoint, or for the model as training starts.

    python scripts/evaluate.py --checkpoint CHECKPOINT_DIR/checkpoint_best.pt [--split test]
    python scripts/evaluate.py [--split test] -- FAIRSEQ_TRAIN_ARGUMENTS...

The metric follows the model's head: exact match of generated answers (causal and seq2seq LMs on
instruction data), accuracy (sequence classification), token accuracy and entity F1 (token
classification), exact match and F1 (extractive QA), recall@1 of text pairs (sentence embeddings).
With ``--checkpoint`` the data settings are the checkpoint's own. With fairseq-train's arguments
the model is the one training starts from: the folder's weights, and what the folder lacks
initialised under ``--seed`` exactly as fairseq-train does.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the fairseq_ext beside this script

from fairseq_ext.cube.checkpoint import load_initial, load_trained
from fairseq_ext.errors import PREFIX, UserInputError
from fairseq_ext.evaluation import evaluate


def read_training_data(cfg, task) -> None:
    """Read the splits fairseq-train reads, as it reads them, before the model is evaluated: a bad train or
    valid file is reported before an evaluation the user would wait for, and their tokenized cache is built
    once here for the training workers."""
    if not cfg.dataset.disable_validation:
        for split in cfg.dataset.valid_subset.split(","):
            task.load_dataset(split, combine=False, epoch=1)
    task.load_dataset(cfg.dataset.train_subset, combine=True, epoch=1)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own_args = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a fairseq checkpoint of fairseq_ext (e.g. checkpoint_best.pt)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--label", default="", help="a word printed with the result, e.g. before/after")
    parser.add_argument("--show", type=int, default=3, help="how many predictions to print, where there are some")
    args = parser.parse_args(own_args)
    try:
        if bool(args.checkpoint) == bool(train_args):
            raise UserInputError("give --checkpoint, or fairseq-train's arguments after --")
        cfg, task, model = load_trained(args.checkpoint) if args.checkpoint else load_initial(train_args)
        if train_args:
            read_training_data(cfg, task)
        metrics = evaluate(model, task, args.split)
    except UserInputError as err:
        print(f"{PREFIX} {err}", file=sys.stderr)
        return 2
    if not metrics:
        print(f"no {args.split} metric for this model head and DATASET_TYPE {task.cfg.dataset_type!r}")
    for metric in metrics:
        for example in metric.examples[: args.show]:
            print(f"  {example}")
        print(metric.format(args.split, args.label))
    return 0


if __name__ == "__main__":
    sys.exit(main())
