"""Golden data from the original 3D U²-Net code (huangmozhilv/u2net_torch).

``make_golden.py`` (not run by CI: it needs a checkout of the original) imports the original's own
files, runs them on small synthetic inputs that ``inputs.py`` makes from fixed seeds, and stores
their outputs in ``data/*.npz``. The tests ``tests/test_golden_*.py`` rebuild the same inputs and
compare this project's outputs with the stored ones. See docs/testing.md.
"""
