"""Export a fairseq_ext checkpoint as a Hugging Face model folder.

    python scripts/export_hf.py CHECKPOINT_DIR/checkpoint_best.pt OUT_DIR [--overwrite]

OUT_DIR gets ``save_pretrained`` weights (bit-identical to the checkpoint) and the tokenizer, so
``AutoModelForCausalLM.from_pretrained(OUT_DIR)`` loads it. It is written under a temporary name and
renamed into place: an existing OUT_DIR is never left half-written. A LoRA checkpoint exports as a
PEFT adapter folder (``PeftModel.from_pretrained(base_model, OUT_DIR)``), or with ``--merge-lora`` as
full weights with the adapters merged in. A sharded checkpoint (``CHECKPOINT_FORMAT=dcp``) is read from
the folder its file names, into full tensors in this one process, whatever plan wrote it.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the fairseq_ext beside this script

from fairseq_ext.cube.checkpoint import export_hf
from fairseq_ext.errors import PREFIX, UserInputError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint written by fairseq-train --user-dir fairseq_ext")
    parser.add_argument("out_dir", help="the Hugging Face folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument(
        "--merge-lora",
        action="store_true",
        help="for a LoRA checkpoint: write full weights with the adapters merged, not an adapter",
    )
    args = parser.parse_args(argv)
    try:
        export_hf(args.checkpoint, args.out_dir, overwrite=args.overwrite, merge_lora=args.merge_lora)
    except UserInputError as err:
        print(f"{PREFIX} {err}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
