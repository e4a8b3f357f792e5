"""Sample layouts: which columns the samples of each model head hold, how they are cut and batched.

A dataset builder returns rows of token ids; the model's head decides how they are read:

=================  =============================================  ==============================================
layout             row columns                                    batch (``net_input`` / ``target``)
=================  =============================================  ==============================================
causal_lm          input_ids, labels (-100 = not trained)         input_ids / labels shifted to the next token
seq2seq_lm         input_ids, labels as for causal_lm: what       encoder input_ids, decoder labels / labels
                   comes before the last trained span is the
                   encoder input, that span the decoder's
seq_cls            input_ids, label (class index)                 input_ids / label (B,)
token_cls          input_ids, labels (class index per token)      input_ids / labels (B, T)
qa                 input_ids, start_positions, end_positions      input_ids / (start, end) (B, 2)
embedding          input_ids, pair_input_ids                      input_ids, and ``pair_input`` / none
=================  =============================================  ==============================================

``token_type_ids`` is carried along wherever a builder provides it (BERT-style text pairs). A ``group``
column (integers) keeps the samples of a group in one batch where possible (``TokenizedDataset``), e.g.
hard negatives for a contrastive loss.
"""

from typing import Dict, List, Optional, Sequence

import torch

from ..errors import UserInputError

IGNORE_INDEX = -100
PAD = None  # marks a column padded with the tokenizer's pad id


