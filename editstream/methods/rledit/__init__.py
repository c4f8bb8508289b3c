"""RLEdit (Li et al., ICML 2025): a hypernetwork, trained on trajectories of edit batches, maps each
batch's module inputs and loss gradients to a weight shift in one forward pass and a ridge solve.

* `hypernet`: the shift network (one per weight shape) and the ridge solve;
* `method`: the `rledit` edit method (per-edit low-rank factors, removable);
* `train`: training on trajectories of train-split batches, with memory backtracking.
"""
