"""The engine's queue, with fake members (tests/fakes.py): waiting requests start
in arrival order, a request that leaves the line never blocks the ones behind it,
and ``max_queue`` counts a request from its admission, before it is tokenized."""

from __future__ import annotations

import threading

import pytest

from me_local.config import load_config
from me_local.core import DoneEvent, SamplingParams, TokenEvent
from me_local.engine import Engine, QueueFullError, Request
from me_local.errors import RequestError

from .fakes import FakeFactory
from .server_helpers import wait_until


@pytest.fixture
def make_engine(write_config):
    engines = []

    def make(parallel=1, max_queue=16):
        cfg = write_config(
            f"""
            ensembles:
              q:
                parallel: {parallel}
                max_queue: {max_queue}
                members: [{{name: a, path: a.gguf}}]
            """
        )
        factory = FakeFactory()
        engine = Engine(load_config(cfg), factory)
        engines.append(engine)
        return engine, engine.ensemble("q"), factory

    yield make
    for e in engines:
        e.close()


def request(text, max_tokens=3):
    return Request(ensemble="q", prompt=text, params=SamplingParams(seed=1, max_tokens=max_tokens))


class Waiter:
    """One request on its own thread, as the server runs it (with a cancel flag it polls)."""

    def __init__(self, engine, name, started, *, timeout=None, on_poll=None):
        self.name = name
        self.flag = threading.Event()
        self.on_poll = on_poll
        self.events = []
        self.error = None

        def cancel():
            if self.on_poll is not None:
                self.on_poll()
            return self.flag.is_set()

        def work():
            try:
                for ev in engine.generate(request(f"request {name}"), cancel=cancel, queue_timeout=timeout):
                    if not self.events and isinstance(ev, TokenEvent):
                        started.append(name)  # one slot: the previous request has left the engine
                    self.events.append(ev)
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=work, daemon=True)
        self.thread.start()

    def join(self):
        self.thread.join(30)
        assert not self.thread.is_alive()


def hold_slot(engine):
    """A generation that holds the slot until it is closed."""
    holder = engine.generate(request("hold", max_tokens=50))
    assert isinstance(next(holder), TokenEvent)
    return holder


def queue_up(engine, ens, names, started, **kw):
    waiters = []
    for n, name in enumerate(names, 1):
        waiters.append(Waiter(engine, name, started, **kw))
        wait_until(lambda n=n: ens.waiting == n)  # registered in line before the next arrives
    return waiters


@pytest.mark.parametrize("arrival", [[0, 1, 2, 3], [2, 3, 0, 1], [3, 0, 1, 2], [1, 3, 2, 0]])
def test_waiting_requests_start_in_arrival_order(make_engine, arrival):
    engine, ens, _ = make_engine()
    for rnd in range(4):
        holder = hold_slot(engine)
        started = []
        waiters = queue_up(engine, ens, [f"Q{i}" for i in arrival], started)
        assert ens.waiting == 4 and ens.busy_slots == 1
        if rnd % 2:
            holder.close()
        else:
            # the slot frees while the first in line is awake checking its cancel flag (it
            # polls every 50 ms): the race that let a later request take the slot first
            def release_once(holder=holder, head=waiters[0]):
                head.on_poll = None
                holder.close()

            waiters[0].on_poll = release_once
        for w in waiters:
            w.join()
            assert w.error is None and isinstance(w.events[-1], DoneEvent)
            assert w.events[-1].finish_reason == "length"
        assert started == [f"Q{i}" for i in arrival]
        assert ens.waiting == 0 and ens.busy_slots == 0


def test_arrival_order_holds_while_an_earlier_request_is_still_being_tokenized(make_engine):
    engine, ens, factory = make_engine()
    factory.gate, factory.held = threading.Event(), {"request Q0"}
    started = []
    q0 = Waiter(engine, "Q0", started)
    wait_until(lambda: factory.tokenized == ["request Q0"])  # Q0 is in line, being tokenized
    polled = threading.Event()
    q1 = Waiter(engine, "Q1", started, on_poll=polled.set)
    wait_until(lambda: polled.is_set() or started)  # Q1 is tokenized and waits (or, wrongly, runs)
    assert ens.waiting == 2 and ens.busy_slots == 0 and not started  # the slot is free, but Q0 came first
    factory.gate.set()
    for w in (q0, q1):
        w.join()
        assert w.error is None and w.events[-1].finish_reason == "length"
    assert started == ["Q0", "Q1"]


def test_a_request_cancelled_in_the_middle_of_the_line_does_not_block_the_others(make_engine):
    engine, ens, _ = make_engine()
    holder = hold_slot(engine)
    started = []
    q0, q1, q2, q3 = queue_up(engine, ens, ["Q0", "Q1", "Q2", "Q3"], started)
    q1.flag.set()
    q1.join()
    assert [type(e) for e in q1.events] == [DoneEvent] and q1.events[0].finish_reason == "cancelled"
    assert ens.waiting == 3
    q0.flag.set()  # the head leaves too
    q0.join()
    assert ens.waiting == 2
    holder.close()
    for w in (q2, q3):
        w.join()
        assert w.error is None and w.events[-1].finish_reason == "length"
    assert started == ["Q2", "Q3"]
    assert ens.waiting == 0 and ens.busy_slots == 0


def test_a_request_timed_out_in_line_makes_way(make_engine):
    engine, ens, _ = make_engine()
    holder = hold_slot(engine)
    started = []
    q0 = Waiter(engine, "Q0", started, timeout=0.5)
    q1 = Waiter(engine, "Q1", started)  # usually in line behind Q0 before Q0's time is up
    q0.join()  # its timeout passes while the slot is held
    assert isinstance(q0.error, QueueFullError) and "stayed busy" in str(q0.error)
    wait_until(lambda: ens.waiting == 1)
    holder.close()
    q1.join()
    assert q1.error is None and started == ["Q1"]
    assert ens.waiting == 0


def test_max_queue_counts_requests_before_they_are_tokenized(make_engine):
    engine, ens, factory = make_engine(parallel=1, max_queue=1)
    factory.gate = threading.Event()
    started = []
    first = Waiter(engine, "A", started)
    second = Waiter(engine, "B", started)
    wait_until(lambda: len(factory.tokenized) == 2)  # both held in tokenization
    third = Waiter(engine, "C", started)
    # refused at once: it never reaches the tokenizer (wait for whichever comes first)
    wait_until(lambda: not third.thread.is_alive() or len(factory.tokenized) > 2)
    assert sorted(factory.tokenized) == ["request A", "request B"]
    third.join()
    assert isinstance(third.error, QueueFullError)
    assert "busy (1 slots, 2 waiting)" in str(third.error)
    assert ens.waiting == 2 and ens.busy_slots == 0
    factory.gate.set()
    for w in (first, second):
        w.join()
        assert w.error is None and w.events[-1].finish_reason == "length"
    assert ens.waiting == 0
    # the places are free again
    assert [type(e) for e in engine.generate(request("again"))][-1] is DoneEvent


def test_a_request_that_fails_before_its_slot_gives_its_place_back(make_engine):
    engine, ens, _ = make_engine(parallel=1, max_queue=0)
    for _ in range(3):
        with pytest.raises(RequestError, match="the prompt is empty") as info:
            list(engine.generate(request("")))
        assert not isinstance(info.value, QueueFullError)
    assert ens.waiting == 0
    holder = hold_slot(engine)
    with pytest.raises(QueueFullError, match="busy"):  # max_queue 0: nobody waits
        list(engine.generate(request("more")))
    holder.close()
    assert ens.busy_slots == 0 and ens.waiting == 0
