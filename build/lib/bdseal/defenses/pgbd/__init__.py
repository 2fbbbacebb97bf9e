"""PGBD (Prototype Guided Backdoor Defense, ICCV 2025) and its variants NT-PGBD and ST-PGBD.

Modules: ``pav`` (prototypes, PAVs, sanitisation loss), ``neural_cleanse`` (target inference and
trigger synthesis), ``mapping`` (large-model mapping), ``defense`` (registered entry points ``pgbd``,
``nt_pgbd``, ``st_pgbd``) and ``gradcam`` (paper Fig. 4 visualisation).
"""
