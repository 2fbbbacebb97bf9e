"""bdseal: defenses against data-poisoning backdoors for image classifiers.

Data flows one way (docs/ARCHITECTURE.md): data -> attacks -> PoisonedSet -> DefenderView -> defenses
-> DefenseResult -> metrics. Only metrics read the Oracle.
"""

__version__ = "0.1.0"
