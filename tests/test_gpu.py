"""GPU: the embedded model and RECIPE serve on CUDA (skipped on machines without a CUDA device)."""

import pytest
import torch

from editstream.edits import EditRequest
from editstream.methods import create_method
from editstream.models import load_causal_lm
from editstream.replica import Replica
from editstream.retrieval import TensorKeyIndex

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_recipe_edit_on_cuda(trained_checkpoint):
    lm = load_causal_lm(device="cuda")
    assert lm.device.type == "cuda"
    method = create_method("recipe", lm, checkpoint=trained_checkpoint)
    replica = Replica(method)
    replica.apply(1, method.compute([EditRequest("The capital of France is", "Lyon", edit_id="g")])[0])
    (answer,) = replica.generate(["The capital of France is"], max_new_tokens=3)
    assert answer.fired == "g" and answer.text.strip().startswith("Lyon")
    assert isinstance(method.retrieval.index, TensorKeyIndex)  # keys on the GPU beside the model
    (para,) = replica.generate(["France's capital city is"], max_new_tokens=3)  # found by search, not exact match
    assert para.fired == "g"
