"""Real data, a wing of the core: the public datasets as they unpack (archives.py), NIfTI read and
written with their checks (nifti.py), scans brought to the working grid and cached
(preprocess.py), a federation of real sites (federation.py, which cases.py reaches when a run
names --data-root or --data), and the commands of `python -m realdata`: inspect a download,
write a synthetic federation in the official layouts, segment a folder of scans (with the label
files for viewers of labeltables.py), score a folder of predictions against reference labels.
"""
