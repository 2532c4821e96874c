"""Which adapter version could answer a request: each version's own texts, and a timeline of loads.

A client cannot see the instant a load is published, only when it sent the admin call and when the
answer came back; the timeline keeps both ends, so its checks are exact on what is certain and never
blame a request for what the clocks cannot decide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import httpx

from bench.hardening.client import Outcome, admin, stream
from bench.hardening.world import PROMPTS, World

PROBE = "probe"


async def expected_texts(
    client: httpx.AsyncClient,
    world: World,
    token: str,
    *,
    max_new_tokens: int,
    live: list[str] = (),
    paths: list[str] | None = None,
) -> dict:
    """{version: {prompt index: text}}, None → the base model's: the `live` adapters asked as they are,
    and each version dir of `paths` (default: every one) loaded alone under a probe name."""
    texts: dict[str | None, dict[int, str]] = {None: await _texts(client, None, max_new_tokens)}
    for name in live:
        version = (await client.get(f"/adapters/{name}")).json()["version"]
        texts[version] = await _texts(client, name, max_new_tokens)
    probes = [world.path(name, k) for name in world.names for k in range(world.versions)] if paths is None else paths
    for path in probes:
        loaded = await admin(client, token, "load", PROBE, path)
        loaded.raise_for_status()
        texts[loaded.json()["version"]] = await _texts(client, PROBE, max_new_tokens)
    if probes:
        (await admin(client, token, "unload", PROBE)).raise_for_status()
    return texts


async def _texts(client: httpx.AsyncClient, adapter: str | None, max_new_tokens: int) -> dict[int, str]:
    texts = {}
    for index in range(len(PROMPTS)):
        out = await stream(client, PROMPTS, index, adapter, max_new_tokens=max_new_tokens)
        if not out.ok:
            raise RuntimeError(f"expected text of {adapter} prompt {index}: {out.status} {out.error}")
        texts[index] = out.text
    return texts


@dataclass
class _Span:
    start: float  # the earliest it may have begun (the admin call was sent)
    end: float = math.inf  # the latest it may have lasted (its replacement's or unload's answer came)


@dataclass
class Timeline:
    served: dict[tuple[str, str], list[_Span]] = field(default_factory=dict)  # (name, version) → may-serve spans
    present: dict[str, list[_Span]] = field(default_factory=dict)  # name → spans it surely answered
    live: dict[str, str] = field(default_factory=dict)  # name → the version published last

    def preloaded(self, name: str, version: str) -> None:
        self.served.setdefault((name, version), []).append(_Span(-math.inf))
        self.present.setdefault(name, []).append(_Span(-math.inf))
        self.live[name] = version

    def published(self, name: str, version: str, *, sent: float, done: float) -> None:
        old = self.live.get(name)
        if old is not None:
            self.served[(name, old)][-1].end = done
        else:
            self.present.setdefault(name, []).append(_Span(done))
        self.served.setdefault((name, version), []).append(_Span(sent))
        self.live[name] = version

    def unloaded(self, name: str, *, sent: float, done: float) -> None:
        self.served[(name, self.live.pop(name))][-1].end = done
        self.present[name][-1].end = sent

    def could_serve(self, name: str, version: str, out: Outcome, *, by: float | None = None) -> bool:
        """Whether `version` may have been live between the request's sending and `by` (default: its end)."""
        until = out.done_at if by is None else by
        return any(span.start <= until and span.end >= out.sent for span in self.served.get((name, version), []))

    def surely_present(self, name: str, out: Outcome) -> bool:
        return any(span.start <= out.sent and span.end >= out.done_at for span in self.present.get(name, []))


def judge(out: Outcome, texts: dict, timeline: Timeline) -> str | None:
    """Why `out` is wrong, or None: an answer by a version that could serve it, token for token that
    version's own text (no mixing); a 404 only while its adapter was not surely loaded."""
    where = f"{out.adapter or 'base'} prompt {out.prompt}"
    if out.ok:
        version = out.version
        if out.adapter is not None and not timeline.could_serve(out.adapter, version, out):
            return f"{where}: answered by version {version}, not live while the request ran"
        own = texts.get(version, {}).get(out.prompt)
        if own != out.text or out.final["generated_text"] != out.text:
            return f"{where}: version {version} answered a text not its own ({_diverges(out.text, own, texts, out)})"
        return None
    if out.status == 404 and out.adapter is not None and not timeline.surely_present(out.adapter, out):
        return None
    return f"{where}: status {out.status}, error {out.error!r}"


def _diverges(text: str, own: str | None, texts: dict, out: Outcome) -> str:
    """Where the text leaves the version's own, and whether it is another version's text (mixing) or no
    version's (a numerical near-tie that a batch of another shape decided the other way?)."""
    own = own or ""
    at = next((i for i, (a, b) in enumerate(zip(text, own)) if a != b), min(len(text), len(own)))
    others = [v for v, by_prompt in texts.items() if by_prompt.get(out.prompt) == text]
    return f"leaves it at character {at} of {len(own)}; {'the text of ' + str(others) if others else 'no version text'}"
