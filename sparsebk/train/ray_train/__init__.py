"""Training on Ray: the driver (`run_training`), the Ray Train worker loop, the schedule actor
and its client, the pre-flight checks and the `sparsebk train` command line. Everything a run
does that does not need Ray lives one floor down, in sparsebk.train."""
