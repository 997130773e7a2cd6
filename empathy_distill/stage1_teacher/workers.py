"""Stage one's workers: each owns one vLLM engine and turns units of work into shards.

The driver (`teacher_cache.build_cache`) reads the inputs, plans the work and splits it into units,
one shard each (`split_units`). Workers answer a unit through the quality gate, write its rejects
and then its shard, and return only the shard's manifest entry; the driver is the one writer of
`manifest.json` and merges the rejects. Two backends run the same `CacheWorker`:

- `local`: one worker in this process (the default);
- `ray`: `teacher_cache.workers` Ray actors on a local or joined cluster, each taking the next
  unit as it frees up. A worker that dies (a killed process, a lost node) has its unit handed to
  the next free worker; Ray restarts the actor for later units.

Why nothing is lost or duplicated: a unit's shard is named after the example ids it was given
(`schema.shard_name`), so a redone unit rewrites its own shard in place and two workers never
pick the same name; each writer's temporary files carry its name; the driver adopts a shard that
a kill left out of the manifest after checking its footer (`teacher_cache.reconcile_shards`).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from empathy_distill.shared import console
from empathy_distill.shared.config import PipelineConfig
from empathy_distill.shared.errors import PipelineError
from empathy_distill.shared.readers import Example, Reject
from empathy_distill.shared.schema import rejects_part, shard_name, write_shard


@dataclass
class Unit:
    """One shard's worth of pending examples, with their prompt token ids."""

    name: str  # the shard it becomes
    batch: list[tuple[Example, list[int]]]


def split_units(pending: list[tuple[Example, list[int]]], shard_size: int) -> list[Unit]:
    """The pending examples in example_id order (a content hash), cut into shards of
    `shard_size`: the same pending set gives the same units whatever the backend and the number
    of workers, and an example's place does not depend on the order of the input files."""
    ordered = sorted(pending, key=lambda p: p[0].example_id)
    units = []
    for start in range(0, len(ordered), shard_size):
        batch = ordered[start : start + shard_size]
        units.append(Unit(shard_name([ex.example_id for ex, _ in batch]), batch))
    return units


@dataclass
class UnitResult:
    unit: str
    writer: str
    entry: dict[str, Any] | None  # the shard's manifest entry; None when the gate kept no row
    rejects: list[Reject]
    generated: int
    outcomes: Counter
    seconds: Counter
    accepted: Counter = field(default_factory=Counter)  # what this unit accepted (quality.remember)


