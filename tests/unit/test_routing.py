from scheduler.routing import LeastLoaded, WorkerState


def workers() -> list[WorkerState]:
    return [WorkerState("a", "m", max_num_seqs=4), WorkerState("b", "m", max_num_seqs=4),
            WorkerState("c", "other", max_num_seqs=4)]


def test_picks_the_least_loaded_worker_of_the_model():
    ws = workers()
    ws[0].inflight = 3
    assert LeastLoaded().pick(ws, "m").worker_id == "b"


def test_reported_load_counts_other_replicas_requests():
    ws = workers()
    ws[0].inflight = 1
    ws[1].reported_running, ws[1].reported_waiting = 2, 1  # another replica keeps b busy
    assert LeastLoaded().pick(ws, "m").worker_id == "a"


def test_load_is_relative_to_capacity():
    big, small = WorkerState("big", "m", max_num_seqs=32, inflight=4), WorkerState("small", "m", max_num_seqs=4,
                                                                                     inflight=2)
    assert LeastLoaded().pick([small, big], "m").worker_id == "big"


def test_equal_workers_take_turns():
    ws, policy = workers(), LeastLoaded()
    assert [policy.pick(ws, "m").worker_id for _ in range(4)] == ["a", "b", "a", "b"]


def test_filters_explain_why():
    ws = workers()
    ws[1].routable = False
    scores = {s.worker_id: s for s in LeastLoaded().score(ws, "m")}
    assert scores["b"].filtered_reason == "not routable"
    assert scores["c"].filtered_reason == "serves other"
    assert scores["a"].filtered_reason == ""
    assert LeastLoaded().pick([ws[1], ws[2]], "m") is None
