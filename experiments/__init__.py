"""Experiments around SegViz, a wing of the core: variants of a run that are not SegViz itself
(variants.py, robust.py), the suite of every setup over node counts and seeds (suite.py), the
comparison of finished runs (compare.py), choosing defaults on validation (selection.py), and
figures (figures.py). `python -m experiments -h` lists the commands.
"""