class CacheWorker:
    """One vLLM engine and the project's own stage-one code: prompt, generate with top-k and
    features, gate, write shard. Run in-process (local) or as a Ray actor (ray).

    `accepted` counts the replies already in the cache (`quality.remember`: `generic`, `stock`);
    each unit adds its own, and the driver passes on what other workers accepted since."""

    def __init__(
        self,
        cfg: PipelineConfig,
        out: str,
        writer: str,
        accepted: Counter,
        max_len: int,
        extra_logprobs: int = 0,
        max_images: int = 0,
        teacher: tuple[Any, Any, dict[str, Any]] | None = None,
    ):
        """`teacher`: (tokenizer, processor, cache settings) the caller already has for this
        teacher folder (the local backend: the job's own), instead of loading and hashing
        them again."""
        self.cfg, self.out, self.writer = cfg, Path(out), writer
        self.accepted = Counter(accepted)
        self.max_len, self.extra_logprobs, self.max_images = max_len, extra_logprobs, max_images
        self.llm = None
        self._settings: dict[str, Any] | None = None
        if teacher is not None:
            self.tokenizer, self.processor, self._settings = teacher
        # A writer deletes only its own leftovers: another writer's file may be in flight.
        for tmp in self.out.glob(f".*.{writer}.tmp"):
            tmp.unlink(missing_ok=True)

    def settings(self) -> dict[str, Any]:
        """This worker's cache settings, from its own copy of the teacher (model hash, tokenizer):
        the driver refuses to go on when a worker's differ from its own."""
        if self._settings is None:
            from empathy_distill.stage1_teacher.teacher_cache import teacher_settings

            self.tokenizer, self.processor, self._settings = teacher_settings(self.cfg)
        return self._settings

    def where(self) -> dict[str, Any]:
        """Which node and process this worker is on, and the cores it may use."""
        node = None
        try:
            import ray

            if ray.is_initialized():
                node = ray.get_runtime_context().get_node_id()
        except ImportError:
            pass
        from vllm.platforms import current_platform

        return {
            "node": node,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "cores": sorted(os.sched_getaffinity(0)),
            # the binding is ours to choose on a CPU machine, unless its user chose one
            "bind": current_platform.is_cpu() and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ,
        }

    def start(self, cpu_bind: str | None = None) -> None:
        from empathy_distill.stage1_teacher.teacher_cache import start_engine

        self.settings()
        if cpu_bind is not None:
            # vLLM's CPU build pins the engine's OpenMP threads to these cores (its default,
            # "auto", gives every engine on a machine the same core). The whole worker process
            # goes there too: the engine runs in it, and any other busy thread it starts (an
            # OpenMP runtime's spinning helper) would otherwise take another worker's core.
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind
            os.sched_setaffinity(0, {int(c) for c in cpu_bind.split(",")})
        self.llm = start_engine(self.cfg, self.extra_logprobs, self.max_images, self.max_len)

    def run(self, unit: Unit, seen: Counter | None = None, cpu_bind: str | None = None):
        """Answer one unit (a Ray worker's task); `seen`: what other workers accepted since this
        one's last unit."""
        self.accepted.update(seen or {})
        [result] = self.answer([unit], cpu_bind)
        return result

    def answer(
        self,
        units: list[Unit],
        cpu_bind: str | None = None,
        progress: Callable[[], None] | None = None,
    ) -> Iterator[UnitResult]:
        """Answer the units through one engine, the next unit's examples filling the batch as
        the earlier ones finish (`teacher_cache.Teacher`); each unit's result as it finishes.
        A unit's rejects are on disk before its shard (a kill in between at worst redoes the
        unit's examples, and the rejects are merged once each)."""
        from empathy_distill.stage1_teacher.teacher_cache import Teacher

        seconds: Counter = Counter()
        if self.llm is None:
            t0 = time.time()
            self.start(cpu_bind)
            seconds["startup"] += time.time() - t0
        teacher = Teacher(
            self.cfg, self.tokenizer, self.llm, self.processor, self._settings["vocab_size"]
        )
        before, reported = Counter(self.accepted), Counter()
        for unit, rows, rejects, generated, outcomes in teacher.answer(
            units, self.accepted, seconds, progress
        ):
            append_rejects(self.out, self.writer, rejects)
            entry = None
            if rows:
                entry = write_shard(
                    rows,
                    self.out / unit.name,
                    self.cfg.teacher_cache.row_group_size,
                    metadata={"pipeline_settings": json.dumps(self._settings)},
                    writer=self.writer,
                    top_k=self.cfg.teacher_cache.top_k,
                )
            # what this unit accepted (with several units in flight: what was accepted since
            # the last result; only the Ray driver, one unit per call, uses it)
            new = Counter({k: v - before[k] for k, v in self.accepted.items() if v > before[k]})
            before = Counter(self.accepted)
            spent, reported = seconds - reported, Counter(seconds)
            yield UnitResult(
                unit.name, self.writer, entry, rejects, generated, outcomes, spent, new
            )

    def close(self) -> None:
        from empathy_distill.stage1_teacher.teacher_cache import stop_engine

        stop_engine(self.llm)
        self.llm = None


def append_rejects(out: Path, writer: str, rejects: list[Reject]) -> None:
    """A writer's rejects, appended to its own file and flushed to disk."""
    if not rejects:
        return
    from dataclasses import asdict

    path = out / rejects_part(writer)
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in rejects))
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------- backends


def run_units(
    cfg: PipelineConfig,
    out: Path,
    units: list[Unit],
    teacher: tuple[Any, Any, dict[str, Any]],
    accepted: Counter,
    engine_args: dict,
    progress: Callable[[], None] | None = None,
) -> Iterator[UnitResult]:
    """Every unit's result, in the order the units finish, on the configured backend.
    `teacher`: the driver's (tokenizer, processor, cache settings). `progress()` is called as
    each example ends on the local backend (a unit's examples finish over a long stretch while
    later units' run beside them); Ray workers report whole units."""
    if cfg.teacher_cache.backend == "ray":
        yield from run_on_ray(cfg, out, units, teacher[2], accepted, engine_args)
        return
    worker = CacheWorker(cfg, str(out), "local", accepted, **engine_args, teacher=teacher)
    try:
        yield from worker.answer(units, progress=progress)
    finally:
        worker.close()


