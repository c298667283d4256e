"""Benchmarks, a wing of the core: speed against MONAI (speed.py), and resources (resources.py):
real-data preprocessing, what leaves a site per round, the memory of N simulated clients.
`python -m bench -h` lists them; docs/speed.md reports them."""
