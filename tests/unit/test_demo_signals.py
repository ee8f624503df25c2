"""The demo stops on a signal even when the raise from its handler is lost."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.lab import demo


@pytest.fixture
def handlers(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The demo's handlers installed, the host's put back afterwards."""
    monkeypatch.setattr(demo, "_signalled", None)
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    demo.install_signal_handlers()
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


class SignalledInFinalizer:
    """Raises SIGINT from its finalizer, where Python only reports exceptions."""

    def __del__(self) -> None:
        signal.raise_signal(signal.SIGINT)
        self.after = True  # the handler runs here, inside __del__


def test_a_signal_during_a_finalizer_stops_the_next_step(
    handlers: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    lost: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", lost.append)
    obj = SignalledInFinalizer()
    del obj  # the raise of Interrupted is lost
    assert [type(u.exc_value) for u in lost] == [demo.Interrupted]
    narrator = object.__new__(demo.Demo)
    narrator.n = 0
    with pytest.raises(demo.Interrupted) as raised:
        narrator.step("the next step")
    assert raised.value.signum == signal.SIGINT
    assert narrator.n == 0, "the step did not start"


def test_a_second_signal_is_ignored_while_cleaning_up(
    handlers: None, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(demo.Interrupted):
        signal.raise_signal(signal.SIGTERM)
    signal.raise_signal(signal.SIGINT)  # unwinding: no second raise
    assert "ignored: still cleaning up" in capsys.readouterr().err
    with pytest.raises(demo.Interrupted) as raised:
        demo.check_signalled()
    assert raised.value.signum == signal.SIGTERM