def run_on_ray(cfg, out, units, settings, accepted, engine_args) -> Iterator[UnitResult]:
    try:
        import ray
    except ImportError:
        raise PipelineError(
            "teacher_cache.backend=ray needs ray: pip install 'ray==2.60.0' (scripts/setup.sh "
            "installs it)"
        ) from None
    from ray.exceptions import RayActorError, RayTaskError

    tc, rc = cfg.teacher_cache, cfg.teacher_cache.ray
    n = min(tc.workers, len(units))
    # The teacher's own settings travel to every worker; these make every node behave alike.
    env = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        # The engine runs inside the actor's process (not a child of it): a worker that dies
        # takes its engine with it, so a restarted worker finds its memory and cores free.
        "VLLM_ENABLE_V1_MULTIPROCESSING": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0"),
    }
    started_here = not ray.is_initialized()
    if started_here:
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
        if rc.address is None:  # a local cluster sized to what this job asks for
            kwargs["num_cpus"] = max(os.cpu_count() or 1, int(n * rc.num_cpus + 0.999))
            kwargs["object_store_memory"] = 256 * 1024**2  # units are small; the shards go to disk
        ray.init(address=rc.address, **kwargs)
    try:
        resources = ray.cluster_resources()
        engine = cfg.teacher.engine
        per_engine = engine.get("tensor_parallel_size", 1) * engine.get("pipeline_parallel_size", 1)
        gpus = (
            rc.num_gpus if rc.num_gpus is not None else (per_engine if resources.get("GPU") else 0)
        )
        need_cpus, need_gpus = n * rc.num_cpus, n * gpus
        if need_cpus > resources.get("CPU", 0) or need_gpus > resources.get("GPU", 0):
            raise PipelineError(
                f"the Ray cluster has {resources.get('CPU', 0):g} CPUs and "
                f"{resources.get('GPU', 0):g} GPUs; {n} workers need {need_cpus:g} CPUs and "
                f"{need_gpus:g} GPUs: lower teacher_cache.workers or teacher_cache.ray.num_cpus/"
                "num_gpus, or add nodes"
            )
        if not gpus:
            # A CPU worker's OpenMP runtime sizes its team from OMP_NUM_THREADS when it loads:
            # unset, a worker's matmuls ran on two threads, one of them on another worker's
            # core (measured: 2 workers at 0.4x the speed of 1; README, Past one machine).
            env["OMP_NUM_THREADS"] = str(max(1, int(rc.num_cpus)))
        Actor = ray.remote(CacheWorker).options(
            num_cpus=rc.num_cpus,
            num_gpus=gpus,
            max_restarts=rc.unit_retries,
            max_task_retries=0,  # a dead worker's unit is handed out by the loop below
            runtime_env={"env_vars": env},
        )
        actors = [
            Actor.remote(cfg, str(out), f"w{i:02d}", accepted, **engine_args) for i in range(n)
        ]
        yield from _schedule(ray, actors, units, settings, rc, RayActorError, RayTaskError)
    finally:
        if started_here:
            ray.shutdown()


