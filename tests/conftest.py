"""Shared test fixtures."""

import pytest


@pytest.fixture(scope="session")
def tiny_sam():
    """The seeded random-weight tiny SAM (256 px input, 16x16 embedding, 64x64 low-res masks).

    Shared by the whole session: treat it as read-only.
    """
    from pro2sam.sam_candidates import build_sam

    return build_sam("tiny", seed=0)
