"""The SAGE-OPD study at small scale: a tiny ALFWorld teacher and student built offline, every method and ablation, evaluated and reported (`sage study`)."""
