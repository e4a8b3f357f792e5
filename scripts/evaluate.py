"""Exact match of generated answers on a split of instruction data, for a checkpoint or an initial model.

    python scripts/evaluate.py --checkpoint CHECKPOINT_DIR/checkpoint_best.pt [--split test]
    python scripts/evaluate.py --hf-model-name-or-path MODEL --data DATA_DIR --dataset-name NAME [--seed 1]

With ``--checkpoint`` the data settings default to the checkpoint's own. Without it, the model is
the one training starts from: the folder's weights, or its config initialised under ``--seed``
exactly as fairseq-train does.
"""

import argparse
import sys

from fairseq.utils import import_user_module
from transformers import AutoModelForCausalLM

from fairseq_ext.cube.checkpoint import load_trained
from fairseq_ext.data.instruction import instruction_split_path, read_instruction_records
from fairseq_ext.errors import PREFIX, UserInputError
from fairseq_ext.evaluation import exact_match
from fairseq_ext.models.hf_loading import load_hf_model, load_tokenizer
from fairseq_ext.tasks.hf_finetune import HFFinetuneConfig


def load_model(args):
    """Return (hf_model, tokenizer, data, dataset_name, prompt_type) from a checkpoint or a model folder."""
    if args.checkpoint:
        cfg, task, model = load_trained(args.checkpoint)
        return (model.hf_model, task.tokenizer, args.data or cfg.task.data,
                args.dataset_name or cfg.task.dataset_name, args.prompt_type or cfg.task.prompt_type)
    if not (args.hf_model_name_or_path and args.data):
        raise UserInputError("give --checkpoint, or --hf-model-name-or-path with --data")
    hf_model = load_hf_model(AutoModelForCausalLM, args.hf_model_name_or_path, init_seed=args.seed)
    defaults = HFFinetuneConfig()  # the same defaults as fairseq-train's task
    return (hf_model, load_tokenizer(args.hf_model_name_or_path), args.data,
            args.dataset_name or defaults.dataset_name, args.prompt_type or defaults.prompt_type)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint")
    parser.add_argument("--hf-model-name-or-path")
    parser.add_argument("--user-dir", help="a --user-dir with your own prompt templates (a checkpoint names its own)")
    parser.add_argument("--data", help="DATA_DIR with {dataset_name}_{split}.json")
    parser.add_argument("--dataset-name")
    parser.add_argument("--prompt-type")
    parser.add_argument("--split", default="test")
    parser.add_argument("--seed", type=int, default=1, help="initialisation seed of a weightless model folder")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--label", default="", help="a word printed with the result, e.g. before/after")
    parser.add_argument("--show", type=int, default=3, help="how many predictions to print")
    args = parser.parse_args(argv)
    if args.user_dir:
        import_user_module(args)
    try:
        hf_model, tokenizer, data, dataset_name, prompt_type = load_model(args)
        records = read_instruction_records(instruction_split_path(data, dataset_name, args.split))
    except UserInputError as err:
        print(f"{PREFIX} {err}", file=sys.stderr)
        return 2
    result = exact_match(hf_model, tokenizer, records, prompt_type, max_new_tokens=args.max_new_tokens)
    label = f" ({args.label})" if args.label else ""
    for record, prediction in list(zip(records, result["predictions"]))[:args.show]:
        print(f"  {record['instruction']} {record.get('input', '')!r} -> {prediction.strip()!r} "
              f"(expected {record['output']!r})")
    print(f"{args.split} exact match{label}: {result['correct']}/{result['total']} = "
          f"{100 * result['exact_match']:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
