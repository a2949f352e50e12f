"""The storage floor: local paths and object-store URIs (`store`), the layout of a run folder
(`run_folder`) and the checkpoint format (`checkpoint`)."""
