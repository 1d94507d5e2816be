"""Runs read back and tabulated: the one place where run directories are found, read, labelled and tabulated.

* ``runs``      find run directories, read metrics.json, overrides and a failed job's error; label runs
                by the overrides that vary across them.
* ``events``    the TensorBoard scalars and spike texts of a run.
* ``table``     one row per run (CSV, Markdown, rich), and mean ± std over rows that differ only by seed.
* ``expected``  an experiment's ``expected`` block: checked before a run, judged after it.
* ``sweep_callback``  the Hydra callback that writes summary.csv/md at the end of ``sslrun -m``.
* ``cli`` (``sslrun-report``) and ``reproduce`` (``sslrun-reproduce``): the console scripts.

Nothing here imports torch: ``sslrun --help`` loads the sweep callback.
"""
