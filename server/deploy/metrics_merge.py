"""Every replica's Prometheus series in one scrape, each labelled `replica="<id>"`.

Replicas report their own `/metrics` text (the single server's registry, unchanged) to the
metrics board every few seconds; the ingress's `/metrics` merges what the board holds. A family
appears once (HELP and TYPE), with the samples of all replicas under it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

REPLICA_LABEL = "replica"


def merge_metrics(texts: dict[str, str]) -> bytes:
    """Prometheus text exposition of every replica's families, samples labelled by replica."""
    families: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                             family.unit))
            merged.samples.extend(sample._replace(labels={**sample.labels, REPLICA_LABEL: replica})
                                  for sample in family.samples)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(families.values()))
    return generate_latest(registry)


class _Fixed:
    """A collector that yields families already built."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)
