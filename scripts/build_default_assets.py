"""Write the shipped default: a small instruction dataset and a small Llama-style model folder.

The dataset holds word puzzles a tiny model learns in minutes on a CPU (first, second and last word,
word count, repeat a word); its test split holds word lists never seen in training. The tokenizer is a byte-level
BPE trained on the project's own text (the train split rendered with the prompt templates), so nothing
is downloaded. The model folder holds config and tokenizer only: fairseq_ext initialises the weights
from the config under the run's seed. Everything here is deterministic: running the script again
rewrites the same bytes (tests check that against the committed files).

Usage: python scripts/build_default_assets.py [--out-dir cube_examples/finetune_hf_model]
"""

import argparse
import json
import os
import random

WORDS = (
    "apple bear cat dog egg fish goat hat ice jam kite lamp moon nest owl pen queen rose sun tree "
    "cup van wolf box yak zoo bell cake door frog gold hill ink jar key leaf milk nut oak pig ring "
    "salt toy urn vine web yarn bird corn drum fox"
).split()
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six"]
SPLIT_SIZES = {"train": 4000, "valid": 200, "test": 200}
DATASET_NAME = "toy_instructions"


def word_list(rng: random.Random) -> list:
    return rng.sample(WORDS, rng.randint(3, 5))


def make_record(rng: random.Random) -> dict:
    """One alpaca-style record from a randomly chosen puzzle."""
    kind = rng.choice(["second", "first", "last", "count", "repeat"])
    words = word_list(rng)
    text = " ".join(words)
    if kind == "second":
        return {"instruction": "What is the second word?", "input": text, "output": words[1]}
    if kind == "first":
        return {"instruction": "What is the first word?", "input": text, "output": words[0]}
    if kind == "last":
        return {"instruction": "What is the last word?", "input": text, "output": words[-1]}
    if kind == "count":
        return {"instruction": "How many words are there?", "input": text, "output": NUMBER_WORDS[len(words)]}
    times = rng.randint(2, 4)
    return {"instruction": f"Repeat the word {words[0]} {NUMBER_WORDS[times]} times.", "input": "",
            "output": " ".join([words[0]] * times)}


def make_splits(seed: int = 0) -> dict:
    """Train/valid/test records; valid and test word lists never occur in train."""
    rng = random.Random(seed)
    splits = {name: [] for name in SPLIT_SIZES}
    seen = set()
    for name in ("test", "valid", "train"):
        while len(splits[name]) < SPLIT_SIZES[name]:
            record = make_record(rng)
            key = (record["instruction"], record["input"])
            if key in seen:
                continue
            if name != "train":
                seen.add(key)
            splits[name].append(record)
    return splits


def write_jsonl(path: str, records: list) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def build_tokenizer(texts: list, vocab_size: int = 1024):
    """Byte-level BPE trained on ``texts``, wrapped as a transformers fast tokenizer that adds BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=512)


def build_model_folder(out: str, texts: list) -> None:
    from transformers import LlamaConfig

    tokenizer = build_tokenizer(texts)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    os.makedirs(out, exist_ok=True)
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "..", "cube_examples",
                                                          "finetune_hf_model"))
    args = parser.parse_args(argv)
    from fairseq_ext.data.prompts import PROMPT_TEMPLATES

    splits = make_splits()
    data_dir = os.path.join(args.out_dir, "data")
    os.makedirs(data_dir, exist_ok=True)
    for name, records in splits.items():
        write_jsonl(os.path.join(data_dir, f"{DATASET_NAME}_{name}.json"), records)
    texts = [template.render(r["instruction"], r["input"]) + r["output"]
             for template in PROMPT_TEMPLATES.values() for r in splits["train"]]
    build_model_folder(os.path.join(args.out_dir, "model", "tiny-llama"), texts)
    print(f"wrote {data_dir} and {os.path.join(args.out_dir, 'model', 'tiny-llama')}")


if __name__ == "__main__":
    main()
