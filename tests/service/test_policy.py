"""The scheduling policies' decisions (service/scheduling/policy.py), on real slots and models.

The policy is pure logic over the scheduler's state: where a model's requests should run and when a
slot should change what it holds.  The scheduler that carries the decisions out, with real engines,
is tested in test_scheduler.py and test_batching.py.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from service.engines.base import AdapterRef
from service.scheduling.modes import BATCHED, MERGED, ServedModel, batched, merged
from service.scheduling.policy import Demand, PolicyError, Timing, choose_policy
from service.scheduling.slots import Slot

TIMING = Timing(time_slice_s=2.0, merged_after_s=10.0)
BASE = "base"


def served(name: str, batchable: bool = True) -> ServedModel:
    if name == BASE:
        return ServedModel(BASE)
    adapter = AdapterRef(name, abs(hash(name)) % 1000 + 1, Path(f"/forms/{name}")) if batchable else None
    return ServedModel(name, Path(f"/fused/{name}.safetensors"), adapter)


MODELS = {m.name: m for m in (served(BASE), served("x"), served("y"), served("old", batchable=False))}


def slot(target=None, running: dict[str, int] | None = None, busy_since=0.0, changed_at=0.0) -> Slot:
    holder = target.holder if target is not None else None
    weights = MODELS[holder].fused if holder else None
    return Slot(
        engine=None,  # type: ignore[arg-type]  # the policy never touches the engine
        target=target or batched(),
        weights=weights,
        running=Counter(running or {}),
        busy_since=busy_since,
        changed_at=changed_at,
    )


def holds(s: Slot, model: ServedModel) -> bool:
    return s.target.serves(model) and s.weights == s.target.mode.weights(s.target.holder, MODELS)


def demand(now: float, waiting: dict[str, float], streak: tuple[str, float] | None = None) -> Demand:
    """waiting: model -> its oldest queued arrival; streak: (model, since) — by default the newest arrival's."""
    newest = max(waiting.items(), key=lambda item: item[1], default=None)
    return Demand(now, waiting, streak if streak is not None else newest)


def retarget(mode: str, slots: list[Slot], d: Demand):
    return [(slots.index(s), t.label) for s, t in choose_policy(mode, True, TIMING).retarget(slots, d, MODELS, holds)]


def test_batched_mode_serves_every_batchable_model_without_a_change():
    slots = [slot(running={"x": 3})]
    assert retarget("batched", slots, demand(100, {"y": 99, BASE: 99.5})) == []


def test_a_model_without_a_per_request_form_gets_merged_weights_once_the_slice_is_over():
    slots = [slot(running={"x": 2}, busy_since=99)]
    assert retarget("batched", slots, demand(100, {"old": 99.5})) == []  # within the slice
    assert retarget("batched", slots, demand(101.5, {"old": 99.5})) == [(0, "merged:old")]


def test_auto_gives_an_idle_engine_the_merged_weights_of_a_model_alone_asked_for_merged_after_s():
    assert retarget("auto", [slot()], demand(100, {"x": 99.9}, streak=("x", 89))) == [(0, "merged:x")]


def test_auto_keeps_batching_for_a_lone_request_after_a_quiet_spell():
    """Nothing else was asked for in a while, but x's streak has only just begun: no swap for one request."""
    assert retarget("auto", [slot()], demand(100, {"x": 99.9})) == []


def test_auto_keeps_batching_while_another_model_was_asked_for_recently():
    assert retarget("auto", [slot()], demand(100, {"x": 99.9}, streak=("x", 95.5))) == []  # y asked at 95
    assert retarget("auto", [slot()], demand(100, {"x": 99.9}, streak=("x", 89.5))) == [(0, "merged:x")]


def test_auto_moves_a_busy_engine_to_merged_only_after_merged_after_s_in_batched_mode():
    busy = slot(running={"x": 4}, changed_at=95)
    assert retarget("auto", [busy], demand(100, {}, streak=("x", 80))) == []
    assert retarget("auto", [busy], demand(105.5, {}, streak=("x", 80))) == [(0, "merged:x")]


def test_auto_wakes_when_a_streak_reaches_merged_after_s():
    policy = choose_policy("auto", True, TIMING)
    d = demand(100, {"x": 99.9}, streak=("x", 95))
    assert policy.next_deadline([slot()], d, MODELS, holds) == 105


def test_the_base_alone_stays_batched():
    assert retarget("auto", [slot()], demand(100, {BASE: 99})) == []


def test_a_rival_brings_a_merged_engine_back_to_batched_within_a_time_slice():
    hot = slot(merged("x"), running={"x": 5}, busy_since=99)
    assert retarget("auto", [hot], demand(100, {"y": 99.5})) == []
    assert retarget("auto", [hot], demand(101.1, {"y": 99.5})) == [(0, "batched")]


def test_an_idle_merged_engine_changes_at_once():
    assert retarget("auto", [slot(merged("x"))], demand(100, {"y": 99.9})) == [(0, "batched")]


def test_merged_policy_swaps_to_the_oldest_waiting_model():
    policy = choose_policy("merged", True, TIMING)
    assert policy.initial(BASE) == merged(BASE)
    slots = [slot(merged("x"))]
    changes = policy.retarget(slots, demand(100, {"y": 99.0, BASE: 98.0}), MODELS, holds)
    assert [t.label for _, t in changes] == [f"merged:{BASE}"]


def test_two_engines_share_the_work_one_change_each():
    slots = [slot(merged("x"), running={"x": 1}, busy_since=99.5), slot(merged("y"))]
    changes = retarget("merged", slots, demand(100, {"old": 99.0, BASE: 99.5}))
    assert changes == [(1, "merged:old")]  # the idle one; the busy one's slice is not over


def test_an_engine_without_per_request_weights_runs_merged_and_refuses_batched():
    assert choose_policy("auto", False, TIMING).name == "merged"
    with pytest.raises(PolicyError, match="D2LORA_SCHEDULER_MODE=batched needs an engine"):
        choose_policy("batched", False, TIMING)


def test_modes_say_who_they_serve():
    assert BATCHED.serves(None, MODELS["x"]) and BATCHED.serves(None, MODELS[BASE])
    assert not BATCHED.serves(None, MODELS["old"])
    assert MERGED.serves("x", MODELS["x"]) and not MERGED.serves("x", MODELS["y"])
