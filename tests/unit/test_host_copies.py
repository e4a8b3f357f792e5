"""The logging output of an update is read from fairseq's meters when first accessed, not when it is made."""

import torch
from fairseq.logging import metrics

from fairseq_ext.cube.host_copies import LoggedValues


class CountingAggregator:
    """An aggregator that counts how often its values are read."""

    def __init__(self, meters):
        self.meters = meters
        self.reads = 0

    def get_smoothed_values(self):
        self.reads += 1
        return self.meters.get_smoothed_values()


def test_values_are_read_from_the_meters_on_first_access_only():
    with metrics.aggregate() as meters:
        metrics.log_scalar("loss", torch.tensor(3.0), 2, round=3)
        metrics.log_scalar("wpb", 10.0)
    aggregator = CountingAggregator(meters)
    logged = LoggedValues(aggregator, sample_size=2.0)
    assert aggregator.reads == 0
    assert logged["loss"] == 3.0 and isinstance(logged["loss"], float)
    assert dict(logged) == {"loss": 3.0, "sample_size": 2.0}  # fairseq drops wpb (and ppl, wps, bsz)
    assert len(logged) == 2 and aggregator.reads == 1
