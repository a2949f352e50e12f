"""The model floor: architecture only (config and presets, BK-core and its float64 reference,
gate, MoE, sparsity losses, the sparse layer with its streaming recurrence, the LM, baselines).
Nothing here imports Ray, torch.distributed, storage, data or training code."""
