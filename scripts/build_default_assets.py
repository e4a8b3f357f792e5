"""Write the shipped default: a small instruction dataset and a small Llama-style model folder.

The dataset holds word puzzles a tiny model learns in minutes on a CPU (first, second and last word,
word count, repeat a word); its test split holds word lists never seen in training. The tokenizer is a byte-level
BPE trained on the project's own text (the train split rendered with the prompt templates, and toy_chat's
conversations in ChatML), so nothing is downloaded. The model folder holds config and tokenizer only: fairseq_ext initialises the weights
from the config under the run's seed. Everything here is deterministic: running the script again
rewrites the same bytes (tests check that against the committed files).

The other default datasets (toy_sentiment, toy_ner, toy_qa, toy_pairs) and the tiny-t5 model folder
come from the generators in scripts/default_assets/.

Usage: python scripts/build_default_assets.py [--out-dir cube_examples/finetune_hf_model]
"""

import argparse
import os
import random
import sys

if __package__ in (None, ""):  # run as a file: make the repository root importable for scripts.default_assets
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts.default_assets import chat, write_datasets  # noqa: E402
from scripts.default_assets.common import write_jsonl  # noqa: E402
from scripts.default_assets.tiny_t5 import MODEL_NAME as T5_MODEL_NAME  # noqa: E402
from scripts.default_assets.tiny_t5 import build_t5_folder
from scripts.default_assets.tokenizer import build_tokenizer  # noqa: E402

WORDS = (
    "apple bear cat dog egg fish goat hat ice jam kite lamp moon nest owl pen queen rose sun tree "
    "cup van wolf box yak zoo bell cake door frog gold hill ink jar key leaf milk nut oak pig ring "
    "salt toy urn vine web yarn bird corn drum fox"
).split()
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six"]
SPLIT_SIZES = {"train": 4000, "valid": 200, "test": 200}
DATASET_NAME = "toy_instructions"
CHAT_MARKERS = ("<|im_start|>", "<|im_end|>")  # ChatML's turn markers: one token each, as in Qwen's vocabulary


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
    return {
        "instruction": f"Repeat the word {words[0]} {NUMBER_WORDS[times]} times.",
        "input": "",
        "output": " ".join([words[0]] * times),
    }


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


def build_model_folder(out: str, texts: list) -> None:
    from transformers import LlamaConfig

    tokenizer = build_tokenizer(texts, extra_special_tokens=CHAT_MARKERS)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    os.makedirs(out, exist_ok=True)
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def chat_texts() -> list:
    """toy_chat's train conversations as the built-in ChatML template writes them (the tokenizer has no
    chat template of its own), so that the chat markers become tokens of the shipped tokenizer."""
    from jinja2 import Template

    from fairseq_ext.data.chat_templates import CHATML

    template = Template(CHATML.replace("{% generation %}", "").replace("{% endgeneration %}", ""))
    return [template.render(messages=r["messages"]) for r in chat.make_splits()["train"]]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out-dir", default=os.path.join(os.path.dirname(__file__), "..", "cube_examples", "finetune_hf_model")
    )
    args = parser.parse_args(argv)
    from fairseq_ext.data.prompts import PROMPT_TEMPLATES

    splits = make_splits()
    data_dir = os.path.join(args.out_dir, "data")
    os.makedirs(data_dir, exist_ok=True)
    for name, records in splits.items():
        write_jsonl(os.path.join(data_dir, f"{DATASET_NAME}_{name}.json"), records)
    texts = [
        template.render(r["instruction"], r["input"]) + r["output"]
        for template in PROMPT_TEMPLATES.values()
        for r in splits["train"]
    ]
    build_model_folder(os.path.join(args.out_dir, "model", "tiny-llama"), texts + chat_texts())
    build_t5_folder(os.path.join(args.out_dir, "model", T5_MODEL_NAME), texts)
    write_datasets(data_dir)
    print(
        f"wrote {data_dir}, {os.path.join(args.out_dir, 'model', 'tiny-llama')} and "
        f"{os.path.join(args.out_dir, 'model', T5_MODEL_NAME)}"
    )


if __name__ == "__main__":
    main()
