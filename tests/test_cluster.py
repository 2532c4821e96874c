"""`loraserve cluster` on a local Ray cluster on CPU: two replicas of the tiny model behind Ray Serve's
HTTP proxy, against a single `loraserve serve` holding the same adapters.

Ray starts once for the module (in this process: it kills replicas and reads Serve's status); the
cluster runs as the real command in a subprocess joined to it; the last test redeploys the application
from the shipped Serve config file. The adapters are random (untrained) LoRA weights, so that each one,
and each version of one, answers differently under greedy decoding.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.live import ADMIN_TOKEN, LiveServer, free_port

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = [f"a{i}" for i in range(5)]
PER_REPLICA = 2  # adapters a replica keeps: five adapters over two replicas must evict
SETTINGS = {"MAX_RUNNING": "2", "MAX_QUEUE": "2", "MAX_CONTEXT": "1100", "ADAPTER_SLOTS": str(PER_REPLICA)}
PROMPT = "The capital of France is"
TIMEOUT = httpx.Timeout(120.0)
REPLICA = "x-loraserve-replica"


# -- the module's cluster -----------------------------------------------------------------------------
def write_random_adapters(model_dir: Path, root: Path, names: list[str], *, seed: int = 0) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from bench.engine_bench.workload import lora_config, random_adapter

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    for index, name in enumerate(names):
        state = random_adapter(model, rank=8, seed=seed + index)
        lora_config(8).save_pretrained(root / name)
        save_file({k: v.contiguous() for k, v in state.items()}, root / name / "adapter_model.safetensors")


class Cluster:
    """`python -m loraserve cluster` joined to this process's Ray, stopped with SIGTERM."""

    def __init__(self, base_model: Path, root: Path, *, ray_address: str, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "LORASERVE_ADMIN_TOKEN": ADMIN_TOKEN, **{f"LORASERVE_{k}": v for k, v in SETTINGS.items()}}
        args = ["--base-model", base_model, "--adapter-root", root, "--port", self.port, "--ray-address", ray_address]
        args += ["--replicas", 2, "--models-per-replica", PER_REPLICA, "--log-level", "warning"]
        for name in ADAPTERS:
            args += ["--adapter", f"{name}={name}"]
        self._log = open(log_path, "wb")
        self.log_path = log_path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loraserve", "cluster", *map(str, args)],
            cwd=REPO_ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cluster exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"cluster not ready after {timeout}s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def adapter_root(tiny_model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cluster-adapters")
    write_random_adapters(tiny_model_dir, root, ADAPTERS)
    write_random_adapters(tiny_model_dir, root, ["hot-v1", "hot-v2"], seed=100)
    return root


@pytest.fixture(scope="module")
def ray_address():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def servers(tiny_model_dir, adapter_root, ray_address, tmp_path_factory):
    """The cluster and a single server on the same adapters, started side by side."""
    logs = tmp_path_factory.mktemp("cluster-logs")
    cluster = Cluster(tiny_model_dir, adapter_root, ray_address=ray_address, log_path=logs / "cluster.log")
    single = LiveServer(
        tiny_model_dir, adapter_root, adapters={n: n for n in ADAPTERS}, log_path=logs / "single.log", **SETTINGS
    )
    try:
        single.wait_ready()
        cluster.wait_ready()
        yield cluster, single
    finally:
        cluster.stop()
        single.stop()


@pytest.fixture(scope="module")
def cluster(servers) -> Cluster:
    return servers[0]


@pytest.fixture(scope="module")
def single(servers) -> LiveServer:
    return servers[1]


# -- helpers ------------------------------------------------------------------------------------------
def native(adapter: str | None, max_new_tokens: int = 12, **parameters) -> dict:
    params = {"max_new_tokens": max_new_tokens, "details": True, **parameters}
    if adapter:
        params["adapter_id"] = adapter
    return {"inputs": PROMPT, "parameters": params}


def post(server, path: str, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=TIMEOUT, **kwargs)


def post_all(server, path: str, bodies: list[dict]) -> list[httpx.Response]:
    async def send_all():
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            return await asyncio.gather(*(client.post(server.url + path, json=b) for b in bodies))

    return asyncio.run(send_all())


