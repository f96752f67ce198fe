"""The live traffic's record: what the rollout tests conclude from it must be able to fail."""
from embedding_rollout.loadgen import TrafficRecord


def answers(*pairs):
    record = TrafficRecord()
    record.responses = [{"at": at, "user": user, "version": version, "query": "q", "top": None}
                        for at, (user, version) in enumerate(pairs)]
    return record


def test_a_user_who_moves_once_old_to_new_is_sticky():
    record = answers(("a", "v1"), ("b", "v2"), ("a", "v1"), ("a", "v2"), ("b", "v2"), ("a", "v2"))
    assert record.users_moved_back("v1", "v2") == {}


def test_a_user_who_goes_back_or_sees_a_third_version_is_reported():
    record = answers(("a", "v1"), ("a", "v2"), ("a", "v1"), ("b", "v3"), ("c", "v1"))
    assert record.users_moved_back("v1", "v2") == {"a": ["v1", "v2", "v1"], "b": ["v3"]}
