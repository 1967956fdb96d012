"""The results store: layout.py (where a run lives, its record), files.py (crash-safe writes,
CRC-checked checkpoints, the one safe `torch.load`), locks.py (one trainer per run),
checkpoints.py (what a run saves to resume) and query.py (the whole store as one DataFrame,
the only module here that imports pandas). `paper_repro.results` is the public face.

Deliberately empty: importing one module of the store must not pull in pandas."""
