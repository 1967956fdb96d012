"""Adversarial Fine-Tuning (Jeddi et al., 2020) and its baselines, behind one runner.

Public API (everything else is internal):
    RunConfig, build_config, load_experiment, resolve_row   -- configuration
    train                                                   -- run one config end to end, the
                                                               runs it needs first (pipeline.py)
    finetune                                                -- AFT on any model and loader
    load_pretrained                                         -- torchvision:/timm:/run:/file init
    create_model, list_models                               -- model registry
    pgd, fgsm_rs                                            -- the attacks
    make_schedule                                           -- LR schedules
    load                                                    -- the results store as a DataFrame
                                                               (paper_repro.results.load)
    load_model, load_test_images, export_model              -- trained models out of the store
"""
from .api import finetune
from .robustness.attacks import fgsm_rs, pgd
from .config import RunConfig, build_config
from .experiment import load_experiment
from .training.methods import resolve_row
from .export import export_model, load_model, load_test_images
from .orchestration.local import train_with_prerequisites as train
from .models import create_model, list_models
from .models.pretrained import load_pretrained
from .training.schedules import make_schedule

__all__ = ["RunConfig", "build_config", "load_experiment", "resolve_row", "train", "finetune",
           "load_pretrained", "create_model", "list_models", "pgd", "fgsm_rs", "make_schedule",
           "load", "load_model", "load_test_images", "export_model"]


def __getattr__(name: str):
    """`paper_repro.load` on first use (PEP 562): the store's query imports pandas, which
    importing the package (and so every training process) should not."""
    if name == "load":
        from .store.query import load
        return load
    raise AttributeError(f"module 'paper_repro' has no attribute '{name}'")
