"""What users run: the ``pro2sam`` command (:mod:`pro2sam.apps.cli`) and the offline demo
(:mod:`pro2sam.apps.demo`). Only here and in :mod:`pro2sam.pipeline` is Ray imported."""
