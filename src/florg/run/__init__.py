"""The run layer: one run's objects, its run directory, checkpoints, outputs and plots.

* :mod:`florg.run.experiment` -- everything one process needs for a run (model, data, method, task family)
* :mod:`florg.run.cache`      -- the disk cache of encoded splits and FLoRG bases
* :mod:`florg.run.rundir`     -- the run directory (config, environment, status, metrics, summary)
* :mod:`florg.run.checkpoint` -- safetensors + JSON checkpoints for exact resume
* :mod:`florg.run.outputs`    -- the adapters a run writes, described
* :mod:`florg.run.predict`    -- ``florg predict``: a finished run's model on new inputs
* :mod:`florg.run.plots`      -- PNG plots of a run's (or a comparison's) metrics

Comparisons of many runs (``florg compare``, ``florg study``) are in :mod:`florg.study`, above this
layer and :mod:`florg.fl`; nothing here imports either.
"""
