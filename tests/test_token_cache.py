"""The owners' token hashes a worker keeps: the last ones used, never more than its bound."""

from __future__ import annotations

from worker.handlers.base import _Recent


def test_the_least_recently_used_hash_goes_first() -> None:
    recent = _Recent(2)
    recent.put("a", "hash-a")
    recent.put("b", "hash-b")
    assert "hash-a" == recent.get("a")  # "b" is now the least recently used

    recent.put("c", "hash-c")

    assert (None, "hash-a", "hash-c") == (recent.get("b"), recent.get("a"), recent.get("c"))
