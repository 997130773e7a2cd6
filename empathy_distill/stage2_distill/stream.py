"""The shard stream: teacher-cache rows, one Parquet row group at a time, through a shuffle buffer.

    stream = ShardStream(folder, manifest["shards"], rank=0, world_size=1, seed=0, buffer_size=256)
    row = next(stream)            # a dict with the columns in COLUMNS
    state = stream.state_dict()   # JSON-able; ShardStream(..., state=state) continues exactly

The whole cache is never loaded: the stream holds one row group plus the shuffle buffer. A pass
lists every (shard, row group) unit in manifest order, shuffles that order (seeded), and gives
each rank every world_size-th unit, so ranks read disjoint parts without talking to each other.
The stream never ends (pass after pass), so every rank can always fill its batch and all ranks
take the same number of steps.

The position is exact and small: the units still to read in this pass, the unit being read and
how far, the shuffle buffer as (shard, row group, row) references, and the RNG state. Restoring
re-reads the few row groups the buffer refers to. New shards (added to the cache after the state
was saved) are put at the front of the queue by `add_shards`, so they are trained on next.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from empathy_distill.shared.errors import PipelineError
from empathy_distill.shared.schema import check_shard_files, decode_table, stored_columns

# What training reads; the rest of a row (context ids, candidates, media, ...) is never decoded.
COLUMNS = [
    "example_id",
    "dialogue",
    "privileged",
    "reference",
    "teacher_parse_ok",
    "response_token_ids",
    "topk_token_ids",
    "topk_logprobs",
    "teacher_features",
    "base_response",  # improve mode: the reply the teacher rewrote (rejected side of a pair)
]
STORED = stored_columns(COLUMNS)


def check_shards(folder: Path, manifest: dict[str, Any]) -> None:
    """Each shard's own columns and footer settings against the manifest (shared.schema)."""
    check_shard_files(folder, manifest, COLUMNS)


def rank_units(units: list[list], rank: int, world_size: int) -> list[list]:
    """This rank's share of a pass. With fewer units than ranks, ranks share units (duplicates)
    rather than one rank starving."""
    if len(units) >= world_size:
        return units[rank::world_size]
    return [units[rank % len(units)]] if units else []


class ShardStream(Iterator[dict[str, Any]]):
    def __init__(
        self,
        folder: Path,
        shards: list[dict[str, Any]],
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        buffer_size: int = 256,
        keep: Callable[[dict[str, Any]], bool] = lambda row: True,
        state: dict[str, Any] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.rank, self.world_size = rank, world_size
        self.buffer_size = buffer_size
        self.keep = keep
        self._files: dict[str, pq.ParquetFile] = {}
        self._unit_rows: list[dict[str, Any]] = []  # rows of the unit being read
        if state is None:
            self.rng = np.random.default_rng(seed)
            self.epoch = -1
            self.known = [s["file"] for s in shards]
            self.queue: list[list] = []
            self.current: list | None = None  # [file, row_group]
            self.offset = 0  # rows of `current` already taken into the buffer
            self.buffer: list[dict[str, Any]] = []
            self.refs: list[list] = []  # [file, row_group, row] of each buffer entry
            self._kept_this_pass = 0
            self._new_pass()
        else:
            self._restore(state)

    # -- position ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "known": list(self.known),
            "queue": [list(u) for u in self.queue],
            "current": self.current,
            "offset": self.offset,
            "buffer": [list(r) for r in self.refs],
            "rng": self.rng.bit_generator.state,
            "kept_this_pass": self._kept_this_pass,
        }

    def _restore(self, state: dict[str, Any]) -> None:
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = state["rng"]
        self.epoch = state["epoch"]
        self.known = list(state["known"])
        self.queue = [list(u) for u in state["queue"]]
        self.current = list(state["current"]) if state["current"] else None
        self.offset = state["offset"]
        self._kept_this_pass = state["kept_this_pass"]
        self.refs = [list(r) for r in state["buffer"]]
        groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for file, rg, _ in self.refs:
            if (file, rg) not in groups:
                groups[(file, rg)] = self._read(file, rg)
        self.buffer = [groups[(file, rg)][i] for file, rg, i in self.refs]
        if self.current is not None:
            self._unit_rows = self._read(*self.current)

    def add_shards(self, shards: list[dict[str, Any]]) -> None:
        """Shards the cache gained since the state was saved: read them next, then as usual."""
        units = [[s["file"], g] for s in shards for g in range(self._num_row_groups(s["file"]))]
        self.queue = rank_units(units, self.rank, self.world_size) + self.queue
        self.known += [s["file"] for s in shards]

    # -- reading ----------------------------------------------------------------------------

    def _num_row_groups(self, file: str) -> int:
        return self._parquet(file).num_row_groups

    def _parquet(self, file: str) -> pq.ParquetFile:
        if file not in self._files:
            self._files[file] = pq.ParquetFile(self.folder / file)
        return self._files[file]

    def _read(self, file: str, row_group: int) -> list[dict[str, Any]]:
        try:
            table = self._parquet(file).read_row_group(row_group, columns=STORED)
            return decode_table(table)  # the top-k and features decoded, vectorised
        except (OSError, pa.ArrowException) as e:
            path = self.folder / file
            raise PipelineError(f"{path}: cannot read row group {row_group} ({e})") from None

    def _new_pass(self) -> None:
        if self.epoch >= 0 and self._kept_this_pass == 0 and not self.buffer:
            raise PipelineError(
                f"{self.folder}: a full pass over the cache found no usable rows for this rank "
                "(empty replies, no references for sft, or all filtered by skip_unparsed)"
            )
        self.epoch += 1
        self._kept_this_pass = 0
        units = [[f, g] for f in self.known for g in range(self._num_row_groups(f))]
        order = self.rng.permutation(len(units))
        self.queue = rank_units([units[i] for i in order], self.rank, self.world_size)

    def _incoming(self) -> tuple[list, dict[str, Any]] | None:
        """The next usable row of the current unit (opening units as needed); None = pass ended."""
        while True:
            if self.current is not None and self.offset < len(self._unit_rows):
                row = self._unit_rows[self.offset]
                ref = [*self.current, self.offset]
                self.offset += 1
                if self.keep(row):
                    self._kept_this_pass += 1
                    return ref, row
                continue
            if not self.queue:
                self.current, self._unit_rows = None, []
                return None
            self.current, self.offset = self.queue.pop(0), 0
            self._unit_rows = self._read(*self.current)

    def __next__(self) -> dict[str, Any]:
        # Fill the buffer, starting new passes as needed; then hand out a random entry.
        while len(self.buffer) < self.buffer_size:
            got = self._incoming()
            if got is None:
                if self.buffer:
                    break  # hand out what is buffered; the next pass starts on the next call
                self._new_pass()
                continue
            self.refs.append(got[0])
            self.buffer.append(got[1])
        i = int(self.rng.integers(len(self.buffer)))
        row = self.buffer[i]
        # Swap-remove keeps the buffer order a pure function of the RNG draws (replayable).
        self.buffer[i], self.refs[i] = self.buffer[-1], self.refs[-1]
        self.buffer.pop()
        self.refs.pop()
        return row
