"""Fault injection for the crash-safety tests: a SIGKILL at a named point of a commit, as a power cut would."""

import os
import signal

FAULT_ENV = "SAM_CLS_FAULT_AT"  # for fault-injection tests only: "<point>[:<n>]" SIGKILLs at the n-th <point>
_faults_seen: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Die here, as a power cut would, when a fault-injection test asks for it (see FAULT_ENV); else nothing."""
    want = os.environ.get(FAULT_ENV)
    if not want:
        return
    point, _, nth = want.partition(":")
    if point == name:
        _faults_seen[name] = _faults_seen.get(name, 0) + 1
        if _faults_seen[name] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)
