"""What every scenario serves: the tiny model and random adapters, several versions per name.

Random adapters need no training (seconds, not minutes) and differ from the base and from each other
from the first token on, so a response that mixed two versions cannot match either version's own text.
A version is a directory `<name>-v<k>` under the adapter root; reloading `<name>` from another one
publishes a new version (the version is the files' hash: the dirs have no manifest).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bench.engine_bench.workload import lora_config, random_adapter
from tests.live import LiveServer

# Ranks differ between versions, so the churn also grows and shrinks the device slots.
RANKS = (4, 8, 16)
# Every scenario compares answers with each version's own greedy text, so no greedy path may pass an
# exact near-tie: batches of other shapes round differently in the last bits and may take the other
# branch (no version mixed in). `near_ties` checks it. "中国的首都是北京。请回答问题。" had one for a0-v2
# (top-2 logit gap 1.4e-6 at its 13th token) and was replaced.
PROMPTS = (
    "hello world the quick brown fox",
    "the capital city of the world answer",
    "red blue green apple river castle tower",
    "北京是中国的首都。请回答这个问题。",
)
NEAR_TIE = 1e-4  # a top-2 logit gap below this is a near-tie (fp32 rounding between batch shapes is ~1e-6)


@dataclass
class World:
    model: Path
    root: Path  # the adapter root
    names: list[str]
    versions: int  # version dirs per name
    logs: Path
    servers: list[LiveServer] = field(default_factory=list)

    def path(self, name: str, index: int) -> str:
        return f"{name}-v{index % self.versions}"

    def serve(self, *, preload: list[str], label: str, **settings) -> LiveServer:
        """A live server with `preload` at their version 0; stopped by `stop_all` if the caller does not."""
        server = LiveServer(
            self.model,
            self.root,
            adapters={name: self.path(name, 0) for name in preload},
            log_path=self.logs / f"{label}.log",
            max_adapters=len(self.names) + 1,  # + a probe name (expected texts)
            **settings,
        )
        self.servers.append(server)
        return server.wait_ready()

    def log_problems(self, server: LiveServer, *, allow: tuple[str, ...] = ()) -> list[str]:
        """The server log's error lines and tracebacks, but those naming an expected cause in `allow`."""
        lines = [line for line in server.log().splitlines() if "Traceback" in line or " ERROR " in line]
        return [f"server log: {line[:300]}" for line in lines if not any(word in line for word in allow)]

    def stop_all(self) -> None:
        for server in self.servers:
            server.stop()
        self.servers.clear()


def build_world(work: Path, *, model: Path | None = None, names: int = 4, versions: int = 3) -> World:
    """The tiny model (built at `work/model` unless given) and `names` × `versions` random adapters."""
    from loraserve.tiny_model import build_tiny_model

    model = model or build_tiny_model(work / "model")
    root = work / "adapters"
    world = World(model=model, root=root, names=[f"a{i}" for i in range(names)], versions=versions, logs=work / "logs")
    world.logs.mkdir(parents=True, exist_ok=True)
    _write_adapters(world)
    return world


def near_ties(world: World, *, max_new_tokens: int) -> list[str]:
    """(version, prompt, token) of every greedy path (base and each version, transformers + PEFT in fp32)
    whose top-2 logit gap falls under NEAR_TIE within `max_new_tokens`: where an exact comparison is unsound."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(world.model)
    found = []
    for version in [None] + [world.path(name, k) for name in world.names for k in range(world.versions)]:
        model = AutoModelForCausalLM.from_pretrained(world.model, dtype=torch.float32)
        model = (PeftModel.from_pretrained(model, str(world.root / version)) if version else model).eval()
        for index, prompt in enumerate(PROMPTS):
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            out = model.generate(
                ids,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
            )
            for token, scores in enumerate(out.scores):
                top = torch.topk(scores[0].float(), 2).values
                if top[0] - top[1] < NEAR_TIE:
                    found.append(f"{version or 'base'} prompt {index} token {token}: gap {top[0] - top[1]:.2e}")
    return found


def _write_adapters(world: World) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(world.model)
    for n, name in enumerate(world.names):
        for k in range(world.versions):
            out = world.root / world.path(name, k)
            if (out / "adapter_model.safetensors").is_file():
                continue  # seeded: the same files as last time
            rank = RANKS[(n + k) % len(RANKS)]
            lora_config(rank).save_pretrained(out)
            state = random_adapter(base, rank=rank, seed=100 * n + k)
            save_file({key: value.contiguous() for key, value in state.items()}, out / "adapter_model.safetensors")
