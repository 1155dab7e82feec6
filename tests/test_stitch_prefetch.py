"""The canvas producer: niced on Linux, and moved to normal priority when the consumer starves."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest

from stainctl.stitch.stream import prefetch


def _priority() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_items_arrive_in_order_from_a_niced_thread() -> None:
    seen: list[tuple[int, int]] = []

    def items():
        for i in range(50):
            seen.append((threading.get_ident(), _priority()))
            yield i

    base = _priority()
    assert list(prefetch(items(), nice=base + 5, starved=30)) == list(range(50))
    assert {t for t, _ in seen} != {threading.get_ident()}  # produced on another thread
    if sys.platform == "linux":
        assert {p for _, p in seen} == {base + 5}
    assert _priority() == base  # the consumer's own priority is left alone


def test_a_starved_consumer_moves_production_to_normal_priority() -> None:
    seen: list[tuple[int, int]] = []

    def items():
        for i in range(6):
            seen.append((threading.get_native_id(), _priority()))
            if i == 1:
                time.sleep(0.3)  # a producer that is starved (or slow) for one item
            yield i

    base = _priority()
    assert list(prefetch(items(), nice=base + 5, starved=0.1)) == list(range(6))
    threads = [t for t, _ in seen]
    # The item in hand finishes where it started; the next ones come from a new thread at the
    # consumer's priority.
    assert threads[0] == threads[1] != threads[2] == threads[5]
    if sys.platform == "linux":
        assert [p for _, p in seen] == [base + 5] * 2 + [base] * 4


def test_errors_and_early_close_stop_the_producer() -> None:
    def failing():
        yield 1
        raise ValueError("bad tile")

    gen = prefetch(failing(), starved=0.05)
    assert next(gen) == 1
    with pytest.raises(ValueError, match="bad tile"):
        next(gen)

    produced: list[int] = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    gen = prefetch(endless(), depth=2, starved=0.05)
    assert next(gen) == 0
    gen.close()
    n = len(produced)
    time.sleep(0.1)
    assert len(produced) == n  # nothing runs on after the consumer let go
