"""The cluster's plain-Python parts, without Ray: the catalog's generations, reading the adapter from a
request, running the server's app on a forwarded request, the merged /metrics, the settings' bounds."""

from __future__ import annotations

import asyncio
import json

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.cluster.board import MetricsBoard
from server.cluster.catalog import AdapterCatalog, model_id, parse_model_id
from server.cluster.forwarding import ForwardedRequest, call_app, requested_adapter
from server.cluster.settings import ClusterSettings
from server.errors import ServeError
from server.settings import ServerSettings

INFO = {"name": "x", "loaded_at": 1.0}


def test_a_reload_gets_a_new_generation_and_a_late_publish_loses():
    catalog = AdapterCatalog()
    first, second = catalog.reserve(), catalog.reserve()
    assert catalog.publish("a", "v2", second, INFO)
    assert not catalog.publish("a", "v1", first, INFO), "an older load must not overwrite a newer one"
    assert catalog.lookup("a").path == "v2" and catalog.lookup("a").model_id == model_id("a", second)


def test_an_unload_leaves_a_tombstone_that_start_up_seeds_cannot_revive():
    catalog = AdapterCatalog()
    catalog.seed("a", "a", INFO)
    assert catalog.lookup("a").generation == 0
    removed = catalog.remove("a")
    assert removed.path == "a" and catalog.lookup("a") is None and catalog.live() == []
    catalog.seed("a", "a", INFO)  # a replica starting later, with the same start-up settings
    assert catalog.lookup("a") is None
    assert catalog.remove("a") is None


def test_model_ids_round_trip_with_dots_and_dashes():
    assert parse_model_id(model_id("facts-en.v2", 17)) == ("facts-en.v2", 17)


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        ("/generate", {"inputs": "x", "adapter": "a"}, "a"),
        ("/generate_stream", {"inputs": "x", "parameters": {"adapter_id": "b"}}, "b"),
        ("/", {"inputs": "x", "adapter": "a", "parameters": {"adapter_id": "b"}}, "a"),  # as the routes read it
        ("/generate", {"inputs": "x"}, None),
        ("/v1/completions", {"model": "a", "prompt": "x"}, "a"),
        ("/v1/chat/completions", {"model": "base", "messages": []}, None),
        ("/v1/completions", {"model": 3}, None),
        ("/generate", [1, 2], None),
        ("/admin/adapters", {"adapter": "a"}, None),
    ],
)
def test_the_adapter_a_request_names(path, body, expected):
    assert requested_adapter(path, json.dumps(body).encode(), base_name="base") == expected


def test_a_body_that_does_not_parse_names_no_adapter():
    assert requested_adapter("/generate", b"{not json", base_name="base") is None


def test_call_app_streams_the_apps_messages_and_tells_it_when_the_client_left():
    seen = {}

    async def app(scope, receive, send):
        seen["path"], seen["body"] = scope["path"], (await receive())["body"]
        await send({"type": "http.response.start", "status": 200, "headers": [(b"a", b"1")]})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        seen["then"] = (await receive())["type"]  # blocks until the consumer stops reading

    async def main():
        request = ForwardedRequest("POST", "/generate", b"", [], b"{}")
        messages = call_app(app, request, headers=[(b"x-replica", b"r1")])
        start = await anext(messages)
        body = await anext(messages)
        await messages.aclose()
        return start, body

    start, body = asyncio.run(main())
    assert start["headers"] == [(b"a", b"1"), (b"x-replica", b"r1")] and body["body"] == b"first"
    assert seen == {"path": "/generate", "body": b"{}", "then": "http.disconnect"}


def replica_text(value: float) -> str:
    registry = CollectorRegistry()
    Counter("loraserve_requests", "HTTP requests", ["route"], registry=registry).labels("/generate").inc(value)
    return generate_latest(registry).decode()


def test_the_board_labels_each_replica_and_forgets_silent_ones():
    board = MetricsBoard(max_age=5)
    board.report("r1", replica_text(2), now=0)
    board.report("r2", replica_text(3), now=4)
    merged = text_string_to_metric_families(board.exposition(now=4).decode())
    values = {s.labels["replica"]: s.value for f in merged for s in f.samples if s.name == "loraserve_requests_total"}
    assert values == {"r1": 2, "r2": 3}
    assert board.replicas(now=8) == ["r2"]


def test_models_per_replica_must_leave_room_for_an_admin_load():
    server = ServerSettings(base_model="m", max_adapters=4, adapter_slots=8)
    with pytest.raises(ServeError, match="below max_adapters"):
        ClusterSettings().adapters_per_replica(server)
    assert ClusterSettings(models_per_replica=3).adapters_per_replica(server) == 3
    assert ClusterSettings().max_ongoing_requests(ServerSettings(base_model="m", max_running=4, max_queue=6)) == 10


def test_the_benchmark_reads_the_hit_rate_from_the_merged_metrics():
    from bench.cluster_compare import routing

    registry = CollectorRegistry()
    requests = Counter("loraserve_cluster_adapter_requests", "", ["outcome"], registry=registry)
    requests.labels("hit").inc(6)
    requests.labels("miss").inc(2)
    board = MetricsBoard(max_age=5)
    board.report("r1", generate_latest(registry).decode(), now=0)
    board.report("r2", generate_latest(registry).decode(), now=0)
    route = routing(board.exposition(now=0).decode())
    assert (route["hits"], route["misses"], route["hit_rate"]) == (12, 4, 0.75)
    assert sorted(route["replicas"]) == ["r1", "r2"]


def test_the_benchmark_compares_the_levels_both_runs_have():
    from bench.cluster_compare import compare

    def run(tok_s: dict[int, float]) -> dict:
        return {
            "levels": [
                {
                    "mode": "concurrency",
                    "level": n,
                    "output_throughput": v,
                    "ttft_ms": {"p50": 1, "p99": 2},
                    "errors": {},
                }
                for n, v in tok_s.items()
            ]
        }

    rows = compare(run({8: 100.0, 32: 200.0}), run({8: 180.0, 64: 1.0}))
    assert [(r["concurrency"], r["ratio"]) for r in rows] == [(8, 1.8)]
