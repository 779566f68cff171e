"""Ships the `evaluate` module of the same name as package data (load it with `fdbpl_hf.metrics.load_metric`)."""
