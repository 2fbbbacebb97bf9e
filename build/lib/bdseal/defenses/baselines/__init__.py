"""Baseline post-hoc defenses run in the same framework as PGBD: ``ft`` (plain fine-tuning on D_S) and
``nad`` (Neural Attention Distillation, Li et al. ICLR 2021)."""
