"""Ray Tune sweeps over loss configurations and the accuracy/sparsity Pareto front.

Modules: `config` (sweep YAML -> validated dataclasses), `trial` (one trial = one Ray Train
run), `sweep` (Tuner setup, restore), `results` (trial table), `pareto`, `report` (tables,
plots, markdown; `sparsebk report DIR`), `cli` (`sparsebk sweep`).
"""
