"""Which adapters the cluster serves: name → the path it loads from, and the generation of that load.

Every hot-load gets a new generation from one counter, and requests carry `name@generation` as Ray's
multiplexed model id: a replica that holds an older generation never sees a request for the new one
without loading it first, so a reload can never be answered by a stale copy. An unload leaves a
tombstone, so that a replica starting later cannot bring the name back from its start-up settings.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

SEP = "@"  # adapter names never contain it (contract.names)


@dataclass(frozen=True)
class Entry:
    name: str
    path: str  # relative to the adapter root, as the load was given
    generation: int
    info: dict | None  # the AdapterInfo a replica answered for this load; None = unloaded (a tombstone)

    @property
    def model_id(self) -> str:
        return model_id(self.name, self.generation)


def model_id(name: str, generation: int) -> str:
    return f"{name}{SEP}{generation}"


def parse_model_id(value: str) -> tuple[str, int]:
    name, _, generation = value.rpartition(SEP)
    return name, int(generation)


class AdapterCatalog:
    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}
        self._generations = itertools.count(1)  # 0 is the start-up settings' generation
        self.base_loaded_at = 0.0

    def reserve(self) -> int:
        """A generation for a load about to be tried; published only if the load succeeds."""
        return next(self._generations)

    def publish(self, name: str, path: str, generation: int, info: dict) -> bool:
        """False when a load reserved later was published first (that one stays)."""
        current = self._entries.get(name)
        if current is not None and current.generation > generation:
            return False
        self._entries[name] = Entry(name, path, generation, info)
        return True

    def seed(self, name: str, path: str, info: dict) -> None:
        """An adapter of the start-up settings, unless the name was loaded or unloaded since."""
        self._entries.setdefault(name, Entry(name, path, 0, info))

    def remove(self, name: str) -> Entry | None:
        entry = self.lookup(name)
        if entry is not None:
            self._entries[name] = Entry(name, entry.path, self.reserve(), None)
        return entry

    def lookup(self, name: str) -> Entry | None:
        entry = self._entries.get(name)
        return entry if entry is not None and entry.info is not None else None

    def live(self) -> list[Entry]:
        return sorted((e for e in self._entries.values() if e.info is not None), key=lambda e: e.name)
