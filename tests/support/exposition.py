"""Prometheus text read back with prometheus-client's own parser, sample by sample."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


def key(sample: Sample) -> str:
    labels = ",".join(f'{name}="{value}"' for name, value in sorted(sample.labels.items()))
    return f"{sample.name}{{{labels}}}" if labels else sample.name


def values(text: str) -> dict[str, float]:
    """Every sample of an exposition, parsed by prometheus-client, by name and labels."""
    return {
        key(sample): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
