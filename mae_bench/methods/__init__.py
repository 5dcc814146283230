"""Methods (methods layer): the ``Method`` contract (``method``), the registry that builds any
registered method from a config (``registry``; MAE here, every other method in ``baselines/``),
and the one pretraining loop they all share (``engine``, with its run folder's checks and files
in ``run_folder`` and its logger, signal flag and progress bar in ``train_log``).

This file imports nothing, so that ``baselines/`` can import the contract without importing the
registry, which imports them."""