def sse(response: httpx.Response) -> list:
    return [
        line[len("data: ") :] if line.endswith("[DONE]") else json.loads(line[len("data: ") :])
        for line in response.text.splitlines()
        if line.startswith("data: ")
    ]


def samples(server) -> list:
    text = httpx.get(server.url + "/metrics", timeout=TIMEOUT).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def total(rows: list, name: str, **labels) -> float:
    return sum(s.value for s in rows if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def admin(token: str = ADMIN_TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


ROUTER_NEWS_S = 1.5  # a replica's newly loaded adapter reaches Ray's router (push every 0.1 s, then a long poll)


def wait_for_metrics() -> None:
    time.sleep(2.5)  # replicas push their metrics every 2 s (server.cluster.board)


# -- tests, in the order they run ---------------------------------------------------------------------
def test_adapters_load_lazily_and_requests_stay_with_their_replica(cluster):
    """Start-up adapters are checked once and then loaded only where requests go; repeat requests for one
    adapter land on the replica that has it (the hit rate is printed)."""
    wait_for_metrics()
    before = samples(cluster)
    assert total(before, "loraserve_adapters_loaded") == 0, "no replica loads an adapter before it is asked for"
    assert len({s.labels["replica"] for s in before if s.name == "loraserve_adapters_loaded"}) == 2
    homes: dict[str, Counter] = {}
    for name in ADAPTERS[:4]:  # four adapters, two per replica: all fit
        first = post(cluster, "/generate", native(name)).headers[REPLICA]
        # A replica reports the model ids it holds every 0.1 s, and the controller then tells the router:
        # requests sent before that news arrives go anywhere (Ray's lag, not ours to test).
        time.sleep(ROUTER_NEWS_S)
        homes[name] = Counter([first] + [post(cluster, "/generate", native(name)).headers[REPLICA] for _ in range(5)])
    wait_for_metrics()
    after = samples(cluster)
    hits = total(after, "loraserve_cluster_adapter_requests_total", outcome="hit")
    misses = total(after, "loraserve_cluster_adapter_requests_total", outcome="miss")
    affinity = sum(c.most_common(1)[0][1] for c in homes.values()) / sum(sum(c.values()) for c in homes.values())
    hit_rate = hits / (hits + misses)
    print(f"\nrouting: affinity {affinity:.2f}, hit rate {hit_rate:.2f} ({hits:.0f} hits, {misses:.0f} misses)")
    assert misses >= 4, "each adapter was loaded by the first request for it"
    assert affinity >= 0.9 and hit_rate >= 0.7, homes
    assert total(after, "loraserve_adapters_loaded") <= 2 * PER_REPLICA


def test_a_replica_over_its_limit_evicts_the_least_recently_used(cluster, single):
    for name in ADAPTERS:  # a fifth adapter: some replica holds three, one too many
        assert post(cluster, "/generate", native(name)).status_code == 200
    wait_for_metrics()
    rows = samples(cluster)
    assert total(rows, "loraserve_cluster_adapter_evictions_total") >= 1
    loaded = [s.value for s in rows if s.name == "loraserve_adapters_loaded"]
    assert loaded and max(loaded) <= PER_REPLICA, loaded
    for name in ADAPTERS:  # evicted ones load again on demand, and answer as before
        ours, theirs = (post(s, "/generate", native(name)).json() for s in (cluster, single))
        assert ours["generated_text"] == theirs["generated_text"]


@pytest.mark.parametrize("adapter", [None, "a1"])
def test_both_wire_formats_and_streams_answer_as_a_single_server(cluster, single, adapter):
    def ask(server):
        blocking = post(server, "/generate", native(adapter)).json()
        streamed = sse(post(server, "/generate_stream", native(adapter)))
        model = adapter or httpx.get(server.url + "/v1/models").json()["data"][0]["id"]
        completion = post(
            server, "/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
        )
        chat = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 0}
        chat_stream = sse(post(server, "/v1/chat/completions", {**chat, "stream": True}))
        return {
            "blocking": (blocking["generated_text"], [t["id"] for t in blocking["details"]["tokens"]]),
            "adapter_version": blocking["details"].get("adapter_version"),
            "stream": ([e["token"]["id"] for e in streamed], streamed[-1]["generated_text"]),
            "completion": completion.json()["choices"][0]["text"],
            "chat": post(server, "/v1/chat/completions", chat).json()["choices"][0]["message"]["content"],
            "chat_stream": "".join(
                c["choices"][0]["delta"].get("content") or "" for c in chat_stream[:-1] if c["choices"]
            ),
            "done": chat_stream[-1],
        }

    ours, theirs = ask(cluster), ask(single)
    assert ours == theirs
    assert ours["done"] == "[DONE]" and ours["blocking"][0]


def test_beyond_every_replica_and_rays_queue_requests_get_429(cluster):
    """Overload: past each replica's running and queued requests (MAX_RUNNING + MAX_QUEUE) and as many
    queued again in Ray, a request is refused at once with 429 and Retry-After, as a single server refuses;
    every admitted one completes."""
    running, queue = int(SETTINGS["MAX_RUNNING"]), int(SETTINGS["MAX_QUEUE"])
    capacity = 2 * (running + queue) + 2 * (running + 2 * queue)  # the replicas' own, then Ray's queue
    # Twice the capacity, each long enough to outlast the burst: on a loaded CI machine a burst of capacity + 14
    # short ones once arrived slowly enough for the replicas to keep up (34 of 34 answered 200).
    responses = post_all(cluster, "/generate", [native(None, max_new_tokens=400)] * (2 * capacity + 14))
    codes = Counter(r.status_code for r in responses)
    others = [r.text[:200] for r in responses if r.status_code not in (200, 429)][:1]
    assert set(codes) <= {200, 429} and codes[429] >= 1, (codes, others)
    assert codes[200] >= 2 * int(SETTINGS["MAX_RUNNING"]), codes  # the replicas were not refused work
    refused = [r for r in responses if r.status_code == 429]
    assert all(r.headers.get("retry-after") for r in refused), refused[0].headers
    assert "cluster is at capacity" in refused[0].text, refused[0].text  # Ray's refusal, not a replica's own 429


def test_a_burst_the_replicas_can_take_is_never_refused(cluster):
    """Ray counts a request as queued until a replica takes it: a burst into idle replicas, no larger than
    what they take at once, must not meet Ray's bound before any of it is assigned."""
    fits = 2 * (int(SETTINGS["MAX_RUNNING"]) + int(SETTINGS["MAX_QUEUE"]))
    for _ in range(3):
        responses = post_all(cluster, "/generate", [native(None, max_new_tokens=8)] * fits)
        assert [r.status_code for r in responses] == [200] * fits, [r.text[:200] for r in responses]


def test_listings_and_errors_answer_as_a_single_server(cluster, single):
    def get(server, path, **kwargs):
        return httpx.get(server.url + path, timeout=TIMEOUT, **kwargs)

    assert [m["id"] for m in get(cluster, "/v1/models").json()["data"]] == [
        m["id"] for m in get(single, "/v1/models").json()["data"]
    ]
    versions = [{a["name"]: a["version"] for a in get(s, "/adapters").json()} for s in (cluster, single)]
    assert versions[0] == versions[1] and sorted(versions[0]) == ADAPTERS
    assert get(cluster, "/info").json()["adapters"] == ADAPTERS
    for path, body in [
        ("/generate", native("nope")),
        ("/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 0}}),
        ("/v1/completions", {"model": "nope", "prompt": PROMPT}),
        ("/admin/adapters", {"name": "x", "path": "../outside"}),
    ]:
        ours, theirs = (post(s, path, body, headers=admin()) for s in (cluster, single))
        assert (ours.status_code, ours.json()) == (theirs.status_code, theirs.json()), path
    for token in (None, "wrong"):
        headers = admin(token) if token else {}
        ours, theirs = (
            post(s, "/admin/adapters", {"name": "x", "path": "a0"}, headers=headers) for s in (cluster, single)
        )
        assert (ours.status_code, ours.json()) == (theirs.status_code, theirs.json())
    assert get(cluster, "/health").json() == {"status": "ok"}


def spread(cluster, body: dict, *, rounds: int = 4, status: int = 200) -> list[httpx.Response]:
    """More concurrent requests than one replica takes (4): Ray sends the rest to the other one. The answers
    with `status`, until both replicas gave one; a request Ray's bounded queue refuses under the burst (429)
    is not an answer to look at."""
    responses = []
    for _ in range(rounds):
        burst = post_all(cluster, "/generate", [body] * 10)
        assert {r.status_code for r in burst} <= {status, 429}, [r.text[:200] for r in burst]
        responses += [r for r in burst if r.status_code == status]
        if len({r.headers.get(REPLICA) for r in responses}) == 2:
            break
    return responses


def test_a_hot_reload_reaches_every_replica_before_the_call_returns(cluster):
    body = native("hot", max_new_tokens=48, ignore_eos=True)
    loaded = post(cluster, "/admin/adapters", {"name": "hot", "path": "hot-v1"}, headers=admin())
    assert loaded.status_code == 200, loaded.text
    before = spread(cluster, body)
    assert len({r.headers[REPLICA] for r in before}) == 2, "the test needs hot-v1 on both replicas"
    assert {r.json()["details"]["adapter_version"] for r in before} == {loaded.json()["version"]}
    reloaded = post(cluster, "/admin/adapters", {"name": "hot", "path": "hot-v2"}, headers=admin())
    assert reloaded.status_code == 200 and reloaded.json()["version"] != loaded.json()["version"]
    after = spread(cluster, body)
    assert len({r.headers[REPLICA] for r in after}) == 2
    assert {r.json()["details"]["adapter_version"] for r in after} == {reloaded.json()["version"]}
    assert len({r.json()["generated_text"] for r in after}) == 1
    assert after[0].json()["generated_text"] != before[0].json()["generated_text"]
    unloaded = httpx.delete(cluster.url + "/admin/adapters/hot", headers=admin(), timeout=TIMEOUT)
    assert unloaded.status_code == 200
    gone = spread(cluster, body, status=404)
    assert len({r.headers[REPLICA] for r in gone}) == 2, "the unload reached one replica only"
    assert "hot" not in [m["id"] for m in httpx.get(cluster.url + "/v1/models").json()["data"]]


def test_the_gpu_benchmarks_client_and_table_run_through_the_cluster(cluster, single, tmp_path):
    """bench/gpu/run_cluster.sh's CPU-testable parts: bench/serving.py with Zipf adapter choice through
    the proxy and against one server, then bench/cluster_compare.py on both and the cluster's /metrics."""
    for name, server in (("cluster", cluster), ("single", single)):
        done = subprocess.run(
            [sys.executable, "bench/serving.py", "--url", server.url, "--adapters", ",".join(ADAPTERS)]
            + ["--adapter-dist", "zipf", "--concurrency", "2", "--requests", "6", "--warmup", "0"]
            + ["--input-len", "8", "--output-len", "4", "--json", str(tmp_path / f"{name}.json")],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
    wait_for_metrics()
    (tmp_path / "metrics.txt").write_text(httpx.get(cluster.url + "/metrics").text)
    files = ["--single", tmp_path / "single.json", "--cluster", tmp_path / "cluster.json"]
    files += ["--metrics", tmp_path / "metrics.txt", "--json", tmp_path / "comparison.json"]
    table = subprocess.run(
        [sys.executable, "bench/cluster_compare.py", *map(str, files)], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert table.returncode == 0, table.stderr
    comparison = json.loads((tmp_path / "comparison.json").read_text())
    assert [row["concurrency"] for row in comparison["levels"]] == [2]
    assert comparison["levels"][0]["errors"] == [0, 0]
    routing = comparison["routing"]
    assert len(routing["replicas"]) == 2 and 0 < routing["hit_rate"] < 1
    assert "routing hit rate" in table.stdout


def engine_replicas() -> list[str]:
    """The ids of the engine replicas alive now (starting ones included)."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    return [name.rsplit("#", 1)[1] for name in names if "#EngineReplica#" in name]


def test_a_killed_replica_fails_its_streams_in_band_and_comes_back(cluster):
    with httpx.Client(timeout=TIMEOUT) as client, contextlib.ExitStack() as streams:
        doomed, spared = streams_on_two_replicas(client, streams, cluster.url)
        lines = doomed.iter_lines()
        next(line for line in lines if line.startswith("data: "))  # it is generating
        victim = doomed.headers[REPLICA]
        others = set(engine_replicas()) - {victim}
        kill_replica(victim)
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
        survivor = [json.loads(line[6:]) for line in spared.iter_lines() if line.startswith("data: ")]
    assert "error" in events[-1] and "retry" in events[-1]["error"], events[-3:]
    assert len(events) < 999, "the stream ended early"
    assert survivor[-1].get("details", {}).get("generated_tokens") == 300, survivor[-2:]
    deadline = time.monotonic() + 120
    while not (new := set(engine_replicas()) - others - {victim}):
        assert time.monotonic() < deadline, "Ray did not replace the killed replica"
        time.sleep(1)
    while post(cluster, "/generate", native(None)).headers.get(REPLICA) not in new:  # until it answers
        assert time.monotonic() < deadline, "the new replica never answered"
    answers = post_all(cluster, "/generate", [native("a0")] * 8)
    assert [r.status_code for r in answers] == [200] * 8


def streams_on_two_replicas(client: httpx.Client, streams: contextlib.ExitStack, url: str):
    """A long stream, and a shorter one that Ray routed to the other replica. Ray picks the less busy of
    two replicas from queue lengths it caches, so a try may land on the busy one: that stream is closed
    (the server cancels it) and another is tried."""
    doomed = streams.enter_context(
        client.stream("POST", url + "/generate_stream", json=native("a0", max_new_tokens=1000, ignore_eos=True))
    )
    for _ in range(12):
        attempt = client.stream(
            "POST", url + "/generate_stream", json=native(None, max_new_tokens=300, ignore_eos=True)
        )
        spared = attempt.__enter__()
        if spared.headers[REPLICA] != doomed.headers[REPLICA]:
            streams.push(lambda *exc, attempt=attempt: attempt.__exit__(*exc))
            return doomed, spared
        attempt.__exit__(None, None, None)
        time.sleep(0.5)
    pytest.fail("every stream went to one replica")


def kill_replica(replica_id: str) -> None:  # what a crashed process looks like to Ray
    [name] = [
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith("#" + replica_id)
    ]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def model_ids(server) -> list[str]:
    """/v1/models' ids, or [] while the application is being replaced (its ingress may not answer)."""
    try:
        return [m["id"] for m in httpx.get(server.url + "/v1/models", timeout=5).json()["data"]]
    except (httpx.HTTPError, ValueError, KeyError):
        return []


def test_the_example_serve_config_deploys(cluster, single, tiny_model_dir, adapter_root, ray_address, tmp_path):
    """The shipped examples/cluster.yaml, its paths and sizes changed for this machine, deployed by
    Ray's own `serve run` over the running application."""
    config = yaml.safe_load((REPO_ROOT / "examples" / "cluster.yaml").read_text())
    config["http_options"]["port"] = cluster.port
    app = config["applications"][0]
    app["args"].update(base_model=str(tiny_model_dir), adapter_root=str(adapter_root), adapters={"a3": "a3"})
    app["args"].update({k.lower(): int(v) for k, v in SETTINGS.items()})
    app["args"]["cluster"].update(replicas=1, num_gpus=0, models_per_replica=PER_REPLICA)  # one: CI has 2 cores
    app["runtime_env"]["env_vars"]["LORASERVE_ADMIN_TOKEN"] = "from-the-config"
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    serve_cli = Path(sys.executable).parent / "serve"
    done = subprocess.run(
        [serve_cli, "run", path, "--non-blocking", "--address", ray_address],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        status = serve.status().applications["loraserve"]
        assert status.status != "DEPLOY_FAILED", status.message
        models = model_ids(cluster)
        if status.status == "RUNNING" and models[1:] == ["a3"]:  # the config's own start-up adapters
            break
        time.sleep(1)
    assert models[1:] == ["a3"], (status, models)
    assert status.status == "RUNNING", status
    ours, theirs = (post(s, "/generate", native("a3")).json()["generated_text"] for s in (cluster, single))
    assert ours == theirs
    wrong = post(cluster, "/admin/adapters", {"name": "a0", "path": "a0"}, headers=admin())
    assert wrong.status_code == 403, "the admin token comes from the config's env_vars"
    assert (
        post(cluster, "/admin/adapters", {"name": "a0", "path": "a0"}, headers=admin("from-the-config")).status_code
        == 200
    )
