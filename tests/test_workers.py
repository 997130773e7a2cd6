"""Stage one's work split and worker placement (pure logic; the Ray runs are in
test_ray_engine.py)."""

import random

from empathy_distill.shared.readers import Example
from empathy_distill.shared.schema import SHARD_NAME
from empathy_distill.stage1_teacher.workers import cpu_binds, split_units


def example(i: int) -> Example:
    return Example(
        example_id=f"{i:04x}" * 4,
        source="demo",
        split="train",
        dialogue=[{"role": "speaker", "text": f"hello {i}"}],
        privileged={},
        origin=f"in.jsonl:{i}",
    )


def test_units_do_not_depend_on_input_order_and_names_are_shard_names():
    pending = [(example(i), [i]) for i in range(10)]
    units = split_units(pending, 4)
    assert [len(u.batch) for u in units] == [4, 4, 2]
    assert all(SHARD_NAME.fullmatch(u.name) for u in units)
    shuffled = pending[:]
    random.Random(0).shuffle(shuffled)
    again = split_units(shuffled, 4)
    assert [u.name for u in again] == [u.name for u in units]
    assert [[e.example_id for e, _ in u.batch] for u in again] == [
        [e.example_id for e, _ in u.batch] for u in units
    ]
    # a different unit of work gets a different name
    assert split_units(pending[:9], 4)[-1].name != units[-1].name


def test_each_cpu_worker_gets_its_own_cores_on_its_node():
    def place(node, bind=True, cores=(0, 1)):
        return {"node": node, "cores": list(cores), "bind": bind}

    assert cpu_binds([place("a"), place("a")], 1) == ["0", "1"]
    assert cpu_binds([place("a"), place("b"), place("a")], 1) == ["0", "0", "1"]
    assert cpu_binds([place("a", cores=range(8))] * 2, 4) == ["0,1,2,3", "4,5,6,7"]
    assert cpu_binds([place("a")] * 3, 1) == ["0", "1", "0"]  # more workers than cores: wrap
    # the user's own VLLM_CPU_OMP_THREADS_BIND (or a GPU worker) is left alone
    assert cpu_binds([place("a", bind=False)], 1) == [None]
