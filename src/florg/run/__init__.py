"""The run layer: one experiment's objects, its run directory, checkpoints, plots and comparisons.

* :mod:`florg.run.experiment` -- everything one process needs for a run (model, data, method, task family)
* :mod:`florg.run.rundir`     -- the run directory (config, environment, status, metrics, summary)
* :mod:`florg.run.checkpoint` -- safetensors + JSON checkpoints for exact resume
* :mod:`florg.run.plots`      -- PNG plots of a run's (or a comparison's) metrics
* :mod:`florg.run.compare`    -- ``florg compare``: every method on one configuration
"""
