"""utils.timing (interleaved / blocked timings) and utils.process (OpenMP wait setting before torch starts)."""
import os
import subprocess
import sys

import pytest

from utils.timing import interleaved_timings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("block", [1, 3, 5])
def test_every_variant_gets_exactly_repeats_samples_in_the_right_order(block):
    calls = []
    fns = {name: (lambda n=name: calls.append(n)) for name in ("a", "b")}
    times = interleaved_timings(fns, repeats=7, warmup=2, block=block)
    assert [len(times["a"]), len(times["b"])] == [7, 7] and all(t >= 0 for t in times["a"] + times["b"])
    body = calls[4:]  # after 2 warmup calls each
    if block == 1:
        assert body == ["a", "b"] * 7  # strict A B A B
    else:  # blocks: one untimed call opens each, then up to `block` timed ones
        assert body[:block + 1] == ["a"] * (block + 1) and body[block + 1] == "b"
        assert len(body) == 2 * (7 + -(-7 // block))  # timed calls + one opener per block


def test_block_below_one_is_refused_not_an_endless_loop():
    with pytest.raises(ValueError, match="block and repeats must be at least 1"):
        interleaved_timings({"a": lambda: None}, repeats=3, block=0)


def test_short_openmp_spin_respects_the_users_choice():
    code = "import os, utils.process as o; print(o.short_openmp_spin(), os.environ.get('GOMP_SPINCOUNT'))"
    run = lambda env: subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,  # noqa
                                     env=env).stdout.split()
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    assert run(base) == ["True", "3000"]
    assert run(dict(base, OMP_WAIT_POLICY="PASSIVE")) == ["False", "None"]
    assert run(dict(base, GOMP_SPINCOUNT="10")) == ["False", "10"]
