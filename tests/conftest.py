"""Settings every test shares."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def profile_cache_folder(tmp_path_factory):
    """Model profiles are cached in this test session's own folder (shared by pytest-xdist's workers and the
    run.sh processes the tests start), never in the user's ``~/.cache``."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "profiles"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FAIRSEQ_EXT_PROFILE_CACHE", str(folder))  # profile_cache.CACHE_ENV
        yield folder
