"""The install state machine and reconcile: pure logic (no broker, no models)."""

from __future__ import annotations

import json

import pytest

from edgepack.agent.errors import InstallError
from edgepack.agent.installer import Installer
from edgepack.agent.protocol import DesiredState
from edgepack.agent.reconcile import Action, decide, effective_desired
from edgepack.agent.states import (
    OUTCOMES,
    RESUME,
    TRANSITIONS,
    WORKING,
    Candidate,
    InstallState,
    Phase,
    Resume,
    resume,
)

CAND = Candidate("b" * 64, "dep1", "tiny", "1.0.0")


def _walk(*phases: Phase) -> InstallState:
    st = InstallState()
    for p in phases:
        st = st.to(p, candidate=CAND if st.phase == Phase.IDLE else None, now=1.0)
    return st


def test_every_state_has_its_transitions_and_working_states_can_be_cancelled() -> None:
    assert set(TRANSITIONS) == set(Phase)
    for phase in WORKING:
        assert Phase.IDLE in TRANSITIONS[phase]
    for outcome in OUTCOMES:
        assert TRANSITIONS[outcome] == {Phase.IDLE}
        assert any(outcome in TRANSITIONS[p] for p in WORKING)
    # the health gate cannot be skipped, and only a health check commits
    assert [p for p in Phase if Phase.COMMITTED in TRANSITIONS[p]] == [Phase.HEALTH_CHECKING]
    assert TRANSITIONS[Phase.IDLE] == {Phase.DOWNLOADING}


def test_the_happy_path_ends_idle_with_the_outcome_recorded() -> None:
    st = _walk(Phase.DOWNLOADING, Phase.WAITING, Phase.DOWNLOADING, Phase.VERIFYING,
               Phase.STAGED, Phase.HEALTH_CHECKING)
    assert st.phase == Phase.HEALTH_CHECKING and st.candidate == CAND and st.busy
    done = st.to(Phase.COMMITTED, reason="", now=5.0)
    assert done.phase == Phase.IDLE and done.candidate is None and not done.busy
    assert done.last.phase == Phase.COMMITTED and done.last.bundle_id == CAND.bundle_id
    assert done.last.ts == 5.0


@pytest.mark.parametrize("path,bad", [
    ((), Phase.VERIFYING),  # idle → verifying: nothing downloaded
    ((Phase.DOWNLOADING,), Phase.COMMITTED),  # no health check
    ((Phase.DOWNLOADING, Phase.VERIFYING), Phase.HEALTH_CHECKING),  # not staged
    ((Phase.DOWNLOADING, Phase.WAITING), Phase.VERIFYING),
])
def test_illegal_transitions_are_refused(path, bad) -> None:
    with pytest.raises(InstallError, match="no transition"):
        _walk(*path).to(bad)


def test_a_working_state_needs_a_candidate() -> None:
    with pytest.raises(InstallError, match="candidate"):
        InstallState().to(Phase.DOWNLOADING)


def test_persisted_form_round_trips_and_never_holds_an_outcome() -> None:
    st = _walk(Phase.DOWNLOADING, Phase.VERIFYING)
    assert InstallState.from_dict(json.loads(json.dumps(st.to_dict()))) == st
    done = st.to(Phase.REJECTED, reason="rejected:signature", now=2.0)
    assert InstallState.from_dict(json.loads(json.dumps(done.to_dict()))) == done
    with pytest.raises(ValueError):
        InstallState.from_dict({"phase": "committed"})
    with pytest.raises(ValueError):
        InstallState.from_dict({"phase": "exploded"})


def test_resume_table_covers_every_stored_state() -> None:
    stored = set(Phase) - OUTCOMES
    assert set(RESUME) == stored
    assert RESUME[Phase.IDLE] == Resume.NOTHING
    assert RESUME[Phase.DOWNLOADING] == RESUME[Phase.WAITING] == Resume.DOWNLOAD
    for p in (Phase.VERIFYING, Phase.STAGED, Phase.HEALTH_CHECKING):
        assert RESUME[p] == Resume.REINSTALL
    st = _walk(Phase.DOWNLOADING).to(Phase.FAILED, now=1.0).to(Phase.DOWNLOADING,
                                                                candidate=CAND)
    after, rule = resume(st)
    assert rule == Resume.DOWNLOAD and after.phase == Phase.IDLE and after.candidate is None
    assert after.last == st.last  # the previous outcome is kept


