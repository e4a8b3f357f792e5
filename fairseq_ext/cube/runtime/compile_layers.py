"""``torch.compile`` of a model's repeated blocks (regional compilation).

Compiling each decoder layer instead of the whole model fuses the layer's elementwise work (norms,
rotary embeddings, activations, residual adds) into few kernels, while compilation stays short: the
layers share their code, so one compiled graph serves them all. The loss, the embeddings and fairseq's
loop stay eager.

Inside each compiled layer, :class:`FuseLowRankProjections` gives LoRA's A matrices that read the same
input (those of q, k and v; of gate and up) one matmul instead of one each: these matmuls are thin (rank
16 against a hidden size of thousands), so each costs about as much as reading its input.
"""

import operator
from collections import defaultdict
from typing import List, Optional

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from ...errors import UserInputError


def repeated_block_classes(model: torch.nn.Module) -> set:
    """Class names of the model's repeated blocks: Hugging Face's ``_no_split_modules`` (e.g. LlamaDecoderLayer)."""
    for module in model.modules():
        names = getattr(module, "_no_split_modules", None)
        if names:
            return set(names)
    return set()


def compile_layers(model: torch.nn.Module, dynamic: Optional[bool] = None) -> int:
    """Compile, in place, every submodule whose class is one of the model's repeated blocks; return how many.
    ``dynamic``: torch.compile's (None: a second batch length makes the graphs' sizes symbolic; False: one
    graph per shape, for tensor-parallel blocks, whose batches have one length: ``cube/batch_padding.py``).

    Raises:
        UserInputError: the model names no repeated blocks (a model that is not a Hugging Face transformer).
    """
    classes = repeated_block_classes(model)
    layers = [m for m in model.modules() if type(m).__name__ in classes]
    if not layers:
        raise UserInputError(
            f"COMPILE=1 compiles the decoder layers, and {type(model).__name__} names none "
            f"(no _no_split_modules); set COMPILE=0"
        )
    options = {"pre_grad_custom_pass": FuseLowRankProjections()}  # one backend for all: one graph serves every layer
    for layer in layers:
        layer.compile(options=options, dynamic=dynamic)
    return len(layers)


LINEAR = (torch._C._nn.linear, torch.nn.functional.linear)
LOW_RANK = 8  # at most an eighth of its input's width: a projection that costs about a read of its input


class FuseLowRankProjections(CustomGraphPass):
    """Inductor pass over a traced graph, before autograd: linear maps without bias that read the same
    input and are low rank (output width at most 1/LOW_RANK of the input's) run as one linear map with
    their weights concatenated, its output split back. Forward and backward (one matmul each for the
    input's gradient and the weights') give what the separate maps give, summed in another order."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        groups = defaultdict(list)
        for node in graph.nodes:
            weight = _low_rank_weight(node)
            if weight is not None:
                groups[(node.args[0], weight.dtype, weight.device)].append(node)
        for nodes in groups.values():
            if len(nodes) > 1:
                _fuse(graph, nodes)

    def uuid(self) -> str:
        return "fairseq_ext.FuseLowRankProjections.1"

    def __eq__(self, other) -> bool:  # torch.compile reuses a graph compiled under equal options
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(self.uuid())


def _low_rank_weight(node: torch.fx.Node) -> Optional[torch.Tensor]:
    """The (fake) weight of ``node`` if it is a linear map without bias and of low rank, else None."""
    if node.op != "call_function" or node.target not in LINEAR or node.kwargs or len(node.args) not in (2, 3):
        return None
    if len(node.args) == 3 and node.args[2] is not None:
        return None
    if not isinstance(node.args[0], torch.fx.Node) or not isinstance(node.args[1], torch.fx.Node):
        return None
    weight = node.args[1].meta.get("example_value", node.args[1].meta.get("val"))
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] * LOW_RANK > weight.shape[1]:
        return None
    return weight


def _fuse(graph: torch.fx.Graph, nodes: List[torch.fx.Node]) -> None:
    ranks = [_low_rank_weight(node).shape[0] for node in nodes]
    with graph.inserting_before(nodes[0]):
        weights = graph.call_function(torch.cat, ([node.args[1] for node in nodes], 0))
        fused = graph.call_function(torch._C._nn.linear, (nodes[0].args[0], weights, None))
        split = graph.call_function(torch.split, (fused, ranks, -1))
        parts = [graph.call_function(operator.getitem, (split, index)) for index in range(len(nodes))]
    for node, part in zip(nodes, parts):
        node.replace_all_uses_with(part)
        graph.erase_node(node)
