"""The project's byte-level BPE tokenizer, trained on its own text so nothing is downloaded."""


def build_tokenizer(texts: list, vocab_size: int = 1024, add_bos: bool = True, extra_special_tokens: tuple = ()):
    """Byte-level BPE trained on ``texts``, wrapped as a transformers fast tokenizer.

    Special tokens are ``<pad>`` (id 0), ``<s>`` (1), ``</s>`` (2), ``<unk>`` (3), then ``extra_special_tokens``.
    With ``add_bos`` (decoder-only models such as tiny-llama) encoding prepends ``<s>``; without it (T5
    convention, tiny-t5) encoding appends ``</s>`` and declares no BOS token, so labels end with EOS and
    generation learns to stop.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special_tokens = ["<pad>", "<s>", "</s>", "<unk>", *extra_special_tokens]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="<pad>",
            model_max_length=512,
        )
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", model_max_length=512
    )
