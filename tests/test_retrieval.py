"""The key indexes: faiss (CPU) and the tensor index (for GPU replicas) give the same answers."""

import torch

from editstream.retrieval import KeyIndex, TensorKeyIndex, make_index


def test_tensor_index_matches_faiss_through_adds_removes_and_growth():
    torch.manual_seed(0)
    dim = 16
    faiss_index, tensor_index = KeyIndex(dim), TensorKeyIndex(dim, capacity=4)  # grows several times
    keys = torch.nn.functional.normalize(torch.randn(50, dim), dim=1)
    for i, k in enumerate(keys):
        faiss_index.add(f"e{i}", k)
        tensor_index.add(f"e{i}", k)
    for i in range(0, 50, 3):  # removed rows are masked, then reused by later adds
        faiss_index.remove(f"e{i}")
        tensor_index.remove(f"e{i}")
    for i in range(50, 60):
        k = torch.nn.functional.normalize(torch.randn(dim), dim=0)
        faiss_index.add(f"e{i}", k)
        tensor_index.add(f"e{i}", k)
    tensor_index.add("e1", keys[7])  # idempotent: an existing id keeps its key
    assert len(faiss_index) == len(tensor_index) == 50 - 17 + 10
    queries = torch.nn.functional.normalize(torch.randn(40, dim), dim=1)
    fs, fids = faiss_index.search(queries)
    ts, tids = tensor_index.search(queries)
    assert fids == tids
    assert torch.allclose(fs, ts, atol=1e-5)
    assert "e0" not in tensor_index and "e1" in tensor_index


def test_empty_indexes_and_device_choice():
    for index in (KeyIndex(4), TensorKeyIndex(4)):
        scores, ids = index.search(torch.randn(2, 4))
        assert ids == [None, None] and torch.isinf(scores).all()
    assert isinstance(make_index(4, "cpu"), KeyIndex)
    if torch.cuda.is_available():
        assert isinstance(make_index(4, "cuda"), TensorKeyIndex)


def test_faiss_removes_in_place_and_reuses_the_slots():
    """A remove overwrites the key's row (no compaction of the array: O(1) per supersede or
    retract) and the next add takes the slot; search still equals a brute-force scan of live keys."""
    torch.manual_seed(1)
    dim = 8
    index, live = KeyIndex(dim), {}
    for i in range(20):
        live[f"e{i}"] = torch.nn.functional.normalize(torch.randn(dim), dim=0)
        index.add(f"e{i}", live[f"e{i}"])
    for i in range(0, 20, 2):
        index.remove(f"e{i}")
        del live[f"e{i}"]
    assert index._index.ntotal == 20 and len(index) == 10  # rows overwritten in place, not compacted
    for i in range(20, 30):
        live[f"e{i}"] = torch.nn.functional.normalize(torch.randn(dim), dim=0)
        index.add(f"e{i}", live[f"e{i}"])
    assert index._index.ntotal == 20  # the ten removed rows were taken again, none appended
    queries = torch.nn.functional.normalize(torch.randn(30, dim), dim=1)
    scores, ids = index.search(queries)
    best = (queries @ torch.stack(list(live.values())).T).max(dim=1)
    assert ids == [list(live)[i] for i in best.indices.tolist()]
    assert torch.allclose(scores, best.values, atol=1e-5)
    for edit_id in list(live):
        index.remove(edit_id)
    assert index.search(queries)[1] == [None] * 30 and len(index) == 0
