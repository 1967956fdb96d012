"""The results store's public face: `from paper_repro import results; results.load(...)`.

What users, tests and plug-ins (`slurm/`) name; the code of the suite imports the store's own
modules (`paper_repro.store.*`) instead, so that training never imports pandas (query.py).
"""
from .store.files import (TEMP_SUFFIX, atomic_torch_save, atomic_write_json, atomic_write_text,
                       check_checkpoint, previous_checkpoint, safe_load, write_metrics)
from .store.layout import (LEDGER, RECORD_SCHEMA, RUN_FILES, STATUS_DONE, STATUS_FAILED,
                           STATUS_RUNNING, STATUS_UNREADABLE, UnreadableRunError, is_done,
                           pretrain_path, read_json, read_record, read_run, remove_stale_temps,
                           require_store, run_dir, run_path_of, runs_root, write_record)
from .store.locks import is_locked, run_lock
from .store.query import arch_label, load, load_metrics, problems

__all__ = ["LEDGER", "RECORD_SCHEMA", "RUN_FILES", "STATUS_DONE", "STATUS_FAILED",
           "STATUS_RUNNING", "STATUS_UNREADABLE", "TEMP_SUFFIX", "UnreadableRunError",
           "arch_label", "atomic_torch_save", "atomic_write_json", "atomic_write_text",
           "check_checkpoint", "is_done", "is_locked", "load", "load_metrics", "pretrain_path",
           "previous_checkpoint", "problems", "read_json", "read_record", "read_run",
           "remove_stale_temps", "require_store", "run_dir", "run_lock", "run_path_of",
           "runs_root", "safe_load", "write_metrics", "write_record"]
