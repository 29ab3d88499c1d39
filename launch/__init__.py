"""Launchers (nemo-run): ``launch/slurm.py`` for SLURM clusters, ``launch/local.py`` for one machine."""