def test_installer_persists_every_transition(tmp_path) -> None:
    inst = Installer(tmp_path)
    on_disk = lambda: json.loads((tmp_path / "state.json").read_text())  # noqa: E731
    inst.advance(Phase.DOWNLOADING, CAND)
    assert on_disk()["phase"] == "downloading"
    assert on_disk()["candidate"]["bundle_id"] == CAND.bundle_id
    inst.advance(Phase.WAITING, Candidate(CAND.bundle_id, "dep1", attempts=1))
    assert on_disk()["phase"] == "waiting" and on_disk()["candidate"]["attempts"] == 1
    inst.advance(Phase.DOWNLOADING)
    inst.abandon("dep1", CAND.bundle_id, "transfer_failed", "gone")
    doc = on_disk()
    assert doc["phase"] == "idle" and doc["last"]["phase"] == "failed"
    assert Installer(tmp_path).install == inst.install  # read back typed
    boot = Installer(tmp_path).boot(crash_window_s=1, max_crashes=3)
    assert boot.interrupted is None and boot.resume == Resume.NOTHING


def test_installer_boot_reports_the_interrupted_state_and_its_resume_rule(tmp_path) -> None:
    inst = Installer(tmp_path)
    inst.advance(Phase.DOWNLOADING, CAND)
    inst.advance(Phase.WAITING)
    boot = Installer(tmp_path).boot(crash_window_s=1, max_crashes=3)
    assert boot.interrupted.phase == Phase.WAITING and boot.resume == Resume.DOWNLOAD
    assert json.loads((tmp_path / "state.json").read_text())["phase"] == "idle"


# ---------------------------------------------------------------- reconcile
def _ds(dep: str, bundle: str, ts: float = 0.0) -> DesiredState:
    return DesiredState(dep, bundle * 64, "tiny", "1.0.0", ts=ts)


def test_effective_desired_device_wins_then_newest_group_then_config_order() -> None:
    mine = _ds("d0", "a")
    groups = {"lab": _ds("d1", "b", ts=10), "prod": _ds("d2", "c", ts=10)}
    assert effective_desired(mine, groups, ["lab", "prod"]) is mine
    assert effective_desired(None, groups, ["prod", "lab"]).deployment_id == "d2"
    assert effective_desired(None, groups, ["lab", "prod"]).deployment_id == "d1"
    groups["lab"] = _ds("d3", "b", ts=11)
    assert effective_desired(None, groups, ["prod", "lab"]).deployment_id == "d3"
    assert effective_desired(None, {}, ["lab"]) is None


def test_decide() -> None:
    never = lambda *a: False  # noqa: E731
    want = _ds("d1", "a")
    assert decide(None, working=None, active_bundle=None, reported=never,
                  failed=never).action == Action.NOTHING
    cleared = decide(None, working=want, active_bundle=None, reported=never, failed=never)
    assert cleared.action == Action.NOTHING and cleared.cancel
    same = decide(_ds("d2", "a"), working=want, active_bundle=None, reported=never,
                  failed=never)
    assert same.action == Action.CARRY_ON and same.cancel is None
    other = decide(_ds("d2", "b"), working=want, active_bundle=None, reported=never,
                   failed=never)
    assert other.action == Action.INSTALL and "superseded" in other.cancel
    assert decide(want, working=None, active_bundle=want.bundle_id, reported=never,
                  failed=never).action == Action.REPORT
    assert decide(want, working=None, active_bundle=want.bundle_id,
                  reported=lambda dep: dep == "d1", failed=never).action == Action.NOTHING
    assert decide(want, working=None, active_bundle=None, reported=never,
                  failed=lambda dep, bid: dep == "d1").action == Action.SKIP
