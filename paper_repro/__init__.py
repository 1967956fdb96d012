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
    load_model, load_test_images, export_model              -- trained models out of the store
"""
from .api import finetune
from .attacks import fgsm_rs, pgd
from .config import RunConfig, build_config, load_experiment, resolve_row
from .export import export_model, load_model, load_test_images
from .local import train
from .models import create_model, list_models
from .pretrained import load_pretrained
from .results import load
from .schedules import make_schedule

__all__ = ["RunConfig", "build_config", "load_experiment", "resolve_row", "train", "finetune",
           "load_pretrained", "create_model", "list_models", "pgd", "fgsm_rs", "make_schedule",
           "load", "load_model", "load_test_images", "export_model"]
