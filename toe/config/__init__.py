"""The run config: the typed schema in Hydra's ConfigStore (:mod:`~toe.config.schema`), what types cannot check
(:mod:`~toe.config.validate`), what the schedule keys mean (:mod:`~toe.config.stages`), what a resume may change
(:mod:`~toe.config.changes`), and composition with its one-line errors (:mod:`~toe.config.compose`).
"""
