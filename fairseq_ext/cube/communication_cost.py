"""Seconds of the collectives the cost model counts (ring all-reduce and all-gather, point-to-point sends,
tensor-parallel all-reduces of a module) over a link of ``hardware.Hardware``: NVLink inside a node, the
network across nodes."""

from typing import Tuple

from .hardware import Hardware


def link(hw: Hardware, intra: bool) -> Tuple[float, float]:
    """(bandwidth, latency) of the link between two GPUs: NVLink inside a node, else the network."""
    return (
        (hw.intra_node_bandwidth, hw.intra_node_latency) if intra else (hw.inter_node_bandwidth, hw.inter_node_latency)
    )


def allreduce_seconds(nbytes: float, n: int, link: Tuple[float, float]) -> float:
    """Ring all-reduce: each rank sends and receives 2 (n-1)/n of the data in 2 (n-1) steps."""
    if n <= 1:
        return 0.0
    bandwidth, latency = link
    return 2 * (n - 1) / n * nbytes / bandwidth + 2 * (n - 1) * latency


def allgather_seconds(nbytes: float, n: int, link: Tuple[float, float]) -> float:
    """Ring all-gather (or reduce-scatter) of ``nbytes`` in all: each rank moves (n-1)/n of it in n-1 steps."""
    if n <= 1:
        return 0.0
    bandwidth, latency = link
    return (n - 1) / n * nbytes / bandwidth + (n - 1) * latency


def p2p_seconds(hw: Hardware, nbytes: float, intra: bool) -> float:
    """One send of ``nbytes`` to another GPU (pipeline stages)."""
    bandwidth, latency = link(hw, intra)
    return nbytes / bandwidth + latency


def tp_seconds(module, tp: int, tokens: int, link, again: bool = False) -> float:
    """Tensor-parallel all-reduces of one micro-batch through ``module``: forward, backward, and the
    forward's again when the module is recomputed."""
    if tp <= 1:
        return 0.0
    (fwd_bytes, bwd_bytes), (fwd_count, bwd_count) = module.tp_allreduce_per_token, module.tp_allreduce_count
    total = 0.0
    for per_token, count in ((fwd_bytes, fwd_count), (bwd_bytes, bwd_count)) + (
        ((fwd_bytes, fwd_count),) if again else ()
    ):
        if count:
            total += count * allreduce_seconds(per_token / count * tokens, tp, link)
    return total
