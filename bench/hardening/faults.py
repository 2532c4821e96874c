"""Faults: an injected out-of-memory error in a decode step, then in an adapter load
(LORASERVE_FAULT_INJECTION, server/engine/faults.py; each fires once).

Decode: three requests decode together when the fault fires; the newest alone must fail, with an
in-band error naming the cause, and the other two finish with exactly the text they give alone. Adapter
load: the reload fails with a clear error; the old version keeps serving the same text, the other
adapter too, and the next reload succeeds. After each, health and readiness answer 200, no slot is held,
and the same requests succeed again.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import httpx

from bench.hardening.client import TIMEOUT, Outcome, admin, scrape, stream
from bench.hardening.report import Report
from bench.hardening.world import PROMPTS, World

PRELOADED = 2  # attaches 1 and 2 at start-up; the fault takes the 3rd: the first admin load
IDLE = ("loraserve_running_generations", "loraserve_kv_slots_used", "loraserve_adapter_slots_pinned")


@dataclass(frozen=True)
class Size:
    max_new_tokens: int = 200  # long enough that the three overlap whatever the machine's speed


QUICK = FULL = Size()


def run(world: World, size: Size = QUICK) -> Report:
    faults = {"decode_oom_rows": 3, "adapter_load_oom": PRELOADED + 1}
    server = world.serve(preload=world.names[:PRELOADED], label="faults", fault_injection=faults)
    try:
        return asyncio.run(_run(world, server, size))
    finally:
        server.stop()


async def _run(world: World, server, size: Size) -> Report:
    report = Report("faults")
    a0, a1 = world.names[:PRELOADED]
    trio = [(a0, 0), (a1, 1), (None, 2)]
    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as client:

        async def ask(adapter, prompt) -> Outcome:
            return await stream(client, PROMPTS, prompt, adapter, max_new_tokens=size.max_new_tokens)

        alone = [await ask(*request) for request in trio]  # one row at a time: the fault stays armed
        together = await asyncio.gather(*(ask(*request) for request in trio))
        failed = [out for out in together if not out.ok]
        report.check(len(failed) == 1, f"{len(failed)} of the 3 failed; only the newest should")
        for out in failed:
            report.check("OutOfMemoryError" in (out.error or ""), f"unclear error: {out.error}")
        for out, reference in zip(together, alone):
            report.check(not out.ok or out.text == reference.text, f"{out.adapter}: a survivor's text changed")
        await _recovered(client, report, "decode fault")
        again = await asyncio.gather(*(ask(*request) for request in trio))
        report.check([o.text for o in again] == [o.text for o in alone], "after the decode fault: texts differ")

        before = (await client.get(f"/adapters/{a0}")).json()["version"]
        refused = await admin(client, server.admin_token, "load", a0, world.path(a0, 1))
        report.check(refused.status_code >= 500 and "OutOfMemoryError" in refused.text, f"load: {refused.text}")
        report.check((await client.get(f"/adapters/{a0}")).json()["version"] == before, "the old version was lost")
        await _recovered(client, report, "adapter load fault")
        intact = [await ask(*request) for request in trio]
        report.check([o.text for o in intact] == [o.text for o in alone], "after the load fault: texts differ")
        retried = await admin(client, server.admin_token, "load", a0, world.path(a0, 1))
        report.check(retried.status_code == 200, f"the reload after the fault: {retried.text}")
        numbers = await scrape(client)
    report.failures += world.log_problems(server, allow=("forward failed", "loading adapter", "Traceback"))
    report.figures = {
        "decode step: requests failed / of": f"{len(failed)} / {len(together)}",
        "decode step: error": (failed[0].error or "")[:90] if failed else None,
        "adapter load: status": refused.status_code,
        "adapter load: error": refused.json().get("error", "")[:90],
        "adapters in host memory after": int(numbers["loraserve_adapters_in_host_memory"]),
        "reload after the fault": retried.status_code,
    }
    return report


async def _recovered(client: httpx.AsyncClient, report: Report, after: str) -> None:
    for path in ("/health", "/ready"):
        status = (await client.get(path)).status_code
        report.check(status == 200, f"after the {after}: {path} {status}")
    numbers = await scrape(client)
    for name in IDLE:
        report.check(numbers[name] == 0, f"after the {after}: {name} is {numbers[name]:.0f}")
