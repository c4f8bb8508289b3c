"""The key indexes: faiss (CPU) and the tensor index (for GPU replicas) give the same answers."""

import re

import pytest
import torch

from editstream.retrieval import (
    DEFAULT_ANN_THRESHOLD,
    IvfKeyIndex,
    KeyIndex,
    ScalingKeyIndex,
    TensorKeyIndex,
    make_index,
)


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


def clustered_keys(n: int, dim: int = 32, seed: int = 0) -> torch.Tensor:
    """Keys in 40 clusters (edits about similar things), normalised."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(40, dim, generator=g)
    keys = centres[torch.randint(0, 40, (n,), generator=g)] + 0.6 * torch.randn(n, dim, generator=g)
    return torch.nn.functional.normalize(keys, dim=1)


def test_past_the_threshold_the_index_turns_ivf_and_finds_what_flat_finds():
    dim, n = 32, 3000
    keys = clustered_keys(n, dim).half().float()  # artifacts carry float16 keys
    flat, scaling = (
        KeyIndex(dim),
        ScalingKeyIndex(dim, threshold=1000, nprobe=4, regrow=2.0, background=False),
    )  # 4 of 25, then 44 lists
    kinds = []
    for i, k in enumerate(keys):
        flat.add(f"e{i}", k)
        scaling.add(f"e{i}", k)
        kinds.append(type(scaling.inner).__name__)
    assert kinds[998] == "KeyIndex" and kinds[999] == "IvfKeyIndex"  # exact below the threshold
    assert scaling.inner.trained_on == 2000  # trained again after growing 2-fold
    for i in range(0, n, 5):  # retracts and supersedes
        flat.remove(f"e{i}")
        scaling.remove(f"e{i}")
    assert len(scaling) == len(flat) == n - n // 5
    g = torch.Generator().manual_seed(1)
    queries = torch.nn.functional.normalize(keys + 0.15 * torch.randn(n, dim, generator=g), dim=1)  # paraphrases
    _, want = flat.search(queries)
    scores, got = scaling.search(queries)
    agree = sum(w == h for w, h in zip(want, got, strict=True)) / n
    assert agree >= 0.99, agree
    assert not {f"e{i}" for i in range(0, n, 5)} & set(got)  # a removed key is never found
    assert torch.isfinite(scores).all()
    assert scaling.inner._index.code_size == 2 * dim  # the lists hold float16 keys: half IVF-Flat's bytes
    scaling.set_nprobe(10**6)  # every list probed: float16 keys in the lists score exactly as flat
    flat_scores, want = flat.search(queries.half().float())
    scores, got = scaling.search(queries.half().float())
    assert got == want and torch.allclose(scores, flat_scores, atol=1e-6)


def test_a_background_build_serves_on_meanwhile_and_takes_up_the_changes_made_since(monkeypatch, caplog):
    """By default the IVF index is trained on a thread: the call that crosses the count returns at
    once, the flat index answers meanwhile, and the adds, removes and re-adds made during the build
    are replayed onto the new index before it answers. The build is held until those are made."""
    import threading

    import editstream.retrieval as retrieval

    release, entered = threading.Event(), threading.Event()

    class HeldIvf(retrieval.IvfKeyIndex):
        def __init__(self, *args, **kwargs):
            entered.set()
            assert release.wait(30)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(retrieval, "IvfKeyIndex", HeldIvf)
    caplog.set_level("INFO", logger="editstream.retrieval")
    dim, n = 32, 1500
    keys = clustered_keys(n, dim).half().float()
    flat, scaling = KeyIndex(dim), ScalingKeyIndex(dim, threshold=1000, nprobe=4)
    for i in range(1000):
        flat.add(f"e{i}", keys[i])
        scaling.add(f"e{i}", keys[i])
    assert entered.wait(30) and isinstance(scaling.inner, KeyIndex)  # crossed; still flat, not waiting
    for i in range(1000, n):  # changes made while the build runs
        flat.add(f"e{i}", keys[i])
        scaling.add(f"e{i}", keys[i])
    for i in range(0, n, 5):
        flat.remove(f"e{i}")
        scaling.remove(f"e{i}")
    moved = torch.nn.functional.normalize(torch.randn(2, dim, generator=torch.Generator().manual_seed(3)), dim=1)
    for edit_id, key in zip(("e0", "e7"), moved, strict=True):  # re-added after a remove, superseded in place
        flat.remove(edit_id), scaling.remove(edit_id)
        flat.add(edit_id, key.half().float()), scaling.add(edit_id, key.half().float())
    assert scaling.search(moved)[1] == flat.search(moved)[1] == ["e0", "e7"]  # the flat index answers meanwhile
    release.set()
    scaling.wait()
    assert isinstance(scaling.inner, retrieval.IvfKeyIndex) and scaling.inner.trained_on == 1000
    assert len(scaling) == len(flat) and "changes made meanwhile replayed" in caplog.text
    ids, _ = scaling.inner.live_keys()
    assert sorted(ids) == sorted(flat.live_keys()[0])
    scaling.set_nprobe(10**6)  # every list: exactly what flat finds, the replayed changes included
    queries = torch.cat([keys, moved]).half().float()
    want_scores, want = flat.search(queries)
    got_scores, got = scaling.search(queries)
    assert got == want and torch.allclose(got_scores, want_scores, atol=1e-6)


def test_a_failed_background_build_keeps_the_current_index_and_waits_for_more_growth(monkeypatch, caplog):
    import editstream.retrieval as retrieval

    calls = []

    class FailingIvf(retrieval.IvfKeyIndex):
        def __init__(self, *args, **kwargs):
            calls.append(len(args[1]))
            raise MemoryError("no room for the lists")

    monkeypatch.setattr(retrieval, "IvfKeyIndex", FailingIvf)
    dim = 16
    keys = clustered_keys(700, dim)
    scaling = ScalingKeyIndex(dim, threshold=100, nprobe=4, regrow=2.0)
    for i, k in enumerate(keys[:150]):
        scaling.add(f"e{i}", k)
    scaling.wait()
    assert "failed (MemoryError('no room for the lists'))" in caplog.text
    assert isinstance(scaling.inner, KeyIndex) and len(scaling) == 150 and calls == [100]
    for i, k in enumerate(keys[150:], start=150):  # no new try until the count has doubled
        scaling.add(f"e{i}", k)
        scaling.wait()
    assert calls == [100, 200, 400]
    assert scaling.search(keys[:1])[1] == ["e0"]


def test_a_seeded_index_takes_the_ivf_lists_it_is_given_and_finds_the_same(caplog):
    """A snapshot carries the IVF centroids (`training`): an index seeded with them builds its lists in
    one bulk add, untrained and without a flat stage, and searches exactly as the one it came from."""
    dim, n = 32, 3000
    keys = clustered_keys(n, dim).half().float()
    writer = ScalingKeyIndex(dim, threshold=1000, nprobe=4, regrow=2.0, background=False)
    for i, k in enumerate(keys):
        writer.add(f"e{i}", k)
    for i in range(0, n, 7):
        writer.remove(f"e{i}")
    training = writer.training()
    assert training["ivf_centroids"].shape == (writer.inner.nlist, dim) and int(training["ivf_trained_on"]) == 2000
    ids, live = writer.inner.live_keys()
    loaded = ScalingKeyIndex(dim, threshold=1000, nprobe=4, regrow=2.0)
    loaded.seed(training)
    loaded.add_many([*ids, ids[0]], torch.cat([torch.from_numpy(live), torch.from_numpy(live[:1])]))
    assert isinstance(loaded.inner, IvfKeyIndex) and len(loaded) == len(ids)
    assert loaded.inner.trained_on == 2000  # the writer's regrow schedule goes on from the same count
    assert torch.equal(loaded.training()["ivf_centroids"], training["ivf_centroids"])  # not trained again
    queries = torch.nn.functional.normalize(
        keys + 0.15 * torch.randn(n, dim, generator=torch.Generator().manual_seed(2)), dim=1
    )
    want_scores, want = writer.search(queries)
    got_scores, got = loaded.search(queries)
    assert got == want and torch.equal(got_scores, want_scores)
    # a seed that does not fit (another key width) is refused with a warning: the index trains anew
    other = ScalingKeyIndex(dim, threshold=1000, nprobe=4)
    other.seed({**training, "ivf_centroids": training["ivf_centroids"][:, :16]})
    assert "do not fit" in caplog.text
    other.add_many(ids, torch.from_numpy(live))  # flat now, IVF trained in the background
    other.wait()
    assert isinstance(other.inner, IvfKeyIndex) and other.inner.trained_on == len(ids)
    # fewer keys than the threshold: flat as ever, the seed unused
    small = ScalingKeyIndex(dim, threshold=1000)
    small.seed(training)
    small.add_many(ids[:10], torch.from_numpy(live[:10]))
    assert isinstance(small.inner, KeyIndex) and small.training() == {}


def test_the_ann_threshold_reaches_recipe_and_bad_values_are_refused(real_lm):
    from editstream.demo_facts import demo_facts
    from editstream.errors import ConfigError
    from editstream.methods import create_method

    default = create_method("recipe", real_lm)
    assert default.retrieval.index.threshold == DEFAULT_ANN_THRESHOLD == 100_000  # flat below it
    assert isinstance(default.retrieval.index.inner, KeyIndex)
    exact, ann = create_method("recipe", real_lm, ann_threshold=0), create_method("recipe", real_lm, ann_threshold=40)
    facts = demo_facts(120)
    for method in (exact, ann):
        for artifact in method.compute(facts):
            method.apply(artifact)
    ivf = ann.retrieval.index.inner
    assert isinstance(ivf, IvfKeyIndex) and isinstance(exact.retrieval.index, KeyIndex)
    # at this size every list is probed, so the IVF path must find exactly what flat finds (the
    # approximate case is the synthetic test above); the search runs, not the stored-prompt path
    assert ivf.nprobe == ivf.nlist
    exact.exact_lookup = ann.exact_lookup = False
    prompts = [f.paraphrases[0] if f.paraphrases else f.prompt for f in facts]
    found = [m.retrieval.retrieve(prompts, None, m.meta_of) for m in (exact, ann)]
    assert found[0] == found[1] and sum(f is not None for f in found[0]) > len(prompts) / 2
    for bad in (-1, "many", 2.5, True):
        with pytest.raises(ConfigError, match="ann_threshold"):
            create_method("recipe", real_lm, ann_threshold=bad)


def test_an_int8_encoder_keys_edits_and_a_float32_replica_refuses_its_keys(real_lm):
    from editstream.demo_facts import demo_facts
    from editstream.errors import ArtifactError
    from editstream.methods import create_method

    int8, plain = create_method("recipe", real_lm, encoder_int8=True), create_method("recipe", real_lm)
    facts = demo_facts(40)
    artifacts = int8.compute(facts)
    name = int8.retrieval.encoder.name  # minilm+int8-ort where ONNX Runtime is installed, else minilm+int8
    assert name.startswith("minilm+int8") and {a.meta["key_encoder"] for a in artifacts} == {name}
    for artifact in artifacts:
        int8.apply(artifact)
    int8.exact_lookup = False  # the search itself: int8 queries against int8 keys
    found = int8.retrieval.retrieve([f.prompt for f in facts], None, int8.meta_of)
    assert sum(got == f.edit_id for got, f in zip(found, facts, strict=True)) >= 0.95 * len(facts)
    refused = rf"encoder '{re.escape(name)}'; this replica encodes queries with 'minilm'"
    with pytest.raises(ArtifactError, match=refused):
        plain.apply(artifacts[0])
    assert not plain.edit_ids()


def test_the_recall_benchmark_compares_the_served_retrieval_through_both_indexes(real_lm):
    from editstream.bench.recall import run_recall
    from editstream.data import load_edits
    from editstream.methods.recipe.method import load_retrieval

    retrieval = load_retrieval(real_lm, None, None)
    sets = {name: load_edits(name, limit=20) for name in ("counterfact", "zsre")}
    distractors = load_edits("counterfact-train", limit=60)
    # 100 keys, IVF from 80 (2 lists): with both lists probed the IVF path must agree with flat exactly
    exact = run_recall(retrieval, sets, distractors, threshold=80, nprobe=2, remove_share=0.5, sweep_nprobes=(1, 2))
    assert exact["stored"] == 100 and exact["ivf_lists"] == 2 and exact["removed"] == 30
    assert [s["nprobe"] for s in exact["sweep"]] == [1, 2] and exact["sweep"][1]["top1_agreement"]["all"] == 1.0
    for phase in ("full", "after_removals"):
        assert exact[phase]["all"]["agreement"] == 1.0 and exact[phase]["all"]["recall_vs_flat"] == 1.0
        assert exact[phase]["all"]["queries"] == sum(1 + len(e.paraphrases) for s in sets.values() for e in s)
    assert exact["full"]["counterfact/prompt"]["own_edit_flat"] >= 0.8  # the searched path finds own edits
    one = run_recall(retrieval, sets, distractors, threshold=80, nprobe=1, remove_share=0.5)
    assert one["full"]["all"]["own_edit_flat"] == exact["full"]["all"]["own_edit_flat"]
