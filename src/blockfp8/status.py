"""The words for what happened to one method (a backend, a launch config, a peer) on one problem: the same in
``check``, ``bench``, ``tune`` and the online tuning of the dispatcher. A leaf: imports nothing."""

from __future__ import annotations


class Status:
    """What happened to one method on one problem."""

    OK = "ok"  # ran, result within tolerance of the reference
    WRONG = "wrong"  # ran, result outside tolerance
    CRASHED = "crashed"  # raised an exception
    REFUSED = "refused"  # its declared limits exclude the problem
    UNAVAILABLE = "unavailable"  # not installed, or no device for it here

    ALL = (OK, WRONG, CRASHED, REFUSED, UNAVAILABLE)
    BAD = (WRONG, CRASHED)  # a method that claims a problem and gets this has a bug
