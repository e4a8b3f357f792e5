"""Sample lengths of the baseline's variable-length data, and its batches of them in random order or grouped
by length (no imports of the baseline's other modules: benchmarks/single_gpu_speed.py loads this file by path)."""


def sample_lengths(kind, count, seq, rng):
    """``count`` sample lengths (numpy ``rng``): ``fixed`` all ``seq``; ``varlen`` uniform in [seq/8, seq];
    ``chat`` long-tailed as chat data is (log-normal, median seq/7, most samples a few hundred tokens at seq
    2048, a tail to ``seq``), at least 16 tokens."""
    if kind == "fixed":
        return [seq] * count
    if kind == "varlen":
        return rng.integers(seq // 8, seq + 1, size=count).tolist()
    if kind == "chat":
        lengths = rng.lognormal(mean=__import__("math").log(seq / 7), sigma=1.0, size=count)
        return [int(min(max(n, 16), seq)) for n in lengths]
    raise ValueError(f"unknown length distribution {kind!r}")


def length_batches(kind, order, mb, count, seq, seed=0):
    """``count`` batches of ``mb`` sample lengths: ``random`` order, or ``grouped`` by length as the HF
    Trainer's LengthGroupedSampler (mega-batches of 50 batches, each sorted longest first), the batches of
    the mega-batches then taken in random order so that a few timed steps see all lengths."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if order == "random":
        return [sample_lengths(kind, mb, seq, rng) for _ in range(count)]
    batches = []
    while len(batches) < count:
        mega = sorted(sample_lengths(kind, 50 * mb, seq, rng), reverse=True)
        batches += [mega[i : i + mb] for i in range(0, len(mega), mb)]
    return [batches[i] for i in rng.permutation(len(batches))[:count]]
