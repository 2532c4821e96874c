"""HTTP clients for the scenarios: one streamed generation with its timings, and /metrics as numbers."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

TIMEOUT = httpx.Timeout(120.0)


@dataclass
class Outcome:
    """One streamed request as its client saw it (times: time.monotonic())."""

    adapter: str | None
    prompt: int  # index into world.PROMPTS
    sent: float
    status: int = 0
    first_at: float | None = None
    done_at: float | None = None
    token_times: list[float] = field(default_factory=list)
    text: str = ""
    final: dict | None = None  # the last event's `details` when the stream ended normally
    error: str | None = None  # in-band error event, transport error or error body
    retry_after: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.final is not None and self.error is None

    @property
    def version(self) -> str | None:
        return (self.final or {}).get("adapter_version")

    @property
    def ttft(self) -> float | None:
        return None if self.first_at is None else self.first_at - self.sent

    @property
    def tpot(self) -> float | None:
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)


def body(prompt: str, adapter: str | None, *, max_new_tokens: int) -> dict:
    """Greedy and exactly `max_new_tokens` long (ignore_eos), so texts and token counts are exact."""
    parameters = {"max_new_tokens": max_new_tokens, "ignore_eos": True, "details": True}
    return {"inputs": prompt, "parameters": parameters, **({"adapter": adapter} if adapter else {})}


async def stream(
    client: httpx.AsyncClient, prompts: tuple[str, ...], index: int, adapter: str | None, *, max_new_tokens: int
) -> Outcome:
    out = Outcome(adapter=adapter, prompt=index, sent=time.monotonic())
    try:
        request = body(prompts[index], adapter, max_new_tokens=max_new_tokens)
        async with client.stream("POST", "/generate_stream", json=request) as response:
            out.status = response.status_code
            if response.status_code != 200:
                out.retry_after = response.headers.get("retry-after")
                out.error = (await response.aread()).decode(errors="replace")[:300]
            else:
                async for line in response.aiter_lines():
                    if line.startswith("data:"):
                        _take(out, json.loads(line[len("data:") :]))
    except httpx.HTTPError as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    out.done_at = time.monotonic()
    return out


def _take(out: Outcome, event: dict) -> None:
    now = time.monotonic()
    if "error" in event:
        out.error = str(event["error"])
        return
    out.first_at = out.first_at or now
    out.token_times.append(now)
    out.text += event["token"]["text"]
    if event.get("details") is not None:
        out.final = event["details"] | {"generated_text": event["generated_text"]}


async def scrape(client: httpx.AsyncClient) -> dict[str, float]:
    """Every metric family's samples summed over their labels: {name: value}."""
    text = (await client.get("/metrics")).text
    numbers: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            numbers[sample.name] = numbers.get(sample.name, 0.0) + sample.value
    return numbers


async def admin(client: httpx.AsyncClient, token: str, method: str, name: str, path: str | None = None):
    headers = {"Authorization": f"Bearer {token}"}
    if method == "load":
        return await client.post("/admin/adapters", json={"name": name, "path": path}, headers=headers)
    return await client.delete(f"/admin/adapters/{name}", headers=headers)
