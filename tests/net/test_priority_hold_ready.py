"""The hold's credit is spent only while the hold alone keeps the link idle: while
the higher priority is still sending its own message's bytes, lower ones would
wait anyway (the Scheduler serves it first), and charging that time used to leave
no hold for the wait on its acknowledgement when a priority file was large."""

from __future__ import annotations

import types

import pytest
import trio

from linkd.net.sender import SenderMixin, _InFlight, _OutChannel
from linkd.proto.scheduler import PriorityHold


def _runner(alerts_sending: bool):
    alerts = _OutChannel("alerts", 10)
    alerts.in_flight[1] = _InFlight.__new__(_InFlight)
    alerts.current = object() if alerts_sending else None     # type: ignore[assignment]
    data = _OutChannel("data", 0)
    data.current = object()                                   # type: ignore[assignment]
    session = types.SimpleNamespace(sendable=lambda name: 1 << 16)
    runner = types.SimpleNamespace(out={"alerts": alerts, "data": data},
                                   session=session, hold=PriorityHold(share=0.25),
                                   link=types.SimpleNamespace(
                                       status=types.SimpleNamespace(priority_held_s=0.0),
                                       cfg=types.SimpleNamespace(link=types.SimpleNamespace(
                                           priority_hold=0.25))))
    runner._sum_ready = lambda state: False
    runner._next_item = lambda state: None      # alerts: nothing more queued
    return runner


@pytest.mark.parametrize("alerts_sending", [True, False])
async def test_credit_is_spent_only_while_the_hold_alone_idles_the_link(
        alerts_sending, autojump_clock):
    runner = _runner(alerts_sending)
    ready, held = SenderMixin._ready(runner)       # type: ignore[arg-type]
    await trio.sleep(0.1)
    ready, held = SenderMixin._ready(runner)       # type: ignore[arg-type]
    if alerts_sending:
        # its own bytes go first anyway: nothing is held and no credit is spent
        assert sorted(ready) == [("alerts", 10), ("data", 0)] and held == set()
        assert runner.hold.credit == pytest.approx(runner.hold.burst)
    else:
        # only its ack is awaited: bulk is held, and that costs credit
        assert ready == [("data", 0)] and held == {"data"}
        assert runner.hold.credit < runner.hold.burst - 0.05
        assert runner.link.status.priority_held_s == pytest.approx(0.1)   # and shows


async def test_a_reloaded_priority_hold_applies_to_the_live_session(autojump_clock):
    # SIGHUP replaces link.cfg; the hold was built when the session started and
    # kept its share: "priority_hold = 0" and a reload left bulk held (operator trial)
    runner = _runner(alerts_sending=False)
    assert SenderMixin._ready(runner)[1] == {"data"}        # type: ignore[arg-type]
    runner.link.cfg.link.priority_hold = 0.0
    await trio.sleep(0.01)
    assert SenderMixin._ready(runner)[1] == set()           # type: ignore[arg-type]
    assert runner.hold.share == 0.0
    runner.link.cfg.link.priority_hold = 0.5                # and back on
    await trio.sleep(0.01)
    assert SenderMixin._ready(runner)[1] == {"data"}        # type: ignore[arg-type]
