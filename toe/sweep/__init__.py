"""Multiruns: the pre-check of every job and the status and retry of a sweep's runs (:mod:`~toe.sweep.status`), and the
Optuna search behind ``hparams_search`` (:mod:`~toe.sweep.search`).
"""