def _schedule(ray, actors, units, settings, rc, RayActorError, RayTaskError):
    """Hand the units to the actors, one at a time each; redo a dead worker's unit."""
    names = {id(a): f"w{i:02d}" for i, a in enumerate(actors)}
    try:
        found = ray.get([a.settings.remote() for a in actors])
        places = ray.get([a.where.remote() for a in actors])
    except RayTaskError as e:
        raise _worker_error(e) from None
    from empathy_distill.shared.schema import settings_mismatch

    for actor, theirs, place in zip(actors, found, places, strict=True):
        diff = settings_mismatch(theirs, settings)
        if diff:
            raise PipelineError(
                f"Ray worker {names[id(actor)]} on {place['host']} sees another teacher "
                f"({'; '.join(diff)}): every node needs the same teacher files at the same "
                "teacher.model path"
            )
    binds = dict(zip(map(id, actors), cpu_binds(places, rc.num_cpus), strict=True))
    queue, inflight = deque(units), {}
    history: list[tuple[str, Counter]] = []  # what each finished unit accepted, in order
    synced = {id(a): 0 for a in actors}  # how much of `history` each worker has seen
    fresh = dict.fromkeys(synced, True)  # a (re)started worker knows only the cache's replies
    tries: Counter = Counter()  # how often each unit's worker died
    deaths: Counter = Counter()  # how often each worker died
    idle = list(reversed(actors))

    def dispatch(actor) -> None:
        unit = queue.popleft()
        me = names[id(actor)]
        seen: Counter = Counter()
        for writer, acc in history[0 if fresh[id(actor)] else synced[id(actor)] :]:
            if fresh[id(actor)] or writer != me:
                seen.update(acc)
        synced[id(actor)], fresh[id(actor)] = len(history), False
        inflight[actor.run.remote(unit, seen, binds[id(actor)])] = (actor, unit)

    try:
        while queue or inflight:
            while queue and idle:
                dispatch(idle.pop())
            if not inflight:
                raise PipelineError(
                    f"every Ray worker died and {len(queue)} units are left; their examples "
                    "are redone by the next run"
                )
            [ref], _ = ray.wait(list(inflight), num_returns=1)
            actor, unit = inflight.pop(ref)
            try:
                result = ray.get(ref)
            except RayActorError as e:
                tries[unit.name] += 1
                # Ray's text is a paragraph about RPCs; its class says what happened
                cause = type(e).__name__
                if tries[unit.name] > rc.unit_retries:
                    raise PipelineError(
                        f"unit {unit.name} ({len(unit.batch)} examples, the first "
                        f"{unit.batch[0][0].origin}) was handed out {tries[unit.name]} times and "
                        f"its worker died each time ({cause}); look for the cause (memory?) in "
                        f"the workers' log ({console.where_logs_are()})"
                    ) from None
                tqdm.write(
                    f"note: Ray worker {names[id(actor)]} died ({cause}) during unit "
                    f"{unit.name} ({len(unit.batch)} examples); it goes to the next free worker",
                    file=console.err(),
                )
                queue.appendleft(unit)
                fresh[id(actor)] = True
                # Ray restarts the actor (up to max_restarts times; its engine starts again at its
                # next unit). One that is gone for good is dropped.
                deaths[id(actor)] += 1
                if deaths[id(actor)] <= rc.unit_retries:
                    idle.insert(0, actor)
                continue
            except RayTaskError as e:
                raise _worker_error(e) from None
            history.append((result.writer, result.accepted))
            idle.append(actor)
            yield result
    finally:
        for actor in actors:
            ray.kill(actor)


def _worker_error(e) -> PipelineError:
    """A worker's own error (a PipelineError stays one line), not Ray's wrapped traceback."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, PipelineError):
        return PipelineError(str(cause))
    text = str(cause if cause is not None else e).strip().splitlines()
    return PipelineError(f"a Ray worker failed: {text[-1] if text else type(e).__name__}")


def cpu_binds(places: list[dict], cores_per_worker: float) -> list[str | None]:
    """Each worker's own cores on its node, for vLLM's CPU build (`VLLM_CPU_OMP_THREADS_BIND`,
    e.g. "0" and "1" for two workers on a 2-core machine): the k-th worker on a node takes that
    node's k-th group of `cores_per_worker` cores (wrapping round when there are more workers
    than groups). None on GPU machines, and where the user set the binding."""
    per = max(1, int(cores_per_worker))
    rank_on_node: Counter = Counter()
    binds: list[str | None] = []
    for place in places:
        k = rank_on_node[place["node"]]
        rank_on_node[place["node"]] += 1
        cores = place["cores"]
        if not place["bind"] or not cores:
            binds.append(None)
            continue
        mine = [cores[(k * per + j) % len(cores)] for j in range(min(per, len(cores)))]
        binds.append(",".join(map(str, mine)))
    return binds
