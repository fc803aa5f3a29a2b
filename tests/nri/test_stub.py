"""nri/stub.py: a plugin subscribes to the container events its handler implements, and only those are served."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from dra_cpu.nri.enforcer import EVENTS, NriEnforcer
from dra_cpu.nri.gen import nri_v1alpha1_pb2 as api
from dra_cpu.nri.stub import PLUGIN_SERVICE, Stub, StubConfig, event_mask, events_of
from dra_cpu.nri.transport import UNIMPLEMENTED, MethodError


class StartsOnly:
    """A handler that takes StartContainer and nothing else of the container events."""

    def __init__(self) -> None:
        self.started: list[str] = []

    def configured(self, request: api.ConfigureRequest) -> None:
        pass

    def synchronize(
        self, pods: Sequence[api.PodSandbox], containers: Sequence[api.Container]
    ) -> list[api.ContainerUpdate]:
        return []

    def disconnected(self, stopping: bool) -> None:
        pass

    def start_container(self, pod: api.PodSandbox, container: api.Container) -> None:
        self.started.append(container.id)


def _stub(handler: StartsOnly) -> Stub:
    return Stub(StubConfig(Path("/nonexistent"), "p", "01", 1.0, 0.1, 0.1), handler)


def test_the_events_subscribed_are_those_the_handler_implements() -> None:
    handler = StartsOnly()
    stub = _stub(handler)
    assert stub.events == events_of(handler) == (api.START_CONTAINER,)
    configured = api.ConfigureResponse.FromString(
        stub._handle(PLUGIN_SERVICE, "Configure", api.ConfigureRequest().SerializeToString())
    )
    assert configured.events == event_mask([api.START_CONTAINER])
    # The enforcer implements all five; the runtime peer of the tests checks the same mask on the wire.
    assert events_of(NriEnforcer) == EVENTS and len(EVENTS) == 5


def test_an_event_the_handler_does_not_take_is_unimplemented_in_both_forms() -> None:
    handler = StartsOnly()
    stub = _stub(handler)
    container = api.Container(id="c1")
    with pytest.raises(MethodError) as refused:
        stub._handle(
            PLUGIN_SERVICE, "RemoveContainer", api.RemoveContainerRequest(container=container).SerializeToString()
        )
    assert refused.value.code == UNIMPLEMENTED
    # As a StateChange event (older runtimes) it is ignored; the one it takes is delivered either way.
    for event in (api.REMOVE_CONTAINER, api.START_CONTAINER):
        stub._handle(
            PLUGIN_SERVICE, "StateChange", api.StateChangeEvent(event=event, container=container).SerializeToString()
        )
    stub._handle(PLUGIN_SERVICE, "StartContainer", api.StartContainerRequest(container=container).SerializeToString())
    assert handler.started == ["c1", "c1"]
