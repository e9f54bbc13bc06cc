"""Training the two models of the method, independent of any scheduler (Ray Train runs
:mod:`pro2sam.train.gtformer` in :mod:`pro2sam.pipeline.train_job`).

- :mod:`pro2sam.train.schedule`: the one optimiser and learning-rate schedule both use;
- :mod:`pro2sam.train.gtformer`: GTFormer on image-level labels (stage 1);
- :mod:`pro2sam.train.sam`: a small SAM on synthetic scenes, class-agnostically (stage 2's stand-in).
"""
