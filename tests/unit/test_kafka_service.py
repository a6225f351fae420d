"""Regression: a generated Kafka cluster id starting with '-' broke `StorageTool format` (1 run in 64)."""

from __future__ import annotations

import base64

from sensormine.services.kafka import _cluster_id


def test_cluster_ids_never_start_with_a_dash_and_decode_to_16_bytes() -> None:
    ids = [_cluster_id() for _ in range(5000)]
    assert not any(i.startswith("-") for i in ids)
    assert all(len(base64.urlsafe_b64decode(i + "==")) == 16 for i in ids)
    assert len(set(ids)) == len(ids)
