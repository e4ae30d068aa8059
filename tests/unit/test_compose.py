"""docker-compose.yml runs every stage of the pipeline table as a service that
can be scaled (`deploy.replicas`, `docker compose up --scale`): replicas are
members of one consumer group, so nothing may pin a single instance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from consumers.pipeline import STAGES

COMPOSE = Path(__file__).resolve().parents[2] / "docker-compose.yml"


def services() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())["services"]
    return services


def test_every_stage_is_a_worker_service() -> None:
    svc = services()
    for stage in STAGES:
        assert svc[stage]["command"] == ["worker", stage], stage


def test_stage_services_can_be_scaled() -> None:
    svc = services()
    for stage in STAGES:
        s = svc[stage]
        # a fixed name or host port allows one container only
        assert "container_name" not in s, stage
        assert not s.get("ports"), stage
        partitions = int(s["environment"]["KBSTREAM_PARTITIONS"])
        replicas = s.get("deploy", {}).get("replicas", 1)
        assert 1 <= replicas <= partitions, (stage, replicas)
