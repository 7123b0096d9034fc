"""For every test directory (``tests/`` and each package's own tests): property tests run without a time limit per
example. Hypothesis' default 200 ms deadline is a timing assertion, which fails on a loaded machine (the suite runs
on several pytest-xdist workers) without saying anything about the code."""

from hypothesis import settings

settings.register_profile("langorch", deadline=None)
settings.load_profile("langorch")
