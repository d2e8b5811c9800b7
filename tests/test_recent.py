from mlflow_ctx_mw._recent import RecentTraces


def test_bounded_and_latest_wins() -> None:
    recent = RecentTraces(size=2)
    recent.add("tr-1", "r-1")
    recent.add("tr-2", "r-2")
    recent.add("tr-3", "r-1")  # a client reused its request id: the latest trace wins
    assert recent.trace_for("r-1") == "tr-3" and "tr-1" not in recent
    recent.add("tr-4", "r-4")
    assert len(recent) == 2
    assert recent.trace_for("r-2") is None and "tr-2" not in recent
    assert "tr-3" in recent and "tr-4" in recent