def pad_column(samples: Sequence[Dict], column: str, pad_value: int) -> torch.Tensor:
    """Stack the 1-D tensors ``samples[i][column]`` into (B, longest), right-padded with ``pad_value``."""
    rows = [s[column] for s in samples]
    out = torch.full((len(rows), max(len(r) for r in rows)), pad_value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def document_lengths(position_ids: torch.Tensor) -> torch.Tensor:
    """(1, D): the lengths of the documents of one padding-free row, in order, from its ``position_ids``
    (1, N), which restart at 0 for each document."""
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    return torch.tensor([[end - start for start, end in zip(starts, [*starts[1:], position_ids.size(1)])]])


def padding_free(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Packed rows (B, T) as one row (1, N) of their N real tokens, documents end to end: nothing is computed
    for padding, however full the rows were packed. Each document's first label is -100 (``pack``), so no
    target crosses documents or rows."""
    real = batch["attention_mask"].bool()
    return {c: batch[c][real].unsqueeze(0) for c in ("input_ids", "labels", "position_ids")}


class SampleLayout:
    """Base class: sequence columns (cut at SEQUENCE_LENGTH, padded per batch) and scalar columns."""

    name = ""
    sequence_columns: Dict[str, Optional[int]] = {}  # column -> pad value (PAD: the tokenizer's pad id)
    scalar_columns: Sequence[str] = ()
    optional_sequence_columns: Dict[str, Optional[int]] = {"token_type_ids": 0}
    size_columns: Sequence[str] = ("input_ids",)  # size() is the longest of these (read column-wise for large data)
    # (column, first position) when trainable() means "a label other than -100 from that position on"
    trained_labels: Optional[tuple] = None

    def columns(self, available: Sequence[str]) -> List[str]:
        """The columns this layout reads, after checking the required ones are there."""
        required = [*self.sequence_columns, *self.scalar_columns]
        missing = [c for c in required if c not in available]
        if missing:
            raise UserInputError(
                f"the {self.name} head needs samples with columns {required}; the dataset builder gave "
                f"{sorted(available)} (missing {missing}); check DATASET_TYPE against MODEL_ARCH"
            )
        optional = [*self.optional_sequence_columns, "group"]
        return required + [c for c in optional if c in available]

    def prepare(self, row: Dict) -> Dict:
        """Turn a builder's row into this layout's row (most layouts take rows as they are)."""
        return row

    def cut(self, row: Dict, max_length: int) -> Dict:
        """Cut the sequence columns of a row to ``max_length`` tokens."""
        for column in [*self.sequence_columns, *self.optional_sequence_columns]:
            if column in row:
                row[column] = row[column][:max_length]
        return row

    def trainable(self, row: Dict) -> bool:
        """Whether a (cut) row still has something to learn from."""
        return True

    def size(self, row: Dict) -> int:
        """Tokens a row costs in a batch (what --max-tokens counts)."""
        return len(row["input_ids"])

    def collate(self, samples: List[Dict], pad_id: int) -> Dict:
        """fairseq's sample dict for a list of rows (tensors), padded to the longest."""
        if not samples:
            return {}
        pads = {**self.optional_sequence_columns, **self.sequence_columns}
        batch = {c: pad_column(samples, c, pad_id if pads[c] is PAD else pads[c]) for c in pads if c in samples[0]}
        for c in self.scalar_columns:
            batch[c] = torch.stack([s[c] for s in samples])
        for ids in [c for c in batch if c.endswith("input_ids")]:  # input_ids -> attention_mask, pair_... -> pair_...
            masks = [{"mask": torch.ones(len(s[ids]), dtype=torch.long)} for s in samples]
            batch[ids.replace("input_ids", "attention_mask")] = pad_column(masks, "mask", 0)
        out = {"id": torch.tensor([s["id"] for s in samples], dtype=torch.long), "nsentences": len(samples)}
        out.update(self.arrange(batch))
        return out

    def arrange(self, batch: Dict[str, torch.Tensor]) -> Dict:
        """``net_input``, ``target`` and ``ntokens`` from the padded columns."""
        raise NotImplementedError

    @staticmethod
    def net_input(batch: Dict[str, torch.Tensor], *names: str) -> Dict[str, torch.Tensor]:
        return {n: batch[n] for n in ("input_ids", "attention_mask", "token_type_ids", *names) if n in batch}


class CausalLMLayout(SampleLayout):
    name = "causal_lm"
    trained_labels = ("labels", 1)
    sequence_columns = {"input_ids": PAD, "labels": IGNORE_INDEX}
    # packed rows (data/packing.py), made one padding-free row per batch (padding_free)
    optional_sequence_columns = {**SampleLayout.optional_sequence_columns, "position_ids": 0}

    def trainable(self, row):
        return any(t != IGNORE_INDEX for t in row["labels"][1:])

    def arrange(self, batch):
        if "position_ids" in batch:
            batch = padding_free(batch)
        labels = batch["labels"]
        target = torch.cat([labels[:, 1:], labels.new_full((labels.size(0), 1), IGNORE_INDEX)], dim=1)
        net_input = self.net_input(batch, "position_ids")
        if "position_ids" in net_input:
            # the model attends inside each document (models/document_attention.py), or derives the
            # per-document causal mask from the positions
            net_input["document_lengths"] = document_lengths(batch["position_ids"])
            net_input["max_document_length"] = int(net_input["document_lengths"].max())
        else:
            # Rows are padded at their end, so under the causal mask no real token sees a pad token: the plain
            # causal mask gives real tokens what the padding mask gives, through the causal kernel, without
            # Hugging Face's check of the mask on the device (a wait for the device's queued work each forward)
            del net_input["attention_mask"]
        return {"net_input": net_input, "target": target, "ntokens": int((target != IGNORE_INDEX).sum())}


class Seq2SeqLMLayout(SampleLayout):
    name = "seq2seq_lm"
    size_columns = ("input_ids", "labels")
    trained_labels = ("labels", 0)
    sequence_columns = {"input_ids": PAD, "labels": IGNORE_INDEX}

    def prepare(self, row):
        """The encoder reads everything before the last trained span, the decoder learns that span: for a
        prompt and its answer, the prompt and the answer; for a conversation (DATASET_TYPE=chat), the turns
        up to the last assistant turn (earlier answers included, as context) and that turn, as evaluation
        asks for it."""
        labels = row["labels"]
        start = len(labels)
        while start > 0 and labels[start - 1] == IGNORE_INDEX:  # the masked tail (a template's text after a turn)
            start -= 1
        while start > 0 and labels[start - 1] != IGNORE_INDEX:
            start -= 1
        if start == 0 and labels and labels[0] != IGNORE_INDEX:
            raise UserInputError(
                "a seq2seq sample needs a prompt: its first labels must be -100 (the encoder input); this "
                "sample trains on every token, as plain language modelling (or TRAIN_ON_ALL_TURNS=1) does"
            )
        if start == 0:  # nothing trained: an encoder input without labels, dropped as untrainable
            start = len(labels)
        return {**row, "input_ids": row["input_ids"][:start], "labels": labels[start:]}

    def trainable(self, row):
        return any(t != IGNORE_INDEX for t in row["labels"])

    def size(self, row):
        return max(len(row["input_ids"]), len(row["labels"]))

    def arrange(self, batch):
        target = batch["labels"]
        return {
            "net_input": self.net_input(batch, "labels"),
            "target": target,
            "ntokens": int((target != IGNORE_INDEX).sum()),
        }


class SequenceClassificationLayout(SampleLayout):
    name = "seq_cls"
    sequence_columns = {"input_ids": PAD}
    scalar_columns = ("label",)

    def arrange(self, batch):
        return {
            "net_input": self.net_input(batch),
            "target": batch["label"],
            "ntokens": int(batch["attention_mask"].sum()),
        }


class TokenClassificationLayout(SampleLayout):
    name = "token_cls"
    trained_labels = ("labels", 0)
    sequence_columns = {"input_ids": PAD, "labels": IGNORE_INDEX}

    def trainable(self, row):
        return any(t != IGNORE_INDEX for t in row["labels"])

    def arrange(self, batch):
        target = batch["labels"]
        return {"net_input": self.net_input(batch), "target": target, "ntokens": int((target != IGNORE_INDEX).sum())}


class QuestionAnsweringLayout(SampleLayout):
    name = "qa"
    sequence_columns = {"input_ids": PAD}
    scalar_columns = ("start_positions", "end_positions")

    def trainable(self, row):
        return 0 <= row["start_positions"] <= row["end_positions"] < len(row["input_ids"])

    def arrange(self, batch):
        target = torch.stack([batch["start_positions"], batch["end_positions"]], dim=1)
        return {"net_input": self.net_input(batch), "target": target, "ntokens": int(batch["attention_mask"].sum())}


class EmbeddingLayout(SampleLayout):
    """Text pairs for sentence embeddings: the criterion encodes ``net_input`` and ``pair_input``."""

    name = "embedding"
    size_columns = ("input_ids", "pair_input_ids")
    sequence_columns = {"input_ids": PAD, "pair_input_ids": PAD}
    optional_sequence_columns = {}

    def size(self, row):
        return max(len(row["input_ids"]), len(row["pair_input_ids"]))

    def arrange(self, batch):
        pair_input = {"input_ids": batch["pair_input_ids"], "attention_mask": batch["pair_attention_mask"]}
        return {
            "net_input": self.net_input(batch),
            "pair_input": pair_input,
            "target": None,
            "ntokens": int(batch["attention_mask"].sum() + batch["pair_attention_mask"].sum()),
        }


LAYOUTS = {
    layout.name: layout
    for layout in (
        CausalLMLayout(),
        Seq2SeqLMLayout(),
        SequenceClassificationLayout(),
        TokenClassificationLayout(),
        QuestionAnsweringLayout(),
        EmbeddingLayout(),
    )
}


def get_layout(name: str) -> SampleLayout:
    """The layout named ``name`` (a model class's ``layout``)."""
    if name not in LAYOUTS:
        raise UserInputError(f"unknown sample layout {name!r} on the model class; layouts: {', '.join(LAYOUTS)}")
    return LAYOUTS[name]
