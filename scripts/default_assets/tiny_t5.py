"""tiny-t5: a two-layer T5 config with the project's byte-level BPE tokenizer, no weights."""

import os

MODEL_NAME = "tiny-t5"


def build_t5_folder(out: str, texts: list) -> None:
    """Write config.json and the tokenizer of tiny-t5 into ``out``.

    The tokenizer is trained on ``texts`` (the same text as tiny-llama's, so the vocabularies match) and
    appends ``</s>`` instead of prepending ``<s>``. As in T5, the decoder starts from the pad token.
    ``tie_word_embeddings=True`` (original T5): the head shares the input embedding and decoder outputs are
    scaled by d_model ** -0.5. With False, transformers 5 still ties the weights but drops the scaling
    (``scale_decoder_outputs``), so the unit-variance embedding init gives logits of std ~sqrt(d_model) and a
    first loss near 67 instead of 8 (measured, seed 0); transformers 4 would untie instead. True means the
    same model in both.
    """
    from transformers import T5Config

    from .tokenizer import build_tokenizer

    tokenizer = build_tokenizer(texts, add_bos=False)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=128,
        d_kv=32,
        d_ff=256,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        feed_forward_proj="relu",
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    os.makedirs(out, exist_ok=True)
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
