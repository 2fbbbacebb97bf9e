"""Experiments: ``run`` wires one cell (data -> attack -> defense -> metrics -> run dir)."""
