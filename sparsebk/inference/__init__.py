"""The inference floor: loading a trained model (a checkpoint, a run folder or an exported
folder), exporting it, evaluating it, and sampling from it."""
